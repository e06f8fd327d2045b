"""Printed area: which pixels of a layer hold freshly melted metal.

Melt is brighter than powder on most cameras and darker on others (specular speckle on a
dull surface), lighting varies across the bed and ghosts of earlier layers show through
fresh powder, so no fixed threshold works. Each pixel is compared with the powder around
it: the powder's local mean and spread come from a normalised convolution over the pixels
outside the nominal parts (grown by a margin), which follows lighting gradients and the
chamber wall. The polarity (melt brighter or darker than powder) is decided per layer from
the nominal regions against that background, and a pixel is printed when its smoothed
intensity departs from the powder in that direction, or its texture (local spread) is well
above the powder's while its intensity leans the same way. Only pixels in the search zone
(nominal grown by the tolerance) are classified; the mask is then cleaned morphologically.
See docs/printed-area.md for the measurements behind the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class PrintedParams:
    """Knobs of the printed-area classifier, in full-resolution image pixels."""

    smooth_px: int = 8          # half-width of the local mean/spread window (speckle scale)
    vote_px: int = 6            # half-width over which pixel scores are averaged
    background_px: int = 120    # half-width of the powder background window
    margin_px: int = 6          # nominal grown by this is neither core nor ring (edges mix)
    ring_px: int = 30           # width of the powder ring sampled around the parts
    min_separation: float = 1.0  # Fisher distance core/ring below which nothing is printed
    close_px: int = 2           # morphological close/open radius for the clean-up
    fill_holes: bool = True     # fill powder-looking holes enclosed by melt
    samples: int = 20000        # pixels sampled per class to fit the discriminant


@dataclass(frozen=True)
class Printed:
    """A layer's printed mask (image pixels) and how it was decided."""

    mask: BoolArray       # (H, W) True = freshly melted
    polarity: int         # +1 melt brighter than powder, -1 darker, 0 nothing printed seen
    separation: float     # Fisher distance between nominal core and powder ring features


def _disk(r: int) -> npt.NDArray[np.uint8]:
    return np.asarray(cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)),
                      np.uint8)


def _local_mean_spread(image: F32, r: int) -> tuple[F32, F32]:
    k = (2 * r + 1, 2 * r + 1)
    m = cv2.boxFilter(image, cv2.CV_32F, k, borderType=cv2.BORDER_REFLECT)
    m2 = cv2.boxFilter(image * image, cv2.CV_32F, k, borderType=cv2.BORDER_REFLECT)
    return np.asarray(m, np.float32), np.sqrt(np.maximum(m2 - m * m, 0.0)).astype(np.float32)


