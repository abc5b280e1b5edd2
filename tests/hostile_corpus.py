"""Crafted ("hostile") files for issue #18: what an attacker with write access to one
proposal's data directory can plant, and what a read of each must give.

Not a test module: ``tests/test_hostile_files.py`` and ``benchmarks/hostile.py``
use it. Every generator writes one small file (KBs to a few MB, well under a
second) into the directory it is given and returns a :class:`Case`: the file,
the node path of the dataset inside it (relative to the file's node) and the
reads to make, each with what it must answer -- an HTTP status (a clear 4xx)
or the right array, or either of the two where both are acceptable (a
decompression bomb of zeros may be refused with 413 or answered with zeros,
as long as the server's memory stays bounded).

The Bitshuffle-LZ4 HDF5 chunk format (hdf5plugin's bundled bitshuffle,
filter 32008, ``cd_values[4] == 2``): 8-byte big-endian total decoded bytes,
4-byte big-endian block size in bytes, then per block a 4-byte big-endian
compressed size and an LZ4 block; the last partial block is rounded down to a
multiple of 8 elements and the elements left over are stored raw.
Stock bitshuffle decodes each block with ``LZ4_decompress_fast``, which is told
only how many bytes to produce, never how many it may read: a literal run
longer than what is left of the chunk is copied from whatever lies beyond
the chunk buffer (the process's heap).

``build(directory, outside)`` writes the whole corpus; ``outside`` is a directory
that must not be a readable root (the targets of the symlink swaps).
"""

from __future__ import annotations

import ctypes
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Read", "Case", "build", "plant", "GENERATORS", "slice_text", "bitshuffle", "good_file",
           "marker_file", "external_storage", "virtual_dataset"]

GiB = 2**30
MiB = 2**20
#: a frame of the good files (and of the Bitshuffle-LZ4 cases)
FRAME = (64, 128)
BSHUF_BLOCK = 8192  # bytes: bitshuffle's default block for 1-byte elements


# ---------------------------------------------------------------------- expectations


@dataclass
class Read:
    """One read of a case's dataset and what it must answer.

    ``key`` is a numpy index (``np.s_[...]``); ``status`` the 4xx a refusal
    must have (or a tuple of acceptable ones); ``data`` the array a successful read must equal. With both, either
    answer is right; ``problem`` is a regular expression the refusal's message must
    match (case-insensitive).
    """

    key: Any
    status: int | tuple[int, ...] | None = None
    data: np.ndarray | None = None
    problem: str = ""

    @property
    def text(self) -> str:
        return slice_text(self.key)


@dataclass
class Case:
    """One crafted file: ``file`` (its node is ``prefix/<file stem>``), ``node`` the
    dataset (or group) inside it, ``reads`` the array reads to make, ``metadata``
    further node paths inside the file whose ``/metadata`` must answer 200 or 4xx."""

    name: str
    file: Path
    node: str
    reads: list[Read]
    metadata: list[str] = field(default_factory=list)
    #: the symlink-swap cases: replaces an in-root file with a link leaving the roots
    swap: Callable[[], None] | None = None
    #: what a read must never contain (beyond the heap marker of the differential test)
    secret: bytes = b""
    #: bitshuffle block (elements) of the dataset, to search decoded answers re-shuffled
    bshuf_block: int = 0
    note: str = ""
    #: registered by a raw ``client.new`` (as a write key can), not by walking the tree:
    #: the registration walk summarises the file client-side, which these files stall
    planted: bool = False


def slice_text(key: Any) -> str:
    """``np.s_[0, 1:3, ::2]`` -> ``"0,1:3,::2"`` (Tiled's ``slice=`` and the fast route's)."""
    parts = key if isinstance(key, tuple) else (key,)
    out = []
    for p in parts:
        if isinstance(p, slice):
            s = ("" if p.start is None else str(p.start)) + ":" + ("" if p.stop is None else str(p.stop))
            if p.step is not None:
                s += ":" + str(p.step)
            out.append(s)
        else:
            out.append(str(int(p)))
    return ",".join(out)


# ---------------------------------------------------------------------- helpers

