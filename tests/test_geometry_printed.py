"""Printed area and per-part statistics: synthetic bright/dark melt, gradients, ghosts, and
the real SLM layers (a part painted over with powder)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from monitor.geometry.calibration import Calibration
from monitor.geometry.parts import part_stats
from monitor.geometry.printed import printed_area

SLM = Path("/work/shared/data/slm")
if not SLM.is_dir():
    SLM = Path(__file__).resolve().parents[2] / "shared" / "data" / "slm"


def _scene(bright: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """512 px powder bed with a lighting gradient and three square parts; part 3 unprinted."""
    h = w = 512
    _yy, xx = np.mgrid[0:h, 0:w]
    img = 90 + 60 * xx / w + rng.normal(0, 6, (h, w))        # gradient: 90 -> 150
    labels = np.zeros((h, w), np.int32)
    labels[60:160, 60:160] = 1
    labels[300:420, 280:460] = 2
    labels[60:140, 360:460] = 3
    melt = (labels == 1) | (labels == 2)
    img[melt] += 45 if bright else -25
    img[melt] += rng.normal(0, 10 if bright else 4, int(melt.sum()))
    if not bright:                                             # specular speckle
        speck = melt & (rng.random((h, w)) < 0.02)
        img[speck] = 230
    return np.clip(img, 0, 255).astype(np.uint8), labels, melt


@pytest.mark.parametrize("bright", [True, False])
def test_synthetic_melt_with_gradient(bright: bool) -> None:
    img, labels, melt = _scene(bright, np.random.default_rng(1))
    pr = printed_area(img, labels > 0, tolerance_px=4)
    assert pr.polarity == (1 if bright else -1)
    iou = (pr.mask & melt).sum() / (pr.mask | melt).sum()
    assert iou > 0.9
    cal = Calibration.from_corners(None, image_size=(512, 512), frame_px=(512, 512),
                                   pixel_size_mm=0.1)
    stats = {s.id: s for s in part_stats(labels, pr.mask, {}, cal, tolerance_mm=0.4)}
    assert stats[1].printed_fraction > 0.9 and stats[2].printed_fraction > 0.9
    assert stats[3].printed_fraction < 0.1
    assert stats[1].nominal_mm2 == pytest.approx(100.0)


def test_ghost_of_previous_layer_is_not_printed() -> None:
    """A part that narrows: the earlier, wider cross-section shows through fresh powder
    around this layer's part, inside its search zone."""
    img, labels, melt = _scene(False, np.random.default_rng(2))
    ghost = np.zeros_like(melt)
    ghost[40:180, 40:180] = True
    ghost &= labels == 0
    img = img.astype(np.float32)
    img[ghost] -= 8                                  # a faint shadow with powder texture
    pr = printed_area(img.astype(np.uint8), labels > 0, tolerance_px=12)
    # The box-window features bleed about smooth_px (8) past a melt edge; beyond that the
    # ghost must stay powder (the bleed is a known limit, docs/printed-area.md).
    near = cv2.dilate((labels == 1).astype(np.uint8), np.ones((19, 19), np.uint8)) > 0
    assert pr.mask[ghost & ~near].mean() < 0.05
    assert pr.mask[melt].mean() > 0.9


def test_blank_layer_prints_nothing() -> None:
    rng = np.random.default_rng(3)
    img = (110 + rng.normal(0, 6, (256, 256))).astype(np.uint8)
    nominal = np.zeros((256, 256), bool)
    nominal[50:150, 50:150] = True
    pr = printed_area(img, nominal, tolerance_px=3)
    assert pr.polarity == 0 and not pr.mask.any()


def _slm(build: str, layer: int) -> tuple[np.ndarray, np.ndarray, Calibration]:
    cal_json = json.loads((SLM / "calibration.json").read_text())
    img = cv2.imread(str(SLM / f"images/{build}/layer_{layer:05d}.jpg"), cv2.IMREAD_GRAYSCALE)
    nom = cv2.imread(str(SLM / f"nominal/{build}/layer_{layer:05d}.png"), cv2.IMREAD_GRAYSCALE)
    cal = Calibration.from_corners(cal_json["plate_corners_px"],
                                   image_size=(img.shape[1], img.shape[0]),
                                   frame_px=tuple(cal_json["nominal_frame_px"]),
                                   frame_mm=(0, 0, 216, 216))
    _, frame_labels = cv2.connectedComponents((nom > 0).astype(np.uint8))
    return img, cal.frame_to_image_labels(frame_labels, img.shape), cal


