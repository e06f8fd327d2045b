from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from monitor.errors import ConfigError, DeviceError
from monitor.vision.segmenter import Segmenter, tile_spans
from tests.conftest import make_weights


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [(100, 128, 16), (128, 128, 16), (129, 128, 16), (1000, 256, 64), (4096, 1024, 64),
     (2048, 1024, 64), (5000, 512, 0)],
)
def test_tile_spans_partition_the_axis(length: int, tile: int, overlap: int) -> None:
    spans = tile_spans(length, tile, overlap)
    keeps = [(k0, k1) for _, _, k0, k1 in spans]
    assert keeps[0][0] == 0 and keeps[-1][1] == length
    assert all(a[1] == b[0] for a, b in itertools.pairwise(keeps))
    sizes = {stop - start for start, stop, _, _ in spans}
    assert len(sizes) == 1  # one tile shape per side: batches and compiled shapes are shared
    (size,) = sizes
    if length > tile:
        # Tiles no bigger than asked, and no more pixels than the overlap requires.
        assert size <= tile and size % 16 == 0
        assert len(spans) * size < length + (len(spans) - 1) * overlap + 16 * len(spans)
    else:
        assert size == -(-length // 16) * 16
    for start, stop, k0, k1 in spans:
        assert start <= k0 < k1 <= stop
        if length > tile:
            assert stop <= length
            # Kept pixels are at least half an overlap away from an inner tile edge.
            if k0 > 0:
                assert k0 - start >= overlap // 2
            if k1 < length:
                assert stop - k1 >= overlap // 2


@pytest.mark.parametrize("shape", [(16, 16), (37, 53), (100, 300), (300, 100)])
def test_any_size_in_same_size_out(tiny_weights: Path, shape: tuple[int, int]) -> None:
    seg = Segmenter(tiny_weights, device="cpu", tile_size=128, tile_overlap=32)
    out = seg.predict(np.random.default_rng(0).random(shape, dtype=np.float32))
    assert out.probs.shape == (6, *shape) and out.masks.shape == (6, *shape)
    assert out.masks.dtype == bool
    assert out.probs.min() >= 0.0 and out.probs.max() <= 1.0


def test_tiled_matches_whole_image_inference(tiny_weights: Path) -> None:
    img = np.random.default_rng(1).random((200, 232), dtype=np.float32)
    whole = Segmenter(tiny_weights, device="cpu", tile_size=256, tile_overlap=0).predict(img)
    tiled = Segmenter(tiny_weights, device="cpu", tile_size=128, tile_overlap=48).predict(img)
    # Seams sit in the middle of overlaps; the tiny net's receptive field reaches a bit past
    # them, so allow small differences but not wrong tiles.
    assert np.abs(whole.probs - tiled.probs).mean() < 0.01


def test_thresholds_per_class(tmp_path: Path) -> None:
    w = make_weights(tmp_path / "c.safetensors", constant_prob={1: 0.6, 2: 0.6})
    seg = Segmenter(w, device="cpu", threshold=0.5, thresholds={"spatter": 0.7})
    out = seg.predict(np.zeros((32, 32), np.float32))
    assert out.masks[1].all() and not out.masks[2].any() and not out.masks[0].any()
    assert np.allclose(out.probs[1], 0.6, atol=1e-4)


def test_masks_without_probabilities_are_the_probabilities_thresholded(
        tiny_weights: Path) -> None:
    """The daemon's path (masks cut on the logits, no probabilities kept) gives the masks that
    thresholding the probabilities gives, tile by tile, at every threshold including 0 and 1."""
    thresholds = {"no_defect": 0.0, "swelling": 1.0, "spatter": 0.3, "misprint": 0.5,
                  "over_melting": 0.51, "under_melting": 0.9}
    seg = Segmenter(tiny_weights, device="cpu", tile_size=128, tile_overlap=32,
                    thresholds=thresholds)
    img = np.random.default_rng(3).random((300, 260), dtype=np.float32)
    fast = seg.predict(img, probs=False)
    full = seg.predict(img)
    assert fast.probs is None and full.probs is not None
    assert np.array_equal(fast.masks, full.masks)
    want = full.probs >= seg.thresholds[:, None, None]
    # A float32 sigmoid rounds: only pixels within a rounding step of the cut may differ.
    near = np.abs(full.probs - seg.thresholds[:, None, None]) < 1e-6
    assert np.array_equal(fast.masks[~near], want[~near])
    assert fast.masks[0].all() and not fast.masks[1].any()
    assert 0 < fast.masks[2:].mean() < 1


def test_unknown_class_in_thresholds(tiny_weights: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.thresholds\.cracks"):
        Segmenter(tiny_weights, device="cpu", thresholds={"cracks": 0.5})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu(tiny_weights: Path) -> None:
    with pytest.raises(DeviceError, match=r"model\.device"):
        Segmenter(tiny_weights, device="cuda")


def test_auto_device_logs_what_it_uses(tiny_weights: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    seg = Segmenter(tiny_weights, device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert seg.device.type == expected
    assert seg.info.sha256[:12] in caplog.text
    assert (" on cpu" in caplog.text) if expected == "cpu" else ("autocast" in caplog.text)


def test_small_components_dropped_per_class(tmp_path: Path) -> None:
    from monitor.config import parse_config
    from monitor.vision.segmenter import drop_small_components
    from tests.conftest import make_threshold_weights

    mask = np.zeros((20, 20), bool)
    mask[1:3, 1:3] = True  # 4 px
    mask[10:15, 10:15] = True  # 25 px
    kept, _ = drop_small_components(mask, 5)
    assert kept[10:15, 10:15].all() and kept.sum() == 25
    w = make_threshold_weights(tmp_path / "w.safetensors")  # swelling where bright
    gray = np.full((64, 64), 0.4, np.float32)
    gray[5:7, 5:7] = 0.9  # a 4 px speck: 0.04 mm² at 0.1 mm per pixel
    gray[30:40, 30:40] = 0.9  # 1 mm²
    cfg = parse_config({"model": {"weights": str(w), "device": "cpu",
                                  "min_component_mm2": {"swelling": 0.1}}}, base_dir=tmp_path)
    masks = Segmenter.from_config(cfg).predict(gray).masks
    assert masks[1].sum() == 100 and not masks[1, 5:7, 5:7].any()
    bad = parse_config({"model": {"weights": str(w), "min_component_mm2": {"crack": 1.0}}},
                       base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"model\.min_component_mm2\.crack"):
        Segmenter.from_config(bad)


def test_batched_prediction_matches_one_at_a_time(tiny_weights: Path) -> None:
    """A backlog through the model together (GPU batching; here on the CPU) gives each layer
    what it gets alone: mixed sizes, tiled and whole, batches that split a layer's tiles."""
    one = Segmenter(tiny_weights, device="cpu", tile_size=128, tile_overlap=16, batch_size=1)
    many = Segmenter(tiny_weights, device="cpu", tile_size=128, tile_overlap=16, batch_size=3)
    rng = np.random.default_rng(0)
    grays = [rng.random(shape, dtype=np.float32) for shape in
             ((96, 96), (300, 250), (96, 96), (128, 128), (260, 300))]
    together = many.predict_many(grays)
    for gray, got in zip(grays, together, strict=True):
        alone = one.predict(gray)
        assert got.probs.shape == alone.probs.shape
        assert np.abs(got.probs - alone.probs).max() <= 1e-5
        assert (got.masks == alone.masks).mean() >= 0.9999
    assert many.batch_size == 3 and Segmenter(tiny_weights, device="cpu").batch_size == 1


def test_dropping_small_components_matches_labelling_the_whole_mask() -> None:
    """Labelling only the box around the mask drops exactly what labelling it all drops, and
    the components it hands on give the statistics of the mask it leaves."""
    import cv2

    from monitor.vision.segmenter import drop_small_components
    from monitor.vision.stats import class_stats

    rng = np.random.default_rng(2)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 200, 2))
        mask = rng.random((h, w)) < rng.choice([0.0, 0.001, 0.05, 0.4])
        min_px = int(rng.integers(1, 10))
        want = mask
        if mask.any():
            _, labels, st, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8),
                                                                connectivity=8)
            keep = st[:, cv2.CC_STAT_AREA] >= min_px
            keep[0] = False
            want = keep[labels]
        got, found = drop_small_components(mask, min_px)
        assert (got == want).all()
        assert (found is None) == (not mask.any())
        fresh = class_stats("x", got, pixel_size_mm=0.1, max_components=10**6)
        reused = class_stats("x", got, pixel_size_mm=0.1, max_components=10**6, found=found)
        # Centroids are shifted from different boxes: equal up to float rounding.
        assert dataclasses.replace(reused, component_list=()) == dataclasses.replace(
            fresh, component_list=())
        assert [(c.x, c.y, c.w, c.h, c.area_px) for c in reused.component_list] == [
            (c.x, c.y, c.w, c.h, c.area_px) for c in fresh.component_list]
        assert [v for c in reused.component_list for v in (c.cx, c.cy)] == pytest.approx(
            [v for c in fresh.component_list for v in (c.cx, c.cy)])