_CORRUPT = r"bitshuffle|lz4|chunk|corrupt|compress|decod"
_LIMIT = r"limit|too large|too many|exceed|SCATTERBROKER_|bytes|chunk"


def _bshuf_lib() -> Any:
    import hdf5plugin

    return ctypes.CDLL(os.path.join(os.path.dirname(hdf5plugin.__file__), "plugins", "libh5bshuf.so"))


def bitshuffle(data: np.ndarray, block: int) -> bytes:
    """Bitshuffle ``data`` (what the filter stores before LZ4) with ``block`` elements a
    block: applied to a decoded answer, it gives back the bytes the decoder took
    as literals -- where heap bytes copied by an over-read would be readable."""
    a = np.ascontiguousarray(data)
    if a.size == 0 or a.size < 8:
        return a.tobytes()
    fn = _bshuf_lib().bshuf_bitshuffle
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t]
    out = np.empty(a.nbytes, dtype=np.uint8)
    n = a.size - a.size % 8
    flat = a.reshape(-1)
    if fn(flat.ctypes.data, out.ctypes.data, n, a.itemsize, block) < 0:
        return a.tobytes()
    out[n * a.itemsize:] = flat[n:].view(np.uint8)
    return out.tobytes()


def _literal_block(n: int) -> bytes:
    """An LZ4 block whose only token announces ``n`` literal bytes -- and holds none."""
    if n < 15:
        return bytes([n << 4])
    out = bytearray([0xF0])
    rest = n - 15
    out += b"\xff" * (rest // 255)
    out.append(rest % 255)
    return bytes(out)


def _bslz4_dataset(f: Any, name: str, shape: tuple, dtype: str = "u1", block: int = 0) -> Any:
    import hdf5plugin

    return f.create_dataset(name, shape=shape, dtype=dtype, chunks=(1, *shape[1:]),
                            **hdf5plugin.Bitshuffle(nelems=block, cname="lz4"))


def _bslz4_chunk(data: np.ndarray, block_bytes: int = BSHUF_BLOCK) -> bytes:
    """A valid Bitshuffle-LZ4 HDF5 chunk of ``data`` (written by the filter's own C code)."""
    import lz4.block

    a = np.ascontiguousarray(data)
    itemsize = a.itemsize
    nelem_block = block_bytes // itemsize
    shuffled = np.frombuffer(bitshuffle(a, nelem_block), dtype=np.uint8)
    out = [struct.pack(">QI", a.nbytes, block_bytes)]
    nblocks, rest = divmod(a.size, nelem_block)
    last = rest - rest % 8
    pos = 0
    for n in [nelem_block] * nblocks + ([last] if last else []):
        comp = lz4.block.compress(shuffled[pos:pos + n * itemsize].tobytes(), store_size=False)
        out.append(struct.pack(">I", len(comp)) + comp)
        pos += n * itemsize
    out.append(shuffled[pos:].tobytes())  # leftover elements, raw
    return b"".join(out)


def _zlib_zeros(n: int, segment: int = MiB) -> bytes:
    """A zlib stream inflating to ``n`` zero bytes (``n`` a multiple of ``segment``), built
    from one full-flush segment repeated: ~1 KB a MiB, generated in milliseconds."""
    assert n % segment == 0
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    seg = co.compress(bytes(segment)) + co.flush(zlib.Z_FULL_FLUSH)
    tail = co.flush(zlib.Z_FINISH)
    adler = ((n % 65521) << 16) | 1  # adler32 of n zeros: a = 1, b = n mod 65521
    return b"\x78\xda" + seg * (n // segment) + tail + struct.pack(">I", adler)


def _h5(path: Path) -> Any:
    import h5py

    return h5py.File(path, "w")


# ---------------------------------------------------------------------- the cases


def bslz4_overread(directory: Path) -> Case:
    """A Bitshuffle-LZ4 frame whose one LZ4 block announces 8192 literal bytes and holds
    none; its block header claims 8226 compressed bytes in a 66-byte chunk. Stock
    hdf5plugin returns 8 KiB of the reading process's heap (bit-shuffled)."""
    path = directory / "bslz4_overread.h5"
    n = FRAME[0] * FRAME[1]
    lz = _literal_block(n)
    with _h5(path) as f:
        d = _bslz4_dataset(f, "data", (1, *FRAME), block=n)
        d[0] = np.zeros(FRAME, "u1")
        d.id.write_direct_chunk((0, 0, 0), struct.pack(">QI", n, n) + struct.pack(">I", len(lz) + n) + lz)
    reads = [Read(np.s_[0], 422, problem=_CORRUPT), Read(np.s_[0, 0:8, 0:8], 422, problem=_CORRUPT)]
    return Case("bslz4_overread", path, "data", reads, bshuf_block=n,
                note="LZ4 literal run past the end of the chunk (8 KiB)")


def bslz4_run_1mib(directory: Path) -> Case:
    """A 1 MiB frame stored as one LZ4 block claiming a 1 MiB literal run in a file of
    ~15 KB: stock hdf5plugin reads 1 MiB past a ~4 KB buffer (SIGSEGV)."""
    path = directory / "bslz4_run_1mib.h5"
    n = MiB
    lz = _literal_block(n)
    with _h5(path) as f:
        d = _bslz4_dataset(f, "data", (1, 1024, 1024), block=n)
        d.id.write_direct_chunk((0, 0, 0), struct.pack(">QI", n, n) + struct.pack(">I", len(lz) + n) + lz)
        f.attrs["padding"] = np.zeros(8000, "u1")  # the 15 KB of the report
    reads = [Read(np.s_[0], 422, problem=_CORRUPT), Read(np.s_[0, 0:1, 0:1], 422, problem=_CORRUPT)]
    return Case("bslz4_run_1mib", path, "data", reads, bshuf_block=n,
                note="1 MiB literal run claimed in a 15 KB file (segfault with stock hdf5plugin)")


def bslz4_block_size(directory: Path) -> Case:
    """A valid two-block Bitshuffle-LZ4 frame (random bytes) whose header's block size is
    rewritten from 8192 to 16384 bytes: the first block's LZ4 stream ends half-way
    through what the decoder was told to produce, and it goes on reading the next
    block's header and data as LZ4, then past the end."""
    path = directory / "bslz4_block_size.h5"
    frame = np.random.default_rng(18).integers(0, 256, (64, 256), dtype="u1")
    chunk = bytearray(_bslz4_chunk(frame))
    chunk[8:12] = struct.pack(">I", 2 * BSHUF_BLOCK)
    with _h5(path) as f:
        d = _bslz4_dataset(f, "data", (1, 64, 256))
        d.id.write_direct_chunk((0, 0, 0), bytes(chunk))
    reads = [Read(np.s_[0], 422, problem=_CORRUPT), Read(np.s_[0, 0:4, 0:4], 422, problem=_CORRUPT)]
    return Case("bslz4_block_size", path, "data", reads, bshuf_block=2 * BSHUF_BLOCK,
                note="block size in the chunk header tampered")


def bslz4_bomb(directory: Path) -> Case:
    """A valid 6.4 MB Bitshuffle-LZ4 chunk of 1 GiB of zeros (one 32768 x 32768 frame)."""
    import lz4.block

    path = directory / "bslz4_bomb.h5"
    n = GiB
    comp = lz4.block.compress(bytes(BSHUF_BLOCK), store_size=False)
    one = struct.pack(">I", len(comp)) + comp
    chunk = struct.pack(">QI", n, BSHUF_BLOCK) + one * (n // BSHUF_BLOCK)
    with _h5(path) as f:
        d = _bslz4_dataset(f, "data", (1, 32768, 32768))
        d.id.write_direct_chunk((0, 0, 0), chunk)
    zero = np.zeros((1, 1), "u1")
    reads = [Read(np.s_[0, 0:1, 0:1], 413, zero, problem=_LIMIT),
             Read(np.s_[0, 100:101, 7:8], 413, zero, problem=_LIMIT)]
    return Case("bslz4_bomb", path, "data", reads, note="6 MB Bitshuffle-LZ4 chunk declaring 1 GiB")


def gzip_bomb(directory: Path) -> Case:
    """A valid 1 MB gzip chunk of 1 GiB of zeros, declared as such (32768 x 32768 u1)."""
    path = directory / "gzip_bomb.h5"
    with _h5(path) as f:
        d = f.create_dataset("data", shape=(1, 32768, 32768), dtype="u1", chunks=(1, 32768, 32768),
                             compression="gzip")
        d.id.write_direct_chunk((0, 0, 0), _zlib_zeros(GiB))
    zero = np.zeros((1, 1), "u1")
    reads = [Read(np.s_[0, 0:1, 0:1], 413, zero, problem=_LIMIT)]
    return Case("gzip_bomb", path, "data", reads, note="1 MB gzip chunk declaring 1 GiB")


def gzip_overflow(directory: Path) -> Case:
    """A gzip chunk declared 64 x 64 bytes whose 1 MB stream inflates to 1 GiB: a bound
    that trusts the declared chunk shape does not see it; HDF5's deflate filter grows
    its buffer until the stream ends."""
    path = directory / "gzip_overflow.h5"
    with _h5(path) as f:
        d = f.create_dataset("data", shape=(1, 64, 64), dtype="u1", chunks=(1, 64, 64), compression="gzip")
        d.id.write_direct_chunk((0, 0, 0), _zlib_zeros(GiB))
    reads = [Read(np.s_[0, 0:1, 0:1], 422, problem=_CORRUPT + "|" + _LIMIT),
             Read(np.s_[0], 422, problem=_CORRUPT + "|" + _LIMIT)]
    return Case("gzip_overflow", path, "data", reads, note="64x64 gzip chunk inflating to 1 GiB")


def tiff_bomb(directory: Path) -> Case:
    """A 1 MB TIFF: one 32768 x 32768 8-bit page, one Deflate strip of 1 GiB of zeros."""
    path = directory / "tiff_bomb.tif"
    strip = _zlib_zeros(GiB)
    side = 32768
    entries = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1),
               (273, 4, 1, 0), (277, 3, 1, 1), (278, 4, 1, side), (279, 4, 1, len(strip))]
    ifd_size = 2 + 12 * len(entries) + 4
    data_offset = 8 + ifd_size
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        value = data_offset if tag == 273 else value
        ifd += struct.pack("<HHI", tag, typ, count) + (struct.pack("<HH", value, 0) if typ == 3
                                                        else struct.pack("<I", value))
    ifd += struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + strip)
    zero = np.zeros((1, 1), "u1")
    return Case("tiff_bomb", path, "", [Read(np.s_[0:1, 0:1], 413, zero, problem=_LIMIT)],
                note="1 MB zlib TIFF page of 32768^2")


