"""CBF byte-offset decoding (scatterbroker.adapters.byte_offset) against fabio's own codec."""

from __future__ import annotations

import numpy as np
import pytest
from fabio.compression import compByteOffset, decByteOffset

from scatterbroker.adapters.byte_offset import decode


def frame_with_every_escape(dtype: str = "int32") -> np.ndarray:
    """Poisson counts plus differences that need 1, 2, 4 and 8 bytes (the 0x80 / 0x8000 /
    0x80000000 escapes) and the edge values of each width."""
    rng = np.random.default_rng(3)
    frame = rng.poisson(4, (37, 53)).astype(np.int64)
    frame.flat[:14] = [0, 127, -128, -127, 32767, -32768, 40000, -40000, 2**31 - 1, -2**31, 5, 0,
                       2**31 - 1, -2**31]
    frame[20, :3] = [2**40, -(2**40), 7] if dtype == "int64" else [1000, -1000, 7]
    return frame.astype(dtype)


@pytest.mark.parametrize("dtype", ["int32", "int64", "int16"])
def test_decodes_what_fabio_encodes_and_decodes(dtype):
    frame = frame_with_every_escape("int64" if dtype == "int64" else "int32")
    if dtype == "int16":
        frame = np.clip(frame, -30000, 30000).astype("int16")
    section = compByteOffset(frame)
    assert b"\x80\x00\x80" in section or dtype == "int16"  # the 32-bit escape is exercised
    got = decode(section, frame.shape, dtype)
    assert got.dtype == np.dtype(dtype) and got.shape == frame.shape
    assert np.array_equal(got, frame)
    # fabio's decoder at the same width (its int32 one wraps around as numpy does)
    reference = np.asarray(decByteOffset(section, dtype=dtype)).reshape(frame.shape)
    assert np.array_equal(got, reference.astype(dtype))
    assert np.array_equal(decode(memoryview(section), frame.shape, dtype), frame)  # no copy needed


@pytest.mark.parametrize("cut, words", [
    (lambda s: s[:-1], "decodes to"),  # one pixel short
    (lambda s: s[:-2] + b"\x80", "ends inside a pixel value"),  # an escape with nothing after it
    (lambda s: s + b"\x01", "holds more pixels"),
    (lambda s: b"", "decodes to 0 pixels"),
])
def test_a_section_that_does_not_fit_the_frame_is_refused(cut, words):
    frame = frame_with_every_escape()
    with pytest.raises(ValueError, match=words):
        decode(cut(compByteOffset(frame)), frame.shape, "int32")
