"""Swelling or over-melting: the layer's slice tells the two bright defects apart.

Both are brighter than their part, and a model that has seen many camera looks marks both
classes on both (on the README's synthetic seed 999, 44% of what the default weights marked
swelling lay on over-melting, and 54% of their over-melting on swelling). What separates
them is where they lie: swelling is part metal warped up over the part's outline, so it
reaches out over the powder; an over-melted spot lies inside its part. With the nominal
slice the outline is known, so each bright mark (a connected component of the two classes
together) takes the class its place gives it: swelling when it reaches `reach_px` or more
beyond the outline, over-melting when it stays within. See docs/cameras.md for what this
measured.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]

SWELLING, OVER_MELTING = "swelling", "over_melting"
BRIGHT = (SWELLING, OVER_MELTING)  # the classes split_bright may change


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
