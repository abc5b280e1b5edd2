"""Hostile files (issue #18): what each crafted file costs the other clients of a server.

What is measured
----------------
One scatterbroker server in its own process on a free 127.0.0.1 port
(``build_app(local_config(...))`` under uvicorn, one worker, SQLite catalog, API
key, as ``benchmarks/access.py`` runs it) serving the crafted files of
``tests/hostile_corpus.py`` (registered with ``scatterbroker.catalog.register``;
the two files that stall the registration walk's client-side summary are
planted with ``client.new``, as a write key can).

A *victim* (``--victims`` threads, one keep-alive ``httpx.Client`` each) reads
normal frames of the good control file in a loop -- one whole 64 x 128 frame,
alternately through the fast route (``codec=none``) and Tiled's
``/array/full`` -- and records each request's latency.

* ``baseline``: the victim alone for ``--seconds``; its p50/p99 are the
  reference for every attack of the same run.
* one phase per attack: ``--attackers`` threads read the crafted file for
  ``--seconds`` on every route in turn (fast route ``codec=none``,
  ``/array/full``, ``/metadata``), each request as the corpus case describes
  it, while the victim reads as before.

For each attack it prints the victim's p50 and p99 during the attack and
p99 / baseline p99 (same run), the server's peak RSS during the attack (VmHWM
after resetting it through ``/proc/<pid>/clear_refs``) and its rise over the
RSS at the attack's start, the status codes the attack got (``timeout`` for no
answer within ``--timeout``), the victim's errors, and whether the server
survived (a dead or wedged server, or one whose attack reads got no answer
and may still be running, is restarted on the same catalog before the next
attack, and the attack says so). The last line is one JSON object
with every figure.

``--quick`` (a smoke test: 1-s phases, one victim, one attacker) keeps every
attack; ``--attacks a,b`` runs some. Nothing here asserts a time.

Usage::

    python benchmarks/hostile.py [--seconds 5] [--attackers 2] [--quick]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from access import Server, _free_port  # noqa: E402
from ingest_latency import percentile  # noqa: E402

import hostile_corpus  # noqa: E402

API_KEY = "hostilebench"
HEADERS = {"Authorization": f"Apikey {API_KEY}"}
OCTET = {"Accept": "application/octet-stream"}

SERVER = """
import sys, uvicorn
from pathlib import Path
from scatterbroker.server.app import build_app, local_config
data_dir, port, key, *roots = sys.argv[1:]
app = build_app(local_config(Path(data_dir), [Path(r) for r in roots], api_key=key), freeze_gc=True)
uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
"""

#: every crafted-file attack, in the order run (the swap cases need a file-system
#: change mid-run and are tests only: tests/test_hostile_files.py)
ATTACKS = list(hostile_corpus.GENERATORS)


class Bench:
    """The server process (restartable on the same catalog and port) and its corpus."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.data = work / "data"
        self.port = _free_port()
        self.roots = [self.data / "hostile", self.data / "planted"]
        self.cases = hostile_corpus.build(self.roots[0], self.data / "outside", planted=self.roots[1])
        self.server: Server | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        self.server = Server(f"server{self.starts}", SERVER,
                             [self.work / "sb", self.port, API_KEY, *self.roots], self.port, self.work)
        self.server.wait("/api/v1/")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def register(self) -> None:
        from tiled.client import from_uri

        from scatterbroker.catalog.register import register

        client = from_uri(self.url, api_key=API_KEY)
        register(client, self.roots[0], prefix="hostile")
        for case in self.cases.values():
            if case.planted:
                hostile_corpus.plant(client, case.file)

    def path(self, case: hostile_corpus.Case) -> str:
        prefix = "planted" if case.planted else "hostile"
        return f"{prefix}/{case.file.stem}" + (f"/{case.node}" if case.node else "")

    # -- the server's memory
    def reset_peak(self) -> float:
        """Reset VmHWM to the RSS now; return that RSS, MB."""
        assert self.server is not None
        try:
            with open(f"/proc/{self.server.proc.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        return self.server.memory().get("VmRSS", float("nan"))

    def peak(self) -> float | None:
        assert self.server is not None
        if self.server.proc.poll() is not None:
            return None
        return self.server.memory().get("VmHWM")

    def healthy(self, timeout: float) -> str | None:
        """None if the server answers a normal read right; else why not."""
        import httpx

        assert self.server is not None
        if self.server.proc.poll() is not None:
            return f"died (exit code {self.server.proc.returncode})"
        good = self.cases["good"]
        try:
            r = httpx.get(f"{self.url}/api/v1/array/full/{self.path(good)}", params={"slice": "1"},
                          headers={**HEADERS, **OCTET}, timeout=timeout)
        except httpx.HTTPError as err:
            return f"wedged (a normal read: {type(err).__name__})"
        if r.status_code != 200 or r.content != good.reads[0].data.tobytes():
            return f"wrong answer to a normal read ({r.status_code})"
        return None


class Victim:
    """Threads reading normal frames in a loop; latencies (s) and errors of one phase."""

    def __init__(self, bench: Bench, threads: int, timeout: float) -> None:
        self.bench, self.threads, self.timeout = bench, threads, timeout
        self.latencies: list[float] = []
        self.errors: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _loop(self, seed: int) -> None:
        import httpx

        good = self.bench.cases["good"]
        path = self.bench.path(good)
        n_frames = good.reads[-1].data.shape[0]
        with httpx.Client(base_url=f"{self.bench.url}/api/v1", headers=HEADERS, timeout=self.timeout) as http:
            i = seed
            while not self._stop.is_set():
                frame = i % n_frames
                t0 = time.perf_counter()
                try:
                    if i % 2:
                        r = http.get(f"/sb/frames/{path}", params={"slice": str(frame), "codec": "none"})
                    else:
                        r = http.get(f"/array/full/{path}", params={"slice": str(frame)}, headers=OCTET)
                    status = r.status_code
                except httpx.HTTPError as err:
                    status = type(err).__name__
                dt = time.perf_counter() - t0
                with self._lock:
                    if status == 200:
                        self.latencies.append(dt)
                    else:
                        self.errors[str(status)] += 1
                        self.latencies.append(dt)  # a failed read is as slow as it was
                i += 1

    def __enter__(self) -> Victim:
        self._workers = [threading.Thread(target=self._loop, args=(k,), daemon=True) for k in range(self.threads)]
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(self.timeout + 5)

    def stats(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        if not lat:
            return {"n": 0, "p50_ms": None, "p99_ms": None, "errors": dict(self.errors)}
        return {"n": len(lat), "p50_ms": round(percentile(lat, 50) * 1000, 2),
                "p99_ms": round(percentile(lat, 99) * 1000, 2), "errors": dict(self.errors)}


def attack(bench: Bench, case: hostile_corpus.Case, seconds: float, attackers: int,
           timeout: float) -> collections.Counter:
    """``attackers`` threads reading ``case`` on every route for ``seconds``; status codes."""
    import httpx

    statuses: collections.Counter = collections.Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    path = bench.path(case)
    requests: list[tuple[str, dict, dict]] = []
    for read in case.reads:
        requests.append((f"/sb/frames/{path}", {"slice": read.text, "codec": "none"}, {}))
        requests.append((f"/array/full/{path}", {"slice": read.text}, OCTET))
    requests.append((f"/metadata/{path}", {}, {}))

    def loop(k: int) -> None:
        with httpx.Client(base_url=f"{bench.url}/api/v1", headers=HEADERS, timeout=timeout) as http:
            i = k
            while time.monotonic() < deadline:
                url, params, headers = requests[i % len(requests)]
                route = {"sb": "fast", "array": "full"}.get(url.split("/")[1], url.split("/")[1])
                try:
                    status = str(http.get(url, params=params, headers=headers).status_code)
                except httpx.TimeoutException:
                    status = "timeout"
                except httpx.HTTPError as err:
                    status = type(err).__name__
                with lock:
                    statuses[f"{route}:{status}"] += 1
                i += 1

    threads = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(attackers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 5)
    return statuses


def _ratio(x: float | None, base: float | None) -> float | None:
    return round(x / base, 2) if x is not None and base else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per phase (default 5)")
    p.add_argument("--attackers", type=int, default=2, help="concurrent attack threads (default 2)")
    p.add_argument("--victims", type=int, default=2, help="concurrent victim threads (default 2)")
    p.add_argument("--timeout", type=float, default=15.0, help="per-request timeout, s (default 15)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attacks (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1-s phases, 1 victim, 1 attacker")
    p.add_argument("--workdir", type=Path, default=None, help="keep files and logs here (default: a temp dir)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")  # as importing access.py did before it ran nothing at import
    if args.quick:
        args.seconds, args.attackers, args.victims = 1.0, 1, 1
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        p.error(f"unknown attacks {unknown}; choose from {ATTACKS}")

    with tempfile.TemporaryDirectory(prefix="sb-hostile-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        bench = Bench(work)
        print(f"corpus written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        bench.start()
        try:
            bench.register()
            return run(bench, attacks, args)
        finally:
            bench.stop()


def run(bench: Bench, attacks: list[str], args: argparse.Namespace) -> int:
    bench.reset_peak()
    with Victim(bench, args.victims, args.timeout) as victim:
        time.sleep(args.seconds)
    base = victim.stats()
    base_rss = bench.server.memory().get("VmRSS") if bench.server else None
    print(f"baseline (victim alone, {args.victims} thread(s), {args.seconds:g} s): "
          f"p50 {base['p50_ms']} ms, p99 {base['p99_ms']} ms, n={base['n']}, RSS {base_rss:.0f} MB")
    result: dict[str, Any] = {"benchmark": "hostile", "quick": args.quick, "seconds": args.seconds,
                              "attackers": args.attackers, "victims": args.victims,
                              "baseline": {**base, "rss_mb": round(base_rss or 0, 1)}, "attacks": {}}
    for name in attacks:
        case = bench.cases[name]
        start_rss = bench.reset_peak()
        with Victim(bench, args.victims, args.timeout) as victim:
            statuses = attack(bench, case, args.seconds, args.attackers, args.timeout)
        stats = victim.stats()
        peak = bench.peak()
        health = bench.healthy(args.timeout)
        stuck = any(k.endswith((":timeout", ":ReadTimeout")) for k in statuses)
        if health is not None or stuck:  # reads still running would weigh on the next attack
            bench.stop()
            bench.start()
            health = health or "restarted (the attack's reads got no answer and may still run)"
        row = {
            **stats,
            "p99_ratio": _ratio(stats["p99_ms"], base["p99_ms"]),
            "peak_rss_mb": None if peak is None else round(peak, 1),
            "rss_rise_mb": None if peak is None else round(peak - start_rss, 1),
            "statuses": dict(sorted(statuses.items())),
            "server": "ok" if health is None else health,
            "note": case.note,
        }
        result["attacks"][name] = row
        peak_text = "died" if peak is None else f"{peak:.0f} MB ({peak - start_rss:+.0f})"
        print(f"{name:17s} victim p50 {stats['p50_ms']} ms, p99 {stats['p99_ms']} ms "
              f"(x{row['p99_ratio']} of baseline p99), n={stats['n']}, errors {stats['errors'] or 0}; "
              f"server peak RSS {peak_text}; attack got {row['statuses']}; server {row['server']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
