"""Real PUB/SUB sockets on loopback."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from monitor.daemon.publisher import Publisher, subscribe
from monitor.errors import ConfigError
from monitor.records import Outgoing
from tests.conftest import free_endpoint


def test_messages_in_order_with_seq_and_heartbeat() -> None:
    endpoint = free_endpoint()
    sent: list[int] = []
    pub = Publisher(endpoint, heartbeat_interval_s=0.1, startup_grace_s=0,
                    health=lambda: {"status": "ready"}, on_sent=sent.extend)
    pub.start(last_seq=4)
    got: list[tuple[str, dict]] = []
    stop = threading.Event()
    t = threading.Thread(target=lambda: got.extend(
        subscribe(endpoint, ("layer", "heartbeat"), stop=stop, timeout_s=5)))
    t.start()
    try:
        deadline = time.monotonic() + 5
        while not any(topic == "heartbeat" for topic, _ in got):  # connected
            assert time.monotonic() < deadline
            time.sleep(0.02)
        pub.publish([Outgoing(5 + i, "layer", {"layer": i}) for i in range(50)])
        pub.publish([Outgoing(55, "alarm", {"id": 1})])  # not subscribed
        while len([g for g in got if g[0] == "layer"]) < 50:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        stop.set()
        t.join(5)
        pub.stop()
    layers = [p for topic, p in got if topic == "layer"]
    assert [p["seq"] for p in layers] == list(range(5, 55))
    assert [p["layer"] for p in layers] == list(range(50))
    beats = [p for topic, p in got if topic == "heartbeat"]
    assert beats[0]["status"] == "ready" and beats[0]["last_seq"] >= 4
    assert sorted(sent) == list(range(5, 56))
    assert not any(topic == "alarm" for topic, _ in got)


def test_endpoint_in_use_is_a_config_error() -> None:
    endpoint = free_endpoint()
    ctx = zmq.Context.instance()
    holder = ctx.socket(zmq.PUB)
    holder.bind(endpoint)
    try:
        with pytest.raises(ConfigError, match=r"publish\.endpoint"):
            Publisher(endpoint).start()
    finally:
        holder.close(linger=0)


def test_slow_subscriber_never_blocks_the_publisher() -> None:
    endpoint = free_endpoint()
    pub = Publisher(endpoint, send_hwm=10, startup_grace_s=0)
    pub.start()
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 10)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    try:
        time.sleep(0.3)
        payload = {"blob": "x" * 10_000}
        pub.publish([Outgoing(i, "layer", payload) for i in range(2000)])  # never read
        deadline = time.monotonic() + 20
        while pub.sent < 2000:
            assert time.monotonic() < deadline, "publisher blocked by a subscriber"
            time.sleep(0.05)
    finally:
        sub.close(linger=0)
        pub.stop()
