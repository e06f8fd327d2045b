"""Pure functions: per-class masks -> per-layer statistics and connected components."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cv2
import numpy as np

from monitor.vision.classes import NO_DEFECT as NO_DEFECT  # re-exported: stats treat it apart

T = TypeVar("T")

# NO_DEFECT covers the bed around and between the defects, one component about the size of
# the layer, so only its area is counted: labelling it took half the statistics time of a
# 2048 px layer and told nothing.
AREA_ONLY_METRICS = ("area_fraction", "area_mm2")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def per_class(fn: Callable[[int], T], n: int, pixels: int) -> list[T]:
    """[fn(0), ..., fn(n - 1)]. On large masks (`pixels` each) the calls run on a shared pool
    of threads: OpenCV's labelling releases the GIL, so classes are labelled in parallel."""
    global _pool
    workers = min(n, os.cpu_count() or 1)
    if workers < 2 or pixels < 1 << 20:
        return [fn(i) for i in range(n)]
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                       thread_name_prefix="stats")
    return list(_pool.map(fn, range(n)))


@dataclass(frozen=True)
class Component:
    """One 8-connected region of a class mask, in pixels."""

    x: int
    y: int
    w: int
    h: int
    area_px: int
    cx: float
    cy: float


@dataclass(frozen=True)
class ClassStats:
    name: str
    pixel_count: int
    area_fraction: float
    area_mm2: float
    components: int  # all of them, even if only the largest are listed; 0 for no_defect
    largest_component_px: int
    largest_component_mm2: float
    component_list: tuple[Component, ...] = field(default=(), repr=False)

    def summary(self) -> dict[str, Any]:
        """The per-class object of the `layer` message and reports."""
        return {
            "pixel_count": self.pixel_count,
            "area_fraction": self.area_fraction,
            "area_mm2": self.area_mm2,
            "components": self.components,
            "largest_component_px": self.largest_component_px,
            "largest_component_mm2": self.largest_component_mm2,
        }


@dataclass(frozen=True)
class LayerStats:
    width: int
    height: int
    classes: dict[str, ClassStats]

    def summary(self) -> dict[str, dict[str, Any]]:
        return {name: c.summary() for name, c in self.classes.items()}


