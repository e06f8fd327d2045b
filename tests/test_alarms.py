"""The alarm engine, defect tracks and regions, on statistics of hand-made masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from monitor.alarms.engine import AlarmEngine
from monitor.alarms.regions import Regions, apply_ignore, region_stats
from monitor.alarms.tracks import BuildTracks
from monitor.config import AlarmsConfig, RegionConfig, TracksConfig
from monitor.errors import ConfigError
from monitor.records import AlarmEvent, BuildKey
from monitor.vision.classes import DEFAULT_CLASS_NAMES
from monitor.vision.stats import LayerStats, layer_stats

SWELLING = 1
KEY = BuildKey("", "B1")


def stats(*boxes: tuple[int, int, int, int], channel: int = SWELLING, size: int = 100
          ) -> LayerStats:
    """Statistics of a layer whose class `channel` covers the given (x, y, w, h) boxes."""
    masks = np.zeros((6, size, size), bool)
    for x, y, w, h in boxes:
        masks[channel, y:y + h, x:x + w] = True
    return layer_stats(masks, DEFAULT_CLASS_NAMES, pixel_size_mm=0.1)


def engine(**over: Any) -> AlarmEngine:
    data: dict[str, Any] = {"grace_layers": 0, "rules": [], "tracks": {"classes": []}}
    data.update(over)
    return AlarmEngine(AlarmsConfig.model_validate(data), class_names=DEFAULT_CLASS_NAMES)


def run(eng: AlarmEngine, layers: dict[int, LayerStats], key: BuildKey = KEY
        ) -> list[AlarmEvent]:
    out: list[AlarmEvent] = []
    for n in sorted(layers):
        out += eng.evaluate(key, n, layers[n]).events
    return out


RULE = {"class": "swelling", "metric": "area_mm2", "threshold": 0.5, "consecutive": 3,
        "cooldown_layers": 0}
BIG = (10, 10, 10, 10)  # 100 px = 1 mm² at 0.1 mm per pixel


def test_rule_needs_consecutive_layers_and_clears() -> None:
    eng = engine(rules=[RULE])
    layers = {1: stats(BIG), 2: stats(BIG), 3: stats(), 4: stats(BIG), 5: stats(BIG),
              6: stats(BIG), 7: stats(BIG), 8: stats()}
    events = run(eng, layers)
    assert [(e.action, e.layer) for e in events] == [("open", 6), ("clear", 8)]
    assert events[0].rule == "swelling.area_mm2" and events[0].value == pytest.approx(1.0)


def test_grace_layers_at_build_start() -> None:
    eng = engine(rules=[{**RULE, "consecutive": 1}], grace_layers=3)
    events = run(eng, {n: stats(BIG) for n in range(10, 15)})
    assert [(e.action, e.layer) for e in events] == [("open", 13)]


def test_cooldown_stops_flapping() -> None:
    eng = engine(rules=[{**RULE, "consecutive": 1, "cooldown_layers": 4}])
    pattern = [1, 0, 1, 0, 1, 0, 1]  # condition flickers every layer
    events = run(eng, {i + 1: stats(BIG) if on else stats() for i, on in enumerate(pattern)})
    assert [(e.action, e.layer) for e in events] == [
        ("open", 1), ("clear", 2), ("open", 5), ("clear", 6)]


def test_ack_resets_the_streak_so_it_does_not_refire_at_once() -> None:
    eng = engine(rules=[{**RULE, "consecutive": 2}])
    events = run(eng, {1: stats(BIG), 2: stats(BIG), 3: stats(BIG)})
    assert [(e.action, e.layer) for e in events] == [("open", 2)]  # open: no second one
    state = eng.acknowledge(KEY, "swelling.area_mm2")
    assert state is not None and state["streak"] == 0 and not state["open"] and state["active"]
    events = run(eng, {4: stats(BIG), 5: stats(BIG), 6: stats()})
    # Not at layer 4 (streak 1 after the ack); again at 5; the clear covers both alarms.
    assert [(e.action, e.layer) for e in events] == [("open", 5), ("clear", 6)]


def test_mute_build_and_class() -> None:
    eng = engine(rules=[{**RULE, "consecutive": 1}])
    eng.mute(KEY, "swelling")
    assert run(eng, {1: stats(BIG)}) == []
    eng.unmute(KEY, "swelling")
    eng.mute(KEY, None)
    assert run(eng, {2: stats(BIG)}) == []
    other = BuildKey("", "B2")
    assert [e.build for e in run(eng, {1: stats(BIG)}, other)] == ["B2"]


def test_replaced_layer_is_not_counted_twice() -> None:
    eng = engine(rules=[{**RULE, "consecutive": 2}])
    assert run(eng, {1: stats(BIG)}) == []
    verdict = eng.evaluate(KEY, 1, stats(BIG))  # the same layer written again
    assert not verdict.evaluated and verdict.events == []
    assert [e.layer for e in run(eng, {2: stats(BIG)})] == [2]


def test_region_rule_uses_region_statistics() -> None:
    regions = (RegionConfig(name="left", polygon=((0, 0), (50, 0), (50, 100), (0, 100))),)
    eng = AlarmEngine(AlarmsConfig.model_validate(
        {"grace_layers": 0, "tracks": {"classes": []}, "rules": [
            {"class": "swelling", "metric": "area_fraction", "threshold": 0.015,
             "consecutive": 1, "region": "left"}]}),
        class_names=DEFAULT_CLASS_NAMES, part_regions=["left"])
    reg = Regions(regions, pixel_size_mm=0.1)
    br = reg.for_build("B1", (100, 100))
    s_right = stats((70, 10, 10, 10))  # 1% of the layer, outside the region
    s_left = stats((10, 10, 10, 10))  # 1% of the layer = 2% of the left half
    masks = np.zeros((6, 100, 100), bool)
    masks[1, 10:20, 10:20] = True
    rs_left = region_stats(masks, DEFAULT_CLASS_NAMES, br, pixel_size_mm=0.1)
    assert rs_left["left"].classes["swelling"].area_fraction == pytest.approx(0.02, rel=0.05)
    masks[:] = False
    masks[1, 10:20, 70:80] = True
    rs_right = region_stats(masks, DEFAULT_CLASS_NAMES, br, pixel_size_mm=0.1)
    assert eng.evaluate(KEY, 1, s_right, rs_right).events == []
    assert [e.layer for e in eng.evaluate(KEY, 2, s_left, rs_left).events] == [2]


def test_unknown_class_or_region_in_rules() -> None:
    with pytest.raises(ConfigError, match=r"alarms\.rules\[0\]\.class: unknown class 'crack'"):
        engine(rules=[{**RULE, "class": "crack"}])
    with pytest.raises(ConfigError, match=r"alarms\.rules\[0\]\.region"):
        engine(rules=[{**RULE, "region": "nowhere"}])
    with pytest.raises(ConfigError, match=r"alarms\.tracks\.classes"):
        engine(tracks={"classes": ["crack"]})
    # no_defect has area statistics only: a rule on its components could never fire.
    with pytest.raises(ConfigError, match=r"alarms\.rules\[0\]\.metric: no_defect has area"):
        engine(rules=[{**RULE, "class": "no_defect", "metric": "components"}])
    engine(rules=[{**RULE, "class": "no_defect", "metric": "area_fraction"}])
    with pytest.raises(ConfigError, match=r"alarms\.tracks\.classes: no_defect"):
        engine(tracks={"classes": ["no_defect"]})


# --- tracks ---------------------------------------------------------------------------

TRACKS = {"classes": ["swelling"], "alarm_layers": 5, "alarm_volume_mm3": 100.0,
          "link_distance_mm": 0.5, "min_area_mm2": 0.05}


def test_defect_stacking_over_five_layers_raises_one_alarm_at_the_fifth() -> None:
    eng = engine(tracks=TRACKS)
    layers = {n: stats((40 + n, 40, 8, 8)) for n in range(1, 9)}  # drifts 1 px per layer
    layers[3] = stats((40 + 3, 40, 8, 8), (5, 80, 3, 3))  # plus a one-layer speck
    layers[9] = stats()
    layers[10] = stats()
    events = run(eng, layers)
    assert [(e.action, e.layer, e.rule, e.severity) for e in events] == [
        ("open", 5, "track.swelling", "critical"), ("clear", 10, "track.swelling", "critical")]
    assert events[0].track == events[1].track and events[0].value == 5


USUAL = {"classes": ["swelling"], "alarm_layers": 100, "alarm_volume_mm3": 0.12,
         "baseline_share": 0.3, "baseline_learn_layers": 3, "absolute_volume_mm3": 5.0}
# the model paints a little swelling on every part on every layer: 12 x 1 mm² = 12 mm²
TEXTURE = [(x, y, 10, 10) for y in (0, 20, 40) for x in range(0, 100, 25)]


def _stack(tracks: dict[str, Any], start: int, box: tuple[int, int, int, int],
           texture: list[tuple[int, int, int, int]], layers: int = 12) -> list[AlarmEvent]:
    """A defect stacking from layer `start` beside a texture marked on every layer (the
    default 3 grace layers)."""
    eng = engine(grace_layers=3, tracks=tracks)
    out: list[AlarmEvent] = []
    for n in range(1, layers + 1):
        boxes = [*texture, box] if n >= start else texture
        out += [e for e in eng.evaluate(KEY, n, stats(*boxes)).events if e.action == "open"]
    return out


def test_a_track_like_the_builds_usual_marks_is_held_back() -> None:
    small = (70, 70, 10, 10)  # 1 mm² per layer: under 0.3 x 12 mm² of usual swelling
    # the texture's tracks (1 mm² a layer each) are the usual look, and so is the small
    # defect beside them: under its share of the usual area, never past 5 mm³
    assert _stack(USUAL, 5, small, TEXTURE, layers=40) == []
    # without the texture it stands out: it alarms once it passes 0.12 mm³ (layer 7)
    opened = _stack(USUAL, 5, small, [])
    assert [(e.layer, e.rule) for e in opened] == [(7, "track.swelling")]
    # switched off, the texture alarms after the grace layers (one alarm: one_per_part)
    off = _stack({**USUAL, "baseline_share": 0.0}, 5, small, TEXTURE)
    assert [e.layer for e in off] == [4]


def test_a_large_track_alarms_whatever_the_builds_usual_marks() -> None:
    big = (70, 60, 30, 30)  # 9 mm² a layer: over 0.3 x 12 mm², it stands out at once
    assert [e.layer for e in _stack(USUAL, 5, big, TEXTURE)] == [6]
    # 3 mm² a layer, under the share, but past absolute_volume_mm3 after 7 layers (0.15 mm³
    # each); the texture's 1 mm² tracks would take 20
    tight = {**USUAL, "absolute_volume_mm3": 1.0}
    late = _stack(tight, 5, (60, 70, 30, 10), TEXTURE, layers=20)
    assert [e.layer for e in late] == [11]


def test_the_usual_area_is_kept_with_the_build_state() -> None:
    from monitor.records import EngineState, RuleState

    eng = engine(grace_layers=3, tracks=USUAL)
    states: dict[str, Any] = {}
    for n in range(1, 6):
        states |= eng.evaluate(KEY, n, stats(*TEXTURE)).rule_states
    assert states["track.swelling"]["history"] == pytest.approx([12.0] * 5)

    def after_restart(rules: dict[str, Any]) -> list[AlarmEvent]:
        fresh = engine(grace_layers=3, tracks=USUAL)
        fresh.restore_build(KEY, EngineState(
            first_layer=1, last_evaluated=5, last_layer=5,
            rules={k: RuleState(**v) for k, v in rules.items()}, tracks=[], next_track=1,
            arrivals=[], stall_open=False, last_layer_at=None,
            evaluated_layers=[1, 2, 3, 4, 5]))
        return [e for n in range(6, 20)
                for e in fresh.evaluate(KEY, n, stats(*TEXTURE)).events if e.action == "open"]

    assert after_restart(states) == []  # the texture is still the usual look
    # had the usual area been lost, the texture's tracks would alarm before it is learnt
    assert [e.layer for e in after_restart({})] == [8]


GROW = {"classes": ["swelling", "misprint"], "alarm_layers": 50, "alarm_volume_mm3": 100.0,
        "grow_layers": 2, "grow_ratio": 1.25, "grow_min_area_mm2": 2.5}


def _rising(sides: list[int], channel: int = SWELLING, texture: bool = False
            ) -> dict[int, LayerStats]:
    """A square defect at one corner, one side (px) per layer from layer 1."""
    extra = TEXTURE if texture else []
    return {n: stats(*extra, (60, 60, side, side), channel=channel)
            for n, side in enumerate(sides, start=1)}


def test_a_swelling_that_grows_layer_on_layer_alarms_while_small() -> None:
    # 1.2, 1.7, 2.6, 3.6 mm²: grown by >= 25% on layers 2 and 3, but under 2.5 mm² on 2
    rising = _rising([11, 13, 16, 19])
    events = run(engine(tracks=GROW), rising)
    assert [(e.action, e.layer, e.rule, e.unit) for e in events] == [
        ("open", 3, "track.swelling", "mm²")]
    assert events[0].value == pytest.approx(2.56) and events[0].threshold == 2.5
    # the same area every layer is not a swelling rising: the volume rules are its business
    assert run(engine(tracks=GROW), _rising([16] * 6)) == []
    # growth that stalls for a layer starts counting again
    assert [e.layer for e in run(engine(tracks=GROW), _rising([11, 13, 13, 16, 19]))] == [5]
    # switched off, or a class not in grow_classes: no alarm
    assert run(engine(tracks={**GROW, "grow_layers": 0}), rising) == []
    misprint = _rising([11, 13, 16, 19], channel=3)
    assert run(engine(tracks=GROW), misprint) == []
    assert [e.layer for e in run(engine(tracks={**GROW, "grow_classes": ["misprint"]}),
                                 misprint)] == [3]


def test_a_growing_track_is_never_the_usual_look() -> None:
    # a build whose model marks 12 mm² of swelling every layer: a track of 1-4 mm² is under
    # 0.3 x 12 mm² and held back as the usual look, unless it rises layer on layer
    usual = {**USUAL, **{k: v for k, v in GROW.items() if k.startswith("grow")},
             "alarm_volume_mm3": 0.05}
    assert _stack(usual, 5, (60, 60, 16, 16), TEXTURE, layers=12) == []
    eng = engine(grace_layers=3, tracks=usual)
    opened = []
    for n in range(1, 13):
        side = {5: 11, 6: 13, 7: 16, 8: 19}.get(n)
        boxes = [*TEXTURE, (60, 60, side, side)] if side else TEXTURE
        opened += [e.layer for e in eng.evaluate(KEY, n, stats(*boxes)).events
                   if e.action == "open"]
    assert opened == [7]


def test_grow_classes_must_be_tracked() -> None:
    with pytest.raises(ValidationError, match="grow_classes: misprint not in classes"):
        TracksConfig.model_validate({"classes": ["swelling"], "grow_classes": ["misprint"]})
    # the default lapses quietly when its class is not tracked
    assert TracksConfig.model_validate({"classes": []}).grow_classes == ("swelling",)


def test_one_layer_speck_and_distant_defects_do_not_link() -> None:
    t = BuildTracks(TracksConfig.model_validate(TRACKS), pixel_size_mm=0.1,
                    layer_thickness_mm=0.05)
    a = t.update(1, stats((10, 10, 5, 5)))
    b = t.update(2, stats((30, 30, 5, 5)))  # 15 px = 1.5 mm away: a new defect
    assert a.assignments[("swelling", 0)] != b.assignments[("swelling", 0)]
    c = t.update(3, stats((33, 31, 5, 5)))  # overlaps the layer-2 defect: same track
    assert c.assignments[("swelling", 0)] == b.assignments[("swelling", 0)]
    assert [x.number for x in c.ended] == [a.assignments[("swelling", 0)]]  # gap > 1
    tiny = t.update(4, stats((80, 80, 2, 2)))  # 4 px < min_area 5 px: not tracked
    assert tiny.assignments == {}
    tr = c.touched[0]
    assert tr.layers == 2 and tr.volume_mm3 == pytest.approx(2 * 0.25 * 0.05)


def test_track_volume_limit_and_gap() -> None:
    eng = engine(tracks={**TRACKS, "alarm_layers": 50, "alarm_volume_mm3": 0.3,
                         "max_gap_layers": 1})
    big = (20, 20, 40, 40)  # 16 mm² x 0.05 mm = 0.8 mm³ per layer
    layers = {1: stats((20, 20, 20, 20)), 3: stats(big)}  # layer 2 missing: within the gap
    events = run(eng, layers)
    assert [(e.action, e.layer) for e in events] == [("open", 3)]
    assert events[0].value > 0.3 and events[0].threshold == 0.3
    # A large defect in one layer only is not stacking: no track alarm.
    fresh = engine(tracks={**TRACKS, "alarm_layers": 50, "alarm_volume_mm3": 0.3})
    assert run(fresh, {1: stats((0, 0, 90, 90)), 2: stats()}) == []


# --- stall ----------------------------------------------------------------------------

def test_stall_alarm_once_then_cleared_by_the_next_layer() -> None:
    eng = engine(stall={"factor": 3.0, "min_s": 5.0, "min_layers": 3})
    for n, t in enumerate((0.0, 10.0, 20.0, 30.0), start=1):
        assert eng.arrival(KEY, n, t) == []
    assert eng.check_stalls(55.0) == []  # 25 s idle < 3 x 10 s
    (ev,) = eng.check_stalls(61.0)
    assert (ev.action, ev.rule, ev.layer, ev.threshold) == ("open", "stall", 4, 30.0)
    assert eng.check_stalls(100.0) == []  # one alarm, not one per check
    (clear,) = eng.arrival(KEY, 5, 101.0)
    assert clear.action == "clear" and clear.rule == "stall"


def test_a_new_build_finishes_the_previous_one() -> None:
    eng = engine(stall={"factor": 2.0, "min_s": 1.0, "min_layers": 2})
    for n, t in enumerate((0.0, 1.0, 2.0), start=1):
        eng.arrival(KEY, n, t)
    eng.arrival(BuildKey("", "B2"), 1, 3.0)
    assert [e.build for e in eng.check_stalls(20.0)] == []  # B2 has one layer; B1 finished
    other_printer = BuildKey("P2", "B1")
    for n, t in enumerate((0.0, 1.0), start=1):
        eng.arrival(other_printer, n, t)
    assert [(e.printer, e.build) for e in eng.check_stalls(20.0)] == [("P2", "B1")]


# --- regions --------------------------------------------------------------------------

def test_polygon_in_mm_and_ignore_region(tmp_path: Path) -> None:
    reg = Regions((
        RegionConfig(name="edge", kind="ignore", polygon=((0, 0), (10, 0), (10, 2), (0, 2)),
                     units="mm"),
        RegionConfig(name="part", mask=str(tmp_path / "{build}.png")),
    ), pixel_size_mm=0.1)
    drawn = np.zeros((50, 50), np.uint8)
    drawn[25:, :] = 255
    cv2.imwrite(str(tmp_path / "B1.png"), drawn)  # half the size: scaled to the image
    br = reg.for_build("B1", (100, 100))
    assert br.ignore is not None and br.ignore[:20].all() and not br.ignore[21:].any()
    assert br.parts["part"][50:].all() and not br.parts["part"][:50].any()
    masks = np.ones((6, 100, 100), bool)
    kept = apply_ignore(masks, br)
    assert not kept[:, :20].any() and kept[:, 30:].all()
    assert "part" not in reg.for_build("B2", (100, 100)).parts  # no mask for B2: skipped


def test_region_config_needs_one_shape() -> None:
    with pytest.raises(ValueError, match="either polygon or mask"):
        RegionConfig(name="x")
    with pytest.raises(ValueError, match="at least 3 points"):
        RegionConfig(name="x", polygon=((0, 0), (1, 1)))


# ------------------------------------------------------------ relative rules

REL = {"class": "swelling", "metric": "area_mm2", "relative": True, "factor": 3.0,
       "min_delta": 0.5, "window": 10, "learn_layers": 4, "consecutive": 2,
       "cooldown_layers": 0}


def boxes_mm2(area_mm2: float) -> LayerStats:
    """A layer whose swelling covers `area_mm2` (a square of 0.01 mm² pixels)."""
    side = round((area_mm2 * 100) ** 0.5)
    return stats((2, 2, side, side)) if side else stats()


@pytest.mark.parametrize("bias_mm2", [0.0, 1.0, 4.0, 25.0])
def test_a_constant_bias_never_alarms(bias_mm2: float) -> None:
    """A model that always sees the same amount of a class on a healthy build is quiet,
    however large that amount: the limit follows the build's own baseline."""
    eng = engine(rules=[REL])
    assert run(eng, {n: boxes_mm2(bias_mm2) for n in range(1, 60)}) == []


