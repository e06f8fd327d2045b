"""Layer numbers that are heights (`watch.layer_from`), and "the previous layer" meaning the
previous layer received: builds numbered 10, 20, 30 or with a missing layer."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path, PurePath

import cv2
import numpy as np
import pytest

from monitor.config import load_config
from monitor.daemon.daemon import Daemon
from monitor.daemon.watcher import LayerKey, parse_layer_path
from tests.conftest import free_endpoint, write_config
from tests.test_alarm_daemon import NO_RULES, Rig, bright_weights, rig  # noqa: F401
from tests.test_alarms import BIG, KEY, RULE, TRACKS, engine, run, stats
from tests.test_daemon_e2e import Listener


@pytest.mark.parametrize(
    ("rel", "layer_from", "thickness", "pattern", "expected"),
    [
        ("B1/part_012000.png", "height_um", 0.03, None, LayerKey("B1", 400)),
        ("B1/part_012030.png", "height_um", 0.03, None, LayerKey("B1", 401)),
        ("B1/2024-05-01_z012060.tif", "height_um", 0.03, None, LayerKey("B1", 402)),
        ("B1/z_12.03.png", "height_mm", 0.03, None, LayerKey("B1", 401)),
        ("B1/z_12.png", "height_mm", 0.05, None, LayerKey("B1", 240)),
        ("B1/layer_00017.png", "number", 0.03, None, LayerKey("B1", 17)),
        ("JOB7_012030.png", "height_um", 0.03, r"^(?P<build>\w+?)_(?P<layer>\d+)\.png$",
         LayerKey("JOB7", 401)),
        ("JOB7_12.030.png", "height_mm", 0.03, r"^(?P<build>\w+?)_(?P<layer>[\d.]+)\.png$",
         LayerKey("JOB7", 401)),
        ("B1/no_digits.png", "height_um", 0.03, None, None),
    ],
)
def test_layer_from_height(rel: str, layer_from: str, thickness: float, pattern: str | None,
                           expected: LayerKey | None) -> None:
    got = parse_layer_path(PurePath(rel), re.compile(pattern) if pattern else None,
                           layer_from=layer_from, layer_thickness_mm=thickness)
    assert got == expected


def test_layer_from_is_checked_in_config(tmp_path: Path) -> None:
    from monitor.errors import ConfigError

    cfg = write_config(tmp_path / "c.toml", '[watch]\nlayer_from = "height_in"\n')
    with pytest.raises(ConfigError, match=r"watch\.layer_from"):
        load_config(cfg)
    cfg = write_config(tmp_path / "c.toml", '[[printers]]\nname = "a"\n'
                       'watch = { dir = "w", layer_from = "height_um" }\n'
                       'camera = { layer_thickness_mm = 0.03 }\n')
    p = load_config(cfg).printers[0]
    assert (p.watch.layer_from, p.camera.layer_thickness_mm) == ("height_um", 0.03)


# --- the engine: the previous layer is the previous one received -----------------------

def test_consecutive_counts_layers_received_not_numbers() -> None:
    eng = engine(rules=[RULE])  # 3 consecutive layers
    events = run(eng, {10: stats(BIG), 20: stats(BIG), 30: stats(BIG), 40: stats()})
    assert [(e.action, e.layer) for e in events] == [("open", 30), ("clear", 40)]


def test_grace_and_cooldown_count_layers_received() -> None:
    eng = engine(rules=[{**RULE, "consecutive": 1}], grace_layers=2)
    events = run(eng, {n: stats(BIG) for n in (10, 20, 30, 40)})
    assert [(e.action, e.layer) for e in events] == [("open", 30)]
    eng = engine(rules=[{**RULE, "consecutive": 1, "cooldown_layers": 3}])
    pattern = {10: 1, 20: 0, 30: 1, 40: 0, 50: 1}
    events = run(eng, {n: stats(BIG) if on else stats() for n, on in pattern.items()})
    assert [(e.action, e.layer) for e in events] == [
        ("open", 10), ("clear", 20), ("open", 50)]


def test_tracks_link_through_numbering_in_tens(caplog: pytest.LogCaptureFixture) -> None:
    eng = engine(tracks=TRACKS)  # 5 layers make a track alarm; it may skip one layer
    layers = {10 * n: stats((40 + n, 40, 8, 8)) for n in range(1, 7)}
    layers[70] = layers[80] = stats()
    with caplog.at_level(logging.INFO, logger="monitor.alarms.engine"):
        events = run(eng, layers)
    assert [(e.action, e.layer, e.rule) for e in events] == [
        ("open", 50, "track.swelling"), ("clear", 80, "track.swelling")]
    jumps = [r for r in caplog.records if "jump" in r.getMessage()]
    assert len(jumps) == 1 and "10 to 20" in jumps[0].getMessage()  # once per build


def test_a_missing_layer_does_not_break_a_track() -> None:
    eng = engine(tracks={**TRACKS, "max_gap_layers": 0})
    layers = {n: stats((40, 40, 8, 8)) for n in (1, 2, 4, 5, 6)}  # layer 3 never came
    events = run(eng, layers)
    assert [(e.action, e.layer) for e in events] == [("open", 6)]


def test_restored_build_keeps_counting_layers_received() -> None:
    """After a restart the engine gets the build's evaluated layers from the store."""
    from monitor.records import EngineState, RuleState

    eng = engine(rules=[{**RULE, "consecutive": 1, "cooldown_layers": 2}])
    eng.restore_build(KEY, EngineState(
        first_layer=10, last_evaluated=30, last_layer=30,
        rules={"swelling.area_mm2": RuleState(streak=1, open=False, active=False,
                                              last_open_layer=30)},
        tracks=[], next_track=1, arrivals=[], stall_open=False, last_layer_at=None,
        evaluated_layers=[10, 20, 30]))
    events = run(eng, {40: stats(BIG), 50: stats(BIG)})
    assert [(e.action, e.layer) for e in events] == [("open", 50)]  # 2 layers after 30


