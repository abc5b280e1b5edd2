"""Hostile TIFF and CBF files: decompression bombs, lying headers, crafted byte-offset streams.

Each file is made here, small: real TIFFs (a minimal writer below, so that a
header can lie about its strips) and real CBFs (fabio, or crafted bytes for
the hostile ones). The decoders are fed directly, then the same files are
served by a real server on loopback and read with httpx: every read answers
the right data or a clear 4xx naming the file (never its server path), and
the server keeps serving. Memory is measured with ``tracemalloc`` (numpy's
and zlib's buffers are traced; the server runs in this process), never time.

The chunk limit is lowered to 1 MiB here (``limits.MAX_CHUNK_BYTES`` is read
at each decode), so a bomb of 64 MiB stands for the issue's 1 GiB one and a
run with the fixes reverted allocates tens of MiB, not GiBs.
"""

from __future__ import annotations

import functools
import lzma
import struct
import tracemalloc
import zlib
from types import SimpleNamespace

import httpx
import numba
import numpy as np
import pytest
from conftest import API_KEY, make_frames, start_server, write_cbf
from fabio.compression import compByteOffset
from hypothesis import given, settings
from hypothesis import strategies as st

from scatterbroker.adapters import byte_offset
from scatterbroker import limits
from scatterbroker.adapters.cbf import CBFAdapter
from scatterbroker.adapters.minicbf import BINARY_START
from scatterbroker.adapters.tiff import TIFFAdapter
from scatterbroker.errors import RequestTooLarge, UnreadableFile

OCTET = {"Accept": "application/octet-stream"}
LIMIT = 1 << 20  # the chunk limit in these tests, bytes
BOMB = 64 << 20  # what a bomb inflates to, bytes: 64 x the limit
SMALL = 4 << 20  # most a bounded read may trace, bytes (a good 16 x 16 read traces ~0.1 MiB)


@pytest.fixture(autouse=True)
def _small_chunk_limit(monkeypatch):
    monkeypatch.setattr(limits, "MAX_CHUNK_BYTES", LIMIT)


# ------------------------------------------------------------------ crafting files


@functools.lru_cache(maxsize=None)
def zeros_zlib(n: int) -> bytes:
    """A zlib stream of ``n`` zero bytes, compressed in 1 MiB steps (never ``n`` in memory)."""
    c, step, parts = zlib.compressobj(9), bytes(1 << 20), []
    for start in range(0, n, len(step)):
        parts.append(c.compress(step[: min(len(step), n - start)]))
    return b"".join(parts) + c.flush()


@functools.lru_cache(maxsize=None)
def zeros_lzma(n: int) -> bytes:
    c, step, parts = lzma.LZMACompressor(), bytes(1 << 20), []
    for start in range(0, n, len(step)):
        parts.append(c.compress(step[: min(len(step), n - start)]))
    return b"".join(parts) + c.flush()


