"""Shared fixtures: a tiny real U-Net, temp folders, config files, and a thread-leak check."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from monitor.vision.classes import DEFAULT_CLASS_NAMES
from monitor.vision.model import ModelInfo, save_weights

# Where tests may never write: the real home folder, as it was when the session started.
_REAL_HOME = Path(os.environ.get("HOME") or Path.home())
_WATCHED = (".local/state/pbf-monitor", "intel", ".cache/pbf-monitor", ".streamlit")
_HOME_BEFORE: set[str] = set()


def _home_snapshot() -> set[str]:
    found = {p.name for p in _REAL_HOME.iterdir()} if _REAL_HOME.is_dir() else set()
    for rel in _WATCHED:
        top = _REAL_HOME / rel
        if top.is_dir():
            found |= {str(p.relative_to(_REAL_HOME)) for p in top.rglob("*")}
    return found


def pytest_configure(config: pytest.Config) -> None:
    """Before collection (a module-level default path is computed at import): every test,
    and every process a test starts, gets a home, state and cache folder of the session's
    own, so the ONNX export cache, OpenVINO's files, Streamlit's and matplotlib's caches
    never land in the real home folder."""
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="pbf-monitor-test-home-"))
    _HOME_BEFORE.update(_home_snapshot())
    os.environ["HOME"] = str(home)
    for var, sub in (("XDG_STATE_HOME", ".local/state"), ("XDG_CACHE_HOME", ".cache"),
                     ("XDG_CONFIG_HOME", ".config"), ("XDG_DATA_HOME", ".local/share")):
        os.environ[var] = str(home / sub)
    os.environ.pop("STATE_DIRECTORY", None)  # systemd's, if run under a unit


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """New files in the real home folder fail the run under PBF_TEST_STRICT_HOME=1 (CI, a
    machine of its own); elsewhere another user's processes may write there too, so they
    are only reported."""
    import shutil
    import sys

    new = sorted(_home_snapshot() - _HOME_BEFORE)
    shutil.rmtree(os.environ["HOME"], ignore_errors=True)
    if not new:
        return
    message = f"files appeared in the real home folder {_REAL_HOME} during the tests: {new[:20]}"
    if os.environ.get("PBF_TEST_STRICT_HOME") == "1":
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nERROR: {message}", file=sys.stderr)
    else:
        print(f"\nWARNING: {message}", file=sys.stderr)


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """Fail a test that leaves threads running (observers, writers, publishers)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while True:
        # Our threads all have names. Two pools live as long as the process: OpenVINO's own
        # ("ThreadPoolExecutor-*") and the one that labels classes in parallel ("stats_*").
        extra = [t for t in set(threading.enumerate()) - before
                 if t.is_alive() and not t.name.startswith(("ThreadPoolExecutor-", "stats_"))]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not extra, f"threads left running: {[t.name for t in extra]}"


def make_weights(path: Path, *, width: int = 4, seed: int = 0,
                 classes: tuple[str, ...] = DEFAULT_CLASS_NAMES,
                 constant_prob: dict[int, float] | None = None, norm: str = "global") -> Path:
    """A real, tiny U-Net saved as safetensors (input normalisation `norm`).

    constant_prob: channel -> probability the model outputs everywhere (the final conv's
    weights zeroed and its bias set), for tests that need known masks.
    """
    torch.manual_seed(seed)
    info = ModelInfo(class_names=classes, base_channels=width, training={"test": True},
                     norm=norm)
    model = info.build()
    if constant_prob is not None:
        with torch.no_grad():
            model.outc.weight.zero_()
            model.outc.bias.fill_(-20.0)
            for ch, p in constant_prob.items():
                model.outc.bias[ch] = float(np.log(p / (1 - p)))
    save_weights(path, model, info)
    return path


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out by itself (for bind to 0 and for connects)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORTS = np.random.default_rng(os.getpid()).permutation(
    np.arange(10000, max(10001, _ephemeral_low()))).tolist()


