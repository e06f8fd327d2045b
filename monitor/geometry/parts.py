"""Per-part statistics of a layer: nominal area, printed fraction, excess, shift, defects.

Everything is in camera image pixels (where the daemon's class masks are): the nominal
slice is warped into the image with the inverse homography, and every area is summed over
the calibration's per-pixel mm² map, so an oblique camera's far side counts right.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from scipy import ndimage  # type: ignore[import-untyped]
from scipy.spatial import cKDTree  # type: ignore[import-untyped]

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
    width_px: float = math.inf       # its widest inscribed circle's diameter, image pixels

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
    # every 4th pixel each way: a median of the smooth area map needs no more
    area = cal.pixel_area_mm2(nominal.shape)[::4, ::4]
    inside = nominal[::4, ::4] > 0
    px_mm2 = float(np.median(area[inside])) if inside.any() else float(np.median(area))
    return max(1, round(tolerance_mm / math.sqrt(px_mm2)))


def disk(r: int) -> npt.NDArray[np.uint8]:
    """A round structuring element of radius r px (morphology on part masks)."""
    return np.asarray(cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)),
                      np.uint8)


@dataclass(frozen=True)
class _Zone:
    """The parts' tolerance zones, gathered once.

    Everything but the excess lies in them: the rows `y0:y0 + len(sub)` they span (whole
    rows: a pixel's index in them is its image index less an offset), and there only the
    zone's pixels, flat (K,).
    """

    y0: int
    sub: Labels                   # the nominal labels of those rows
    grown: npt.NDArray[Any]       # the labels grown by the tolerance; 0 outside every zone
    zi: npt.NDArray[np.intp]      # (K,) zone pixels, flat in the rows
    z: npt.NDArray[np.int32]      # (K,) the part each zone pixel counts for
    a: npt.NDArray[np.float64]    # (K,) its area, mm²
    pr: BoolArray                 # (K,) printed?
    key: npt.NDArray[Any]         # (K,) one key per (part, nominal?, printed?)


def _gather_zone(nominal: Labels, printed: BoolArray, area_full: npt.NDArray[np.float32],
                 tol: int, n: int) -> _Zone:
    hh = nominal.shape[0]
    rows = np.flatnonzero(nominal.any(axis=1))
    y0, y1 = max(0, int(rows[0]) - tol), min(hh, int(rows[-1]) + 1 + tol)
    sub = nominal[y0:y1]
    # Tolerance zone of each part: its own pixels, plus the grown rim (where two rims
    # meet, the larger id takes the pixel: a tie-break, not a measurement). The dilation
    # covers every zone pixel; which id a pixel gets is decided on the gathered pixels.
    lab = sub.astype(np.uint16) if n < 65536 else sub.astype(np.float32)
    grown = cv2.dilate(lab, disk(tol)) if tol else lab
    zi = np.flatnonzero(grown)
    own = sub.ravel()[zi]
    is_nom = own > 0
    z = np.where(is_nom, own, grown.ravel()[zi].astype(np.int32))
    a = area_full[y0:y1].ravel()[zi].astype(np.float64)
    pr = np.asarray(printed[y0:y1], bool).ravel()[zi]
    # one key per (part, nominal?, printed?): every sum below is a bincount over it
    key = z * 4 + is_nom * 2 + pr
    return _Zone(y0, sub, grown, zi, z, a, pr, key)


@dataclass(frozen=True)
class _Sums:
    """Per-part sums over the zones (n,): nominal and printed-inside areas, centroids."""

    nominal_mm2: npt.NDArray[np.float64]
    printed_in: npt.NDArray[np.float64]
    cents: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]   # nominal (xy, weight)
    pcents: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]  # printed in the zone


def _zone_sums(zone: _Zone, n: int, width: int) -> _Sums:
    yy, xx = np.divmod(zone.zi, width)

    def by_key(weights: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.bincount(zone.key, weights=weights,
                           minlength=4 * n).astype(np.float64).reshape(n, 4)

    a = zone.a
    s_a, s_ax, s_ay = by_key(a), by_key(a * xx), by_key(a * (yy + zone.y0))

    def centroid(cols: list[int]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        w = s_a[:, cols].sum(1)
        safe_w = np.maximum(w, 1e-12)
        return np.c_[s_ax[:, cols].sum(1) / safe_w, s_ay[:, cols].sum(1) / safe_w], w

    return _Sums(nominal_mm2=s_a[:, 2] + s_a[:, 3], printed_in=s_a[:, 3],
                 cents=centroid([2, 3]), pcents=centroid([1, 3]))


def _excess_mm2(printed: BoolArray, zone: _Zone, area_full: npt.NDArray[np.float32],
                n: int, beyond_px: float) -> npt.NDArray[np.float64]:
    """Printed outside every zone and over `beyond_px` from every part, given to the
    nearest part (n,)."""
    if np.count_nonzero(printed) <= np.count_nonzero(zone.pr):
        return np.zeros(n)
    outside = np.asarray(printed, bool).copy()
    outside[zone.y0:zone.y0 + len(zone.sub)] &= zone.grown == 0
    return _excess(zone.sub, zone.y0, outside, area_full, n, beyond_px)


def _class_mm2(classes: Mapping[str, BoolArray], zone: _Zone,
               n: int) -> dict[str, npt.NDArray[np.float64]]:
    """Each class's area per part, counted on the part's tolerance zone (n,)."""
    out: dict[str, npt.NDArray[np.float64]] = {}
    y1 = zone.y0 + len(zone.sub)
    for name, mask in classes.items():
        if not np.count_nonzero(mask):
            out[name] = np.zeros(n)
            continue
        m = np.asarray(mask[zone.y0:y1], bool).ravel()[zone.zi]
        out[name] = np.bincount(zone.z[m], weights=zone.a[m], minlength=n).astype(np.float64)
    return out


@dataclass(frozen=True)
class PartZones:
    """A layer's parts measured against its printed area: everything of the per-part
    statistics that needs no defect class, so the daemon computes it while the model runs
    and only counts the classes (`stats`) once the masks are there."""

    shape: tuple[int, int]
    n: int                                   # part ids are below this
    zone: _Zone | None                       # None: no part in the slice
    base: tuple[PartStats, ...]              # every part, classes not yet counted

    @classmethod
    def measure(cls, nominal: Labels, printed: BoolArray, cal: Calibration, *,
                tol_px: int, excess_margin_px: float = 0.0) -> PartZones:
        """Args as `part_stats`, the tolerance in image pixels (`tolerance_px`). Printed
        pixels count as excess from `excess_margin_px` beyond the tolerance on: how far the
        printed-area classifier bleeds past a melt edge (`PrintedParams.bleed_px`)."""
        shape = (int(nominal.shape[0]), int(nominal.shape[1]))
        n = int(nominal.max(initial=0)) + 1
        if n == 1:
            return cls(shape, n, None, ())
        area_full = cal.pixel_area_mm2(nominal.shape)
        zone = _gather_zone(nominal, printed, area_full, tol_px, n)
        sums = _zone_sums(zone, n, nominal.shape[1])
        excess_mm2 = _excess_mm2(printed, zone, area_full, n, tol_px + excess_margin_px)
        cents, pcents = sums.cents, sums.pcents
        ids = np.flatnonzero(sums.nominal_mm2 > 0)
        widths = _widths(zone.sub, ids)
        base = []
        for pid, width in zip(ids.tolist(), widths.tolist(), strict=True):
            nom = float(sums.nominal_mm2[pid])
            shift: float | None = None
            if pcents[1][pid] > 0 and cents[1][pid] > 0:
                c_nom = cal.image_to_mm(cents[0][pid])
                c_pr = cal.image_to_mm(pcents[0][pid])
                shift = float(np.hypot(*(c_nom - c_pr)[0]))
            base.append(PartStats(
                id=int(pid), nominal_mm2=nom,
                printed_fraction=float(sums.printed_in[pid]) / nom,
                excess_fraction=float(excess_mm2[pid]) / nom if pid < len(excess_mm2) else 0.0,
                centroid_shift_mm=shift, width_px=width))
        return cls(shape, n, zone, tuple(base))

    def stats(self, classes: Mapping[str, BoolArray]) -> list[PartStats]:
        """Per-part statistics with each class's area as a fraction of the part (masks in
        image pixels, counted on the part's tolerance zone)."""
        if self.zone is None:
            return []
        class_mm2 = _class_mm2(classes, self.zone, self.n)
        return [replace(p, classes={name: float(v[p.id]) / p.nominal_mm2
                                    for name, v in class_mm2.items()}) for p in self.base]

    def zone_mask(self) -> BoolArray:
        """(H, W) the parts grown by the tolerance (what `scope = "parts"` rules count)."""
        out = np.zeros(self.shape, bool)
        if self.zone is not None:
            out[self.zone.y0:self.zone.y0 + len(self.zone.sub)] = self.zone.grown > 0
        return out


def _widths(labels: Labels, ids: npt.NDArray[np.intp]) -> npt.NDArray[np.float64]:
    """Each part's widest inscribed circle's diameter (px): how well the camera resolves it
    (a wall a few pixels wide is mostly edge, where melt and powder mix).

    At half resolution on large images, as the printed area is found: a pixel or two of
    error, for a quarter of the cost.
    """
    scale = 2 if min(labels.shape) >= 1024 else 1
    lab: npt.NDArray[Any] = (labels.astype(np.uint16) if int(labels.max(initial=0)) < 65536
                             else labels)
    if scale > 1:
        lab = cv2.resize(lab, (labels.shape[1] // scale, labels.shape[0] // scale),
                         interpolation=cv2.INTER_NEAREST)
    # each pixel's distance to the nearest powder pixel: (W + 1) / 2 mid-way across W pixels
    dist = cv2.distanceTransform((lab > 0).view(np.uint8), cv2.DIST_L2, 5)
    out = np.zeros(len(ids))
    boxes = ndimage.find_objects(lab)
    for i, pid in enumerate(ids.tolist()):
        box = boxes[pid - 1] if pid - 1 < len(boxes) else None
        if box is not None:
            inside = (lab[box] == pid).view(np.uint8)
            out[i] = cv2.minMaxLoc(dist[box], mask=inside)[1]
    return np.maximum(2.0 * out * scale - 1.0, 0.0)


def part_stats(
    nominal: Labels,
    printed: BoolArray,
    classes: Mapping[str, BoolArray],
    cal: Calibration,
    *,
    tolerance_mm: float,
    excess_margin_px: float = 0.0,
) -> list[PartStats]:
    """Per-part statistics of one layer.

    Args:
        nominal: (H, W) part ids in image pixels (0 = powder), e.g.
            `cal.frame_to_image_labels(slice.labels, image.shape)`.
        printed: (H, W) freshly melted pixels (`printed_area(...).mask`).
        classes: defect class name -> (H, W) mask; each is counted on the part grown by
            the tolerance, as a fraction of the part's nominal area.
        tolerance_mm: how far outside its nominal outline a part's pixels still count.
        excess_margin_px: printed pixels count as excess this far beyond the tolerance
            on (`PrintedParams.bleed_px` for a mask from `printed_area`).
    """
    tol = tolerance_px(cal, nominal, tolerance_mm)
    return PartZones.measure(nominal, printed, cal, tol_px=tol,
                             excess_margin_px=excess_margin_px).stats(classes)


def _excess(
    sub: Labels, y0: int, outside: BoolArray, area: npt.NDArray[np.float32], n: int,
    beyond_px: float = 0.0,
) -> npt.NDArray[np.float64]:
    """mm² of `outside` per part, each pixel given to the part nearest to it (n,), for the
    pixels over `beyond_px` from every part.

    `sub` holds the image rows from `y0` on that contain every part. The nearest part pixel
    is on a part's outline, so a k-d tree of the outline pixels answers it exactly (a
    distance transform of the whole image costs ten times more).
    """
    inner = cv2.erode((sub > 0).view(np.uint8), np.ones((3, 3), np.uint8),
                      borderType=cv2.BORDER_CONSTANT, borderValue=0)
    edge = np.flatnonzero((sub > 0) & (inner == 0))
    ey, ex = np.divmod(edge, sub.shape[1])
    xy = cv2.findNonZero(outside.view(np.uint8)).reshape(-1, 2)  # faster than np.nonzero
    xs, ys = xy[:, 0], xy[:, 1]
    dist, j = cKDTree(np.c_[ey + y0, ex]).query(np.c_[ys, xs])
    far = dist > beyond_px
    owner = sub.ravel()[edge[j[far]]]
    return np.bincount(owner, weights=area[ys[far], xs[far]], minlength=n).astype(np.float64)