def huge_one_element_chunks(directory: Path) -> Case:
    """A ``(2**40,)`` uint8 dataset in 1-element chunks, never written (a few KB):
    ``slice=::65536`` asks for 16.7 million chunks."""
    path = directory / "huge_1elem.h5"
    with _h5(path) as f:
        f.create_dataset("data", shape=(2**40,), maxshape=(None,), dtype="u1", chunks=(1,))
    reads = [Read(np.s_[::65536], 413, np.zeros(2**24, "u1"), problem=_LIMIT),
             Read(np.s_[0:10], 413, np.zeros(10, "u1"), problem=_LIMIT)]
    return Case("huge_1elem", path, "data", reads, note="(2**40,) in 1-element chunks, slice=::65536")


def self_links(directory: Path) -> Case:
    """A group holding 30 hard links to itself (and a small dataset)."""
    path = directory / "self_links.h5"
    with _h5(path) as f:
        g = f.create_group("g")
        g["x"] = np.arange(3, dtype="<i8")
        for i in range(30):
            g[f"a{i}"] = g
    reads = [Read(np.s_[0:3], 413, np.arange(3, dtype="<i8"), problem=_LIMIT)]
    return Case("self_links", path, "g/a0/a1/a2/x", reads, metadata=["", "g", "g/a0", "g/a29/a3"],
                note="a group with 30 hard links to itself")


