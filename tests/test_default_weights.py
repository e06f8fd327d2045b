"""The shipped weights find the five defect classes on a build they never saw, and stay quiet
on real clean powder beds they never saw."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.config import DEFAULT_WEIGHTS, parse_config
from monitor.training.dataset import import_clean_frames, open_dataset
from monitor.training.evaluate import evaluate, metrics_json
from monitor.training.synth import write_dataset
from monitor.vision.segmenter import Segmenter

# PBLM No_Defect frames 0008-0014; frames 0000-0006 were training negatives
# (weights/default.json), these were not.
CLEAN = Path(__file__).parent / "data" / "pblm_clean"


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    """As the daemon serves them with the built-in configuration."""
    cfg = parse_config({"model": {"device": "cpu"}}, base_dir=Path.cwd())
    assert cfg.model.weights == DEFAULT_WEIGHTS
    return Segmenter.from_config(cfg)


def test_finds_defects_on_an_unseen_synthetic_build(segmenter: Segmenter,
                                                     tmp_path: Path) -> None:
    write_dataset(tmp_path / "b", layers=12, size=512, seed=4242)  # seed not used in training
    j = metrics_json(evaluate(open_dataset(tmp_path / "b"), segmenter))
    assert j["mean_iou_defects"] >= 0.7, j
    for name, m in j["classes"].items():
        if m["true_fraction"]:
            assert m["recall"] >= 0.7, (name, m)


def test_quiet_on_real_clean_beds(segmenter: Segmenter, tmp_path: Path) -> None:
    import_clean_frames([CLEAN], tmp_path / "clean")
    j = metrics_json(evaluate(open_dataset(tmp_path / "clean"), segmenter))
    defect_area = sum(m["predicted_fraction"] for name, m in j["classes"].items()
                      if name != "no_defect")
    assert defect_area <= 0.01, j


def test_model_card_records_no_absolute_paths() -> None:
    """The card named folders of the machine it was trained on (/work/data/train_101)."""
    import json

    from monitor.config import DEFAULT_WEIGHTS

    def strings(o: object) -> list[str]:
        if isinstance(o, dict):
            return [s for v in o.values() for s in strings(v)]
        if isinstance(o, list):
            return [s for v in o for s in strings(v)]
        return [o] if isinstance(o, str) else []

    card = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    absolute = [s for s in strings(card) if any(w.startswith("/") for w in s.split())]
    assert absolute == []
