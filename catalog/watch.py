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
missing, so a restart neither duplicates nor misses a frame. What a watcher
killed mid-scan can leave behind is repaired then: header rows missing for
frames already in ``frames`` are added, a scan node left half-made (no
``source`` record) is rebuilt from the files.

Bad input never stops the flow: a frame that stays truncated for
``incomplete_after`` seconds, a corrupt frame, one of another shape or dtype,
a frame number spelled twice (``scan_2`` beside ``scan_00002``) or written
again, and a failed stack (a full disk) are each one line in the scan node's
``metadata["problems"]`` (held until the scan exists, recorded once).

Sidecar files (:mod:`scatterbroker.catalog.sidecar`) are not frames: when one
is written, the scans it applies to have their sidecar metadata harvested
again in place; frames, header rows and checksums are not touched, and the
``source`` record keeps the sidecars' fingerprint exactly as ``register``
would write it, so a later ``register`` run finds those scans unchanged.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..adapters import registry
from ..adapters.sequence import FrameInfo, Template, ranges_of, stack_structure
from ..errors import IncompleteFile, ScatterbrokerError, UnknownFormat
from .checksum import ALGORITHM, file_checksum
from .names import check_key
from .register import refresh_sidecars, register_sequence, register_single, same_frames, source_of
from .sidecar import applies_to, is_sidecar
from .sidecar import fingerprint as sidecar_fingerprint
from .walk import NUMBERED, Sequence, Single, misnumbered, walk


