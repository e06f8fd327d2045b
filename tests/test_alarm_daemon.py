"""Alarms on the real daemon: watchdog, SQLite, ZeroMQ (PUB, REQ/REP, CURVE), a real model."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import zmq
from click.testing import CliRunner

from monitor.cli import main
from monitor.config import load_config
from monitor.daemon.control import ControlError, request
from monitor.daemon.daemon import Daemon
from monitor.daemon.security import CurveClient, generate_keys
from tests.conftest import free_endpoint, make_threshold_weights, write_config
from tests.test_daemon_e2e import Listener


@pytest.fixture(scope="module")
def bright_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Marks swelling wherever the layer is brighter than 0.75."""
    return make_threshold_weights(tmp_path_factory.mktemp("w") / "bright.safetensors")


class Rig:
    """A daemon on a temp folder, a subscriber, and helpers to write layers one by one."""

    def __init__(self, tmp: Path, weights: Path, extra: str = "", store_url: str = "",
                 model_extra: str = "") -> None:
        self.pub, self.state = free_endpoint(), free_endpoint()
        self.config = write_config(tmp / "config.toml", f"""
[watch]
dir = "watch"
create = true
settle_s = 0.3
rescan_interval_s = 0
[model]
weights = "{weights}"
device = "cpu"
{model_extra}
[store]
state_dir = "state"
url = "{store_url}"
[publish]
endpoint = "{self.pub}"
state_endpoint = "{self.state}"
heartbeat_interval_s = 0.3
startup_grace_s = 0
{extra}
[metrics]
listen = ""
""")
        self.cfg = load_config(self.config)
        self.build = self.cfg.watch.dir / "B1"
        self.build.mkdir(parents=True)
        self.daemon = Daemon(self.cfg)
        self.listener: Listener | None = None

    def start(self, listen: bool = True) -> None:
        self.daemon.start()
        if listen:
            self.listener = Listener(self.pub)
            self.listener.wait_heartbeat()

    def write(self, n: int, *boxes: tuple[int, int, int, int], wait: bool = True) -> None:
        img = np.full((96, 96), 100, np.uint8)
        for x, y, w, h in boxes:
            img[y:y + h, x:x + w] = 240
        tmp = self.build / f".layer_{n:05d}.png.part"
        ok, buf = cv2.imencode(".png", img)
        assert ok
        tmp.write_bytes(buf.tobytes())
        tmp.rename(self.build / f"layer_{n:05d}.png")
        if wait:
            assert self.listener is not None
            self.listener.wait(lambda: n in self.listener.layers())  # type: ignore[union-attr]

    def alarms(self) -> list[dict[str, Any]]:
        assert self.listener is not None
        return [p for t, p in self.listener.messages if t == "alarm"]

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        self.daemon.stop()


@pytest.fixture
def rig(tmp_path: Path, bright_weights: Path) -> Iterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(extra: str = "", listen: bool = True, store_url: str = "") -> Rig:
        r = Rig(tmp_path, bright_weights, extra, store_url)
        made.append(r)
        r.start(listen)
        return r

    yield make
    for r in made:
        r.stop()


# The test weights are adapted to no camera: trusted here, so severities and the hook are as
# configured (tests/test_alarm_trust.py checks the cap).
NO_RULES = """
[alarms]
grace_layers = 0
trust_unadapted = true
rules = []
[alarms.stall]
enabled = false
"""


def test_stacking_defect_raises_one_critical_alarm_speck_none(rig: Callable[..., Rig]) -> None:
    r = rig(NO_RULES + "[alarms.tracks]\nclasses = ['swelling']\nalarm_layers = 5\n")
    r.write(1)
    for n in range(2, 9):
        boxes = [(40, 40, 10, 10)]
        if n == 3:
            boxes.append((5, 80, 4, 4))  # a one-layer speck far away
        r.write(n, *boxes)
    r.write(9)
    r.write(10)
    opened = [a for a in r.alarms() if a["state"] == "open"]
    assert [(a["layer"], a["severity"], a["rule"]) for a in opened] == [
        (6, "critical", "track.swelling")]  # present since layer 2: its fifth layer
    cleared = [a for a in r.alarms() if a["state"] == "cleared"]
    assert [a["id"] for a in cleared] == [opened[0]["id"]]
    out = CliRunner().invoke(main, ["report", "B1", "--config", str(r.config), "--format",
                                    "json"])
    report = json.loads(out.output)
    (track,) = [t for t in report["tracks"] if t["alarmed"]]
    assert (track["first_layer"], track["last_layer"], track["layers"]) == (2, 8, 7)
    assert [a["id"] for a in report["alarms"]] == [opened[0]["id"]]


