"""camera-check and infer --masks on real files: a synthetic build with its nominal slices,
and the real SLM layers with their calibration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from monitor.cli import main
from monitor.training.synth import CLASS_NAMES, write_dataset
from tests.conftest import write_config

SLM = Path("/work/shared/data/slm")
if not SLM.is_dir():
    SLM = Path(__file__).resolve().parents[2] / "shared" / "data" / "slm"

RED, YELLOW = (0, 0, 255), (0, 255, 255)


def _colour(img: np.ndarray, bgr: tuple[int, int, int]) -> np.ndarray:
    return np.all(img == np.array(bgr, np.uint8), axis=-1)


@pytest.fixture(scope="module")
def synth_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A watch folder with build B1 (3 layers of 128 px) and nominal/B1/ beside it."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root / "ds", layers=3, size=128, seed=2)
    shutil.copytree(root / "ds" / "images", root / "watch" / "B1")
    shutil.copytree(root / "ds" / "nominal", root / "nominal" / "B1")
    return root


def _config(root: Path, body: str = "") -> Path:
    return write_config(root / "config.toml", '[watch]\ndir = "watch"\n[geometry]\n'
                        'nominal = "nominal/{build}/layer_{layer:05d}.png"\n' + body)


def test_camera_check_synthetic(synth_build: Path, tmp_path: Path) -> None:
    cfg = _config(synth_build)
    image = synth_build / "watch" / "B1" / "layer_00002.png"
    out = tmp_path / "check.png"
    r = CliRunner().invoke(main, ["camera-check", str(image), "-c", str(cfg), "--out",
                                  str(out)])
    assert r.exit_code == 0, r.output
    assert "build B1 layer 2" in r.output and "nominal part(s)" in r.output
    pic = cv2.imread(str(out), cv2.IMREAD_COLOR)
    assert pic.shape == (128, 128, 3)
    # red outlines on the nominal parts' edges, the frame (the whole image) in yellow
    nominal = cv2.imread(str(synth_build / "nominal/B1/layer_00002.png"), 0) > 0
    edge = nominal & ~cv2.erode(nominal.astype(np.uint8), np.ones((3, 3), np.uint8)) \
        .astype(bool)
    assert _colour(pic, RED)[edge].mean() > 0.5
    assert _colour(pic, YELLOW).any()


def test_camera_check_override_and_missing_slice(synth_build: Path, tmp_path: Path) -> None:
    cfg = _config(synth_build)
    image = synth_build / "watch" / "B1" / "layer_00002.png"
    out = tmp_path / "check.png"
    r = CliRunner().invoke(main, ["camera-check", str(image), "-c", str(cfg), "--out",
                                  str(out), "--layer", "99"])
    assert r.exit_code == 0, r.output
    assert "layer 99" in r.output and "no nominal slice at" in r.output
    assert not _colour(cv2.imread(str(out)), RED).any()
    r = CliRunner().invoke(main, ["camera-check", str(tmp_path / "nope.png"), "-c", str(cfg),
                                  "--out", str(out), "--layer", "1"])
    assert r.exit_code == 2 and "nope.png" in r.output and "Traceback" not in r.output


@pytest.mark.skipif(not SLM.is_dir(), reason="shared SLM data (../data/slm) not present")
def test_camera_check_slm_oblique(tmp_path: Path) -> None:
    cal = json.loads((SLM / "calibration.json").read_text())
    corners = ", ".join(f"[{x}, {y}]" for x, y in cal["plate_corners_px"])
    fw, fh = cal["nominal_frame_px"]
    cfg = write_config(tmp_path / "config.toml", f"""