def free_port() -> int:
    """A loopback port nothing listens on, for a daemon to bind later. Taken below the
    kernel's ephemeral range and never twice: a port from bind(0) is freed before the
    daemon binds it, and any outgoing connection (a test's own subscriber) could take it in
    between (seen once in CI: "Address already in use")."""
    while _PORTS:
        port = int(_PORTS.pop())
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def free_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def layer_image(seed: int = 0, size: int = 96, dtype: type = np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(0.45, 0.1, (size, size)).clip(0, 1)
    img[size // 4 : size // 2, size // 4 : size // 2] = 0.8  # a "part"
    scale = 255 if dtype == np.uint8 else 65535
    return (img * scale).astype(dtype)


def encode(img: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def daemon_toml(weights: Path, *, settle_s: float = 0.3, rescan_interval_s: float = 60.0,
                metrics: str = "", extra: str = "", grace_s: float = 0.0,
                model_extra: str = "") -> str:
    """A daemon config: watch/ and state/ folders beside it, the model on the CPU, loopback
    endpoints of its own, metrics on `metrics` ("" = off), then `extra` sections."""
    return f"""
[watch]
dir = "watch"
create = true
settle_s = {settle_s}
rescan_interval_s = {rescan_interval_s}
[model]
weights = "{weights}"
device = "cpu"
{model_extra}
[store]
state_dir = "state"
[publish]
endpoint = "{free_endpoint()}"
state_endpoint = "{free_endpoint()}"
startup_grace_s = {grace_s}
[metrics]
listen = "{metrics}"
{extra}"""


def wait_for_rows(url: str, sql: str, count: int, *, timeout: float = 120.0,
                  proc: subprocess.Popen[bytes] | None = None,
                  log: Path | None = None) -> list[Any]:
    """Poll a daemon's database until `sql` returns at least `count` rows. The SQLite file
    and the schema may not be there yet; `proc`, if given, must stay alive meanwhile (the
    tail of its `log` is the failure message)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    def why() -> str:
        return log.read_text()[-3000:] if log is not None else f"{count} rows of {sql!r}"

    deadline = time.monotonic() + timeout
    sqlite_file = Path(url.split("///", 1)[1]) if url.startswith("sqlite") else None
    while True:
        assert proc is None or proc.poll() is None, why()
        rows: list[Any] = []
        if sqlite_file is None or sqlite_file.exists():
            engine = create_engine(url)
            try:
                with engine.connect() as conn:
                    rows = list(conn.execute(text(sql)))
            except OperationalError:  # no schema yet
                pass
            finally:
                engine.dispose()
        if len(rows) >= count:
            return rows
        assert time.monotonic() < deadline, why()
        time.sleep(0.1)


def write_config(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    return path


def make_threshold_weights(path: Path, *, channel: int = 1, level: float = 0.75,
                           classes: tuple[str, ...] = DEFAULT_CLASS_NAMES) -> Path:
    """A real U-Net, set by hand, that marks class `channel` where the gray level is above
    `level` (and nothing else): defects are drawn as bright shapes at known places.

    One feature channel carries the normalised input through the first level and the top
    skip connection to the output; every other weight is zero.
    """
    info = ModelInfo(class_names=classes, base_channels=4, training={"test": "threshold"})
    model = info.build()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):  # identity in eval mode
                m.weight.fill_(1.0)
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
        # (x - mean) / std with mean 0.5, std 0.25: gray g -> 4 g - 2; shift so the ReLUs keep
        # only the part above `level`: feature = relu(4 (g - level)).
        first, second = model.inc[0], model.inc[3]
        first.weight[0, 0, 1, 1] = 1.0
        model.inc[1].bias[0] = -(4 * level - 2)  # BatchNorm bias after the first conv
        second.weight[0, 0, 1, 1] = 1.0
        last = model.ups[-1].conv  # input: cat([skip (4 ch), upsampled (4 ch)])
        last[0].weight[0, 0, 1, 1] = 1.0
        last[3].weight[0, 0, 1, 1] = 1.0
        model.outc.bias.fill_(-20.0)
        model.outc.weight[channel, 0, 0, 0] = 400.0
        model.outc.bias[channel] = -10.0
    model.eval()
    save_weights(path, model, info)
    return path
