"""`pbf-monitor soak`: many small layers through the real daemon, to show that its memory and
open files stay flat over a long run and that no layer is lost on the way.

The daemon runs as its own process (`pbf-monitor run`), so its resident memory and file
descriptors are read from /proc without the soak's own allocations mixed in. Layers are
written like a camera writes them, a few ahead of the daemon, with the default alarm rules,
defect maps and periodic rescans on: the daemon's whole path, not only inference.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from monitor.daemon.publisher import subscribe
from monitor.errors import MonitorError
from monitor.store.connect import open_db
from monitor.store.schema import Layer
from monitor.tools.demo import free_tcp_endpoint, write_layer_file
from monitor.training.synth import BuildGenerator

DISTINCT_LAYERS = 100  # rendered once and cycled: the soak measures the daemon, not synth


@dataclass
class Sample:
    layer: int
    rss_mb: float
    fds: int


@dataclass
class SoakResult:
    layers: int
    warmup: int
    seconds: float = 0.0
    received: int = 0
    errors: int = 0
    stored: int = 0
    stored_once: bool = False
    samples: list[Sample] = field(default_factory=list)

    @property
    def after_warmup(self) -> list[Sample]:
        return [s for s in self.samples if s.layer >= self.warmup]

    def _growth(self, value: Callable[[Sample], float]) -> float:
        """Median of the last three samples minus that of the first three after warm-up:
        steady growth shows; one allocator hiccup, or a file open for a moment (a rescan
        walking the folder), does not."""
        s = self.after_warmup
        if len(s) < 2:
            return float("nan")
        k = min(3, len(s) // 2)
        return statistics.median(map(value, s[-k:])) - statistics.median(map(value, s[:k]))

    @property
    def rss_growth_mb(self) -> float:
        return self._growth(lambda x: x.rss_mb)

    @property
    def fd_growth(self) -> float:
        return self._growth(lambda x: x.fds)

    @property
    def fd_range(self) -> tuple[int, int]:
        fds = [x.fds for x in self.after_warmup] or [0]
        return min(fds), max(fds)

    def failures(self, max_growth_mb: float) -> list[str]:
        out = []
        if self.received != self.layers or self.stored != self.layers or not self.stored_once:
            out.append(f"layers: {self.layers} written, {self.received} messages, "
                       f"{self.stored} stored{'' if self.stored_once else ', some twice'}")
        if self.errors:
            out.append(f"{self.errors} layer(s) with status error")
        if not self.rss_growth_mb < max_growth_mb:
            out.append(f"memory grew {self.rss_growth_mb:.1f} MB after warm-up "
                       f"(limit {max_growth_mb:g})")
        if not self.fd_growth <= 0:
            lo, hi = self.fd_range
            out.append(f"open files grew by {self.fd_growth:g} after warm-up ({lo}..{hi})")
        return out

    def summary(self, max_growth_mb: float) -> dict[str, Any]:
        lo, hi = self.fd_range
        s = self.after_warmup
        return {
            "layers": self.layers, "warmup": self.warmup, "seconds": round(self.seconds, 1),
            "layers_per_s": round(self.layers / self.seconds, 2) if self.seconds else None,
            "received": self.received, "stored": self.stored, "errors": self.errors,
            "rss_after_warmup_mb": round(s[0].rss_mb, 1) if s else None,
            "rss_end_mb": round(s[-1].rss_mb, 1) if s else None,
            "rss_growth_mb": round(self.rss_growth_mb, 1), "fds_min": lo, "fds_max": hi,
            "fd_growth": self.fd_growth,
            "passed": not self.failures(max_growth_mb),
        }


def _proc_sample(pid: int, layer: int) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines()
                  if line.startswith("VmRSS:"))
    return Sample(layer, rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd")))


def _config(work: Path, weights: Path | None, endpoint: str) -> Path:
    model = f"weights = {json.dumps(str(weights))}\n" if weights else ""
    path = work / "config.toml"
    path.write_text(f"""
[watch]
dir = "watch"
create = true
settle_s = 0.2
rescan_interval_s = 10
[model]
device = "cpu"
{model}
[store]
state_dir = "state"
[publish]
endpoint = "{endpoint}"
state_endpoint = "{free_tcp_endpoint()}"
heartbeat_interval_s = 1.0
startup_grace_s = 0
[alarms.stall]
enabled = false
[metrics]
listen = ""
""", encoding="utf-8")
    return path


def run_soak(*, layers: int = 2000, size: int = 128, warmup: int = 200, every: int = 50,
             weights: Path | None = None, ahead: int = 4,
             progress: Callable[[SoakResult], None] | None = None) -> SoakResult:
    """Feed `layers` layers of `size` px to a daemon process, at most `ahead` unanswered,
    sampling its memory and open files every `every` layers."""
    if not 0 <= warmup < layers:
        raise MonitorError(f"soak: warm-up ({warmup}) must be less than the layers ({layers})")
    res = SoakResult(layers=layers, warmup=warmup)
    gen = BuildGenerator(size=size, layers=DISTINCT_LAYERS, seed=11)
    images = [gen.layer(i).image for i in range(min(layers, DISTINCT_LAYERS))]
    with tempfile.TemporaryDirectory(prefix="pbf-soak-") as tmp:
        work = Path(tmp)
        endpoint = free_tcp_endpoint()
        config = _config(work, weights, endpoint)
        build = work / "watch" / "soak"
        build.mkdir(parents=True)
        seen: dict[int, str] = {}
        beat, stop = threading.Event(), threading.Event()

        def listen() -> None:
            for topic, msg in subscribe(endpoint, stop=stop):
                if topic == "heartbeat":
                    beat.set()
                elif topic == "layer":
                    seen[msg["layer"]] = msg["status"]

        listener = threading.Thread(target=listen, name="soak-subscriber", daemon=True)
        listener.start()
        log = (work / "daemon.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config",
                                 str(config)], stdout=subprocess.DEVNULL, stderr=log)
        try:
            if not beat.wait(120):
                raise MonitorError(f"soak: the daemon did not start: "
                                   f"{(work / 'daemon.log').read_text()[-500:]}")
            t0 = time.perf_counter()
            next_sample = every
            for n in range(1, layers + 1):
                deadline = time.monotonic() + 120
                while len(seen) < n - ahead:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise MonitorError(f"soak: the daemon stopped answering at layer {n}: "
                                           f"{(work / 'daemon.log').read_text()[-500:]}")
                    time.sleep(0.002)
                write_layer_file(build / f"layer_{n:06d}.png", images[(n - 1) % len(images)])
                if len(seen) >= next_sample:
                    res.samples.append(_proc_sample(proc.pid, len(seen)))
                    next_sample += every
                    if progress:
                        progress(res)
            deadline = time.monotonic() + 300
            while len(seen) < layers and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.01)
            res.seconds = time.perf_counter() - t0
            res.samples.append(_proc_sample(proc.pid, len(seen)))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            stop.set()
            listener.join(5)
            log.close()
        res.received = len(seen)
        res.errors = sum(1 for s in seen.values() if s != "ok")
        engine = open_db(f"sqlite:///{work / 'state' / 'pbf-monitor.db'}", writer=False)
        try:
            with Session(engine) as s:
                res.stored = s.scalar(select(func.count()).select_from(Layer)) or 0
                distinct = s.scalar(select(func.count(func.distinct(Layer.layer)))) or 0
        finally:
            engine.dispose()
        res.stored_once = distinct == res.stored
    return res
