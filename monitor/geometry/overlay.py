"""camera-check: the nominal frame and a layer's nominal outlines drawn on the photo, so a
user checks the calibration by eye."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from monitor.geometry.calibration import Calibration
from monitor.geometry.slices import NominalSlice
from monitor.vision.imaging import decode


def camera_check_overlay(
    image: npt.NDArray[np.generic] | Path,
    cal: Calibration,
    nominal: NominalSlice | None,
    *,
    printed: npt.NDArray[np.bool_] | None = None,
) -> npt.NDArray[np.uint8]:
    """(H, W, 3) BGR: the photo, the frame's outline (yellow, its top-left corner marked),
    each nominal part's outline (red) and id, and the printed area's outline (green)."""
    if isinstance(image, Path):
        image = decode(image.read_bytes())  # as the daemon decodes it: (H, W) float in [0, 1]
    img = np.asarray(image)
    if img.dtype != np.uint8:
        lo, hi = float(img.min()), float(img.max())
        img = ((img - lo) / max(hi - lo, 1e-9) * 255).astype(np.uint8)
    out = np.asarray(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else img.copy(),
                     np.uint8)
    thick = max(1, round(max(out.shape[:2]) / 1000))
    fw, fh = cal.frame_px
    corners = cal.to_image([[0, 0], [fw, 0], [fw, fh], [0, fh]])
    cv2.polylines(out, [np.round(corners).astype(np.int32)], True, (0, 255, 255), thick)
    cv2.circle(out, tuple(int(v) for v in np.round(corners[0])), 6 * thick, (0, 255, 255), -1)
    if nominal is not None:
        labels = cal.frame_to_image_labels(nominal.labels, out.shape[:2])
        _outline(out, labels > 0, (0, 0, 255), thick)
        for pid in np.unique(labels[labels > 0]).tolist():
            ys, xs = np.nonzero(labels == pid)
            cv2.putText(out, str(pid), (int(xs.mean()), int(ys.mean())),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, (0, 0, 255), thick)
    if printed is not None:
        _outline(out, printed, (0, 255, 0), thick)
    return out


def _outline(out: npt.NDArray[np.uint8], mask: npt.NDArray[np.bool_],
             color: tuple[int, int, int], thick: int) -> None:
    cnts, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, cnts, -1, color, thick)
