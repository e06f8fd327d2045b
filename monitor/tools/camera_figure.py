"""The figure of docs/cameras.md: crops of real after-melt layers (shared/data/slm) above
crops of synthetic layers in varied camera styles, at the same size.

    python -m monitor.tools.camera_figure --slm ../shared/data/slm --out docs/cameras.jpg
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from monitor.training.synth import BuildGenerator

CROP = 320  # px of each tile in the figure
REAL = (("B0", 5, 0.40, 0.45), ("B20220819", 32, 0.45, 0.35), ("B20220824", 61, 0.30, 0.55),
        ("B0", 9, 0.62, 0.30))
SYNTH_SEEDS = (302, 306, 311, 317)


def _real(root: Path, build: str, layer: int, fx: float, fy: float) -> np.ndarray:
    img = cv2.imread(str(root / "images" / build / f"layer_{layer:05d}.jpg"),
                     cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise SystemExit(f"{root}: no image of {build} layer {layer}")
    side = 2 * CROP  # the photos are ~2.7k px wide: a wider crop, halved, shows more parts
    h, w = img.shape
    y0, x0 = int(fy * (h - side)), int(fx * (w - side))
    return np.asarray(cv2.resize(img[y0:y0 + side, x0:x0 + side], (CROP, CROP),
                                 interpolation=cv2.INTER_AREA))


def _synth(seed: int) -> np.ndarray:
    lay = BuildGenerator(size=640, layers=12, seed=seed, camera="varied").layer(6)
    return np.asarray(cv2.resize(lay.image, (CROP, CROP), interpolation=cv2.INTER_AREA))


def figure(slm: Path) -> np.ndarray:
    gap = np.full((CROP, 6), 255, np.uint8)

    def row(tiles: list[np.ndarray]) -> np.ndarray:
        parts: list[np.ndarray] = []
        for t in tiles:
            parts += [t, gap]
        return np.hstack(parts[:-1])

    top = row([_real(slm, *r) for r in REAL])
    bottom = row([_synth(s) for s in SYNTH_SEEDS])
    return np.vstack([top, np.full((6, top.shape[1]), 255, np.uint8), bottom])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slm", type=Path, default=Path("../shared/data/slm"))
    p.add_argument("--out", type=Path, default=Path("docs/cameras.jpg"))
    a = p.parse_args()
    cv2.imwrite(str(a.out), figure(a.slm), [cv2.IMWRITE_JPEG_QUALITY, 85])
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
