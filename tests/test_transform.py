"""Reciprocal-space transform: hand-computed pixel, kernels vs NumPy, xrayutilities, splits, bad input.

Small detector (40 x 50 pixels, 20 frames): the code paths are the ones a
Pilatus 2M takes. The xrayutilities comparison builds its geometry by hand
from the xrayutilities documentation, not from our helpers.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from scatterbroker.reduction import _kernels
from scatterbroker.reduction.geometry import (
    Circle,
    Geometry,
    GeometryError,
    Goniometer,
    Grid,
    GridAxis,
    GridTooLarge,
    SingularUB,
    TransformParams,
    UB,
    rotation_matrix,
)
from scatterbroker.reduction.transform import (
    MaskShapeError,
    NotAFrameStack,
    Partial,
    Result,
    TransformError,
    finish,
    merge,
    partial,
    pixel_hkl,
    transform,
)
from scatterbroker.reduction.transform import _Plan

NY, NX, NF = 40, 50, 20
WAVELENGTH = 0.7293


def busy_geometry() -> Geometry:
    """Every knob away from zero: offsets on all circles, 2θ arm, detector rotation and tilt."""
    gon = Goniometer(
        circles=(Circle("theta", "x+", 1.5), Circle("omega", "z+", -7.0), Circle("chi", "y+", 12.0),
                 Circle("phi", "z+", 3.0)),
        scan_axis="phi", start=10.0, step=0.7,
    )
    return Geometry(
        wavelength=WAVELENGTH, distance=120.0, beam_center=(18.3, 25.6), pixel_size=(0.172, 0.180),
        x_direction="x+", y_direction="z-", rotation=2.0, tilt=3.0, tilt_azimuth=30.0,
        arm=(Circle("tth", "x+", 15.0),), goniometer=gon,
    )


def busy_ub() -> UB:
    return UB.from_lattice(4.1, 5.2, 6.3, 88.0, 95.0, 101.0, U=rotation_matrix([1, 2, 3], 25.0))


def counts(seed: int = 0, n: int = NF) -> np.ndarray:
    return np.random.default_rng(seed).poisson(5.0, (n, NY, NX)).astype(np.int32)


def covering_grid(hkl: np.ndarray, step: float, frac: float = 0.85) -> Grid:
    """A grid over most (not all) of the pixels' HKL, so some pixels fall outside."""
    axes = []
    for i in range(3):
        lo, hi = np.percentile(hkl[..., i], [1.0, 100 * frac])
        start = math.floor(lo / step) * step + 0.013 * step  # centres off any round number
        axes.append(GridAxis.from_range(start, hi, step=step))
    return Grid(*axes)


# --------------------------------------------------------------------------- hand-computed pixel


