"""Healthy synthetic builds, and the alarm-rate measurement of the README (opt-in)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from monitor.cli import main
from monitor.training.synth import BuildGenerator

SLM = Path("/work/shared/data/slm")


def test_synth_without_defects_draws_no_defect_class(tmp_path: Path) -> None:
    healthy = BuildGenerator(size=96, layers=12, seed=3, defects=False)
    sick = BuildGenerator(size=96, layers=12, seed=3)
    assert not any(lay.masks[1:].any() for lay in healthy)  # channels 1.. are defects
    assert any(lay.masks[1:].any() for lay in sick)
    # the same parts either way
    assert np.array_equal(healthy.nominal(5), sick.nominal(5))
    res = CliRunner().invoke(main, ["synth", str(tmp_path / "h"), "--layers", "2", "--size",
                                    "64", "--no-defects"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert manifest["source"]["defects"] is False


def test_misprint_episodes_are_runs_of_layers_with_enough_misprint() -> None:
    from monitor.tools.alarm_rate import _episodes

    assert _episodes([0.0, 3.0, 2.0, 0.0, 1.9, 5.0], 2.0) == [(2, 3), (6, 6)]
    assert _episodes([], 2.0) == []


@pytest.mark.benchmark
def test_alarm_rates_of_the_default_model(tmp_path: Path) -> None:
    """The README's numbers: alarms per 100 healthy layers and recall on injected defects,
    default config and weights (prints the JSON; asserts only what the README promises)."""
    from monitor.config import DEFAULT_WEIGHTS
    from monitor.tools.alarm_rate import measure

    out = measure(DEFAULT_WEIGHTS, tmp_path, slm_root=SLM if SLM.is_dir() else None,
                  device="cpu")
    print(json.dumps(out, indent=1))
    for key in ("slm_all_with_slices", "synthetic_healthy", "synthetic_healthy_varied_cameras"):
        if key in out:
            # the goal: at most 3 alarms per 100 healthy layers, none critical
            assert out[key]["as_run"]["per_100_layers"] <= 3.0, (key, out[key])
            assert out[key]["as_run"]["critical"] == 0, (key, out[key])
            # as the daemon runs the default weights (adapted to no camera): nothing critical,
            # no hook from the defect classes
            assert out[key]["as_run"]["hook"] == sum(
                n for rule, n in out[key]["as_run"]["by_rule"].items()
                if rule.startswith("part_missing"))
    # the other goal: every stacking defect and every missing part alarms in time
    recall = out["synthetic_defects"]["recall_if_trusted"]
    for kind in ("stacking (swelling episode)", "part_missing"):
        assert recall[kind]["injected"] >= 10 and recall[kind]["recall"] == 1.0, recall