@functools.lru_cache(maxsize=None)
def zeros_packbits(n: int) -> bytes:
    """PackBits runs of 128 zeros (2 bytes each: 64 x), inflating to ``n // 4``: tifffile's
    fallback decodes into a list of 8-byte pointers, so even that is 2 x ``n`` of memory."""
    return b"\x81\x00" * (n // 512)


def tiff_bytes(width: int, length: int, segments: list[bytes], *, compression: int = 1,
               bits: int = 8, rows_per_strip: int | None = None,
               tile: tuple[int, int] | None = None) -> bytes:
    """A little-endian classic TIFF of one grey page whose strips (or tiles) are
    ``segments`` as given: its header may declare anything."""
    data_start = 8
    offsets, pos = [], data_start
    for seg in segments:
        offsets.append(pos)
        pos += len(seg)
    counts = [len(s) for s in segments]
    tags: list[tuple[int, int, list[int]]] = [  # (tag, type 3=SHORT 4=LONG, values)
        (256, 4, [width]), (257, 4, [length]), (258, 3, [bits]), (259, 3, [compression]),
        (262, 3, [1]), (277, 3, [1]), (339, 3, [1]),
    ]
    if tile:
        tags += [(322, 4, [tile[1]]), (323, 4, [tile[0]]), (324, 4, offsets), (325, 4, counts)]
    else:
        tags += [(273, 4, offsets), (278, 4, [rows_per_strip or length]), (279, 4, counts)]
    tags.sort()
    ifd_at = pos + (pos & 1)
    extra_at = ifd_at + 2 + 12 * len(tags) + 4
    entries, extra = [], b""
    for tag, kind, values in tags:
        fmt = "<H" if kind == 3 else "<I"
        packed = b"".join(struct.pack(fmt, v) for v in values)
        if len(packed) <= 4:
            field = packed.ljust(4, b"\0")
        else:
            field = struct.pack("<I", extra_at + len(extra))
            extra += packed
        entries.append(struct.pack("<HHI", tag, kind, len(values)) + field)
    body = b"".join(segments) + b"\0" * (ifd_at - pos)
    ifd = struct.pack("<H", len(tags)) + b"".join(entries) + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", ifd_at) + body + ifd + extra


def cbf_bytes(section: bytes, nx: int, ny: int, *, size: int | None = None,
              element: str = "signed 32-bit integer") -> bytes:
    """A miniCBF file whose binary header declares ``nx`` x ``ny`` pixels of ``element``
    in ``size`` (default: the true length) bytes of byte-offset data, followed by ``section``."""
    head = (
        "###CBF: VERSION 1.5\r\ndata_hostile\r\n\r\n_array_data.header_convention \"PILATUS_1.2\"\r\n"
        "_array_data.header_contents\r\n;\r\n# Detector: PILATUS 2M, 24-0111\r\n"
        "# Exposure_time 0.1 s\r\n;\r\n\r\n_array_data.data\r\n;\r\n"
        "--CIF-BINARY-FORMAT-SECTION--\r\n"
        "Content-Type: application/octet-stream;\r\n"
        "     conversions=\"x-CBF_BYTE_OFFSET\"\r\n"
        "Content-Transfer-Encoding: BINARY\r\n"
        f"X-Binary-Size: {len(section) if size is None else size}\r\n"
        "X-Binary-ID: 1\r\n"
        f"X-Binary-Element-Type: \"{element}\"\r\n"
        "X-Binary-Element-Byte-Order: LITTLE_ENDIAN\r\n"
        f"X-Binary-Number-of-Elements: {nx * ny}\r\n"
        f"X-Binary-Size-Fastest-Dimension: {nx}\r\n"
        f"X-Binary-Size-Second-Dimension: {ny}\r\n"
        "X-Binary-Size-Padding: 4095\r\n\r\n"
    ).encode("ascii")
    return head + BINARY_START + section + b"\0" * 4095 + b"\r\n--CIF-BINARY-FORMAT-SECTION----\r\n;\r\n"


def traced_peak(read) -> tuple[object, int]:
    """``read()``'s result (or the exception it raised) and the most bytes traced meanwhile."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            result = read()
        except Exception as err:  # noqa: BLE001 - returned for the caller to check
            result = err
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# 16 x 16 grey pages whose single strip inflates far beyond the 256 bytes declared
STRIP_BOMBS = {
    "zlib": (8, zeros_zlib),
    "deflate": (32946, zeros_zlib),
    "lzma": (34925, zeros_lzma),
    "packbits": (32773, zeros_packbits),
}


def most_traced(kind: str) -> int:
    """Most bytes one bounded read of a ``kind`` strip bomb may trace: SMALL, plus for
    LZMA the 8 MiB dictionary its stream declares (xz's default preset), which
    liblzma allocates whatever the output (bounded by the decoder's memlimit)."""
    return SMALL + (8 << 20 if kind == "lzma" else 0)


# (name, crafted bytes, expected status, words the detail must hold)
HOSTILE_CBF: list[tuple[str, bytes, int, str]] = [
    ("escape_at_end", cbf_bytes(b"\x01" * 15 + b"\x80", 4, 4), 422, "ends inside a pixel value"),
    ("escape16_at_end", cbf_bytes(b"\x01" * 15 + b"\x80\x00\x80\x00", 4, 4), 422,
     "ends inside a pixel value"),
    ("escape32_at_end", cbf_bytes(b"\x01" * 15 + b"\x80\x00\x80\x00\x00\x00\x80" + b"\0" * 3,
                                  4, 4), 422, "ends inside a pixel value"),
    ("too_many_pixels", cbf_bytes(b"\x01" * 40, 4, 4), 422, "holds more pixels"),
    ("too_few_pixels", cbf_bytes(b"\x80\x01\x00" * 10, 4, 4), 422, "decodes to 10 pixels"),
    ("size_cuts_escape", cbf_bytes(b"\x01" * 15 + b"\x80\x05\x00", 4, 4, size=17), 422,
     "ends inside a pixel value"),
    # 1024 x 1024 int32 (4 MiB) declared over 1 MiB of one-byte differences: 413 before decoding
    ("larger_than_limit", cbf_bytes(b"\x00" * (1 << 20), 1024, 1024), 413,
     "SCATTERBROKER_MAX_CHUNK_BYTES"),
    ("section_larger_than_limit", cbf_bytes(b"\x00" * (1 << 20) + b"\x01" * 16, 4, 4), 413,
     "SCATTERBROKER_MAX_CHUNK_BYTES"),
]
#: the crafted CBFs of 4 x 4 int32 frames that a client may be sent as stored
CRAFTED_FRAMES = [c for c in HOSTILE_CBF if c[2] == 422]


# ------------------------------------------------------------------ byte-offset, directly


@functools.lru_cache(maxsize=1)
def checked_kernel():
    """The decoder's kernel compiled with numba's bounds checks on: any read or write
    outside ``src`` or ``out`` raises IndexError instead of touching memory."""
    return numba.njit(boundscheck=True)(byte_offset._kernel().py_func)


ENDINGS = [b"\x80", b"\x80\x00", b"\x80\x00\x80", b"\x80\x00\x80\x00\x00",
           b"\x80\x00\x80\x00\x00\x00\x80", b"\x80\x00\x80\x00\x00\x00\x80\x00\x00\x00\x00\x00\x00"]


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("pixels", [0, 3, 4])
def test_an_escape_at_the_very_end_is_refused_without_reading_past_it(ending, pixels):
    section = b"\x01" * 3 + ending
    # Bounds-checked compilation of the same kernel: returns -1, never IndexError.
    assert checked_kernel()(np.frombuffer(section, np.int8), np.zeros(pixels, np.int64)) in (-1, -2)
    # The bytes after the section (here 0x7f) must not become a pixel.
    backing = bytearray(section + b"\x7f" * 16)
    with pytest.raises(byte_offset.CorruptSection) as err:
        byte_offset.decode(memoryview(backing)[:len(section)], (1, 4), np.int64, name="x.cbf")
    assert err.value.status_code == 422 and isinstance(err.value, UnreadableFile)
    assert str(err.value).startswith("x.cbf: corrupt CBF data")


@pytest.mark.parametrize("name, raw, status, words", HOSTILE_CBF, ids=[c[0] for c in HOSTILE_CBF])
def test_crafted_cbf_files_give_named_errors_from_the_adapter(tmp_path, name, raw, status, words):
    path = tmp_path / f"{name}.cbf"
    path.write_bytes(raw)
    adapter = CBFAdapter.from_uris(path.as_uri())
    with pytest.raises((UnreadableFile, RequestTooLarge)) as err:
        adapter.read()
    assert err.value.status_code == status
    assert f"{name}.cbf" in str(err.value) and words in str(err.value), str(err.value)
    assert str(tmp_path) not in str(err.value)


def test_a_frame_larger_than_the_limit_is_refused_before_it_is_allocated():
    section = b"\x00" * 16
    result, peak = traced_peak(lambda: byte_offset.decode(section, (1 << 14, 1 << 14), "int32",
                                                          name="huge.cbf"))
    assert isinstance(result, RequestTooLarge), result
    assert result.status_code == 413 and "huge.cbf" in str(result)
    assert f"{1 << 30} bytes" in str(result) and "SCATTERBROKER_MAX_CHUNK_BYTES" in str(result)
    assert peak < SMALL


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=64), st.integers(0, 48), st.sampled_from(["int32", "int64", "int16"]))
def test_fuzzed_sections_stay_in_bounds_and_decode_like_fabio_or_are_refused(data, pixels, dtype):
    # Streams rich in escapes: every 0x80 / 0x00 byte pair makes one more likely.
    section = data.replace(b"\x11", b"\x80").replace(b"\x22", b"\x80\x00\x80")
    got = checked_kernel()(np.frombuffer(section, np.int8), np.zeros(pixels, dtype))
    assert -2 <= got <= pixels
    try:
        decoded = byte_offset.decode(section, (pixels,), dtype, name="f.cbf")
    except byte_offset.CorruptSection:
        assert got != pixels
        return
    assert got == pixels
    from fabio.ext.byte_offset import dec_cbf

    # fabio decodes the same stream (complete here: no escape cut short) to the same values
    reference = np.asarray(dec_cbf(bytes(section), pixels))[:pixels].astype(dtype)
    assert np.array_equal(decoded, reference)


def test_good_frames_still_decode_like_fabio():
    frame = make_frames(1)[0]
    frame[0, :4] = [2**31 - 1, -(2**31), 40000, -129]
    assert np.array_equal(byte_offset.decode(compByteOffset(frame), frame.shape, "int32"), frame)


# ------------------------------------------------------------------ TIFF, directly


@pytest.mark.parametrize("kind", list(STRIP_BOMBS))
def test_a_strip_that_inflates_past_its_declared_size_stops_there(tmp_path, kind):
    compression, bomb = STRIP_BOMBS[kind]
    path = tmp_path / f"{kind}.tif"
    path.write_bytes(tiff_bytes(16, 16, [bomb(BOMB)], compression=compression))
    assert path.stat().st_size < BOMB // 50
    adapter = TIFFAdapter.from_uris(path.as_uri())
    result, peak = traced_peak(lambda: adapter.read((slice(0, 1), slice(0, 1))))
    assert isinstance(result, np.ndarray), result
    assert result.shape == (1, 1) and result[0, 0] == 0
    assert peak < most_traced(kind), f"{peak / 2**20:.1f} MiB traced for one pixel of a 256-byte page"


@pytest.mark.parametrize("kind", ["zlib", "lzma", "packbits"])
def test_a_page_that_decodes_to_more_than_the_limit_is_refused_before_decoding(tmp_path, kind):
    compression, bomb = STRIP_BOMBS[kind]
    side = 8192  # 64 MiB of uint8 declared, stored in one strip of ~64 KB
    path = tmp_path / f"{kind}_page.tif"
    path.write_bytes(tiff_bytes(side, side, [bomb(side * side)], compression=compression))
    adapter = TIFFAdapter.from_uris(path.as_uri())
    result, peak = traced_peak(lambda: adapter.read((slice(0, 1), slice(0, 1))))
    assert isinstance(result, RequestTooLarge), result
    message = str(result)
    assert f"{kind}_page.tif" in message and f"{side * side} bytes" in message
    assert "SCATTERBROKER_MAX_CHUNK_BYTES" in message and str(tmp_path) not in message
    assert peak < SMALL


def test_a_header_declaring_a_huge_image_in_a_tiny_file_allocates_nothing(tmp_path):
    path = tmp_path / "liar.tif"
    path.write_bytes(tiff_bytes(32768, 32768, [b"\0" * 256], rows_per_strip=32768))  # 1 GiB
    assert path.stat().st_size < 1024
    adapter = TIFFAdapter.from_uris(path.as_uri())
    assert adapter.structure().shape == (32768, 32768)
    result, peak = traced_peak(lambda: adapter.read((0, 0)))
    assert isinstance(result, RequestTooLarge) and f"{1 << 30} bytes" in str(result), result
    assert peak < SMALL


def test_a_tile_larger_than_its_image_is_refused(tmp_path):
    path = tmp_path / "big_tile.tif"
    path.write_bytes(tiff_bytes(16, 16, [zeros_zlib(256)], compression=8, tile=(2048, 2048)))
    adapter = TIFFAdapter.from_uris(path.as_uri())
    with pytest.raises(RequestTooLarge, match="strip or tile decodes to 4194304 bytes"):
        adapter.read()


def test_compressions_without_a_bounded_decoder_are_refused(tmp_path):
    path = tmp_path / "lzw.tif"
    path.write_bytes(tiff_bytes(16, 16, [b"\x80" * 64], compression=5))
    with pytest.raises(UnreadableFile, match="lzw.tif: TIFF compression LZW is not served"):
        TIFFAdapter.from_uris(path.as_uri()).read()


@pytest.mark.parametrize("compression", ["zlib", "lzma", "packbits", None])
def test_good_compressed_tiffs_read_as_written(tmp_path, compression):
    import tifffile

    image = make_frames(1, dtype="uint16")[0]
    path = tmp_path / "good.tif"
    if compression == "packbits":  # tifffile cannot write PackBits without imagecodecs
        rows = [bytes([63]) + image[y].tobytes() for y in range(image.shape[0])]  # 64-byte literals
        raw = tiff_bytes(image.shape[1], image.shape[0], [b"".join(rows)], compression=32773,
                         bits=16)
        path.write_bytes(raw)
    else:
        tifffile.imwrite(path, image, compression=compression, rowsperstrip=5)
    adapter = TIFFAdapter.from_uris(path.as_uri())
    assert np.array_equal(adapter.read(), image)
    assert np.array_equal(adapter.read((slice(2, 9), 7)), image[2:9, 7])


def test_a_stack_is_read_one_page_at_a_time(tmp_path):
    import tifffile

    pages = np.arange(64 * 256 * 256, dtype="uint8").reshape(64, 256, 256)  # 64 pages of 64 KiB
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, pages, compression="zlib")
    adapter = TIFFAdapter.from_uris(path.as_uri())
    result, peak = traced_peak(lambda: adapter.read((slice(None), 3, 5)))
    assert np.array_equal(result, pages[:, 3, 5])
    assert peak < 1 << 20, f"{peak / 2**20:.1f} MiB traced for 64 pixels (the stack is 4 MiB)"