def vlen_strings(directory: Path) -> Case:
    """A never-written 100-million-element variable-length string dataset (a few KB)."""
    import h5py

    path = directory / "vlen_strings.h5"
    with _h5(path) as f:
        f.create_dataset("s", shape=(100_000_000,), dtype=h5py.string_dtype(), chunks=(1_000_000,))
        f["x"] = np.arange(5, dtype="<i4")
    reads = [Read(np.s_[0:3], 413, problem=_LIMIT)]
    return Case("vlen_strings", path, "s", reads, metadata=["", "x"], planted=True,
                note="never-written 100M-element vlen string dataset")


def many_attributes(directory: Path) -> Case:
    """A dataset with 100,000 attributes (dense attribute storage, low-level API: ~1 s)."""
    import h5py

    path = directory / "many_attrs.h5"
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    fid = h5py.h5f.create(bytes(path), h5py.h5f.ACC_TRUNC, fapl=fapl)
    with h5py.File(fid) as f:
        d = f.create_dataset("data", data=np.arange(4, dtype="<i4"))
        space = h5py.h5s.create(h5py.h5s.SCALAR)
        tid = h5py.h5t.STD_I32LE
        value = np.zeros((), "<i4")
        for i in range(100_000):
            aid = h5py.h5a.create(d.id, b"a%d" % i, tid, space)
            aid.write(value)
    return Case("many_attrs", path, "data", [Read(np.s_[0:4], 413, np.arange(4, dtype="<i4"),
                                                  problem=_LIMIT)],
                metadata=[""], planted=True, note="100,000 attributes on one dataset")


