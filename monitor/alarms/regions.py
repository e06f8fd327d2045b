"""Regions of the build plate: ignore regions, and named part regions with their own statistics.

Ignore regions (the plate edge, the recoater parking zone) are cut out of every mask before
statistics, so nothing there counts or alarms. Part regions get per-class statistics of their
own, relative to the region's area, and alarm rules can target one. A region is a polygon in
pixels or mm, or a mask image per build (``{build}`` in its path).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from monitor.config import RegionConfig
from monitor.vision.stats import ClassStats, LayerStats, layer_stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildRegions:
    """The regions rasterised for one build and image size."""

    ignore: np.ndarray | None  # (H, W) bool, True = ignored; None = nothing ignored
    parts: dict[str, np.ndarray]  # name -> (H, W) bool, True = inside


class Regions:
    """Rasterises the configured regions per (build, image size), cached."""

    def __init__(self, regions: Sequence[RegionConfig], *, pixel_size_mm: float) -> None:
        self.regions = tuple(regions)
        self.pixel_size_mm = pixel_size_mm
        self._cache: dict[tuple[str, int, int], BuildRegions] = {}

    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.regions if r.kind == "part")

    def __bool__(self) -> bool:
        return bool(self.regions)

    def for_build(self, build: str, shape: tuple[int, int]) -> BuildRegions:
        key = (build, *shape)
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) > 64:  # builds come and go; keep the cache small
                self._cache.clear()
            hit = self._cache[key] = self._rasterise(build, shape)
        return hit

    def _rasterise(self, build: str, shape: tuple[int, int]) -> BuildRegions:
        ignore: np.ndarray | None = None
        parts: dict[str, np.ndarray] = {}
        for r in self.regions:
            m = self._mask(r, build, shape)
            if m is None:
                continue
            if r.kind == "ignore":
                ignore = m if ignore is None else ignore | m
            else:
                parts[r.name] = m
        return BuildRegions(ignore, parts)

    def _mask(self, r: RegionConfig, build: str, shape: tuple[int, int]) -> np.ndarray | None:
        h, w = shape
        if r.polygon:
            scale = 1.0 / self.pixel_size_mm if r.units == "mm" else 1.0
            pts = np.round(np.array(r.polygon, dtype=np.float64) * scale).astype(np.int32)
            canvas = np.zeros((h, w), np.uint8)
            cv2.fillPoly(canvas, [pts.reshape(-1, 1, 2)], 1)
            return canvas.astype(bool)
        why = unsafe_name(build)
        if why is not None:
            log.warning("region %s: build name %r %s, so it cannot name a mask file; region "
                        "skipped", r.name, build, why)
            return None
        path = Path(r.mask.replace("{build}", build))
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            log.warning("region %s: no readable mask %s for build %s; region skipped",
                        r.name, path, build)
            return None
        if img.shape != (h, w):
            # A mask drawn at another resolution of the same camera view: scale it.
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST)
        return img > 0


def unsafe_name(name: str) -> str | None:
    """Why a name (a build, from a folder or file name) cannot be put into a path, or None.

    A build named ``..`` (a pattern's group can capture anything) turned
    ``regions/{build}.png`` into a file outside the regions folder.
    """
    if not name:
        return "is empty"
    if "/" in name or "\\" in name or "\x00" in name:
        return "holds a path separator or NUL"
    if name in (".", ".."):
        return "is a relative path component"
    return None


def apply_ignore(masks: np.ndarray, regions: BuildRegions) -> np.ndarray:
    """(C, H, W) bool masks with the ignore regions cleared (a copy when anything changes)."""
    if regions.ignore is None:
        return masks
    out: np.ndarray = masks & ~regions.ignore[None]
    return out


def region_stats(
    masks: np.ndarray,
    class_names: Sequence[str],
    regions: BuildRegions,
    *,
    pixel_size_mm: float,
    max_components: int = 200,
) -> dict[str, LayerStats]:
    """Per part region, the statistics of the masks inside it.

    Area fractions are relative to the region's area, not the image's.
    """
    out: dict[str, LayerStats] = {}
    for name, inside in regions.parts.items():
        st = layer_stats(masks & inside[None], class_names, pixel_size_mm=pixel_size_mm,
                         max_components=max_components)
        area = int(np.count_nonzero(inside))
        total = masks.shape[1] * masks.shape[2]
        if area:
            scale = total / area
            st = LayerStats(st.width, st.height, {
                k: _rescaled(c, scale) for k, c in st.classes.items()
            })
        out[name] = st
    return out


def _rescaled(c: ClassStats, scale: float) -> ClassStats:
    return replace(c, area_fraction=min(1.0, c.area_fraction * scale))
