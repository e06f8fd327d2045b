"""Per-part statistics of a layer: nominal area, printed fraction, excess, shift, defects.

Everything is in camera image pixels (where the daemon's class masks are): the nominal
slice is warped into the image with the inverse homography, and every area is summed over
the calibration's per-pixel mm² map, so an oblique camera's far side counts right.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from monitor.geometry.calibration import Calibration

BoolArray = npt.NDArray[np.bool_]
Labels = npt.NDArray[np.int32]


@dataclass(frozen=True)
class PartStats:
    """One part in one layer. Fractions are of the part's nominal area."""

    id: int
    nominal_mm2: float
    printed_fraction: float
    excess_fraction: float           # printed outside every part's tolerance zone, nearest part
    centroid_shift_mm: float | None  # printed vs nominal centroid; None if nothing printed
    classes: Mapping[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "nominal_mm2": round(self.nominal_mm2, 4),
                "printed_fraction": round(self.printed_fraction, 4),
                "excess_fraction": round(self.excess_fraction, 4),
                "centroid_shift_mm": (None if self.centroid_shift_mm is None
                                      else round(self.centroid_shift_mm, 4)),
                "classes": {k: round(v, 4) for k, v in self.classes.items()}}


def tolerance_px(cal: Calibration, nominal: Labels, tolerance_mm: float) -> int:
    """`tolerance_mm` in image pixels, at the nominal area's median pixel size."""
    if tolerance_mm <= 0:
        return 0
    area = cal.pixel_area_mm2(nominal.shape)
    inside = nominal > 0
    px_mm2 = float(np.median(area[inside])) if inside.any() else float(np.median(area))
    return max(1, round(tolerance_mm / math.sqrt(px_mm2)))


def _disk(r: int) -> npt.NDArray[np.uint8]:
    return np.asarray(cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)),
                      np.uint8)


def part_stats(
    nominal: Labels,
    printed: BoolArray,
    classes: Mapping[str, BoolArray],
    cal: Calibration,
    *,
    tolerance_mm: float,
) -> list[PartStats]:
    """Per-part statistics of one layer.

    Args:
        nominal: (H, W) part ids in image pixels (0 = powder), e.g.
            `cal.frame_to_image_labels(slice.labels, image.shape)`.
        printed: (H, W) freshly melted pixels (`printed_area(...).mask`).
        classes: defect class name -> (H, W) mask; each is counted on the part grown by
            the tolerance, as a fraction of the part's nominal area.
        tolerance_mm: how far outside its nominal outline a part's pixels still count.
    """
    n = int(nominal.max(initial=0)) + 1
    if n == 1:
        return []
    area = cal.pixel_area_mm2(nominal.shape)
    tol = tolerance_px(cal, nominal, tolerance_mm)
    # Tolerance zone of each part: its own pixels, plus the grown rim (where two rims
    # meet, the larger id takes the pixel: a tie-break, not a measurement).
    lab16 = nominal.astype(np.uint16) if n < 65536 else nominal.astype(np.float32)
    zone = nominal
    if tol:
        grown = cv2.dilate(lab16, _disk(tol)).astype(np.int32)
        zone = np.where(nominal > 0, nominal, grown)

    def sums(labels: Labels, mask: BoolArray | None = None) -> npt.NDArray[np.float64]:
        sel = labels > 0 if mask is None else mask & (labels > 0)
        return np.bincount(labels[sel], weights=area[sel], minlength=n).astype(np.float64)

    nominal_mm2 = sums(nominal)
    ids = np.flatnonzero(nominal_mm2 > 0)  # no np.unique: it sorts every pixel
    printed_in = sums(nominal, printed)

    # Excess: printed outside every zone, given to the nearest part.
    excess_mm2 = np.zeros(n)
    outside = printed & (zone == 0)
    if outside.any():
        ys, xs = np.nonzero(outside)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        pad = 4 * tol + 64  # look for the nearest part a little beyond the excess' box
        box = (slice(max(0, y0 - pad), y1 + pad), slice(max(0, x0 - pad), x1 + pad))
        sub = nominal[box]
        if (sub > 0).any():
            _, near = cv2.distanceTransformWithLabels(
                (sub == 0).astype(np.uint8), cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_PIXEL)
            # label index -> the part id at that seed pixel
            seeds = np.zeros(int(near.max()) + 1, np.int32)
            seeds[near[sub > 0]] = sub[sub > 0]
            owner = seeds[near]
            sel = outside[box]
            excess_mm2 = np.bincount(owner[sel], weights=area[box][sel],
                                     minlength=n).astype(np.float64)

    # Centroids (area-weighted, image px): nominal vs printed inside the zone
    cents = _centroids(nominal, None, area, n)
    pcents = _centroids(zone, printed, area, n)

    class_fr: dict[str, npt.NDArray[np.float64]] = {
        name: sums(zone, mask.astype(bool)) for name, mask in classes.items()}

    out = []
    for pid in ids.tolist():
        nom = float(nominal_mm2[pid])
        shift: float | None = None
        if pcents[1][pid] > 0 and cents[1][pid] > 0:
            a = cal.image_to_mm(cents[0][pid])
            b = cal.image_to_mm(pcents[0][pid])
            shift = float(np.hypot(*(a - b)[0]))
        safe = nom if nom > 0 else math.inf
        out.append(PartStats(
            id=int(pid), nominal_mm2=nom,
            printed_fraction=float(printed_in[pid]) / safe,
            excess_fraction=float(excess_mm2[pid]) / safe if pid < len(excess_mm2) else 0.0,
            centroid_shift_mm=shift,
            classes={name: float(v[pid]) / safe for name, v in class_fr.items()},
        ))
    return out


def _centroids(
    labels: Labels, mask: BoolArray | None, area: npt.NDArray[np.float32], n: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Area-weighted centroid (x, y) in image px per label, and the weight; (n, 2), (n,)."""
    sel = labels > 0 if mask is None else mask & (labels > 0)
    ys, xs = np.nonzero(sel)
    lab, w = labels[ys, xs], area[ys, xs].astype(np.float64)
    wsum = np.bincount(lab, weights=w, minlength=n).astype(np.float64)
    cx = np.bincount(lab, weights=w * xs, minlength=n) / np.maximum(wsum, 1e-12)
    cy = np.bincount(lab, weights=w * ys, minlength=n) / np.maximum(wsum, 1e-12)
    return np.asarray(np.c_[cx, cy], np.float64), wsum
