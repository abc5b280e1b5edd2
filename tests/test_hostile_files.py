"""Hostile files (issue #18): every crafted file of ``hostile_corpus`` through a real server.

One scatterbroker server in a process of its own (``test_faults.ServerProcess``:
so a crash is a crash of that process, its RSS is its own, and it can be
killed and restarted when a read wedges it) serves the corpus: the files are
registered with ``scatterbroker.catalog.register`` like any data tree, except
two that stall the registration walk's client-side summary, which are planted
with a raw ``client.new`` (as a write key can). Every read goes through

* ``client``: scatterbroker's client (``from_uri(...)[path][key]``: the
  FastArrayClient, which asks for Bitshuffle-LZ4 frames as stored and decodes
  them here),
* ``fast``: the fast route with ``codec=none`` (the server decodes),
* ``full``: Tiled's ``/api/v1/array/full/<path>?slice=...``,
* ``metadata``: Tiled's ``/api/v1/metadata/<path>``,

and must answer a clear 4xx (status as the case says, a message naming the
problem) or the right data; the server never crashes (it answers a normal read
afterwards) and its peak RSS during a case stays within ``RSS_BOUND`` of
where it started. The symlink-swap cases read OK first, then must answer 403
without the secret. The differential test fills the server's heap with a
random marker and searches every answer to every crafted file for it.

No waiting is asserted on: a read that gets no answer within ``TIMEOUT`` is a
failure ("no answer"), and the server is restarted for what follows.
"""

from __future__ import annotations

import dataclasses
import http.client
import re
import secrets
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import API_KEY, SQLITE
from hostile_corpus import Case, Read, bitshuffle, build, marker_file, plant
from postgres import free_port
from test_faults import ServerProcess

HEADERS = {"Authorization": f"Apikey {API_KEY}"}
OCTET = {"Accept": "application/octet-stream"}
#: seconds a read may take before it counts as no answer (and the server is restarted)
TIMEOUT = 20.0
#: how far the server's peak RSS may rise above where a case started
RSS_BOUND = 256 * 2**20
#: the heap marker of the differential test: ASCII, so it is the same bytes in request
#: bodies, JSON, Python strings, SQL text and the marker file's frames
MARKER = ("MK" + secrets.token_hex(7)).encode()
#: what the files outside the roots hold (the symlink-swap targets)
SECRET = ("SECRET" + secrets.token_hex(5)).encode()

HOSTILE = ["bslz4_overread", "bslz4_run_1mib", "bslz4_block_size", "bslz4_bomb", "gzip_bomb",
           "gzip_overflow", "tiff_bomb", "huge_1elem", "self_links", "vlen_strings", "many_attrs"]
SWAPS = ["ext_storage", "vds"]


# ---------------------------------------------------------------------- the server


@dataclasses.dataclass
class Answer:
    route: str
    status: int | None  # None: no answer (timeout, connection reset, server gone)
    body: bytes = b""
    array: np.ndarray | None = None
    detail: str = ""
    #: the client refused the answer itself (its decoder found the stored chunk corrupt)
    local: bool = False

    def __str__(self) -> str:
        what = "refused by the client" if self.local else "no answer" if self.status is None else str(self.status)
        return f"{self.route}: {what} {(self.detail or self.body[:48].hex())[:200]!r}"