def test_a_step_above_the_baseline_alarms_and_clears() -> None:
    eng = engine(rules=[REL])
    layers = {n: boxes_mm2(4.0) for n in range(1, 11)}  # the model's bias: 4 mm²
    layers |= {n: boxes_mm2(16.0) for n in range(11, 14)}  # a jump: 4x the baseline
    layers |= {n: boxes_mm2(4.0) for n in range(14, 17)}
    events = run(eng, layers)
    assert [(e.action, e.layer) for e in events] == [("open", 12), ("clear", 14)]
    # the limit of the alarm is the baseline's: max(4 * 3, 4 + 0.5) = 12 mm²
    assert events[0].threshold == pytest.approx(12.0) and events[0].value == pytest.approx(16.0)


def test_relative_limit_formula() -> None:
    from monitor.alarms.rules import relative_limit
    from monitor.config import AlarmRule

    rule = AlarmRule.model_validate({**REL, "threshold": 1.0, "mad_k": 2.0})
    assert relative_limit(rule, [1.0, 1.0, 1.0]) is None  # still learning (4 layers)
    assert relative_limit(rule, [0.0] * 4) == pytest.approx(1.0)  # the absolute floor
    assert relative_limit(rule, [2.0] * 4) == pytest.approx(6.0)  # baseline * factor
    assert relative_limit(rule, [0.2] * 4) == pytest.approx(1.0)  # floor over 0.2 + 0.5
    # median 10, MAD 5: 10 + 2 * 1.4826 * 5 = 24.8 > 10 * 3
    rule = AlarmRule.model_validate({**REL, "factor": 1.0, "mad_k": 2.0})
    assert relative_limit(rule, [5.0, 5.0, 10.0, 15.0, 15.0]) == pytest.approx(24.826)


