"""The benchmark command runs end to end (at a tiny size: its figures are not checked here;
speed is measured by running `pbf-monitor bench`, not by tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from monitor.cli import main
from monitor.tools import bench
from monitor.tools.bench import model_gflop, mosquitto_binary, sinks_end_to_end
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
                "layer_peak_rss_mb", "geometry_overhead", "geometry_e2e_p50_ms",
                "sinks_overhead", "sinks_e2e_p50_ms", "sinks_skipped"):
        assert key in summary
    assert summary["speedup_vs_eager"] > 0 and summary["fraction_of_matmul"] > 0
    assert summary["geometry_overhead"] > 0
    assert summary["layer_peak_rss_mb"] >= summary["model_loaded_rss_mb"] > 50
    assert "eager fp32" in r.output
    assert "end to end with [opcua] and [mqtt]" in r.output


def test_bench_sinks_run_publishes_over_opcua_and_mqtt(tiny_weights: Path) -> None:
    """The sinks run on a real mosquitto: its fields, and (inside it) a client of each sink
    read the last layer."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
    run = sinks_end_to_end(tiny_weights, 96, 3)
    assert run["sinks_skipped"] is None
    assert 0 < run["sinks_e2e_p50_ms"] <= run["sinks_e2e_p95_ms"]


@pytest.mark.parametrize(("binary", "reason"), [
    (None, "no mosquitto on PATH"),
    ("/bin/false", "/bin/false did not listen"),  # one that exits at once
])
def test_bench_sinks_run_without_a_broker_is_skipped_with_the_reason(
        binary: str | None, reason: str, tiny_weights: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "mosquitto_binary", lambda: binary)
    run = sinks_end_to_end(tiny_weights, 96, 3)
    assert reason in run["sinks_skipped"]
    assert run["sinks_e2e_p50_ms"] is None
