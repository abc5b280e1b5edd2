"""Peak search and orientation refinement on synthetic rotation scans with a known U and lattice.

Forward model, independent of scatterbroker's geometry code (no ``pixel_hkl``,
``lab_q``, ``detector_frame``, ``rotation_matrix`` or ``busing_levy_b``):

- ``B`` from xrayutilities (``Crystal.B``), ``UB = U_true · B``;
- every integer hkl with ``|Q| < QMAX``: the rotation angle where it meets the
  Ewald sphere solved by hand, ``|k_i + C·Rz(φ)·UB·h| = |k_i|`` with the beam
  along +y and ``C`` a fixed chi about +y (``A cos φ + B sin φ = C₀``);
- its pixel where the ray ``k_f`` meets the flat detector (columns along +x,
  rows along −z, at ``DIST`` along +y);
- that model is itself checked against xrayutilities: ``HXRD.Ang2HKL`` on a
  one-pixel area detector placed at the predicted (fractional) point gives the
  integer hkl (``test_forward_model_agrees_with_xrayutilities``).

Spots are 3-D Gaussians in (frame, y, x) on a Poisson background, at the
predicted fractional (frame, y, x), for reflections well inside the scan and
the detector and apart from one another. Frames 64 x 80, 40 frames.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scatterbroker.reduction.geometry import UB, Circle, Geometry, Goniometer
from scatterbroker.reduction.orientation import (
    NotIndexed,
    OrientationError,
    SingularOrientation,
    TooFewPeaks,
    misorientation,
    orient,
    orient_frames,
    peak_q,
    scan_rotations,
)
from scatterbroker.reduction.peaks import (
    MaskShapeError,
    NotAFrameStack,
    Peaks,
    PeakSearchError,
    find_peaks,
    peak_options,
)

xu = pytest.importorskip("xrayutilities")

NY, NX, NF = 64, 80, 40
WAVELENGTH, DIST, PIXEL, CENTER = 0.7, 40.0, 0.5, (40.0, 32.0)  # Å, mm, mm, (x0, y0) pixels
START, STEP = -20.0, 1.0  # phi of frame z = START + STEP * z (degrees)
QMAX = 6.0
SIGMA = (0.7, 1.0, 1.0)  # spot widths (frames, rows, columns)
ORTHO = (4.1, 5.2, 6.3, 90.0, 90.0, 90.0)
TRICLINIC = (4.1, 5.2, 6.3, 88.0, 95.0, 101.0)


def rx(a):
    c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def ry(a):
    c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def rz(a):
    c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


U_TRUE = rx(10.0) @ ry(-25.0) @ rz(40.0)


def xu_b(cell) -> np.ndarray:
    return xu.materials.Crystal("x", xu.materials.SGLattice(1, *cell)).B


def geometry(chi: float = 0.0) -> Geometry:
    """The instrument of the forward model, as scatterbroker parameters (single axis when chi = 0)."""
    circles = (Circle("chi", "y+", chi), Circle("phi", "z+")) if chi else (Circle("phi", "z+"),)
    return Geometry(wavelength=WAVELENGTH, distance=DIST, beam_center=CENTER, pixel_size=(PIXEL, PIXEL),
                    goniometer=Goniometer(circles=circles, scan_axis="phi", start=START, step=STEP))


def reflections(ub: np.ndarray, chi: float = 0.0) -> np.ndarray:
    """Rows (h, k, l, frame, y, x): every crossing of the Ewald sphere seen on the detector during the scan."""
    k = 2 * math.pi / WAVELENGTH
    ki = np.array([0.0, k, 0.0])
    c = ry(chi)
    kk = c.T @ ki  # the beam seen from the phi circle's frame
    hmax = [int(QMAX * np.linalg.norm(row)) + 1 for row in np.linalg.inv(ub)]
    out = []
    for hkl in np.ndindex(*[2 * m + 1 for m in hmax]):
        h = np.array(hkl) - hmax
        if not h.any():
            continue
        q = ub @ h
        qq = q @ q
        if qq > QMAX**2:
            continue
        # k_i . Rz(phi) q = -|q|^2 / 2  <=>  A cos(phi) + B sin(phi) = C0
        a = kk[0] * q[0] + kk[1] * q[1]
        b = kk[1] * q[0] - kk[0] * q[1]
        c0 = -qq / 2 - kk[2] * q[2]
        rr = math.hypot(a, b)
        if rr == 0 or abs(c0) > rr:
            continue
        for sign in (1, -1):
            phi = math.degrees(math.atan2(b, a) + sign * math.acos(c0 / rr))
            frame = ((phi - START) / STEP + 180 / STEP) % (360 / STEP) - 180 / STEP
            if not 0 <= frame <= NF - 1:
                continue
            kf = ki + c @ rz(START + STEP * frame) @ q
            if kf[1] <= 0:
                continue
            x = CENTER[0] + DIST * kf[0] / kf[1] / PIXEL
            y = CENTER[1] - DIST * kf[2] / kf[1] / PIXEL
            if 0 <= x <= NX - 1 and 0 <= y <= NY - 1:
                out.append((*h, frame, y, x))
    return np.array(out)


def separated(spots: np.ndarray, margin=(2.5, 4.0, 4.0), apart=(4.0, 7.0, 7.0)) -> np.ndarray:
    """Rows of (…, frame, y, x) well inside the scan and detector, with no other spot close by."""
    fyx = spots[:, -3:]
    inside = np.all((fyx >= margin) & (fyx <= np.array([NF - 1, NY - 1, NX - 1]) - margin), axis=1)
    close = np.all(np.abs(fyx[:, None] - fyx[None]) < apart, axis=2)
    np.fill_diagonal(close, False)
    return spots[inside & ~close.any(axis=1)]


def render(fyx: np.ndarray, seed: int = 0, background: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Integer frames: Gaussian spots (amplitudes 2000-20000) at fractional (frame, y, x) on Poisson noise."""
    rng = np.random.default_rng(seed)
    lam = np.full((NF, NY, NX), background)
    amplitudes = rng.uniform(2000, 20000, len(fyx))
    z, y, x = np.ogrid[:NF, :NY, :NX]
    for (f0, y0, x0), amp in zip(fyx, amplitudes):
        lam += amp * np.exp(-0.5 * (((z - f0) / SIGMA[0]) ** 2 + ((y - y0) / SIGMA[1]) ** 2
                                    + ((x - x0) / SIGMA[2]) ** 2))
    return rng.poisson(lam).astype(np.int32), amplitudes