def test_single_pixel_by_hand():
    # phi scan about +z (right-handed), chi = 10 deg about +y, theta = omega = 0
    geom = Geometry(
        wavelength=1.0, distance=100.0, beam_center=(20.0, 15.0), pixel_size=(0.5, 0.4),
        goniometer=Goniometer(
            circles=(Circle("theta", "x+"), Circle("omega", "z+"), Circle("chi", "y+", 10.0), Circle("phi", "z+")),
            scan_axis="phi", start=30.0, step=2.0,
        ),
    )
    a = 3.0
    ub = UB.from_lattice(a, a, a, 90, 90, 90)
    frame, row, col = 3, 5, 33

    # By hand. Beam along +y, z up; columns run along +x, rows along -z.
    x = (col - 20.0) * 0.5  # 6.5 mm
    y = 100.0
    z = -(row - 15.0) * 0.4  # +4.0 mm (row 5 is above the beam centre row 15)
    norm = math.sqrt(x * x + y * y + z * z)
    k = 2 * math.pi / 1.0
    q_lab = [k * x / norm, k * y / norm - k, k * z / norm]
    phi = math.radians(30.0 + 2.0 * frame)
    chi = math.radians(10.0)
    rz = [[math.cos(phi), -math.sin(phi), 0], [math.sin(phi), math.cos(phi), 0], [0, 0, 1]]
    ry = [[math.cos(chi), 0, math.sin(chi)], [0, 1, 0], [-math.sin(chi), 0, math.cos(chi)]]
    r = [[sum(ry[i][m] * rz[m][j] for m in range(3)) for j in range(3)] for i in range(3)]  # outer @ inner
    q_sample = [sum(r[m][i] * q_lab[m] for m in range(3)) for i in range(3)]  # R^-1 = R^T
    hkl = [qi * a / (2 * math.pi) for qi in q_sample]  # cubic: UB = (2 pi / a) I

    np.testing.assert_allclose(pixel_hkl(geom, ub, (NY, NX), frame)[0, row, col], hkl, rtol=0, atol=1e-12)

    step = 0.01
    grid = Grid.from_ranges(
        H=(hkl[0] - 0.2034, hkl[0] + 0.2), K=(hkl[1] - 0.1017, hkl[1] + 0.1), L=(hkl[2] - 0.3021, hkl[2] + 0.3),
        step=step,
    )
    expected = tuple(
        math.floor((hkl[i] - grid.start[i]) / step + 0.5) for i in (2, 1, 0)
    )  # (iL, iK, iH)
    assert expected == (30, 10, 20)

    frames = np.zeros((6, NY, NX), dtype=np.int32)
    frames[frame, row, col] = 7
    res = transform(frames, geom, ub, grid)
    assert res.v[expected] == 7.0
    assert res.v.sum() == 7.0
    assert res.n[expected] >= 1
    assert res.data[expected] == 7.0 / res.n[expected]

    mask = np.zeros((NY, NX), dtype=bool)
    mask[row, col] = True
    masked = transform(frames, geom, ub, grid, mask=mask)
    assert masked.v.sum() == 0.0
    # the mask removes that pixel from every frame in which it falls inside the grid
    idx = np.floor((pixel_hkl(geom, ub, (NY, NX), range(6))[:, row, col] - grid.start) / step + 0.5)
    inside = np.all((idx >= 0) & (idx < [grid.H.num, grid.K.num, grid.L.num]), axis=1)
    assert inside[frame] and res.n.sum() - masked.n.sum() == inside.sum() > 1
    assert masked.n[expected] < res.n[expected]


# --------------------------------------------------------------------------- kernels vs NumPy