def test_a_defect_does_not_teach_its_own_baseline_until_a_window_has_passed() -> None:
    eng = engine(rules=[{**REL, "window": 6}])
    layers = {n: boxes_mm2(1.0) for n in range(1, 6)}
    layers |= {n: boxes_mm2(9.0) for n in range(6, 30)}  # a new level that stays
    events = run(eng, layers)
    opened = [e.layer for e in events if e.action == "open"]
    cleared = [e.layer for e in events if e.action == "clear"]
    assert opened == [7]  # held, not re-learnt at once
    assert cleared and 7 + 6 <= cleared[0] < 30  # adopted as the new normal after a window


def test_absolute_rules_need_a_threshold(tmp_path: Path) -> None:
    from monitor.config import load_config

    for rule, why in (('{ class = "swelling" }', "threshold: required unless relative"),
                      ('{ class = "swelling", relative = true, learn_layers = 30 }',
                       "learn_layers")):
        path = tmp_path / "c.toml"
        path.write_text(f"[alarms]\nrules = [{rule}]\n")
        with pytest.raises(ConfigError, match=why):
            load_config(path)


def _store(db: Any, n: int, stats: LayerStats, out: Any) -> None:
    """Write layer n and what the engine made of it, as the committer does."""
    from sqlalchemy.orm import Session

    from monitor.records import LayerRecord
    from monitor.store import writes

    with Session(db) as s, s.begin():
        bid, _ = writes.put_layer(s, LayerRecord(
            printer="", build=KEY.build, layer=n, status="ok", error=None,
            image_path=f"/w/{n}.png", image_size=1, image_mtime_ns=1, image_sha256=None,
            model_sha256="", detected_at=float(n), processed_at=float(n), stats=stats))
        writes.set_evaluated(s, bid, first_layer=out.first_layer, layer=n)
        writes.put_rule_states(s, bid, out.rule_states)
        if out.tracks is not None:
            writes.put_tracks(s, bid, [*out.tracks.touched, *out.tracks.ended])