RULE = NO_RULES.replace("rules = []", (
    "rules = [{ class = 'swelling', metric = 'area_mm2', threshold = 0.5, consecutive = 2, "
    "cooldown_layers = 0, severity = 'critical' }]")) + "[alarms.tracks]\nclasses = []\n"


def test_ack_stops_a_refire_and_late_subscriber_gets_state(rig: Callable[..., Rig]) -> None:
    r = rig(RULE)
    for n in (1, 2):
        r.write(n, (20, 20, 10, 10))  # 1 mm²
    r.listener.wait(lambda: bool(r.alarms()))  # type: ignore[union-attr]
    (first,) = r.alarms()
    assert (first["state"], first["layer"]) == ("open", 2)

    # A subscriber joining now learns the open alarm and the last layer from the state.
    late = CliRunner().invoke(main, ["subscribe", "--config", str(r.config), "--topic",
                                     "alarm", "--timeout", "0.5"])
    assert late.exit_code == 0, late.output
    state = json.loads(late.output.splitlines()[0])
    assert state["topic"] == "state" and state["seq"] >= first["seq"]
    assert [a["id"] for a in state["open_alarms"]] == [first["id"]]
    (b,) = state["builds"]
    assert (b["build"], b["last_layer"]["layer"]) == ("B1", 2)
    assert b["last_layer"]["classes"]["swelling"]["area_mm2"] == pytest.approx(1.0)

    out = CliRunner().invoke(main, ["ack", str(first["id"]), "--config", str(r.config)])
    assert out.exit_code == 0, out.output
    assert r.listener is not None
    r.listener.wait(lambda: any(a["state"] == "acknowledged" for a in r.alarms()))
    again = CliRunner().invoke(main, ["ack", str(first["id"]), "--config", str(r.config)])
    assert again.exit_code == 2 and "is acknowledged, not open" in again.output
    r.write(3, (20, 20, 10, 10))  # streak reset by the ack: no alarm here
    assert [a["state"] for a in r.alarms()] == ["open", "acknowledged"]
    r.write(4, (20, 20, 10, 10))  # two layers since the ack: it fires again
    r.write(5)  # gone: both alarms clear
    assert [(a["state"], a["layer"]) for a in r.alarms()] == [
        ("open", 2), ("acknowledged", 2), ("open", 4), ("cleared", 2), ("cleared", 4)]
    listing = CliRunner().invoke(main, ["alarms", "--config", str(r.config), "--json"])
    assert [json.loads(line)["state"] for line in listing.output.splitlines()] == [
        "cleared", "cleared"]


def test_mute_and_test_alarm_and_hook(rig: Callable[..., Rig], tmp_path: Path) -> None:
    hook_out = tmp_path / "hook.json"
    script = ("import json, os, sys; a = json.load(sys.stdin); "
              f"open({str(hook_out)!r}, 'a').write(json.dumps(a) + os.environ['PBF_ALARM_RULE']"
              " + '\\n')")
    hook = f"[alarms.hook]\ncommand = {json.dumps([sys.executable, '-c', script])}\n"
    r = rig(RULE + hook)
    r.write(1)
    out = CliRunner().invoke(main, ["mute", "B1", "--class", "swelling", "--config",
                                    str(r.config)])
    assert out.exit_code == 0, out.output
    for n in (2, 3, 4):
        r.write(n, (20, 20, 10, 10))
    assert r.alarms() == []  # muted
    out = CliRunner().invoke(main, ["mute", "B1", "--class", "swelling", "--unmute",
                                    "--config", str(r.config)])
    assert out.exit_code == 0, out.output
    r.write(5, (20, 20, 10, 10))
    r.listener.wait(lambda: bool(r.alarms()))  # type: ignore[union-attr]
    (opened,) = r.alarms()
    assert opened["layer"] == 5  # the streak went on while muted
    out = CliRunner().invoke(main, ["test-alarm", "--severity", "critical", "--hook",
                                    "--config", str(r.config)])
    assert out.exit_code == 0, out.output
    assert r.listener is not None
    r.listener.wait(lambda: any(a["rule"] == "test" for a in r.alarms()))
    deadline = time.monotonic() + 30
    while not hook_out.exists() or hook_out.read_text().count("\n") < 2:
        assert time.monotonic() < deadline, "the hook did not run twice"
        time.sleep(0.05)
    lines = hook_out.read_text().splitlines()
    assert lines[0].endswith("swelling.area_mm2") and lines[1].endswith("test")
    assert json.loads(lines[0].removesuffix("swelling.area_mm2"))["id"] == opened["id"]
    bad = CliRunner().invoke(main, ["mute", "B9", "--config", str(r.config)])
    assert bad.exit_code == 2 and "no build 'B9'" in bad.output


