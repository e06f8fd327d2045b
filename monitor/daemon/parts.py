"""The geometry step: a layer against its nominal slice -> per-part statistics, and the
parts' zone (the nominal parts grown by the tolerance) that `scope = "parts"` rules count
defects in. Classes that are melt outside the part by definition (`outside_classes`,
misprint) are counted as the slice allows them: not deep inside a part, and out to
`outside_reach_mm` around it.

One `PartMeter` per printer, built once from its `[camera]` and `[geometry]`. The step is in
two halves: `prepare` (the slice, its registration and the printed area: all the image
needs) runs on the `GeometryAhead` thread while the model segments the same layer, and
`finish` (per-part statistics, which need the model's masks) runs on the analyser. A layer
without a slice, or whose slice cannot be read, is analysed as if no slices were configured
(logged once per layer).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from monitor.alarms.regions import BuildRegions, region_stats
from monitor.config import CameraConfig, Config, GeometryConfig
from monitor.errors import ConfigError
from monitor.geometry.calibration import Calibration
from monitor.geometry.parts import PartZones, disk, tolerance_px
from monitor.geometry.printed import PrintedParams, printed_area
from monitor.geometry.reading import read_layer
from monitor.geometry.slices import NominalSlices, SliceError
from monitor.geometry.stray import stray_tracks
from monitor.records import PartRecord
from monitor.vision.stats import NO_DEFECT, LayerStats

log = logging.getLogger(__name__)

GEOMETRY_NICE = 10  # added to the geometry thread's nice value

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class LayerParts:
    """One layer measured against its nominal slice."""

    parts: tuple[PartRecord, ...]
    zone: BoolArray  # (H, W) the nominal parts grown by tolerance_mm, image pixels
    labels: npt.NDArray[np.integer] | None = None  # (H, W) nominal part ids, 0 outside
    calibration: Calibration | None = None  # image pixels <-> plate mm
    # geometry.outside_classes as the parts count them (class -> (H, W) mask: see
    # outside_only), and where: the parts grown by geometry.outside_reach_mm
    outside: Mapping[str, BoolArray] = field(default_factory=dict)
    near: BoolArray | None = None
    # the model's masks read against the slice (monitor.geometry.reading: swelling or
    # over-melting by the outline, under- and over-melting against their own part, outside
    # thresholds and stray scan tracks beyond the parts); None when that changed nothing
    masks: BoolArray | None = None

    def zone_stats(self, masks: BoolArray, class_names: Sequence[str], *,
                   pixel_size_mm: float, max_components: int) -> LayerStats:
        """Statistics of the defects on and around the parts (area fractions of the zone,
        as for a part region), counted as the parts count them."""
        st = region_stats(masks, class_names, BuildRegions(None, {"": self.zone}),
                          pixel_size_mm=pixel_size_mm, max_components=max_components)[""]
        names = [c for c in class_names if c in self.outside]
        if self.near is None or not names:
            return st
        far = region_stats(np.stack([self.outside[c] for c in names]), names,
                           BuildRegions(None, {"": self.near}), pixel_size_mm=pixel_size_mm,
                           max_components=max_components)[""]
        return LayerStats(st.width, st.height, {**st.classes, **far.classes})

    def part_at(self, x: float, y: float) -> int | None:
        """The nominal part whose zone holds image point (x, y), if any."""
        if self.labels is None:
            return None
        h, w = self.labels.shape
        xi, yi = min(max(int(x), 0), w - 1), min(max(int(y), 0), h - 1)
        pid = int(self.labels[yi, xi])
        if pid:
            return pid
        if not self.zone[yi, xi]:
            return None
        r = 8  # inside the tolerance zone but off the nominal: the nearest part around
        win = self.labels[max(yi - r, 0):yi + r + 1, max(xi - r, 0):xi + r + 1]
        ids = win[win > 0]
        return int(np.bincount(ids).argmax()) if ids.size else None


@dataclass(frozen=True)
class Prepared:
    """What a layer's geometry needs of the image alone, computed ahead of the model."""

    labels: npt.NDArray[np.int32]  # (H, W) nominal part ids in image pixels, 0 outside
    calibration: Calibration
    printed: BoolArray  # (H, W) freshly melted pixels
    parts: PartZones  # the parts against the printed area; the classes are counted later
    zone: BoolArray  # (H, W) the nominal parts grown by tolerance_mm
    core: BoolArray  # (H, W) the nominal parts shrunk by tolerance_mm
    near: BoolArray | None  # (H, W) the nominal parts grown by outside_reach_mm
    tracks: BoolArray | None = None  # (H, W) stray scan tracks beyond the tolerance zone
    gray: npt.NDArray[np.generic] | None = None  # the layer (geometry.relative_k)


