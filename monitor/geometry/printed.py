"""Printed area: which pixels of a layer hold freshly melted metal.

Melt is brighter than powder on most cameras and darker on others (specular speckle on a
dull surface), lighting varies across the bed and ghosts of earlier layers show through
fresh powder, so no fixed threshold works. Each pixel is compared with the powder around
it: the powder's local mean and spread come from a normalised convolution over the pixels
outside the nominal parts (grown by a margin), which follows lighting gradients and the
chamber wall. The polarity (melt brighter or darker than powder) is decided per layer from
the nominal regions against that background, and a pixel is printed when its smoothed
intensity departs from the powder in that direction, or its texture (local spread) is well
above the powder's while its intensity leans the same way. Only pixels near the parts are
classified (the nominal grown by the tolerance and a reach beyond it, where melt is the
part's excess); the mask is then cleaned morphologically.
See docs/printed-area.md for the measurements behind the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from monitor.geometry.parts import disk

BoolArray = npt.NDArray[np.bool_]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class PrintedParams:
    """Knobs of the printed-area classifier, in full-resolution image pixels."""

    smooth_px: int = 4          # half-width of the fine mean/spread window (speckle scale)
    coarse_px: int = 12         # half-width of the coarse window (mottling of dull melt)
    vote_px: int = 6            # half-width over which pixel scores are averaged
    background_px: int = 120    # half-width of the powder background window
    margin_px: int = 6          # nominal grown by this is neither core nor ring (edges mix)
    ring_px: int = 30           # width of the powder ring sampled around the parts
    min_separation: float = 1.0  # Fisher distance core/ring below which nothing is printed
    quadratic: float = 0.6      # 0: one shared covariance (linear), 1: one per class
    prior: float = 1.0          # log-odds for melt inside the nominal, against outside it
    registration_px: float = 3.0  # the prior ramps from -prior to +prior over +-this
    excess_reach_px: int = 60   # melt is looked for this far beyond the tolerance (excess)
    part_k: float = 0.5         # a standing-out part's threshold: its ring's median + k sigma
    part_min_z: float = 2.0     # robust sigmas its inside must stand out by (<0: off)
    close_px: int = 2           # morphological close/open radius for the clean-up
    fill_holes: bool = True     # fill powder-looking holes enclosed by melt
    samples: int = 20000        # pixels sampled per class to fit the discriminant

    @property
    def bleed_px(self) -> int:
        """How far past a melt edge the box windows still call powder printed."""
        return self.coarse_px + self.vote_px


@dataclass(frozen=True)
class Printed:
    """A layer's printed mask (image pixels) and how it was decided."""

    mask: BoolArray       # (H, W) True = freshly melted
    polarity: int         # +1 melt brighter than powder, -1 darker, 0 nothing printed seen
    separation: float     # Fisher distance between nominal core and powder ring features


def _box(a: F32, r: int) -> F32:
    return np.asarray(cv2.boxFilter(a, cv2.CV_32F, (2 * r + 1, 2 * r + 1),
                                    borderType=cv2.BORDER_REFLECT), np.float32)


def _mean_spread(image: F32, image2: F32, r: int) -> tuple[F32, F32]:
    """Local mean and standard deviation in a (2r+1)² box."""
    m = _box(image, r)
    var = _box(image2, r) - m * m
    return m, np.asarray(cv2.sqrt(np.maximum(var, 0.0)), np.float32)


