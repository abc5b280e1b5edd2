"""What a write at one node changes, as the read caches ask it (scatterbroker.server.write_log.WriteLog)."""

from __future__ import annotations

import time
from collections import OrderedDict
from types import SimpleNamespace

import pytest

from scatterbroker.server.write_log import WriteLog, forget_expired, write_kind


def test_each_reach_sees_the_writes_its_reads_show():
    log = WriteLog()
    start = log.tick
    log.mark("raw/p1/s1/scan/frames")  # a frame appended to a live scan
    seen = {node: [log.changed_since(node, start, reach=r) for r in ("node", "children", "subtree")]
            for node in ("", "raw/p1/s1", "raw/p1/s1/scan", "raw/p1/s1/scan/frames", "raw/p2")}
    assert seen == {
        "": [False, False, True],  # the root's listing shows raw, not what is under it
        "raw/p1/s1": [False, False, True],
        "raw/p1/s1/scan": [False, True, True],  # its listing shows the frames' shape
        "raw/p1/s1/scan/frames": [True, True, True],
        "raw/p2": [False, False, False],
    }
    assert not log.changed_since("raw/p1/s1/scan/frames", log.tick, reach="node")


def test_a_write_at_an_ancestor_and_of_unknown_node_changes_everything_below():
    log = WriteLog()
    start = log.tick
    log.mark("raw/p1")  # its metadata or access changed
    assert log.changed_since("raw/p1/s1/scan", start, reach="node")
    assert not log.changed_since("raw/p2", start, reach="subtree")
    start = log.tick
    log.mark(None)  # /jobs, /auth, ...
    assert log.changed_since("raw/p2", start, reach="node")


def test_a_deleted_node_changes_its_parent_and_its_grandparents_listing():
    log = WriteLog()
    start = log.tick
    log.mark("a/b/c", removed=True)
    assert log.changed_since("a/b", start, reach="node")  # its count of children
    assert log.changed_since("a", start, reach="children")  # b's count in a's listing
    assert not log.changed_since("", start, reach="children")
    kept = WriteLog()
    kept.mark("a/b/c")
    assert not kept.changed_since("a/b", 0, reach="node")


def test_an_unknown_reach_is_refused():
    with pytest.raises(ValueError, match="reach"):
        WriteLog().changed_since("", 0, reach="below")


def test_a_write_changes_what_its_kind_says():
    log = WriteLog()
    start = log.tick
    log.mark("live/scan/headers", kind="data")  # a table row appended
    assert not log.changed_since("live/scan/headers", start, reach="entry")  # same catalog row
    assert log.changed_since("live/scan/headers", start, reach="node")  # new answers
    log.mark("live/scan", kind="node")  # its metadata
    assert log.changed_since("live/scan", start, reach="entry")
    assert not log.changed_since("live/scan/frames", start, reach="node")  # nothing below it
    log.mark("scans/p1/s1/scan", kind="tree")  # another file behind a registered NeXus node
    assert log.changed_since("scans/p1/s1/scan/entry/data", start, reach="entry")
    with pytest.raises(ValueError, match="kind"):
        log.mark("x", kind="everything")


@pytest.mark.parametrize("method, route, node, cascading, kind", [
    ("PATCH", "table/partition", "live/scan/headers", (), "data"),
    ("PUT", "array/full", "a/frames", ("*",), "data"),
    ("PATCH", "array/full", "a/frames", (), "node"),  # extended: a new shape
    ("POST", "register", "raw/p1", (), "node"),  # a child created
    ("PATCH", "metadata", "raw/p1/s1", (), "node"),
    ("PATCH", "metadata", "raw/p1/s1", ("jobs",), "node"),
    ("PATCH", "metadata", "jobs/42", ("jobs",), "tree"),  # access by job.proposal
    ("PUT", "metadata", "raw/p1/s1", ("*",), "tree"),  # another access policy
    ("PUT", "data_source", "scans/p1/s1/scan", (), "tree"),
    ("DELETE", "metadata", "raw/p1/s1", (), "tree"),
])
def test_write_kinds_by_route(method, route, node, cascading, kind):
    assert write_kind(method, route, node, cascading) == kind


def test_the_proposal_policy_cascades_metadata_writes_only_under_jobs(tmp_path):
    from conftest import API_KEY

    from scatterbroker.server.app import build_app, cascading_metadata, local_config

    assert cascading_metadata(build_app(local_config(tmp_path / "a", [], api_key=API_KEY))) == ()
    facility = local_config(tmp_path / "b", [], api_key=API_KEY)
    facility["access_control"] = {"access_policy": "scatterbroker.server.access:ProposalAccessPolicy", "args": {}}
    assert cascading_metadata(build_app(facility)) == ("jobs",)


def test_what_was_not_used_within_the_ttl_is_forgotten():
    now = time.monotonic()
    kept = OrderedDict((key, SimpleNamespace(born=now - age)) for key, age in
                       [("a", 30), ("b", 20), ("c", 1), ("d", 40)])  # d: old, but used last
    forget_expired(kept, 10, kept.pop)
    assert list(kept) == ["c", "d"]  # d goes when its key is asked for again (stale)
    forget_expired(kept, 0.5, kept.pop)
    assert list(kept) == []
    forget_expired(kept, 10, kept.pop)  # empty: nothing to do
