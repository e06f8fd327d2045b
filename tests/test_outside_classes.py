"""geometry.outside_classes: a class that is melt outside the part by definition (misprint)
is not counted where the slice says the part is: deeper inside than the tolerance, or in a
mark that does not reach beyond the outline."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from monitor.config import CameraConfig, GeometryConfig, parse_config
from monitor.daemon.parts import PartMeter, check_outside_classes
from monitor.errors import ConfigError
from monitor.vision.classes import DEFAULT_CLASS_NAMES

NAMES = DEFAULT_CLASS_NAMES
MISPRINT, SPATTER = NAMES.index("misprint"), NAMES.index("spatter")


def _measure(tmp_path: Path, outside: tuple[str, ...], reach_mm: float = 5.0
             ) -> tuple[dict[str, float], float, float, np.ndarray]:
    nominal = np.zeros((80, 100), np.uint8)
    nominal[20:60, 20:70] = 255  # one part; 0.1 mm pixels: the 0.5 mm tolerance is 5 px
    (tmp_path / "n").mkdir(exist_ok=True)
    cv2.imwrite(str(tmp_path / "n" / "layer_00001.png"), nominal)
    meter = PartMeter(CameraConfig(), GeometryConfig(
        nominal=str(tmp_path / "n" / "layer_{layer:05d}.png"), outside_classes=outside,
        outside_reach_mm=reach_mm))
    gray = np.full((80, 100), 0.3, np.float32)
    gray[20:60, 20:70] = 0.8
    prep = meter.prepare("B", 1, path=tmp_path / "layer_00001.png", gray=gray)
    assert prep is not None
    masks = np.zeros((len(NAMES), 80, 100), bool)
    masks[MISPRINT, 35:45, 35:45] = True  # 100 px deep inside the part: the slice says metal
    masks[MISPRINT, 30:40, 66:72] = True  # 60 px across the outline: may be misplaced melt
    masks[MISPRINT, 22:24, 30:40] = True  # 20 px inside, near the edge: reaches no powder
    masks[MISPRINT, 61:64, 30:40] = True  # 30 px on the powder just beside the part
    masks[MISPRINT, 30:40, 90:96] = True  # 60 px on the powder 2 mm from it
    masks[SPATTER, 35:45, 50:55] = True  # other classes count inside as before
    before = masks.copy()
    measured = meter.finish(prep, masks, NAMES)
    np.testing.assert_array_equal(masks, before)  # the layer's own masks are untouched
    zone = measured.zone_stats(masks, NAMES, pixel_size_mm=0.1, max_components=10)
    return (measured.parts[0].classes, zone.classes["misprint"].area_mm2,
            zone.classes["spatter"].area_mm2, masks)


def test_misprint_deep_inside_a_part_is_not_counted_on_it(tmp_path: Path) -> None:
    part, zone_misprint, zone_spatter, _ = _measure(tmp_path, ("misprint",))
    # across the outline, beside the part and 2 mm off it (within outside_reach_mm)
    assert zone_misprint == pytest.approx(1.50)
    # per part: on the part grown by the tolerance, of its nominal area
    assert part["misprint"] == pytest.approx(90 / 2000)
    assert zone_spatter == pytest.approx(0.50) and part["spatter"] == pytest.approx(50 / 2000)


def test_misprint_beyond_the_reach_is_not_counted(tmp_path: Path) -> None:
    part, zone_misprint, _, _ = _measure(tmp_path, ("misprint",), reach_mm=1.0)
    assert zone_misprint == pytest.approx(0.90)
    assert part["misprint"] == pytest.approx(90 / 2000)


def test_switched_off_every_mark_counts(tmp_path: Path) -> None:
    """Without outside classes misprint is counted like any class: in the tolerance zone."""
    part, zone_misprint, _, _ = _measure(tmp_path, ())
    assert zone_misprint == pytest.approx(2.10)
    assert part["misprint"] == pytest.approx(210 / 2000)


def test_default_is_misprint_and_unknown_keys_are_still_refused() -> None:
    cfg = parse_config({}, base_dir=Path("."))
    assert cfg.geometry.outside_classes == ("misprint",)
    from monitor.errors import ConfigError
    with pytest.raises(ConfigError, match="outside_class"):
        parse_config({"geometry": {"outside_class": ["misprint"]}}, base_dir=Path("."))


def test_the_reach_is_a_distance_from_the_outline() -> None:
    """The coarse-grid distance transform holds the reach to within its cell (r / 8)."""
    from monitor.daemon.parts import _grown

    part = np.zeros((200, 300), bool)
    part[80:120, 100:140] = True
    near = _grown(part, 40)
    assert near[part].all()
    assert near[100, 139 + 35] and not near[100, 139 + 46]  # along a row
    assert near[119 + 35, 120] and not near[119 + 46, 120]  # along a column
    assert not near[0, 0]


@pytest.mark.parametrize("reach_classes", [("swelling",), ()])
def test_reach_classes_count_out_to_the_reach_every_mark_kept(
        tmp_path: Path, reach_classes: tuple[str, ...]) -> None:
    """A swelling 2 mm off its part's slice (a distorted part's) counts on the parts' zone
    with reach_classes = ["swelling"]; one across the outline counts either way, whole."""
    nominal = np.zeros((80, 100), np.uint8)
    nominal[20:60, 20:70] = 255
    (tmp_path / "n").mkdir()
    cv2.imwrite(str(tmp_path / "n" / "layer_00001.png"), nominal)
    meter = PartMeter(CameraConfig(), GeometryConfig(
        nominal=str(tmp_path / "n" / "layer_{layer:05d}.png"), reach_classes=reach_classes))
    gray = np.full((80, 100), 0.3, np.float32)
    gray[20:60, 20:70] = 0.8
    prep = meter.prepare("B", 1, path=tmp_path / "layer_00001.png", gray=gray)
    assert prep is not None
    masks = np.zeros((len(NAMES), 80, 100), bool)
    sw = NAMES.index("swelling")
    masks[sw, 35:45, 62:72] = True  # 100 px across the outline (x = 70)
    masks[sw, 30:40, 90:96] = True  # 60 px 2 mm beyond its outline
    measured = meter.finish(prep, masks, NAMES)
    zone = measured.zone_stats(masks, NAMES, pixel_size_mm=0.1, max_components=10)
    assert zone.classes["swelling"].area_mm2 == pytest.approx(1.6 if reach_classes else 1.0)
    with pytest.raises(ConfigError, match=r"geometry\.reach_classes: unknown class 'crack'"):
        check_outside_classes(parse_config({"geometry": {"reach_classes": ["crack"]}},
                                           base_dir=tmp_path), NAMES)
