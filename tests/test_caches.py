"""scatterbroker.caches.LRU: the one bounded cache (count or size bound, file-stamp freshness)."""

from __future__ import annotations

import threading

import numpy as np

from scatterbroker.caches import LRU


def test_count_bound_evicts_least_recently_used_and_hands_it_back():
    cache: LRU[str] = LRU(2)
    assert cache.put("a", "A") == [] and cache.put("b", "B") == []
    assert cache.get("a") == "A"          # a is now the most recent
    assert cache.put("c", "C") == ["B"]   # b goes, and is handed back (to be closed)
    assert "b" not in cache and len(cache) == 2
    assert cache.put("a", "A2") == ["A"]  # a replaced value is handed back too


def test_size_bound_counts_bytes_and_refuses_what_cannot_fit():
    cache: LRU[np.ndarray] = LRU(3000, sizeof=lambda a: a.nbytes)
    frames = [np.zeros(100, dtype="f8") for _ in range(4)]  # 800 bytes each
    for i, f in enumerate(frames):
        cache.put(i, f)
    assert cache.size == 2400 and 0 not in cache and 3 in cache
    assert cache.put("big", np.zeros(1000, dtype="f8")) == [] and "big" not in cache
    assert LRU(0, sizeof=len).put("x", b"1") == []  # 0 bytes: keeps nothing


def test_a_stamp_that_changed_drops_the_entry():
    cache: LRU[str] = LRU(4)
    cache.put("f.h5", "handle", stamp=(1, 2, 3, 4))
    assert cache.get("f.h5", stamp=(1, 2, 3, 4)) == "handle"
    assert cache.get("f.h5", stamp=(1, 2, 3, 5)) is None   # file rewritten: stale
    assert cache.get("f.h5", stamp=(1, 2, 3, 4)) is None   # and gone, not kept for later
    assert cache.stats == {"hit": 1, "miss": 2}


def test_many_threads_keep_the_bound():
    cache: LRU[int] = LRU(50)

    def work(seed: int) -> None:
        for i in range(2000):
            cache.put((seed, i % 80), i)
            cache.get((seed, (i * 7) % 80))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 50
