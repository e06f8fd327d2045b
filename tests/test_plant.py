"""Plant integration on the real daemon: an asyncua client against the OPC UA server, and a
real mosquitto broker (a subprocess) with paho subscribers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
import pytest
from asyncua import Client, ua
from paho.mqtt.enums import CallbackAPIVersion

from monitor.config import parse_config
from monitor.daemon.daemon import Daemon
from monitor.errors import ConfigError
from tests.conftest import daemon_toml, encode, free_port, wait_for_rows, write_config
from tests.test_alarm_daemon import RULE, Rig, bright_weights  # noqa: F401 (fixture)
from tests.test_daemon_e2e import start_daemon

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


def wait(cond: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what or cond}"
        time.sleep(0.05)


@pytest.fixture
def rig_with(tmp_path: Path, bright_weights: Path) -> Iterator[Callable[[str], Rig]]:  # noqa: F811
    made: list[Rig] = []

    def make(extra: str) -> Rig:
        r = Rig(tmp_path, bright_weights, RULE + extra)
        made.append(r)
        r.start()
        return r

    yield make
    for r in made:
        r.stop()


# ---------------------------------------------------------------- OPC UA


def test_opcua_browse_read_event_and_ack(rig_with: Callable[[str], Rig]) -> None:
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/pbf-monitor"
    r = rig_with(f'[opcua]\nenabled = true\nendpoint = "{url}"\n')

    class Events:
        def __init__(self) -> None:
            self.got: list[Any] = []

        def event_notification(self, event: Any) -> None:
            self.got.append(event)

    async def scenario() -> None:
        async with Client(url) as c:
            idx = await c.get_namespace_index("urn:pbf-monitor")
            root = c.get_node(ua.NodeId("PbfMonitor", idx))
            etype = c.get_node(ua.NodeId("PbfAlarmEventType", idx))
            handler = Events()
            sub = await c.create_subscription(50, handler)
            await sub.subscribe_events(root, etype)

            for n in (1, 2):  # 1 mm² of swelling twice: the rule opens an alarm at layer 2
                await asyncio.to_thread(r.write, n, (20, 20, 10, 10))
            # the alarm's message follows layer 2's in the same batch
            await asyncio.to_thread(r.listener.wait,  # type: ignore[union-attr]
                                    lambda: bool(r.alarms()))
            (alarm,) = r.alarms()
            printer = "PbfMonitor/Printers/default"
            number = c.get_node(ua.NodeId(f"{printer}/LastLayer/Number", idx))
            for _ in range(200):
                if await number.read_value() == 2:
                    break
                await asyncio.sleep(0.05)
            assert await number.read_value() == 2
            # Browse: the tree under the root, by name.
            names = {(await ch.read_browse_name()).Name for ch in await root.get_children()}
            assert {"Heartbeat", "Printers", "Ack", "Mute", "Unmute"} <= names
            last = c.get_node(ua.NodeId(f"{printer}/LastLayer", idx))
            assert {(await ch.read_browse_name()).Name for ch in await last.get_children()} >= {
                "Number", "Status", "Time", "Seq", "Classes"}
            area = c.get_node(ua.NodeId(f"{printer}/LastLayer/Classes/swelling/AreaMm2", idx))
            assert await area.read_value() == pytest.approx(1.0)
            assert await c.get_node(ua.NodeId(f"{printer}/Build", idx)).read_value() == "B1"
            node = f"{printer}/Alarms/Alarm{alarm['id']}"
            assert await c.get_node(ua.NodeId(f"{node}/State", idx)).read_value() == "open"
            assert await c.get_node(ua.NodeId(f"{node}/Rule", idx)).read_value() == \
                alarm["rule"]
            for _ in range(200):
                if handler.got:
                    break
                await asyncio.sleep(0.05)
            (ev,) = handler.got
            assert (ev.AlarmId, ev.State, ev.Seq) == (alarm["id"], "open", alarm["seq"])

            # Ack through the method: the state endpoint's handler, same validation.
            ok, reply = await root.call_method(ua.NodeId("PbfMonitor/Ack", idx),
                                               ua.Variant(alarm["id"], ua.VariantType.Int64))
            assert ok, reply
            assert json.loads(reply)["alarm"]["state"] == "acknowledged"
            ok, reply = await root.call_method(ua.NodeId("PbfMonitor/Ack", idx),
                                               ua.Variant(alarm["id"], ua.VariantType.Int64))
            assert not ok and "is acknowledged, not open" in reply
            ok, reply = await root.call_method(ua.NodeId("PbfMonitor/Mute", idx), "", "nope", "")
            assert not ok and "no build 'nope'" in reply
            for _ in range(200):
                if len(handler.got) >= 2:
                    break
                await asyncio.sleep(0.05)
            assert [e.State for e in handler.got] == ["open", "acknowledged"]
            assert await c.get_node(ua.NodeId(f"{node}/State", idx)).read_value() == \
                "acknowledged"
            await sub.delete()

    asyncio.run(scenario())
    assert r.listener is not None
    r.listener.wait(lambda: any(a["state"] == "acknowledged" for a in r.alarms()))


@pytest.mark.parametrize(("opcua", "error"), [
    ({"endpoint": "opc.tcp://0.0.0.0:4840/x"}, 'anonymous = "write"'),
    ({"security_policy": ["Basic256Sha256_SignAndEncrypt"]}, "needs opcua.certificate"),
    ({"endpoint": "http://127.0.0.1:4840"}, "expected opc.tcp://"),
])
def test_opcua_unsafe_or_wrong_config_refused(opcua: dict[str, Any], error: str,
                                              tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config({"opcua": {"enabled": True, **opcua}}, base_dir=tmp_path)


def test_opcua_read_only_anonymous_cannot_call(tmp_path: Path) -> None:
    from monitor.config import OpcuaConfig
    from monitor.daemon.opcua import OpcuaServer

    url = f"opc.tcp://127.0.0.1:{free_port()}/pbf-monitor"
    users = tmp_path / "users"
    users.write_text("op:secret\n")
    users.chmod(0o600)
    calls: list[dict[str, Any]] = []

    def handler(req: dict[str, Any]) -> dict[str, Any]:
        calls.append(req)
        return {"alarm": {"id": req["id"]}}

    server = OpcuaServer(OpcuaConfig(enabled=True, endpoint=url, anonymous="read",
                                     users_file=users), handler=handler, health=dict)
    server.start()

    async def scenario() -> None:
        async with Client(url) as c:
            idx = await c.get_namespace_index("urn:pbf-monitor")
            root = c.get_node(ua.NodeId("PbfMonitor", idx))
            with pytest.raises(ua.UaError):
                await root.call_method(ua.NodeId("PbfMonitor/Ack", idx), ua.Variant(
                    3, ua.VariantType.Int64))
        op = Client(url)
        op.set_user("op")
        op.set_password("secret")
        async with op:
            idx = await op.get_namespace_index("urn:pbf-monitor")
            root = op.get_node(ua.NodeId("PbfMonitor", idx))
            ok, _ = await root.call_method(ua.NodeId("PbfMonitor/Ack", idx), ua.Variant(
                3, ua.VariantType.Int64))
            assert ok
        bad = Client(url)
        bad.set_user("op")
        bad.set_password("wrong")
        with pytest.raises(ua.UaError):
            async with bad:
                pass

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
    assert calls == [{"cmd": "ack", "id": 3}]


# ---------------------------------------------------------------- MQTT


class Broker:
    """mosquitto on a free loopback port, persistent, restartable on the same port."""

    def __init__(self, tmp: Path) -> None:
        assert MOSQUITTO is not None
        self.port = free_port()
        self.dir = tmp / "mosquitto"
        self.dir.mkdir()
        self.dir.chmod(0o777)  # mosquitto started as root drops to its own user
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                             f"persistence true\npersistence_location {self.dir}/\n"
                             f"log_dest file {self.dir}/log\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([str(MOSQUITTO), "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait(up, 20, "mosquitto to listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        f = self.dir / "log"
        return f.read_text()[-2000:] if f.exists() else ""


class Subscriber:
    """A paho client on its own thread, collecting (topic, payload, retained)."""

    def __init__(self, port: int, *, client_id: str = "", clean: bool = True) -> None:
        self.got: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=clean)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe("pbf-monitor/#", qos=1)
        self.c.on_message = self._on_message
        self.c.reconnect_delay_set(0.1, 0.5)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        with self.lock:
            self.got.append((msg.topic, msg.payload, bool(msg.retain)))

    def payloads(self, suffix: str) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(p) for t, p, _ in self.got if t.endswith(suffix) and p]

    def topics(self) -> dict[str, tuple[bytes, bool]]:
        with self.lock:
            return {t: (p, r) for t, p, r in self.got}

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


def test_mqtt_layers_alarms_retained_state_and_broker_outage(
        rig_with: Callable[[str], Rig], broker: Broker) -> None:
    sub = Subscriber(broker.port, client_id="dashboard", clean=False)
    try:
        r = rig_with(f'[mqtt]\nenabled = true\nurl = "mqtt://127.0.0.1:{broker.port}"\n'
                     'printer = "m1"\nqueue_size = 1000\n')
        for n in (1, 2):
            r.write(n, (20, 20, 10, 10))
        r.listener.wait(lambda: bool(r.alarms()))  # type: ignore[union-attr]
        (alarm,) = r.alarms()
        wait(lambda: len(sub.payloads("/layer")) == 2 and sub.payloads("/alarm"),
             what="layers and the alarm over MQTT")
        layers = sub.payloads("pbf-monitor/m1/layer")
        zmq_layers = [p for t, p in r.listener.messages if t == "layer"]  # type: ignore[union-attr]
        assert layers == zmq_layers  # the same JSON, seq included
        assert sub.payloads("pbf-monitor/m1/alarm") == [alarm]
        wait(lambda: bool(sub.payloads("pbf-monitor/m1/heartbeat")), what="a heartbeat")
        beat = sub.payloads("pbf-monitor/m1/heartbeat")[-1]
        assert beat["mqtt_dropped"] == 0 and "last_seq" in beat

        # A dashboard that starts late sees the present: last layer and the open alarm.
        late = Subscriber(broker.port)
        try:
            wait(lambda: f"pbf-monitor/m1/state/alarms/{alarm['id']}" in late.topics(),
                 what="retained state")
            t = late.topics()
            assert json.loads(t["pbf-monitor/m1/state/last_layer"][0])["layer"] == 2
            assert t["pbf-monitor/m1/state/last_layer"][1]  # retained
            assert json.loads(t[f"pbf-monitor/m1/state/alarms/{alarm['id']}"][0]) == alarm
            assert t["pbf-monitor/m1/state/online"] == (b"true", True)
        finally:
            late.close()

        # The broker goes away for 30 s (a plant's may for minutes): layers go on, and what
        # fits the queue reaches the subscriber once it is back, in order.
        broker.stop()
        down = time.monotonic()
        for n in (3, 4, 5):
            r.write(n)  # clean: the alarm clears at layer 3
        assert r.daemon.health()["mqtt"] == "disconnected"
        time.sleep(max(0.0, 30.0 - (time.monotonic() - down)))
        broker.start()
        wait(lambda: len(sub.payloads("/layer")) >= 5, what="the layers sent while down")
        seqs = [p["seq"] for p in sub.payloads("pbf-monitor/m1/layer")]
        zmq_seqs = [p["seq"] for t, p in r.listener.messages if t == "layer"]  # type: ignore[union-attr]
        assert sorted(set(seqs)) == zmq_seqs  # nothing lost (a re-send may repeat a seq)
        wait(lambda: any(a["state"] == "cleared" for a in sub.payloads("/alarm")),
             what="the cleared alarm")
        assert r.daemon.health()["mqtt_dropped"] == 0
    finally:
        sub.close()

    # Cleared: the retained alarm is gone; the last layer is layer 5.
    late = Subscriber(broker.port)
    try:
        wait(lambda: "pbf-monitor/m1/state/last_layer" in late.topics(), what="last layer")
        time.sleep(0.5)
        t = late.topics()
        assert json.loads(t["pbf-monitor/m1/state/last_layer"][0])["layer"] == 5
        assert f"pbf-monitor/m1/state/alarms/{alarm['id']}" not in t
    finally:
        late.close()


def test_mqtt_queue_is_bounded_and_drops_are_counted(tmp_path: Path) -> None:
    """No broker at all: publish never blocks, the oldest beyond queue_size are dropped."""
    from monitor.config import MqttConfig
    from monitor.daemon.mqtt import MqttPublisher
    from monitor.records import Outgoing

    drops: list[int] = []
    cursors: list[int] = []
    m = MqttPublisher(MqttConfig(enabled=True, url=f"mqtt://127.0.0.1:{free_port()}",
                                 queue_size=10), health=dict, on_drop=drops.append,
                      on_cursor=cursors.append)
    m.start()
    try:
        for seq in range(1, 21):
            m.publish([Outgoing(seq, "layer", {"printer": "", "layer": seq})])
        assert m.dropped >= 20 - 10  # the stream (20 layers, heartbeats) beyond the queue
        assert sum(drops) == m.dropped
        assert m.alive and not m.connected
        # Dropped and counted is taken: the cursor passes layers 1-10, and is handed on.
        assert m.cursor >= 10
        wait(lambda: bool(cursors) and cursors[-1] == m.cursor, 10, "the cursor reported")
    finally:
        m.stop()


# ---------------------------------------------------------------- nothing lost, the present


def _layer_png(boxed: bool) -> bytes:
    """A 96 px layer; with a 10x10 px bright box (1 mm² of swelling: RULE's alarm)."""
    img = np.full((96, 96), 100, np.uint8)
    if boxed:
        img[20:30, 20:30] = 240
    return encode(img, ".png")


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:  # the schema is not there yet
            return []


def test_mqtt_kill9_with_the_broker_down_loses_nothing(
        tmp_path: Path, bright_weights: Path, broker: Broker) -> None:  # noqa: F811
    """The broker is down while a build arrives; the daemon is killed (-9) after ZeroMQ has
    sent and marked every message. Once both are back, a subscriber with a persistent
    session has every layer and alarm message, with the seq ZeroMQ gave it."""
    root = tmp_path / "d"
    (root / "watch" / "B1").mkdir(parents=True)
    cfg = write_config(root / "config.toml", daemon_toml(
        bright_weights, settle_s=0.2, rescan_interval_s=1,
        extra=RULE + f'[mqtt]\nenabled = true\nurl = "mqtt://127.0.0.1:{broker.port}"\n'
                     'printer = "m1"\n'))
    db = root / "state" / "pbf-monitor.db"
    log = tmp_path / "daemon.log"
    historian = Subscriber(broker.port, client_id="historian", clean=False)
    proc: subprocess.Popen[bytes] | None = None
    try:
        # The historian's session is on the broker before it goes down.
        def subscribed() -> bool:
            historian.c.publish("pbf-monitor/probe", b"1", qos=1)  # it hears itself once in
            time.sleep(0.2)
            return "pbf-monitor/probe" in historian.topics()

        wait(subscribed, 20, "the historian subscribed")
        broker.stop()
        # Layers 1-2 open an alarm, 3 clears it, 4-6 open another (at 5) that stays open.
        for n, boxed in enumerate([True, True, False, True, True, True], 1):
            (root / "watch" / "B1" / f"layer_{n:05d}.png").write_bytes(_layer_png(boxed))
        proc = start_daemon(cfg, log)
        wait_for_rows(f"sqlite:///{db}", "SELECT layer FROM layers", 6, proc=proc, log=log)
        wait(lambda: _rows(db, "SELECT count(*), sum(published) FROM outbox") == [(9, 9)],
             60, "ZeroMQ to send and mark every message")
        assert _rows(db, "SELECT seq FROM sink_cursors WHERE name = 'mqtt'") == [(0,)]
        proc.kill()  # SIGKILL: what the MQTT publisher held in memory is gone
        proc.wait(10)

        broker.start()
        proc = start_daemon(cfg, log)
        sent = _rows(db, "SELECT seq, topic FROM outbox ORDER BY seq")

        def got(topic: str) -> set[int]:
            return {p["seq"] for p in historian.payloads(f"pbf-monitor/m1/{topic}")}

        wait(lambda: got("layer") | got("alarm") == {seq for seq, _ in sent}, 90,
             f"every message over MQTT: {sent}; log: {log.read_text()[-2000:]}")
        assert got("layer") == {seq for seq, t in sent if t == "layer"}
        states = [p["state"] for p in historian.payloads("pbf-monitor/m1/alarm")]
        assert sorted(states) == ["cleared", "open", "open"]
        # The cursor follows the broker's acknowledgements into the database.
        wait(lambda: _rows(db, "SELECT seq FROM sink_cursors WHERE name = 'mqtt'") == [(9,)],
             30, "the MQTT cursor stored")

        # The retained state is the present: layer 6 and the alarm opened at layer 5 only.
        late = Subscriber(broker.port)
        try:
            wait(lambda: "pbf-monitor/m1/state/last_layer" in late.topics(), 20, "last layer")
            time.sleep(0.5)
            alarms = {t: json.loads(p) for t, (p, _) in late.topics().items()
                      if "/state/alarms/" in t and p}
            assert json.loads(late.topics()["pbf-monitor/m1/state/last_layer"][0])["layer"] == 6
            assert [(a["layer"], a["state"]) for a in alarms.values()] == [(5, "open")]
        finally:
            late.close()
    finally:
        historian.close()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def test_restart_shows_the_present_before_any_new_layer(
        rig_with: Callable[[str], Rig], broker: Broker) -> None:
    """After a restart, the OPC UA tree and the MQTT retained topics show the last layer and
    the open alarm from the database at once, even on a broker that lost its retained
    messages; a retained alarm the broker kept that is not open is emptied."""
    url = f"opc.tcp://127.0.0.1:{free_port()}/pbf-monitor"
    r = rig_with(f'[opcua]\nenabled = true\nendpoint = "{url}"\n'
                 f'[mqtt]\nenabled = true\nurl = "mqtt://127.0.0.1:{broker.port}"\n'
                 'printer = "m1"\n')
    for n in (1, 2):
        r.write(n, (20, 20, 10, 10))
    assert r.listener is not None
    r.listener.wait(lambda: bool(r.alarms()))  # it may follow layer 2's message
    (alarm,) = r.alarms()
    layer2 = r.listener.layers()[2][0]
    r.stop()

    # A broker without its retained messages (no persistence, or a new one), and a stale
    # retained alarm that cleared while the daemon was away.
    broker.stop()
    (broker.dir / "mosquitto.db").unlink(missing_ok=True)
    broker.start()
    stale = "pbf-monitor/m1/state/alarms/999"
    watch = Subscriber(broker.port)
    watch.c.publish(stale, json.dumps({"id": 999, "state": "open"}), qos=1, retain=True)
    wait(lambda: stale in watch.topics(), 20, "the stale alarm retained")

    again = Daemon(r.cfg)
    again.start()
    try:
        async def tree() -> dict[str, Any]:
            async with Client(url) as c:
                idx = await c.get_namespace_index("urn:pbf-monitor")
                base = "PbfMonitor/Printers/default"
                paths = ["Build", "LastLayer/Number", "LastLayer/Seq",
                         "LastLayer/Classes/swelling/AreaMm2",
                         f"Alarms/Alarm{alarm['id']}/State", f"Alarms/Alarm{alarm['id']}/Rule"]
                return {p: await c.get_node(ua.NodeId(f"{base}/{p}", idx)).read_value()
                        for p in paths}

        # At once: read as soon as start() returns, no layer since.
        values = asyncio.run(tree())
        assert values == {"Build": "B1", "LastLayer/Number": 2, "LastLayer/Seq": layer2["seq"],
                          "LastLayer/Classes/swelling/AreaMm2": pytest.approx(1.0),
                          f"Alarms/Alarm{alarm['id']}/State": "open",
                          f"Alarms/Alarm{alarm['id']}/Rule": alarm["rule"]}

        wait(lambda: (stale, b"", False) in watch.got, 20, "the stale alarm emptied")
        late = Subscriber(broker.port)
        try:
            mine = f"pbf-monitor/m1/state/alarms/{alarm['id']}"
            wait(lambda: mine in late.topics() and "pbf-monitor/m1/state/last_layer"
                 in late.topics(), 20, "the retained present")
            t = late.topics()
            assert json.loads(t["pbf-monitor/m1/state/last_layer"][0]) == layer2  # seq too
            assert json.loads(t[mine][0]) == alarm
            assert stale not in t
        finally:
            late.close()
        assert again.counts == {"ok": 0, "error": 0}  # nothing new was processed
    finally:
        watch.close()
        again.stop()