class Served:
    """The server process, its URL, and what the tests need of it."""

    def __init__(self, proc: ServerProcess, corpus: Any) -> None:
        self.proc, self.corpus = proc, corpus
        self.url = proc.url
        self.http = httpx.Client(base_url=f"{self.url}/api/v1", headers=HEADERS, timeout=TIMEOUT)
        self.restarts: list[str] = []
        self._client: Any = None

    # -- process
    @property
    def pid(self) -> int:
        return self.proc.proc.pid

    def alive(self) -> bool:
        return self.proc.proc is not None and self.proc.proc.is_alive()

    def status(self, field: str) -> int:
        """``VmRSS``/``VmHWM`` of the server process, bytes."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    def reset_peak(self) -> int:
        """Reset the process's peak RSS (VmHWM) to its RSS now; return that RSS."""
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")
        return self.status("VmRSS")

    def serves(self) -> str | None:
        """None if the server answers a normal read right; else what is wrong."""
        if not self.alive():
            return f"the server process died (exit code {self.proc.proc.exitcode})"
        good = self.corpus.cases["good"]
        try:
            r = httpx.get(f"{self.url}/api/v1/array/full/{self.corpus.path(good)}", params={"slice": "1"},
                          headers={**HEADERS, **OCTET}, timeout=TIMEOUT)
        except httpx.HTTPError as err:
            return f"the server no longer answers a normal read ({type(err).__name__})"
        if r.status_code != 200:
            return f"a normal read answered {r.status_code}: {r.text[:200]}"
        if not np.array_equal(np.frombuffer(r.content, "u1").reshape(64, 128), good.reads[0].data):
            return "a normal read answered wrong data"
        return None

    def restart(self, why: str) -> None:
        self.restarts.append(why)
        self.proc.kill()
        self.proc.start()
        self._client = None
        self.http.close()
        self.http = httpx.Client(base_url=f"{self.url}/api/v1", headers=HEADERS, timeout=TIMEOUT)

    # -- reads
    def client(self) -> Any:
        from tiled.client import from_uri

        if self._client is None:
            self._client = from_uri(self.url, api_key=API_KEY, timeout=TIMEOUT)
        return self._client

    def read_client(self, path: str, read: Read) -> Answer:
        try:
            arr = np.asarray(self.client()[path][read.key])
        except Exception as err:  # noqa: BLE001 -- every failure is an answer to judge
            return _failed("client", err)
        return Answer("client", 200, arr.tobytes(), arr)

    def read_fast(self, path: str, read: Read) -> Answer:
        try:
            r = self.http.get(f"/sb/frames/{path}", params={"slice": read.text, "codec": "none"})
        except httpx.HTTPError as err:
            return Answer("fast", None, detail=f"{type(err).__name__}: {err}")
        if r.status_code != 200:
            return Answer("fast", r.status_code, r.content, detail=_detail(r))
        shape = tuple(int(s) for s in r.headers.get("x-sb-shape", "").split(",") if s)
        try:
            arr = np.frombuffer(r.content, r.headers["x-sb-dtype"]).reshape(shape)
        except (KeyError, ValueError, TypeError) as err:
            return Answer("fast", 200, r.content, detail=f"undecodable body: {err}")
        return Answer("fast", 200, r.content, arr)

    def read_full(self, path: str, read: Read, dtype: Any) -> Answer:
        try:
            r = self.http.get(f"/array/full/{path}", params={"slice": read.text}, headers=OCTET)
        except httpx.HTTPError as err:
            return Answer("full", None, detail=f"{type(err).__name__}: {err}")
        if r.status_code != 200:
            return Answer("full", r.status_code, r.content, detail=_detail(r))
        arr = None
        dt = np.dtype(dtype if dtype is not None else read.data.dtype if read.data is not None else "u1")
        if read.data is not None and len(r.content) == read.data.size * dt.itemsize:
            arr = np.frombuffer(r.content, dt).reshape(read.data.shape)
        elif len(r.content) % dt.itemsize == 0:
            arr = np.frombuffer(r.content, dt)  # not what was expected: kept for the marker search
        return Answer("full", 200, r.content, arr)

    def metadata(self, path: str) -> Answer:
        try:
            r = self.http.get(f"/metadata/{path}")
        except httpx.HTTPError as err:
            return Answer("metadata", None, detail=f"{type(err).__name__}: {err}")
        return Answer("metadata", r.status_code, r.content, detail=_detail(r) if r.status_code >= 400 else "")


def _detail(r: httpx.Response) -> str:
    try:
        detail = r.json().get("detail")
    except ValueError:
        return r.text
    return detail if isinstance(detail, str) else repr(detail)


def _failed(route: str, err: Exception) -> Answer:
    response = getattr(err, "response", None)
    if isinstance(response, httpx.Response):
        body = b""
        try:
            body = response.content
        except httpx.ResponseNotRead:
            pass
        detail = str(err)
        if body:
            try:
                detail = _detail(response)
            except Exception:  # noqa: BLE001
                pass
        return Answer(route, response.status_code, body, detail=detail)
    transport = (httpx.TransportError, OSError, http.client.HTTPException)
    return Answer(route, None, detail=f"{type(err).__name__}: {err}", local=not isinstance(err, transport))


