"""Pure functions: per-class masks -> per-layer statistics and connected components."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np


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
    components: int  # all of them, even if only the largest are listed
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

    count: int  # components, background (label 0) included
    labels: np.ndarray  # (h, w) int32 labels of the box
    stats: np.ndarray  # OpenCV's per-label x, y, w, h, area, in image coordinates
    centroids: np.ndarray  # per-label (x, y), in image coordinates
    box: tuple[int, int, int, int]  # x, y, w, h of the box in the image


def label_components(mask: np.ndarray) -> Labels:
    """Label a (H, W) bool mask. Only the box around its pixels is labelled: defect masks
    are sparse, and labelling is a pass over every pixel it is given."""
    u8 = mask.view(np.uint8) if mask.dtype == np.bool_ else mask.astype(np.uint8)
    x, y, w, h = cv2.boundingRect(u8)
    n, labels, st, centroids = cv2.connectedComponentsWithStats(
        np.ascontiguousarray(u8[y:y + h, x:x + w]), connectivity=8, ltype=cv2.CV_32S)
    st[:, cv2.CC_STAT_LEFT] += x
    st[:, cv2.CC_STAT_TOP] += y
    return Labels(int(n), labels, st, centroids + np.array([x, y]), (x, y, w, h))


def class_stats(
    name: str, mask: np.ndarray, *, pixel_size_mm: float, max_components: int = 200
) -> ClassStats:
    """Statistics of one (H, W) bool mask; lists the max_components largest components."""
    px_mm2 = pixel_size_mm * pixel_size_mm
    total = int(mask.size)
    count = int(np.count_nonzero(mask))
    if count == 0:
        return ClassStats(name, 0, 0.0, 0.0, 0, 0, 0.0)
    lab = label_components(mask)
    n, boxes, centroids = lab.count, lab.stats, lab.centroids
    # Label 0 is the background.
    areas = boxes[1:, cv2.CC_STAT_AREA]
    order = np.argsort(-areas, kind="stable")[:max_components]
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
) -> LayerStats:
    """(C, H, W) bool masks -> statistics for every class, keyed by class name."""
    if masks.ndim != 3 or masks.shape[0] != len(class_names):
        raise ValueError(f"masks of shape {masks.shape} do not match {len(class_names)} classes")
    def one(i: int) -> ClassStats:
        return class_stats(class_names[i], masks[i], pixel_size_mm=pixel_size_mm,
                           max_components=max_components)

    workers = min(len(class_names), os.cpu_count() or 1)
    if workers > 1 and masks[0].size >= 1 << 20:
        # OpenCV releases the GIL: on large layers the classes are labelled in parallel.
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stats") as pool:
            results = list(pool.map(one, range(len(class_names))))
    else:
        results = [one(i) for i in range(len(class_names))]
    return LayerStats(width=int(masks.shape[2]), height=int(masks.shape[1]),
                      classes={c.name: c for c in results})
