"""One executor abstraction for jobs and stacking (reduction/executors.py): same
results everywhere, bounded in flight, and the start method each use gets."""

from __future__ import annotations

import threading

import pytest

from scatterbroker.reduction import executors as E
from scatterbroker.server import jobs


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def test_jobs_use_the_shared_executors():
    assert jobs.LocalExecutor is E.LocalExecutor and jobs.InProcessExecutor is E.InProcessExecutor
    assert jobs.LocalExecutor().start == "spawn"
    assert isinstance(jobs.default_executor(), E.InProcessExecutor)


@pytest.mark.parametrize("executor", [E.InProcessExecutor(), E.LocalExecutor(2, start="spawn"),
                                      E.LocalExecutor(2, start="auto")], ids=repr)
def test_same_results(executor):
    assert executor.map(square, list(range(7))) == [x * x for x in range(7)]
    tasks = [(i, 10 * i) for i in range(9)]
    assert sorted(executor.as_completed(add, tasks, 2)) == [11 * i for i in range(9)]


def test_in_flight_is_bounded():
    submitted = []
    ex = E.LocalExecutor(2, start="auto")
    real = ex._submit
    ex._submit = lambda fn, *a: (submitted.append(a), real(fn, *a))[1]
    seen = 0
    for _ in ex.as_completed(add, [(i, i) for i in range(20)], 3):
        seen += 1
        assert len(submitted) - seen <= 3  # at most 3 submitted and not yet yielded
    assert seen == 20


def test_auto_forks_only_while_one_thread_runs(monkeypatch):
    monkeypatch.setattr(E, "MP_START", None)
    ex = E.LocalExecutor(2, start="auto")
    if threading.active_count() == 1:
        assert ex.context().get_start_method() == "fork"
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert ex.context().get_start_method() == "forkserver"
    finally:
        stop.set()
        t.join()
    monkeypatch.setattr(E, "MP_START", "spawn")
    assert ex.context().get_start_method() == "spawn"
    assert E.LocalExecutor(2).context().get_start_method() == "spawn"  # the jobs' choice: never overridden


def test_the_stacker_picks(monkeypatch):
    monkeypatch.delenv(E.DASK_ADDRESS_ENV, raising=False)
    assert E.pool_for(1, 10, start="auto").description == "serial"
    assert E.pool_for(4, 1, start="auto").description == "serial"
    assert E.pool_for(2, 10, start="auto").description == "2 processes"
    with pytest.raises(ValueError, match="start="):
        E.LocalExecutor(2, start="threads")