@pytest.mark.parametrize("dtype", [np.int32, np.float64])
def test_kernels_match_numpy_reference(dtype):
    geom, ub = busy_geometry(), busy_ub()
    hkl = pixel_hkl(geom, ub, (NY, NX), range(NF))
    grid = covering_grid(hkl, 0.02)
    params = TransformParams(geom, ub, grid)
    mask = np.zeros((NY, NX), dtype=bool)
    mask[::7, 3] = True
    plan = _Plan.build(params, (NY, NX), mask)

    ref_scale = np.empty((NY, NX))
    _kernels.pixel_scale_reference(plan.p0, plan.ex, plan.ey, geom.k, mask.astype(np.uint8), ref_scale)
    np.testing.assert_array_equal(np.isnan(plan.scale), mask)
    np.testing.assert_allclose(plan.scale, ref_scale, rtol=1e-15, equal_nan=True)

    frames = counts(1).astype(dtype)
    if dtype == np.float64:
        frames = frames + np.random.default_rng(2).random(frames.shape)
        frames[4, 10:12, 20:30] = np.nan
    coef = plan.coefficients(0, NF)
    nl, nk, nh = grid.shape
    threads = 3  # more partial grids than cores: the result must not depend on scheduling
    v, n = np.zeros(grid.size), np.zeros(grid.size)
    v_rest, n_rest = np.zeros((threads - 1, grid.size)), np.zeros((threads - 1, grid.size))
    pages = (grid.size >> _kernels.PAGE_SHIFT) + 1
    touched = np.zeros((threads, pages), np.uint8)
    _kernels.bin_frames(frames, plan.scale, coef, nh, nk, nl, v, n, v_rest, n_rest, touched)
    # each grid flags exactly the 4 KiB pages it wrote
    for t, nt in enumerate([n, *n_rest]):
        padded = np.zeros(pages << _kernels.PAGE_SHIFT)
        padded[: grid.size] = nt
        np.testing.assert_array_equal(touched[t], padded.reshape(pages, -1).any(axis=1))
    assert touched[1:].any()
    v_ref_rest = v_rest.copy()
    _kernels.reduce_partials(v, v_rest, touched)
    _kernels.reduce_partials(n, n_rest, touched)

    v_ref, n_ref = _kernels.bin_frames_reference(frames, ref_scale, coef, nh, nk, nl)
    np.testing.assert_array_equal(n, n_ref)
    assert 0 < n.sum() < NF * NY * NX  # some pixels are outside the grid, some masked
    if dtype == np.int32:
        np.testing.assert_array_equal(v, v_ref)
    else:
        np.testing.assert_allclose(v, v_ref, rtol=1e-12, atol=0)

    total = np.zeros(grid.size)
    _kernels.reduce_partials_reference(total, v_ref_rest, touched)
    np.testing.assert_allclose(total, v_ref_rest.sum(axis=0), rtol=1e-15)

    out = np.empty(grid.size)
    _kernels.ratio(v, n, touched.any(axis=0), out)
    np.testing.assert_array_equal(out, _kernels.ratio_reference(v, n))


# --------------------------------------------------------------------------- xrayutilities


def test_agrees_with_xrayutilities():
    xu = pytest.importorskip("xrayutilities")
    geom, ub = busy_geometry(), busy_ub()

    # xrayutilities, set up from its documentation: sample circles outer to inner, detector arm,
    # beam along +y; detectorDir1 is the slow (row) direction, cch1 the beam-centre row.
    qconv = xu.experiment.QConversion(["x+", "z+", "y+", "z+"], ["x+"], [0, 1, 0])
    hxrd = xu.HXRD([1, 0, 0], [0, 0, 1], wl=WAVELENGTH, qconv=qconv)
    hxrd.Ang2Q.init_area(
        "z-", "x+", cch1=25.6, cch2=18.3, Nch1=NY, Nch2=NX, distance=120.0,
        pwidth1=0.180, pwidth2=0.172, detrot=2.0, tiltazimuth=30.0, tilt=3.0,
    )
    phi = 3.0 + 10.0 + 0.7 * np.arange(NF)
    h, k, l = hxrd.Ang2HKL(1.5, -7.0, 12.0, phi, 15.0, U=np.eye(3), B=ub.array, dettype="area")
    hkl_xu = np.stack([h, k, l], axis=-1)  # (NF, NY, NX, 3)

    # per pixel
    np.testing.assert_allclose(pixel_hkl(geom, ub, (NY, NX), range(NF)), hkl_xu, rtol=0, atol=1e-12)

    step = 0.02
    grid = covering_grid(hkl_xu, step)
    start = grid.start

    # point reflections at known HKL (voxel centres), each on the pixel closest to it
    frames = counts(3).astype(np.float64)
    rng = np.random.default_rng(4)
    flat = hkl_xu.reshape(-1, 3)
    inside = np.all((flat >= start) & (flat <= start + step * (np.array(grid.shape[::-1]) - 1)), axis=1)
    spots = []
    for pick in rng.choice(np.flatnonzero(inside), size=4, replace=False):
        ijk = np.rint((flat[pick] - start) / step).astype(int)  # (iH, iK, iL)
        target = start + step * ijk
        nearest = int(np.argmin(np.abs(flat - target).max(axis=1)))
        assert np.abs(flat[nearest] - target).max() < 0.5 * step
        frames.reshape(-1)[nearest] = 1e6
        spots.append((ijk[2], ijk[1], ijk[0]))

    ours = transform(frames, geom, ub, grid, block_frames=7)

    gridder = xu.Gridder3D(grid.H.num, grid.K.num, grid.L.num)
    gridder.KeepData(True)
    gridder.dataRange(grid.H.start, grid.H.stop, grid.K.start, grid.K.stop, grid.L.start, grid.L.stop, fixed=True)
    for f in range(NF):
        gridder(h[f], k[f], l[f], frames[f])
    xv = gridder._gdata.transpose(2, 1, 0)  # xrayutilities grids are (H, K, L)
    xn = gridder._gnorm.transpose(2, 1, 0)

    for spot in spots:
        assert ours.v[spot] >= 1e6, spot
        assert xv[spot] >= 1e6, spot
    assert set(zip(*np.nonzero(ours.v >= 1e6))) == set(spots)

    # Whole grid. xrayutilities keeps points in [start, stop] (its edge voxels are half as wide),
    # we keep [start - step/2, stop + step/2): interior voxels are the same bins, edge ones differ.
    interior = (slice(1, -1),) * 3
    np.testing.assert_array_equal(ours.n[interior], xn[interior])
    edge = np.ones(grid.shape, bool)
    edge[interior] = False
    assert np.all(ours.n[edge] >= xn[edge])
    same_bins = ~edge | (ours.n == xn)  # edge voxels that got nothing from their outer half
    shared = same_bins & (ours.n > 0) & (xn > 0)
    assert shared[interior].sum() > 500
    xdata = xv[shared] / xn[shared]
    np.testing.assert_allclose(ours.data[shared], xdata, rtol=1e-6, atol=0)
    assert np.isnan(ours.data[ours.n == 0]).all()


