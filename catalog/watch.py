"""Watch a detector directory and register frames as they land (DESIGN.md §4).

Numbered frames join their scan's ``frames`` array as soon as the detector
closes them: the scan node's data source is extended in place (Tiled's
``PUT /api/v1/data_source`` with ``patch_shape``/``patch_offset``), so clients
subscribed to the array hear about each new frame, and a row per frame is
appended to the scan's ``headers`` table. A file still being written (size
changing, or shorter than its own header says) waits and is retried; it is
never registered half.

The catalog is the source of truth: on start the watcher compares the
directory with what the catalog already lists and appends only what is
missing, so a restart neither duplicates nor misses a frame.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..adapters import registry
from ..adapters.sequence import FrameInfo, Template, ranges_of, stack_structure
from ..errors import IncompleteFile, ScatterbrokerError, UnknownFormat
from .checksum import ALGORITHM, file_checksum
from .names import check_key
from .register import register_sequence, register_single, source_of
from .walk import NUMBERED, Sequence, Single, walk


@dataclass
class Stats:
    """Running totals, for the live status line."""

    frames: int = 0
    bytes: int = 0
    problems: int = 0
    backlog: int = 0
    started: float = field(default_factory=time.monotonic)
    last_problem: str = ""

    def line(self) -> str:
        dt = max(time.monotonic() - self.started, 1e-9)
        return (
            f"{self.frames} frames  {self.frames / dt:.1f} frames/s  "
            f"{self.bytes / dt / 1e6:.1f} MB/s  backlog {self.backlog}  "
            f"problems {self.problems}"
        )


@dataclass
class _Pending:
    size: int
    mtime_ns: int
    seen: float
    closed: bool = False


@dataclass
class _Scan:
    """A growing scan as the catalog has it."""

    node: Any
    frames_path: str
    data_source: dict
    template: Template
    frame_shape: tuple[int, ...]
    dtype: str
    columns: list[str]
    bytes: int
    mtime_ns: int
    parts: list[str] = field(default_factory=list)  # catalog path of the scan node
    changed: float = field(default_factory=time.monotonic)
    stacked: int = 0  # frames in the last stacked file


class Watcher:
    """Register frames under ``directory`` into ``client``/``prefix`` as they appear.

    Parameters
    ----------
    client
        Writable Tiled client (root container).
    directory
        Detector output directory (a readable root of the server).
    prefix
        Catalog node the directory maps to, e.g. ``raw/proposal-42``.
    poll
        Use stat polling instead of inotify (network file systems).
    settle
        Seconds a file's size must stay unchanged before it is taken, when
        no close event is available (polling, or a writer that reopens).
    stack_to
        If given, a scan that has had no new frame for ``stack_after`` seconds
        is stacked into ``<stack_to>/<dirs>/<scan>.nxs`` (Bitshuffle-LZ4) with a
        wrapper ``<scan>_wrapper.nxs`` beside it, both registered under
        ``stack_prefix``; new frames later trigger a fresh stack. This
        directory must be a readable root of the server.
    """

    def __init__(
        self,
        client: Any,
        directory: str | Path,
        prefix: str = "",
        *,
        poll: bool = False,
        settle: float = 0.3,
        on_problem: Callable[[str], None] | None = None,
        stack_to: str | Path | None = None,
        stack_after: float = 10.0,
        stack_prefix: str = "scans",
    ) -> None:
        self.client = client
        self.directory = Path(directory).resolve()
        self.prefix = [p for p in prefix.split("/") if p]
        self.poll = poll
        self.settle = settle
        self.stats = Stats()
        self.on_problem = on_problem
        self._pending: dict[Path, _Pending] = {}
        self._lock = threading.Lock()
        self._scans: dict[tuple, _Scan] = {}
        self._observer = None
        #: set once events are being watched and the directory is reconciled
        self.ready = threading.Event()
        self.stack_to = Path(stack_to).resolve() if stack_to else None
        self.stack_after = stack_after
        self.stack_prefix = stack_prefix
        self._stacking: Any = None  # the one stacking job in flight (a Future)

    # -- events ----------------------------------------------------------

    def notice(self, path: str | Path, closed: bool = False) -> None:
        """Note that ``path`` was created, written or closed (thread-safe)."""
        path = Path(path)
        if path.name.startswith(".") or not path.is_file():
            return
        try:
            st = path.stat()
        except OSError:
            return
        with self._lock:
            old = self._pending.get(path)
            if old is None or (old.size, old.mtime_ns) != (st.st_size, st.st_mtime_ns) or closed:
                self._pending[path] = _Pending(st.st_size, st.st_mtime_ns, time.monotonic(), closed)

    def start(self) -> None:
        """Reconcile the directory with the catalog, then start watching."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_created(self, event):
                if not event.is_directory:
                    watcher.notice(event.src_path)

            def on_modified(self, event):
                if not event.is_directory:
                    watcher.notice(event.src_path)

            def on_closed(self, event):
                if not event.is_directory:
                    watcher.notice(event.src_path, closed=True)

            def on_moved(self, event):
                if not event.is_directory:
                    watcher.notice(event.dest_path, closed=True)

        self._observer = (PollingObserver(timeout=0.2) if self.poll else Observer())
        self._observer.schedule(Handler(), str(self.directory), recursive=True)
        self._observer.start()
        self.reconcile()
        self.ready.set()

    def stop(self) -> None:
        self.ready.clear()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
            self._observer = None

    def run(self, stop: threading.Event, interval: float = 0.05, status: Callable[[Stats], None] | None = None) -> None:
        """Process events until ``stop`` is set."""
        self.start()
        last = 0.0
        try:
            while not stop.is_set():
                self.step()
                if status and time.monotonic() - last > 1.0:
                    status(self.stats)
                    last = time.monotonic()
                stop.wait(interval)
        finally:
            self.stop()

    # -- the work --------------------------------------------------------

    def reconcile(self) -> None:
        """Append whatever the directory has and the catalog lacks."""
        for parts, listing in walk(self.directory):
            for item in [*listing.sequences, *listing.singles]:
                if isinstance(item, Single) and NUMBERED.match(item.path.name) \
                        and registry.sequence_mimetype(item.mimetype):
                    self.notice(item.path, closed=True)  # a scan's first frame, not a lone file
                elif isinstance(item, Single):
                    self._ensure_single(item)
                else:
                    for n in item.numbers:
                        self.notice(item.directory / f"{item.prefix}{n:0{item.width}d}{item.suffix}", closed=True)
            for path, why in listing.unknown:
                self._problem(f"{why}")

    def step(self) -> int:
        """Take the files that are complete and append them; return how many."""
        now = time.monotonic()
        ready: list[Path] = []
        with self._lock:
            for path, p in list(self._pending.items()):
                try:
                    st = path.stat()
                except OSError:
                    del self._pending[path]
                    continue
                if (st.st_size, st.st_mtime_ns) != (p.size, p.mtime_ns):
                    self._pending[path] = _Pending(st.st_size, st.st_mtime_ns, now)
                elif p.closed or now - p.seen >= self.settle:
                    ready.append(path)
            self.stats.backlog = len(self._pending)
        taken = self._take(ready)
        with self._lock:
            for path in taken:
                self._pending.pop(path, None)
            self.stats.backlog = len(self._pending)
        if self.stack_to is not None:
            self._stack_idle_scans()
        return len(taken)

    def _stack_idle_scans(self) -> None:
        """Stack one scan that has stopped growing, on a background thread."""
        if self._stacking is not None and not self._stacking.done():
            return
        now = time.monotonic()
        for scan in self._scans.values():
            n = int(scan.template.numbers().size)
            if n > scan.stacked and now - scan.changed >= self.stack_after:
                from concurrent.futures import ThreadPoolExecutor

                scan.stacked = n
                pool = ThreadPoolExecutor(1, thread_name_prefix="sb-stack")
                self._stacking = pool.submit(self._stack, scan)
                pool.shutdown(wait=False)
                return

    def stacked(self, timeout: float | None = None) -> None:
        """Wait for the stacking job in flight, if any (tests, shutdown)."""
        if self._stacking is not None:
            self._stacking.result(timeout)

    def _stack(self, scan: _Scan) -> None:
        """Stack ``scan`` into a NeXus file plus wrapper and register both."""
        from ..reduction.stack import stack_files
        from ..reduction.wrapper import write_wrapper
        from .register import register

        rel = scan.parts[len(self.prefix):-1]
        key = scan.parts[-1]
        out_dir = self.stack_to.joinpath(*rel)
        out_dir.mkdir(parents=True, exist_ok=True)
        metadata = {k: v for k, v in scan.node.metadata.items() if k not in ("source", "problems")}
        try:
            report = stack_files(scan.template, out_dir / f"{key}.nxs", metadata=metadata)
            write_wrapper(out_dir / f"{key}_wrapper.nxs", report.path, metadata=metadata)
            prefix = "/".join([self.stack_prefix, *rel])
            for name in (f"{key}.nxs", f"{key}_wrapper.nxs"):
                result = register(self.client, out_dir / name, prefix=prefix)
                for _, why in result.failed:
                    self._problem(why, scan=scan)
            if report.missing:
                self._problem(f"stacked {key}: {len(report.missing)} frames missing", scan=scan)
        except Exception as err:  # a failed stack is a problem to report, not a crash
            self._problem(f"stacking {key} failed: {err}", scan=scan)

    def _take(self, paths: list[Path]) -> list[Path]:
        """Group ready files by scan and append each group; return the paths done."""
        done: list[Path] = []
        groups: dict[tuple, list[tuple[int, Path, FrameInfo]]] = defaultdict(list)
        for path in sorted(paths):
            m = NUMBERED.match(path.name)
            try:
                mimetype = registry.mimetype_for(path)
            except UnknownFormat as err:
                if path.stat().st_size == 0:
                    continue  # an empty file just created: wait for its bytes
                self._problem(str(err))
                done.append(path)
                continue
            seq_mimetype = registry.sequence_mimetype(mimetype)
            if not (m and seq_mimetype):
                self._ensure_single(Single(path, mimetype, _stats(path)))
                done.append(path)
                continue
            cls = registry.adapters_by_mimetype()[seq_mimetype]
            try:
                info = cls.inspect(path)
            except IncompleteFile:
                continue  # still being written: retry on the next step
            except (ScatterbrokerError, OSError) as err:
                self._problem(str(err), scan=self._scan_for(path, m, seq_mimetype))
                done.append(path)
                continue
            key = (path.parent, m["prefix"], m["suffix"], seq_mimetype, _width(m["digits"]))
            padded = key[:4] + (len(m["digits"]),)
            if key[4] == 0 and padded in self._scans:
                key = padded  # 'scan_10000' continues 'scan_00001' ... 'scan_09999'
            groups[key].append((int(m["digits"]), path, info))
        for (parent, prefix, suffix, seq_mimetype, width), frames in groups.items():
            try:
                done += self._append(parent, prefix, suffix, seq_mimetype, width, frames)
            except ScatterbrokerError as err:
                self._problem(str(err))
                done += [p for _, p, _ in frames]
        return done

    def _parts(self, path: Path) -> list[str]:
        """Catalog container path for the directory holding ``path``."""
        return [*self.prefix, *path.parent.relative_to(self.directory).parts]

    def _container(self, parts: list[str]) -> Any:
        node = self.client
        for part in parts:
            check_key(part)
            node = node[part] if part in node else node.create_container(key=part)
        return node

    def _ensure_single(self, item: Single) -> None:
        node = self._container(self._parts(item.path))
        if item.key in node:
            return
        try:
            register_single(node, item.key, item, source_of(item))
        except ScatterbrokerError as err:
            self._problem(str(err))

    def _scan_for(self, path: Path, m, seq_mimetype: str) -> _Scan | None:
        return self._scans.get((path.parent, m["prefix"], m["suffix"], seq_mimetype, _width(m["digits"])))

    def _load_scan(self, parent: Path, prefix: str, suffix: str, seq_mimetype: str, width: int,
                   first: list[tuple[int, Path, FrameInfo]]) -> tuple[_Scan, list[Path]]:
        """Find the scan in the catalog, or create it from its first frames."""
        node_parent = self._container(self._parts(first[0][1]))
        key = check_key(prefix.rstrip("_-. ") or suffix.lstrip("."))
        created: list[Path] = []
        if key not in node_parent:
            item = Sequence(parent, prefix, width, suffix, tuple(n for n, _, _ in first), seq_mimetype,
                            (sum(p.stat().st_size for _, p, _ in first), max(p.stat().st_mtime_ns for _, p, _ in first)))
            for _bad, why in register_sequence(node_parent, key, item, source_of(item)):
                self._problem(why)
            created = [p for _, p, _ in first]
            self.stats.frames += len(first)
            self.stats.bytes += item.stats[0]
        scan_node = node_parent[key]
        frames = scan_node["frames"].include_data_sources()
        (ds,) = frames.item["attributes"]["data_sources"]
        params = ds["parameters"]
        template = Template(parent, params["prefix"], int(params["width"]), params["suffix"],
                            tuple((int(a), int(b)) for a, b in params["ranges"]))
        shape = tuple(ds["structure"]["shape"][1:])
        source = scan_node.metadata.get("source", {})
        headers = scan_node["headers"] if "headers" in scan_node else None
        scan = _Scan(
            node=scan_node,
            frames_path="/".join(frames.path_parts),
            data_source=ds,
            template=template,
            frame_shape=shape,
            dtype=frames.dtype.str,
            columns=list(headers.structure().columns) if headers is not None else [],
            bytes=int(source.get("bytes", 0)),
            mtime_ns=int(source.get("mtime_ns", 0)),
            parts=[*self._parts(first[0][1]), key],
        )
        self._scans[(parent, prefix, suffix, seq_mimetype, width)] = scan
        return scan, created

    def _append(self, parent: Path, prefix: str, suffix: str, seq_mimetype: str, width: int,
                frames: list[tuple[int, Path, FrameInfo]]) -> list[Path]:
        import numpy as np

        key = (parent, prefix, suffix, seq_mimetype, width)
        scan = self._scans.get(key)
        done: list[Path] = []
        if scan is None:
            scan, done = self._load_scan(parent, prefix, suffix, seq_mimetype, width, frames)
            frames = [f for f in frames if f[1] not in done]
        existing = set(scan.template.numbers().tolist())
        new: list[tuple[int, Path, FrameInfo]] = []
        problems: list[str] = []
        for number, path, info in frames:
            if number in existing or any(number == n for n, _, _ in new):
                if number not in existing:
                    problems.append(f"{path.name}: duplicate frame number {number}; kept the first")
                done.append(path)  # already registered (a restart, or a repeated event)
                continue
            if tuple(info.shape) != scan.frame_shape or np.dtype(info.dtype).str != scan.dtype:
                problems.append(
                    f"{path.name}: frame {tuple(info.shape)} {np.dtype(info.dtype)} differs from "
                    f"the scan's {scan.frame_shape} {np.dtype(scan.dtype)}; left out"
                )
                done.append(path)
                continue
            new.append((number, path, info))
        for why in problems:
            self._problem(why, scan=scan)
        if not new:
            return done
        old_numbers = sorted(existing)
        numbers = sorted(existing | {n for n, _, _ in new})
        at_end = not old_numbers or min(n for n, _, _ in new) > old_numbers[-1]
        template = Template(parent, scan.template.prefix, scan.template.width, scan.template.suffix,
                            ranges_of(numbers))
        structure = stack_structure(len(numbers), scan.frame_shape, np.dtype(scan.dtype))
        ds = dict(scan.data_source)
        ds["structure"] = {**ds["structure"], "shape": list(structure.shape),
                           "chunks": [list(c) for c in structure.chunks]}
        ds["parameters"] = template.parameters()
        params = {}
        if at_end:
            params = {"patch_shape": ",".join(map(str, (len(new), *scan.frame_shape))),
                      "patch_offset": ",".join(map(str, (len(old_numbers), *([0] * len(scan.frame_shape)))))}
        http = self.client.context.http_client
        # The directory asset is unchanged, so none is sent: Tiled only adds assets
        # on PUT, and its subscribers cannot parse an asset without a list index.
        response = http.put(f"{_api(self.client)}/data_source/{scan.frames_path}",
                            json={"data_source": {**ds, "assets": []}}, params=params)
        response.raise_for_status()
        scan.data_source, scan.template = ds, template
        # Per-frame header rows, with checksums.
        rows = []
        for number, path, info in new:
            row = {"frame": number, "file": path.name, **info.row, ALGORITHM: file_checksum(path)}
            rows.append({c: row.get(c) for c in scan.columns})
        if rows and scan.columns:
            import pyarrow as pa

            table = scan.node["headers"]
            schema = table.structure().arrow_schema_decoded
            table.append_partition(0, pa.Table.from_pylist(rows, schema=schema))
        size = sum(p.stat().st_size for _, p, _ in new)
        scan.bytes += size
        scan.mtime_ns = max([scan.mtime_ns, *(p.stat().st_mtime_ns for _, p, _ in new)])
        md = {
            "scan": {**scan.node.metadata.get("scan", {}), "frames": len(numbers),
                     "first_frame": numbers[0], "last_frame": numbers[-1]},
            "source": {"path": str(parent / f"{scan.template.prefix}*{scan.template.suffix}"),
                       "files": len(numbers), "bytes": scan.bytes, "mtime_ns": scan.mtime_ns},
        }
        scan.node.update_metadata(metadata=md, drop_revision=True)  # no revision per frame
        self.stats.frames += len(new)
        self.stats.bytes += size
        scan.changed = time.monotonic()
        return done + [p for _, p, _ in new]

    def _problem(self, message: str, scan: _Scan | None = None) -> None:
        self.stats.problems += 1
        self.stats.last_problem = message
        if scan is not None:
            problems = list(scan.node.metadata.get("problems", []))[-99:] + [message]
            scan.node.update_metadata(metadata={"problems": problems}, drop_revision=True)
        if self.on_problem:
            self.on_problem(message)


def _stats(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _width(digits: str) -> int:
    """Zero-padding width of a frame number as written ('00012' -> 5, '12' -> 0)."""
    return len(digits) if digits.startswith("0") and len(digits) > 1 else 0


def _api(client: Any) -> str:
    """The server's ``.../api/v1`` base URL, as the client knows it."""
    return str(client.context.api_uri).rstrip("/")