def test_failing_and_hanging_hooks_never_block_layers(rig: Callable[..., Rig]) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    hang = f"[alarms.hook]\ncommand = {json.dumps(sleeper)}\ntimeout_s = 30\n"
    r = rig(RULE.replace("consecutive = 2", "consecutive = 1") + hang)
    for n in range(1, 8):  # each layer flips the condition: an alarm opens every other layer
        r.write(n, *([(20, 20, 10, 10)] if n % 2 else []))
    assert len([a for a in r.alarms() if a["state"] == "open"]) == 4
    assert r.daemon.hook is not None and r.daemon.hook.runs == 1  # still in the first run


def test_stall_raises_one_alarm(rig: Callable[..., Rig]) -> None:
    r = rig(NO_RULES.replace("enabled = false", "factor = 2.0\nmin_s = 1.0\nmin_layers = 3"))
    for n in (1, 2, 3):
        r.write(n)
        time.sleep(0.3)
    assert r.listener is not None
    r.listener.wait(lambda: any(a["rule"] == "stall" for a in r.alarms()), timeout=30)
    time.sleep(1.5)  # more checks run: still one alarm
    (stall,) = r.alarms()
    assert (stall["state"], stall["layer"], stall["severity"]) == ("open", 3, "warning")
    r.write(4)
    r.listener.wait(lambda: len(r.alarms()) == 2)
    assert r.alarms()[1]["state"] == "cleared" and r.alarms()[1]["id"] == stall["id"]


