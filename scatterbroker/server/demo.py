"""A small, realistic demo data set: what a beamline would leave on disk.

``write_demo(directory)`` creates::

    raw/demo-2026/<sample>/scan1_00001.cbf …   Pilatus-style CBF frames (miniCBF headers)
    scans/<sample>/scan1.nxs                   stacked NeXus scan file (Bitshuffle-LZ4)
    wrappers/<sample>/scan1.nxs                wrapper: metadata + external link to the scan file

Frames are Poisson background plus Bragg spots that rise and fall as the
crystal rotates, so slicing shows something worth looking at.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: (sample name, temperature K) of the demo scans
SAMPLES = (("sample1", 100.0), ("sample2", 300.0))
FRAME_SHAPE = (195, 487)  # (ny, nx) of a Pilatus 100K module
N_FRAMES = 30
START_ANGLE, STEP = 0.0, 0.1  # deg

_HEADER = """# Detector: PILATUS 100K, S/N 1-0001
# {time}
# Pixel_size 172e-6 m x 172e-6 m
# Silicon sensor, thickness 0.000450 m
# Exposure_time 0.1000000 s
# Exposure_period 0.1020000 s
# Count_cutoff 1048575 counts
# Wavelength 0.7293 A
# Detector_distance 0.2500 m
# Beam_xy (243.50, 97.50) pixels
# Start_angle {angle:.4f} deg.
# Angle_increment {step:.4f} deg.
# Phi {angle:.4f} deg.
# Chi 0.0000 deg.
# Omega 0.0000 deg."""


def demo_frames(seed: int = 0, n: int = N_FRAMES) -> np.ndarray:
    """(frame, y, x) int32 counts: Poisson(0.5) background plus 12 spots."""
    rng = np.random.default_rng(seed)
    ny, nx = FRAME_SHAPE
    y, x = np.mgrid[0:ny, 0:nx]
    spots = [(rng.uniform(10, ny - 10), rng.uniform(10, nx - 10), rng.uniform(0, n),
              rng.uniform(200, 2000)) for _ in range(12)]
    frames = rng.poisson(0.5, (n, ny, nx)).astype(np.int32)
    for f in range(n):
        image = np.zeros(FRAME_SHAPE)
        for y0, x0, f0, peak in spots:
            weight = np.exp(-((f - f0) ** 2) / 2.0)
            if weight > 1e-3:
                image += peak * weight * np.exp(-((y - y0) ** 2 + (x - x0) ** 2) / 4.5)
        frames[f] += rng.poisson(image).astype(np.int32)
    return frames


def write_cbf(path: Path, frame: np.ndarray, angle: float, time: str) -> None:
    """One Pilatus-style CBF frame with its miniCBF header (via fabio)."""
    import fabio.cbfimage

    header = _HEADER.format(time=time, angle=angle, step=STEP)
    fabio.cbfimage.CbfImage(
        data=frame,
        header={"_array_data.header_convention": "PILATUS_1.2",
                "_array_data.header_contents": header},
    ).write(str(path))


def write_demo(directory: str | Path) -> Path:
    """Write the demo data set under ``directory`` (skipped if already there)."""
    from scatterbroker.adapters.units import put
    from scatterbroker.reduction.stack import write_scan
    from scatterbroker.reduction.wrapper import write_wrapper

    directory = Path(directory)
    done = directory / ".complete"
    if done.exists():
        return directory
    for i, (sample, temperature) in enumerate(SAMPLES):
        frames = demo_frames(seed=i)
        angles = START_ANGLE + STEP * np.arange(len(frames))
        raw = directory / "raw" / "demo-2026" / sample
        raw.mkdir(parents=True, exist_ok=True)
        for k, (frame, angle) in enumerate(zip(frames, angles), start=1):
            write_cbf(raw / f"scan1_{k:05d}.cbf", frame, angle, f"2026-11-25T0{8 + i}:00:{k:02d}.000")
        metadata: dict = {"title": f"{sample} rotation scan"}
        put(metadata, "sample/name", sample)
        put(metadata, "sample/temperature", temperature, "K")
        put(metadata, "instrument/monochromator/wavelength", 0.7293, "angstrom")
        put(metadata, "instrument/detector/distance", 250.0, "mm")
        put(metadata, "instrument/detector/x_pixel_size", 0.172, "mm")
        put(metadata, "instrument/detector/y_pixel_size", 0.172, "mm")
        put(metadata, "instrument/detector/beam_center_x", 243.5, "pixel")
        put(metadata, "instrument/detector/beam_center_y", 97.5, "pixel")
        scan = directory / "scans" / sample / "scan1.nxs"
        scan.parent.mkdir(parents=True, exist_ok=True)
        write_scan(scan, frames, angles=angles, metadata=metadata)
        wrapper = directory / "wrappers" / sample / "scan1.nxs"
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        write_wrapper(wrapper, scan, metadata=metadata)
    done.touch()
    return directory
