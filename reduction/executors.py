"""Where tasks run: one executor abstraction for the job runner and the stacker.

Three executors share one interface (:class:`Executor`):

* :class:`InProcessExecutor` -- the tasks in this process, one after the other.
* :class:`LocalExecutor` -- a pool of local processes with one start method,
  chosen by the caller for a stated reason (below).
* :class:`DaskExecutor` -- a ``dask.distributed`` cluster (a scheduler address,
  e.g. from ``SCATTERBROKER_DASK_ADDRESS``, or a ``Client``).

Each offers ``map(fn, items)`` (results in order: the job runner's partial
grids) and ``as_completed(fn, tasks, in_flight)`` (``fn(*task)`` as each
finishes, at most ``in_flight`` submitted and unfinished, which bounds memory:
the stacker's compressed chunks). A pool or a Dask client lives for one
``with executor:`` block, or for one call made outside such a block.

Which start method each use gets, and why
-----------------------------------------
Stacking (:func:`scatterbroker.reduction.stack.stack_files`): ``start="auto"``:
``fork`` while this process runs one Python thread -- a forked worker starts
at once with numpy, h5py and the adapters already imported, and
``benchmarks/stacking.py`` times the stack including the pool's start (the
first round of a run pays it; docs/performance.md) -- and ``forkserver`` once
other threads run (a server, a GUI, the watcher's stacking thread): forking a
threaded process can deadlock the child on a lock another thread held; the
fork server is a fresh one-thread process that has imported the stacker's
modules once (``preload``). ``SCATTERBROKER_MP_START`` overrides the choice.

Jobs (:mod:`scatterbroker.server.jobs`, an explicit ``LocalExecutor``):
``start="spawn"``: jobs run inside the threaded server, whose numba kernels
may already have started native thread pools (OpenMP/TBB, which
``threading.active_count()`` does not see, so "fork while one thread" cannot
tell), after which a forked child can hang or abort. A spawned worker pays
~2 s of imports, which is why a job runs in-process by default
(:class:`InProcessExecutor`; docs/performance.md, "No worker processes").
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

__all__ = [
    "DASK_ADDRESS_ENV", "DaskExecutor", "Executor", "InProcessExecutor", "LocalExecutor",
    "START_METHODS", "dask_address", "pool_for",
]

#: Dask scheduler address; when set, jobs and stacking run their tasks on that cluster.
DASK_ADDRESS_ENV = "SCATTERBROKER_DASK_ADDRESS"
#: multiprocessing start method for ``start="auto"`` pools ("fork", "forkserver",
#: "spawn"); unset: fork while one thread runs, else forkserver (module docstring).
MP_START = os.environ.get("SCATTERBROKER_MP_START") or None
#: what ``LocalExecutor(start=...)`` accepts
START_METHODS = ("auto", "fork", "forkserver", "spawn")


def dask_address() -> str | None:
    """``SCATTERBROKER_DASK_ADDRESS``, read at each call (a test or an operator may set it late)."""
    return os.environ.get(DASK_ADDRESS_ENV) or None


class Executor:
    """What the job runner and the stacker need from wherever their tasks run.

    Subclasses implement :meth:`_open`, :meth:`_close` and :meth:`_submit`
    (returning a :class:`concurrent.futures.Future`); ``map`` and
    ``as_completed`` are built on them unless a subclass has a better way.
    """

    #: True: tasks run in the caller's process and thread (nothing is pickled)
    in_process: bool = False
    #: how many tasks run at once
    slots: int = 1
    #: one line for reports ("serial", "2 processes", "dask tcp://...")
    description: str = ""

    _depth = 0

    # lifetime: the pool or client lives for one `with` block
    def __enter__(self) -> Executor:
        if self._depth == 0:
            self._open()
        self._depth += 1
        return self

    def __exit__(self, kind: Any, error: Any, tb: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._close(failed=kind is not None)

    def _open(self) -> None:
        pass

    def _close(self, failed: bool) -> None:
        pass

    def _submit(self, fn: Callable, *args: Any) -> Future:
        raise NotImplementedError

    def map(self, fn: Callable, items: Sequence) -> list:
        """``[fn(item) for item in items]``, computed by this executor, in order."""
        with self:
            futures = [self._submit(fn, item) for item in items]
            return [f.result() for f in futures]

    def as_completed(self, fn: Callable, tasks: Iterable[tuple], in_flight: int) -> Iterator:
        """Yield ``fn(*task)`` for each task as it finishes, with at most ``in_flight``
        tasks submitted and not yet yielded; the rest are cancelled if the caller stops."""
        with self:
            todo = iter(tasks)
            pending: set[Future] = set()
            try:
                while True:
                    while len(pending) < in_flight and (task := next(todo, None)) is not None:
                        pending.add(self._submit(fn, *task))
                    if not pending:
                        return
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            finally:
                for future in pending:
                    future.cancel()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r})"


class InProcessExecutor(Executor):
    """Tasks in this process, one after the other (the job runner's default).

    Operations that parallelise themselves run whole here instead of being
    split: the transform kernel is numba-parallel over every core and releases
    the GIL, so a pool of processes would only add their start-up (imports and
    loading the compiled kernels, ~2 s each) and one grid per process.
    """

    in_process = True
    description = "serial"

    def _submit(self, fn: Callable, *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as err:
            future.set_exception(err)
        return future

    def map(self, fn: Callable, items: Sequence) -> list:
        return [fn(item) for item in items]

    def as_completed(self, fn: Callable, tasks: Iterable[tuple], in_flight: int = 1) -> Iterator:
        for task in tasks:
            yield fn(*task)


class LocalExecutor(Executor):
    """Tasks on a pool of ``workers`` local processes started with ``start``.

    ``start``: ``"spawn"`` (the job runner: safe whatever threads the process
    runs), ``"auto"`` (the stacker: fork while one Python thread runs, else
    forkserver; ``SCATTERBROKER_MP_START`` overrides), or a method by name; see
    the module docstring for the measurements and reasons. ``preload``:
    modules a fork server imports once for all its workers. With one worker,
    or one task, ``map`` runs in this process (no pool to start).
    """

    def __init__(self, workers: int | None = None, *, start: str = "spawn",
                 preload: Sequence[str] = ()) -> None:
        if start not in START_METHODS:
            raise ValueError(f"start={start!r}: one of {', '.join(START_METHODS)}")
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self.start, self.preload = start, tuple(preload)
        self.slots = self.workers
        self.description = f"{self.workers} processes"
        self._pool: Any = None

    def context(self) -> Any:
        """The multiprocessing context of this pool's start method."""
        import multiprocessing

        method = self.start
        if method == "auto":
            method = MP_START
            if method is None and "fork" in multiprocessing.get_all_start_methods():
                threaded = threading.active_count() > 1
                forkserver = "forkserver" in multiprocessing.get_all_start_methods()
                method = "forkserver" if threaded and forkserver else "fork"
        context = multiprocessing.get_context(method)
        if method == "forkserver" and self.preload:
            # Workers fork from a server that has imported these once.
            context.set_forkserver_preload(list(self.preload))
        return context

    def _open(self) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(self.workers, mp_context=self.context())

    def _close(self, failed: bool) -> None:
        pool, self._pool = self._pool, None
        if failed:
            pool.shutdown(wait=True, cancel_futures=True)
        else:
            pool.shutdown(wait=True)

    def _submit(self, fn: Callable, *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def map(self, fn: Callable, items: Sequence) -> list:
        if len(items) <= 1 or self.workers <= 1:
            return [fn(item) for item in items]
        with self:
            return list(self._pool.map(fn, items))


class DaskExecutor(Executor):
    """Tasks on a ``dask.distributed`` cluster (a scheduler address or a Client).

    Given an address, a client connects for each ``with`` block (or call) and
    is closed after it; a given Client is used as it is and left open.
    ``slots`` is the cluster's thread count (``workers`` if it reports none).
    """

    def __init__(self, address_or_client: Any, workers: int = 1) -> None:
        from distributed import Client

        if isinstance(address_or_client, Client):
            self.client, self._own = address_or_client, False
            address = address_or_client.scheduler.address
        else:
            self.client, self._own = None, True
            address = str(address_or_client)
        self.address, self.workers = address, workers
        self.slots = workers
        self.description = f"dask {address}"
        self._executor: Any = None

    def _open(self) -> None:
        if self._own:
            from distributed import Client

            self.client = Client(self.address)
        self.slots = sum(self.client.nthreads().values()) or self.workers
        self._executor = self.client.get_executor(pure=False)

    def _close(self, failed: bool) -> None:
        self._executor = None
        if self._own and self.client is not None:
            client, self.client = self.client, None
            client.close()

    def _submit(self, fn: Callable, *args: Any) -> Future:
        return self._executor.submit(fn, *args)

    def map(self, fn: Callable, items: Sequence) -> list:
        with self:
            return self.client.gather(self.client.map(fn, list(items), pure=False))


def pool_for(workers: int, n_tasks: int, *, start: str, preload: Sequence[str] = ()) -> Executor:
    """The stacker's choice: Dask when ``SCATTERBROKER_DASK_ADDRESS`` is set, else
    this process for one worker or one task, else ``workers`` local processes."""
    address = dask_address()
    if address:
        return DaskExecutor(address, workers=workers)
    if workers <= 1 or n_tasks <= 1:
        return InProcessExecutor()
    return LocalExecutor(workers, start=start, preload=preload)