@dataclass
class Stats:
    """Running totals, for the live status line."""

    frames: int = 0
    bytes: int = 0
    problems: int = 0
    backlog: int = 0
    started: float = field(default_factory=time.monotonic)
    last_problem: str = ""
    #: why the server cannot be reached right now ("" when it can)
    server_down: str = ""

    def line(self) -> str:
        dt = max(time.monotonic() - self.started, 1e-9)
        return (
            f"{self.frames} frames  {self.frames / dt:.1f} frames/s  "
            f"{self.bytes / dt / 1e6:.1f} MB/s  backlog {self.backlog}  "
            f"problems {self.problems}"
            + (f"  SERVER UNREACHABLE ({self.server_down}); retrying" if self.server_down else "")
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
    parts: list[str] = field(default_factory=list)  # catalog path of the scan node
    key: str = ""  # the scan node's key
    mimetype: str = ""  # of the sequence adapter
    sidecars: dict = field(default_factory=dict)  # fingerprint of the sidecars last harvested
    changed: float = field(default_factory=time.monotonic)
    stacked: int = 0  # frames in the last stacked file
    #: frame number -> (size, mtime_ns) of every file named like the scan's frames
    #: (good or left out), as last seen: the ``source`` record, and rewrites are noticed
    files: dict[int, tuple[int, int]] = field(default_factory=dict)


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
    incomplete_after
        Seconds a frame file may stay empty or shorter than its header says
        without growing before it is reported as truncated and left out (it
        joins its scan if it is completed later).
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
        incomplete_after: float = 30.0,
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
        self._scans: dict[tuple, _Scan] = {}  # (directory, prefix, suffix, mimetype) -> scan
        #: problems of frames whose scan is not in the catalog yet, by (directory, prefix, suffix)
        self._held: dict[tuple, list[str]] = defaultdict(list)
        self.incomplete_after = incomplete_after
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
        """Process events until ``stop`` is set.

        While the server cannot be reached (restarting, network down, answering
        5xx) the watcher keeps collecting events and retries with backoff up to
        ``MAX_BACKOFF`` seconds; files not yet appended stay pending, and scans
        are re-read from the catalog when it is back (it is the source of truth).
        """
        self.start()
        last = 0.0
        backoff = interval
        try:
            while not stop.is_set():
                try:
                    self.step()
                except Exception as err:
                    if not _server_outage(err):
                        raise
                    self._server_unreachable(err)
                    backoff = min(MAX_BACKOFF, max(2 * backoff, 0.2))
                else:
                    self.stats.server_down, backoff = "", interval
                if status and time.monotonic() - last > 1.0:
                    status(self.stats)
                    last = time.monotonic()
                stop.wait(backoff)
        finally:
            self.stop()

    def _server_unreachable(self, err: BaseException) -> None:
        # What was half-done when the server went away is not known here:
        # forget the scans, and load them again from the catalog next time.
        self._scans.clear()
        self.stats.server_down = _describe(err)

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
                    for path, _why in item.rejected:  # reported by _append, on the scan
                        self.notice(path, closed=True)
            for path, why in listing.unknown:
                self._problem(f"{why}")

    def step(self) -> int:
        """Take the files that are complete and append them; return how many."""
        now = time.monotonic()
        ready: list[Path] = []
        stale: set[Path] = set()
        seen: dict[Path, _Pending] = {}
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
                    seen[path] = p
                    if now - p.seen >= self.incomplete_after:
                        stale.add(path)
            self.stats.backlog = len(self._pending)
        taken = self._take(ready, stale)
        with self._lock:
            for path in taken:
                # Written again while it was being taken: keep the new event.
                if self._pending.get(path) is seen.get(path):
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

    def _take(self, paths: list[Path], stale: frozenset[Path] | set[Path] = frozenset()) -> list[Path]:
        """Group ready files by scan and append each group; return the paths done.

        ``stale``: files whose size has not changed for ``incomplete_after``
        seconds; one of them still empty or shorter than its header says is
        truncated, reported and left out instead of waited for.
        """
        done: list[Path] = []
        groups: dict[tuple, list[_Frame]] = defaultdict(list)
        for path in sorted(paths):
            if is_sidecar(path):
                self._sidecar_changed(path)
                done.append(path)
                continue
            m = NUMBERED.match(path.name)
            try:
                mimetype = registry.mimetype_for(path)
            except (UnknownFormat, OSError) as err:
                try:
                    empty = path.stat().st_size == 0
                except OSError:  # gone again
                    done.append(path)
                    continue
                if empty and path not in stale:
                    continue  # an empty file just created: wait for its bytes
                self._frame_problem(f"{err}; left out", path, m)
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
            except IncompleteFile as err:
                if path in stale:  # not grown for incomplete_after seconds: truncated
                    self._frame_problem(
                        f"{err}; left out (unchanged for {self.incomplete_after:g} s; "
                        "it joins the scan if it is completed later)", path, m)
                    done.append(path)
                continue  # still being written: retry on the next step
            except (ScatterbrokerError, OSError) as err:
                self._frame_problem(f"{err}; left out", path, m)
                done.append(path)
                continue
            family = (path.parent, m["prefix"], m["suffix"], seq_mimetype)
            groups[family].append(_Frame(int(m["digits"]), m["digits"], path, info))
        for family, frames in groups.items():
            try:
                done += self._append(family, frames)
            except ScatterbrokerError as err:
                self._problem(str(err))
                done += [f.path for f in frames]
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

    def _frame_problem(self, message: str, path: Path, m: re.Match | None) -> None:
        """Report a bad frame on its scan's node; held until the scan exists if need be."""
        if m is None:
            self._problem(message)
            return
        where = (path.parent, m["prefix"], m["suffix"])
        scan = next((s for family, s in self._scans.items() if family[:3] == where), None)
        if scan is None:
            self._held[where].append(message)
        self._problem(message, scan=scan)

    def _load_scan(self, family: tuple, frames: list[_Frame]) -> tuple[_Scan, list[Path]]:
        """Find the scan in the catalog, or create it from its first frames.

        A scan node left half-made (no ``source`` record, or no ``frames`` or
        ``headers``: a watcher or ``register`` killed while creating it) is
        rebuilt from the files. An existing scan is checked against the files
        (:meth:`_check_scan`) before frames are appended to it.
        """
        parent, prefix, suffix, seq_mimetype = family
        node_parent = self._container(self._parts(frames[0].path))
        key = check_key(prefix.rstrip("_-. ") or suffix.lstrip("."))
        created: list[Path] = []
        first_stats: dict[int, tuple[int, int]] = {}
        notes: list[str] = []
        if key in node_parent and not _whole(node_parent[key]):
            node_parent[key].delete(recursive=True, external_only=False)
            notes.append(f"{key}: its registration had stopped half-way (a watcher or register "
                         "killed while creating it); rebuilt from the files")
        if key not in node_parent:
            widths = Counter(_width(f.digits) for f in frames)
            width = max(widths, key=lambda w: (widths[w], w))
            first = [f for f in frames if f.digits == f"{f.number:0{width}d}"]
            first_stats = {f.number: _stats(f.path) for f in first}  # as harvested, not later
            item = Sequence(parent, prefix, width, suffix, tuple(first_stats), seq_mimetype,
                            (sum(s for s, _ in first_stats.values()),
                             max(m for _, m in first_stats.values())))
            for _bad, why in register_sequence(node_parent, key, item, source_of(item)):
                self._problem(why)  # already in the new node's metadata["problems"]
            created = [f.path for f in first]
            self.stats.frames += len(first)
            self.stats.bytes += item.stats[0]
        scan_node = node_parent[key]
        frames_node = scan_node["frames"].include_data_sources()
        (ds,) = frames_node.item["attributes"]["data_sources"]
        params = ds["parameters"]
        template = Template(parent, params["prefix"], int(params["width"]), params["suffix"],
                            tuple((int(a), int(b)) for a, b in params["ranges"]))
        source = scan_node.metadata.get("source", {})
        headers = scan_node["headers"] if "headers" in scan_node else None
        scan = _Scan(
            node=scan_node,
            frames_path="/".join(frames_node.path_parts),
            data_source=ds,
            template=template,
            frame_shape=tuple(ds["structure"]["shape"][1:]),
            dtype=frames_node.dtype.str,
            columns=list(headers.structure().columns) if headers is not None else [],
            parts=[*self._parts(frames[0].path), key],
            key=key,
            mimetype=seq_mimetype,
            sidecars=dict(source.get("sidecars", {})),
        )
        if created:
            scan.files = first_stats
        self._scans[family] = scan
        for message in notes:
            self._problem(message, scan=scan)
        for message in self._held.pop(family[:3], []):
            self._problem(message, scan=scan, count=False)
        if not created:
            self._check_scan(scan)
        return scan, created

    def _check_scan(self, scan: _Scan) -> None:
        """Make an existing scan node agree with its files before appending to it.

        A watcher killed between extending ``frames`` and appending the
        frames' ``headers`` rows (or updating the metadata) left rows or counts
        missing: the rows are added (and reported), the counts rewritten.
        Sidecars edited while no watcher ran are harvested again.
        """
        numbers = scan.template.numbers().tolist()
        if "headers" in scan.node and scan.columns:
            table = scan.node["headers"].read()
            have = set(int(n) for n in table["frame"]) if "frame" in table.columns else set()
            missing = [n for n in numbers if n not in have]
            if missing:
                self._append_rows(scan, [(n, scan.template.directory / scan.template.name(n)) for n in missing])
                self._problem(
                    f"headers: no row for frame{'s' * (len(missing) > 1)} {_few(missing)} (a watcher "
                    "stopped between adding frames and their rows); rows added", scan=scan)
        scan.files = self._files_on_disk(scan)
        md = scan.node.metadata
        if not same_frames(md.get("source"), self._source(scan)) \
                or md.get("scan", {}).get("frames") != len(numbers):
            self._write_counts(scan, numbers)
        self._refresh_sidecars(scan)

    def _files_on_disk(self, scan: _Scan) -> dict[int, tuple[int, int]]:
        """Stats of the files ``walk`` would put in this scan (its name pattern, its format)."""
        t = scan.template
        out: dict[int, tuple[int, int]] = {}
        for entry in os.scandir(t.directory):
            m = NUMBERED.match(entry.name)
            if not m or (m["prefix"], m["suffix"]) != (t.prefix, t.suffix) \
                    or m["digits"] != f"{int(m['digits']):0{t.width}d}":
                continue
            with contextlib.suppress(OSError, ScatterbrokerError):
                if registry.sequence_mimetype(registry.mimetype_for(entry.path)) == scan.mimetype:
                    st = entry.stat()
                    out[int(m["digits"])] = (st.st_size, st.st_mtime_ns)
        return out

    def _sidecar_changed(self, path: Path) -> None:
        """A sidecar file was written: harvest it again for the scans it applies to."""
        for scan in list(self._scans.values()):
            if scan.template.directory == path.parent and applies_to(path, scan.key):
                self._refresh_sidecars(scan)

    def _refresh_sidecars(self, scan: _Scan) -> None:
        """Harvest the scan's sidecars again if they changed; frames are not touched."""
        directory = scan.template.directory
        now = sidecar_fingerprint(directory, scan.key)
        if now == scan.sidecars:
            return
        item = Sequence(directory, scan.template.prefix, scan.template.width, scan.template.suffix,
                        tuple(scan.template.numbers().tolist()), scan.mimetype, (0, 0))
        scan.sidecars = now
        try:
            problems = refresh_sidecars(scan.node, item, self._source(scan))
        except (ScatterbrokerError, OSError) as err:
            self._problem(f"{scan.key}: sidecar metadata not refreshed ({err})", scan=scan)
            return
        for why in problems:
            self._problem(why)  # already on the node

    def _source(self, scan: _Scan) -> dict[str, Any]:
        """The scan's ``metadata["source"]``, as :func:`source_of` makes it from the files."""
        t = scan.template
        stats = scan.files.values()
        source: dict[str, Any] = {"path": str(t.directory / f"{t.prefix}*{t.suffix}"),
                                  "files": len(scan.files), "bytes": sum(s for s, _ in stats),
                                  "mtime_ns": max((m for _, m in stats), default=0)}
        if scan.sidecars:
            source["sidecars"] = scan.sidecars
        return source

    def _write_counts(self, scan: _Scan, numbers: list[int], end_angle: float | None = None) -> None:
        block = {**scan.node.metadata.get("scan", {}), "frames": len(numbers)}
        if numbers:
            block.update(first_frame=numbers[0], last_frame=numbers[-1])
        if end_angle is not None and len(numbers) > 1:
            block.update({"end_angle": end_angle, "end_angle@units": "deg"})
        scan.node.update_metadata(metadata={"scan": block, "source": self._source(scan)},
                                  drop_revision=True)  # no revision per frame

    def _append(self, family: tuple, frames: list[_Frame]) -> list[Path]:
        import numpy as np

        parent, prefix, suffix, _ = family
        scan = self._scans.get(family)
        done: list[Path] = []
        if scan is None:
            scan, done = self._load_scan(family, frames)
            frames = [f for f in frames if f.path not in done]
        existing = set(scan.template.numbers().tolist())
        width = scan.template.width
        new: list[_Frame] = []
        problems: list[str] = []
        for f in frames:
            done.append(f.path)
            if f.digits != f"{f.number:0{width}d}":  # another spelling of a frame number
                taken = existing | {g.number for g in new}
                problems.append(misnumbered(f.path.name, f.number, taken, prefix, width, suffix))
                continue
            now, before = _stats(f.path), scan.files.get(f.number)
            scan.files[f.number] = now
            if f.number in existing:  # a repeated event, a restart, or the frame written again
                if before is not None and now != before:
                    problems.append(
                        f"{f.path.name}: frame {f.number} was written again after it was registered; "
                        "the catalog keeps the first version's checksum (verify reports the change)")
                continue
            if tuple(f.info.shape) != scan.frame_shape or np.dtype(f.info.dtype).str != scan.dtype:
                problems.append(
                    f"{f.path.name}: frame {tuple(f.info.shape)} {np.dtype(f.info.dtype)} differs from "
                    f"the scan's {scan.frame_shape} {np.dtype(scan.dtype)}; left out"
                )
                continue
            new.append(f)
        for why in problems:
            self._problem(why, scan=scan)
        if not new:
            return done
        old_numbers = sorted(existing)
        numbers = sorted(existing | {f.number for f in new})
        at_end = not old_numbers or min(f.number for f in new) > old_numbers[-1]
        template = Template(parent, scan.template.prefix, width, scan.template.suffix, ranges_of(numbers))
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
        # A watcher killed here leaves frames without header rows: _check_scan adds them.
        self._append_rows(scan, [(f.number, f.path) for f in new], {f.number: f.info for f in new})
        size = sum(scan.files[f.number][0] for f in new)
        last = new[-1].info.row.get("start_angle") if at_end else None
        self._write_counts(scan, numbers, last if isinstance(last, (int, float)) else None)
        self.stats.frames += len(new)
        self.stats.bytes += size
        scan.changed = time.monotonic()
        return done

    def _append_rows(self, scan: _Scan, frames: list[tuple[int, Path]],
                     infos: dict[int, FrameInfo] | None = None) -> None:
        """Append one ``headers`` row per frame (header values and checksum)."""
        if not scan.columns or not frames:
            return
        import pyarrow as pa

        cls = registry.adapters_by_mimetype()[scan.mimetype]
        rows = []
        for number, path in frames:
            row: dict[str, Any] = {"frame": number, "file": path.name}
            try:
                info = (infos or {}).get(number) or cls.inspect(path)
                row.update(info.row)
                row[ALGORITHM] = file_checksum(path)
            except (ScatterbrokerError, OSError):
                pass  # the row says which frame; reading it will say what is wrong
            rows.append({c: row.get(c) for c in scan.columns})
        table = scan.node["headers"]
        schema = table.structure().arrow_schema_decoded
        table.append_partition(0, pa.Table.from_pylist(rows, schema=schema))

    def _problem(self, message: str, scan: _Scan | None = None, count: bool = True) -> None:
        """Count and announce a problem; with ``scan``, also record it in the scan
        node's ``metadata["problems"]`` (the last 100, each message once)."""
        if count:
            self.stats.problems += 1
            self.stats.last_problem = message
        if scan is not None:
            problems = list(scan.node.metadata.get("problems", []))
            if message not in problems:
                problems = problems[-99:] + [message]
                scan.node.update_metadata(metadata={"problems": problems}, drop_revision=True)
        if self.on_problem and count:
            self.on_problem(message)


@dataclass(frozen=True)
class _Frame:
    """A complete frame file ready to join its scan."""

    number: int
    digits: str  # the number as written in the name
    path: Path
    info: FrameInfo


#: longest wait between retries while the server is unreachable, seconds
MAX_BACKOFF = 5.0


def _server_outage(err: BaseException) -> bool:
    """The server is down, restarting or overloaded (worth retrying), not refusing."""
    import httpx

    if isinstance(err, httpx.TransportError):
        return True
    return isinstance(err, httpx.HTTPStatusError) and (
        err.response.status_code >= 500 or err.response.status_code == 429)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:200]


def _whole(node: Any) -> bool:
    """Whether a scan node was completely made (its ``source`` is written last)."""
    return isinstance(node.metadata.get("source"), dict) and "frames" in node and "headers" in node


def _few(numbers: list[int], n: int = 10) -> str:
    text = ", ".join(map(str, numbers[:n]))
    return text + (f" and {len(numbers) - n} more" if len(numbers) > n else "")


def _stats(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _width(digits: str) -> int:
    """Zero-padding width of a frame number as written ('00012' -> 5, '12' -> 0)."""
    return len(digits) if digits.startswith("0") and len(digits) > 1 else 0


def _api(client: Any) -> str:
    """The server's ``.../api/v1`` base URL, as the client knows it."""
    return str(client.context.api_uri).rstrip("/")
