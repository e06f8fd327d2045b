"""Metrics by hand, and evaluation of real weights through the daemon's Segmenter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from monitor.cli import main
from monitor.training.dataset import DatasetError, open_dataset
from monitor.training.evaluate import Counts, ThresholdSweep, channel_map, evaluate, metrics_json
from monitor.training.synth import write_dataset
from monitor.vision.classes import DEFAULT_CLASS_NAMES
from monitor.vision.segmenter import Segmenter
from tests.conftest import make_weights


def test_counts_by_hand() -> None:
    c = Counts(("no_defect", "spatter", "swelling"))
    pred = np.zeros((3, 4, 4), bool)
    true = np.zeros((3, 4, 4), bool)
    pred[1, 0, :3] = True  # 3 predicted spatter pixels
    true[1, 0, 1:] = True  # 3 true, 2 of them hit
    true[2, 3, 3] = True  # swelling missed entirely
    c.add(pred, true)
    c.add(np.zeros_like(pred), np.zeros_like(true))  # an empty layer
    m = c.metrics()
    assert m["spatter"].iou == pytest.approx(2 / 4)
    assert m["spatter"].dice == pytest.approx(4 / 6)
    assert m["spatter"].precision == pytest.approx(2 / 3)
    assert m["spatter"].recall == pytest.approx(2 / 3)
    assert (m["spatter"].layer_precision, m["spatter"].layer_recall) == (1.0, 1.0)
    assert m["swelling"].iou == 0.0 and m["swelling"].precision is None
    assert m["swelling"].layer_recall == 0.0
    assert m["no_defect"].iou is None  # never predicted nor present: undefined, not 0 or 1
    j = metrics_json(c)
    assert j["mean_iou_defects"] == pytest.approx((0.5 + 0.0) / 2)
    assert j["layers"] == 2 and j["pixels"] == 32
    assert j["classes"]["spatter"]["predicted_fraction"] == pytest.approx(3 / 32)
    assert j["classes"]["swelling"]["true_layers"] == 1
    json.dumps(j)  # serialisable (None -> null)
    with pytest.raises(ValueError, match="must both be"):
        c.add(pred[:2], true[:2])


def test_threshold_sweep_picks_the_separating_threshold() -> None:
    sw = ThresholdSweep(("spot",))
    probs = np.array([[[0.05, 0.2, 0.42, 0.9]]], np.float32)
    true = np.array([[[False, False, True, True]]])
    sw.add(probs, true)
    best = sw.best()["spot"]
    assert 0.2 < best["threshold"] <= 0.42 and best["iou"] == 1.0 and best["recall"] == 1.0


def test_channel_map() -> None:
    assert channel_map(("a", "b", "c"), ("c", "a")) == [2, 0]
    with pytest.raises(DatasetError, match="spatter"):
        channel_map(("a",), ("a", "spatter"))


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "build"
    write_dataset(out, layers=4, size=64, seed=5)
    return out


def test_evaluate_constant_model(small_ds: Path, tmp_path: Path) -> None:
    # A model that says "spatter" everywhere and nothing else: spatter recall 1, precision =
    # the true spatter share, every other defect class recall 0.
    w = make_weights(tmp_path / "w.safetensors", constant_prob={2: 0.9})
    ds = open_dataset(small_ds)
    counts = evaluate(ds, Segmenter(w, device="cpu"))
    j = metrics_json(counts)
    true_share = sum(int(ds.sample(n)[1][2].sum()) for n in ds.names) / (4 * 64 * 64)
    spatter = j["classes"]["spatter"]
    assert spatter["recall"] == 1.0 and spatter["predicted_fraction"] == 1.0
    assert spatter["precision"] == pytest.approx(true_share)
    assert j["classes"]["swelling"]["predicted_fraction"] == 0.0
    assert j["layers"] == 4


def test_cli_evaluate_json(small_ds: Path, tmp_path: Path) -> None:
    w = make_weights(tmp_path / "w.safetensors", constant_prob={0: 0.9})
    r = CliRunner().invoke(main, ["evaluate", str(small_ds), "--weights", str(w), "--json",
                                  "--sweep"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.output)
    assert set(j["classes"]) == set(DEFAULT_CLASS_NAMES)
    for name in DEFAULT_CLASS_NAMES:
        assert {"iou", "dice", "precision", "recall"} <= set(j["classes"][name])
    assert j["mean_iou_defects"] == 0.0  # defects exist in the build, none predicted
    assert j["model_sha256"] and "no_defect" in j["recommended_thresholds"]


def test_cli_evaluate_missing_dataset(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "nope")])
    assert r.exit_code == 2
    assert r.output.strip().endswith("dataset folder not found")
    assert "Traceback" not in r.output


def test_calibrated_thresholds_travel_in_the_weights(small_ds: Path, tmp_path: Path) -> None:
    # Spatter at probability 0.3 everywhere: only a threshold <= 0.3 finds the true spatter,
    # so calibration must choose one, and serving must then use it unless config overrides.
    w = make_weights(tmp_path / "w.safetensors", constant_prob={2: 0.3})
    gray = np.full((32, 32), 0.5, np.float32)
    assert not Segmenter(w, device="cpu").predict(gray).masks[2].any()
    r = CliRunner().invoke(main, ["calibrate", str(small_ds), "--weights", str(w), "--out",
                                  str(tmp_path / "cal.safetensors")])
    assert r.exit_code == 0, r.output
    cal = tmp_path / "cal.safetensors"
    seg = Segmenter(cal, device="cpu")
    assert seg.info.thresholds["spatter"] <= 0.3
    assert seg.info.training["calibration"]["dataset"] == "build"
    assert seg.predict(gray).masks[2].all()
    overridden = Segmenter(cal, device="cpu", thresholds={"spatter": 0.5})
    assert not overridden.predict(gray).masks[2].any()