def test_xrayutilities_args_helper_matches():
    xu = pytest.importorskip("xrayutilities")
    geom, ub = busy_geometry(), busy_ub()
    args = geom.xrayutilities_args((NY, NX))
    hxrd = xu.HXRD([1, 0, 0], [0, 0, 1], wl=geom.wavelength, qconv=xu.experiment.QConversion(*args["qconv"]))
    hxrd.Ang2Q.init_area(**args["init_area"])
    sample = geom.goniometer.circle_angles(0, 3)
    h, k, l = hxrd.Ang2HKL(*sample.T, *args["detector_angles"], U=np.eye(3), B=ub.array, dettype="area")
    np.testing.assert_allclose(pixel_hkl(geom, ub, (NY, NX), range(3)), np.stack([h, k, l], -1), atol=1e-12)


# --------------------------------------------------------------------------- splitting


def test_any_split_gives_identical_grids():
    geom, ub = busy_geometry(), busy_ub()
    grid = covering_grid(pixel_hkl(geom, ub, (NY, NX), range(NF)), 0.02)
    params = TransformParams(geom, ub, grid)
    frames = counts(5)
    mask = np.zeros((NY, NX), bool)
    mask[0] = True
    whole = transform(frames, geom, ub, grid, mask=mask)

    rng = np.random.default_rng(6)
    splits = [[0, NF], [0, 1, NF], [0, 3, 11, 12, NF], sorted({0, NF, *rng.integers(1, NF, 6).tolist()})]
    for cuts in splits:
        parts = [partial(frames[a:b], a, params.to_dict(), mask=mask) for a, b in zip(cuts[:-1], cuts[1:])]
        assert all(isinstance(p, Partial) and p.v.shape == grid.shape for p in parts)
        merged = finish(merge(iter(parts)), json.loads(json.dumps(params.to_dict())))
        np.testing.assert_array_equal(merged.v, whole.v)
        np.testing.assert_array_equal(merged.n, whole.n)
    for block, threads in [(1, None), (7, 1), (NF, 2)]:
        other = transform(frames, geom, ub, grid, mask=mask, block_frames=block, nthreads=threads)
        np.testing.assert_array_equal(other.v, whole.v)
        np.testing.assert_array_equal(other.n, whole.n)

    # merging Results gives a Result; data is v/n with NaN where empty
    half = [transform(frames[:9], geom, ub, grid, mask=mask),
            transform(frames[9:], geom, ub, grid, mask=mask, first_frame=9)]
    both = merge(half)
    assert isinstance(both, Result)
    np.testing.assert_array_equal(both.n, whole.n)
    assert np.isnan(both.data[whole.n == 0]).all()
    np.testing.assert_array_equal(both.data[whole.n > 0], whole.v[whole.n > 0] / whole.n[whole.n > 0])