@dataclass(frozen=True)
class _Placed:
    """A layer's slice in the image: all of its geometry that needs no image."""

    labels: npt.NDArray[np.int32]  # (H, W) nominal part ids in image pixels, 0 outside
    calibration: Calibration
    tolerance_px: int
    stamp: tuple[int, int] | None  # the slice file's (mtime_ns, size) when it was read
    core: BoolArray  # (H, W) the nominal parts shrunk by the tolerance
    near: BoolArray | None  # (H, W) the nominal parts grown by outside_reach_mm


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


class PartMeter:
    """Nominal slices and calibrations of one printer (cached per image and frame size)."""

    def __init__(self, camera: CameraConfig, geometry: GeometryConfig) -> None:
        self.camera = camera
        self.geometry = geometry
        self.slices = NominalSlices(geometry.nominal,
                                    layer_thickness_mm=camera.layer_thickness_mm,
                                    frame_mm=geometry.frame_mm, frame_px=geometry.frame_px)
        self.params = PrintedParams(smooth_px=geometry.printed_smooth_px,
                                    min_separation=geometry.printed_min_separation)
        self._cals: dict[tuple[tuple[int, int], tuple[int, int]], Calibration] = {}
        self._told: set[tuple[str, int]] = set()  # layers already logged without a slice
        # the next layer's slice, placed while the printer recoats (see prefetch)
        self._next: tuple[tuple[str, int, tuple[int, int]], _Placed] | None = None
        self._latest: dict[str, int] = {}  # per build, the last layer prepared

    def calibration(self, image_size: tuple[int, int], frame_px: tuple[int, int]
                    ) -> Calibration:
        """The camera's calibration for an image (width, height) and frame size."""
        key = (image_size, frame_px)
        cal = self._cals.get(key)
        if cal is None:
            if len(self._cals) > 16:  # sizes change rarely; keep the cache small
                self._cals.clear()
            cal = self._cals[key] = Calibration.from_corners(
                self.camera.plate_corners_px, image_size=image_size, frame_px=frame_px,
                frame_mm=self.geometry.frame_mm, pixel_size_mm=self.camera.pixel_size_mm)
        return cal

    def _place(self, build: str, layer: int, stem: str, size: tuple[int, int]
               ) -> _Placed | None:
        """Read the layer's slice and warp it into the image; None when it has none."""
        stamp = _stamp(self.slices.path(build, layer, stem))  # before reading: see prefetch
        nominal = self.slices.get(build, layer, stem=stem, image_size=size)
        if nominal is None:
            return None
        cal = self.calibration(size, nominal.frame_px)
        labels = cal.frame_to_image_labels(nominal.labels, (size[1], size[0]))
        tol = tolerance_px(cal, labels, self.geometry.tolerance_mm)
        part = labels > 0
        near = None
        if self.geometry.outside_classes or self.geometry.reach_classes or \
                self.geometry.stray_track_z > 0:
            # never less than the zone the others count in
            near = _grown(part, max(tol, tolerance_px(cal, labels,
                                                      self.geometry.outside_reach_mm)))
        return _Placed(labels, cal, tol, stamp, _core(part, tol), near)

    def prefetch(self, build: str, layer: int, size: tuple[int, int]) -> None:
        """Place a layer's slice before its image comes, in the printer's recoating time:
        reading, numbering and warping it is a quarter of the geometry's work. Kept only
        while the slice file is unchanged; not done for a `{stem}` template (the next
        image's name is unknown) or a layer already prepared."""
        if "{stem" in self.slices.template or layer <= self._latest.get(build, 0):
            return
        try:
            placed = self._place(build, layer, "", size)
        except SliceError:
            return  # said when the layer comes
        if placed is not None:
            self._next = ((build, layer, size), placed)

    def _placed(self, build: str, layer: int, stem: str, size: tuple[int, int]
                ) -> _Placed | None:
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == (build, layer, size) and \
                ahead[1].stamp == _stamp(self.slices.path(build, layer, stem)):
            return ahead[1]
        return self._place(build, layer, stem, size)

    def prepare(self, build: str, layer: int, *, path: Path, gray: npt.NDArray[np.generic]
                ) -> Prepared | None:
        """The layer's slice in image pixels and its printed area; None without a slice."""
        h, w = gray.shape[:2]
        self._latest[build] = max(layer, self._latest.get(build, 0))
        if len(self._latest) > 1000:  # builds come and go; a few are live at a time
            self._latest = {build: layer}
        try:
            placed = self._placed(build, layer, path.stem, (w, h))
        except SliceError as e:
            log.warning("layer %s/%d: nominal slice unusable, analysed without it: %s",
                        build, layer, e)
            return None
        if placed is None:
            if (build, layer) not in self._told:
                if len(self._told) > 100_000:
                    self._told.clear()
                self._told.add((build, layer))
                log.info("no nominal slice for %s/%d (%s); analysed without part statistics",
                         build, layer, self.slices.path(build, layer, path.stem))
            return None
        labels, cal, tol = placed.labels, placed.calibration, placed.tolerance_px
        # grey levels 0-255 whatever the file's depth: the printed-area texture floor is in them
        printed = printed_area(np.asarray(gray, np.float32) * np.float32(255), labels > 0,
                               tolerance_px=tol, params=self.params).mask
        parts = PartZones.measure(labels, printed, cal, tol_px=tol,
                                  excess_margin_px=self.params.bleed_px)
        zone = parts.zone_mask()
        tracks = None
        if placed.near is not None and self.geometry.stray_track_z > 0:
            tracks = stray_tracks(gray, placed.near & ~zone, z_min=self.geometry.stray_track_z)
        return Prepared(labels, cal, printed, parts, zone, placed.core, placed.near, tracks,
                        gray if self.geometry.relative_k > 0 else None)

    def finish(self, prep: Prepared, masks: BoolArray, class_names: Sequence[str],
               loose: Mapping[int, BoolArray] | None = None, *,
               ignore: BoolArray | None = None) -> LayerParts:
        """Per-part statistics from a prepared layer and the model's masks ((C, H, W) in
        `class_names` order, after ignore regions) read against the slice first (the
        result's `masks`; monitor.geometry.reading): swelling and over-melting told apart by
        the outline, the Segmenter's `loose` marks kept beyond the tolerance zone, and stray
        scan tracks there marked misprint (outside the `ignore` region)."""
        zone = None if prep.near is None or not loose else prep.near & ~prep.zone
        tracks = prep.tracks
        if tracks is not None and ignore is not None:
            tracks = tracks & ~ignore
        read = read_layer(masks, class_names, prep.labels > 0,
                          swelling_reach_px=self.geometry.swelling_reach_px, loose=loose,
                          zone=zone, tracks=tracks, gray=prep.gray,
                          relative_k=self.geometry.relative_k)
        if read is not None:
            masks = read
        outside = outside_only(masks, class_names, prep.labels, prep.core,
                               self.geometry.outside_classes)
        # counted out to the reach too, every mark kept (a distorted part's swelling)
        outside.update({c: masks[class_names.index(c)] for c in self.geometry.reach_classes
                        if c in class_names and c not in outside})
        classes = {name: outside.get(name, masks[i]) for i, name in enumerate(class_names)
                   if name != NO_DEFECT}
        stats = prep.parts.stats(classes)
        parts = tuple(PartRecord(id=p.id, nominal_mm2=p.nominal_mm2,
                                 printed_fraction=p.printed_fraction,
                                 excess_fraction=p.excess_fraction,
                                 centroid_shift_mm=p.centroid_shift_mm,
                                 classes=dict(p.classes), width_px=p.width_px)
                      for p in stats)
        return LayerParts(parts, prep.zone, prep.labels, prep.calibration, outside,
                          prep.near, read)

    def measure(self, build: str, layer: int, *, path: Path, gray: npt.NDArray[np.generic],
                masks: BoolArray, class_names: Sequence[str],
                loose: Mapping[int, BoolArray] | None = None,
                ignore: BoolArray | None = None) -> LayerParts | None:
        """Both halves at once (tools and tests); None when the layer has no usable slice."""
        prep = self.prepare(build, layer, path=path, gray=gray)
        return None if prep is None else self.finish(prep, masks, class_names, loose,
                                                     ignore=ignore)


