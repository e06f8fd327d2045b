"""The shipped weights find the five defect classes on a build they never saw, and stay quiet
on real clean powder beds they never saw."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.config import DEFAULT_WEIGHTS, parse_config
from monitor.training.dataset import import_clean_frames, open_dataset
from monitor.training.evaluate import evaluate, metrics_json
from monitor.training.onsite import Site, printer_of, score
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
    ds = open_dataset(tmp_path / "b")
    j = metrics_json(evaluate(ds, segmenter))
    # 0.66 over 40 layers of this seed (weights/default.json); the classic-only weights
    # before them had 0.86: the price of many cameras at width 8 (README).
    assert j["mean_iou_defects"] >= 0.6, j
    # Read against the build's slices as the daemon reads it (swelling or over-melting by
    # the outline, misprint from 0.6 beyond the parts): 0.77 here (the model's own classes:
    # 0.65), 0.81 over 40 layers. Swelling 0.34 -> 0.72, over-melting 0.57 -> 0.86.
    read = metrics_json(evaluate(ds, segmenter, swelling_reach_px=1, outside_px=(5, 100)))
    assert read["mean_iou_defects"] >= 0.75, read
    for cls in ("swelling", "over_melting"):
        assert read["classes"][cls]["iou"] >= 0.65, (cls, read)
    for name, m in j["classes"].items():
        if m["true_fraction"]:
            # the lowest on these 12 layers: under_melting 0.71 (0.78 over 40), swelling
            # 0.75 (0.87 over 40)
            assert m["recall"] >= (0.5 if name == "swelling" else 0.7), (name, m)


def test_quiet_on_real_clean_beds(segmenter: Segmenter, tmp_path: Path) -> None:
    import_clean_frames([CLEAN], tmp_path / "clean")
    j = metrics_json(evaluate(open_dataset(tmp_path / "clean"), segmenter))
    defect_area = sum(m["predicted_fraction"] for name, m in j["classes"].items()
                      if name != "no_defect")
    assert defect_area <= 0.001, j  # under 0.1% of the bed


DOCS = Path(__file__).resolve().parents[1] / "docs"
SLM = DOCS.parents[1] / "shared" / "data" / "slm"


def _slm_site(tmp_path: Path) -> tuple[Segmenter, Site]:
    """docs/slm.toml (the real SLM layers as a printer), its state kept in tmp_path."""
    import tomllib

    data = tomllib.loads((DOCS / "slm.toml").read_text())
    data["store"]["state_dir"] = str(tmp_path)
    data["model"]["device"] = "cpu"
    cfg = parse_config(data, base_dir=DOCS)
    return Segmenter.from_config(cfg), Site(printer_of(cfg.fleet(), None))


@pytest.mark.skipif(not SLM.is_dir(), reason="../shared/data/slm is not beside the repo")
def test_quiet_on_real_after_melt_parts(tmp_path: Path) -> None:
    """Out of the box, on all 15 real layers with slices (melt darker than powder, specular
    glitter; never seen in training): defect classes mark at most 3% of the nominal part
    area on average and 8% on any layer."""
    seg, site = _slm_site(tmp_path)
    sc = score(seg, site, site.layers(), paste=False)
    assert len(sc.layers) == 15
    assert sc.mean_false is not None and sc.mean_false <= 0.03, sc.as_json()
    assert sc.max_false is not None and sc.max_false <= 0.08, sc.as_json()


@pytest.mark.skipif(not SLM.is_dir(), reason="../shared/data/slm is not beside the repo")
def test_finds_defects_pasted_into_real_layers(tmp_path: Path) -> None:
    """Synthetic defects pasted into real layers of the builds adapt leaves out (B0 is the
    one adapted on in the README), read against their slices as the daemon reads them:
    every class is found >= 70% of the time (here swelling 0.9, spatter, misprint, over-
    and under-melting 1.0; misprint 2 of 5 by the model alone, 5 of 5 with the stray scan
    tracks the slice reading finds by their texture)."""
    seg, site = _slm_site(tmp_path)
    held = site.layers(["B20220819", "B20220824"])
    sc = score(seg, site, held, paste=True, per_class=2)
    recall = sc.recall()
    for cls in ("swelling", "spatter", "misprint", "over_melting", "under_melting"):
        r = recall[cls]
        assert r is not None and r >= 0.7, (cls, recall)


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


REPO_CONFIG = DOCS.parent / "config.toml"


@pytest.mark.parametrize("seed", [999, 4242])
def test_unseen_classic_builds_read_against_their_slices(tmp_path: Path, seed: int) -> None:
    """The README's seed (999) and a new one, 40 layers each, through `pbf-monitor evaluate`
    with the shipped config, which reads the marks against the builds' slices as the daemon
    does: mean defect IoU >= 0.8 (measured 0.805 and 0.849; the model's own classes 0.62
    and 0.66; seed 999's over-melting 0.72 is its weakest class)."""
    import json

    from click.testing import CliRunner

    from monitor.cli import main

    write_dataset(tmp_path / "b", layers=40, size=512, seed=seed)
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "b"), "--config",
                                    str(REPO_CONFIG), "--json"])
    assert res.exit_code == 0, res.output
    j = json.loads(res.output)
    print(seed, round(j["mean_iou_defects"], 3),
          {k: round(v["iou"] or 0, 3) for k, v in j["classes"].items()})
    assert j["mean_iou_defects"] >= 0.8, j