def test_streams_sliceable_sources_and_reports_progress(tmp_path):
    h5py = pytest.importorskip("h5py")
    geom, ub = busy_geometry(), busy_ub()
    grid = covering_grid(pixel_hkl(geom, ub, (NY, NX), range(NF)), 0.05)
    frames = counts(7).astype(np.uint16)
    with h5py.File(tmp_path / "scan.h5", "w") as f:
        f.create_dataset("data", data=frames, chunks=(1, NY, NX))
    seen = []
    with h5py.File(tmp_path / "scan.h5", "r") as f:
        res = transform(f["data"], geom, ub, grid, block_frames=6, progress=seen.append)
    assert seen == [6, 6, 6, 2]
    ref = transform(frames, geom, ub, grid)
    np.testing.assert_array_equal(res.v, ref.v)
    nx = res.to_nxdata()
    assert nx["attrs"]["axes"] == ["L", "K", "H"] and nx["attrs"]["H_indices"] == 2
    assert nx["data"]["value"].shape == grid.shape == (grid.L.num, grid.K.num, grid.H.num)
    np.testing.assert_array_equal(nx["H"]["value"], grid.H.start + grid.H.step * np.arange(grid.H.num))
    assert nx["H"]["attrs"]["units"] == "rlu"


# --------------------------------------------------------------------------- parameters


def test_parameters_round_trip_through_json():
    params = TransformParams(busy_geometry(), busy_ub(), Grid.from_ranges((-1, 1), (-2, 2), (0, 3), shape=(21, 41, 31)))
    again = TransformParams.from_dict(json.loads(json.dumps(params.to_dict())))
    assert again == params
    explicit = Goniometer(angles=[0.0, 0.5, 1.5])
    assert Goniometer.from_dict(json.loads(json.dumps(explicit.to_dict()))) == explicit
    np.testing.assert_array_equal(explicit.scan_angles(1, 2), [0.5, 1.5])


def test_ub_from_lattice_and_nexus():
    ub = UB.from_lattice(4.0, 4.0, 4.0, 90, 90, 90)
    np.testing.assert_allclose(ub.array, np.eye(3) * 2 * np.pi / 4, atol=1e-15)
    hexagonal = UB.from_lattice(3.0, 3.0, 5.0, 90, 90, 120)
    d100 = 3.0 * math.sqrt(3) / 2
    assert np.linalg.norm(hexagonal.array @ [1, 0, 0]) == pytest.approx(2 * np.pi / d100)
    np.testing.assert_allclose(hexagonal.array @ [0, 0, 1], [0, 0, 2 * np.pi / 5.0], atol=1e-12)

    bl = busy_ub().array / (2 * np.pi)  # NeXus Busing-Levy, no 2 pi
    np.testing.assert_allclose(UB.from_nexus({"ub_matrix": bl}).array, busy_ub().array, rtol=1e-14)
    np.testing.assert_allclose(UB.from_nexus({"orientation_matrix": bl.ravel()}).array, busy_ub().array, rtol=1e-14)
    u = rotation_matrix([1, 2, 3], 25.0)
    from_u = UB.from_nexus({"orientation_matrix": u, "unit_cell": [4.1, 5.2, 6.3, 88.0, 95.0, 101.0]})
    np.testing.assert_allclose(from_u.array, busy_ub().array, rtol=1e-13)

    h5py = pytest.importorskip("h5py")
    with h5py.File("in-memory.h5", "w", driver="core", backing_store=False) as f:
        f["sample/ub_matrix"] = bl
        np.testing.assert_allclose(UB.from_nexus(f["sample"]).array, busy_ub().array, rtol=1e-14)