[camera]
plate_corners_px = [{corners}]
[geometry]
nominal = "{SLM}/nominal/{{build}}/layer_{{layer:05d}}.png"
frame_mm = [0.0, 0.0, 216.0, 216.0]
frame_px = [{fw}, {fh}]
""")
    image = SLM / "images" / "B20220824" / "layer_00080.jpg"
    out = tmp_path / "slm.png"
    r = CliRunner().invoke(main, ["camera-check", str(image), "-c", str(cfg), "--out",
                                  str(out)])
    assert r.exit_code == 0, r.output
    assert "build B20220824 layer 80" in r.output
    pic = cv2.imread(str(out))
    assert pic.shape[:2] == tuple(cal["image_size"][::-1])
    # The frame's corners are drawn where the calibration puts them
    for x, y in cal["plate_corners_px"]:
        x0, y0 = round(x), round(y)
        assert _colour(pic[y0 - 4:y0 + 5, x0 - 4:x0 + 5], YELLOW).any()
    # The outlines lie inside the plate, and there are many of them (dozens of parts)
    red = _colour(pic, RED)
    plate = np.zeros(red.shape, np.uint8)
    cv2.fillPoly(plate, [np.round(cal["plate_corners_px"]).astype(np.int32)], 1)
    assert red.sum() > 1000 and red[plate == 0].sum() < 0.01 * red.sum()


def test_infer_writes_class_masks_and_printed(synth_build: Path, tmp_path: Path,
                                              tiny_weights: Path) -> None:
    cfg = _config(synth_build, f'[model]\nweights = "{tiny_weights}"\ndevice = "cpu"\n')
    image = synth_build / "watch" / "B1" / "layer_00001.png"
    masks = tmp_path / "masks"
    r = CliRunner().invoke(main, ["infer", str(image), "-c", str(cfg), "--masks", str(masks),
                                  "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["masks"] == [f"{c}.png" for c in CLASS_NAMES] + ["printed.png"]
    for name in out["masks"]:
        m = cv2.imread(str(masks / name), cv2.IMREAD_UNCHANGED)
        assert m.shape == (128, 128) and set(np.unique(m).tolist()) <= {0, 255}
    # The synthetic parts are melted where their slices say: printed covers them
    nominal = cv2.imread(str(synth_build / "nominal/B1/layer_00001.png"), 0) > 0
    printed = cv2.imread(str(masks / "printed.png"), 0) > 0
    assert (printed & nominal).sum() > 0.8 * nominal.sum()
    # The class masks are what the model marks: the counts agree with the statistics
    for c in CLASS_NAMES:
        m = cv2.imread(str(masks / f"{c}.png"), 0)
        assert int((m > 0).sum()) == out["classes"][c]["pixel_count"]


def test_infer_masks_without_geometry_has_no_printed(tmp_path: Path,
                                                      tiny_weights: Path) -> None:
    img = np.full((96, 80), 100, np.uint8)
    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), img)
    cfg = write_config(tmp_path / "c.toml", f'[model]\nweights = "{tiny_weights}"\n')
    r = CliRunner().invoke(main, ["infer", str(image), "-c", str(cfg), "--masks",
                                  str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == sorted(f"{c}.png" for c in CLASS_NAMES)
    assert cv2.imread(str(tmp_path / "m" / "swelling.png"), 0).shape == (96, 80)


def test_camera_check_reads_the_layer_like_the_watcher(synth_build: Path,
                                                       tmp_path: Path) -> None:
    """A height-named file under the watch folder: layer_from and the layer thickness."""
    cfg = write_config(tmp_path / "c.toml", f"""
[watch]
dir = "{synth_build / 'watch'}"
layer_from = "height_um"
[camera]
layer_thickness_mm = 0.03
[geometry]
nominal = "{synth_build}/nominal/{{build}}/layer_{{layer:05d}}.png"
""")
    image = synth_build / "watch" / "B1" / "SI_000060.png"
    shutil.copy(synth_build / "watch" / "B1" / "layer_00002.png", image)
    try:
        r = CliRunner().invoke(main, ["camera-check", str(image), "-c", str(cfg), "--out",
                                      str(tmp_path / "o.png")])
    finally:
        image.unlink()
    assert r.exit_code == 0, r.output
    assert "build B1 layer 2," in r.output and "nominal part(s)" in r.output