# ------------------------------------------------------------------ through a real server


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "cbf").mkdir()
    (root / "tiff").mkdir()
    for name, raw, _status, _words in HOSTILE_CBF:
        (root / "cbf" / f"{name}.cbf").write_bytes(raw)
    frame = make_frames(1)[0]
    write_cbf(root / "cbf" / "good.cbf", frame)
    # a series of 4 x 4 frames: the first good, the others crafted
    (root / "cbf" / "seq_00001.cbf").write_bytes(cbf_bytes(compByteOffset(frame[:4, :4]), 4, 4))
    for i, (_name, raw, _status, _words) in enumerate(CRAFTED_FRAMES, start=2):
        (root / "cbf" / f"seq_{i:05d}.cbf").write_bytes(raw)
    for kind, (compression, bomb) in STRIP_BOMBS.items():
        (root / "tiff" / f"{kind}.tif").write_bytes(
            tiff_bytes(16, 16, [bomb(BOMB)], compression=compression))
    (root / "tiff" / "page.tif").write_bytes(
        tiff_bytes(8192, 8192, [zeros_zlib(8192 * 8192)], compression=8))
    (root / "tiff" / "liar.tif").write_bytes(tiff_bytes(32768, 32768, [b"\0" * 256]))
    return SimpleNamespace(root=root, frame=frame)


