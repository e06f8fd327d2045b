from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from monitor.cli import main
from tests.conftest import encode, layer_image, write_config


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "monitor", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_validate_config_ok(tmp_path: Path, tiny_weights: Path) -> None:
    (tmp_path / "watch").mkdir()
    cfg = write_config(tmp_path / "c.toml", f'[model]\nweights = "{tiny_weights}"\n'
                       '[store]\nstate_dir = "state"\n')
    result = CliRunner().invoke(main, ["validate-config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output and "spatter" in result.output


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("[watch]\nsettle = 2\n", "watch.settle: unknown key"),
        ("[model]\nweights = 'missing.safetensors'\n",
         "missing.safetensors: weights file not found"),
        ("[[alarms.rules]]\nclass = 'cracks'\nthreshold = 0.1\n",
         "alarms.rules[0].class: unknown class 'cracks'"),
        ("[geometry]\noutside_classes = ['misprnt']\n",
         "geometry.outside_classes: unknown class 'misprnt'"),
        ("[[alarms.rules]]\nclass = 'spatter'\nthreshold = 0.1\nmetric = 'volume'\n",
         "alarms.rules.0.metric: Input should be"),
    ],
)
def test_bad_config_is_one_line_without_traceback(tmp_path: Path, body: str,
                                                  needle: str) -> None:
    cfg = write_config(tmp_path / "c.toml", body)
    proc = run_cli("validate-config", str(cfg))
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_run_with_cuda_on_a_cpu_machine_fails_cleanly(tmp_path: Path, tiny_weights: Path) -> None:
    (tmp_path / "watch").mkdir()
    cfg = write_config(tmp_path / "c.toml", f"""
[model]
weights = "{tiny_weights}"
device = "cuda"
[store]
state_dir = "st"
""")
    proc = run_cli("run", "--config", str(cfg))
    assert proc.returncode == 2
    assert "model.device" in proc.stderr and "Traceback" not in proc.stderr


def test_run_with_unwritable_state_dir(tmp_path: Path, tiny_weights: Path) -> None:
    (tmp_path / "blocker").write_text("")
    cfg = write_config(tmp_path / "c.toml", f"""
[model]
weights = "{tiny_weights}"
[store]
state_dir = "blocker/state"
""")
    proc = run_cli("run", "--config", str(cfg))
    assert proc.returncode == 2, proc.stderr
    assert "state directory" in proc.stderr and "Traceback" not in proc.stderr


def test_infer_json_and_overlay(tmp_path: Path, tiny_weights: Path) -> None:
    img = tmp_path / "layer_1.png"
    img.write_bytes(encode(layer_image(size=80), ".png"))
    out = tmp_path / "overlay.png"
    result = CliRunner().invoke(main, ["infer", str(img), "--weights", str(tiny_weights),
                                       "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["width"], data["height"]) == (80, 80)
    assert set(data["classes"]["swelling"]) >= {"area_fraction", "area_mm2", "components",
                                               "largest_component_px"}
    assert out.stat().st_size > 0


def test_infer_corrupt_image(tmp_path: Path, tiny_weights: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    result = CliRunner().invoke(main, ["infer", str(bad), "--weights", str(tiny_weights)])
    assert result.exit_code == 2
    assert "bad.png" in result.output and "not a supported image format" in result.output


def test_builds_and_report_formats(tmp_path: Path, tiny_weights: Path) -> None:
    from sqlalchemy.orm import Session

    from monitor.config import load_config
    from monitor.records import LayerRecord
    from monitor.store.connect import open_db
    from monitor.store.writes import put_layer
    from monitor.vision.stats import layer_stats

    cfg_path = write_config(tmp_path / "c.toml", '[store]\nstate_dir = "st"\n')
    cfg = load_config(cfg_path)
    engine = open_db(cfg.store_url)
    masks = np.zeros((2, 10, 10), bool)
    masks[1, :5, :5] = True
    with Session(engine) as s, s.begin():
        for n in (2, 1):
            put_layer(s, LayerRecord(
                printer="", build="B", layer=n, status="ok", error=None, image_path="x",
                image_size=1, image_mtime_ns=1, image_sha256="", model_sha256="m",
                detected_at=0, processed_at=0,
                stats=layer_stats(masks, ["no_defect", "spatter"], pixel_size_mm=0.1)))
        put_layer(s, LayerRecord(
            printer="", build="B", layer=3, status="error", error="empty file", image_path="y",
            image_size=0, image_mtime_ns=1, image_sha256=None, model_sha256="m",
            detected_at=0, processed_at=0))
    engine.dispose()
    runner = CliRunner()
    res = runner.invoke(main, ["report", "B", "--config", str(cfg_path), "--format", "json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert [(r["layer"], r["status"], r["error"]) for r in rep["layers"]] == [
        (1, "ok", None), (2, "ok", None), (3, "error", "empty file")]
    assert rep["layers"][0]["classes"]["spatter"]["area_fraction"] == pytest.approx(0.25)
    res = runner.invoke(main, ["report", "B", "--config", str(cfg_path), "--format", "csv"])
    lines = res.output.strip().splitlines()
    assert lines[0].startswith("build,layer,status,error,no_defect_area_fraction")
    assert len(lines) == 4 and lines[3].startswith("B,3,error,empty file")
    res = runner.invoke(main, ["report", "B", "--config", str(cfg_path)])
    assert res.exit_code == 0 and "25.00 / 1" in res.output
    res = runner.invoke(main, ["builds", "--config", str(cfg_path), "--json"])
    assert json.loads(res.output)[0]["layers"] == 3
    res = runner.invoke(main, ["report", "nope", "--config", str(cfg_path)])
    assert res.exit_code == 2 and "no build named 'nope'" in res.output


def test_python_dash_m_and_help() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("run", "infer", "validate-config", "subscribe", "builds", "report", "demo"):
        assert cmd in proc.stdout