def test_baseline_survives_a_restart(tmp_path: Path) -> None:
    """The baseline is stored with the rule states of each layer: an engine restored from
    the database goes on where the other stopped (same alarms as one that never stopped)."""
    from sqlalchemy.orm import Session

    from monitor.store import migrate, queries
    from monitor.store.connect import open_db

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    db = open_db(url)
    migrate.upgrade(db, url)
    layers = {n: boxes_mm2(4.0) for n in range(1, 9)} | {9: boxes_mm2(16.0),
                                                         10: boxes_mm2(16.0)}
    try:
        first = engine(rules=[REL])
        for n in range(1, 8):
            _store(db, n, layers[n], first.evaluate(KEY, n, layers[n]))
        with Session(db) as s:
            state = queries.load_engine_state(s, "", KEY.build)
        assert state is not None
        assert state.rules["swelling.area_mm2"].history == pytest.approx([4.0] * 7)
        second = engine(rules=[REL])
        second.restore_build(KEY, state)
        events = run(second, {n: layers[n] for n in (8, 9, 10)})
        never_stopped = run(engine(rules=[REL]), layers)
        assert [(e.action, e.layer) for e in events] == [("open", 10)]
        assert [(e.action, e.layer) for e in never_stopped] == [("open", 10)]
    finally:
        db.dispose()