def external_storage(directory: Path, outside: Path, secret: bytes) -> Case:
    """A dataset with external raw storage ``ext_storage.raw`` next to it (inside the root);
    ``swap()`` replaces that file with a symlink to a file outside the roots holding
    ``secret``."""
    path = directory / "ext_storage.h5"
    data = np.arange(64, dtype="<i8") * 3 + 5
    raw = directory / "ext_storage.raw"
    data.tofile(raw)
    with _h5(path) as f:
        f.create_dataset("data", (64,), dtype="<i8", external=[(raw.name, 0, data.nbytes)])
    target = outside / "ext_secret.raw"
    target.write_bytes((secret * (data.nbytes // len(secret) + 1))[:data.nbytes])

    def swap() -> None:
        tmp = directory / ".ext_storage.link"
        tmp.symlink_to(target)
        tmp.replace(raw)

    return Case("ext_storage", path, "data", [Read(np.s_[0:64], 403, data, problem=r"outside|root")],
                swap=swap, secret=secret, note="external raw storage swapped for a link out of the root")


def virtual_dataset(directory: Path, outside: Path, secret: bytes) -> Case:
    """A virtual dataset whose source ``vds_source.h5`` is inside the root; ``swap()``
    replaces the source with a symlink to an HDF5 file outside the roots holding
    ``secret``."""
    import h5py

    path = directory / "vds.h5"
    source = directory / "vds_source.h5"
    data = np.arange(64, dtype="<i8") * 7 + 1
    with _h5(source) as f:
        f["d"] = data
    with _h5(path) as f:
        layout = h5py.VirtualLayout((64,), dtype="<i8")
        layout[:] = h5py.VirtualSource(source.name, "d", shape=(64,))
        f.create_virtual_dataset("data", layout)
    target = outside / "vds_secret.h5"
    with _h5(target) as f:
        f["d"] = np.frombuffer((secret * (512 // len(secret) + 1))[:512], dtype="<i8")

    def swap() -> None:
        tmp = directory / ".vds_source.link"
        tmp.symlink_to(target)
        tmp.replace(source)

    return Case("vds", path, "data", [Read(np.s_[0:64], 403, data, problem=r"outside|root")],
                swap=swap, secret=secret, note="VDS source swapped for a link out of the root")


def _frames(fill: bytes | None, n: int = 4) -> np.ndarray:
    size = n * FRAME[0] * FRAME[1]
    if fill is None:
        flat = (np.arange(size) % 251).astype("u1")
    else:
        flat = np.frombuffer((fill * (size // len(fill) + 1))[:size], dtype="u1")
    return flat.reshape(n, *FRAME)


def _frames_file(path: Path, frames: np.ndarray) -> None:
    with _h5(path) as f:
        d = _bslz4_dataset(f, "frames", frames.shape)
        d[...] = frames
        f.create_dataset("raw", data=frames.astype("<u2"))
        f.create_dataset("gz", data=frames, chunks=(1, *frames.shape[1:]), compression="gzip")
        # small chunks: decoding them leaves many small freed buffers (the size of a
        # crafted chunk's) holding the frames' bytes
        rows = frames.reshape(-1, 64)[:512]
        f.create_dataset("small", data=rows, chunks=(1, 64), compression="gzip", compression_opts=1)
        d = _bslz4_dataset(f, "small_bslz4", (rows.shape[0], 8, 8))
        d[...] = rows.reshape(-1, 8, 8)


def good_file(directory: Path) -> Case:
    """The control: Bitshuffle-LZ4 frames, raw and gzip copies; nothing crafted."""
    path = directory / "good.h5"
    frames = _frames(None)
    _frames_file(path, frames)
    return Case("good", path, "frames", [Read(np.s_[1], data=frames[1]),
                                         Read(np.s_[2, 3:9, 5:40], data=frames[2, 3:9, 5:40]),
                                         Read(np.s_[0:4], data=frames)],
                metadata=["", "raw", "gz"], bshuf_block=BSHUF_BLOCK)


def marker_file(directory: Path, marker: bytes) -> Case:
    """Like :func:`good_file`, every byte of every frame the ``marker`` repeated: read
    many times, it leaves the marker all over the server's freed heap."""
    path = directory / "marker.h5"
    frames = _frames(marker)
    _frames_file(path, frames)
    return Case("marker", path, "frames", [Read(np.s_[0:4], data=frames)], metadata=["raw", "gz"])


#: The crafted files (each ``gen(directory) -> Case``); the swap cases and the marker
#: file need more arguments and are made by :func:`build`.
GENERATORS: dict[str, Callable[[Path], Case]] = {
    "bslz4_overread": bslz4_overread,
    "bslz4_run_1mib": bslz4_run_1mib,
    "bslz4_block_size": bslz4_block_size,
    "bslz4_bomb": bslz4_bomb,
    "gzip_bomb": gzip_bomb,
    "gzip_overflow": gzip_overflow,
    "tiff_bomb": tiff_bomb,
    "huge_1elem": huge_one_element_chunks,
    "self_links": self_links,
    "vlen_strings": vlen_strings,
    "many_attrs": many_attributes,
}


def build(directory: Path, outside: Path, secret: bytes = b"SECRET-outside-the-roots-18",
          planted: Path | None = None) -> dict[str, Case]:
    """Write the corpus (the good control file first) into ``directory``; the symlink
    targets into ``outside``; the files to register with a raw ``client.new``
    (:attr:`Case.planted`) into ``planted`` if given. Returns the cases by name."""
    directory.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    if planted is not None:
        planted.mkdir(parents=True, exist_ok=True)
    cases = {"good": good_file(directory)}
    for name, gen in GENERATORS.items():
        case = gen(directory)
        if case.planted and planted is not None:
            case.file = case.file.replace(planted / case.file.name)
        cases[name] = case
    cases["ext_storage"] = external_storage(directory, outside, secret)
    cases["vds"] = virtual_dataset(directory, outside, secret)
    return cases


def plant(client: Any, path: Path, parent: str = "planted") -> None:
    """Register one HDF5 file as the node ``<parent>/<stem>`` the way a write key can
    without the registration walk (whose client-side summary the planted cases stall):
    ``client.new`` with the external data source ``register`` would build."""
    from tiled.structures.core import StructureFamily
    from tiled.structures.data_source import Asset, DataSource, Management

    node = client[parent] if parent in client else client.create_container(parent)
    node.new(
        structure_family=StructureFamily.container, key=path.stem, specs=[], metadata={},
        data_sources=[DataSource(
            management=Management.external, mimetype="application/x-nexus",
            structure_family=StructureFamily.container, structure=None,
            assets=[Asset(data_uri=path.as_uri(), is_directory=False, parameter="data_uri")])],
    )
