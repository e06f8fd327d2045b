"""Part alarms and rule scope in the alarm engine, and their config, on hand-made statistics."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from monitor.alarms.engine import AlarmEngine
from monitor.config import AlarmsConfig, parse_config
from monitor.errors import ConfigError
from monitor.records import AlarmEvent, BuildKey, PartRecord
from monitor.vision.classes import DEFAULT_CLASS_NAMES
from monitor.vision.stats import LayerStats, layer_stats

KEY = BuildKey("", "B1")
EMPTY = layer_stats(np.zeros((6, 50, 50), bool), DEFAULT_CLASS_NAMES, pixel_size_mm=0.1)


def engine(**over: Any) -> AlarmEngine:
    data: dict[str, Any] = {"grace_layers": 0, "rules": [], "tracks": {"classes": []},
                            "parts": {"cooldown_layers": 0}}
    data.update(over)
    return AlarmEngine(AlarmsConfig.model_validate(data), class_names=DEFAULT_CLASS_NAMES)


def part(pid: int, printed: float = 0.95, excess: float = 0.0,
         width_px: float = 100.0) -> PartRecord:
    return PartRecord(id=pid, nominal_mm2=100.0, printed_fraction=printed,
                      excess_fraction=excess, centroid_shift_mm=0.1, width_px=width_px)


def run(eng: AlarmEngine, layers: dict[int, list[PartRecord] | None]) -> list[AlarmEvent]:
    out: list[AlarmEvent] = []
    for n in sorted(layers):
        out += eng.evaluate(KEY, n, EMPTY, parts=layers[n]).events
    return out


def brief(events: list[AlarmEvent]) -> list[tuple[str, int, str, int | None]]:
    return [(e.action, e.layer, e.rule, e.part) for e in events]


def test_missing_part_opens_after_n_layers_and_clears_when_it_reappears() -> None:
    eng = engine()
    layers: dict[int, list[PartRecord] | None] = {
        1: [part(1), part(7)],
        2: [part(1), part(7, printed=0.1)],
        3: [part(1), part(7, printed=0.0)],
        4: [part(1), part(7, printed=0.05)],
        5: [part(1), part(7, printed=0.9)],
    }
    events = run(eng, layers)
    assert brief(events) == [("open", 3, "part_missing.part7", 7),
                             ("clear", 5, "part_missing.part7", 7)]
    assert events[0].severity == "critical" and events[0].class_name == ""
    assert events[0].value == 0.0 and events[0].threshold == 0.5


@pytest.mark.parametrize(("width_px", "min_width_px", "alarms"), [
    (11.0, 12.0, False),  # a wall the camera does not resolve: measured, never missing
    (12.0, 12.0, True),
    (3.0, 0.0, True),     # the guard switched off
])
def test_parts_too_thin_to_resolve_are_never_missing(width_px: float, min_width_px: float,
                                                     alarms: bool) -> None:
    eng = engine(parts={"cooldown_layers": 0, "min_width_px": min_width_px})
    gone = [part(1), part(2, printed=0.0, width_px=width_px)]
    events = run(eng, {1: gone, 2: gone, 3: gone})
    assert brief(events) == ([("open", 2, "part_missing.part2", 2)] if alarms else [])


def test_excess_part_warns() -> None:
    eng = engine(parts={"excess_fraction": 0.2, "excess_layers": 3, "cooldown_layers": 0})
    layers: dict[int, list[PartRecord] | None] = {
        n: [part(2, excess=0.5 if n >= 2 else 0.0)] for n in range(1, 6)}
    events = run(eng, layers)
    assert brief(events) == [("open", 4, "part_excess.part2", 2)]
    assert events[0].severity == "warning"


def test_layer_without_slice_keeps_state_and_ended_part_clears() -> None:
    eng = engine()
    layers: dict[int, list[PartRecord] | None] = {
        1: [part(3, printed=0.0)],
        2: None,  # no slice: part alarms neither count nor reset
        3: [part(3, printed=0.0)],
        4: [part(4)],  # part 3 ended: its alarm clears
    }
    assert brief(run(eng, layers)) == [("open", 3, "part_missing.part3", 3),
                                       ("clear", 4, "part_missing.part3", 3)]


def test_part_alarm_state_is_persisted_and_restored() -> None:
    from monitor.records import EngineState, RuleState

    eng = engine()
    out = eng.evaluate(KEY, 1, EMPTY, parts=[part(5, printed=0.0)])
    state = out.rule_states["part_missing.part5"]
    assert state["streak"] == 1
    fresh = engine()
    fresh.restore_build(KEY, EngineState(
        first_layer=1, last_evaluated=1, last_layer=1,
        rules={k: RuleState(**v) for k, v in out.rule_states.items()}, tracks=[],
        next_track=1, arrivals=[], stall_open=False, last_layer_at=None))
    events = fresh.evaluate(KEY, 2, EMPTY, parts=[part(5, printed=0.0)]).events
    assert brief(events) == [("open", 2, "part_missing.part5", 5)]


def test_grace_ack_and_mute() -> None:
    eng = engine(parts={"grace_layers": 2, "cooldown_layers": 0})
    missing = [part(1, printed=0.0)]
    assert run(eng, {1: missing, 2: missing, 3: missing}) == []
    assert brief(eng.evaluate(KEY, 4, EMPTY, parts=missing).events) == [
        ("open", 4, "part_missing.part1", 1)]
    assert eng.acknowledge(KEY, "part_missing.part1") is not None
    assert eng.evaluate(KEY, 5, EMPTY, parts=missing).events == []  # streak restarts
    assert brief(eng.evaluate(KEY, 6, EMPTY, parts=missing).events) == [
        ("open", 6, "part_missing.part1", 1)]
    eng2 = engine()
    eng2.mute(KEY, None)
    assert run(eng2, {1: missing, 2: missing, 3: missing}) == []


def test_disabled_part_alarms() -> None:
    eng = engine(parts={"enabled": False})
    assert run(eng, {n: [part(1, printed=0.0)] for n in range(1, 5)}) == []


def zone_stats(size: int = 50) -> LayerStats:
    masks = np.zeros((6, size, size), bool)
    masks[1, :5, :5] = True  # 25 px of swelling
    return layer_stats(masks, DEFAULT_CLASS_NAMES, pixel_size_mm=0.1)


@pytest.mark.parametrize(("scope", "with_zone", "alarms"), [
    ("parts", True, False),   # the zone holds no swelling
    ("plate", True, True),    # the whole layer does
    ("parts", False, True),   # no slice this layer: the whole layer
])
def test_rule_scope(scope: str, with_zone: bool, alarms: bool) -> None:
    rule = {"class": "swelling", "metric": "area_mm2", "threshold": 0.1, "consecutive": 1,
            "scope": scope}
    eng = engine(rules=[rule])
    whole = zone_stats()
    zone = EMPTY if with_zone else None
    events = eng.evaluate(KEY, 1, whole, parts=[part(1)] if with_zone else None,
                          parts_zone=zone).events
    assert bool(events) is alarms


def _speck(layer_size: int = 50) -> LayerStats:
    masks = np.zeros((6, layer_size, layer_size), bool)
    masks[1, 30:40, 30:40] = True  # 1 mm² of swelling, the same place every layer
    return layer_stats(masks, DEFAULT_CLASS_NAMES, pixel_size_mm=0.1)


@pytest.mark.parametrize(("scope", "with_zone", "alarms"), [
    ("parts", True, False),   # off the parts (the zone holds none of it): not tracked
    ("plate", True, True),    # tracked wherever it is
    ("parts", False, True),   # no slice: the whole layer
])
def test_track_scope(scope: str, with_zone: bool, alarms: bool) -> None:
    eng = engine(tracks={"classes": ["swelling"], "alarm_layers": 3, "scope": scope})
    events = []
    for n in (1, 2, 3, 4):
        events += eng.evaluate(KEY, n, _speck(), parts=[part(1)] if with_zone else None,
                               parts_zone=EMPTY if with_zone else None).events
    assert [e.rule for e in events if e.action == "open"] == (["track.swelling"] if alarms
                                                              else [])
    assert eng.wants_parts_zone is (scope == "parts")


@pytest.mark.parametrize(("section", "message"), [
    ({"missing_fraction": 1.5}, "alarms.parts.missing_fraction"),
    ({"missing_layers": 0}, "alarms.parts.missing_layers"),
    ({"excess_severity": "loud"}, "alarms.parts.excess_severity"),
    ({"missing_fractoin": 0.5}, "did you mean 'missing_fraction'"),
])
def test_parts_config_errors(tmp_path: Any, section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"alarms": {"parts": section}}, base_dir=tmp_path)


def test_parts_config_defaults_and_scope(tmp_path: Any) -> None:
    cfg = parse_config({"alarms": {"rules": [
        {"class": "spatter", "threshold": 1.0},
        {"class": "spatter", "metric": "components", "threshold": 1, "scope": "plate"}]}},
        base_dir=tmp_path)
    p = cfg.alarms.parts
    assert (p.enabled, p.missing_fraction, p.missing_layers, p.missing_severity) == (
        True, 0.5, 2, "critical")
    assert (p.excess_fraction, p.excess_layers, p.excess_severity) == (0.25, 2, "warning")
    assert [r.scope for r in cfg.alarms.rules] == ["parts", "plate"]
    with pytest.raises(ConfigError, match="scope"):
        parse_config({"alarms": {"rules": [{"class": "spatter", "threshold": 1,
                                            "scope": "bed"}]}}, base_dir=tmp_path)