@dataclasses.dataclass
class Corpus:
    root: Path
    cases: dict[str, Case]

    def path(self, case: Case) -> str:
        """The node path of a case's dataset."""
        prefix = "planted" if case.planted else "hostile"
        stem = case.file.stem
        return f"{prefix}/{stem}" + (f"/{case.node}" if case.node else "")

    def file_node(self, case: Case) -> str:
        return ("planted" if case.planted else "hostile") + "/" + case.file.stem


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("hostile")
    cases = build(root / "hostile", root / "outside", secret=SECRET, planted=root / "planted")
    cases["marker"] = marker_file(root / "hostile", MARKER)
    return Corpus(root, cases)


@pytest.fixture(scope="module")
def server(corpus, tmp_path_factory):
    from tiled.client import from_uri
    from tiled.client import utils as client_utils

    from scatterbroker.catalog.register import register

    work = tmp_path_factory.mktemp("hostile-server")
    roots = [corpus.root / "hostile", corpus.root / "planted"]
    proc = ServerProcess(SQLITE.config(work / "db", roots), free_port(), work / "server.log")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(client_utils, "TILED_RETRY_ATTEMPTS", 1)  # a 500 is an answer, not a retry
        import scatterbroker.clients.fast_array as sb_client

        patch.setattr(sb_client, "TIMEOUT", TIMEOUT)
        proc.start()
        try:
            client = from_uri(proc.url, api_key=API_KEY, timeout=TIMEOUT)
            report = register(client, corpus.root / "hostile", prefix="hostile")
            for case in corpus.cases.values():
                if case.planted:
                    plant(client, case.file)
            served = Served(proc, corpus)
            served.report = report
            yield served
        finally:
            proc.kill()


# ---------------------------------------------------------------------- judging


def _accepts(expected: int | tuple[int, ...] | None, status: int) -> bool:
    if expected is None:
        return False
    return status in (expected if isinstance(expected, tuple) else (expected,))


def judge(read: Read, answer: Answer) -> str | None:
    """None if ``answer`` is what ``read`` must give; else what is wrong with it."""
    if answer.local:  # the client's own decoder refused the bytes it was sent: fine if it says why
        if read.status is not None and read.problem and re.search(read.problem, answer.detail, re.I):
            return None
        return f"{answer.route}: the client raised {answer.detail[:200]!r}"
    if answer.status is None:
        return f"{answer.route}: no answer ({answer.detail[:200]})"
    if answer.status >= 500:
        return f"{answer.route}: {answer.status} {answer.detail[:200]!r}"
    if answer.status >= 400:
        if not _accepts(read.status, answer.status):
            want = "the data" if read.status is None else f"{read.status}"
            return f"{answer.route}: {answer.status} where {want} was expected: {answer.detail[:200]!r}"
        if not answer.detail.strip() or (read.problem and not re.search(read.problem, answer.detail, re.I)):
            return f"{answer.route}: {answer.status} without a message naming the problem: {answer.detail[:200]!r}"
        return None
    if read.data is None:
        return (f"{answer.route}: {answer.status} with {len(answer.body)} bytes where {read.status} was expected "
                f"(first bytes {answer.body[:24].hex()})")
    if answer.array is None or answer.array.shape != read.data.shape or not np.array_equal(answer.array, read.data):
        got = None if answer.array is None else answer.array.shape
        return (f"{answer.route}: {answer.status} with wrong data (shape {got}, expected {read.data.shape}; "
                f"first bytes {answer.body[:24].hex()})")
    return None


def judge_metadata(answer: Answer) -> str | None:
    if answer.status is None:
        return f"metadata: no answer ({answer.detail[:200]})"
    if answer.status >= 500:
        return f"metadata: {answer.status} {answer.detail[:200]!r}"
    if answer.status >= 400 and not answer.detail.strip():
        return f"metadata: {answer.status} without a message"
    return None


