"""Camera calibration: the homography between the camera image and the nominal frame.

The nominal frame is the rectangle the slices are drawn in: `frame_px` pixels wide and high,
covering `frame_mm` = (x0, y0, w, h) of the machine's plate. Its corners (0, 0), (W, 0),
(W, H), (0, H) appear in the camera image at `plate_corners_px` (clockwise from top-left).
Without corners the frame is the whole image. An oblique camera has no single pixel size,
so areas in mm² come from the homography's Jacobian at each pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

# Frame pixel (col, row) -> machine mm: x grows with col, y grows upward (rows go down).
Corners = Sequence[Sequence[float]]


class Calibration:
    """Image <-> nominal frame <-> plate mm, for one camera and image size."""

    def __init__(
        self,
        image_to_frame: npt.ArrayLike,
        *,
        frame_px: tuple[int, int],
        frame_mm: tuple[float, float, float, float],
    ) -> None:
        h = np.asarray(image_to_frame, dtype=np.float64).reshape(3, 3)
        self.image_to_frame: FloatArray = h / h[2, 2]
        self.frame_to_image: FloatArray = np.linalg.inv(self.image_to_frame)
        self.frame_px = (int(frame_px[0]), int(frame_px[1]))  # (W, H)
        self.frame_mm = tuple(float(v) for v in frame_mm)
        # mm per frame pixel along x and y
        self.mm_per_px = (self.frame_mm[2] / self.frame_px[0], self.frame_mm[3] / self.frame_px[1])
        self._area_maps: dict[tuple[int, int], npt.NDArray[np.float32]] = {}

    @classmethod
    def from_corners(
        cls,
        corners_px: Corners | None,
        *,
        image_size: tuple[int, int],
        frame_px: tuple[int, int],
        frame_mm: Sequence[float] | None = None,
        pixel_size_mm: float = 0.1,
    ) -> Calibration:
        """From the four plate corners in the image (None: the frame spans the image).

        Args:
            corners_px: [[x, y]] x 4, clockwise from top-left, where the frame's corners
                appear in the image; None maps the frame onto the whole image.
            image_size: (width, height) of the camera image.
            frame_px: (width, height) of the nominal frame in pixels.
            frame_mm: (x0, y0, w, h) of the frame on the plate in mm; None: the image at
                `pixel_size_mm` per pixel (only meaningful without corners).
        """
        iw, ih = image_size
        if corners_px is None:
            src = np.array([[0, 0], [iw, 0], [iw, ih], [0, ih]], np.float32)
        else:
            src = np.asarray(corners_px, dtype=np.float32).reshape(4, 2)
        fw, fh = frame_px
        dst = np.array([[0, 0], [fw, 0], [fw, fh], [0, fh]], np.float32)
        h = cv2.getPerspectiveTransform(src, dst)
        if frame_mm is None:
            frame_mm = (0.0, 0.0, iw * pixel_size_mm, ih * pixel_size_mm)
        x0, y0, w, hh = (float(v) for v in frame_mm)
        return cls(h, frame_px=frame_px, frame_mm=(x0, y0, w, hh))

    @staticmethod
    def _apply(h: FloatArray, points: npt.ArrayLike) -> FloatArray:
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        q = np.c_[p, np.ones(len(p))] @ h.T
        return np.asarray(q[:, :2] / q[:, 2:3], np.float64)  # (N, 2)

    def to_frame(self, points_px: npt.ArrayLike) -> FloatArray:
        """Image (x, y) -> nominal frame (col, row), (N, 2)."""
        return self._apply(self.image_to_frame, points_px)

    def to_image(self, points_frame: npt.ArrayLike) -> FloatArray:
        """Nominal frame (col, row) -> image (x, y), (N, 2)."""
        return self._apply(self.frame_to_image, points_frame)

    def frame_to_mm(self, points_frame: npt.ArrayLike) -> FloatArray:
        """Frame (col, row) -> plate (x, y) in mm; y grows upward, the frame's top is y0 + h."""
        p = np.asarray(points_frame, dtype=np.float64).reshape(-1, 2)
        x0, y0, _, h = self.frame_mm
        return np.asarray(np.c_[x0 + p[:, 0] * self.mm_per_px[0],
                                y0 + h - p[:, 1] * self.mm_per_px[1]], np.float64)

    def mm_to_frame(self, points_mm: npt.ArrayLike) -> FloatArray:
        """Plate (x, y) in mm -> frame (col, row)."""
        p = np.asarray(points_mm, dtype=np.float64).reshape(-1, 2)
        x0, y0, _, h = self.frame_mm
        return np.asarray(np.c_[(p[:, 0] - x0) / self.mm_per_px[0],
                                (y0 + h - p[:, 1]) / self.mm_per_px[1]], np.float64)

    def image_to_mm(self, points_px: npt.ArrayLike) -> FloatArray:
        """Image (x, y) -> plate (x, y) in mm, (N, 2)."""
        return self.frame_to_mm(self.to_frame(points_px))

    def pixel_area_mm2(self, shape: tuple[int, int]) -> npt.NDArray[np.float32]:
        """(H, W) map: the plate area in mm² each image pixel covers (cached per shape).

        The Jacobian determinant of (x, y) -> H(x, y) is det(H) / w³, w the third
        homogeneous coordinate, evaluated at pixel centres.
        """
        key = (int(shape[0]), int(shape[1]))
        if key not in self._area_maps:
            h = self.image_to_frame
            ys = np.arange(key[0], dtype=np.float64)[:, None]
            xs = np.arange(key[1], dtype=np.float64)[None, :]
            w = h[2, 0] * xs + h[2, 1] * ys + h[2, 2]
            det = abs(np.linalg.det(h)) / np.abs(w) ** 3
            mm2 = self.mm_per_px[0] * self.mm_per_px[1]
            self._area_maps[key] = (det * mm2).astype(np.float32)
        return self._area_maps[key]

    def area_mm2(self, mask: npt.NDArray[np.bool_]) -> float:
        """Plate area in mm² of a boolean mask in image pixels."""
        return float(self.pixel_area_mm2(mask.shape[:2])[mask].sum(dtype=np.float64))

    def frame_to_image_labels(
        self, labels: npt.NDArray[np.integer], image_shape: tuple[int, int]
    ) -> npt.NDArray[np.int32]:
        """Warp a label map in the frame into image pixels (nearest: ids stay ids)."""
        out = cv2.warpPerspective(
            # warpPerspective takes no int32: ids fit uint16 (65535 parts) or float32
            labels.astype(np.uint16 if int(labels.max(initial=0)) < 65536 else np.float32),
            self.frame_to_image, (int(image_shape[1]), int(image_shape[0])),
            flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0,
        )
        return np.asarray(out, dtype=np.int32)

    def image_to_frame_image(self, image: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Warp a camera image into the nominal frame (for overlays and checks)."""
        return np.asarray(cv2.warpPerspective(np.asarray(image), self.image_to_frame, self.frame_px,
                                              flags=cv2.INTER_LINEAR))
