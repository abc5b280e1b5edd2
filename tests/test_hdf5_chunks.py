"""The server's own HDF5 chunk decoding (adapters/hdf5_chunks, scatterbroker.bitshuffle)
against h5py's filter pipeline on good files, and against crafted chunks.

h5py (with hdf5plugin's filters) is the independent reference for good data;
for crafted data the contract is a named error and no byte from outside the chunk.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from scatterbroker import bitshuffle, limits
from scatterbroker.adapters.nexus import NexusAdapter
from scatterbroker.errors import RequestTooLarge, UnreadableFile
from scatterbroker.adapters.hdf5_chunks import UnsupportedFilter

FILTERS = {
    "bslz4": dict(hdf5plugin.Bitshuffle(cname="lz4")),
    "gzip": {"compression": "gzip"},
    "shuffle-gzip-fletcher": {"compression": "gzip", "shuffle": True, "fletcher32": True},
    "zstd": dict(hdf5plugin.Zstd()),
    "lz4": dict(hdf5plugin.LZ4(nbytes=1000)),  # several LZ4 blocks per chunk
}
SELECTIONS = [(), np.s_[3], np.s_[-1, 2:7], np.s_[1:10:4, ::3, 5], np.s_[..., 2],
              np.s_[4:6, 1:2, 0:17:5], np.s_[::-2, 3]]


def field(path: Path, name: str = "data"):
    return NexusAdapter.from_uris(path.as_uri(), dataset=name)  # root: the file's directory


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    root = tmp_path_factory.mktemp("chunks")
    rng = np.random.default_rng(3)
    data = rng.poisson(4, size=(11, 13, 17)).astype("<u4")
    data[2, 5, 7] = 2**31  # a wide value somewhere
    out = {}
    for name, kw in FILTERS.items():
        with h5py.File(root / f"{name}.h5", "w") as f:
            f.create_dataset("data", data=data, chunks=(2, 5, 17), **kw)
            f.create_dataset("f8", data=data.astype(">f8"), chunks=(3, 13, 4), **kw)
            # only the first chunk written: the rest must read as the fill value
            d = f.create_dataset("sparse", shape=(8, 6), dtype="i2", chunks=(4, 3), fillvalue=-7, **kw)
            d[0:4, 0:3] = np.arange(12, dtype="i2").reshape(4, 3)
        out[name] = (root / f"{name}.h5", data)
    return out


@pytest.mark.parametrize("name", FILTERS)
def test_decoded_like_h5py(files, name: str) -> None:
    path, _ = files[name]
    with h5py.File(path, "r") as f:
        for dset in ("data", "f8", "sparse"):
            node = field(path, dset)
            for sel in SELECTIONS[: 2 if dset == "sparse" else None]:
                want = f[dset][()][sel] if sel != () else f[dset][()]
                got = node.read(sel) if sel != () else node.read()
                assert got.dtype == want.dtype and got.shape == want.shape, (dset, sel)
                np.testing.assert_array_equal(got, want, err_msg=f"{name} {dset} {sel}")


def _bslz4_file(path: Path, frame: np.ndarray) -> bytes:
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=frame[None], chunks=(1, *frame.shape), **FILTERS["bslz4"])
    with h5py.File(path, "r") as f:
        return bytes(f["data"].id.read_direct_chunk((0, 0, 0))[1])


def _rewrite_chunk(path: Path, chunk: bytes) -> None:
    with h5py.File(path, "r+") as f:
        f["data"].id.write_direct_chunk((0, 0, 0), chunk)


def _overreading_chunk(n_items: int, claimed_extra: int) -> bytes:
    """One Bitshuffle-LZ4 block whose LZ4 literal run claims the whole block while the
    chunk holds only 16 literal bytes; its header claims the bytes it would consume."""
    want = n_items * 4
    ext, rest = divmod(want - 15, 255)
    lz4 = bytes([0xF0]) + b"\xff" * ext + bytes([rest]) + b"A" * 16
    return struct.pack(">QI", want, want) + struct.pack(">I", len(lz4) + claimed_extra) + lz4


def test_bitshuffle_refuses_a_block_that_claims_bytes_beyond_the_chunk(tmp_path) -> None:
    chunk = _overreading_chunk(2048, claimed_extra=2048 * 4 - 16)
    out = np.zeros(2048, dtype="<u4")
    with pytest.raises(bitshuffle.BadChunk, match="larger than the rest of the chunk"):
        bitshuffle.decode_into(chunk, out, 4)
    # the declared size honest, the LZ4 stream still claiming a longer literal run
    honest = _overreading_chunk(2048, claimed_extra=0)
    with pytest.raises(bitshuffle.BadChunk, match="does not decode to exactly one block"):
        bitshuffle.decode_into(honest, out, 4)


@pytest.mark.parametrize("cut", [0, 5, 11, 12, 15, 16, 40, -3, -1])
def test_bitshuffle_truncated_chunks_are_named_errors(tmp_path, cut: int) -> None:
    frame = np.random.default_rng(0).poisson(3, size=(40, 51)).astype("<u4")
    good = _bslz4_file(tmp_path / "t.h5", frame)
    out = np.empty_like(frame)
    bitshuffle.decode_into(good, out, 4)
    np.testing.assert_array_equal(out, frame)
    with pytest.raises(bitshuffle.BadChunk):
        bitshuffle.decode_into(good[:cut], out, 4)


def test_bitshuffle_random_corruption_never_escapes_the_chunk(tmp_path) -> None:
    """Flip bytes anywhere in a real chunk: each decode either fails with BadChunk or gives
    bytes that can only come from the chunk (every output byte is 0..255 of *this* data: we
    check instead that a marker placed right after the chunk in memory never appears)."""
    frame = np.random.default_rng(1).poisson(2, size=(64, 64)).astype("<u4")
    good = _bslz4_file(tmp_path / "r.h5", frame)
    marker = b"SB-MARKER-" * 400
    rng = np.random.default_rng(2)
    for _ in range(300):
        buf = bytearray(good + marker)  # the marker sits just past the chunk's end
        for pos in rng.integers(12, len(good), size=rng.integers(1, 4)):
            buf[pos] = int(rng.integers(0, 256))
        chunk = np.frombuffer(bytes(buf), dtype=np.uint8)[: len(good)]  # a view: marker follows
        out = np.zeros_like(frame)
        try:
            bitshuffle.decode_into(chunk, out, 4)
        except bitshuffle.BadChunk:
            pass
        assert b"SB-MARKER" not in out.tobytes()


def test_served_field_refuses_a_crafted_bitshuffle_chunk(tmp_path) -> None:
    frame = np.arange(2048, dtype="<u4").reshape(32, 64)
    path = tmp_path / "evil.h5"
    _bslz4_file(path, frame)
    _rewrite_chunk(path, _overreading_chunk(2048, claimed_extra=2048 * 4 - 16))
    node = field(path)
    with pytest.raises(UnreadableFile, match="Bitshuffle-LZ4") as err:
        node.read(np.s_[0, 0:1, 0:1])
    assert err.value.status_code == 422


def test_gzip_chunk_that_inflates_past_its_shape_is_refused(tmp_path) -> None:
    path = tmp_path / "bomb.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", shape=(1, 64, 64), dtype="u1", chunks=(1, 64, 64), compression="gzip")
    bomb = zlib.compress(b"\0" * (64 * 2**20), 9)  # 64 MiB of zeros in a ~64 KB chunk
    _rewrite_chunk(path, bomb)
    with pytest.raises(UnreadableFile, match="more than its declared 4096 bytes"):
        field(path).read(np.s_[0, 0, 0])


def test_a_chunk_declaring_more_than_the_limit_is_refused_before_decoding(tmp_path, monkeypatch) -> None:
    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", shape=(1, 256, 256), dtype="<u4", chunks=(1, 256, 256), compression="gzip")
    monkeypatch.setattr(limits, "MAX_CHUNK_BYTES", 2**16)  # one chunk is 256 KiB
    with pytest.raises(RequestTooLarge, match="SCATTERBROKER_MAX_CHUNK_BYTES") as err:
        field(path).read(np.s_[0, 0, 0])
    assert err.value.status_code == 413


def test_a_read_touching_too_many_chunks_is_refused(tmp_path) -> None:
    path = tmp_path / "sparse.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", shape=(2**40,), dtype="u1", chunks=(1,))
    node = field(path)
    with pytest.raises(RequestTooLarge, match="SCATTERBROKER_MAX_CHUNKS_PER_READ"):
        node.read(np.s_[::65536])
    assert node.read(np.s_[5:9]).tolist() == [0, 0, 0, 0]  # small reads still answer


def test_unsupported_filters_are_named(tmp_path) -> None:
    path = tmp_path / "blosc.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.arange(100, dtype="u2").reshape(10, 10), chunks=(5, 10),
                         **hdf5plugin.Blosc())
    with pytest.raises(UnsupportedFilter, match="Blosc") as err:
        field(path).read()
    assert err.value.status_code == 415


def test_too_many_variable_length_strings_are_not_decoded_when_the_node_is_built(tmp_path, monkeypatch) -> None:
    path = tmp_path / "strings.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", shape=(5000,), dtype=h5py.string_dtype())
        f.create_dataset("ok", data=["a", "bcd"], dtype=h5py.string_dtype())
    monkeypatch.setattr(limits, "MAX_VLEN_STRINGS", 1000)
    node = field(path)
    assert "SCATTERBROKER_MAX_VLEN_STRINGS" in node.metadata()["error"]
    assert field(path, "ok").read().tolist() == ["a", "bcd"]


def test_plain_reads_in_pieces_equal_one_read(tmp_path, monkeypatch) -> None:
    path = tmp_path / "plain.h5"
    data = np.arange(40 * 30 * 20, dtype="<i4").reshape(40, 30, 20)
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data)
    monkeypatch.setattr(limits, "HDF5_READ_PIECE_BYTES", 3 * 30 * 20 * 4)  # 3 frames a piece
    node = field(path)
    for sel in [np.s_[:], np.s_[1:38:3, 5], np.s_[::-1, 2:4, ::7]]:
        np.testing.assert_array_equal(node.read(sel), data[sel])


def test_groups_linked_more_than_once_are_not_inlined(tmp_path) -> None:
    from scatterbroker import limits as _limits

    path = tmp_path / "loops.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("g")
        for i in range(30):
            g[f"a{i}"] = g  # 30 hard links of a group to itself
        f.create_group("plain").create_dataset("x", data=[1, 2])
        f.create_group("wide")
        for i in range(_limits.MAX_INLINED_MEMBERS + 1):
            f["wide"].create_group(f"m{i}")
    root = NexusAdapter.from_uris(path.as_uri())
    assert not root["g"].inlined_contents_enabled(1)
    assert not root["g"]["a3"].inlined_contents_enabled(2)
    assert not root["wide"].inlined_contents_enabled(1)
    assert root["plain"].inlined_contents_enabled(1)
    assert len(root["g"]["a0"]["a1"]) == 30  # still listed and walked on request


def test_an_object_with_too_many_attributes_is_served_without_them(tmp_path, monkeypatch) -> None:
    path = tmp_path / "attrs.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("data", data=[1, 2, 3])
        for i in range(50):
            d.attrs[f"a{i}"] = i
    monkeypatch.setattr(limits, "MAX_ATTRIBUTES", 20)
    node = field(path)
    assert "SCATTERBROKER_MAX_ATTRIBUTES" in node.metadata()["error"]
    assert node.read().tolist() == [1, 2, 3]


def test_fast_route_leaves_oversized_bitshuffle_chunks_to_the_adapter(tmp_path, monkeypatch) -> None:
    """The fast route decodes Bitshuffle-LZ4 chunks itself; a chunk over the limit must
    reach the adapter's 413, not be decoded there."""
    import httpx
    from tiled.client import from_uri

    from conftest import API_KEY, start_server
    from scatterbroker.catalog.register import register

    root = tmp_path / "data"
    root.mkdir()
    _bslz4_file(root / "big.h5", np.zeros((64, 64), dtype="<u4"))  # one 16 KiB chunk
    monkeypatch.setattr(limits, "MAX_CHUNK_BYTES", 2**12)
    with start_server(tmp_path / "catalog", [root]) as url:
        register(from_uri(url, api_key=API_KEY), root, prefix="d")
        with httpx.Client(base_url=url, headers={"Authorization": f"Apikey {API_KEY}"}) as http:
            for path in ["/api/v1/sb/frames/d/big/data", "/api/v1/array/full/d/big/data"]:
                r = http.get(path, params={"slice": "0,0:2,0:2"})
                assert r.status_code == 413, (path, r.status_code, r.text[:300])
                assert "SCATTERBROKER_MAX_CHUNK_BYTES" in r.text