def read_case(server: Served, case: Case, problems: list[str], answers: list[Answer] | None = None,
              routes: tuple[str, ...] = ("metadata", "client", "fast", "full"),
              before: Any = None) -> None:
    """Every read of ``case`` on every route; what is wrong goes to ``problems``, every
    answer to ``answers``; ``before()`` runs before each array read. After a read that got no answer, or killed the server, the
    server is restarted and the case's remaining reads are not tried."""
    path = server.corpus.path(case)

    def check_health(after: str) -> bool:
        wrong = server.serves()
        if wrong is None:
            return True
        problems.append(f"after {after}: {wrong}")
        server.restart(f"{case.name}: {wrong}")
        return False

    dtype = None
    nodes = [path] + [server.corpus.file_node(case) + (f"/{sub}" if sub else "") for sub in case.metadata]
    for i, node in enumerate(nodes if "metadata" in routes else []):
        answer = server.metadata(node)
        if answers is not None:
            answers.append(answer)
        wrong = judge_metadata(answer)
        if wrong:
            problems.append(f"{node} {wrong}")
        if answer.status is None and not check_health(f"GET /metadata/{node}"):
            return
        if i == 0 and answer.status == 200:
            try:
                dt = httpx.Response(200, content=answer.body).json()["data"]["attributes"]["structure"]["data_type"]
                order = {"little": "<", "big": ">"}.get(dt["endianness"], "|")
                dtype = np.dtype(f"{order}{dt['kind']}{dt['itemsize']}")
            except Exception:  # noqa: BLE001 -- not a plain array: the reads judge it
                dtype = None
    for read in case.reads:
        for route in routes:
            if route == "metadata":
                continue
            if before is not None:
                before()
            if route == "client":
                answer = server.read_client(path, read)
            elif route == "fast":
                answer = server.read_fast(path, read)
            else:
                answer = server.read_full(path, read, dtype)
            if answers is not None:
                answers.append(answer)
            wrong = judge(read, answer)
            if wrong:
                problems.append(f"slice={read.text} {wrong}")
            if (answer.status is None or (answer.status >= 500 and not server.alive())) and not check_health(
                    f"{route} slice={read.text}"):
                return
    check_health("the case's reads")


# ---------------------------------------------------------------------- the tests


def test_corpus_is_what_it_claims(corpus):
    """The crafted files hold what their names say (so the tests below can fail): every
    file is small; each Bitshuffle-LZ4 over-read chunk declares more compressed bytes
    than it holds; the bombs' streams inflate far beyond their files; the symlink
    targets are outside the roots."""
    import struct
    import zlib

    import h5py

    for case in corpus.cases.values():
        assert case.file.stat().st_size < 8 * 2**20, (case.name, case.file.stat().st_size)
    for name in ("bslz4_overread", "bslz4_run_1mib"):
        with h5py.File(corpus.cases[name].file) as f:
            chunk = f["data"].id.read_direct_chunk((0, 0, 0))[1]
        total, block = struct.unpack(">QI", chunk[:12])
        claimed = struct.unpack(">I", chunk[12:16])[0]
        assert total == block and claimed > len(chunk) - 16 and claimed >= total, (name, total, claimed, len(chunk))
    for name, declared in (("gzip_bomb", 2**30), ("gzip_overflow", 64 * 64)):
        with h5py.File(corpus.cases[name].file) as f:
            stored = f["data"].id.read_direct_chunk((0, 0, 0))[1]
        d = zlib.decompressobj()
        out = len(d.decompress(stored, 16 * 2**20))
        assert out == 16 * 2**20 and len(stored) < 1.1 * 2**20, name  # > 16 MiB from ~1 MB
        assert declared < 2**31
    for name in SWAPS:
        assert corpus.root / "outside" not in [corpus.root / "hostile", corpus.root / "planted"]
    assert MARKER not in b"".join(c.file.read_bytes() for n, c in corpus.cases.items() if n != "marker")


def test_registration_of_the_corpus(server):
    """Registration reports nothing but the external storage's raw file (not a data file)."""
    failed = {Path(p).name for p, _why in server.report.failed}
    assert failed <= {"ext_storage.raw"}, server.report.failed


def _leaks(answer: Answer, needle: bytes, block: int) -> bool:
    if needle in answer.body:
        return True
    if answer.array is not None and answer.array.dtype.kind in "iuf":
        if needle in answer.array.tobytes():
            return True
        if block and needle in bitshuffle(answer.array, block):  # an over-read comes back bit-shuffled
            return True
    return False


