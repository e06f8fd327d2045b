"""Random and mutated image bytes through decoding and statistics: only ImageError escapes."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.errors import ImageError
from monitor.vision.classes import DEFAULT_CLASS_NAMES
from monitor.vision.imaging import decode
from monitor.vision.stats import layer_stats
from tests.conftest import encode, layer_image

SEEDS = {ext: encode(layer_image(3, 48), ext) for ext in (".png", ".jpg", ".tif", ".bmp")}


def _check(data: bytes) -> None:
    try:
        gray = decode(data, max_pixels=1_000_000)
    except ImageError as e:
        assert str(e)  # a reason to store and publish
        return
    assert gray.ndim == 2 and gray.dtype == np.float32
    assert np.isfinite(gray).all() and gray.min() >= 0.0 and gray.max() <= 1.0
    masks = np.stack([gray > t for t in np.linspace(0.1, 0.9, len(DEFAULT_CLASS_NAMES))])
    stats = layer_stats(masks, DEFAULT_CLASS_NAMES, pixel_size_mm=0.1)
    assert all(0.0 <= c.area_fraction <= 1.0 for c in stats.classes.values())


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _check(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(SEEDS)), st.lists(
    st.tuples(st.integers(min_value=0, max_value=10_000), st.integers(0, 255)), max_size=12),
    st.integers(min_value=0, max_value=10_000))
def test_mutated_images(ext: str, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(SEEDS[ext])
    for pos, value in flips:
        data[pos % len(data)] = value
    _check(bytes(data[: max(1, len(data) - cut)]))