def test_outside_thresholds_give_loose_masks(tmp_path: Path) -> None:
    """A class with an outside threshold below its own also comes as a `loose` mask at that
    threshold, tiled and filtered like the others; none when the outside threshold is not
    lower, and an unknown class is refused."""
    from monitor.config import parse_config
    from tests.conftest import make_threshold_weights

    w = make_weights(tmp_path / "c.safetensors", constant_prob={3: 0.7})  # misprint 0.7
    seg = Segmenter(w, device="cpu", thresholds={"misprint": 0.9}, tile_size=64,
                    tile_overlap=16, outside_thresholds={"misprint": 0.5, "spatter": 0.99})
    out = seg.predict(np.zeros((100, 90), np.float32), probs=False)
    assert not out.masks[3].any()
    assert set(out.loose) == {3} and out.loose[3].shape == (100, 90) and out.loose[3].all()
    seg.set_thresholds(0.5, {"misprint": 0.9}, None, {"misprint": 0.95})
    assert seg.predict(np.zeros((32, 32), np.float32)).loose == {}
    with pytest.raises(ConfigError, match=r"model\.outside_thresholds\.cracks"):
        Segmenter(w, device="cpu", outside_thresholds={"cracks": 0.5})
    # the component filter holds for the loose mask too (swelling where bright)
    w2 = make_threshold_weights(tmp_path / "w.safetensors")
    gray = np.full((64, 64), 0.4, np.float32)
    gray[5:7, 5:7] = 0.9
    gray[30:40, 30:40] = 0.9
    cfg = parse_config({"model": {"weights": str(w2), "device": "cpu",
                                  "thresholds": {"swelling": 1.0},
                                  "min_component_mm2": {"swelling": 0.1},
                                  "outside_thresholds": {"swelling": 0.5}}}, base_dir=tmp_path)
    out = Segmenter.from_config(cfg).predict(gray, probs=False)
    assert not out.masks[1].any() and out.loose[1].sum() == 100
