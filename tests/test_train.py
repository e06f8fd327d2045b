"""Training on small real datasets: it learns, keeps the best epoch, resumes, and documents."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from monitor.cli import main
from monitor.training.dataset import DatasetError, open_dataset
from monitor.training.tiles import LayerRef, TileSampler
from monitor.training.train import TrainError, TrainOptions, train
from monitor.vision.model import ModelInfo, load_weights

CLASSES = ("no_defect", "spot")


def spots_dataset(root: Path, layers: int = 10, size: int = 64, seed: int = 0) -> Path:
    """Bright round spots on noisy powder: a defect any working trainer learns in seconds."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    for c in CLASSES:
        (root / "masks" / c).mkdir(parents=True)
    names = []
    for i in range(1, layers + 1):
        img = rng.normal(0.4, 0.05, (size, size))
        spot = np.zeros((size, size), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = (int(v) for v in rng.integers(6, size - 6, 2))
            cv2.circle(spot, (cx, cy), int(rng.integers(2, 5)), 255, -1)
        img[spot > 0] = 0.85
        name = f"layer_{i:05d}"
        cv2.imwrite(str(root / "images" / f"{name}.png"),
                    (img.clip(0, 1) * 255).astype(np.uint8))
        cv2.imwrite(str(root / "masks" / "spot" / f"{name}.png"), spot)
        cv2.imwrite(str(root / "masks" / "no_defect" / f"{name}.png"), 255 - spot)
        names.append(name)
    (root / "manifest.json").write_text(json.dumps(
        {"format": "pbf-monitor-dataset/1", "classes": list(CLASSES), "images": names}))
    return root


@pytest.fixture(scope="module")
def spots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return spots_dataset(tmp_path_factory.mktemp("spots") / "ds")


FAST = TrainOptions(width=4, epochs=2, steps_per_epoch=4, tile=32, batch=4, warmup_steps=2,
                    val_fraction=0.2, device="cpu")


def test_trainer_learns_spots(spots: Path, tmp_path: Path) -> None:
    opts = TrainOptions(width=4, epochs=4, steps_per_epoch=15, tile=48, batch=4, lr=5e-3,
                        warmup_steps=5, val_fraction=0.2, device="cpu", norm="global")
    result = train([spots], tmp_path / "spots.safetensors", opts)
    first, best = result.history[0], max(result.history, key=lambda r: r.score)
    assert best.val is not None
    assert best.val["classes"]["spot"]["iou"] > 0.6, result.history
    assert result.history[-1].loss < first.loss
    assert result.best_epoch == best.epoch
    _, info = load_weights(result.weights)
    assert 0.0 < info.thresholds["spot"] < 1.0  # calibrated on validation, stored in weights


def test_weights_card_and_checkpoint(spots: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    result = train([spots], out, FAST, command="pbf-monitor train ds --out w.safetensors")
    _, info = load_weights(out)
    assert info.class_names == CLASSES  # from the dataset's manifest, not from code
    assert info.base_channels == 4
    assert info.training["best_epoch"] == result.best_epoch
    assert info.training["datasets"] == ["ds"]
    card = json.loads((tmp_path / "w.json").read_text())
    assert card["sha256"] == info.sha256
    assert card["command"] == "pbf-monitor train ds --out w.safetensors"
    assert card["split"]["train_layers"] + card["split"]["validation_layers"] == 10
    assert card["validation"]["classes"]["spot"].keys() >= {"iou", "dice", "precision", "recall"}
    assert [h["epoch"] for h in card["history"]] == [1, 2]
    assert card["data"][0]["layers"] == 10 and card["options"]["tile"] == 32
    assert (tmp_path / "w.ckpt.safetensors").is_file()
    raw = (tmp_path / "w.ckpt.safetensors").read_bytes()
    assert b"pbf-monitor-checkpoint/1" in raw[:4096]  # a safetensors header, not a pickle


def test_resume_continues_where_it_stopped(spots: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    train([spots], out, FAST)
    more = TrainOptions(**{**FAST.__dict__, "epochs": 3})
    result = train([spots], out, more, resume=True)
    assert [h.epoch for h in result.history] == [1, 2, 3]
    card = json.loads((tmp_path / "w.json").read_text())
    assert len(card["history"]) == 3
    with pytest.raises(TrainError, match="no epoch was trained"):
        train([spots], out, more, resume=True)
    wider = TrainOptions(**{**FAST.__dict__, "epochs": 4, "width": 8})
    with pytest.raises(TrainError, match="does not fit this model"):
        train([spots], out, wider, resume=True)


def test_sampler_biases_tiles_to_defects_and_is_reproducible(spots: Path) -> None:
    ds = open_dataset(spots)
    refs = [LayerRef(ds, n) for n in ds.names]
    info = ModelInfo(class_names=CLASSES, base_channels=4)
    biased = TileSampler(refs, CLASSES, info, TrainOptions(tile=16, defect_bias=1.0))
    hits = [bool(biased[i][1][1].any()) for i in range(40)]
    assert all(hits)
    uniform = TileSampler(refs, CLASSES, info, TrainOptions(tile=16, defect_bias=0.0))
    assert sum(bool(uniform[i][1][1].any()) for i in range(40)) < 40
    x1, y1 = biased[7]
    x2, y2 = biased[7]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    biased.epoch = 1
    assert not torch.equal(biased[7][0], x1)  # a new epoch draws new tiles
    assert x1.shape == (1, 16, 16) and y1.shape == (2, 16, 16)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tile": 40}, "--tile 40"),
        ({"pos_weight": "lots"}, "--pos-weight"),
        ({"defect_bias": 1.5}, "--defect-bias"),
    ],
)
def test_bad_options(spots: Path, tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(TrainError, match=message):
        train([spots], tmp_path / "w.safetensors", TrainOptions(**{**FAST.__dict__, **change}))


def test_datasets_with_different_classes(spots: Path, tmp_path: Path) -> None:
    other = spots_dataset(tmp_path / "other", layers=2)
    data = json.loads((other / "manifest.json").read_text())
    (other / "masks" / "spot").rename(other / "masks" / "blob")
    data["classes"] = ["no_defect", "blob"]
    (other / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="differ"):
        train([spots, other], tmp_path / "w.safetensors", FAST)
    with pytest.raises(TrainError, match=r"\.safetensors"):
        train([spots], tmp_path / "w.pt", FAST)


def test_cli_train_then_evaluate(spots: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.safetensors"
    r = CliRunner().invoke(main, ["train", str(spots), "--out", str(out), "--width", "4",
                                  "--epochs", "1", "--steps", "3", "--tile", "32", "--batch",
                                  "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output
    r = CliRunner().invoke(main, ["evaluate", str(spots), "--weights", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.output)["classes"]) == set(CLASSES)
    r = CliRunner().invoke(main, ["train", str(spots), "--out", str(out), "--tile", "40"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "--tile 40" in r.output


@pytest.mark.parametrize("norm", ["flat", "flat-soft", "global"])
def test_validation_scores_what_the_daemon_serves(spots: Path, tmp_path: Path,
                                                  norm: str) -> None:
    """The validation numbers in the card are those of the written weights served by a
    Segmenter on the same layers (a flat model's layers were once normalised twice)."""
    from monitor.training.evaluate import Counts, metrics_json
    from monitor.vision.segmenter import Segmenter, SegmenterOptions

    opts = TrainOptions(**{**FAST.__dict__, "epochs": 1, "norm": norm, "calibrate": False})
    out = tmp_path / "w.safetensors"
    result = train([spots], out, opts)
    card = json.loads((tmp_path / "w.json").read_text())
    seg = Segmenter(out, SegmenterOptions(device="cpu", threshold=opts.threshold))
    assert seg.info.norm == norm
    ds = open_dataset(spots)
    counts = Counts(seg.class_names)
    for label in card["split"]["validation"]:
        gray, masks = ds.sample(label.split("/", 1)[1])
        counts.add(seg.predict(gray).masks, masks)
    served = metrics_json(counts)["classes"]["spot"]
    assert result.history[0].val is not None
    assert served["iou"] == pytest.approx(result.history[0].val["classes"]["spot"]["iou"])
