"""The same catalog nodes through the clients scientists already use (real server).

``tiled.client.from_uri`` on any node's global URI, databroker 2.x (a Tiled
client, through a Tiled profile) and intake 2 (intake's own Tiled reader and
our ``ScatterbrokerNeXus`` reader, registered by entry point).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import API_KEY, N_FRAMES, write_tree
from test_wrappers import quick_server

NODES = [
    ("scans/s1/scan1", "container", ["NXroot"]),
    ("scans/s1/scan1/entry", "container", ["NXentry"]),
    ("scans/s1/scan1/entry/data", "container", ["NXdata"]),
    ("scans/s1/scan1/entry/instrument/detector", "container", ["NXdetector"]),
    ("scans/s1/scan1/entry/data/data", "array", ["sb-array"]),
    ("scans/s1/scan1/entry/sample/temperature", "array", ["sb-array"]),
    ("wrappers/s1/scan1/entry/data/data", "array", ["sb-array"]),
    ("raw/p1/s1/scan1", "container", ["scan"]),
    ("raw/p1/s1/scan1/frames", "array", None),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(URL, client, arrays): raw/, scans/ and wrappers/ registered, plus one uploaded wrapper."""
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register
    from scatterbroker.clients.nexus import wrap
    from scatterbroker.clients.upload import upload

    root = tmp_path_factory.mktemp("clients")
    arrays = write_tree(root / "beamline")
    dirs = [root / "beamline" / name for name in ("raw", "scans", "wrappers")]
    with quick_server(root / "server", dirs) as url:
        client = from_uri(url, api_key=API_KEY)
        for d in dirs:
            register(client, d, prefix=d.name)
        wrap(f"{url}/api/v1/metadata/scans/s1/scan1", root / "w.nxs", api_key=API_KEY)
        upload(root / "w.nxs", f"{url}/api/v1/metadata/users/ana/w1", api_key=API_KEY)
        yield url, client, arrays


def uri(url: str, path: str) -> str:
    return f"{url}/api/v1/metadata/{path}"


@pytest.mark.parametrize("path, family, specs", NODES)
def test_from_uri_on_every_node_uri_returns_nexus_aware_structures(served, path, family, specs):
    from tiled.client import from_uri

    from scatterbroker.catalog.uris import global_uri

    url, client, arrays = served
    assert global_uri(client[path]) == uri(url, path)
    node = from_uri(uri(url, path), api_key=API_KEY)
    assert "/".join(node.path_parts) == path
    assert getattr(node.structure_family, "value", node.structure_family) == family
    if specs is not None:
        assert [s.name for s in node.specs] == specs
    if path.endswith("entry/data"):
        assert node.metadata["signal"] == "data" and node.metadata["axes"][0] == "rotation_angle"
    if path.endswith("/data/data") or path.endswith("frames"):
        assert np.array_equal(node[N_FRAMES - 1, 2:5], arrays["cbf"][N_FRAMES - 1, 2:5])
    if path.endswith("temperature"):
        assert node.shape == () and node.read() == 250.0 and node.metadata["units"] == "K"


def test_from_uri_on_an_uploaded_wrapper_shows_groups_and_links(served):
    from tiled.client import from_uri

    url, _, _ = served
    node = from_uri(uri(url, "users/ana/w1"), api_key=API_KEY)
    assert [s.name for s in node["entry"].specs] == ["NXentry"]
    link = from_uri(uri(url, "users/ana/w1/entry/data/data"), api_key=API_KEY)
    assert [s.name for s in link.specs] == ["sb-link"]
    target = from_uri(link.metadata["link"]["uri"], api_key=API_KEY)  # follow the link by hand
    assert target.shape == (N_FRAMES, 24, 32)


@pytest.fixture
def profile(served, tmp_path, monkeypatch):
    """A Tiled profile naming the server, as a facility would ship it for databroker users."""
    import tiled.profiles

    url, _, _ = served
    (tmp_path / "scatterbroker.yml").write_text(f"sbtest:\n  uri: {url}\n")
    monkeypatch.setattr(tiled.profiles, "paths", [tmp_path])
    monkeypatch.setenv("TILED_API_KEY", API_KEY)  # profiles hold no keys: Tiled reads this
    tiled.profiles.load_profiles.cache_clear()
    yield "sbtest"
    tiled.profiles.load_profiles.cache_clear()


