from __future__ import annotations

from pathlib import Path

from rich.console import Console

from monitor.demo import run_demo


def test_demo_processes_every_layer(tmp_path: Path, tiny_weights: Path) -> None:
    console = Console(record=True, width=200)
    report = run_demo(layers=3, size=128, interval_s=0.1, seed=3, workdir=tmp_path,
                      weights=tiny_weights, console=console)
    assert [(r["layer"], r["status"]) for r in report["layers"]] == [(1, "ok"), (2, "ok"),
                                                                     (3, "ok")]
    text = console.export_text()
    assert "3/3 layer messages received" in text
    assert (tmp_path / "state" / "pbf-monitor.db").is_file()
