"""Numba kernels of the reciprocal-space transform, each with a NumPy reference.

The kernels take arrays and scalars only; ``transform.py`` turns geometry, UB
and grid into the few numbers they need. The references implement the same
arithmetic in the same order with NumPy, for the tests.

The algebra (see ``docs/geometry.md``)
--------------------------------------
Pixel ``[row, col]`` sits in the lab at ``r = p0 + col*ex + row*ey`` (flat
detector, any orientation), so ``Q = s*r - k_i`` with ``s = |k|/|r|``, a
per-pixel scalar that does not depend on the frame (:func:`pixel_scale`).
For frame ``f`` the fractional grid coordinate ``u = (hkl - start)/step`` is
affine in ``Q``: ``u = A_f @ Q + b`` with ``A_f = diag(1/step) @ UB⁻¹ @ R_f⁻¹``,
so

    u = s * (A_f p0 + row * A_f ey + col * A_f ex) + (b - A_f k_i)

Per frame the caller passes the four 3-vectors ``coef[f] = (A_f p0,
A_f ey, A_f ex, b - A_f k_i)`` (rows of a (4, 3) array, components in
(H, K, L) order). The kernel does 3 multiply-adds per row and 6 per pixel, then the binning:
nearest voxel,
``i = floor(u + 0.5)``, kept when ``0 <= i < num`` on all three axes.
Masked pixels carry ``s = NaN``, which fails every comparison and so drops
out without a separate mask array; NaN counts (float frames) are skipped too.

Parallel scheme
---------------
Iteration ``t`` of ``T`` (one per numba thread) takes row chunks ``t, t+T,
t+2T, ...`` (``ROW_CHUNK`` rows each, through every frame of the block) and adds
into its own float64 grids (``t = 0`` into the output ``v``/``n``
themselves, the others into ``v_rest[t-1]``/``n_rest[t-1]``): no two threads
write the same memory, no atomics, and the result does not depend on
scheduling. Each grid also flags the 4 KiB pages it wrote (``touched``);
:func:`reduce_partials` adds only flagged pages of the other grids into
``v``/``n`` and :func:`ratio` writes NaN over unflagged pages without reading
them. With the grids allocated on ordinary 4 KiB pages (``transform._zeros``)
memory that no thread wrote is never faulted in: a 360-frame scan reaches
~31% of the pages of a 401^3 grid, so resident memory and page-fault time
follow the region of reciprocal space reached, not the grid (worst case
``16 bytes x voxels x T``).

Variants measured on one core (1475 x 1679 int32 frames, grid [-3, 3]^3,
Mpixel per CPU-second, 101^3 / 401^3, 32 frames): direct one-pass scatter
232 / 192; two passes (index row buffer, then scatter) 336 / 360; the same
with ``v`` and ``n`` interleaved in one array 345 / 340; two passes with
run-length accumulation 640 / 425. Then (180 frames, 401^3 / 101^3) looping
stripe-major (16 rows through the 16 frames of a block, then the next stripe)
instead of frame-major: 359-403 / 650 vs 213-215 / 527 (kept). Interleaving re-measured on top of
run-length accumulation (180 frames, 401^3): 201-212 vs 215-228 for separate
arrays, so not kept. "Owner computes" (thread ``t`` keeps only the L planes
``iL % T == t``, no partial grids, no reduction; 2 threads, 360 frames,
401^3): 0.2 s of page faults instead of 2.6-3.3 s, but 10.5 s of user time
instead of 4.1-4.7 s (every thread walks every pixel), so slower overall.
numba's ``parallel_chunksize`` did not give dynamic scheduling under the
OpenMP layer here, so the split is static but interleaved, which balances
detector regions that fall outside the grid.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = [
    "bin_frames",
    "bin_frames_reference",
    "pixel_scale",
    "pixel_scale_reference",
    "ratio",
    "ratio_reference",
    "reduce_partials",
    "reduce_partials_reference",
]


# --------------------------------------------------------------------------- per pixel, once


@njit(parallel=True, cache=True, fastmath=False, nogil=True)
def pixel_scale(p0, ex, ey, k, mask, out):  # pragma: no cover - numba
    """``out[row, col] = k / |p0 + col*ex + row*ey|``; NaN where ``mask`` is True.

    ``mask`` is a (ny, nx) uint8 array (nonzero = excluded pixel).
    """
    ny, nx = out.shape
    for row in prange(ny):
        rx = p0[0] + row * ey[0]
        ry = p0[1] + row * ey[1]
        rz = p0[2] + row * ey[2]
        for col in range(nx):
            if mask[row, col] != 0:
                out[row, col] = np.nan
            else:
                x = rx + col * ex[0]
                y = ry + col * ex[1]
                z = rz + col * ex[2]
                out[row, col] = k / np.sqrt(x * x + y * y + z * z)


def pixel_scale_reference(p0, ex, ey, k, mask, out):
    """NumPy version of :func:`pixel_scale` (same arithmetic)."""
    ny, nx = out.shape
    rows = np.arange(ny, dtype=np.float64)[:, None]
    cols = np.arange(nx, dtype=np.float64)[None, :]
    comp = [(p0[i] + rows * ey[i]) + cols * ex[i] for i in range(3)]
    out[...] = k / np.sqrt(comp[0] * comp[0] + comp[1] * comp[1] + comp[2] * comp[2])
    out[mask != 0] = np.nan


# --------------------------------------------------------------------------- per block


#: Rows per work item; thread t of T takes row chunks t, t+T, t+2T, ... of every frame.
ROW_CHUNK = 16

#: Voxels per "page" tracked in ``touched``: 512 float64 = 4 KiB, one memory page.
PAGE_SHIFT = 9


@njit(parallel=True, cache=True, fastmath=False, nogil=True)
def bin_frames(frames, scale, coef, nh, nk, nl, v, n, v_rest, n_rest, touched):  # pragma: no cover - numba
    """Add every pixel of ``frames`` (nf, ny, nx) to its nearest voxel.

    Parameters
    ----------
    frames : (nf, ny, nx) any real dtype, C-contiguous
    scale : (ny, nx) float64, from :func:`pixel_scale` (NaN = masked)
    coef : (nf, 4, 3) float64, per frame ``(A p0, A ey, A ex, b - A k_i)``
    nh, nk, nl : grid sizes
    v, n : (nl*nk*nh,) float64, thread 0's sums (the output), flat (L, K, H) C order
    v_rest, n_rest : (T-1, nl*nk*nh) float64, the other threads' sums
    touched : (T, ceil(size / 2**PAGE_SHIFT)) uint8, set to 1 for every page
        of voxels grid ``t`` wrote (so the reduction and ``v/n`` skip the rest)

    The number of partial grids ``T`` is ``v_rest.shape[0] + 1``; iteration
    ``t`` of the parallel loop writes only grid ``t``, so the result does not
    depend on how numba maps iterations to threads.

    Each row is done in two passes: (1) the flat voxel index of every pixel
    into a row buffer (-1 when outside the grid or masked): branch-free
    arithmetic; (2) the scatter-add, run-length accumulated: consecutive
    pixels falling in the same voxel (typically 5-25 on a Pilatus row) are
    summed in registers and written once, which removes the store-to-load
    dependency of repeated ``v[i] += x`` on one address.
    """
    nthreads = v_rest.shape[0] + 1
    nf, ny, nx = frames.shape
    fh = np.float64(nh)
    fk = np.float64(nk)
    fl = np.float64(nl)
    nchunks = (ny + ROW_CHUNK - 1) // ROW_CHUNK
    for t in prange(nthreads):
        if t == 0:
            vt = v
            nt = n
        else:
            vt = v_rest[t - 1]
            nt = n_rest[t - 1]
        pages = touched[t]
        buf = np.empty(nx, np.int64)
        # Stripe-major order: a stripe of ROW_CHUNK rows through all frames of the block,
        # then the next stripe. Neighbouring frames map a stripe to nearly the same voxels,
        # so the grid cells being added to stay in cache (1.8x faster at 401^3).
        for chunk in range(t, nchunks, nthreads):
            for f in range(nf):
                c = coef[f]
                # half a voxel folded into the constant: floor(u + 0.5) == int(u + 0.5) when u + 0.5 >= 0
                ch = c[3, 0] + 0.5
                ck = c[3, 1] + 0.5
                cl = c[3, 2] + 0.5
                ah = c[2, 0]
                ak = c[2, 1]
                al = c[2, 2]
                for row in range(chunk * ROW_CHUNK, min(ny, (chunk + 1) * ROW_CHUNK)):
                    bh = c[0, 0] + row * c[1, 0]
                    bk = c[0, 1] + row * c[1, 1]
                    bl = c[0, 2] + row * c[1, 2]
                    for col in range(nx):
                        s = scale[row, col]
                        fc = np.float64(col)
                        x = s * (bh + fc * ah) + ch
                        y = s * (bk + fc * ak) + ck
                        z = s * (bl + fc * al) + cl
                        ok = (x >= 0.0) & (x < fh) & (y >= 0.0) & (y < fk) & (z >= 0.0) & (z < fl)
                        xi = np.int64(x) if ok else 0
                        yi = np.int64(y) if ok else 0
                        zi = np.int64(z) if ok else 0
                        idx = (zi * nk + yi) * nh + xi
                        buf[col] = idx if ok else -1
                    cur = np.int64(-1)
                    acc_v = 0.0
                    acc_n = 0.0
                    for col in range(nx):
                        idx = buf[col]
                        if idx != cur:
                            if cur >= 0 and acc_n > 0.0:
                                vt[cur] += acc_v
                                nt[cur] += acc_n
                                pages[cur >> PAGE_SHIFT] = 1
                            cur = idx
                            acc_v = 0.0
                            acc_n = 0.0
                        val = frames[f, row, col]
                        if val == val:  # NaN counts (float frames) are skipped
                            acc_v += val
                            acc_n += 1.0
                    if cur >= 0 and acc_n > 0.0:
                        vt[cur] += acc_v
                        nt[cur] += acc_n
                        pages[cur >> PAGE_SHIFT] = 1


def bin_frames_reference(frames, scale, coef, nh, nk, nl):
    """NumPy version of :func:`bin_frames`; returns new flat ``(v, n)``."""
    nf, ny, nx = frames.shape
    size = nh * nk * nl
    v = np.zeros(size)
    n = np.zeros(size)
    rows = np.arange(ny, dtype=np.float64)[:, None]
    cols = np.arange(nx, dtype=np.float64)[None, :]
    for f in range(nf):
        c = coef[f]
        u = [scale * ((c[0, i] + rows * c[1, i]) + cols * c[2, i]) + (c[3, i] + 0.5) for i in range(3)]
        vals = frames[f].astype(np.float64)
        with np.errstate(invalid="ignore"):
            ok = (
                (u[0] >= 0) & (u[0] < nh) & (u[1] >= 0) & (u[1] < nk) & (u[2] >= 0) & (u[2] < nl)
                & ~np.isnan(vals)
            )
        idx = (u[2][ok].astype(np.int64) * nk + u[1][ok].astype(np.int64)) * nh + u[0][ok].astype(np.int64)
        v += np.bincount(idx, weights=vals[ok], minlength=size)
        n += np.bincount(idx, minlength=size)
    return v, n


# --------------------------------------------------------------------------- at the end


@njit(parallel=True, cache=True, fastmath=False, nogil=True)
def reduce_partials(v, v_rest, touched):  # pragma: no cover - numba
    """``v += v_rest.sum(axis=0)`` in place, in the fixed order t = 1, 2, ...

    Only pages that grid ``t`` wrote (``touched[t] != 0``) are read, so pages
    no other thread wrote are never faulted in.
    """
    size = v.shape[0]
    nrest = v_rest.shape[0]
    npages = touched.shape[1]
    for p in prange(npages):
        lo = p << PAGE_SHIFT
        hi = min(size, lo + (1 << PAGE_SHIFT))
        for t in range(nrest):
            if touched[t + 1, p] != 0:
                for i in range(lo, hi):
                    v[i] += v_rest[t, i]


def reduce_partials_reference(v, v_rest, touched):
    """NumPy version of :func:`reduce_partials` (ignores ``touched``: adds everything)."""
    for t in range(v_rest.shape[0]):
        v += v_rest[t]


@njit(parallel=True, cache=True, fastmath=False, nogil=True)
def ratio(v, n, touched_any, out):  # pragma: no cover - numba
    """``out = v / n`` where ``n > 0``, NaN elsewhere; pages not in ``touched_any`` are NaN unread."""
    size = v.shape[0]
    npages = touched_any.shape[0]
    for p in prange(npages):
        lo = p << PAGE_SHIFT
        hi = min(size, lo + (1 << PAGE_SHIFT))
        if touched_any[p] == 0:
            for i in range(lo, hi):
                out[i] = np.nan
        else:
            for i in range(lo, hi):
                out[i] = v[i] / n[i] if n[i] > 0.0 else np.nan


def ratio_reference(v, n):
    """NumPy version of :func:`ratio`."""
    out = np.full(v.shape, np.nan)
    np.divide(v, n, out=out, where=n > 0)
    return out
