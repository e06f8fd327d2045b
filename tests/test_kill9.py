"""kill -9 while a build arrives, at random moments and at each stage of a layer's life
(monitor.daemon.failpoints): after restarts, every layer is stored exactly once with the statistics
an undisturbed run gives, and has exactly one message (re-sent, if at all, with its seq)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from monitor.config import load_config
from monitor.daemon.failpoints import POINTS
from tests.conftest import (
    daemon_toml,
    encode,
    make_threshold_weights,
    wait_for_rows,
    write_config,
)
from tests.test_daemon_e2e import Listener

LAYERS = 60
Stored = dict[int, tuple[str, int]]


def _config(root: Path, weights: Path, grace_s: float = 0.0) -> Path:
    # Rescans every second: a file written while the daemon was dead is found on restart.
    (root / "watch" / "B1").mkdir(parents=True)
    return write_config(root / "config.toml", daemon_toml(
        weights, settle_s=0.2, rescan_interval_s=1, grace_s=grace_s,
        extra="[alarms]\ngrace_layers = 0\n[alarms.stall]\nenabled = false\n"))


def _layer(n: int) -> bytes:
    rng = np.random.default_rng(n)
    img = np.full((96, 96), 100, np.uint8)
    for _ in range(int(rng.integers(0, 4))):
        x, y = (int(v) for v in rng.integers(0, 80, 2))
        img[y:y + 10, x:x + 12] = 240
    return encode(img, ".png")


def _write(root: Path, n: int) -> None:
    (root / "watch" / "B1" / f"layer_{n:05d}.png").write_bytes(_layer(n))


def _stored(root: Path) -> Stored:
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


def _run(root: Path, log: Path, failpoint: str = "") -> subprocess.Popen[bytes]:
    env = {**os.environ, "PBF_MONITOR_FAILPOINT": failpoint}
    return subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config",
                             str(root / "config.toml")], stdout=subprocess.DEVNULL,
                            stderr=log.open("ab"), env=env)


def _stopped(proc: subprocess.Popen[bytes]) -> bool:
    """True once the process froze itself at its failpoint (state T in /proc)."""
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def _wait_all(root: Path, proc: subprocess.Popen[bytes], log: Path,
              layers: int = LAYERS) -> Stored:
    wait_for_rows(f"sqlite:///{root / 'state' / 'pbf-monitor.db'}", "SELECT layer FROM layers",
                  layers, timeout=180, proc=proc, log=log)
    return _stored(root)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_threshold_weights(tmp_path_factory.mktemp("w") / "w.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> Stored:
    """The statistics of an undisturbed run over the whole build."""
    calm = tmp_path_factory.mktemp("calm")
    _config(calm, weights)
    for n in range(1, LAYERS + 1):
        _write(calm, n)
    proc = _run(calm, calm / "log")
    try:
        return _wait_all(calm, proc, calm / "log")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_kill9_at_random_moments(tmp_path: Path, weights: Path, reference: Stored) -> None:
    chaos = tmp_path / "chaos"
    _config(chaos, weights)
    # Layers arrive while the daemon is killed at random moments and restarted.
    rnd = random.Random(1234)
    log = tmp_path / "chaos.log"
    proc = _run(chaos, log)
    kills = 0
    try:
        for n in range(1, LAYERS + 1):
            _write(chaos, n)
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
    assert got == reference


def test_kill9_at_each_stage(tmp_path: Path, weights: Path, reference: Stored) -> None:
    """One SIGKILL at each named moment of a layer's life (the first time after each start):
    bytes read, before the model, inside the open transaction, committed but not published,
    on the wire but not marked sent."""
    root = tmp_path / "stages"
    cfg = _config(root, weights, grace_s=1.0)  # lets the subscriber reconnect after restarts
    listener = Listener(load_config(cfg).publish.endpoint)
    log = tmp_path / "stages.log"
    per = 6
    total = per * len(POINTS)
    proc = None
    try:
        for i, point in enumerate(POINTS):
            for n in range(i * per + 1, (i + 1) * per + 1):
                _write(root, n)
            proc = _run(root, log, failpoint=f"{point}@1")
            deadline = time.monotonic() + 120
            while not _stopped(proc):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"never reached {point}"
                time.sleep(0.02)
            proc.kill()
            proc.wait(10)
        proc = _run(root, log)
        got = _wait_all(root, proc, log, layers=total)
        listener.wait(lambda: set(listener.layers()) >= set(range(1, total + 1)), timeout=60)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        listener.close()
    assert got == {n: reference[n] for n in range(1, total + 1)}
    # One message per layer: a message re-sent after a kill carries its original seq.
    seqs = {n: {m["seq"] for m in msgs} for n, msgs in listener.layers().items()}
    assert all(len(s) == 1 for s in seqs.values()), seqs
    engine = create_engine(f"sqlite:///{root / 'state' / 'pbf-monitor.db'}")
    with engine.connect() as conn:
        outbox = conn.execute(text("SELECT count(*), sum(published) FROM outbox "
                                   "WHERE topic = 'layer'")).one()
    engine.dispose()
    assert tuple(outbox) == (total, total)  # every layer message committed once, all sent
