"""Nominal slices: each layer's expected part area, as part ids in the nominal frame.

`[geometry] nominal` is a path template with `{build}`, `{layer}` and `{stem}` (the image
file name without extension), e.g. `nominal/{build}/layer_{layer:05d}.png`. By suffix:
- a mask image (png, tif, bmp, jpg), nonzero = part, drawn in the nominal frame;
- a Common Layer Interface file (.cli) per build;
- a mesh per build (.stl, .3mf, .obj, .ply), sliced with trimesh at each layer's height.
Vector sources are placed by `frame_mm` = (x0, y0, w, h): machine x grows with the frame's
columns, machine y upward (the frame's top row is y0 + h), and filled into `frame_px`.

Part ids are stable across layers: CLI polyline ids; mesh bodies (connected components,
numbered from 1 in file order); for masks, each connected region takes the id that most of
its pixels had in the build's earlier layers (a map of the last id seen at each pixel), else
a new one, so a part keeps its id while it grows, shrinks or shifts a little.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from monitor.geometry.cli_format import OPEN, CliLayer, SliceError, read_cli

__all__ = ["NominalSlice", "NominalSlices", "SliceError", "fill_polygons", "source_kind"]

log = logging.getLogger(__name__)

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
CLI_SUFFIXES = (".cli",)
MESH_SUFFIXES = (".stl", ".3mf", ".obj", ".ply")
Labels = npt.NDArray[np.int32]


@dataclass(frozen=True)
class NominalSlice:
    """One layer's nominal parts in the nominal frame."""

    labels: Labels  # (H, W) 0 = powder, > 0 = part id

    @property
    def frame_px(self) -> tuple[int, int]:
        return (self.labels.shape[1], self.labels.shape[0])


def source_kind(template: str) -> str:
    """'mask', 'cli' or 'mesh' from the template's suffix."""
    suffix = Path(template).suffix.lower()
    if suffix in MASK_SUFFIXES:
        return "mask"
    if suffix in CLI_SUFFIXES:
        return "cli"
    if suffix in MESH_SUFFIXES:
        return "mesh"
    raise SliceError(f"geometry.nominal: unknown file type {suffix!r}; expected one of "
                     f"{', '.join(MASK_SUFFIXES + CLI_SUFFIXES + MESH_SUFFIXES)}")


def fill_polygons(
    polygons: dict[int, list[npt.NDArray[np.float64]]],
    *,
    frame_mm: Sequence[float],
    frame_px: tuple[int, int],
) -> Labels:
    """Fill each id's closed contours (mm) into a label map; even-odd: holes stay empty.

    A pixel is inside when most of it is: each part is drawn 4x finer in its bounding box
    and averaged down (OpenCV alone also sets every pixel the outline touches, +5% area
    for a 20 mm square at 0.5 mm pixels).
    """
    x0, y0, w, h = (float(v) for v in frame_mm)
    fw, fh = frame_px
    labels = np.zeros((fh, fw), np.int32)
    ss, shift = 4, 4  # supersampling; fixed-point bits of the vertices
    for pid in sorted(polygons):
        rings = [np.c_[(p[:, 0] - x0) / w * fw, (y0 + h - p[:, 1]) / h * fh]
                 for p in polygons[pid]]
        if not rings:
            continue
        allp = np.concatenate(rings)
        c0 = max(0, int(np.floor(allp[:, 0].min())))
        r0 = max(0, int(np.floor(allp[:, 1].min())))
        c1 = min(fw, int(np.ceil(allp[:, 0].max())) + 1)
        r1 = min(fh, int(np.ceil(allp[:, 1].max())) + 1)
        if c1 <= c0 or r1 <= r0:
            continue
        fine = np.zeros(((r1 - r0) * ss, (c1 - c0) * ss), np.uint8)
        pts = [np.round(((q - [c0, r0]) * ss - 0.5) * (1 << shift)).astype(np.int32)
               for q in rings]
        cv2.fillPoly(fine, pts, 255, lineType=cv2.LINE_8, shift=shift)  # even-odd fill
        cover = cv2.resize(fine, (c1 - c0, r1 - r0), interpolation=cv2.INTER_AREA)
        labels[r0:r1, c0:c1][cover >= 128] = pid
    return labels


