"""Cost of the geometry steps on a synthetic layer: `python -m monitor.geometry.bench`.

A 2048 px oblique view of a plate with 36 parts (bars, blocks, rings) and five sparse class
masks; prints the median milliseconds of the warp of the nominal labels, the printed area,
the stray scan tracks beyond the parts and the per-part statistics. Not a test: timings on
a shared machine vary.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import cv2
import numpy as np
import numpy.typing as npt

from monitor.geometry.calibration import Calibration
from monitor.geometry.parts import part_stats
from monitor.geometry.printed import printed_area
from monitor.geometry.reading import outside_zone
from monitor.geometry.stray import stray_tracks


def scene(size: int = 2048, parts: int = 36, seed: int = 0) -> tuple[
        npt.NDArray[np.int32], npt.NDArray[np.uint8], dict[str, npt.NDArray[np.bool_]],
        Calibration]:
    """(frame labels, camera image, class masks, calibration) of a synthetic layer."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    side = int(np.ceil(np.sqrt(parts)))
    cell = size // (side + 1)
    for i in range(parts):
        cy, cx = (i // side + 1) * cell, (i % side + 1) * cell
        r = int(cell * rng.uniform(0.2, 0.4))
        kind = i % 3
        if kind == 0:    # a bar
            cv2.rectangle(labels, (cx - r, cy - r // 4), (cx + r, cy + r // 4), i + 1, -1)
        elif kind == 1:  # a block
            cv2.rectangle(labels, (cx - r, cy - r), (cx + r, cy + r), i + 1, -1)
        else:            # a ring
            cv2.circle(labels, (cx, cy), r, i + 1, -1)
            cv2.circle(labels, (cx, cy), r // 2, 0, -1)
    m = size * 0.06  # an oblique view: the far side narrower
    corners = [[m * 2, m], [size - m * 2, m * 1.2], [size - m, size - m], [m, size - m * 0.8]]
    cal = Calibration.from_corners(corners, image_size=(size, size), frame_px=(size, size),
                                   frame_mm=(0, 0, 250, 250))
    img_labels = cal.frame_to_image_labels(labels, (size, size))
    xx = np.arange(size)[None, :]
    img = 100 + 20 * xx / size + rng.normal(0, 6, (size, size))
    melt = img_labels > 0
    img[melt] -= 15
    img[melt & (rng.random((size, size)) < 0.02)] = 230  # specular speckle
    classes = {}
    for k in range(5):
        blobs = np.zeros((size, size), np.uint8)
        for _ in range(20):
            cv2.circle(blobs, (int(rng.integers(size)), int(rng.integers(size))),
                       int(rng.integers(3, 25)), 1, -1)
        classes[f"class{k}"] = blobs > 0
    return labels, np.clip(img, 0, 255).astype(np.uint8), classes, cal


def _ms(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times)), 1000 * float(np.min(times))


def bench(size: int = 2048, parts: int = 36, repeats: int = 7) -> dict[str, tuple[float, float]]:
    """(median, fastest) ms per step on a synthetic layer; on a shared machine the fastest
    run is the closest to the uncontended cost."""
    labels, img, classes, cal = scene(size, parts)
    shape = (size, size)
    cal.pixel_area_mm2(shape)  # cached per shape by the daemon's calibration
    nominal = cal.frame_to_image_labels(labels, shape)
    printed = printed_area(img, nominal > 0, tolerance_px=4).mask
    zone = outside_zone(nominal > 0, 4, 80)  # 0.5 to 10 mm at about 0.12 mm per pixel
    out = {
        "warp": _ms(lambda: cal.frame_to_image_labels(labels, shape), repeats),
        "printed_area": _ms(lambda: printed_area(img, nominal > 0, tolerance_px=4), repeats),
        "stray_tracks": _ms(lambda: stray_tracks(img, zone, z_min=10.0), repeats),
        "part_stats": _ms(lambda: part_stats(nominal, printed, classes, cal, tolerance_mm=0.5),
                          repeats),
    }
    out["total"] = (sum(v[0] for v in out.values()), sum(v[1] for v in out.values()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--parts", type=int, default=36)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    print(f"{'step':14s} {'median':>8s} {'fastest':>8s}  (ms)")
    for k, (med, best) in bench(a.size, a.parts, a.repeats).items():
        print(f"{k:14s} {med:8.1f} {best:8.1f}")


if __name__ == "__main__":
    main()