def test_databroker_opens_the_same_nodes(served, profile):
    databroker = pytest.importorskip("databroker", reason="databroker 2.x not installed (dev extra)")
    url, _, arrays = served
    catalog = databroker.catalog[profile]  # databroker 2.x: a Tiled client from the profile
    scan = catalog["scans/s1/scan1"]
    assert [s.name for s in scan["entry"].specs] == ["NXentry"]
    assert [s.name for s in scan["entry/data"].specs] == ["NXdata"]
    assert np.array_equal(scan["entry/data/data"][4], arrays["cbf"][4])
    assert np.array_equal(catalog["raw/p1/s1/scan1/frames"][2:4, 5, 7], arrays["cbf"][2:4, 5, 7])
    assert catalog["raw/p1/s1/scan1/headers"].read()["start_angle"].iloc[0] == pytest.approx(10.1)
    from tiled.queries import Key

    assert "scan1" in catalog["scans/s1"].search(Key("sample.temperature") > 200)


def test_intake_reader_opens_a_node_by_uri(served):
    intake = pytest.importorskip("intake", reason="intake 2 not installed (dev extra)")
    from nexusformat.nexus import NXroot

    from scatterbroker.clients.intake_reader import ScatterbrokerNeXus, ScatterbrokerNode, open_node
    from scatterbroker.clients.nexus import RemoteField

    url, _, arrays = served
    node = uri(url, "scans/s1/scan1")
    # Our reader is registered by intake's start-up imports (entry point "intake.imports").
    readers = intake.readers.readers.recommend(ScatterbrokerNode(url=node))["importable"]
    assert ScatterbrokerNeXus in readers
    assert intake.readers.TiledClient in readers
    root = open_node(node, api_key=API_KEY, local=False).read()
    assert isinstance(root, NXroot) and root.entry.data.nxclass == "NXdata"
    assert isinstance(root.entry.data.data, RemoteField)
    assert np.array_equal(root.entry.data.data[6].nxdata, arrays["cbf"][6])
    # intake's own Tiled reader on the same node gives the Tiled client (NeXus specs).
    data = ScatterbrokerNode(url=uri(url, "scans/s1/scan1/entry/data/data"), options={"api_key": API_KEY})
    client = data.to_reader("TiledClient").read()
    assert np.array_equal(client[6], arrays["cbf"][6])
    assert np.array_equal(data.to_reader("TiledClient").read(as_client=False), arrays["cbf"])


def test_intake_catalog_of_uris_round_trips_without_the_key(served, tmp_path, monkeypatch):
    intake = pytest.importorskip("intake", reason="intake 2 not installed (dev extra)")
    from scatterbroker.clients.intake_reader import open_node

    url, _, arrays = served
    catalog = intake.entry.Catalog()
    catalog["scan1"] = open_node(uri(url, "scans/s1/scan1"), local=False)
    catalog["custom"] = open_node(uri(url, "users/ana/w1"), local=False)
    catalog.to_yaml_file(str(tmp_path / "beamtime.yaml"))
    assert API_KEY not in (tmp_path / "beamtime.yaml").read_text()
    monkeypatch.setenv("SCATTERBROKER_API_KEY", API_KEY)
    again = intake.from_yaml_file(str(tmp_path / "beamtime.yaml"))
    for name in ("scan1", "custom"):
        root = again[name].read()
        assert np.array_equal(root.entry.data.data[1].nxdata, arrays["cbf"][1]), name


def test_intake_reader_choice_is_the_same_in_every_run():
    """``to_reader("TiledClient")`` named intake's reader only by chance: intake takes the
    argument as an output type and falls back to the first reader it knows, whose order
    follows plug-in import order. Fresh interpreters with different hash seeds must agree."""
    import subprocess
    import sys

    pytest.importorskip("intake", reason="intake 2 not installed (dev extra)")
    code = ("from scatterbroker.clients.intake_reader import ScatterbrokerNode; "
            "n = ScatterbrokerNode(url='http://127.0.0.1:9/api/v1/metadata/x'); "
            "print(n.to_reader_cls('TiledClient').__name__, n.to_reader_cls().__name__)")
    seen = set()
    for seed in ("0", "1", "2", "3"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONHASHSEED": seed}, check=True)
        seen.add(done.stdout.split("\n")[-2] if done.stdout.endswith("\n") else done.stdout)
    assert seen == {"TiledClient ScatterbrokerNeXus"}, seen