@pytest.mark.skipif(not SLM.is_dir(), reason="shared SLM data not present")
def test_part_painted_over_with_powder() -> None:
    img, labels, cal = _slm("B20220824", 80)
    ids = np.unique(labels[labels > 0])
    target = int(ids[len(ids) // 2])
    part = labels == target
    # fill the part with powder texture from the ring around it (tiled)
    ring = (cv2.dilate(part.astype(np.uint8), np.ones((61, 61), np.uint8)) > 0) & (labels == 0)
    ys, xs = np.nonzero(part)
    y0, x0 = ys.min(), xs.min()
    ph, pw = ys.max() - y0 + 1, xs.max() - x0 + 1
    ry, rx = np.nonzero(ring)
    donor = None
    for dy, dx in [(0, -pw - 20), (0, pw + 20), (-ph - 20, 0), (ph + 20, 0)]:
        sl = (slice(y0 + dy, y0 + dy + ph), slice(x0 + dx, x0 + dx + pw))
        if (labels[sl] == 0).all():
            donor = img[sl]
            break
    assert donor is not None, (len(ry), len(rx))
    painted = img.copy()
    painted[y0:y0 + ph, x0:x0 + pw][part[y0:y0 + ph, x0:x0 + pw]] = \
        donor[part[y0:y0 + ph, x0:x0 + pw]]
    pr = printed_area(painted, labels > 0, tolerance_px=6)
    stats = {s.id: s for s in part_stats(labels, pr.mask, {}, cal, tolerance_mm=0.5)}
    assert stats[target].printed_fraction < 0.3
    others = [s.printed_fraction for i, s in stats.items() if i != target]
    assert min(others) > 0.7 and np.median(others) > 0.85


@pytest.mark.skipif(not SLM.is_dir(), reason="shared SLM data not present")
def test_real_layer_iou_floor() -> None:
    """A regression floor, not the goal: see docs/printed-area.md for every layer."""
    img, labels, _ = _slm("B20220819", 32)
    pr = printed_area(img, labels > 0, tolerance_px=6)
    nominal = labels > 0
    assert pr.polarity == -1
    assert (pr.mask & nominal).sum() / (pr.mask | nominal).sum() > 0.7


def test_part_stats_excess_shift_and_classes() -> None:
    labels = np.zeros((200, 200), np.int32)
    labels[20:60, 20:60] = 1          # 40 x 40 px = 16 mm² at 0.1 mm
    labels[120:180, 120:180] = 2
    printed = np.zeros((200, 200), bool)
    printed[20:60, 24:64] = True      # shifted 4 px = 0.4 mm in x, stays in the zone (5 px)
    printed[120:180, 120:180] = True
    printed[100:110, 150:160] = True  # 1 mm² excess, nearest part 2
    swelling = np.zeros((200, 200), bool)
    swelling[20:30, 20:30] = True     # 1 mm² on part 1
    cal = Calibration.from_corners(None, image_size=(200, 200), frame_px=(200, 200),
                                   pixel_size_mm=0.1)
    s = {p.id: p for p in part_stats(labels, printed, {"swelling": swelling}, cal,
                                     tolerance_mm=0.5)}
    assert s[1].nominal_mm2 == pytest.approx(16.0)
    assert s[1].printed_fraction == pytest.approx(36 / 40)
    assert s[1].centroid_shift_mm == pytest.approx(0.4, abs=0.01)
    assert s[1].excess_fraction == 0.0
    assert s[2].excess_fraction == pytest.approx(1.0 / 36.0)
    assert s[1].classes["swelling"] == pytest.approx(1 / 16)
    j = s[1].to_json()
    assert set(j) == {"id", "nominal_mm2", "printed_fraction", "excess_fraction",
                      "centroid_shift_mm", "classes"}
    assert json.dumps(j)
