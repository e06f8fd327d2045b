"""The model's marks read against the layer's nominal slice.

The model sees one gray image; the daemon also knows where metal was meant to be. Two
classes are defined by that place, and the slice settles them:

- Swelling or over-melting. Both are brighter than their part, and a model that has seen
  many camera looks marks both classes on both (on the README's synthetic seed 999, 44% of
  what the weights before the current default marked swelling lay on over-melting, and 54%
  of their over-melting on swelling). Swelling is part metal warped up over the part's
  outline, so it reaches out over the powder; an over-melted spot lies inside its part.
  Each bright mark (a connected component of the two classes together) takes the class its
  place gives it: swelling when it reaches `reach_px` or more beyond the outline,
  over-melting otherwise.
- Misplaced melt (misprint). Loose scan tracks on the powder look like the part's own melt,
  which the model must not mark inside a part, so its misprint threshold is high. Beyond the
  part's tolerance zone there is no part to mistake, and the model's marks are taken from a
  lower probability there (`model.outside_thresholds`: the Segmenter's `loose` masks).
  Patches of scan-track texture there are misprint too, whatever the model made of them
  (`geometry.stray_track_z`: monitor.geometry.stray).

A third reading needs no class defined by place, only the part each mark lies on: under- and
over-melting are darker and brighter than *their own part* (`geometry.relative_k`). An
under-melting mark that is not clearly darker than the rest of its part is dropped (a row of
small coupons darker than the powder read as under-melting whole); under- and over-melting
marks that are clearly darker or brighter are grown over the connected pixels of their part
that are as dark or as bright (the model marks the core of a spot, not its extent).
Over-melting is dropped only when it is not even one robust SD brighter than its part and
not at the camera's ceiling: on a camera that saturates the melt a real over-melted spot
cannot be brighter than its part, and one that compresses the highlights shows it only a
little brighter.

See docs/cameras.md for what each measured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np
import numpy.typing as npt
from scipy import ndimage  # type: ignore[import-untyped]

BoolArray = npt.NDArray[np.bool_]

SWELLING, OVER_MELTING, MISPRINT = "swelling", "over_melting", "misprint"
UNDER_MELTING = "under_melting"
BRIGHT = (SWELLING, OVER_MELTING)  # the classes split_bright may change
# An over-melting mark is kept when its median lies at least this many of its part's robust
# SDs above the rest of the part (at 2 the real over-melting of a varied synthetic camera,
# 1.6-4 SDs, is lost; 0.5 to 1 give the same classic IoU), or at the camera's ceiling:
# within CLIPPED of the layer's brightest grey.
OVER_KEEP_SD = 1.0
CLIPPED = 0.98


def split_bright(masks: BoolArray, class_names: Sequence[str], part: BoolArray, *,
                 reach_px: int) -> BoolArray | None:
    """`masks` (C, H, W) with every swelling/over-melting mark given the class its place
    says, against `part` (H, W, the nominal parts in image pixels); None when nothing
    changes (either class missing from `class_names`, `reach_px` 0, no mark, or every mark
    already one class and in its place). The input is never modified."""
    if reach_px <= 0 or SWELLING not in class_names or OVER_MELTING not in class_names:
        return None
    s, o = class_names.index(SWELLING), class_names.index(OVER_MELTING)
    bright = masks[s] | masks[o]
    if not bright.any():
        return None
    n, lab, boxes, _ = cv2.connectedComponentsWithStats(bright.view(np.uint8), connectivity=8)
    h, w = bright.shape
    pad = reach_px + 1
    out_s = np.zeros_like(bright)
    for k in range(1, n):
        x, y, bw, bh = (int(v) for v in boxes[k, :4])
        y0, y1 = max(0, y - pad), min(h, y + bh + pad)
        x0, x1 = max(0, x - pad), min(w, x + bw + pad)
        comp = lab[y0:y1, x0:x1] == k
        # Distance of each pixel to the nearest part pixel (the box holds every part pixel
        # within reach of the mark, which is all the test needs).
        outside = (~part[y0:y1, x0:x1]).view(np.uint8)
        d_out = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        if bool((d_out[comp] >= reach_px).any()):
            out_s[y0:y1, x0:x1] |= comp
    new = masks.copy()
    new[s] = out_s
    new[o] = bright & ~out_s
    if np.array_equal(new[s], masks[s]) and np.array_equal(new[o], masks[o]):
        return None
    return new


def add_outside(masks: BoolArray, loose: Mapping[int, BoolArray], zone: BoolArray
                ) -> BoolArray | None:
    """`masks` (C, H, W) with each class's `loose` marks (class index -> (H, W) mask at its
    outside threshold) added within `zone` (beyond the parts' tolerance, within reach);
    None when that adds nothing. The input is never modified."""
    new: BoolArray | None = None
    for i, m in loose.items():
        extra = m & zone & ~masks[i]
        if extra.any():
            if new is None:
                new = masks.copy()
            new[i] |= extra
    return new


def outside_zone(part: BoolArray, tolerance_px: int, reach_px: int) -> BoolArray:
    """(H, W): beyond `tolerance_px` of the nominal parts and within `reach_px` of them."""
    d_out = cv2.distanceTransform((~part).view(np.uint8), cv2.DIST_L2, 3)
    return np.asarray((d_out > tolerance_px) & (d_out <= reach_px))


def relative(masks: BoolArray, class_names: Sequence[str], gray: np.ndarray,
             part: BoolArray, *, k: float) -> BoolArray | None:
    """`masks` with under- and over-melting read against their own part's grey level: a
    mark whose median (lightly smoothed) grey lies `k` robust standard deviations (1.4826
    MAD of the rest of its part) darker (under) or brighter (over) than the rest of its part
    is grown over the connected pixels of that part as far; an under-melting mark that is
    not is dropped, and an over-melting mark that is not even OVER_KEEP_SD brighter nor at
    the layer's ceiling too. `part` (H, W) is the nominal parts; each connected part is its
    own. None when nothing changes or `k` is 0. The input is never modified."""
    todo = [(class_names.index(c), sign, drop)
            for c, sign, drop in ((UNDER_MELTING, -1.0, True), (OVER_MELTING, 1.0, False))
            if c in class_names and masks[class_names.index(c)].any()]
    if k <= 0 or not todo or not part.any():
        return None
    _, lab = cv2.connectedComponents(part.view(np.uint8), connectivity=8)
    boxes = ndimage.find_objects(lab)
    g = np.asarray(gray, dtype=np.float32)
    h, w = g.shape[:2]
    pad = 6  # the blur's reach (3 sigma, rounded up): each part's pixels see true neighbours

    def smoothed(sl: tuple[slice, slice]) -> np.ndarray:
        """The layer lightly smoothed over the box `sl` (only parts with marks need it)."""
        y0, x0 = max(0, sl[0].start - pad), max(0, sl[1].start - pad)
        y1, x1 = min(h, sl[0].stop + pad), min(w, sl[1].stop + pad)
        sm = cv2.GaussianBlur(g[y0:y1, x0:x1], (0, 0), 1.5)
        return np.asarray(sm[sl[0].start - y0:sl[0].stop - y0, sl[1].start - x0:sl[1].stop - x0])

    # a mark at the camera's ceiling could not look brighter than a part that is there too
    clipped = CLIPPED * float(g.max())
    new = masks.copy()
    for ci, sign, drop in todo:
        m = masks[ci]
        out = m.copy()
        n, marks, stats, _ = cv2.connectedComponentsWithStats(m.view(np.uint8),
                                                              connectivity=8)
        # per part, once: its pixels, how far each lies from the rest of it, and the
        # connected stretches that lie k or more (a part holds many marks)
        seen: dict[int, tuple[tuple[slice, slice], BoolArray, np.ndarray,
                              np.ndarray | None]] = {}
        for c in range(1, n):
            x, y, bw, bh = (int(v) for v in stats[c, :4])
            ids = lab[y:y + bh, x:x + bw][marks[y:y + bh, x:x + bw] == c]
            ids = ids[ids > 0]
            if ids.size == 0:
                continue  # off the parts: not this reading's business
            pid = int(np.bincount(ids).argmax())
            if pid not in seen:
                sl = boxes[pid - 1]
                mine = lab[sl] == pid
                rest = g[sl][mine & ~m[sl]]
                if rest.size < 20:  # marked (nearly) whole: nothing to compare with
                    seen[pid] = (sl, mine, np.zeros(0), None)
                    continue
                med = float(np.median(rest))
                # a flat part (a drawn test, a saturated camera) has no spread: floor it at
                # 1% of its level, about a grey level
                spread = max(1.4826 * float(np.median(np.abs(rest - med))),
                             0.01 * abs(med), 1e-6)
                d = sign * (smoothed(sl) - med) / spread
                _, far = cv2.connectedComponents(((d >= k) & mine).view(np.uint8),
                                                 connectivity=8)
                seen[pid] = (sl, mine, d, far)
            sl, mine, d, far = seen[pid]
            if far is None:
                continue
            comp = (marks[sl] == c) & mine  # the mark on its part
            if not comp.any():
                continue
            dm = float(np.median(d[comp]))
            if dm >= k:
                keep = np.unique(far[comp])
                out[sl] |= np.isin(far, keep[keep > 0])
            elif drop or (dm < OVER_KEEP_SD and float(np.median(g[sl][comp])) < clipped):
                out[sl] &= ~comp
        new[ci] = out
    if np.array_equal(new, masks):
        return None
    return new


def read_layer(masks: BoolArray, class_names: Sequence[str], part: BoolArray, *,
               swelling_reach_px: int, loose: Mapping[int, BoolArray] | None = None,
               zone: BoolArray | None = None, tracks: BoolArray | None = None,
               gray: np.ndarray | None = None, relative_k: float = 0.0
               ) -> BoolArray | None:
    """The readings: split_bright, then `relative` where `gray` (the layer) is given, then
    add_outside where `zone` is given, then `tracks` ((H, W) stray scan tracks beyond the
    parts) marked misprint; None when none changes anything."""
    out = split_bright(masks, class_names, part, reach_px=swelling_reach_px)
    if gray is not None:
        rel = relative(masks if out is None else out, class_names, gray, part, k=relative_k)
        out = rel if rel is not None else out
    if loose and zone is not None:
        more = add_outside(masks if out is None else out, loose, zone)
        out = more if more is not None else out
    if tracks is not None and MISPRINT in class_names:
        more = add_outside(masks if out is None else out,
                           {class_names.index(MISPRINT): tracks}, tracks)
        out = more if more is not None else out
    return out