def fill_heap(server: Served, rounds: int = 6, frames: bool = True) -> None:
    """Leave MARKER all over the server's freed heap: send requests holding it, read the
    marker file's frames (decoded by the fast route's decoder and by h5py's filters),
    and last its many small chunks: small freed buffers holding the marker, the size
    class of a crafted chunk's buffer (without these, the 8 KiB an over-read copies
    seldom reaches the marker)."""
    marker = server.corpus.cases["marker"]
    path = server.corpus.path(marker)
    base = server.corpus.file_node(marker)
    text = MARKER.decode() * 512
    for _ in range(rounds):
        if frames:
            server.http.post("/search/", json={"query": text})  # a request body, parsed and freed
            server.http.get("/search/", params={"filter[fulltext][condition][text]": text[:2000]})
            for sl in ("0:4", "1", "2,0:30,0:100"):
                server.http.get(f"/sb/frames/{path}", params={"slice": sl, "codec": "none"})
                server.http.get(f"/array/full/{path}", params={"slice": sl}, headers=OCTET)
                server.http.get(f"/array/full/{base}/gz", params={"slice": sl}, headers=OCTET)
                server.http.get(f"/array/full/{base}/raw", params={"slice": sl}, headers=OCTET)
        server.http.get(f"/array/full/{base}/small", headers=OCTET)
        server.http.get(f"/array/full/{base}/small_bslz4", headers=OCTET)


@pytest.mark.parametrize("name", [*HOSTILE, *SWAPS])
def test_no_answer_contains_heap_bytes(server, corpus, name):
    """The differential test: with MARKER in the server's freed heap (and nowhere in the
    crafted files), no answer to any read of the crafted file contains it -- raw
    response bytes, decoded arrays, and decoded arrays bit-shuffled back (what an
    over-read's literals become). Statuses are judged by test_crafted_file.

    Runs before the other reads of the crafted files (file order): the HDF5 chunk
    cache and the server's open files keep what a chunk decoded to at its first
    read, so the marker must be in the heap before that read."""
    case = corpus.cases[name]
    if not server.alive() or server.serves() is not None:
        server.restart("before " + name)
    fill_heap(server)
    answers: list[Answer] = []
    # Tiled's route first: h5py decodes the chunk once and its chunk cache keeps the result
    read_case(server, case, [], answers, routes=("full", "fast", "client", "metadata"),
              before=lambda: fill_heap(server, rounds=2, frames=False))
    seen = [f"{a.route}: {a.status}" for a in answers if _leaks(a, MARKER, case.bshuf_block)]
    seen += [f"{a.route}: {a.status} (the secret outside the roots)" for a in answers if _leaks(a, SECRET, 0)]
    assert not seen, f"{name}: answers holding bytes that are not in the file:\n  " + "\n  ".join(seen)


@pytest.mark.parametrize("name", HOSTILE)
def test_crafted_file(server, corpus, name):
    """Every read of the crafted file on every route answers its 4xx or the right data,
    the server survives it, and its peak RSS stays within RSS_BOUND."""
    case = corpus.cases[name]
    if not server.alive() or server.serves() is not None:
        server.restart("before " + name)
    base = server.reset_peak()
    problems: list[str] = []
    pid = server.pid
    read_case(server, case, problems)
    if server.pid == pid and server.alive():
        peak = server.status("VmHWM") - base
        if peak > RSS_BOUND:
            problems.append(f"the server's peak RSS rose {peak / 2**20:.0f} MiB (bound {RSS_BOUND / 2**20:.0f})")
    assert not problems, f"{name} ({case.note}):\n  " + "\n  ".join(problems)


def test_good_file_reads_on_every_route(server, corpus):
    """The control: the good file answers its data on every route (so the checks above
    are not passed by a server that refuses everything)."""
    problems: list[str] = []
    read_case(server, corpus.cases["good"], problems)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", SWAPS)
def test_symlink_swap_after_first_read(server, corpus, name):
    """A file the HDF5 library opens for a dataset (external raw storage, a VDS source)
    is inside the root at the first read, then swapped for a symlink to a file outside
    the roots: every later read answers 403 and never the outside file's bytes."""
    case = corpus.cases[name]
    if not server.alive() or server.serves() is not None:
        server.restart("before " + name)
    first = Read(case.reads[0].key, data=case.reads[0].data)  # before the swap: the data
    problems: list[str] = []
    read_case(server, dataclasses.replace(case, reads=[first]), problems)
    assert not problems, "before the swap:\n  " + "\n  ".join(problems)
    assert case.swap is not None
    case.swap()
    after = Read(case.reads[0].key, status=403, problem=case.reads[0].problem)
    answers: list[Answer] = []
    read_case(server, dataclasses.replace(case, reads=[after], metadata=[]), problems, answers)
    leaked = [str(a) for a in answers if _leaks(a, SECRET, 0)]
    assert not leaked, "the outside file's bytes were served: " + "; ".join(leaked)
    assert not problems, "after the swap:\n  " + "\n  ".join(problems)
