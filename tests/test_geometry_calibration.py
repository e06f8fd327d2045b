"""Calibration: homography recovery, mm² under an oblique view, config keys."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from monitor.config import parse_config
from monitor.errors import ConfigError
from monitor.geometry.calibration import Calibration

CORNERS = [[313.62, 83.35], [2080.92, 92.96], [2221.31, 1810.27], [175.15, 1808.35]]


def test_known_homography_is_recovered() -> None:
    h = np.array([[0.9, 0.05, 30.0], [-0.02, 1.1, 12.0], [1e-5, 4e-5, 1.0]])
    frame = np.float32([[0, 0], [1000, 0], [1000, 800], [0, 800]])
    img_corners = cv2.perspectiveTransform(frame[None], np.linalg.inv(h))[0]
    cal = Calibration.from_corners(img_corners.tolist(), image_size=(1200, 1000),
                                   frame_px=(1000, 800), frame_mm=(0, 0, 100, 80))
    np.testing.assert_allclose(cal.image_to_frame, h / h[2, 2], rtol=1e-5, atol=1e-8)
    pts = np.array([[10.0, 20.0], [500.0, 700.0]])
    np.testing.assert_allclose(cal.to_image(cal.to_frame(pts)), pts, atol=1e-6)


def test_oblique_square_area_in_mm() -> None:
    # a 20 mm square drawn in a 216 mm frame, seen through the SLM camera's homography
    cal = Calibration.from_corners(CORNERS, image_size=(2736, 1824), frame_px=(2160, 2160),
                                   frame_mm=(0, 0, 216, 216))
    for x0, y0 in [(20, 20), (150, 160)]:  # near and far side of the oblique view
        sq_mm = np.array([[x0, y0], [x0 + 20, y0], [x0 + 20, y0 + 20], [x0, y0 + 20]])
        poly = cal.to_image(cal.mm_to_frame(sq_mm))
        mask = np.zeros((1824, 2736), np.uint8)
        cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 1, shift=4)
        # fillPoly also sets the pixels the outline crosses: ~half a pixel all round (1.3%)
        assert cal.area_mm2(mask > 0) == pytest.approx(400.0, rel=0.02)
        # image point -> plate mm
        np.testing.assert_allclose(cal.image_to_mm(poly), sq_mm, atol=1e-6)


def test_no_corners_means_frame_is_image() -> None:
    cal = Calibration.from_corners(None, image_size=(200, 100), frame_px=(200, 100),
                                   pixel_size_mm=0.5)
    assert cal.area_mm2(np.ones((100, 200), bool)) == pytest.approx(200 * 100 * 0.25)
    np.testing.assert_allclose(cal.to_frame([[3, 4]]), [[3, 4]], atol=1e-9)


def test_labels_warp_keeps_ids() -> None:
    cal = Calibration.from_corners(CORNERS, image_size=(2736, 1824), frame_px=(2160, 2160),
                                   frame_mm=(0, 0, 216, 216))
    labels = np.zeros((2160, 2160), np.int32)
    labels[100:300, 100:300] = 7
    labels[1000:1200, 1500:1700] = 300
    out = cal.frame_to_image_labels(labels, (1824, 2736))
    assert set(np.unique(out).tolist()) == {0, 7, 300}


@pytest.mark.parametrize(("data", "error"), [
    ({"geometry": {"nominal": "b/{build}.cli"}}, "geometry.frame_mm"),
    ({"geometry": {"nominal": "b/{build}.stl"}}, "geometry.frame_mm"),
    ({"camera": {"plate_corners_px": CORNERS}, "geometry": {"nominal": "n/{layer}.png"}},
     "geometry.frame_mm"),
    ({"camera": {"plate_corners_px": CORNERS[:3]}}, "camera.plate_corners_px"),
    ({"printers": [{"name": "a", "geometry": {"nominal": "x.3mf"}}]}, "frame_mm"),
    ({"geometry": {"tolerence_mm": 1}}, "did you mean 'tolerance_mm'"),
])
def test_geometry_config_errors_name_the_key(data: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace(".", r"\.").replace("(", r"\(")):
        parse_config(data, base_dir=Path("/tmp"))


def test_geometry_config_per_printer_and_resolved(tmp_path: Path) -> None:
    cfg = parse_config({
        "camera": {"plate_corners_px": CORNERS},
        "geometry": {"nominal": "n/{build}/l_{layer:05d}.png", "frame_mm": [0, 0, 216, 216]},
        "printers": [{"name": "p1", "watch": {"dir": "w"},
                      "geometry": {"nominal": "b/{build}.cli", "frame_mm": [0, 0, 250, 250]}}],
    }, base_dir=tmp_path)
    assert cfg.geometry.nominal == str(tmp_path / "n/{build}/l_{layer:05d}.png")
    assert cfg.fleet()[0].geometry.nominal == str(tmp_path / "b/{build}.cli")
    assert cfg.geometry.tolerance_mm == 0.5
    single = parse_config({"geometry": {"nominal": "m.png"}}, base_dir=tmp_path)
    assert single.fleet()[0].geometry.nominal == str(tmp_path / "m.png")


def test_config_toml_documents_geometry() -> None:
    text = (Path(__file__).parent.parent / "config.toml").read_text()
    from monitor.config import GeometryConfig
    for key in GeometryConfig.model_fields:
        assert key in text, key
    assert "plate_corners_px" in text
