from __future__ import annotations

import numpy as np
import pytest

from monitor.vision.stats import NO_DEFECT, class_stats, layer_stats


def test_empty_mask() -> None:
    s = class_stats("spatter", np.zeros((10, 10), bool), pixel_size_mm=0.1)
    assert (s.pixel_count, s.components, s.largest_component_px, s.area_fraction) == (0, 0, 0, 0)
    assert s.component_list == ()


def test_components_areas_boxes_and_centroids() -> None:
    m = np.zeros((20, 30), bool)
    m[2:5, 3:7] = True  # 12 px, centre (4.5, 3)
    m[10:20, 20:30] = True  # 100 px, centre (24.5, 14.5)
    m[0, 29] = True  # 1 px
    s = class_stats("swelling", m, pixel_size_mm=0.5)
    assert s.pixel_count == 113
    assert s.area_fraction == pytest.approx(113 / 600)
    assert s.area_mm2 == pytest.approx(113 * 0.25)
    assert s.components == 3
    assert s.largest_component_px == 100
    assert s.largest_component_mm2 == pytest.approx(25.0)
    big, mid, small = s.component_list
    assert (big.x, big.y, big.w, big.h, big.area_px) == (20, 10, 10, 10, 100)
    assert (big.cx, big.cy) == pytest.approx((24.5, 14.5))
    assert (mid.x, mid.y, mid.w, mid.h, mid.area_px) == (3, 2, 4, 3, 12)
    assert (mid.cx, mid.cy) == pytest.approx((4.5, 3.0))
    assert small.area_px == 1


def test_diagonal_pixels_are_one_component() -> None:
    m = np.eye(5, dtype=bool)
    assert class_stats("c", m, pixel_size_mm=1).components == 1


def test_component_list_is_capped_but_count_is_not() -> None:
    m = np.zeros((10, 40), bool)
    m[::3, ::3] = True
    s = class_stats("c", m, pixel_size_mm=1, max_components=5)
    assert s.components == 4 * 14 and len(s.component_list) == 5


def test_layer_stats_keys_and_shape_check() -> None:
    masks = np.zeros((2, 4, 6), bool)
    masks[1, 0, 0] = True
    st = layer_stats(masks, ["a", "b"], pixel_size_mm=0.1)
    assert (st.width, st.height) == (6, 4)
    assert st.summary()["b"]["pixel_count"] == 1
    with pytest.raises(ValueError, match="classes"):
        layer_stats(masks, ["a"], pixel_size_mm=0.1)


def test_components_match_labelling_the_whole_image() -> None:
    """Labelling only the box around the mask gives the components (boxes, areas,
    centroids) that labelling every pixel gives."""
    import cv2

    rng = np.random.default_rng(1)
    for trial in range(300):
        h, w = (int(v) for v in rng.integers(1, 200, 2))
        mask = rng.random((h, w)) < rng.choice([0.001, 0.02, 0.3, 0.9])
        if trial % 7 == 0:
            mask[:] = False
            mask[h - 1, w - 1] = True  # one pixel in the far corner
        got = class_stats("x", mask, pixel_size_mm=0.1, max_components=10**6)
        if not mask.any():
            assert got.components == 0
            continue
        n, _, boxes, cents = cv2.connectedComponentsWithStats(
            mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        want = sorted((*(int(v) for v in b[:5]), round(float(c[0]), 6), round(float(c[1]), 6))
                      for b, c in zip(boxes[1:], cents[1:], strict=True))
        have = sorted((c.x, c.y, c.w, c.h, c.area_px, round(c.cx, 6), round(c.cy, 6))
                      for c in got.component_list)
        assert have == want and got.components == n - 1, trial


@pytest.mark.parametrize("side", [64, 1100])  # below and above the size labelled in parallel
def test_no_defect_counts_area_only_and_classes_agree_in_parallel(side: int) -> None:
    rng = np.random.default_rng(side)
    masks = rng.random((4, side, side)) < np.array([0.97, 0.01, 0.002, 0.3])[:, None, None]
    names = [NO_DEFECT, "spatter", "swelling", "misprint"]
    st = layer_stats(masks, names, pixel_size_mm=0.1)
    nd = st.classes[NO_DEFECT]
    assert nd.pixel_count == np.count_nonzero(masks[0]) > 0
    assert nd.area_mm2 == pytest.approx(nd.pixel_count * 0.01)
    assert (nd.components, nd.largest_component_px, nd.component_list) == (0, 0, ())
    for i, name in enumerate(names[1:], start=1):
        assert st.classes[name] == class_stats(name, masks[i], pixel_size_mm=0.1)
        assert st.classes[name].components > 0