@dataclass(frozen=True)
class Labels:
    """8-connected components of a mask, labelled inside the box around it."""

    labels: np.ndarray  # (h, w) int32 labels of the box
    stats: np.ndarray  # OpenCV's per-label x, y, w, h, area, in image coordinates
    centroids: np.ndarray  # per-label (x, y), in image coordinates
    box: tuple[int, int, int, int]  # x, y, w, h of the box in the image
    # For a sparse mask, its set pixels: x, y (in the box) and label, each (N,).
    pixels: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def keeping(self, mask: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """A copy of `mask` (the mask labelled) with only the components where `keep`, a
        bool per label, is True."""
        x, y, w, h = self.box
        if self.pixels is not None:  # sparse: clear just the pixels of dropped components
            xs, ys, lab = self.pixels
            gone = ~keep[lab]
            out = mask.copy()
            out[ys[gone] + y, xs[gone] + x] = False
            return out
        keep = keep.copy()
        keep[0] = False  # the background
        out = np.zeros_like(mask, dtype=bool)
        out[y:y + h, x:x + w] = keep[self.labels]
        return out

    def found(self, keep: np.ndarray | None = None) -> Found:
        """The components (those where `keep`, a bool per label, is True), for statistics."""
        if keep is None:
            return Found(self.stats, self.centroids)
        rows = keep.copy()
        rows[0] = True
        return Found(self.stats[rows], self.centroids[rows])


@dataclass(frozen=True)
class Found:
    """A mask's components as OpenCV reports them, the background's row first: what class
    statistics need. The small-component filter hands on what its labelling found, so the
    mask it leaves is not labelled twice."""

    stats: np.ndarray  # per component x, y, w, h, area, in image coordinates
    centroids: np.ndarray  # per component (x, y), in image coordinates


def label_components(mask: np.ndarray) -> Labels:
    """Label a (H, W) bool mask. Only the box around its pixels is labelled: defect masks
    are sparse, and labelling is a pass over every pixel it is given."""
    u8 = mask.view(np.uint8) if mask.dtype == np.bool_ else mask.astype(np.uint8)
    x, y, w, h = cv2.boundingRect(u8)
    box = np.ascontiguousarray(u8[y:y + h, x:x + w])
    pixels = None
    if cv2.countNonZero(box) * 50 < box.size:
        labels, st, centroids, pixels = _label_sparse(box)
    else:
        _, labels, st, centroids = cv2.connectedComponentsWithStats(
            box, connectivity=8, ltype=cv2.CV_32S)
    st[:, cv2.CC_STAT_LEFT] += x
    st[:, cv2.CC_STAT_TOP] += y
    return Labels(labels, st, centroids + np.array([x, y]), (x, y, w, h), pixels)


def _label_sparse(box: np.ndarray) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """connectedComponentsWithStats for a box that is mostly background (under 2% set).

    OpenCV's statistics visit every pixel, background included: a 1600 px box of spatter
    specks took 8 ms, of which labelling alone is 1 ms. Here they are gathered from the set
    pixels only (3 ms in all). Row 0 (the background) holds the box and its unset area.
    """
    n, labels = cv2.connectedComponents(box, connectivity=8, ltype=cv2.CV_32S)
    points = cv2.findNonZero(box)
    st = np.zeros((n, 5), np.int32)
    centroids = np.zeros((n, 2), np.float64)
    st[0] = (0, 0, box.shape[1], box.shape[0], box.size)
    if points is None:
        empty = np.zeros(0, np.int32)
        return labels, st, centroids, (empty, empty, empty)
    xy = points.reshape(-1, 2)  # (N, 1, 2) in OpenCV 4, (N, 2) in 5
    xs, ys = xy[:, 0], xy[:, 1]
    lab = labels[ys, xs]
    order = np.argsort(lab, kind="stable")
    lab, xs, ys = lab[order], xs[order], ys[order]
    # Labels are 1..n-1 and every one has a pixel: each run of equal labels is a component.
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    area = np.diff(np.r_[starts, len(lab)])
    x0, y0 = np.minimum.reduceat(xs, starts), np.minimum.reduceat(ys, starts)
    st[1:, cv2.CC_STAT_LEFT], st[1:, cv2.CC_STAT_TOP] = x0, y0
    st[1:, cv2.CC_STAT_WIDTH] = np.maximum.reduceat(xs, starts) - x0 + 1
    st[1:, cv2.CC_STAT_HEIGHT] = np.maximum.reduceat(ys, starts) - y0 + 1
    st[1:, cv2.CC_STAT_AREA] = area
    st[0, cv2.CC_STAT_AREA] -= len(lab)
    centroids[1:, 0] = np.add.reduceat(xs, starts, dtype=np.float64) / area
    centroids[1:, 1] = np.add.reduceat(ys, starts, dtype=np.float64) / area
    return labels, st, centroids, (xs, ys, lab)


def class_stats(
    name: str, mask: np.ndarray, *, pixel_size_mm: float, max_components: int = 200,
    components: bool = True, found: Found | None = None,
) -> ClassStats:
    """Statistics of one (H, W) bool mask; lists the max_components largest components
    (none are counted when `components` is False: the area only). `found`: the mask's
    components if they are already known."""
    px_mm2 = pixel_size_mm * pixel_size_mm
    total = int(mask.size)
    count = int(np.count_nonzero(mask))
    if count == 0 or not components:
        return ClassStats(name, count, count / total, count * px_mm2, 0, 0, 0.0)
    if found is None:
        found = label_components(mask).found()
    boxes, centroids = found.stats, found.centroids
    n = len(boxes)
    # Label 0 is the background.
    areas = boxes[1:, cv2.CC_STAT_AREA]
    # Largest first; ties top-left first, so the list does not depend on how OpenCV numbered
    # the labels (its numbering changes with the box labelled and its threads).
    order = np.lexsort((boxes[1:, cv2.CC_STAT_LEFT], boxes[1:, cv2.CC_STAT_TOP], -areas)
                       )[:max_components]
    comps = tuple(
        Component(
            x=int(boxes[i + 1, cv2.CC_STAT_LEFT]),
            y=int(boxes[i + 1, cv2.CC_STAT_TOP]),
            w=int(boxes[i + 1, cv2.CC_STAT_WIDTH]),
            h=int(boxes[i + 1, cv2.CC_STAT_HEIGHT]),
            area_px=int(areas[i]),
            cx=float(centroids[i + 1, 0]),
            cy=float(centroids[i + 1, 1]),
        )
        for i in order
    )
    largest = int(areas.max())
    return ClassStats(
        name=name,
        pixel_count=count,
        area_fraction=count / total,
        area_mm2=count * px_mm2,
        components=int(n - 1),
        largest_component_px=largest,
        largest_component_mm2=largest * px_mm2,
        component_list=comps,
    )


def layer_stats(
    masks: np.ndarray,
    class_names: Sequence[str],
    *,
    pixel_size_mm: float,
    max_components: int = 200,
    found: Mapping[int, Found] | None = None,
) -> LayerStats:
    """(C, H, W) bool masks -> statistics for every class, keyed by class name (area only
    for no_defect). `found`: per class index, components already known."""
    if masks.ndim != 3 or masks.shape[0] != len(class_names):
        raise ValueError(f"masks of shape {masks.shape} do not match {len(class_names)} classes")

    def one(i: int) -> ClassStats:
        return class_stats(class_names[i], masks[i], pixel_size_mm=pixel_size_mm,
                           max_components=max_components,
                           components=class_names[i] != NO_DEFECT,
                           found=(found or {}).get(i))

    results = per_class(one, len(class_names), masks[0].size)
    return LayerStats(width=int(masks.shape[2]), height=int(masks.shape[1]),
                      classes={c.name: c for c in results})
