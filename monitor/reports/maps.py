"""Compact per-layer defect maps and camera thumbnails, so reports and the dashboard can draw
a build without its original images.

A map is one PNG whose pixel bits are the classes (bit i = class i of the model), at the
thumbnail's resolution. Masks are reduced with "any pixel in the block" rather than averaged,
so a spatter speck smaller than a block still shows. The thumbnail is a JPEG of the camera
image at the same resolution.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from monitor.records import EncodedMap

MAX_SIDE = 512


def _reduce_any(mask: np.ndarray, scale: int) -> np.ndarray:
    """(H, W) bool -> (ceil(H/s), ceil(W/s)) bool, True where any pixel of the block is."""
    if scale == 1:
        return mask
    h, w = mask.shape
    oh, ow = math.ceil(h / scale), math.ceil(w / scale)
    if not mask.any():
        return np.zeros((oh, ow), bool)
    # OpenCV's area interpolation at an integer factor is the block mean, and a mean above
    # zero is "any": some fifteen times faster than numpy's any() over a reshaped view. In
    # 8 bits, one pixel of 255 in a block of up to 15x15 still averages to at least 1.
    small = scale <= 15
    if small and (oh * scale, ow * scale) == (h, w):
        padded = mask.view(np.uint8) * np.uint8(255)  # no padding: one pass
    else:
        padded = np.zeros((oh * scale, ow * scale), np.uint8 if small else np.float32)
        padded[:h, :w] = mask
        if small:
            padded *= 255
    out: np.ndarray = cv2.resize(padded, (ow, oh), interpolation=cv2.INTER_AREA) > 0
    return out


def encode_map(gray: np.ndarray, masks: np.ndarray, *, max_side: int = MAX_SIDE,
               jpeg_quality: int = 85) -> EncodedMap:
    """gray (H, W) float in [0, 1] and masks (C, H, W) bool (C <= 16) -> compact map."""
    c, h, w = masks.shape
    if c > 16:
        raise ValueError(f"{c} classes: a map holds at most 16")
    scale = max(1, math.ceil(max(h, w) / max_side))
    small = [_reduce_any(masks[i], scale) for i in range(c)]
    mh, mw = small[0].shape
    bits = np.zeros((mh, mw), np.uint8 if c <= 8 else np.uint16)
    for i, m in enumerate(small):
        bits[m] |= 1 << i
    ok, png = cv2.imencode(".png", bits)
    # Reduce first, then convert: 16x fewer pixels to clip and scale.
    thumb = cv2.resize(gray.astype(np.float32, copy=False), (mw, mh),
                       interpolation=cv2.INTER_AREA)
    thumb = (np.clip(thumb, 0, 1) * 255 + 0.5).astype(np.uint8)
    ok2, jpg = cv2.imencode(".jpg", thumb, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not (ok and ok2):
        raise ValueError("could not encode the layer map")
    return EncodedMap(scale, png.tobytes(), jpg.tobytes())


def decode_masks(mask_png: bytes, n_classes: int) -> np.ndarray:
    """The map's (C, h, w) bool masks."""
    bits = cv2.imdecode(np.frombuffer(mask_png, np.uint8), cv2.IMREAD_UNCHANGED)
    if bits is None:
        raise ValueError("not a layer map")
    b = np.asarray(bits, dtype=np.int64)
    return np.stack([np.bitwise_and(np.right_shift(b, i), 1) for i in range(n_classes)]
                    ).astype(bool)


def decode_thumb(thumb_jpeg: bytes) -> np.ndarray:
    """The thumbnail as (h, w) float32 gray in [0, 1]."""
    img = cv2.imdecode(np.frombuffer(thumb_jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError("not a thumbnail")
    return img.astype(np.float32) / 255.0
