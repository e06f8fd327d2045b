"""The model's marks read against the layer's slice (monitor.geometry.reading), through the
functions, the evaluate command and the real daemon:
- geometry.swelling_reach_px: a swelling or over-melting mark that reaches beyond the part's
  outline is swelling, one inside the part over-melting;
- model.outside_thresholds: beyond the parts' tolerance zone and within outside_reach_mm, a
  class is marked from its lower outside threshold."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from monitor.cli import main
from monitor.geometry.reading import add_outside, outside_zone, read_layer, split_bright
from monitor.vision.classes import DEFAULT_CLASS_NAMES
from tests.conftest import make_threshold_weights
from tests.test_alarm_daemon import Rig

NAMES = DEFAULT_CLASS_NAMES
S, OVER, U = (NAMES.index(c) for c in ("swelling", "over_melting", "under_melting"))


def _part() -> np.ndarray:
    part = np.zeros((96, 96), bool)
    part[20:70, 20:70] = True
    return part


def test_a_mark_over_the_outline_is_swelling_one_inside_over_melting() -> None:
    masks = np.zeros((len(NAMES), 96, 96), bool)
    masks[OVER, 40:50, 62:75] = True  # over-melting by the model, 5 px over the outline
    masks[S, 35:45, 30:40] = True  # swelling by the model, wholly inside the part
    masks[S, 52:58, 40:50] = True  # one mark marked half and half ...
    masks[OVER, 58:64, 40:50] = True  # ... inside: over-melting as a whole
    masks[U, 25:30, 25:30] = True  # other classes are left alone
    before = masks.copy()
    out = split_bright(masks, NAMES, _part(), reach_px=2)
    assert out is not None
    np.testing.assert_array_equal(masks, before)  # the input is not modified
    assert out[S].sum() == 130 and out[S, 40:50, 62:75].all()
    assert out[OVER].sum() == 100 + 120
    assert out[OVER, 35:45, 30:40].all() and out[OVER, 52:64, 40:50].all()
    np.testing.assert_array_equal(out[U], masks[U])
    assert not (out[S] & out[OVER]).any()


def test_the_reach_is_measured_from_the_outline() -> None:
    for beyond, expect in ((1, "over_melting"), (2, "swelling"), (3, "swelling")):
        masks = np.zeros((len(NAMES), 96, 96), bool)
        masks[OVER, 40:50, 60:70 + beyond] = True
        out = split_bright(masks, NAMES, _part(), reach_px=2)
        got = masks if out is None else out
        assert got[NAMES.index(expect)].sum() == 10 * (10 + beyond), beyond
    # a mark on the bare powder, far from any part, is not inside one
    masks = np.zeros((len(NAMES), 96, 96), bool)
    masks[OVER, 80:90, 80:90] = True
    out = split_bright(masks, NAMES, _part(), reach_px=2)
    assert out is not None and out[S].sum() == 100


def test_nothing_to_do_is_none() -> None:
    masks = np.zeros((len(NAMES), 96, 96), bool)
    assert split_bright(masks, NAMES, _part(), reach_px=2) is None  # no mark
    masks[S, 40:50, 65:75] = True
    assert split_bright(masks, NAMES, _part(), reach_px=2) is None  # already swelling
    masks[OVER, 40:50, 65:75] = True
    assert split_bright(masks, NAMES, _part(), reach_px=0) is None  # switched off
    names = ("no_defect", "swelling", "spatter")  # weights without over-melting
    assert split_bright(masks[:3], names, _part(), reach_px=2) is None


def _synth_like(root: Path) -> None:
    """A one-layer dataset with its nominal slice: a bright spot inside the part (over-
    melting) and one across its outline (swelling)."""
    img = np.full((96, 96), 100, np.uint8)
    img[35:45, 30:40] = 240
    img[40:50, 62:78] = 240
    truth = {c: np.zeros((96, 96), np.uint8) for c in NAMES}
    truth["over_melting"][35:45, 30:40] = 255
    truth["swelling"][40:50, 62:78] = 255
    truth["no_defect"][:] = 255
    truth["no_defect"][_part() | (img > 200)] = 0
    for d in ("images", "nominal", *(f"masks/{c}" for c in NAMES)):
        (root / d).mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "layer_00001.png"), img)
    cv2.imwrite(str(root / "nominal" / "layer_00001.png"), _part().astype(np.uint8) * 255)
    for c, m in truth.items():
        cv2.imwrite(str(root / "masks" / c / "layer_00001.png"), m)
    (root / "manifest.json").write_text(json.dumps({
        "format": "pbf-monitor-dataset/1", "classes": list(NAMES), "images": ["layer_00001"],
        "source": {"generator": "test", "nominal": "nominal/layer_{layer:05d}.png"}}))


@pytest.mark.parametrize("reach", [2, 0])
def test_evaluate_reads_the_dataset_slices(tmp_path: Path, reach: int) -> None:
    weights = make_threshold_weights(tmp_path / "w.safetensors", channel=OVER)
    _synth_like(tmp_path / "ds")
    cfg = tmp_path / "config.toml"
    cfg.write_text(f"[model]\ndevice = \"cpu\"\n[geometry]\nswelling_reach_px = {reach}\n"
                   "relative_k = 0\n")  # the split alone
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "ds"), "--config", str(cfg),
                                    "--weights", str(weights), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)["classes"]
    if reach:  # both found, each as its own class
        assert got["swelling"]["iou"] == pytest.approx(1.0)
        assert got["over_melting"]["iou"] == pytest.approx(1.0)
    else:  # the model's classes: everything bright is over-melting
        assert got["swelling"]["recall"] == 0.0
        assert got["over_melting"]["precision"] == pytest.approx(100 / 260)


def _rig(tmp_path: Path, weights: Path, geometry: str, model: str = "") -> Rig:
    """A daemon whose layers of build B1 have _part() as their nominal slice."""
    nominal = tmp_path / "nominal" / "B1"
    nominal.mkdir(parents=True)
    cv2.imwrite(str(nominal / "layer_00001.png"), _part().astype(np.uint8) * 255)
    return Rig(tmp_path, weights, model_extra=model, extra=f"""
