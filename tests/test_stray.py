"""Stray scan tracks beyond the slice marked misprint (monitor.geometry.stray): what the
texture test takes and what it leaves, on drawn patterns, on real SLM layers with
misprints pasted in, and through the real daemon (geometry.stray_track_z on and off)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from monitor.geometry.reading import outside_zone, read_layer
from monitor.geometry.stray import stray_tracks
from monitor.vision.classes import DEFAULT_CLASS_NAMES
from tests.conftest import make_weights
from tests.test_reading import _part, _rig

NAMES = DEFAULT_CLASS_NAMES
M = NAMES.index("misprint")
SIZE = 400


def _bed(seed: int = 0, powder: float = 110.0) -> np.ndarray:
    """A 400 px bed: grainy powder with a slow lighting gradient, one part in the middle."""
    rng = np.random.default_rng(seed)
    grain = cv2.GaussianBlur(rng.normal(0, 6, (SIZE, SIZE)).astype(np.float32), (0, 0), 1.0)
    ramp = np.linspace(-15, 15, SIZE, dtype=np.float32)[None, :]
    img = powder + 3 * grain + ramp
    img[_square()] = powder - 20 + 3 * grain[_square()]  # melt darker than powder
    return img


def _square() -> np.ndarray:
    part = np.zeros((SIZE, SIZE), bool)
    part[120:280, 120:280] = True
    return part


def _zone() -> np.ndarray:
    return outside_zone(_square(), 5, 100)


def _tracks(img: np.ndarray, x0: int, y0: int, size: int, pitch: float, angle: float,
            level: float) -> np.ndarray:
    """Draw parallel tracks of grey `level` over a size x size patch; returns the patch."""
    ys, xs = np.mgrid[y0:y0 + size, x0:x0 + size]
    u = (xs - x0) * math.cos(angle) + (ys - y0) * math.sin(angle)
    on = np.cos(2 * math.pi * u / pitch) > -0.3
    patch = np.zeros(img.shape, bool)
    patch[y0:y0 + size, x0:x0 + size] = True
    img[y0:y0 + size, x0:x0 + size][on] = level
    return patch


@pytest.mark.parametrize("level", [60.0, 200.0])  # melt darker or brighter than powder
@pytest.mark.parametrize("angle", [0.0, 0.7, 1.9])
def test_a_patch_of_tracks_beside_a_part_is_found(level: float, angle: float) -> None:
    img = _bed()
    patch = _tracks(img, 300, 170, 40, 5.0, angle, level)
    got = stray_tracks(img, _zone(), z_min=10.0)
    assert got[patch].mean() >= 0.5, got[patch].mean()
    # what it marks lies on or right around the patch
    around = cv2.dilate(patch.view(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
    assert not (got & ~around).any()
    assert not (got & ~_zone()).any()


def test_the_bare_bed_edges_lines_and_specks_are_not_tracks() -> None:
    img = _bed()
    assert not stray_tracks(img, _zone(), z_min=10.0).any()
    # a chamber wall: one bright step edge across the zone
    wall = img.copy()
    wall[:, 330:] += 80
    assert not stray_tracks(wall, _zone(), z_min=10.0).any()
    # the part printed 12 px wider than its slice on one side (one edge in the zone)
    grown = img.copy()
    grown[120:280, 280:292] = grown[150, 200]
    assert not stray_tracks(grown, _zone(), z_min=10.0).any()
    # a single scratch line, and a cloud of spatter specks of the same contrast
    lines = img.copy()
    cv2.line(lines, (300, 40), (390, 110), 40.0, 2)
    rng = np.random.default_rng(1)
    for x, y in rng.integers(0, 60, (40, 2)):
        cv2.circle(lines, (int(20 + x), int(300 + y)), 2, 40.0, -1)
    assert not stray_tracks(lines, _zone(), z_min=10.0).any()


def test_off_and_empty_zone_mark_nothing() -> None:
    img = _bed()
    _tracks(img, 300, 170, 40, 5.0, 0.3, 60.0)
    assert not stray_tracks(img, _zone(), z_min=0.0).any()
    assert not stray_tracks(img, np.zeros((SIZE, SIZE), bool), z_min=10.0).any()
    # a track patch inside the part (its hatch) is the part's business, not this one's
    inside = _bed()
    _tracks(inside, 160, 160, 60, 5.0, 0.3, 60.0)
    assert not stray_tracks(inside, _zone(), z_min=10.0).any()


def test_the_grey_scale_does_not_matter() -> None:
    img = _bed()
    _tracks(img, 300, 170, 40, 5.0, 0.3, 60.0)
    a = stray_tracks(img, _zone(), z_min=10.0)
    b = stray_tracks(img / 255.0, _zone(), z_min=10.0)
    c = stray_tracks(255.0 - img, _zone(), z_min=10.0)
    assert a.any() and np.array_equal(a, b) and np.array_equal(a, c)


def test_read_layer_marks_tracks_misprint() -> None:
    masks = np.zeros((len(NAMES), 96, 96), bool)
    tracks = np.zeros((96, 96), bool)
    tracks[40:50, 80:90] = True
    out = read_layer(masks, NAMES, _part(), swelling_reach_px=1, tracks=tracks)
    assert out is not None and np.array_equal(out[M], tracks) and not masks.any()
    assert read_layer(out, NAMES, _part(), swelling_reach_px=1, tracks=tracks) is None
    # weights without misprint: nothing to mark
    assert read_layer(masks[:3], NAMES[:3], _part(), swelling_reach_px=1,
                      tracks=tracks) is None


DOCS = Path(__file__).resolve().parents[1] / "docs"
SLM = DOCS.parents[1] / "shared" / "data" / "slm"


@pytest.mark.skipif(not SLM.is_dir(), reason="../shared/data/slm is not beside the repo")
def test_real_layers_misprints_pasted_in_are_found_and_nothing_else(tmp_path: Path) -> None:
    """The held-out SLM builds' layers (melt darker than powder, glitter, dark halos and
    powder streaks around the parts): no track patch on any of them as they are; pasted
    misprints (the layer's own melt as loose tracks on the powder) found >= 70%."""
    from monitor.training.paste import paste_defects
    from tests.test_default_weights import _slm_site

    _, site = _slm_site(tmp_path)
    g = site.printer.geometry
    found = pasted = 0
    for n, item in enumerate(site.layers(["B20220819", "B20220824"])):
        img, part, zone = site.load_zones(item)
        if part is None or zone is None:
            continue
        assert not stray_tracks(img, zone, z_min=g.stray_track_z).any(), item
        for seed in range(3):  # few fit beside these parts at a time
            img2, _, got = paste_defects(img, part, np.random.default_rng([seed, n]),
                                         counts={"misprint": 3})
            tracks = stray_tracks(img2, zone, z_min=g.stray_track_z)
            for p in got:
                pasted += 1
                found += (tracks & p.mask).sum() >= 0.2 * p.mask.sum()
    assert pasted >= 6
    print(f"found {found} of {pasted}")
    assert found >= 0.7 * pasted, (found, pasted)


IGNORE_PATCH = """
[[regions]]
name = "wall"
kind = "ignore"
polygon = [[70, 25], [96, 25], [96, 55], [70, 55]]
"""


@pytest.mark.parametrize(("z", "regions"), [(10.0, ""), (0.0, ""), (10.0, IGNORE_PATCH)])
def test_the_daemon_publishes_tracks_as_misprint(tmp_path: Path, z: float,
                                                 regions: str) -> None:
    """Weights that mark nothing; a layer with a patch of tracks 10-26 px beside its part:
    misprint with geometry.stray_track_z on; nothing with it off, or where an ignore region
    covers the patch."""
    weights = make_weights(tmp_path / "w.safetensors", constant_prob={})
    rig = _rig(tmp_path, weights, f"stray_track_z = {z}\n{regions}")
    try:
        rig.start()
        rng = np.random.default_rng(0)
        img = 100 + 3 * rng.normal(0, 1, (96, 96))
        img[_part()] = 80
        _tracks(img, 75, 30, 16, 4.0, 0.4, 40.0)
        path = rig.build / "layer_00001.png"
        tmp = rig.build / ".layer_00001.png.part"
        tmp.write_bytes(cv2.imencode(".png", np.clip(img, 0, 255).astype(np.uint8))[1]
                        .tobytes())
        tmp.rename(path)
        assert rig.listener is not None
        rig.listener.wait(lambda: 1 in rig.listener.layers())  # type: ignore[union-attr]
        msg = rig.listener.layers()[1][0]
        assert msg["status"] == "ok", msg
        got = msg["classes"]["misprint"]["pixel_count"]
        if z and not regions:
            assert 100 <= got <= 16 * 16 * 2, got
        else:
            assert got == 0
    finally:
        rig.stop()
