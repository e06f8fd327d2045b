"""kill -9 at random moments while a 60-layer build arrives: after restarts, every layer is
stored exactly once, with the statistics an undisturbed run gives."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, text

from tests.conftest import daemon_toml, encode, make_threshold_weights, write_config

LAYERS = 60


def _config(root: Path, weights: Path) -> Path:
    # Rescans every second: a file written while the daemon was dead is found on restart.
    return write_config(root / "config.toml", daemon_toml(
        weights, settle_s=0.2, rescan_interval_s=1,
        extra="[alarms]\ngrace_layers = 0\n[alarms.stall]\nenabled = false\n"))


def _layer(n: int) -> bytes:
    rng = np.random.default_rng(n)
    img = np.full((96, 96), 100, np.uint8)
    for _ in range(int(rng.integers(0, 4))):
        x, y = (int(v) for v in rng.integers(0, 80, 2))
        img[y:y + 10, x:x + 12] = 240
    return encode(img, ".png")


def _stored(root: Path) -> dict[int, tuple[str, int]]:
    engine = create_engine(f"sqlite:///{root / 'state' / 'pbf-monitor.db'}")
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT l.layer, l.status, c.pixel_count, "
            "(SELECT count(*) FROM layers l2 WHERE l2.layer = l.layer) "
            "FROM layers l JOIN class_stats c ON c.layer_id = l.id "
            "WHERE c.class_name = 'swelling'")).all()
    engine.dispose()
    assert all(r[3] == 1 for r in rows), "a layer stored twice"
    return {r[0]: (r[1], r[2]) for r in rows}


def _run(root: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config",
                             str(root / "config.toml")], stdout=subprocess.DEVNULL,
                            stderr=log.open("ab"))


def _wait_all(root: Path, proc: subprocess.Popen[bytes], log: Path) -> dict[int, tuple[str, int]]:
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        if (root / "state" / "pbf-monitor.db").exists():
            try:
                got = _stored(root)
            except Exception:  # the schema may not be there yet
                got = {}
            if len(got) == LAYERS:
                return got
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def test_kill9_at_random_moments(tmp_path: Path) -> None:
    weights = make_threshold_weights(tmp_path / "w.safetensors")
    calm, chaos = tmp_path / "calm", tmp_path / "chaos"
    for root in (calm, chaos):
        (root / "watch" / "B1").mkdir(parents=True)
        _config(root, weights)

    # Undisturbed: the reference statistics.
    for n in range(1, LAYERS + 1):
        (calm / "watch" / "B1" / f"layer_{n:05d}.png").write_bytes(_layer(n))
    proc = _run(calm, tmp_path / "calm.log")
    try:
        want = _wait_all(calm, proc, tmp_path / "calm.log")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    # Layers arrive while the daemon is killed at random moments and restarted.
    rnd = random.Random(1234)
    log = tmp_path / "chaos.log"
    proc = _run(chaos, log)
    kills = 0
    try:
        for n in range(1, LAYERS + 1):
            (chaos / "watch" / "B1" / f"layer_{n:05d}.png").write_bytes(_layer(n))
            time.sleep(rnd.uniform(0.0, 0.08))
            if n % 12 == 0:  # mid-stream: decode, inference, the write or the publish
                time.sleep(rnd.uniform(0.0, 0.5))
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
                kills += 1
                proc = _run(chaos, log)
        got = _wait_all(chaos, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert kills == 5
    assert got == want
