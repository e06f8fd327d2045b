"""The read-only commands (builds, report, alarms): no database yet, names that are markup,
narrow terminals and pipes; and a database deleted under the running daemon."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy.orm import Session

from monitor.cli import main
from monitor.config import load_config
from monitor.records import LayerRecord
from monitor.reports.report import markdown_text
from monitor.store.connect import open_db
from monitor.store.writes import put_layer
from monitor.vision.classes import DEFAULT_CLASS_NAMES
from monitor.vision.stats import layer_stats
from tests.conftest import daemon_toml, encode, layer_image, wait_for_rows, write_config

READERS = [["builds"], ["report", "B"], ["report", "B", "--format", "json"], ["alarms"]]


@pytest.mark.parametrize("args", READERS)
def test_no_database_yet_is_one_line_and_creates_nothing(tmp_path: Path,
                                                         args: list[str]) -> None:
    cfg = write_config(tmp_path / "c.toml", '[store]\nstate_dir = "state"\n')
    db = tmp_path / "state" / "pbf-monitor.db"
    for _ in range(2):  # the second call fails the same way: nothing was left behind
        result = CliRunner().invoke(main, [*args, "--config", str(cfg)])
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        (line,) = result.output.strip().splitlines()
        assert f"no database yet at {db}" in line and "--config" in line, line
        assert "store.state_dir" in line
        assert not db.exists() and not (tmp_path / "state").exists()


@pytest.mark.parametrize("args", READERS)
def test_an_empty_database_file_is_named_not_a_traceback(tmp_path: Path,
                                                         args: list[str]) -> None:
    """The 0-byte file earlier versions left behind."""
    cfg = write_config(tmp_path / "c.toml", '[store]\nstate_dir = "state"\n')
    db = tmp_path / "state" / "pbf-monitor.db"
    db.parent.mkdir()
    db.write_bytes(b"")
    result = CliRunner().invoke(main, [*args, "--config", str(cfg)])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert "no pbf-monitor database there yet" in line, line
    assert db.stat().st_size == 0


def _store(cfg_path: Path, builds: list[str]) -> None:
    """Layers of the named builds, with every default class, written as the daemon would."""
    cfg = load_config(cfg_path)
    engine = open_db(cfg.store_url)
    masks = np.zeros((len(DEFAULT_CLASS_NAMES), 10, 10), bool)
    masks[1:, :5, :5] = True
    with Session(engine) as s, s.begin():
        for build in builds:
            for n in (1, 2):
                put_layer(s, LayerRecord(
                    printer="", build=build, layer=n, status="ok", error=None,
                    image_path=f"/camera/{build}/layer_{n}.png", image_size=1,
                    image_mtime_ns=1, image_sha256="", model_sha256="m", detected_at=0,
                    processed_at=0,
                    stats=layer_stats(masks, list(DEFAULT_CLASS_NAMES), pixel_size_mm=0.1)))
            put_layer(s, LayerRecord(
                printer="", build=build, layer=3, status="error", error="[bold]odd[/] reason",
                image_path="y", image_size=0, image_mtime_ns=1, image_sha256=None,
                model_sha256="m", detected_at=0, processed_at=0))
    engine.dispose()


MARKUP = ["[/]", "[click](javascript:alert(1))", "[bold red]loud"]


def test_names_with_markup_are_shown_as_they_are(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", '[store]\nstate_dir = "state"\n')
    _store(cfg, MARKUP)
    runner = CliRunner()
    result = runner.invoke(main, ["builds", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    for name in MARKUP:
        assert name in result.output
    for name in MARKUP:
        result = runner.invoke(main, ["report", name, "--config", str(cfg)])
        assert result.exit_code == 0, result.output
        assert f"build {name}: 3 layers" in result.output
        assert "[bold]odd[/] reason" in result.output
    # The dashboard's Markdown: a link is text, not a link.
    assert markdown_text(MARKUP[1]) == r"\[click\]\(javascript\:alert\(1\)\)"


def _lines_with(text: str, pattern: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.search(pattern, ln)]


def test_tables_at_80_columns_and_piped_keep_names_and_rows_whole(tmp_path: Path) -> None:
    long_name = "customer-bracket-batch-2024-11-07-ti64-recoat-test"
    cfg = write_config(tmp_path / "c.toml", '[store]\nstate_dir = "state"\n')
    _store(cfg, [long_name])
    runner = CliRunner(env={"COLUMNS": "80"})  # CliRunner's output is a pipe, not a tty
    result = runner.invoke(main, ["report", long_name, "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    for name in DEFAULT_CLASS_NAMES[1:]:
        assert _lines_with(result.output, rf"\b{name}\b"), result.output  # never cut
    assert "…" not in result.output
    # One line per layer, every class's cell on it.
    (row,) = _lines_with(result.output, r"^\S\s+1\s")
    assert row.count("25.00 / 1") == len(DEFAULT_CLASS_NAMES) - 1, result.output
    (row,) = _lines_with(result.output, r"^\S\s+3\s")
    assert "[bold]odd[/] reason" in row
    result = runner.invoke(main, ["builds", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert _lines_with(result.output, re.escape(long_name)), result.output


def test_database_deleted_under_the_daemon(tmp_path: Path, tiny_weights: Path) -> None:
    """Health says so and the watchdog goes unfed; nothing is written into the deleted file;
    a restart makes a new database and catches the layers up."""
    from monitor.daemon.daemon import Daemon

    cfg = load_config(write_config(tmp_path / "c.toml", daemon_toml(tiny_weights)))
    build = cfg.watch.dir / "B1"
    build.mkdir(parents=True)
    db = cfg.state_dir / "pbf-monitor.db"
    daemon = Daemon(cfg)
    daemon.start()
    try:
        (build / "layer_00001.png").write_bytes(encode(layer_image(1), ".png"))
        wait_for_rows(cfg.store_url, "SELECT id FROM layers", 1)
        assert daemon.health()["store"] == "ok"
        for f in cfg.state_dir.glob("pbf-monitor.db*"):
            f.unlink()
        health = daemon.health()["store"]
        assert str(db) in health and "deleted" in health and "restart" in health
        assert not daemon.healthy(within_s=3600)
        (build / "layer_00002.png").write_bytes(encode(layer_image(2), ".png"))
        # The layer reaches the writer, which refuses it (its health reason stays).
        deadline_counts = daemon.counts
        while sum(deadline_counts.values()) < 2:
            import time
            time.sleep(0.05)
        assert not db.exists()
    finally:
        daemon.stop()
    daemon = Daemon(cfg)
    daemon.start()
    try:
        rows = wait_for_rows(cfg.store_url, "SELECT layer FROM layers ORDER BY layer", 2)
        assert [r[0] for r in rows] == [1, 2]
        assert daemon.health()["store"] == "ok"
    finally:
        daemon.stop()


def test_json_output_is_unchanged_by_the_terminal(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", '[store]\nstate_dir = "state"\n')
    _store(cfg, ["B"])
    result = CliRunner(env={"COLUMNS": "80"}).invoke(main, ["builds", "--config", str(cfg),
                                                            "--json"])
    assert json.loads(result.output)[0]["layers"] == 3
