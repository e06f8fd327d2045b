"""Decoding and normalisation of layer images, shared by serving and training."""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image

from monitor.errors import ImageError
from monitor.vision.stats import NO_DEFECT

MIN_SIDE = 16
# PIL only reads headers here; the pixel limit is ours (watch.max_pixels), not PIL's.
Image.MAX_IMAGE_PIXELS = None

# Formats whose end marker tells a complete file from one still being written.
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_JPEG_MAGIC = b"\xff\xd8\xff"


# What OpenCV would decode, by the magic bytes it looks at itself (it picks the decoder by
# content, not by name): only these four are decoded, each after its header's dimensions are
# checked. Everything else (Radiance HDR, PFM, PNM, EXR, WebP, JPEG 2000, ...) is refused
# unread: its size could not be checked before the decoder allocates it.
_FORMATS: tuple[tuple[bytes, str], ...] = (
    (_PNG_MAGIC, "PNG"),
    (_JPEG_MAGIC, "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
SUPPORTED = "PNG, JPEG, TIFF or BMP"


def sniff(data: bytes) -> str | None:
    """The image format the bytes start with (PNG, JPEG, TIFF, BMP), or None."""
    return next((name for magic, name in _FORMATS if data.startswith(magic)), None)


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, TIFF or BMP, without decoding pixels;
    None if the format is another one or the header cannot be read."""
    fmt = sniff(data)
    if fmt is None:
        return None
    try:
        # PIL warns about corrupt metadata (EXIF) on the way: the decoder reports the reason.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                return im.size
    except Exception:  # PIL raises many types on garbage; the decoder reports the reason
        return None


def check_size(data: bytes, *, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an image that may be decoded: one of the supported formats, whose
    header is readable and declares at most max_pixels. Raises ImageError otherwise."""
    fmt = sniff(data)
    if fmt is None:
        raise ImageError(f"not a supported image format (expected {SUPPORTED}; "
                         f"the file starts with {data[:8]!r})")
    size = header_size(data)
    if size is None:
        raise ImageError(f"{fmt} header unreadable (truncated or corrupt)")
    if size[0] * size[1] > max_pixels:
        raise ImageError(f"image header declares {size[0]}x{size[1]} pixels, over the limit "
                         f"of {max_pixels} (watch.max_pixels)")
    return size


def _check_complete(data: bytes) -> None:
    if data.startswith(_PNG_MAGIC) and not data.rstrip(b"\x00").endswith(_PNG_END):
        raise ImageError("truncated PNG (no IEND chunk)")
    if data.startswith(_JPEG_MAGIC) and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ImageError("truncated JPEG (no end-of-image marker)")


def to_unit_gray(img: np.ndarray) -> np.ndarray:
    """Any decoded OpenCV image -> (H, W) float32 in [0, 1]; colour becomes gray."""
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[:, :, 0]
        elif img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        elif img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
        else:
            raise ImageError(f"unsupported channel count {img.shape[2]}")
    elif img.ndim != 2:
        raise ImageError(f"unsupported image shape {img.shape}")
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    if img.dtype in (np.float32, np.float64):
        out = np.nan_to_num(img.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        hi = float(out.max()) if out.size else 0.0
        if hi > 1.0:  # float images of arbitrary scale: map the range onto [0, 1]
            out = out / hi
        return np.clip(out, 0.0, 1.0)
    raise ImageError(f"unsupported pixel type {img.dtype}")


def decode(data: bytes, *, max_pixels: int = 200_000_000) -> np.ndarray:
    """Image file bytes -> (H, W) float32 gray in [0, 1].

    Raises ImageError with the reason for empty, truncated, oversized or undecodable input.
    """
    if not data:
        raise ImageError("empty file")
    _check_complete(data)
    check_size(data, max_pixels=max_pixels)  # before the decoder allocates anything
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise ImageError(f"cannot decode image: {str(e).strip().splitlines()[-1]}") from e
    if img is None:
        raise ImageError("not a decodable image (unknown format or corrupt data)")
    gray = to_unit_gray(img)
    h, w = gray.shape
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ImageError(f"image is {w}x{h} pixels, smaller than {MIN_SIDE}x{MIN_SIDE}")
    if h * w > max_pixels:
        raise ImageError(f"image is {w}x{h} pixels, over the limit of {max_pixels}")
    return gray


def normalize(gray: np.ndarray, mean: float, std: float) -> np.ndarray:
    """The model's input normalisation; training and serving both call this."""
    return (gray - np.float32(mean)) / np.float32(std)


# Flat-field normalisation ("flat"): what differs between cameras is mostly a gain that varies
# slowly across the bed (lighting gradients, vignetting), an offset and an overall contrast.
# Dividing by a coarse background estimate and scaling by a robust spread leaves what a
# defect is made of: how a spot differs from its surroundings.
_BG_SIDE = 64  # the background is estimated on a copy whose long side is this many pixels
_BG_MEDIAN = 9  # median window on that copy: ~1/7 of the bed, larger than most defects
_SPREAD_FLOOR = 0.05  # relative units: an almost uniform bed is not blown up into noise
FLAT_CLIP = 8.0  # saturated glints and black holes end at +-8 spreads
# "flat-soft" compresses instead of clipping: y = 2 C tanh(x / 2C), C = FLAT_CLIP, the same
# as "flat" near the powder and bounded by 2 C. Clipped at C, a glossy over-melt (20 spreads
# over the powder on a classic synthetic bed) and a swelling's lit top (13) were the same 8.
FLAT_SOFT_BOUND = 2 * FLAT_CLIP
FLAT_NORMS = ("flat", "flat-soft")  # the weights' norm methods that flatten the layer


def background(gray: np.ndarray) -> np.ndarray:
    """The slowly varying brightness of the bed: a median on a coarse copy, smoothed and
    brought back to full size. (H, W) float32, never below 1/255."""
    h, w = gray.shape
    k = max(h, w) / _BG_SIDE
    small_w, small_h = max(3, round(w / k)), max(3, round(h / k))
    small = cv2.resize(gray, (small_w, small_h), interpolation=cv2.INTER_AREA)
    # An 8-bit copy: OpenCV's median takes windows larger than 5 only on 8-bit images.
    small8 = np.clip(small * 255.0 + 0.5, 0, 255).astype(np.uint8)
    med = cv2.medianBlur(small8, _BG_MEDIAN).astype(np.float32) / 255.0
    med = cv2.GaussianBlur(med, (0, 0), 1.5)
    bg = cv2.resize(med, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.asarray(np.maximum(bg, np.float32(1.0 / 255.0)))


def flat_terms(gray: np.ndarray) -> tuple[np.ndarray, float]:
    """The background and the spread that `flatten` divides a layer by."""
    g = gray.astype(np.float32, copy=False)
    bg = background(g)
    step = max(1, int(np.sqrt(g.size / 65536)))  # ~64k pixels are plenty for a MAD
    # Only the sample's ratio: apply_flat divides the whole layer once, later.
    sample = g[::step, ::step] / bg[::step, ::step] - np.float32(1.0)
    med = float(np.median(sample))
    return bg, max(1.4826 * float(np.median(np.abs(sample - med))), _SPREAD_FLOOR)


def apply_flat(gray: np.ndarray, bg: np.ndarray, spread: float, *,
               soft: bool = False) -> np.ndarray:
    """(gray / bg - 1) / spread, clipped to +-FLAT_CLIP (`soft`: compressed into
    +-FLAT_SOFT_BOUND); gray and bg of the same shape (a crop of both is fine: training
    crops a layer and pastes defects into it)."""
    out = gray.astype(np.float32) / bg
    out -= np.float32(1.0)
    out *= np.float32(1.0 / spread)
    if not soft:
        return np.asarray(np.clip(out, -FLAT_CLIP, FLAT_CLIP, out=out))
    out *= np.float32(1.0 / FLAT_SOFT_BOUND)
    np.tanh(out, out=out)
    out *= np.float32(FLAT_SOFT_BOUND)
    return np.asarray(out)


def flat_bound(method: str) -> float:
    """The largest magnitude a flat-normalised pixel takes by `method`."""
    return FLAT_SOFT_BOUND if method == "flat-soft" else FLAT_CLIP


def flatten(gray: np.ndarray, *, soft: bool = False) -> np.ndarray:
    """Flat-field normalised layer: (gray / background - 1) / spread, clipped to
    +-FLAT_CLIP (or compressed, `soft`). The spread is the robust standard deviation (1.4826
    MAD) of the ratio over a subsample of the layer, at least _SPREAD_FLOOR."""
    bg, spread = flat_terms(gray)
    return apply_flat(gray, bg, spread, soft=soft)


def model_input(gray: np.ndarray, method: str, mean: float, std: float) -> np.ndarray:
    """A whole layer as the model sees it, by the weights' normalisation method."""
    if method in FLAT_NORMS:
        return flatten(gray, soft=method == "flat-soft")
    return normalize(gray.astype(np.float32, copy=False), mean, std)


# BGR colours for the defect classes in overlays; no_defect is not drawn.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "swelling": (0, 0, 255),
    "spatter": (0, 255, 255),
    "misprint": (255, 0, 255),
    "over_melting": (0, 165, 255),
    "under_melting": (255, 128, 0),
}
_FALLBACK = (0, 255, 0)


def overlay(gray: np.ndarray, masks: np.ndarray, class_names: tuple[str, ...] | list[str],
            *, alpha: float = 0.5) -> np.ndarray:
    """(H, W) gray in [0, 1] and (C, H, W) masks -> (H, W, 3) uint8 BGR with classes tinted."""
    base = cv2.cvtColor((np.clip(gray, 0, 1) * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    out = base.astype(np.float32)
    for i, name in enumerate(class_names):
        if name == NO_DEFECT or not masks[i].any():
            continue
        colour = np.array(CLASS_COLOURS.get(name, _FALLBACK), dtype=np.float32)
        m = masks[i]
        out[m] = (1 - alpha) * out[m] + alpha * colour
    result: np.ndarray = out.astype(np.uint8)
    return result