[geometry]
nominal = "{tmp_path}/nominal/{{build}}/layer_{{layer:05d}}.png"
{geometry}
""")


@pytest.mark.parametrize("reach", [2, 0])
def test_the_daemon_stores_and_publishes_the_split(tmp_path: Path, reach: int) -> None:
    weights = make_threshold_weights(tmp_path / "w.safetensors", channel=OVER)
    rig = _rig(tmp_path, weights, f"swelling_reach_px = {reach}\nrelative_k = 0")
    try:
        rig.start()
        # inside the part (10x10) and across its outline at x = 70 (16x10)
        rig.write(1, (30, 35, 10, 10), (62, 40, 16, 10))
        assert rig.listener is not None
        msg = rig.listener.layers()[1][0]
        assert msg["status"] == "ok", msg
        cls = msg["classes"]
        if reach:
            assert cls["swelling"]["pixel_count"] == 160
            assert cls["over_melting"]["pixel_count"] == 100
        else:
            assert cls["swelling"]["pixel_count"] == 0
            assert cls["over_melting"]["pixel_count"] == 260
    finally:
        rig.stop()


def test_loose_marks_count_only_between_the_tolerance_and_the_reach() -> None:
    part = _part()
    zone = outside_zone(part, 5, 20)
    assert not zone[part].any()
    assert not zone[45, 70:75].any() and zone[45, 76:90].all() and not zone[45, 91:].any()
    masks = np.zeros((len(NAMES), 96, 96), bool)
    loose = np.ones((96, 96), bool)
    M = NAMES.index("misprint")
    out = add_outside(masks, {M: loose}, zone)
    assert out is not None and np.array_equal(out[M], zone) and not masks.any()
    assert add_outside(out, {M: loose}, zone) is None  # nothing new
    both = read_layer(masks, NAMES, part, swelling_reach_px=2, loose={M: loose}, zone=zone)
    assert both is not None and np.array_equal(both[M], zone)
    assert read_layer(masks, NAMES, part, swelling_reach_px=2, loose={M: loose}) is None


@pytest.mark.parametrize("outside", ["{ misprint = 0.5 }", "{}"])
def test_the_daemon_marks_misprint_beyond_the_parts_from_the_outside_threshold(
        tmp_path: Path, outside: str) -> None:
    """Weights that give misprint 0.7 everywhere, its threshold 0.9: nothing inside the
    part or near it; with the outside threshold 0.5, the ring beyond the 0.5 mm tolerance
    and within 2 mm (0.1 mm pixels: 5 to 20 px from the part) is misprint."""
    from tests.conftest import make_weights

    weights = make_weights(tmp_path / "w.safetensors", constant_prob={3: 0.7})
    rig = _rig(tmp_path, weights, "outside_reach_mm = 2.0",
               model=f"thresholds = {{ misprint = 0.9 }}\noutside_thresholds = {outside}")
    try:
        rig.start()
        rig.write(1)
        assert rig.listener is not None
        msg = rig.listener.layers()[1][0]
        assert msg["status"] == "ok", msg
        got = msg["classes"]["misprint"]["pixel_count"]
        if outside == "{}":
            assert got == 0
        else:
            # the part is 50x50 px; its ring from 5 to 20 px out, clipped by the 96 px frame
            ring = outside_zone(_part(), 5, 20)
            assert abs(got - int(ring.sum())) <= 0.05 * ring.sum(), (got, int(ring.sum()))
    finally:
        rig.stop()