def check_outside_classes(cfg: Config, class_names: Sequence[str]) -> None:
    """geometry.outside_classes and reach_classes written in the config must be classes of
    the weights (the built-in defaults name misprint and swelling, which weights of other
    classes may lack: skipped)."""
    for i, p in enumerate(cfg.fleet()):
        for key in ("outside_classes", "reach_classes"):
            if key not in p.geometry.model_fields_set:
                continue
            for c in getattr(p.geometry, key):
                if c not in class_names:
                    where = f"printers[{i}]." if cfg.printers else ""
                    raise ConfigError(f"{where}geometry.{key}: unknown class {c!r}; the "
                                      f"weights' classes are {', '.join(class_names)}")


def _core(part: BoolArray, tol_px: int) -> BoolArray:
    """The parts shrunk by the tolerance: what lies this deep inside is the part whatever
    the registration's error."""
    if tol_px <= 0 or not part.any():
        return part
    return cv2.erode(part.view(np.uint8), disk(tol_px)).view(bool)


def _grown(part: BoolArray, r_px: int) -> BoolArray:
    """The parts grown by about r_px: a distance transform on a grid of r_px / 8 cells
    (the reach needs no pixel precision; at full size it costs 10x more)."""
    if r_px <= 0 or not part.any():
        return part
    f = max(1, r_px // 8)
    h, w = part.shape
    cells = cv2.resize(part.view(np.uint8), (-(-w // f), -(-h // f)),
                       interpolation=cv2.INTER_AREA) > 0  # any part pixel in the cell
    d = cv2.distanceTransform((~cells).view(np.uint8), cv2.DIST_L2, 3)
    near = cv2.resize((d <= r_px / f).view(np.uint8), (w, h),
                      interpolation=cv2.INTER_NEAREST).view(bool)
    return near | part


def outside_only(masks: BoolArray, class_names: Sequence[str], labels: npt.NDArray[np.integer],
                 core: BoolArray, outside: Sequence[str]) -> dict[str, BoolArray]:
    """The masks of the `outside` classes (melt outside the part by definition) as the
    slice allows them: never in the parts' core, and only in components that reach beyond
    the nominal outline. Class -> (H, W) mask, for those of `class_names` in `outside`."""
    out = {}
    for i, c in enumerate(class_names):
        if c not in outside:
            continue
        m = masks[i] & ~core
        x, y, w, h = cv2.boundingRect(m.view(np.uint8))
        if w:
            box = m[y:y + h, x:x + w]
            n, comp = cv2.connectedComponents(box.view(np.uint8), connectivity=8)
            reaches = np.zeros(n, bool)
            reaches[np.unique(comp[box & (labels[y:y + h, x:x + w] == 0)])] = True
            reaches[0] = False
            box[...] = reaches[comp]
        out[c] = m
    return out


def _yield_to_the_model() -> None:
    """Lower this thread's CPU priority (Linux schedules threads one by one): on a machine
    without a GPU the model and the geometry share the cores, and the layer waits for the
    model, while the geometry is done long before it is needed."""
    # not Linux, or not permitted: it runs at the model's priority
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), GEOMETRY_NICE)


class GeometryAhead:
    """One thread that owns the meters' slices and calibration caches and prepares each
    layer's geometry as soon as it is decoded, so that it overlaps the model instead of
    adding to a layer's latency after it."""

    def __init__(self, meters: Mapping[str, PartMeter]) -> None:
        self.meters = dict(meters)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="geometry",
                                        initializer=_yield_to_the_model)

    def submit(self, printer: str, build: str, layer: int, *, path: Path,
               gray: npt.NDArray[np.generic]) -> Future[Prepared | None] | None:
        meter = self.meters.get(printer)
        if meter is None:
            return None
        return self._pool.submit(meter.prepare, build, layer, path=path, gray=gray)

    def prefetch(self, printer: str, build: str, layer: int, size: tuple[int, int]) -> None:
        """Place the slice of the layer after `layer` while the printer recoats (any thread:
        the work is queued behind the layers already submitted)."""
        meter = self.meters.get(printer)
        if meter is not None:
            with contextlib.suppress(RuntimeError):  # shut down: nothing left to prefetch for
                self._pool.submit(meter.prefetch, build, layer + 1, size)

    def stop(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