# --------------------------------------------------------------------------- bad input


def test_singular_ub_is_refused():
    with pytest.raises(SingularUB, match="singular"):
        UB([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    with pytest.raises(ValueError, match="singular"):  # also a plain ValueError
        transform(counts(0, 2), busy_geometry(), np.zeros((3, 3)), Grid.from_ranges((0, 1), (0, 1), (0, 1), step=0.5))
    with pytest.raises(SingularUB):
        UB.from_lattice(4, 4, 4, 60, 60, 120)  # flat cell: zero volume
    with pytest.raises(GeometryError, match="3x3"):
        UB(np.eye(2))


def test_huge_grid_is_refused_with_memory_estimate():
    huge = Grid.from_ranges((-5, 5), (-5, 5), (-5, 5), shape=1000)
    assert huge.size == 10**9
    with pytest.raises(GridTooLarge, match=r"1,000,000,000 voxels would need \d+\.\d GB") as err:
        transform(counts(0, 2), busy_geometry(), busy_ub(), huge)
    assert isinstance(err.value, ValueError) and err.value.status_code == 413
    small = Grid.from_ranges((0, 1), (0, 1), (0, 1), shape=11)
    with pytest.raises(GridTooLarge, match="limit is 1,000 voxels"):
        partial(counts(0, 2), 0, TransformParams(busy_geometry(), busy_ub(), small), max_voxels=1000)


def test_wrong_mask_shape_is_refused():
    grid = Grid.from_ranges((0, 1), (0, 1), (0, 1), step=0.5)
    with pytest.raises(MaskShapeError, match=r"mask shape \(50, 40\) .* \(40, 50\)"):
        transform(counts(0, 2), busy_geometry(), busy_ub(), grid, mask=np.zeros((NX, NY), bool))
    with pytest.raises(ValueError, match="boolean"):
        transform(counts(0, 2), busy_geometry(), busy_ub(), grid, mask=np.zeros((NY, NX), float))


def test_not_a_frame_stack_is_refused():
    grid = Grid.from_ranges((0, 1), (0, 1), (0, 1), step=0.5)
    with pytest.raises(NotAFrameStack, match=r"3-D .* 2-D shape \(40, 50\) \(for one frame use frames\[None\]\)"):
        transform(np.zeros((NY, NX)), busy_geometry(), busy_ub(), grid)
    with pytest.raises(TransformError, match="4-D"):
        transform(np.zeros((2, 2, NY, NX)), busy_geometry(), busy_ub(), grid)
    with pytest.raises(ValueError, match="real numbers"):
        transform(np.zeros((2, NY, NX), complex), busy_geometry(), busy_ub(), grid)
    with pytest.raises(TransformError, match="lists only 3 scan angles"):
        transform(counts(0, 4), busy_geometry().__class__(
            wavelength=1.0, distance=100.0, beam_center=(1, 1), pixel_size=(0.1, 0.1),
            goniometer=Goniometer(angles=[0.0, 1.0, 2.0])), busy_ub(), grid)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"wavelength": 0}, "wavelength"),
        ({"distance": float("nan")}, "finite"),
        ({"x_direction": "y+"}, "perpendicular to the beam"),
        ({"x_direction": "z+", "y_direction": "z-"}, "perpendicular"),
        ({"bogus": 1}, "unknown geometry field"),
        ({"goniometer": {"scan_axis": "kappa"}}, "not one of the goniometer circles"),
    ],
)
def test_bad_geometry_is_refused(change, message):
    d = busy_geometry().to_dict()
    d.update(change)
    with pytest.raises(GeometryError, match=message):
        Geometry.from_dict(d)
