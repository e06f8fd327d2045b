"""Compact defect maps keep every defect pixel's block, at a bounded size."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.reports.maps import decode_masks, decode_thumb, encode_map


def test_round_trip_keeps_small_defects() -> None:
    gray = np.linspace(0, 1, 1000 * 1500, dtype=np.float32).reshape(1000, 1500)
    masks = np.zeros((6, 1000, 1500), bool)
    masks[2, 500, 700] = True  # a one-pixel speck
    masks[4, 100:300, 0:50] = True
    enc = encode_map(gray, masks, max_side=500)
    assert enc.scale == 3
    got = decode_masks(enc.mask_png, 6)
    assert got.shape == (6, 334, 500)
    assert got[2].sum() == 1 and got[2, 500 // 3, 700 // 3]  # the speck survives
    assert got[4, 40:90, 0:16].all() and not got[[0, 1, 3, 5]].any()
    thumb = decode_thumb(enc.thumb_jpeg)
    assert thumb.shape == (334, 500) and thumb[0, 0] < 0.05 and thumb[-1, -1] > 0.95
    assert len(enc.mask_png) < 5_000  # compact


def test_more_than_eight_classes_and_too_many() -> None:
    masks = np.zeros((12, 40, 40), bool)
    masks[11, 5:9, 5:9] = True
    enc = encode_map(np.zeros((40, 40), np.float32), masks)
    assert enc.scale == 1 and decode_masks(enc.mask_png, 12)[11, 5:9, 5:9].all()
    with pytest.raises(ValueError, match="at most 16"):
        encode_map(np.zeros((8, 8), np.float32), np.zeros((17, 8, 8), bool))


def test_reduce_any_keeps_every_speck_at_any_size_and_scale() -> None:
    """The fast reduction equals the plain definition (any pixel of each block, the last
    row and column of blocks padded) on random masks of odd sizes and scales."""
    import math

    from monitor.reports.maps import _reduce_any

    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        scale = int(rng.integers(1, 40))
        mask = rng.random((h, w)) < rng.choice([0.0, 0.0005, 0.01, 0.5])
        ph, pw = math.ceil(h / scale) * scale, math.ceil(w / scale) * scale
        padded = np.zeros((ph, pw), bool)
        padded[:h, :w] = mask
        want = padded.reshape(ph // scale, scale, pw // scale, scale).any(axis=(1, 3))
        assert (_reduce_any(mask, scale) == want).all(), (h, w, scale)
