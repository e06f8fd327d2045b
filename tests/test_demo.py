from __future__ import annotations

from pathlib import Path

from rich.console import Console

from monitor.tools.demo import run_demo


def test_demo_processes_every_layer(tmp_path: Path, tiny_weights: Path) -> None:
    console = Console(record=True, width=200)
    report = run_demo(layers=3, size=128, interval_s=0.1, seed=3, workdir=tmp_path,
                      weights=tiny_weights, console=console)
    assert [(r["layer"], r["status"]) for r in report["layers"]] == [(1, "ok"), (2, "ok"),
                                                                     (3, "ok")]
    text = console.export_text()
    assert "3/3 layer messages received" in text
    assert (tmp_path / "state" / "pbf-monitor.db").is_file()


def test_demo_build_reports_with_the_default_model(tmp_path: Path) -> None:
    """The default weights on the demo's synthetic build: the report shows what they found."""
    import json

    from click.testing import CliRunner

    from monitor.cli import main

    run_demo(layers=4, size=256, interval_s=0.05, seed=11, workdir=tmp_path,
             console=Console(record=True, width=200))
    cfg = tmp_path / "demo.toml"
    out = CliRunner().invoke(main, ["report", "demo-11", "-c", str(cfg), "--format", "json"])
    assert out.exit_code == 0, out.output
    found = {c for layer in json.loads(out.output)["layers"]
             for c, st in layer["classes"].items() if c != "no_defect" and st["pixel_count"]}
    assert found  # synthetic layers always hold defects; the default model finds some
    html = tmp_path / "r.html"
    out = CliRunner().invoke(main, ["report", "demo-11", "-c", str(cfg), "--format", "html",
                                    "--out", str(html)])
    assert out.exit_code == 0 and 'class="overlay"' in html.read_text()


def test_demo_piped_at_80_columns_says_where_its_database_went(tmp_path: Path,
                                                               tiny_weights: Path) -> None:
    """Without --workdir: one line per layer, the table whole, and the end says the database
    went with the temporary folder and how to keep it, naming this executable."""
    import sys

    from click.testing import CliRunner

    from monitor.cli import main

    result = CliRunner(env={"COLUMNS": "80"}).invoke(main, [
        "demo", "--layers", "2", "--size", "128", "--interval", "0.1", "--seed", "3",
        "--weights", str(tiny_weights)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    layer_lines = [ln for ln in lines if ln.startswith("  layer ")]
    assert len(layer_lines) == 2 and all("seq " in ln for ln in layer_lines), result.output
    assert "under_melting" in result.output and "…" not in result.output
    # Under pytest, argv[0] is not pbf-monitor: the hint says how to run this one.
    assert "deleted with its temporary folder" in result.output
    assert f"{sys.executable} -m monitor demo --workdir DIR" in result.output
