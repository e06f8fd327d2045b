"""One layer's geometry from the config: the calibration for its image size, its nominal
slice, and the slice's part ids warped into the image's pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from monitor.config import CameraConfig, GeometryConfig
from monitor.geometry.calibration import Calibration
from monitor.geometry.slices import NominalSlice, NominalSlices


@dataclass(frozen=True)
class LayerGeometry:
    """What the config says about one image's geometry."""

    cal: Calibration
    nominal: NominalSlice | None  # in the nominal frame; None: no slice for this layer
    labels: npt.NDArray[np.int32] | None  # (H, W) part ids in image pixels, 0 = powder


def nominal_slices(camera: CameraConfig, geometry: GeometryConfig) -> NominalSlices | None:
    """The configured slice source, or None when `[geometry] nominal` is empty."""
    if not geometry.nominal:
        return None
    return NominalSlices(geometry.nominal, layer_thickness_mm=camera.layer_thickness_mm,
                         frame_mm=geometry.frame_mm, frame_px=geometry.frame_px)


def layer_geometry(
    camera: CameraConfig,
    geometry: GeometryConfig,
    slices: NominalSlices | None,
    *,
    build: str,
    layer: int,
    stem: str,
    image_shape: tuple[int, int],
) -> LayerGeometry:
    """Calibration and nominal slice of one layer image of (H, W) pixels.

    The frame's size is `geometry.frame_px`, else the mask slice's, else the image's; its
    mm are `geometry.frame_mm`, else the image at `camera.pixel_size_mm`.
    """
    h, w = int(image_shape[0]), int(image_shape[1])
    nominal = None if slices is None else slices.get(build, layer, stem=stem,
                                                     image_size=(w, h))
    frame_px = geometry.frame_px or (nominal.frame_px if nominal is not None else (w, h))
    cal = Calibration.from_corners(camera.plate_corners_px, image_size=(w, h),
                                   frame_px=frame_px, frame_mm=geometry.frame_mm,
                                   pixel_size_mm=camera.pixel_size_mm)
    labels = None if nominal is None else cal.frame_to_image_labels(nominal.labels, (h, w))
    return LayerGeometry(cal, nominal, labels)