@pytest.fixture(scope="module")
def server(hostile, tmp_path_factory):
    from tiled.client import from_uri

    from scatterbroker.catalog.register import register

    dirs = [hostile.root / "cbf", hostile.root / "tiff"]
    with start_server(tmp_path_factory.mktemp("db"), dirs) as url:
        client = from_uri(url, api_key=API_KEY)
        reports = {d.name: register(client, d, prefix=d.name) for d in dirs}
        with httpx.Client(base_url=f"{url}/api/v1", timeout=60,
                          headers={"Authorization": f"Apikey {API_KEY}"}) as http:
            yield SimpleNamespace(url=url, http=http, reports=reports)


def still_serving(server, hostile) -> None:
    r = server.http.get("/array/full/cbf/good", params={"slice": "5,0:9"}, headers=OCTET)
    assert r.status_code == 200, r.text
    assert np.array_equal(np.frombuffer(r.content, "<i4"), hostile.frame[5, 0:9])


def test_every_hostile_file_registers(server):
    assert not server.reports["cbf"].failed and not server.reports["tiff"].failed
    assert len(server.reports["cbf"].created) == len(HOSTILE_CBF) + 2  # + good, seq


@pytest.mark.parametrize("name, raw, status, words", HOSTILE_CBF, ids=[c[0] for c in HOSTILE_CBF])
@pytest.mark.parametrize("route", ["full", "block", "fast"])
def test_served_crafted_cbf_gives_a_clear_4xx(server, hostile, name, raw, status, words, route):
    if route == "full":
        r = server.http.get(f"/array/full/cbf/{name}", params={"slice": "0,0"}, headers=OCTET)
    elif route == "block":
        r = server.http.get(f"/array/block/cbf/{name}", params={"block": "0,0"}, headers=OCTET)
    else:  # the fast route, decoding on the server (codec none)
        r = server.http.get(f"/sb/frames/cbf/{name}", params={"slice": "0,0", "codec": "none"})
    assert r.status_code == status, (r.status_code, r.text[:300])
    detail = r.json()["detail"]
    assert f"{name}.cbf" in detail and words in detail, detail
    assert str(hostile.root) not in detail
    still_serving(server, hostile)