def test_curve_unauthenticated_clients_get_nothing(rig: Callable[..., Rig],
                                                   tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate_keys(keys, "server")
    generate_keys(keys / "authorized", "operator")
    generate_keys(tmp_path / "stranger", "stranger")
    curve = (f'curve_secret_key = "{keys / "server.key_secret"}"\n'
             f'curve_authorized_dir = "{keys / "authorized"}"\n')
    r = rig(curve, listen=False)  # lands in [publish]
    good = CurveClient(keys / "server.key", keys / "authorized" / "operator.key_secret")
    stranger = CurveClient(keys / "server.key", tmp_path / "stranger" / "stranger.key_secret")
    got: dict[str, list[bytes]] = {"good": [], "plain": [], "stranger": []}
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    from monitor.daemon.security import subscriber_socket

    socks = {"good": subscriber_socket(ctx, r.pub, [""], good),
             "plain": subscriber_socket(ctx, r.pub, [""], None),
             "stranger": subscriber_socket(ctx, r.pub, [""], stranger)}
    try:
        deadline = time.monotonic() + 30
        r.write(1, wait=False)
        while time.monotonic() < deadline and not any(
                f[0] == b"layer" for f in got["good"]):
            for name, sock in socks.items():
                while sock.poll(10):
                    got[name].append(sock.recv_multipart())  # type: ignore[arg-type]
        assert any(f[0] == b"layer" for f in got["good"])
        assert got["plain"] == [] and got["stranger"] == []
        assert request(r.state, {"cmd": "state"}, curve=good)["seq"] >= 1
        with pytest.raises(ControlError, match="no answer"):
            request(r.state, {"cmd": "state"}, timeout_s=1.0)
        with pytest.raises(ControlError, match="no answer"):
            request(r.state, {"cmd": "state"}, timeout_s=1.0, curve=stranger)
    finally:
        for sock in socks.values():
            sock.close(linger=0)
        ctx.term()


def test_slow_subscriber_never_slows_the_pipeline(rig: Callable[..., Rig]) -> None:
    r = rig(NO_RULES)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    stuck = ctx.socket(zmq.SUB)
    stuck.setsockopt(zmq.RCVHWM, 1)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.connect(r.pub)  # connected, never reads
    try:
        time.sleep(0.3)
        for n in range(1, 21):
            r.write(n, (10 * (n % 8), 10, 6, 6), wait=False)
        assert r.listener is not None
        listener = r.listener
        listener.wait(lambda: len(listener.layers()) == 20, timeout=120)
        assert sorted(r.listener.layers()) == list(range(1, 21))
        r.listener.wait_heartbeat()  # the publisher is still alive and beating
    finally:
        stuck.close(linger=0)
        ctx.term()


def test_regions_ignore_and_part_statistics(rig: Callable[..., Rig]) -> None:
    regions = """
[[regions]]
name = "edge"
kind = "ignore"
polygon = [[0, 0], [96, 0], [96, 10], [0, 10]]
[[regions]]
name = "left"
units = "mm"
polygon = [[0, 0], [4.8, 0], [4.8, 9.6], [0, 9.6]]
"""
    r = rig(NO_RULES + regions)
    r.write(1, (10, 0, 10, 6), (5, 40, 10, 10), (70, 40, 10, 10))  # edge, left, right
    msg = r.listener.layers()[1][0]  # type: ignore[union-attr]
    assert msg["classes"]["swelling"]["pixel_count"] == 200  # the edge one is ignored
    left = msg["regions"]["left"]["swelling"]
    assert left["pixel_count"] == 100
    assert left["area_fraction"] == pytest.approx(100 / (48 * 96), rel=0.05)
    out = CliRunner().invoke(main, ["report", "B1", "--config", str(r.config), "--format",
                                    "json"])
    assert json.loads(out.output)["layers"][0]["regions"]["left"]["swelling"][
        "pixel_count"] == 100


def test_html_report_of_a_build(rig: Callable[..., Rig], tmp_path: Path) -> None:
    r = rig(NO_RULES + "[alarms.tracks]\nclasses = ['swelling']\nalarm_layers = 3\n")
    for n in range(1, 7):
        r.write(n, *([(40, 40, 10, 10)] if 2 <= n <= 5 else []))
    out = tmp_path / "r.html"
    res = CliRunner().invoke(main, ["report", "B1", "--config", str(r.config), "--format",
                                    "html", "--out", str(out)])
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert "<h1>Build B1</h1>" in html and "http" not in html.split("<body>")[1]  # no links
    assert html.count('class="overlay"') == 4  # the four layers with a defect, on the camera
    assert "heatmap swelling" in html and "defect tracks" in html
    assert 'alt="alarm timeline"' in html and "track.swelling" in html
    assert html.count("<tr><td>") >= 6  # one row per layer, plus tracks and alarms
    part = tmp_path / "part.html"
    res = CliRunner().invoke(main, ["report", "B1", "--config", str(r.config), "--format",
                                    "html", "--out", str(part), "--layers", "5:6"])
    assert res.exit_code == 0, res.output
    text = part.read_text()
    assert "layers 5-6" in text and text.count('class="overlay"') == 1
    res = CliRunner().invoke(main, ["report", "B1", "--config", str(r.config), "--format",
                                    "json", "--layers", "2:3"])
    assert [x["layer"] for x in json.loads(res.output)["layers"]] == [2, 3]


def test_fleet_of_two_printers(tmp_path: Path, bright_weights: Path) -> None:
    """Two printers, each with its folder, pattern and camera; one model, one database."""
    fleet = """
[[printers]]
name = "P1"
watch = { dir = "p1", create = true, settle_s = 0.3, rescan_interval_s = 0 }
camera = { pixel_size_mm = 0.1 }
[[printers]]
name = "P2"
watch = { dir = "p2", create = true, settle_s = 0.3, rescan_interval_s = 0, pattern = 'PATTERN' }
camera = { pixel_size_mm = 0.2 }
""".replace("PATTERN", r"^cam(?P<build>[A-Z0-9]+)_(?P<layer>\d+)\.png$")
    r = Rig(tmp_path, bright_weights, NO_RULES + fleet)
    try:
        r.start()
        img = np.full((96, 96), 100, np.uint8)
        img[20:30, 20:30] = 240
        ok, buf = cv2.imencode(".png", img)
        assert ok
        (r.cfg.printers[0].watch.dir / "JOB1").mkdir(parents=True)
        (r.cfg.printers[0].watch.dir / "JOB1" / "layer_7.png").write_bytes(buf.tobytes())
        r.cfg.printers[1].watch.dir.mkdir(parents=True, exist_ok=True)
        (r.cfg.printers[1].watch.dir / "camJOB1_0007.png").write_bytes(buf.tobytes())
        assert r.listener is not None
        listener = r.listener
        listener.wait(lambda: len(listener.layers().get(7, [])) == 2)
        got = {m["printer"]: m for m in listener.layers()[7]}
        assert set(got) == {"P1", "P2"} and {m["build"] for m in got.values()} == {"JOB1"}
        assert got["P1"]["classes"]["swelling"]["area_mm2"] == pytest.approx(1.0)
        assert got["P2"]["classes"]["swelling"]["area_mm2"] == pytest.approx(4.0)  # 0.2 mm px
        out = CliRunner().invoke(main, ["report", "JOB1", "--config", str(r.config),
                                        "--printer", "P2", "--format", "json"])
        assert out.exit_code == 0, out.output
        assert [x["layer"] for x in json.loads(out.output)["layers"]] == [7]
    finally:
        r.stop()