class _MaskIds:
    """Stable part ids for mask slices of one build (see the module docstring)."""

    def __init__(self) -> None:
        self.seen: Labels | None = None
        self.next_id = 1

    def assign(self, part: npt.NDArray[np.bool_]) -> Labels:
        if self.seen is None or self.seen.shape != part.shape:
            self.seen = np.zeros(part.shape, np.int32)
        n, comp = cv2.connectedComponents(part.view(np.uint8) if part.dtype == np.bool_
                                          else part.astype(np.uint8), connectivity=8,
                                          ltype=cv2.CV_32S)
        # Each region's most common earlier id, from the (region, earlier id) pairs of the
        # pixels that had one: one pass over the part pixels, not one per region.
        hit = np.flatnonzero(comp)
        region, prev = comp.ravel()[hit], self.seen.ravel()[hit]
        had = prev > 0
        region, prev = region[had], prev[had]
        new_id = np.zeros(n, np.int32)
        if region.size:
            width = int(prev.max()) + 1
            key = region.astype(np.int64) * width + prev
            if n * width <= 1 << 22:  # a dense table while it stays small
                counts = np.bincount(key, minlength=n * width).reshape(n, width)
                best = counts.argmax(1)
                found = counts[np.arange(n), best] > 0
                new_id[found] = best[found]
            else:
                pairs, votes = np.unique(key, return_counts=True)
                # sorted by votes, then id descending: each region's last pair is its
                # most common id, the lowest on a tie (as argmax on the dense table)
                order = np.lexsort((-pairs, votes))
                new_id[pairs[order] // width] = (pairs[order] % width).astype(np.int32)
        for k in np.flatnonzero(new_id[1:] == 0) + 1:  # regions new to the build, in order
            new_id[k], self.next_id = self.next_id, self.next_id + 1
        labels: Labels = new_id[comp]
        np.copyto(self.seen, labels, where=labels > 0)
        return labels


class _Mesh:
    """A build's mesh, split into bodies, sliced per layer with trimesh."""

    def __init__(self, path: Path) -> None:
        import trimesh  # imported here: only mesh sources need it

        try:
            mesh: Any = trimesh.load(str(path), force="mesh")
        except Exception as e:  # trimesh raises many types for a bad file
            raise SliceError(f"{path}: cannot read mesh: {e}") from e
        self.bodies = list(mesh.split(only_watertight=False)) or [mesh]

    def section(self, z: float) -> dict[int, list[npt.NDArray[np.float64]]]:
        out: dict[int, list[npt.NDArray[np.float64]]] = {}
        for i, body in enumerate(self.bodies, start=1):
            lo, hi = body.bounds[0][2], body.bounds[1][2]
            if not lo < z < hi:
                continue
            path = body.section(plane_origin=[0.0, 0.0, z], plane_normal=[0.0, 0.0, 1.0])
            if path is None:
                continue
            out[i] = [np.asarray(d, np.float64)[:, :2] for d in path.discrete if len(d) >= 3]
        return out


class NominalSlices:
    """Nominal slices of every build from the path template; a build file is read once."""

    def __init__(
        self,
        template: str,
        *,
        layer_thickness_mm: float,
        frame_mm: Sequence[float] | None = None,
        frame_px: tuple[int, int] | None = None,
        cache_builds: int = 4,
    ) -> None:
        self.template = template
        self.kind = source_kind(template)
        if self.kind != "mask" and frame_mm is None:
            raise SliceError("geometry.frame_mm is required for CLI and mesh slices: the "
                             "plate area [x0, y0, w, h] in mm that the nominal frame covers")
        self.thickness = layer_thickness_mm
        self.frame_mm = frame_mm
        self.frame_px = frame_px
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_builds = cache_builds

    def path(self, build: str, layer: int, stem: str = "") -> Path:
        try:
            return Path(self.template.format(build=build, layer=layer, stem=stem))
        except (KeyError, IndexError, ValueError) as e:
            raise SliceError(f"geometry.nominal: bad template {self.template!r}: {e}; fields "
                             "are {build}, {layer} and {stem}") from e

    def _build_state(self, build: str, factory: Any) -> Any:
        if build in self._cache:
            self._cache.move_to_end(build)
            return self._cache[build]
        state = factory()
        self._cache[build] = state
        while len(self._cache) > self._cache_builds:
            self._cache.popitem(last=False)
        return state

    def get(
        self, build: str, layer: int, *, stem: str = "", image_size: tuple[int, int] | None = None
    ) -> NominalSlice | None:
        """The layer's slice, or None when there is none (the caller logs and goes on).

        Args:
            image_size: (width, height) of the camera image: the frame size of vector
                slices when `frame_px` is not set.
        """
        path = self.path(build, layer, stem)
        if self.kind == "mask":
            if not path.is_file():
                return None
            raw = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if raw is None:
                raise SliceError(f"{path}: cannot decode the nominal mask")
            ids: _MaskIds = self._build_state(build, _MaskIds)
            return NominalSlice(ids.assign(raw > 0))
        if not path.is_file():
            return None
        frame_px = self.frame_px or image_size
        if frame_px is None:
            raise SliceError("geometry.frame_px is needed to draw vector slices")
        assert self.frame_mm is not None  # checked in __init__
        if self.kind == "cli":
            layers: list[CliLayer] = self._build_state(build, lambda: read_cli(path))
            polys = self._cli_layer(layers, layer)
        else:
            mesh: _Mesh = self._build_state(build, lambda: _Mesh(path))
            # the middle of the layer: its top is a face of every part that ends there
            polys = mesh.section((layer - 0.5) * self.thickness)
        if polys is None:
            return None
        return NominalSlice(fill_polygons(polys, frame_mm=self.frame_mm, frame_px=frame_px))

    def _cli_layer(
        self, layers: list[CliLayer], layer: int
    ) -> dict[int, list[npt.NDArray[np.float64]]] | None:
        if not layers:
            return None
        z = layer * self.thickness
        best = min(layers, key=lambda c: abs(c.z_mm - z))
        if abs(best.z_mm - z) > self.thickness / 2 + 1e-9:
            return None
        out: dict[int, list[npt.NDArray[np.float64]]] = {}
        for pl in best.polylines:
            if pl.dir != OPEN and len(pl.points) >= 3:
                out.setdefault(pl.id, []).append(pl.points)
        return out