def scan(cell=ORTHO, chi: float = 0.0, seed: int = 0):
    """(frames, reflections (h, k, l, frame, y, x) rendered, their amplitudes, geometry)."""
    refl = separated(reflections(U_TRUE @ xu_b(cell), chi))
    frames, amplitudes = render(refl[:, 3:], seed)
    return frames, refl, amplitudes, geometry(chi)


def match(peaks: Peaks, fyx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each expected (frame, y, x): the nearest found peak and its largest coordinate offset."""
    found = np.stack([peaks.frame, peaks.y, peaks.x], axis=1)
    d = np.abs(found[None] - fyx[:, None]).max(axis=2)
    return d.argmin(axis=1), d.min(axis=1)


# --------------------------------------------------------------------------- the forward model itself


@pytest.mark.parametrize("cell, chi", [(ORTHO, 0.0), (TRICLINIC, 15.0)])
def test_forward_model_agrees_with_xrayutilities(cell, chi):
    ub = U_TRUE @ xu_b(cell)
    refl = reflections(ub, chi)
    assert len(refl) > 20
    # xrayutilities from its documentation: sample circles outer to inner, beam +y, one detector circle at 0
    qconv = xu.experiment.QConversion(["y+", "z+"], ["x+"], [0, 1, 0])
    hxrd = xu.HXRD([1, 0, 0], [0, 0, 1], wl=WAVELENGTH, qconv=qconv)
    for h, k, l, frame, y, x in refl:
        # a one-pixel detector whose pixel centre is the predicted fractional point
        hxrd.Ang2Q.init_area("z-", "x+", cch1=CENTER[1] - y, cch2=CENTER[0] - x, Nch1=1, Nch2=1,
                             distance=DIST, pwidth1=PIXEL, pwidth2=PIXEL)
        got = hxrd.Ang2HKL(chi, START + STEP * frame, 0.0, U=np.eye(3), B=ub, dettype="area")
        np.testing.assert_allclose(np.ravel(got), [h, k, l], atol=1e-9)


def test_scan_rotations_match_the_goniometer_at_integer_frames():
    geom = Geometry(wavelength=1.0, distance=100.0, beam_center=(1, 1), pixel_size=(0.1, 0.1),
                    goniometer=Goniometer(circles=(Circle("theta", "x+", 1.5), Circle("omega", "z+", -7.0),
                                                   Circle("chi", "y+", 12.0), Circle("phi", "z+", 3.0)),
                                          start=10.0, step=0.7))
    np.testing.assert_allclose(scan_rotations(geom.goniometer, np.arange(5.0)), geom.goniometer.rotations(0, 5),
                               atol=1e-14)
    # a listed angle table is interpolated between frames
    listed = Goniometer(angles=[0.0, 1.0, 3.0])
    np.testing.assert_allclose(scan_rotations(listed, [1.5])[0], rz(2.0), atol=1e-14)


# --------------------------------------------------------------------------- peaks


def test_peaks_are_found_where_the_reflections_land():
    frames, refl, amplitudes, _ = scan()
    peaks = find_peaks(frames, block_frames=7)
    assert len(peaks) == len(refl) > 20  # one peak per reflection: spread over frames, merged across blocks
    index, offset = match(peaks, refl[:, 3:])
    assert len(set(index)) == len(refl)
    assert offset.max() < 0.5, offset.max()  # frames and pixels
    assert np.median(offset) < 0.02
    assert np.all(peaks.npix > 20) and np.all(np.diff(peaks.intensity) <= 0)  # strongest first
    # the strongest peak is the strongest spot, its intensity the spot's integral (2 pi)^1.5 s_f s_y s_x A
    strongest = int(np.argmax(amplitudes))
    assert index[strongest] == 0
    expected = (2 * math.pi) ** 1.5 * np.prod(SIGMA) * amplitudes[strongest]
    assert abs(peaks.intensity[0] / expected - 1) < 0.02

    # the block size does not change anything
    for block in (1, 40):
        other = find_peaks(frames, block_frames=block)
        for column in ("frame", "y", "x", "intensity"):
            np.testing.assert_allclose(getattr(other, column), getattr(peaks, column), rtol=1e-12)
        np.testing.assert_array_equal(other.npix, peaks.npix)

    # a mask removes what it covers; an absolute threshold works too
    y0, x0 = np.rint(refl[strongest, 4:]).astype(int)
    mask = np.zeros((NY, NX), bool)
    mask[y0 - 5 : y0 + 6, x0 - 5 : x0 + 6] = True
    masked = find_peaks(frames, mask=mask)
    assert len(masked) < len(peaks)
    assert np.all(~mask[np.rint(masked.y).astype(int), np.rint(masked.x).astype(int)])
    absolute = find_peaks(frames, threshold=50)
    assert len(absolute) == len(peaks)


def test_peak_search_errors_are_clear():
    frames = np.zeros((3, 10, 12))
    with pytest.raises(MaskShapeError, match=r"mask shape \(12, 10\).*\(10, 12\)"):
        find_peaks(frames, mask=np.zeros((12, 10), bool))
    with pytest.raises(NotAFrameStack, match="3-D"):
        find_peaks(frames[0])
    with pytest.raises(NotAFrameStack, match="real numbers"):
        find_peaks(frames.astype(str))
    with pytest.raises(PeakSearchError, match="unknown peak-search parameter"):
        peak_options({"treshold": 3})
    noisy = np.random.default_rng(0).poisson(3.0, (4, 30, 30))
    with pytest.raises(PeakSearchError, match="threshold is too low"):
        find_peaks(noisy, threshold=6, max_regions=10)
    assert isinstance(MaskShapeError("x"), ValueError)


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("cell, chi", [(ORTHO, 0.0), (TRICLINIC, 15.0)], ids=["orthorhombic", "triclinic-chi15"])
def test_orient_recovers_u_and_the_lattice(cell, chi):
    frames, refl, _, geom = scan(cell, chi)
    peaks = find_peaks(frames)

    found = orient(peaks, geom, cell)  # two-reflection search, then U refined
    assert found.method == "search"
    assert misorientation(found.u, U_TRUE) < 0.05
    assert found.indexed_fraction == 1.0
    assert found.rms_hkl < 0.01
    index, _ = match(peaks, refl[:, 3:])
    np.testing.assert_array_equal(np.rint(found.hkl[index]), refl[:, :3])  # each peak gets its own hkl
    np.testing.assert_allclose(found.ub, found.u @ xu_b(cell), rtol=1e-12)

    # lattice refined too, from a cell 1 % and 0.3 degrees off
    start = np.array(cell) * [1.01, 0.99, 1.01, 1, 1, 1] + [0, 0, 0, 0.3, -0.3, 0.3]
    refined = orient(peaks, geom, start, refine_lattice=True)
    assert np.abs(np.array(refined.lattice.as_tuple()) / cell - 1).max() < 1e-3
    assert misorientation(refined.u, U_TRUE) < 0.05
    assert refined.indexed_fraction == 1.0

    # from a starting U 2 degrees off, no search
    nudged = orient(peaks, geom, cell, u=rx(1.2) @ ry(-1.0) @ rz(1.1) @ U_TRUE)
    assert nudged.method == "given u" and misorientation(nudged.u, U_TRUE) < 0.05


def test_orient_with_spurious_peaks_still_indexes_the_true_ones():
    frames, refl, _, geom = scan()
    rng = np.random.default_rng(7)
    spurious: list[np.ndarray] = []
    while len(spurious) < round(0.2 * len(refl)):  # 20 % extra spots, not from the lattice
        c = rng.uniform([3, 5, 5], [NF - 4, NY - 6, NX - 6])
        if all(np.abs(p - c).max() > 10 for p in [*refl[:, 3:], *spurious]):  # apart: not merged
            spurious.append(c)
    extra, _ = render(np.array(spurious), seed=8, background=0.0)
    peaks = find_peaks(frames + extra)
    assert len(peaks) == len(refl) + len(spurious)

    found = orient(peaks, geom, ORTHO)
    index, offset = match(peaks, refl[:, 3:])
    assert offset.max() < 0.5
    assert found.indexed[index].all()  # every true reflection
    np.testing.assert_array_equal(np.rint(found.hkl[index]), refl[:, :3])
    assert found.indexed.sum() <= len(refl) + 1  # a random spot may land near a lattice point by chance
    assert misorientation(found.u, U_TRUE) < 0.05


def test_orientation_errors_are_clear():
    frames, refl, _, geom = scan()
    peaks = find_peaks(frames)
    with pytest.raises(TooFewPeaks, match="at least 3"):
        orient(peaks.take([0, 1]), geom, ORTHO)
    with pytest.raises(NotIndexed):
        orient(peaks, geom, (7.7, 3.3, 9.1, 90, 90, 90))  # the wrong crystal
    # peaks all in the (0, k, l) plane: U is fixed, the lattice (a*) is not
    plane = refl[refl[:, 0] == 0]
    assert len(plane) >= 3
    rows = {"frame": plane[:, 3], "y": plane[:, 4], "x": plane[:, 5]}
    assert misorientation(orient(rows, geom, ORTHO, u=U_TRUE).u, U_TRUE) < 0.05
    with pytest.raises(SingularOrientation, match="one plane"):
        orient(rows, geom, ORTHO, u=U_TRUE, refine_lattice=True)
    with pytest.raises(OrientationError, match="unknown orient parameter"):
        orient_frames(frames, {"geometry": geom.to_dict(), "lattice": list(ORTHO), "refine": True})
    with pytest.raises(MaskShapeError):
        orient_frames(frames, {"geometry": geom.to_dict(), "lattice": list(ORTHO),
                               "mask": np.zeros((NX, NY), bool).tolist()})
    with pytest.raises(OrientationError, match="needs 'lattice'"):
        orient_frames(frames, {"geometry": geom.to_dict()})
    # the errors are ValueErrors with HTTP 422 for the job API
    assert isinstance(NotIndexed("x"), ValueError) and NotIndexed.status_code == 422


def test_peak_q_is_the_forward_models_q():
    """peak_q at the predicted (frame, y, x) gives back U·B·hkl (our geometry code vs the hand model)."""
    ub = U_TRUE @ xu_b(TRICLINIC)
    refl = reflections(ub, 15.0)
    np.testing.assert_allclose(peak_q(refl[:, 3:], geometry(15.0)), refl[:, :3] @ ub.T, atol=1e-12)


# --------------------------------------------------------------------------- through a server


def test_orient_job_then_transform_with_its_ub(tmp_path):
    """CBF frames on a real server: an orient job (POST /api/v1/jobs) writes U, UB and the peaks; a
    transform job given the orient product's URI as its 'ub' puts the strongest reflection in its voxel."""
    import httpx
    from conftest import API_KEY, start_server, write_cbf
    from scatterbroker.catalog.register import register
    from scatterbroker.server import jobs
    from scatterbroker.reduction.geometry import Grid
    from tiled.client import from_uri

    t0 = time.monotonic()
    frames, refl, amplitudes, geom = scan(seed=3)
    frames[:, 2, 3] = 1_000_000  # a hot pixel, masked below
    raw = tmp_path / "raw" / "xtal"
    raw.mkdir(parents=True)
    for i, frame in enumerate(frames, start=1):
        write_cbf(raw / f"rot_{i:05d}.cbf", frame, i)
    mask = np.zeros((NY, NX), bool)
    mask[2, 3] = True
    params = {"geometry": geom.to_dict(), "lattice": list(ORTHO), "mask": mask.tolist(),
              "peaks": {"sigma": 6, "block_frames": 8}}
    with start_server(tmp_path / "db", [tmp_path / "raw"]) as url:
        client = from_uri(url, api_key=API_KEY)
        register(client, tmp_path / "raw", prefix="raw")
        uri = client["raw/xtal/rot"].uri
        h = {"Authorization": f"Apikey {API_KEY}"}
        r = httpx.post(f"{url}/api/v1/jobs", json={"operation": "orient", "inputs": [uri], "parameters": params},
                       headers=h, timeout=30)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 60
        while (record := httpx.get(f"{url}/api/v1/jobs/{r.json()['id']}", headers=h).json())["state"] not in (
                "done", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert record["state"] == "done", record
        product = from_uri(record["product"], api_key=API_KEY)
        md = product.metadata
        assert record["product"].endswith("/reduced/xtal/rot/orient") and md["complete"]
        assert md["indexed_fraction"] == 1.0 and md["n_peaks"] == len(refl) and md["rms_hkl"] < 0.01
        ub = product["ub"].read()
        assert misorientation(product["u"].read(), U_TRUE) < 0.05
        np.testing.assert_allclose(md["ub"], ub)
        np.testing.assert_allclose(UB.from_nexus(md["sample"]).array, ub, rtol=1e-12)  # NXsample-style copy
        assert len(product["peaks_frame"].read()) == len(refl) and product["peaks_indexed"].read().all()

        # the peaks operation alone: the same table
        job = jobs.submit(client, "peaks", [uri], {"sigma": 6, "mask": mask.tolist()})
        table = from_uri(jobs.run(client, job, API_KEY), api_key=API_KEY)
        np.testing.assert_allclose(table["x"].read(), product["peaks_x"].read())
        assert table.metadata["count"] == len(refl)

        # transform with the refined UB, named by the orient product's URI
        strongest = refl[int(np.argmax(amplitudes)), :3]
        grid = Grid.from_ranges(*[(v - 1.0, v + 1.0) for v in strongest], step=0.25)
        job = jobs.submit(client, "transform", [uri], {"geometry": geom.to_dict(), "ub": record["product"],
                                                       "grid": grid.to_dict()})
        grid_product = from_uri(jobs.run(client, job, API_KEY), api_key=API_KEY)
        assert grid_product.metadata["ub_source"] == record["product"]
        np.testing.assert_allclose(grid_product.metadata["ub"], ub, rtol=1e-12)
        summed = np.nan_to_num(grid_product["data"].read()) * grid_product["weights"].read()  # v, (L, K, H)
        assert np.unravel_index(np.argmax(summed), summed.shape) == (4, 4, 4)  # the voxel centred on its hkl

        # a 'ub' URI that is not an orient product fails clearly
        job = jobs.submit(client, "transform", [uri], {"geometry": geom.to_dict(), "ub": uri, "grid": grid.to_dict()})
        with pytest.raises(jobs.JobError):
            jobs.run(client, job, API_KEY)
        assert "'ub'" in jobs.status(client["jobs"][job.item["id"]])["error"]
        # ... and one on another server is not fetched (the key would go there)
        elsewhere = "http://elsewhere.invalid/api/v1/metadata/reduced/xtal/rot/orient"
        job = jobs.submit(client, "transform", [uri], {"geometry": geom.to_dict(), "ub": elsewhere,
                                                       "grid": grid.to_dict()})
        with pytest.raises(jobs.JobError, match="another server"):
            jobs.run(client, job, API_KEY)
    assert time.monotonic() - t0 < 60
