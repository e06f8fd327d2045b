"""Flat-field input normalisation: what a camera's gain, gradient and vignetting change is
taken out before the model sees a layer; weights say which normalisation they need."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from monitor.errors import WeightsError
from monitor.training.synth import BuildGenerator
from monitor.vision.imaging import FLAT_CLIP, apply_flat, flat_terms, flatten, normalize
from monitor.vision.model import load_weights, read_info
from tests.conftest import make_weights


def _layer() -> np.ndarray:
    return BuildGenerator(size=256, layers=1, seed=5).layer(0).image.astype(np.float32) / 255


def test_gain_and_lighting_gradient_are_taken_out() -> None:
    g = _layer()
    ys, xs = np.mgrid[0:256, 0:256] / 256.0
    lit = np.clip(g * 0.6 * (1.0 + 0.5 * xs + 0.3 * ys), 0, 1).astype(np.float32)
    a, b = flatten(g), flatten(lit)
    inner = (slice(32, -32), slice(32, -32))  # the coarse background is least exact at edges
    assert np.corrcoef(a[inner].ravel(), b[inner].ravel())[0, 1] > 0.97
    assert abs(float(np.median(a)) - float(np.median(b))) < 0.2
    # the fixed (global) normalisation of the same pair differs many times more
    plain = float(np.abs(normalize(g, 0.5, 0.25) - normalize(lit, 0.5, 0.25))[inner].mean())
    assert float(np.abs(a - b)[inner].mean()) < plain / 3


def test_uniform_bed_is_not_blown_up_and_output_is_bounded() -> None:
    rng = np.random.default_rng(0)
    flat_bed = (0.5 + rng.normal(0, 0.002, (128, 128))).astype(np.float32)
    assert float(np.abs(flatten(flat_bed)).max()) < 1.0  # spread floor, not unit noise
    spiky = np.zeros((64, 64), np.float32)
    spiky[10, 10] = 1.0
    assert float(np.abs(flatten(spiky)).max()) <= FLAT_CLIP


def test_crops_use_the_whole_layers_terms() -> None:
    g = _layer()
    bg, spread = flat_terms(g)
    box = (slice(40, 140), slice(60, 200))
    assert np.allclose(apply_flat(g[box], bg[box], spread), flatten(g)[box], atol=1e-5)


def test_weights_carry_their_normalisation(tmp_path: Path) -> None:
    w = make_weights(tmp_path / "flat.safetensors", norm="flat")
    assert read_info(w).norm == "flat"
    assert load_weights(w)[1].norm == "flat"
    old = make_weights(tmp_path / "old.safetensors")
    assert read_info(old).norm == "global"
    # a file from before the method was recorded reads as "global"; an unknown one is refused
    from safetensors import safe_open

    with safe_open(str(w), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(str(w))
    meta["normalization"] = '{"mean": 0.5, "std": 0.25}'
    save_file(tensors, str(tmp_path / "pre.safetensors"), metadata=meta)
    assert read_info(tmp_path / "pre.safetensors").norm == "global"
    meta["normalization"] = '{"mean": 0.5, "std": 0.25, "method": "magic"}'
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(WeightsError, match="magic"):
        read_info(tmp_path / "bad.safetensors")


def test_soft_flattening_keeps_bright_defects_apart() -> None:
    """On a classic synthetic bed a swelling's lit top sits ~13 spreads over the powder and a
    glossy over-melt ~20: clipped at 8 both read 8; compressed they stay apart, while near
    the powder the two methods agree."""
    from monitor.vision.imaging import FLAT_SOFT_BOUND, model_input

    bed = np.full((64, 64), 0.4, np.float32) + np.random.default_rng(1).normal(
        0, 0.004, (64, 64)).astype(np.float32)
    bg, spread = flat_terms(bed)
    swell, over = bed.copy(), bed.copy()
    swell[20:30, 20:30] = 0.4 * (1 + 13 * spread)
    over[20:30, 20:30] = 0.4 * (1 + 20 * spread)
    hard = [apply_flat(x, bg, spread)[25, 25] for x in (swell, over)]
    soft = [apply_flat(x, bg, spread, soft=True)[25, 25] for x in (swell, over)]
    assert hard[0] == hard[1] == FLAT_CLIP
    assert soft[1] - soft[0] > 2.0 and soft[0] > FLAT_CLIP
    near = np.abs(apply_flat(bed, bg, spread)) < 3
    both = apply_flat(bed, bg, spread), apply_flat(bed, bg, spread, soft=True)
    assert np.allclose(both[0][near], both[1][near], atol=0.1)
    spiky = np.zeros((64, 64), np.float32)
    spiky[10, 10] = 1.0
    assert float(np.abs(flatten(spiky, soft=True)).max()) <= FLAT_SOFT_BOUND
    assert np.array_equal(model_input(over, "flat-soft", 0.5, 0.25), flatten(over, soft=True))
    assert np.array_equal(model_input(over, "flat", 0.5, 0.25), flatten(over))


def test_weights_may_ask_for_soft_flattening(tmp_path: Path) -> None:
    w = make_weights(tmp_path / "soft.safetensors", norm="flat-soft")
    assert read_info(w).norm == "flat-soft" and load_weights(w)[1].norm == "flat-soft"
