"""The real daemon as a subprocess: watchdog, SQLite, ZeroMQ and a tiny real model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from monitor.daemon.publisher import subscribe
from tests.conftest import encode, free_endpoint, layer_image, write_config


class Listener:
    """Collects every message from the daemon's PUB socket on a background thread."""

    def __init__(self, endpoint: str) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(endpoint,), daemon=True)
        self._thread.start()

    def _run(self, endpoint: str) -> None:
        for topic, payload in subscribe(endpoint, stop=self._stop):
            self.messages.append((topic, payload))

    def layers(self) -> dict[int, list[dict[str, Any]]]:
        out: dict[int, list[dict[str, Any]]] = {}
        for topic, p in self.messages:
            if topic == "layer":
                out.setdefault(p["layer"], []).append(p)
        return out

    def wait(self, cond: Any, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out; got {self.messages[-5:]}"
            time.sleep(0.05)

    def wait_heartbeat(self) -> None:
        n = sum(1 for t, _ in self.messages if t == "heartbeat")
        self.wait(lambda: sum(1 for t, _ in self.messages if t == "heartbeat") > n, 60)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def start_daemon(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "monitor", "run", "--config", str(cfg)],
        stdout=subprocess.DEVNULL, stderr=log.open("ab"),
    )


@pytest.fixture
def setup(tmp_path: Path, tiny_weights: Path) -> Iterator[tuple[Path, Path, str]]:
    endpoint = free_endpoint()
    cfg = write_config(tmp_path / "config.toml", f"""
[watch]
dir = "watch"
create = true
settle_s = 0.5
rescan_interval_s = 2
retry_delay_s = 0.2
[model]
weights = "{tiny_weights}"
[store]
state_dir = "state"
[publish]
endpoint = "{endpoint}"
state_endpoint = "{free_endpoint()}"
heartbeat_interval_s = 0.2
[metrics]
listen = "{free_endpoint().removeprefix("tcp://")}"
""")
    yield cfg, tmp_path / "watch" / "B1", endpoint


def test_daemon_end_to_end_with_kill_and_catch_up(setup: tuple[Path, Path, str],
                                                  tmp_path: Path) -> None:
    cfg, build_dir, endpoint = setup
    log = tmp_path / "daemon.log"
    listener = Listener(endpoint)
    proc = start_daemon(cfg, log)
    try:
        listener.wait_heartbeat()  # slow joiner: connected before the first layer
        build_dir.mkdir(parents=True)

        # 1: written in slow chunks through one open file handle.
        data = encode(layer_image(1), ".png")
        with (build_dir / "layer_00001.png").open("wb") as f:
            for i in range(0, len(data), len(data) // 4 + 1):
                f.write(data[i : i + len(data) // 4 + 1])
                f.flush()
                time.sleep(0.3)
        # 2: written to a hidden temp name, then renamed into place.
        tmp = build_dir / ".layer_00002.png.part"
        tmp.write_bytes(encode(layer_image(2), ".png"))
        tmp.rename(build_dir / "layer_00002.png")
        # 3: corrupt.
        (build_dir / "layer_00003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(500))
        # 4: a 16-bit TIFF.
        (build_dir / "layer_00004.tif").write_bytes(
            encode(layer_image(4, dtype=np.uint16), ".tif"))

        listener.wait(lambda: len(listener.layers()) == 4)
        layers = listener.layers()
        assert {n: [p["status"] for p in ps] for n, ps in layers.items()} == {
            1: ["ok"], 2: ["ok"], 3: ["error"], 4: ["ok"]}
        assert "PNG" in layers[3][0]["error"]
        ok = layers[1][0]
        assert set(ok["classes"]) == {"no_defect", "swelling", "spatter", "misprint",
                                      "over_melting", "under_melting"}
        assert {"area_fraction", "area_mm2", "components", "largest_component_px"} <= set(
            ok["classes"]["spatter"])
        assert len(ok["model_sha256"]) == 64 and ok["latency_ms"] > 0
        seqs = [p["seq"] for t, p in listener.messages if t in ("layer", "alarm")]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

        # The report reads while the daemon writes.
        out = subprocess.run(
            [sys.executable, "-m", "monitor", "report", "B1", "--config", str(cfg),
             "--format", "json"], capture_output=True, text=True, timeout=120, check=True)
        report = json.loads(out.stdout)
        assert [(r["layer"], r["status"]) for r in report["layers"]] == [
            (1, "ok"), (2, "ok"), (3, "error"), (4, "ok")]

        # kill -9, write while it is down, restart: the rescan catches up.
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for n in (5, 6):
            (build_dir / f"layer_{n:05d}.png").write_bytes(encode(layer_image(n), ".png"))
        proc = start_daemon(cfg, log)
        listener.wait(lambda: {5, 6} <= set(listener.layers()))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(60) == 0, log.read_text()
        finally:
            listener.close()

    engine = create_engine(f"sqlite:///{tmp_path / 'state' / 'pbf-monitor.db'}")
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT layer, status, versions FROM layers ORDER BY layer")).fetchall()
    engine.dispose()
    assert [tuple(r) for r in rows] == [
        (1, "ok", 1), (2, "ok", 1), (3, "error", 1), (4, "ok", 1), (5, "ok", 1), (6, "ok", 1)]
    # Every message seq is unique per content: a re-send after a crash repeats its seq.
    by_seq: dict[int, Any] = {}
    for t, p in listener.messages:
        if t == "layer":
            assert by_seq.setdefault(p["seq"], (p["layer"], p["status"])) == (p["layer"],
                                                                               p["status"])
    assert "Traceback" not in log.read_text()


def test_backlog_goes_through_the_model_in_batches(tmp_path: Path) -> None:
    """Layers waiting at start go to the model several at a time (batch_size 4) and are
    stored exactly as one at a time would store them, in order."""

    from monitor.config import load_config
    from monitor.daemon.daemon import Daemon
    from tests.conftest import daemon_toml, make_threshold_weights, wait_for_rows

    weights = make_threshold_weights(tmp_path / "w.safetensors")
    stored = {}
    for batch in (1, 4):
        root = tmp_path / f"b{batch}"
        (root / "watch" / "B1").mkdir(parents=True)
        for n in range(1, 13):
            img = np.full((96, 96), 100, np.uint8)
            img[5 * n % 80:5 * n % 80 + 8, 10:10 + n] = 240
            (root / "watch" / "B1" / f"layer_{n:05d}.png").write_bytes(encode(img, ".png"))
        cfg = load_config(write_config(root / "config.toml", daemon_toml(
            weights, model_extra=f"batch_size = {batch}")))
        daemon = Daemon(cfg)
        daemon.start()
        try:
            rows = wait_for_rows(
                cfg.store_url, "SELECT l.layer, c.pixel_count FROM layers l JOIN class_stats c "
                "ON c.layer_id = l.id WHERE c.class_name = 'swelling' ORDER BY l.id", 12,
                timeout=60)
            assert daemon.metrics is not None
            calls = daemon.metrics.registry.get_sample_value("pbf_monitor_batch_layers_count")
        finally:
            daemon.stop()
        stored[batch] = rows
        assert calls is not None and (calls == 12 if batch == 1 else calls < 12), calls
    assert stored[4] == stored[1]
    assert [r[0] for r in stored[4]] == list(range(1, 13))  # stored in layer order
    assert [r[1] for r in stored[4]] == [8 * n for n in range(1, 13)]
