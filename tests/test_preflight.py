"""What `run` needs from the file system, refused in one line before anything starts, and
checked by `validate-config` without creating anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from monitor.cli import main
from tests.conftest import write_config


def _config(root: Path, weights: Path, watch: str, *, state: str = "state",
            printers: bool = False) -> Path:
    if printers:
        table = f'[[printers]]\nname = "P1"\nwatch = {{ {watch} }}\n'
    else:
        table = "[watch]\n" + watch.replace(", ", "\n") + "\n"
    return write_config(root / "c.toml", f'{table}[model]\nweights = "{weights}"\n'
                                         f'device = "cpu"\n[store]\nstate_dir = "{state}"\n'
                                         '[metrics]\nlisten = ""\n')


def _setup(root: Path) -> None:
    (root / "afile").write_text("")
    (root / "watch").mkdir()


# (watch table, state_dir, what validate-config and run say)
CASES = [
    ('dir = "wacth/B/x"', "state", 'watch.dir {root}/wacth/B/x: no such folder'),
    ('dir = "afile"', "state", "watch.dir {root}/afile: is a file, not a folder"),
    ('dir = "afile/sub", create = true', "state",
     "watch.dir {root}/afile/sub: cannot be created: {root}/afile is a file"),
    ('dir = "watch"', "afile/state",
     "store.state_dir {root}/afile/state: cannot be created: {root}/afile is a file"),
    ('dir = "watch"', "afile", "store.state_dir {root}/afile: is a file, not a folder"),
]


@pytest.mark.parametrize(("watch", "state", "needle"), CASES)
def test_validate_config_checks_what_run_needs(tmp_path: Path, tiny_weights: Path, watch: str,
                                               state: str, needle: str) -> None:
    _setup(tmp_path)
    cfg = _config(tmp_path, tiny_weights, watch, state=state)
    result = CliRunner().invoke(main, ["validate-config", str(cfg)])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert needle.format(root=tmp_path) in line, line
    assert not (tmp_path / "wacth").exists() and not (tmp_path / "state").exists()


def test_a_printers_watch_folder_is_named_by_its_key(tmp_path: Path,
                                                     tiny_weights: Path) -> None:
    cfg = _config(tmp_path, tiny_weights, 'dir = "p1"', printers=True)
    result = CliRunner().invoke(main, ["validate-config", str(cfg)])
    assert result.exit_code == 2, result.output
    assert f"printers.P1.watch.dir {tmp_path}/p1: no such folder" in result.output
    assert "create = true" in result.output


def test_create_true_is_ok_and_validate_config_creates_nothing(tmp_path: Path,
                                                               tiny_weights: Path) -> None:
    cfg = _config(tmp_path, tiny_weights, 'dir = "new/watch", create = true')
    result = CliRunner().invoke(main, ["validate-config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "new").exists() and not (tmp_path / "state").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_an_unreadable_watch_folder(tmp_path: Path, tiny_weights: Path) -> None:
    (tmp_path / "watch").mkdir(mode=0o300)
    cfg = _config(tmp_path, tiny_weights, 'dir = "watch"')
    result = CliRunner().invoke(main, ["validate-config", str(cfg)])
    assert result.exit_code == 2, result.output
    assert "cannot read the folder" in result.output


@pytest.mark.parametrize(("watch", "needle"), [
    ('dir = "wacth/B/x"', "watch.dir {root}/wacth/B/x: no such folder"),
    ('dir = "afile"', "watch.dir {root}/afile: is a file, not a folder"),
    ('dir = "afile/sub", create = true', "watch.dir {root}/afile/sub: cannot create the folder"),
])
def test_run_refuses_a_wrong_watch_folder(tmp_path: Path, tiny_weights: Path, watch: str,
                                          needle: str) -> None:
    _setup(tmp_path)
    cfg = _config(tmp_path, tiny_weights, watch)
    proc = subprocess.run([sys.executable, "-m", "monitor", "run", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert needle.format(root=tmp_path) in line, proc.stderr
    assert not (tmp_path / "wacth").exists()
