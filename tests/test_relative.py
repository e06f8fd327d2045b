"""Under- and over-melting read against their own part's grey level
(monitor.geometry.reading.relative, geometry.relative_k): grown over the spot the model saw
the core of, dropped where the mark is not darker (brighter) than its part, and
through the real daemon on and off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from monitor.geometry.reading import read_layer, relative
from monitor.vision.classes import DEFAULT_CLASS_NAMES
from tests.conftest import make_threshold_weights
from tests.test_reading import _part, _rig

NAMES = DEFAULT_CLASS_NAMES
U, OVER, S = (NAMES.index(c) for c in ("under_melting", "over_melting", "swelling"))


def _layer() -> np.ndarray:
    """Powder at 150, the 50x50 part at 100 with a little grain."""
    rng = np.random.default_rng(0)
    img = np.full((96, 96), 150.0, np.float32)
    img[_part()] = 100.0
    return img + rng.normal(0, 2, img.shape).astype(np.float32)


def test_a_dark_spot_is_grown_from_its_core_and_a_bright_one_too() -> None:
    img = _layer()
    img[30:45, 30:45] = 60.0  # a dark spot (15x15) inside the part
    img[50:60, 50:62] = 160.0  # a bright spot (10x12)
    masks = np.zeros((len(NAMES), 96, 96), bool)
    masks[U, 35:40, 35:40] = True  # the model saw the cores only
    masks[OVER, 53:56, 54:58] = True
    before = masks.copy()
    out = relative(masks, NAMES, img, _part(), k=3.0)
    assert out is not None
    np.testing.assert_array_equal(masks, before)  # the input is not modified
    # the whole spot, and at most the pixels its blurred edge reaches beyond it
    assert out[U, 30:45, 30:45].all() and not out[U, :29].any() and not out[U, 46:].any()
    assert out[U].sum() <= 17 * 17
    assert out[OVER, 50:60, 50:62].all() and out[OVER].sum() <= 14 * 16
    # the other classes are left alone; k = 0 is off
    np.testing.assert_array_equal(out[S], masks[S])
    assert relative(masks, NAMES, img, _part(), k=0.0) is None


def test_marks_not_darker_or_brighter_than_their_part_are_dropped() -> None:
    img = _layer()
    masks = np.zeros((len(NAMES), 96, 96), bool)
    masks[U, 30:40, 30:40] = True  # healthy melt marked under-melting
    masks[OVER, 50:60, 50:60] = True  # healthy melt marked over-melting
    masks[U, 80:90, 80:90] = True  # off the parts: not this reading's business
    out = relative(masks, NAMES, img, _part(), k=3.0)
    assert out is not None
    assert not out[U, 30:40, 30:40].any() and out[U, 80:90, 80:90].all()
    assert not out[OVER].any()


def test_over_melting_a_little_brighter_or_at_the_ceiling_is_kept() -> None:
    """A camera that compresses highlights shows an over-melted spot 1.5 part SDs brighter
    (kept: not grown, as under k); one that saturates the melt shows it no brighter than
    its part, both at the layer's brightest grey (kept). The same spot at 0.5 SDs goes."""
    for lift, kept in ((3.0, True), (1.0, False)):  # the grain's SD is 2: 1.5 and 0.5 SDs
        img = _layer()
        img[50:60, 50:60] += lift
        masks = np.zeros((len(NAMES), 96, 96), bool)
        masks[OVER, 52:58, 52:58] = True
        out = relative(masks, NAMES, img, _part(), k=3.0)
        got = masks[OVER] if out is None else out[OVER]
        assert got.sum() == (36 if kept else 0), (lift, got.sum())
    img = np.full((96, 96), 150.0, np.float32)
    img[_part()] = 255.0  # melt clipped, the spot too
    masks = np.zeros((len(NAMES), 96, 96), bool)
    masks[OVER, 50:60, 50:60] = True
    out = relative(masks, NAMES, img, _part(), k=3.0)
    assert out is None or np.array_equal(out[OVER], masks[OVER])


def test_a_whole_dark_coupon_is_no_under_melting() -> None:
    """A small part darker than the powder, marked whole: nothing of its own to be darker
    than (under 20 px left), so the mark stays; marked all but a rim of its own grey, it is
    not darker than that rim and goes."""
    img = np.full((96, 96), 150.0, np.float32)
    part = np.zeros((96, 96), bool)
    part[40:52, 40:52] = True
    img[part] = 90.0
    masks = np.zeros((len(NAMES), 96, 96), bool)
    masks[U, 40:52, 40:52] = True
    assert relative(masks, NAMES, img, part, k=3.0) is None
    masks[U] = False
    masks[U, 42:50, 42:50] = True
    out = relative(masks, NAMES, img, part, k=3.0)
    assert out is not None and not out[U].any()


def test_read_layer_applies_it_only_with_the_layer() -> None:
    img = _layer()
    img[30:45, 30:45] = 60.0
    masks = np.zeros((len(NAMES), 96, 96), bool)
    masks[U, 35:40, 35:40] = True
    assert read_layer(masks, NAMES, _part(), swelling_reach_px=1) is None
    out = read_layer(masks, NAMES, _part(), swelling_reach_px=1, gray=img, relative_k=3.0)
    assert out is not None and out[U, 30:45, 30:45].all() and out[U].sum() <= 17 * 17


@pytest.mark.parametrize("k", [3.0, 0.0])
def test_the_daemon_drops_under_melting_brighter_than_its_part(tmp_path: Path,
                                                               k: float) -> None:
    """Weights that mark bright shapes as under-melting; a bright box inside the part: not
    darker than its part, so no under-melting with geometry.relative_k on, 100 px off."""
    weights = make_threshold_weights(tmp_path / "w.safetensors", channel=U)
    rig = _rig(tmp_path, weights, f"relative_k = {k}")
    try:
        rig.start()
        rig.write(1, (30, 35, 10, 10))
        assert rig.listener is not None
        msg = rig.listener.layers()[1][0]
        assert msg["status"] == "ok", msg
        got = msg["classes"]["under_melting"]["pixel_count"]
        assert got == (0 if k else 100), got
    finally:
        rig.stop()