def _normconv(values: F32, weight: F32, r: int) -> F32:
    """Weighted local mean of `values` over pixels with weight 1 (normalised convolution).

    Computed on a grid `r / 4` times coarser and interpolated back: the background is
    smooth at that scale, and a window wide enough to reach powder from the middle of a
    large part would otherwise cost a full-resolution box filter each.
    """
    h, w = values.shape
    f = max(1, r // 4)
    size = (max(1, w // f), max(1, h // f))
    num = cv2.resize(values * weight, size, interpolation=cv2.INTER_AREA)
    den = cv2.resize(weight, size, interpolation=cv2.INTER_AREA)
    k = (2 * (r // f) + 1, 2 * (r // f) + 1)
    num = cv2.boxFilter(num, cv2.CV_32F, k, borderType=cv2.BORDER_REFLECT)
    den = cv2.boxFilter(den, cv2.CV_32F, k, borderType=cv2.BORDER_REFLECT)
    out = num / np.maximum(den, 1e-4)
    return np.asarray(cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR), np.float32)


def _fit_lda(
    x: F32, melt: BoolArray, powder: BoolArray, n: int, rng: np.random.Generator
) -> tuple[npt.NDArray[np.float64], float, float]:
    """Fisher discriminant melt vs powder: weights, offset (midpoint), separation."""
    def sample(m: BoolArray) -> npt.NDArray[np.float64]:
        idx = np.flatnonzero(m)
        if len(idx) > n:
            idx = rng.choice(idx, n, replace=False)
        return np.asarray(x.reshape(-1, x.shape[-1])[idx], np.float64)

    a, b = sample(melt), sample(powder)
    if len(a) < 10 or len(b) < 10:
        return np.zeros(x.shape[-1]), 0.0, 0.0
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov = 0.5 * (np.cov(a.T) + np.cov(b.T)) + 1e-6 * np.eye(x.shape[-1])
    w = np.linalg.solve(cov, mu_a - mu_b)
    sep = float(np.sqrt(max((mu_a - mu_b) @ w, 0.0)))
    return w, float(w @ (mu_a + mu_b) / 2), sep


def printed_area(
    image: npt.NDArray[np.generic],
    nominal: BoolArray,
    *,
    tolerance_px: int,
    params: PrintedParams = PrintedParams(),
) -> Printed:
    """Classify freshly melted pixels near the nominal area.

    Args:
        image: (H, W) grayscale camera image, any integer or float type.
        nominal: (H, W) nominal part area in the same pixels.
        tolerance_px: search zone = nominal grown by this many pixels.
    """
    img = np.asarray(image, dtype=np.float32)
    if not nominal.any():
        return Printed(np.zeros(img.shape, bool), 0, 0.0)
    p = params
    # Half resolution when the image is large: the features are box means and the
    # background is smooth, so this quarters the cost for under a pixel of edge error.
    scale = 2 if min(img.shape) >= 1024 else 1
    if scale > 1:
        small = np.asarray(cv2.resize(img, (img.shape[1] // scale, img.shape[0] // scale),
                                      interpolation=cv2.INTER_AREA), np.float32)
        nom = cv2.resize(nominal.astype(np.uint8), (small.shape[1], small.shape[0]),
                         interpolation=cv2.INTER_NEAREST).astype(bool)
    else:
        small, nom = img, nominal

    def px(v: int, lo: int = 1) -> int:
        return max(lo, round(v / scale))

    mean, spread = _local_mean_spread(small, px(p.smooth_px))
    nom_u8 = nom.astype(np.uint8)
    grown = cv2.dilate(nom_u8, _disk(px(p.margin_px)))
    powder = (grown == 0).astype(np.float32)
    b_mean = _normconv(mean, powder, px(p.background_px, 2))
    b_spread = _normconv(spread, powder, px(p.background_px, 2))
    # (h, w, 2): intensity relative to the powder around, log of roughness relative to it
    feats = np.dstack([mean - b_mean, np.log((spread + 1.0) / (b_spread + 1.0))])
    core = cv2.erode(nom_u8, _disk(px(p.margin_px))).astype(bool)
    if not core.any():
        core = nom
    ring = (cv2.dilate(nom_u8, _disk(px(p.margin_px + p.ring_px))) > 0) & (grown == 0)
    w, c, sep = _fit_lda(feats.astype(np.float32), core, ring, p.samples,
                         np.random.default_rng(0))
    if sep < p.min_separation:
        return Printed(np.zeros(img.shape, bool), 0, sep)
    score = (feats @ w.astype(np.float32) - np.float32(c)).astype(np.float32)
    vote = px(p.vote_px, 0)
    if vote:
        score = np.asarray(cv2.boxFilter(score, cv2.CV_32F, (2 * vote + 1, 2 * vote + 1)),
                           np.float32)
    tol = px(tolerance_px, 0)
    zone = cv2.dilate(nom_u8, _disk(tol)).astype(bool) if tol else nom
    m8 = ((score > 0) & zone).astype(np.uint8)
    if p.close_px > 0:
        k = _disk(px(p.close_px))
        m8 = cv2.morphologyEx(m8, cv2.MORPH_CLOSE, k)
        m8 = cv2.morphologyEx(m8, cv2.MORPH_OPEN, k)
    if p.fill_holes:
        m8 = _fill_holes(m8, nom)
    if scale > 1:
        m8 = cv2.resize(m8, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
    return Printed(m8.astype(bool), 1 if w[0] > 0 else -1, sep)


def _fill_holes(m8: npt.NDArray[np.uint8], nominal: BoolArray) -> npt.NDArray[np.uint8]:
    """Fill enclosed holes of the mask where they are nominal part (lighter blotches in a
    melt); a nominal hole, such as a ring's, stays open."""
    n, lab = cv2.connectedComponents((m8 == 0).astype(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    enclosed = np.ones(n, bool)
    enclosed[border] = False
    return np.where(enclosed[lab] & nominal, 1, m8).astype(np.uint8)