@pytest.mark.parametrize("kind", list(STRIP_BOMBS))
def test_served_strip_bombs_read_their_declared_pixels_only(server, hostile, kind):
    def read():
        return server.http.get(f"/array/full/tiff/{kind}", params={"slice": "0:1,0:1"},
                               headers=OCTET)

    r, peak = traced_peak(read)
    assert r.status_code == 200, r.text
    assert np.frombuffer(r.content, "u1").tolist() == [0]
    assert peak < most_traced(kind), f"{peak / 2**20:.1f} MiB traced for one pixel of a 256-byte page"
    still_serving(server, hostile)


@pytest.mark.parametrize("node, size", [("page", 8192 * 8192), ("liar", 32768 * 32768)])
def test_served_tiff_pages_larger_than_the_limit_give_413(server, hostile, node, size):
    def read():
        return server.http.get(f"/array/full/tiff/{node}", params={"slice": "0,0"},
                               headers=OCTET)

    r, peak = traced_peak(read)
    assert r.status_code == 413, r.text
    detail = r.json()["detail"]
    assert f"{node}.tif" in detail and f"{size} bytes" in detail, detail
    assert "SCATTERBROKER_MAX_CHUNK_BYTES" in detail and str(hostile.root) not in detail
    assert peak < SMALL
    still_serving(server, hostile)


