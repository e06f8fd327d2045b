"""The benchmark command runs end to end (at a tiny size: its figures are not checked here;
speed is measured by running `pbf-monitor bench`, not by tests)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from monitor.cli import main
from monitor.tools.bench import model_gflop
from monitor.vision.model import ModelInfo


def test_flops_scale_with_area_and_width() -> None:
    small = model_gflop(ModelInfo(class_names=("a", "b"), base_channels=8), 64)
    assert model_gflop(ModelInfo(class_names=("a", "b"), base_channels=8), 128) == (
        pytest.approx(4 * small, rel=0.01))
    assert model_gflop(ModelInfo(class_names=("a", "b"), base_channels=16), 64) == (
        pytest.approx(4 * small, rel=0.05))


def test_bench_command_prints_a_table_then_json() -> None:
    r = CliRunner().invoke(main, ["bench", "--size", "128", "--layers", "1", "--e2e-layers",
                                  "3", "--seed-size", "0", "--memory-size", "256"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    for key in ("speedup_vs_eager", "fraction_of_matmul", "e2e_p50_ms", "e2e_p95_ms",
                "e2e_p99_ms", "backlog_layers_per_s", "peak_rss_mb", "default_backend",
                "layer_peak_rss_mb", "geometry_overhead", "geometry_e2e_p50_ms"):
        assert key in summary
    assert summary["speedup_vs_eager"] > 0 and summary["fraction_of_matmul"] > 0
    assert summary["geometry_overhead"] > 0
    assert summary["layer_peak_rss_mb"] >= summary["model_loaded_rss_mb"] > 50
    assert "eager fp32" in r.output
