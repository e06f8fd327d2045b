"""The README's adapt measurement on real layers (opt-in: about 6 minutes on two cores)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from monitor.config import parse_config
from monitor.training.adapt import AdaptOptions, adapt
from monitor.training.onsite import Site, printer_of

DOCS = Path(__file__).resolve().parents[1] / "docs"
SLM = DOCS.parents[1] / "shared" / "data" / "slm"


@pytest.mark.benchmark
@pytest.mark.skipif(not SLM.is_dir(), reason="../shared/data/slm is not beside the repo")
def test_adapting_on_b0_clears_the_other_builds(tmp_path: Path) -> None:
    """`pbf-monitor adapt --config docs/slm.toml --build B0 --holdout-build B20220819
    --holdout-build B20220824`: the issue's goal is at most 1% of the held-out builds' part
    area marked, with pasted defects of every class still found >= 70% of the time."""
    data = tomllib.loads((DOCS / "slm.toml").read_text())
    data["store"]["state_dir"] = str(tmp_path)
    data["model"]["device"] = "cpu"
    cfg = parse_config(data, base_dir=DOCS)
    pc = printer_of(cfg.fleet(), None)
    site = Site(pc)
    res = adapt(cfg, pc, weights=cfg.model.weights, out=tmp_path / "adapted.safetensors",
                train_items=site.layers(["B0"]),
                holdout_items=site.layers(["B20220819", "B20220824"]),
                opts=AdaptOptions(device="cpu"))
    print(res.reason, "BEFORE", res.before.as_json(), "AFTER", res.after.as_json())
    assert res.written, res.reason
    assert res.after.mean_false is not None and res.after.mean_false <= 0.01
    recall = res.after.recall()
    for cls in ("swelling", "spatter", "misprint", "over_melting", "under_melting"):
        assert (recall[cls] or 0.0) >= 0.7, recall
        assert (res.before.recall()[cls] or 0.0) >= 0.7, res.before.recall()
