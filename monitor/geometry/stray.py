"""Stray scan tracks: misprints found beyond the slice by their texture.

A misprint is melt where the slice says powder: loose scan tracks on the powder next to a
part. The model is unsure of them on a camera it was not trained on (pasted into the real
SLM layers of builds it never saw, most got a misprint probability of 0.0-0.4), yet they
have a texture nothing else on the powder near a part has:

- strong gradients in one orientation (the structure tensor's first eigenvalue well above
  its second), far above the oriented energy of this layer's own powder around its parts
  (a robust z-score against the zone's median and MAD, so camera brightness, contrast,
  noise and whether melt is brighter or darker than powder all drop out);
- gradients that alternate in sign across the tracks. A single step edge (a part that
  grew past its slice, a chamber wall, the ghost of an earlier layer) has gradients of one
  sign: their vector mean is as long as their mean length, where tracks' cancel out;
- a patch, not a line: what survives an opening a few pixels wide, over a minimum area.

Sizes scale with the layer's feature size (`feature_scale`: 1.0 for a ~1000 px bed), as
the defects pasted to measure recall do. Tracks finer than the camera's pixels (a coarse
camera's hatch) are not resolved and leave this to the model.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]
F32 = npt.NDArray[np.float32]

# (l1 - l2) / (l1 + l2): one orientation dominates (the melt's glitter, moved with it,
# adds energy in every direction: 0.5 missed 4 of 12 pasted misprints on the real layers)
COHERENCE_MIN = 0.35
POLARITY_MAX = 0.5  # |mean gradient| / mean |gradient|: 1 for a step edge, ~0 for tracks
WINDOW = 5.0  # structure tensor window (Gaussian sigma) per unit of feature scale
PEAK_SHARE = 0.3  # of the oriented energy's nearby peak (a line's falls off, a patch's not)
OPENING = 7.0  # radius of the opening that removes lines, per unit of feature scale
MIN_AREA = 0.3 * math.pi * 14.0 ** 2  # px per unit of feature scale squared (a 14 px patch)


def feature_scale(shape: tuple[int, ...]) -> float:
    """A layer's feature size: 1.0 for a ~1000 px bed (never below 0.5). Defects, pasted or
    searched for, are sized by it."""
    return max(0.5, min(shape[:2]) / 1000.0)


def stray_tracks(gray: npt.NDArray[np.generic], zone: BoolArray, *, z_min: float,
                 scale: float | None = None) -> BoolArray:
    """(H, W) patches of scan tracks within `zone` (the powder beyond the parts' tolerance
    and within reach of them) of the (H, W) layer `gray` (any grey scale): oriented energy
    `z_min` robust standard deviations above the zone's own. All False when the zone is
    empty or `z_min` is 0."""
    out = np.zeros(zone.shape, dtype=bool)
    if z_min <= 0 or not zone.any():
        return out
    sc = scale if scale is not None else feature_scale(gray.shape)
    # Work in the zone's box (padded by the window): the rest of the plate is never read.
    sigma = WINDOW * sc
    pad = math.ceil(3 * sigma) + 2
    ys, xs = np.nonzero(zone)
    h, w = zone.shape
    y0, y1 = max(0, int(ys.min()) - pad), min(h, int(ys.max()) + pad + 1)
    x0, x1 = max(0, int(xs.min()) - pad), min(w, int(xs.max()) + pad + 1)
    img = np.asarray(gray[y0:y1, x0:x1], dtype=np.float32)
    z = zone[y0:y1, x0:x1]
    g = cv2.GaussianBlur(img, (0, 0), 0.8 * sc)
    # Only the zone's own gradients: a part's edge next to it must not leak in.
    inside = z.astype(np.float32)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3) * inside
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3) * inside
    fields = [gx * gx, gy * gy, gx * gy, gx, gy, np.sqrt(gx * gx + gy * gy)]
    rng = float(np.percentile(img[z], 99) - np.percentile(img[z], 1))  # the zone's greys
    # The gradients need every pixel; their window sums do not: averaged down to about one
    # pixel per unit of feature scale, a 2-3x larger layer costs little more.
    f = max(1, round(sc))
    if f > 1:
        size = (max(1, (x1 - x0) // f), max(1, (y1 - y0) // f))
        fields = [cv2.resize(a, size, interpolation=cv2.INTER_AREA) for a in fields]
        z = cv2.resize(z.view(np.uint8), size, interpolation=cv2.INTER_NEAREST).view(bool)
        sc, sigma = sc / f, sigma / f
        if not z.any():
            return out

    def blur(a: F32) -> F32:
        return np.asarray(cv2.GaussianBlur(a, (0, 0), sigma), dtype=np.float32)

    jxx, jyy, jxy, mx, my, mean_len = (blur(a) for a in fields)
    trace = jxx + jyy
    oriented = np.sqrt((jxx - jyy) ** 2 + 4.0 * jxy * jxy)  # l1 - l2
    polarity = np.sqrt(mx * mx + my * my)
    v = oriented[z]
    med = float(np.median(v))
    spread = 1.4826 * float(np.median(np.abs(v - med)))
    # a flat zone (a test pattern, a saturated camera) has no spread: floor it at a tenth of
    # its median, and at a grey-level step too small to see
    spread = max(spread, 0.1 * med, 1e-3 * rng * rng, 1e-12)
    tiny = np.float32(1e-12)
    # A single line (a scratch, a recoater streak) is coherent and of both signs too, but
    # its energy falls off across it like the window; a patch of tracks keeps it level.
    # Keeping what holds PEAK_SHARE of the nearby peak leaves a line a band thinner than
    # the opening below.
    r_peak = max(1, round(2 * sigma))
    peak = cv2.dilate(oriented, np.ones((2 * r_peak + 1, 2 * r_peak + 1), np.uint8))
    cand = ((oriented - med) > z_min * spread) & (oriented > COHERENCE_MIN * (trace + tiny)) \
        & (polarity < POLARITY_MAX * (mean_len + tiny)) & (oriented >= PEAK_SHARE * peak) & z
    r = max(1, round(OPENING * sc))
    opened = cv2.morphologyEx(cand.view(np.uint8), cv2.MORPH_OPEN,
                              cv2.getStructuringElement(cv2.MORPH_ELLIPSE,
                                                        (2 * r + 1, 2 * r + 1)))
    _, lab, st, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
    big = np.flatnonzero(st[:, cv2.CC_STAT_AREA] >= MIN_AREA * sc * sc)
    big = big[big > 0]
    if big.size:
        found = np.isin(lab, big)
        if f > 1:
            found = cv2.resize(found.view(np.uint8), (x1 - x0, y1 - y0),
                               interpolation=cv2.INTER_NEAREST).view(bool)
        out[y0:y1, x0:x1] = found & zone[y0:y1, x0:x1]
    return out