# --- on the real daemon ---------------------------------------------------------------

def test_height_named_files_get_layer_indices(tmp_path: Path, bright_weights: Path  # noqa: F811
                                              ) -> None:
    pub = free_endpoint()
    config = write_config(tmp_path / "config.toml", f"""
[watch]
dir = "watch"
create = true
settle_s = 0.3
rescan_interval_s = 0
layer_from = "height_um"
[camera]
layer_thickness_mm = 0.03
[model]
weights = "{bright_weights}"
device = "cpu"
[store]
state_dir = "state"
[publish]
endpoint = "{pub}"
state_endpoint = "{free_endpoint()}"
heartbeat_interval_s = 0.3
startup_grace_s = 0
[metrics]
listen = ""
{NO_RULES}""")
    cfg = load_config(config)
    build = cfg.watch.dir / "H1"
    build.mkdir(parents=True)
    daemon = Daemon(cfg)
    daemon.start()
    listener = Listener(pub)
    try:
        listener.wait_heartbeat()
        img = np.full((96, 96), 100, np.uint8)
        for height in (12000, 12030, 12060):
            ok, buf = cv2.imencode(".png", img)
            assert ok
            (build / f"SI_{height:06d}.png").write_bytes(buf.tobytes())
        listener.wait(lambda: len(listener.layers()) >= 3)
        got = {n: [p["image"].rsplit("/", 1)[-1] for p in ps]
               for n, ps in listener.layers().items()}
        assert got == {400: ["SI_012000.png"], 401: ["SI_012030.png"],
                       402: ["SI_012060.png"]}
    finally:
        listener.close()
        daemon.stop()


def test_daemon_build_numbered_in_tens_links_tracks(rig: Callable[..., Rig]  # noqa: F811
                                                     ) -> None:
    r = rig(NO_RULES + "[alarms.tracks]\nclasses = ['swelling']\nalarm_layers = 3\n")
    for n in (10, 20, 30, 40):
        r.write(n, (40, 40, 10, 10))
    r.write(50)
    r.write(60)
    opened = [(a["layer"], a["rule"]) for a in r.alarms() if a["state"] == "open"]
    assert opened == [(30, "track.swelling")]
    cleared = [a["cleared_layer"] for a in r.alarms() if a["state"] == "cleared"]
    assert cleared == [60]  # the track may skip one layer (max_gap_layers = 1)