def test_a_tracks_growth_survives_a_restart(tmp_path: Path) -> None:
    """A swelling that grew on layers 2 and 3, then the daemon restarted: its growth is
    stored with the track, and layer 4 alarms as it would have without the restart."""
    from sqlalchemy.orm import Session

    from monitor.store import migrate, queries
    from monitor.store.connect import open_db

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    db = open_db(url)
    migrate.upgrade(db, url)
    cfg = {**GROW, "grow_layers": 3}
    layers = _rising([10, 12, 14, 17])  # 1.0, 1.44, 1.96, 2.89 mm²: grows 3 layers in a row
    try:
        first = engine(tracks=cfg)
        for n in range(1, 4):
            out = first.evaluate(KEY, n, layers[n])
            assert out.events == [] and out.tracks is not None
            _store(db, n, layers[n], out)
        with Session(db) as s:
            state = queries.load_engine_state(s, "", KEY.build)
        assert state is not None
        (track,) = state.tracks
        assert (track.growing, track.area_mm2) == (2, pytest.approx(1.96))
        second = engine(tracks=cfg)
        second.restore_build(KEY, state)
        assert [(e.action, e.layer) for e in run(second, {4: layers[4]})] == [("open", 4)]
        assert [(e.action, e.layer) for e in run(engine(tracks=cfg), layers)] == [("open", 4)]
    finally:
        db.dispose()