class _Background:
    """Weighted local means over the powder pixels (normalised convolution).

    Computed on a grid `r / 4` times coarser and interpolated back: the background is
    smooth at that scale, and a window wide enough to reach powder from the middle of a
    large part would otherwise cost a full-resolution box filter each.
    """

    def __init__(self, weight: F32, r: int) -> None:
        self.shape = weight.shape
        f = max(1, r // 4)
        self.size = (max(1, weight.shape[1] // f), max(1, weight.shape[0] // f))
        self.k = (2 * (r // f) + 1, 2 * (r // f) + 1)
        self.weight = weight
        den = cv2.resize(weight, self.size, interpolation=cv2.INTER_AREA)
        self.den = np.maximum(cv2.boxFilter(den, cv2.CV_32F, self.k,
                                            borderType=cv2.BORDER_REFLECT), 1e-4)

    def __call__(self, values: F32) -> F32:
        num = cv2.resize(values * self.weight, self.size, interpolation=cv2.INTER_AREA)
        num = cv2.boxFilter(num, cv2.CV_32F, self.k, borderType=cv2.BORDER_REFLECT)
        # nearest: the background moves by a fraction of a grey level per cell, and
        # linear interpolation back to full size costs as much as the rest of the call
        return np.asarray(cv2.resize(num / self.den, (self.shape[1], self.shape[0]),
                                     interpolation=cv2.INTER_NEAREST), np.float32)


def _sample(mask: BoolArray, n: int, rng: np.random.Generator) -> npt.NDArray[np.intp]:
    idx = np.flatnonzero(mask)
    return rng.choice(idx, n, replace=False) if len(idx) > n else idx


def _discriminant(
    feats: list[F32], melt: npt.NDArray[np.intp], powder: npt.NDArray[np.intp], alpha: float
) -> tuple[float, int, F32]:
    """Melt vs powder as two Gaussians fitted on sampled pixels.

    Returns the Fisher distance (shared covariance), the polarity (+1 when the melt's mean
    intensity is above the powder's) and the log-likelihood ratio melt : powder at every
    pixel (h, w). A linear discriminant says "rougher than powder" or "smoother"; dull melt
    on one part and speckled melt on the next are both unlike powder, which a covariance
    per class (blended with the shared one by `alpha`, 0 = linear) can say.
    """
    shape = feats[0].shape
    a = np.stack([f.ravel()[melt] for f in feats], 1).astype(np.float64)
    b = np.stack([f.ravel()[powder] for f in feats], 1).astype(np.float64)
    if len(a) < 10 or len(b) < 10:
        return 0.0, 0, np.zeros(shape, np.float32)
    d = len(feats)
    eye = 1e-6 * np.eye(d)
    ca, cb = np.cov(a.T) + eye, np.cov(b.T) + eye
    pooled = 0.5 * (ca + cb)
    mu_a, mu_b = a.mean(0), b.mean(0)
    w = np.linalg.solve(pooled, mu_a - mu_b)
    sep = float(np.sqrt(max((mu_a - mu_b) @ w, 0.0)))
    # llr(x) = x' Q x + l' x + c, from -1/2 (x-ma)' A (x-ma) + 1/2 (x-mb)' B (x-mb) + ...
    q = np.zeros((d, d))
    lin = np.zeros(d)
    const = 0.0
    for sign, mu, c in ((1.0, mu_a, ca), (-1.0, mu_b, cb)):
        cov = alpha * c + (1 - alpha) * pooled
        inv = np.linalg.inv(cov)
        q -= sign * 0.5 * inv
        lin += sign * inv @ mu
        const -= sign * 0.5 * (mu @ inv @ mu + np.linalg.slogdet(cov)[1])
    # evaluated as a polynomial on the (h, w) planes: an einsum over (h, w, d) is 10x slower
    # (Horner per row of Q, in place: cv2.scaleAdd is one pass, numpy's a*x + y two)
    out = np.full(shape, np.float32(const), np.float32)
    acc = np.empty(shape, np.float32)
    for i in range(d):
        np.multiply(feats[i], np.float32(q[i, i]), out=acc)
        acc += np.float32(lin[i])
        for j in range(i + 1, d):
            cv2.scaleAdd(feats[j], float(2 * q[i, j]), acc, dst=acc)
        np.multiply(acc, feats[i], out=acc)
        out += acc
    # polarity from the class means, not the discriminant's weight: the fine and coarse
    # intensities are nearly collinear, and the weight's sign of either can flip
    return sep, 1 if mu_a[0] > mu_b[0] else -1, out


def _px(v: float, scale: int, lo: int = 1) -> int:
    """`v` full-resolution pixels at the working scale, at least `lo`."""
    return max(lo, round(v / scale))


def _downscale(img: F32, nominal: BoolArray) -> tuple[F32, BoolArray, int]:
    """Half resolution when the image is large: the features are box means and the
    background is smooth, so this quarters the cost for under a pixel of edge error."""
    scale = 2 if min(img.shape) >= 1024 else 1
    if scale == 1:
        return img, nominal, 1
    small = np.asarray(cv2.resize(img, (img.shape[1] // scale, img.shape[0] // scale),
                                  interpolation=cv2.INTER_AREA), np.float32)
    nom = cv2.resize(nominal.view(np.uint8), (small.shape[1], small.shape[0]),
                     interpolation=cv2.INTER_NEAREST).astype(bool)
    return small, nom, scale


@dataclass(frozen=True)
class _Bands:
    """Regions of the working image, each a band of the signed distance to the outline."""

    d_out: npt.NDArray[Any]       # uint8 distance outside the nominal (working-scale px)
    d_in: npt.NDArray[Any]        # uint8 distance inside it
    core: BoolArray               # nominal, away from its edge: the melt samples
    ring: BoolArray               # powder around the parts: the powder samples
    powder: F32                   # 1 outside the nominal grown by the margin: the background


def _bands(nom: BoolArray, p: PrintedParams, scale: int) -> _Bands:
    # Signed distance to the nominal outline (px at this scale, + inside): every region
    # below (core, ring, search zone, prior) is a band of it; two distance transforms
    # instead of five morphological passes with large disks.
    nom_u8 = nom.view(np.uint8) if nom.dtype == np.bool_ else nom.astype(np.uint8)
    # (uint8: distances saturate at 255, far beyond every band)
    d_out = cv2.distanceTransform(1 - nom_u8, cv2.DIST_L2, 3, dstType=cv2.CV_8U)
    d_in = cv2.distanceTransform(nom_u8, cv2.DIST_L2, 3, dstType=cv2.CV_8U)
    margin = _px(p.margin_px, scale)
    core = d_in > margin
    if not core.any():
        core = nom
    ring = (d_out > margin) & (d_out <= margin + _px(p.ring_px, scale))
    powder = (d_out > margin).astype(np.float32)
    return _Bands(d_out, d_in, core, ring, powder)


def _features(small: F32, powder: F32, p: PrintedParams, scale: int) -> list[F32]:
    """Per pixel, at each window: intensity and log roughness, relative to the powder."""
    sq = small * small
    bg = _Background(powder, _px(p.background_px, scale, 2))
    feats: list[F32] = []
    for r in (p.smooth_px, p.coarse_px) if p.coarse_px else (p.smooth_px,):
        mean, spread = _mean_spread(small, sq, _px(r, scale))
        # intensity relative to the powder around, log of roughness relative to it
        feats.append(mean - bg(mean))
        feats.append(np.asarray(cv2.log((spread + 1.0) / (bg(spread) + 1.0)), np.float32))
    return feats


def _vote(score: F32, p: PrintedParams, scale: int) -> F32:
    """Pixel scores averaged over the vote window."""
    vote = _px(p.vote_px, scale, 0)
    if not vote:
        return score
    return np.asarray(cv2.boxFilter(score, cv2.CV_32F, (2 * vote + 1, 2 * vote + 1)),
                      np.float32)


def _group_quantiles(values: F32, groups: npt.NDArray[np.integer[Any]], n: int,
                     qs: tuple[float, ...]) -> npt.NDArray[np.float64]:
    """(len(qs), n): the quantiles of `values` per group id 0..n-1 (nan for an empty
    group)."""
    v = values.astype(np.float64)
    g = groups
    out = np.full((len(qs), n), np.nan)
    if not len(v):
        return out
    # one sort on group, then value: the values squeezed into [0, 0.5) of each group's unit
    lo, span = float(v.min()), float(np.ptp(v)) or 1.0
    order = np.argsort(g + 0.5 * (v - lo) / span * (1 - 1e-9), kind="stable")
    v = v[order]
    count = np.bincount(g, minlength=n)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    has = count > 0
    for i, q in enumerate(qs):
        out[i, has] = v[start[has] + np.floor(q * (count[has] - 1)).astype(np.int64)]
    return out


def _part_shift(score: F32, bands: _Bands, p: PrintedParams) -> F32 | None:
    """Per part, how far its threshold drops below the layer's (0 outside the parts).

    The discriminant is fitted on all parts at once, so a part whose melt is fainter than
    the others' (a thin ring, dull bars) scores below 0 over much of its area although it
    plainly differs from the powder around it. Each part is therefore also read against
    its own ring of powder: when its inside as a whole stands out (medians `part_min_z`
    robust sigmas apart), a pixel of it counts as printed once it scores above the ring's
    median + `part_k` sigma. A part that looks like its own powder (gone missing, not
    exposed) keeps the layer's threshold. None when no part's threshold moves.
    """
    nom = bands.d_in > 0
    n, lab_any = cv2.connectedComponents(nom.view(np.uint8), connectivity=8)
    lab: npt.NDArray[np.int32] = np.asarray(lab_any, np.int32)
    # every powder pixel to the part of its nearest nominal pixel
    _, near_any = cv2.distanceTransformWithLabels((~nom).view(np.uint8), cv2.DIST_L2, 3,
                                                  labelType=cv2.DIST_LABEL_PIXEL)
    near: npt.NDArray[np.int32] = np.asarray(near_any, np.int32)
    flat_nom = np.flatnonzero(nom)
    part_of = np.zeros(int(near.max()) + 1, np.int32)
    part_of[near.ravel()[flat_nom]] = lab.ravel()[flat_nom]
    # quantiles from evenly strided samples: a few thousand pixels per part are plenty
    ring, core = np.flatnonzero(bands.ring), np.flatnonzero(bands.core)
    ring, core = ring[::max(1, len(ring) // 32768)], core[::max(1, len(core) // 32768)]
    flat = score.ravel()
    q25, med, q75 = _group_quantiles(flat[ring], part_of[near.ravel()[ring]], n,
                                     (0.25, 0.5, 0.75))
    sigma = (q75 - q25) / 1.349
    (inside,) = _group_quantiles(flat[core], lab.ravel()[core], n, (0.5,))
    with np.errstate(invalid="ignore"):
        stands_out = (inside - med) >= p.part_min_z * np.maximum(sigma, 1e-3)
        # the threshold on the score before the prior, which deep inside is -prior
        drop = np.where(stands_out, np.maximum(0.0, -p.prior - (med + p.part_k * sigma)), 0.0)
    drop = np.nan_to_num(drop).astype(np.float32)
    drop[0] = 0.0
    return drop[lab] if drop.any() else None


def _with_prior(score: F32, shift: F32 | None, bands: _Bands, p: PrintedParams,
                scale: int) -> F32:
    """Scores plus the nominal prior and the parts' threshold shifts, both ramped over
    the registration uncertainty at the outline."""
    if not p.prior and shift is None:
        return score
    reg = max(0.5, p.registration_px / scale)
    sd = bands.d_in.astype(np.float32) - bands.d_out.astype(np.float32)
    ramp = np.clip(sd, -reg, reg) / reg
    if p.prior:
        score = score + np.float32(p.prior) * ramp
    if shift is not None:
        score = score + shift * np.clip(ramp, 0.0, 1.0)
    return score


def _clean(m8: npt.NDArray[np.uint8], nom: BoolArray, p: PrintedParams,
           scale: int) -> npt.NDArray[np.uint8]:
    """Morphological close and open, then the powder-looking holes filled."""
    if p.close_px > 0:
        k = disk(_px(p.close_px, scale))
        m8 = np.asarray(cv2.morphologyEx(m8, cv2.MORPH_CLOSE, k), np.uint8)
        m8 = np.asarray(cv2.morphologyEx(m8, cv2.MORPH_OPEN, k), np.uint8)
    if p.fill_holes:
        m8 = _fill_holes(m8, nom)
    return m8


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
        tolerance_px: the nominal grown by this many pixels is the part's zone; melt is
            searched for `params.excess_reach_px` further out.
    """
    if not nominal.any():
        return Printed(np.zeros(np.shape(image), bool), 0, 0.0)
    p = params
    # Work in the parts' box grown by the background window: nothing outside it is
    # classified, and the powder it holds is what the background is estimated from.
    x, y, w, h = cv2.boundingRect(nominal.view(np.uint8))
    pad = 2 * max(p.background_px, p.margin_px + p.ring_px,
                  tolerance_px + p.excess_reach_px)
    hh, ww = nominal.shape
    y0, y1, x0, x1 = max(0, y - pad), min(hh, y + h + pad), max(0, x - pad), min(ww, x + w + pad)
    if (y0, y1, x0, x1) != (0, hh, 0, ww):
        sub = printed_area(np.asarray(image)[y0:y1, x0:x1], nominal[y0:y1, x0:x1],
                           tolerance_px=tolerance_px, params=params)
        full = np.zeros((hh, ww), bool)
        full[y0:y1, x0:x1] = sub.mask
        return Printed(full, sub.polarity, sub.separation)
    img = np.asarray(image, dtype=np.float32)
    small, nom, scale = _downscale(img, nominal)
    bands = _bands(nom, p, scale)
    feats = _features(small, bands.powder, p, scale)
    rng = np.random.default_rng(0)
    sep, polarity, score = _discriminant(
        feats, _sample(bands.core, p.samples, rng), _sample(bands.ring, p.samples, rng),
        p.quadratic)
    if sep < p.min_separation:
        return Printed(np.zeros(img.shape, bool), 0, sep)
    score = _vote(score, p, scale)
    shift = _part_shift(score, bands, p) if p.part_min_z >= 0 else None
    score = _with_prior(score, shift, bands, p, scale)
    # Searched beyond the tolerance too: melt there is the part's excess (distortion,
    # swelling, exposure outside the part), which part_excess alarms on.
    reach = _px(tolerance_px + p.excess_reach_px, scale, 0)
    m8 = _clean(((score > 0) & (bands.d_out <= reach)).view(np.uint8), nom, p, scale)
    if p.excess_reach_px > 0:
        m8 = _attached(m8, bands, _px(tolerance_px, scale, 0), _px(p.bleed_px, scale))
    if scale > 1:
        m8 = np.asarray(cv2.resize(m8, (img.shape[1], img.shape[0]),
                                   interpolation=cv2.INTER_NEAREST), np.uint8)
    return Printed(m8.astype(bool), polarity, sep)


def _attached(m8: npt.NDArray[np.uint8], bands: _Bands, tol: int, bleed: int
              ) -> npt.NDArray[np.uint8]:
    """Beyond the tolerance, only melt that reaches past the classifier's bleed and is
    continuous with a part's own: a distorted or swollen part's melt runs on past its
    outline, while a glint at the plate's rim, a ghost or a soot patch a few pixels off
    stands alone, and the rim the box windows draw along every outline (up to `bleed`
    beyond it) is not melt. Where such melt is kept, the band that joins it to its part is
    kept with it."""
    outer = (m8 > 0) & (bands.d_out > tol)
    if not outer.any():
        return m8
    far = outer & (bands.d_out > tol + bleed)
    keep = np.zeros(m8.shape, bool)
    if far.any():
        n, lab = cv2.connectedComponents(m8, connectivity=8)
        touching = np.zeros(n, bool)
        touching[lab[(m8 > 0) & (bands.d_in > 0)]] = True
        touching[0] = False
        far &= touching[lab]
        if far.any():
            near = cv2.dilate(far.view(np.uint8), disk(bleed + 1)) > 0
            keep = far | (outer & near)
    out = m8.copy()
    out[outer & ~keep] = 0
    return out


def _fill_holes(m8: npt.NDArray[np.uint8], nominal: BoolArray,
                max_share: float = 0.3) -> npt.NDArray[np.uint8]:
    """Fill enclosed holes of the mask where they are nominal part (lighter blotches in a
    melt); a nominal hole, such as a ring's, stays open, and so does a hole that is most of
    its part: a part gone missing among printed neighbours is powder, not a blotch."""
    n, lab = cv2.connectedComponents((m8 == 0).view(np.uint8), connectivity=4)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    enclosed = np.ones(n, bool)
    enclosed[border] = False
    cand = enclosed[lab] & nominal
    if not cand.any():
        return m8
    k, parts = cv2.connectedComponents(nominal.view(np.uint8), connectivity=8)
    part_area = np.bincount(parts.ravel(), minlength=k)
    hole, part = lab[cand], parts[cand]
    # each hole's pixels per part it lies in, against that part's nominal area
    key = hole.astype(np.int64) * k + part
    uniq, count = np.unique(key, return_counts=True)
    small = count <= max_share * part_area[uniq % k]
    ok = np.zeros(n * k, bool)
    ok[uniq[small]] = True
    fill = np.zeros(m8.shape, bool)
    fill[cand] = ok[key]
    return np.where(fill, 1, m8).astype(np.uint8)
