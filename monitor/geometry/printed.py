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

    Returns the Fisher distance (shared covariance), the polarity (sign of the intensity
    weight) and the log-likelihood ratio melt : powder at every pixel (h, w). A linear
    discriminant says "rougher than powder" or "smoother"; dull melt on one part and
    speckled melt on the next are both unlike powder, which a covariance per class
    (blended with the shared one by `alpha`, 0 = linear) can say.
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
    return sep, 1 if w[0] > 0 else -1, out


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
    if not nominal.any():
        return Printed(np.zeros(np.shape(image), bool), 0, 0.0)
    p = params
    # Work in the parts' box grown by the background window: nothing outside it is
    # classified, and the powder it holds is what the background is estimated from.
    x, y, w, h = cv2.boundingRect(nominal.view(np.uint8))
    pad = 2 * max(p.background_px, p.margin_px + p.ring_px, tolerance_px)
    hh, ww = nominal.shape
    y0, y1, x0, x1 = max(0, y - pad), min(hh, y + h + pad), max(0, x - pad), min(ww, x + w + pad)
    if (y0, y1, x0, x1) != (0, hh, 0, ww):
        sub = printed_area(np.asarray(image)[y0:y1, x0:x1], nominal[y0:y1, x0:x1],
                           tolerance_px=tolerance_px, params=params)
        full = np.zeros((hh, ww), bool)
        full[y0:y1, x0:x1] = sub.mask
        return Printed(full, sub.polarity, sub.separation)
    img = np.asarray(image, dtype=np.float32)
    # Half resolution when the image is large: the features are box means and the
    # background is smooth, so this quarters the cost for under a pixel of edge error.
    scale = 2 if min(img.shape) >= 1024 else 1
    if scale > 1:
        small = np.asarray(cv2.resize(img, (img.shape[1] // scale, img.shape[0] // scale),
                                      interpolation=cv2.INTER_AREA), np.float32)
        nom = cv2.resize(nominal.view(np.uint8), (small.shape[1], small.shape[0]),
                         interpolation=cv2.INTER_NEAREST).astype(bool)
    else:
        small, nom = img, nominal

    def px(v: float, lo: int = 1) -> int:
        return max(lo, round(v / scale))

    # Signed distance to the nominal outline (px at this scale, + inside): every region
    # below (core, ring, search zone, prior) is a band of it; two distance transforms
    # instead of five morphological passes with large disks.
    nom_u8 = nom.view(np.uint8) if nom.dtype == np.bool_ else nom.astype(np.uint8)
    # (uint8: distances saturate at 255, far beyond every band)
    d_out = cv2.distanceTransform(1 - nom_u8, cv2.DIST_L2, 3, dstType=cv2.CV_8U)
    d_in = cv2.distanceTransform(nom_u8, cv2.DIST_L2, 3, dstType=cv2.CV_8U)
    margin = px(p.margin_px)
    core = d_in > margin
    if not core.any():
        core = nom
    ring = (d_out > margin) & (d_out <= margin + px(p.ring_px))
    powder = (d_out > margin).astype(np.float32)

    sq = small * small
    bg = _Background(powder, px(p.background_px, 2))
    feats: list[F32] = []
    for r in (p.smooth_px, p.coarse_px) if p.coarse_px else (p.smooth_px,):
        mean, spread = _mean_spread(small, sq, px(r))
        # intensity relative to the powder around, log of roughness relative to it
        feats.append(mean - bg(mean))
        feats.append(np.asarray(cv2.log((spread + 1.0) / (bg(spread) + 1.0)), np.float32))
    rng = np.random.default_rng(0)
    sep, polarity, score = _discriminant(
        feats, _sample(core, p.samples, rng), _sample(ring, p.samples, rng), p.quadratic)
    if sep < p.min_separation:
        return Printed(np.zeros(img.shape, bool), 0, sep)
    vote = px(p.vote_px, 0)
    if vote:
        score = np.asarray(cv2.boxFilter(score, cv2.CV_32F, (2 * vote + 1, 2 * vote + 1)),
                           np.float32)
    if p.prior:
        # nominal prior in log-odds, ramped over the registration uncertainty
        reg = max(0.5, p.registration_px / scale)
        sd = d_in.astype(np.float32) - d_out.astype(np.float32)
        score += np.float32(p.prior / reg) * np.clip(sd, -reg, reg)
    tol = px(tolerance_px, 0)
    m8 = ((score > 0) & (d_out <= tol)).view(np.uint8)
    if p.close_px > 0:
        k = _disk(px(p.close_px))
        m8 = np.asarray(cv2.morphologyEx(m8, cv2.MORPH_CLOSE, k), np.uint8)
        m8 = np.asarray(cv2.morphologyEx(m8, cv2.MORPH_OPEN, k), np.uint8)
    if p.fill_holes:
        m8 = _fill_holes(m8, nom)
    if scale > 1:
        m8 = np.asarray(cv2.resize(m8, (img.shape[1], img.shape[0]),
                                   interpolation=cv2.INTER_NEAREST), np.uint8)
    return Printed(m8.astype(bool), polarity, sep)


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