def test_one_track_alarm_per_class_and_part_at_a_time() -> None:
    """Many specks stacking at once (a model's bias) raise one alarm per class and part."""
    eng = engine(tracks={"classes": ["swelling"], "alarm_layers": 3})
    specks = [(x, y, 3, 3) for x in (5, 25, 45, 65) for y in (5, 45)]

    def part(x: float, y: float) -> int | None:  # two parts: left and right halves
        return 1 if x < 40 else 2

    events: list[AlarmEvent] = []
    for n in range(1, 6):
        events += eng.evaluate(KEY, n, stats(*specks), locate=part).events
    opened = [e for e in events if e.action == "open"]
    assert len(opened) == 2 and {e.layer for e in opened} == {3}
    separate = engine(tracks={"classes": ["swelling"], "alarm_layers": 3,
                              "one_per_part": False})
    alone = [e for n in range(1, 6) for e in separate.evaluate(KEY, n, stats(*specks)).events]
    assert len([e for e in alone if e.action == "open"]) == len(specks)


@pytest.mark.parametrize("build", ["..", ".", "../regions", "a/../../secret", "a\\b", "B\x00",
                                   ""])
def test_build_names_cannot_reach_masks_outside_the_regions_folder(
        tmp_path: Path, build: str) -> None:
    regions = tmp_path / "regions"
    regions.mkdir()
    outside = np.full((100, 100), 255, np.uint8)
    cv2.imwrite(str(tmp_path / "secret.png"), outside)  # what "..", "a/../../secret" reach
    cv2.imwrite(str(tmp_path / "regions.png"), outside)
    (regions / "a").mkdir()
    reg = Regions((RegionConfig(name="part", mask=str(regions / "{build}.png")),),
                  pixel_size_mm=0.1)
    assert "part" not in reg.for_build(build, (100, 100)).parts


def test_ordinary_build_names_still_name_masks(tmp_path: Path) -> None:
    for name in ("B1", "..B2", "build 7 — Ø"):
        cv2.imwrite(str(tmp_path / f"{name}.png"), np.full((10, 10), 255, np.uint8))
        reg = Regions((RegionConfig(name="part", mask=str(tmp_path / "{build}.png")),),
                      pixel_size_mm=0.1)
        assert reg.for_build(name, (10, 10)).parts["part"].all(), name


def test_an_alarm_position_names_the_part_under_it() -> None:
    """The part an alarm lies on: the nominal part there, else the nearest within the
    tolerance zone, else none."""
    from monitor.daemon.parts import LayerParts

    labels = np.zeros((40, 40), np.int32)
    labels[5:15, 5:15] = 3
    labels[25:35, 25:35] = 7
    zone = cv2.dilate((labels > 0).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    lp = LayerParts((), zone, labels)
    assert lp.part_at(10, 10) == 3 and lp.part_at(30.6, 29.2) == 7
    assert lp.part_at(16.5, 10) == 3  # in the tolerance zone beside part 3
    assert lp.part_at(20, 2) is None  # bare powder
    assert LayerParts((), zone).part_at(10, 10) is None  # no labels: no slices