@pytest.mark.parametrize("position", range(1, len(CRAFTED_FRAMES) + 1))
@pytest.mark.parametrize("codec", ["cbf", "none"])
def test_crafted_frames_of_a_series_are_refused_by_server_and_client(server, hostile, position,
                                                                    codec):
    """A series whose frame 0 is good and every other frame crafted. codec=none: the
    server decodes and answers 422 naming the frame file; codec=cbf: the server sends
    the section as stored, and the client's decoder (the same kernel) refuses it."""
    from scatterbroker import _wire
    from scatterbroker.clients.fast_array import decode_body

    name, _raw, _status, words = CRAFTED_FRAMES[position - 1]
    r = server.http.get("/sb/frames/cbf/seq/frames", params={"slice": f"{position}:{position + 1}",
                                                              "codec": codec})
    if codec == "none":
        assert r.status_code == 422, r.text[:300]
        detail = r.json()["detail"]
        assert f"seq_{position + 1:05d}.cbf" in detail and words in detail, detail
        assert str(hostile.root) not in detail
    else:
        assert r.status_code == 200 and r.headers[_wire.H_CODEC] == "cbf", r.text[:300]
        out = np.empty((1, 4, 4), "int32")
        with pytest.raises(ValueError, match=words):
            decode_body("cbf", r.content, dict(r.headers), out, one_item=False)
    r = server.http.get("/sb/frames/cbf/seq/frames", params={"slice": "0:1", "codec": codec})
    assert r.status_code == 200, r.text[:300]
    still_serving(server, hostile)
