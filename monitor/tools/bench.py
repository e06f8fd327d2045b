"""`pbf-monitor bench`: inference speed measured side by side in one run, on this machine.

Everything is compared with the same baseline measured in the same run: plain eager fp32
PyTorch, one whole image at a time (eager in cache-sized tiles is shown beside it). The
machine's practical limit is a large fp32 matrix multiply, also measured here; the model's
FLOPs are counted by PyTorch. The end-to-end latency is measured on the real daemon: from the
moment a layer file is closed in the watch folder to the moment a subscriber receives its
`layer` message; then again with `[geometry] nominal` slices for every layer (printed
area and part statistics), the ratio of the two p50s being `geometry_overhead`; then again
publishing over OPC UA and MQTT too (a mosquitto started on a free loopback port; skipped
with the reason when there is none), `sinks_overhead`. The three runs take turns in rounds,
so that the machine's drift falls on all of them alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monitor.config import DEFAULT_TILE_SIZE, Config
from monitor.errors import MonitorError
from monitor.training.synth import BuildGenerator
from monitor.vision.backends import BACKENDS, cpu_threads, installed
from monitor.vision.model import ModelInfo, UNet, load_weights
from monitor.vision.segmenter import Segmenter, resolve_device


@dataclass
class BenchResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """The machine's practical fp32 rate: a large matrix multiply, best of `repeats`."""
    torch.set_num_threads(cpu_threads())
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def model_gflop(info: ModelInfo, size: int) -> float:
    """FLOPs of one forward pass at size x size, as PyTorch counts them (a MAC = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = info.build().eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, info.in_channels, size, size))
    return float(counter.get_total_flops()) / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _median_predict(seg: Segmenter, images: list[np.ndarray]) -> float:
    times = []
    for im in images:
        t0 = time.perf_counter()
        seg.predict(im, probs=False)  # what the daemon asks for
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass(frozen=True)
class _Loaded:
    """A weights file read once; each in-process measurement serves its own copy of the model
    (the torch backend turns its model to channels_last in place)."""

    model: UNet
    info: ModelInfo

    @classmethod
    def read(cls, weights: Path) -> _Loaded:
        return cls(*load_weights(weights))

    def copy(self) -> UNet:
        return copy.deepcopy(self.model)

    def segmenter(self, **options: Any) -> Segmenter:
        return Segmenter.from_model(self.copy(), self.info, device=torch.device("cpu"),
                                    **options)


class _EagerFp32:
    """The baseline backend: eager fp32 PyTorch, default (contiguous) memory format."""

    name = "eager-fp32"

    def __init__(self, model: UNet) -> None:
        self.model = model

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out: np.ndarray = self.model(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        return out


def _eager_fp32(loaded: _Loaded, images: list[np.ndarray], tile: int | None = None) -> float:
    """Eager fp32 PyTorch one image at a time: the whole image in one call (the baseline), or
    cut into tiles of at most `tile` px as serving does."""
    torch.set_num_threads(cpu_threads())
    overlap = 64
    if tile is None:
        tile, overlap = -(-max(max(im.shape) for im in images) // 16) * 16, 0
    seg = loaded.segmenter(tile_size=tile, tile_overlap=overlap)
    seg.backend = _EagerFp32(loaded.copy())
    seg.predict(images[0][:64, :64])
    return _median_predict(seg, images)


def _backend_time(loaded: _Loaded, backend: str, images: list[np.ndarray], tile: int,
                  cache: Path, precision: str = "f32") -> float:
    seg = loaded.segmenter(backend=backend, cache_dir=cache, tile_size=tile,
                           precision=precision)
    seg.predict(images[0])  # warm-up (compilation, allocation)
    return _median_predict(seg, images)


@dataclass
class _Arrivals:
    """The bench's subscriber: when each layer's message arrived, and its inference time."""

    got: dict[int, tuple[float, float]] = field(default_factory=dict)
    beat: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    # waited on, not polled: the daemon has the CPU
    arrived: threading.Condition = field(default_factory=threading.Condition)
    thread: threading.Thread | None = None

    def start(self, endpoint: str) -> None:
        self.thread = threading.Thread(target=self._listen, args=(endpoint,),
                                       name="bench-subscriber", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)

    def _listen(self, endpoint: str) -> None:
        from monitor.daemon.publisher import subscribe

        for topic, msg in subscribe(endpoint, stop=self.stop):
            if topic == "heartbeat":
                self.beat.set()
            elif topic == "layer":
                with self.arrived:
                    self.got[msg["layer"]] = (time.time(), float(msg.get("infer_ms") or 0))
                    self.arrived.notify_all()


def _e2e_config(work: Path, weights: Path, *, geometry: bool,
                sinks: _Sinks | None = None) -> Config:
    from monitor.config import parse_config
    from monitor.tools.demo import free_tcp_endpoint

    data: dict[str, Any] = {
        "watch": {"dir": "watch", "create": True, "settle_s": 0.5, "rescan_interval_s": 0},
        "model": {"weights": str(weights)}, "store": {"state_dir": "state", "maps": True},
        "publish": {"endpoint": free_tcp_endpoint(), "state_endpoint": free_tcp_endpoint(),
                    "heartbeat_interval_s": 0.2, "startup_grace_s": 0},
        "metrics": {"listen": ""}, "alarms": {"stall": {"enabled": False}},
    }
    if geometry:
        data["geometry"] = {"nominal": "nominal/{build}/layer_{layer:05d}.png"}
    if sinks is not None:
        data["opcua"] = {"enabled": True, "endpoint": sinks.opcua}
        data["mqtt"] = {"enabled": True, "url": sinks.mqtt}
    return parse_config(data, base_dir=work)


@dataclass(frozen=True)
class _Sinks:
    """Where the daemon serves OPC UA and publishes MQTT in the sinks run."""

    opcua: str  # opc.tcp://127.0.0.1:PORT/pbf-monitor
    mqtt: str  # mqtt://127.0.0.1:PORT, a running broker

    def check(self, layer: int, timeout: float = 20.0) -> None:
        """After the measurement: a client of each reads the last layer, so the sinks did
        publish what was measured (no client was subscribed while it ran)."""
        opcua, mqtt = _opcua_last_layer(self.opcua, layer, timeout), _mqtt_last_layer(
            self.mqtt, layer, timeout)
        if (opcua, mqtt) != (layer, layer):
            raise MonitorError(f"bench: after layer {layer}, OPC UA shows layer {opcua} and "
                               f"the MQTT retained state layer {mqtt}: a sink did not deliver")


def _opcua_last_layer(endpoint: str, want: int, timeout: float) -> int | None:
    from asyncua import Client, ua

    async def read() -> int | None:
        async with Client(endpoint) as c:
            idx = await c.get_namespace_index("urn:pbf-monitor")
            node = c.get_node(ua.NodeId("PbfMonitor/Printers/default/LastLayer/Number", idx))
            value, deadline = None, time.monotonic() + timeout
            while True:
                with contextlib.suppress(ua.UaStatusCodeError):  # no layer shown yet
                    value = await node.read_value()
                if value == want or time.monotonic() > deadline:
                    return None if value is None else int(value)
                await asyncio.sleep(0.1)

    return asyncio.run(read())


def _mqtt_last_layer(url: str, want: int, timeout: float) -> int | None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    got: list[int] = []
    done = threading.Event()

    def on_message(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        got.append(int(json.loads(msg.payload)["layer"]))
        if got[-1] == want:
            done.set()

    c = paho.Client(CallbackAPIVersion.VERSION2)
    c.on_connect = lambda c, u, f, rc, p: c.subscribe("pbf-monitor/+/state/last_layer", qos=1)
    c.on_message = on_message
    c.connect(host, int(port))
    c.loop_start()
    try:
        done.wait(timeout)
    finally:
        c.disconnect()
        c.loop_stop()
    return got[-1] if got else None


def mosquitto_binary() -> str | None:
    """mosquitto on PATH, or where Debian puts it (/usr/sbin, often not on PATH)."""
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _NoBroker(MonitorError):
    """mosquitto did not start: the sinks run is skipped, with this as the reason."""


@contextlib.contextmanager
def _mosquitto(binary: str) -> Iterator[str]:
    """A mosquitto on a free loopback port, no persistence, for one run: its mqtt:// URL.
    _NoBroker if it does not listen within 10 s."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="pbf-bench-mqtt-") as tmp:
        conf, log = Path(tmp) / "mosquitto.conf", Path(tmp) / "log"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        with log.open("wb") as out:
            proc = subprocess.Popen([binary, "-c", str(conf)], stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 10
            while True:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise _NoBroker(f"{binary} did not listen on port {port}: "
                                    f"{log.read_text(errors='replace')[-500:]!r}")
                time.sleep(0.05)
            yield f"mqtt://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _latencies(cfg: Config, write: Callable[[int], None], layers: int,
               sub: _Arrivals, sinks: _Sinks | None = None) -> tuple[list[float], float]:
    """Layers written one at a time, each once the last one's message came: the sorted
    latencies (ms) and the median inference time (ms). With `sinks`, their clients check
    the last layer reached them."""
    from monitor.daemon.daemon import Daemon

    daemon = Daemon(cfg)
    daemon.start()
    sub.start(cfg.publish.endpoint)
    try:
        sub.beat.wait(10)
        closed: dict[int, float] = {}
        for i in range(layers):
            write(i)
            closed[i + 1] = time.time()
            with sub.arrived:
                sub.arrived.wait_for(functools.partial(sub.got.__contains__, i + 1),
                                     timeout=120)
        got = sub.got
        lat = sorted((got[n][0] - closed[n]) * 1000 for n in closed if n in got)
        infer = statistics.median(got[n][1] for n in closed if n in got)
        if sinks is not None:
            sinks.check(layers)
    finally:
        daemon.stop()
    return lat, infer


def _backlog_rate(cfg: Config, write: Callable[[int], None], layers: int, backlog: int,
                  sub: _Arrivals) -> float:
    """Layers written while the daemon is down, then a start: layers per second."""
    from monitor.daemon.daemon import Daemon

    rate = float("nan")
    for i in range(layers, layers + backlog):
        write(i)
    daemon = Daemon(cfg)
    daemon.start()
    try:
        with sub.arrived:
            sub.arrived.wait_for(lambda: len(sub.got) >= layers + backlog, timeout=600)
        # The steady rate, first message to last: not the start-up (model load, warm-up).
        done = sorted(sub.got[n][0] for n in range(layers + 1, layers + backlog + 1)
                      if n in sub.got)
        if len(done) > 1:
            rate = (len(done) - 1) / (done[-1] - done[0])
    finally:
        daemon.stop()
    return rate


def end_to_end(weights: Path, size: int, layers: int, *, backlog: int = 10,
               geometry: bool = False, mqtt_url: str | None = None) -> dict[str, Any]:
    """Latency from a closed file to a received message on the real daemon, and the rate at
    which it clears a backlog of layers written while it was down (none when backlog is 0).

    With `geometry`, every layer's nominal slice is written before the first image and
    `[geometry] nominal` names them, so the daemon also finds each layer's printed area
    and part statistics.

    With `mqtt_url` (a running broker), the daemon also serves OPC UA on a free loopback
    port and publishes to that broker; no client subscribes while the layers are measured,
    and then one of each must read the last layer (MonitorError if not).
    """
    from monitor.tools.demo import write_layer_file

    gen = BuildGenerator(size=size, layers=layers + backlog, seed=5)
    with tempfile.TemporaryDirectory(prefix="pbf-bench-") as tmp:
        work = Path(tmp)
        sinks = None if mqtt_url is None else _Sinks(
            f"opc.tcp://127.0.0.1:{_free_port()}/pbf-monitor", mqtt_url)
        cfg = _e2e_config(work, weights, geometry=geometry, sinks=sinks)

        if geometry:  # a build's slices exist before it starts, as from the machine's job
            for i in range(layers + backlog):
                write_layer_file(work / "nominal" / "B" / f"layer_{i + 1:05d}.png",
                                 gen.nominal(i))

        def write(i: int) -> None:
            write_layer_file(build / f"layer_{i + 1:05d}.png", gen.layer(i).image)

        build = cfg.watch.dir / "B"
        build.mkdir(parents=True)
        sub = _Arrivals()
        try:
            lat, infer = _latencies(cfg, write, layers, sub, sinks)
            rate = _backlog_rate(cfg, write, layers, backlog, sub) if backlog else float("nan")
        finally:
            sub.close()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))]

    return {"e2e_p50_ms": pct(50), "e2e_p95_ms": pct(95), "e2e_p99_ms": pct(99),
            "infer_ms": infer, "e2e_over_infer": pct(50) / infer if infer else float("nan"),
            "backlog_layers_per_s": rate, "backlog_over_infer_rate": rate * infer / 1000.0,
            "latencies_ms": lat}


# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's size at the fork.
_PEAK_SCRIPT = """
import sys, tempfile
from pathlib import Path
from monitor.config import parse_config
from monitor.vision.imaging import decode
from monitor.vision.segmenter import Segmenter
def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
weights, image = Path(sys.argv[1]), Path(sys.argv[2])
with tempfile.TemporaryDirectory() as state:
    cfg = parse_config({"model": {"weights": str(weights)}, "store": {"state_dir": state}},
                       base_dir=Path(state))
    seg = Segmenter.from_config(cfg)
    seg.warm_up()
    before = hwm()
    seg.predict(decode(image.read_bytes(), max_pixels=10**9), probs=False)
    after = hwm()
print(before, after)
"""


def layer_peak_rss(weights: Path, size: int) -> tuple[float, float]:
    """Peak resident memory (MB) of a fresh process serving one size x size layer as the
    daemon does (default backend, tiling): after loading the model, and after the layer."""
    import subprocess
    import sys

    import cv2

    gen = BuildGenerator(size=min(size, 2048), layers=2, seed=4)
    img = gen.layer(1).image
    if size > img.shape[0]:  # a big layer: the 2048 px rendering, tiled
        reps = -(-size // img.shape[0])
        img = np.tile(img, (reps, reps))[:size, :size]
    with tempfile.TemporaryDirectory(prefix="pbf-bench-mem-") as tmp:
        path = Path(tmp) / "layer.png"
        cv2.imwrite(str(path), img)
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(weights), str(path)],
                             capture_output=True, text=True, check=True)
    before, after = (float(v) for v in out.stdout.split()[-2:])
    return before, after


def _backend_rows(res: BenchResult, loaded: _Loaded, images: list[np.ndarray], *, tile: int,
                  cache: Path, device: torch.device, gflop: float, base: float,
                  progress: Callable[[str], None]) -> tuple[str, float] | None:
    """A row per installed backend (and OpenVINO bf16); returns the default backend's
    (name, seconds per layer)."""
    default = None
    variants = [(b, "f32") for b in BACKENDS if installed(b)]
    if installed("openvino"):
        variants.append(("openvino", "bf16"))
    for backend, precision in variants:
        progress(f"{backend} {precision}")
        t = _backend_time(loaded, backend, images, tile, cache, precision)
        label = f"{backend}" + (" (channels_last)" if backend == "torch" else "") + (
            " bf16" if precision == "bf16" else "")
        res.rows.append({"what": label, "ms": t * 1e3, "speedup": base / t,
                         "gflops": gflop / t})
        if precision == "f32" and backend == _default_backend(device):
            default = (backend, t)
    return default


def _seed_rows(res: BenchResult, info: ModelInfo, images: list[np.ndarray], *, seed_size: int,
               tile: int, cache: Path, device: torch.device,
               progress: Callable[[str], None]) -> None:
    """The seed-width model (64) at `seed_size` px: eager fp32 and the default backend."""
    progress(f"seed-width model (64) at {seed_size} px")
    seed_w = cache / "seed.safetensors"
    from monitor.vision.model import save_weights

    seed_info = ModelInfo(class_names=info.class_names, base_channels=64)
    save_weights(seed_w, seed_info.build(), seed_info)
    seed_imgs = [im[:seed_size, :seed_size] for im in images]
    seed = _Loaded.read(seed_w)
    sb = _eager_fp32(seed, seed_imgs)
    sd = _backend_time(seed, _default_backend(device), seed_imgs, tile, cache)
    sg = model_gflop(seed_info, seed_size)
    res.rows.append({"what": f"seed width 64 eager fp32 @ {seed_size}", "ms": sb * 1e3,
                     "speedup": 1.0, "gflops": sg / sb})
    res.rows.append({"what": f"seed width 64 {_default_backend(device)} @ {seed_size}",
                     "ms": sd * 1e3, "speedup": sb / sd, "gflops": sg / sd})


def sinks_end_to_end(weights: Path, size: int, layers: int) -> dict[str, Any]:
    """End to end with [opcua] and [mqtt] enabled, a mosquitto started for it: the
    `sinks_*` fields, or `sinks_skipped` (the reason) and None where there is no mosquitto
    or it does not start."""
    skipped = {"sinks_e2e_p50_ms": None, "sinks_e2e_p95_ms": None}
    binary = mosquitto_binary()
    if binary is None:
        return {**skipped, "sinks_skipped": "no mosquitto on PATH or in /usr/sbin "
                "(apt-get install mosquitto)"}
    try:
        with _mosquitto(binary) as url:
            run = end_to_end(weights, size, layers, backlog=0, mqtt_url=url)
    except _NoBroker as e:
        return {**skipped, "sinks_skipped": str(e)}
    return {"sinks_e2e_p50_ms": run["e2e_p50_ms"], "sinks_e2e_p95_ms": run["e2e_p95_ms"],
            "sinks_skipped": None, "latencies_ms": run["latencies_ms"]}


def _pct(lat: list[float], p: float) -> float:
    lat = sorted(lat)
    return lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))]


def _end_to_end_runs(weights: Path, size: int, e2e_layers: int, *,
                     progress: Callable[[str], None], rounds: int | None = None
                     ) -> dict[str, Any]:
    """End to end plain, with nominal slices, and publishing over OPC UA and MQTT too, in
    `rounds` interleaved rounds (plain, slices, sinks, plain, ...) so that a drift in the
    machine's speed (another process, the clock) falls on all three alike; the overheads
    are the ratios of their p50s over every round's layers to the plain run's. Default: 3
    rounds, 1 for fewer than 6 layers."""
    rounds = rounds or (3 if e2e_layers >= 6 else 1)
    per = max(2, -(-e2e_layers // rounds))
    plain: list[float] = []
    geo: list[float] = []
    sinks: list[float] = []
    e2e: dict[str, Any] = {}
    skipped: str | None = None
    for r in range(rounds):
        progress(f"end to end, round {r + 1} of {rounds}: {per} layers of {size} px plain, "
                 "with [geometry] nominal slices, with [opcua] and [mqtt]")
        run = end_to_end(weights, size, per, backlog=10 if r == 0 else 0)
        if r == 0:  # the backlog rate and inference time come from the first round
            e2e = {k: v for k, v in run.items() if k != "latencies_ms"}
        plain += run["latencies_ms"]
        geo += end_to_end(weights, size, per, backlog=0, geometry=True)["latencies_ms"]
        if skipped is None:
            got = sinks_end_to_end(weights, size, per)
            skipped = got["sinks_skipped"]
            sinks += got.get("latencies_ms") or []
    p50 = _pct(plain, 50)
    e2e.update({"e2e_layers": len(plain), "e2e_p50_ms": p50, "e2e_p95_ms": _pct(plain, 95),
                "e2e_p99_ms": _pct(plain, 99), "e2e_over_infer": p50 / e2e["infer_ms"],
                "geometry_e2e_p50_ms": _pct(geo, 50), "geometry_e2e_p95_ms": _pct(geo, 95),
                "geometry_overhead": _pct(geo, 50) / p50, "sinks_skipped": skipped,
                "sinks_e2e_p50_ms": _pct(sinks, 50) if sinks else None,
                "sinks_e2e_p95_ms": _pct(sinks, 95) if sinks else None,
                "sinks_overhead": _pct(sinks, 50) / p50 if sinks else None})
    return e2e


def run_bench(weights: Path, *, size: int = 2048, layers: int = 3, e2e_layers: int = 20,
              seed_size: int = 512, memory_size: int = 4096,
              progress: Callable[[str], None] = print) -> BenchResult:
    """Measure everything; see the module docstring."""
    device = resolve_device("auto")
    res = BenchResult()
    gen = BuildGenerator(size=size, layers=layers + 2, seed=3)
    images = [gen.layer(i + 2).image.astype(np.float32) / 255 for i in range(layers)]
    # Read once for every measurement here; the daemon and the fresh process read their own.
    loaded = _Loaded.read(weights)
    info = loaded.info
    tile = DEFAULT_TILE_SIZE
    progress(f"matmul and FLOPs ({cpu_threads()} threads)")
    mm = matmul_gflops()
    gflop = model_gflop(info, size)
    progress(f"baseline: eager fp32 PyTorch on {layers} layers of {size} px")
    base = _eager_fp32(loaded, images)
    # Eager PyTorch is faster in cache-sized tiles (its activations stay in cache): shown
    # beside the baseline so the gain from tiling and the gain from the engine are apart.
    progress("eager fp32 PyTorch in 1024 px tiles")
    base_tiled = _eager_fp32(loaded, images, 1024)
    with tempfile.TemporaryDirectory(prefix="pbf-bench-cache-") as cache:
        res.rows.append({"what": f"eager fp32 (width {info.base_channels}), whole image",
                         "ms": base * 1e3, "speedup": 1.0, "gflops": gflop / base})
        res.rows.append({"what": "eager fp32, 1024 px tiles", "ms": base_tiled * 1e3,
                         "speedup": base / base_tiled, "gflops": gflop / base_tiled})
        default = _backend_rows(res, loaded, images, tile=tile, cache=Path(cache),
                                device=device, gflop=gflop, base=base, progress=progress)
        if seed_size and device.type == "cpu":
            _seed_rows(res, info, images, seed_size=seed_size, tile=tile, cache=Path(cache),
                       device=device, progress=progress)
    e2e = _end_to_end_runs(weights, size, e2e_layers, progress=progress)
    if memory_size:
        progress(f"peak memory of a fresh process serving one {memory_size} px layer")
        loaded_mb, layer_mb = layer_peak_rss(weights, memory_size)
    mm = max(mm, matmul_gflops())  # again at the end: the best the machine showed
    assert default is not None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res.summary = {
        "device": str(device), "threads": cpu_threads(), "size": size,
        "width": info.base_channels, "default_backend": default[0],
        "eager_fp32_ms": base * 1e3, "default_ms": default[1] * 1e3,
        "speedup_vs_eager": base / default[1], "model_gflop": gflop,
        "eager_fp32_tiled_ms": base_tiled * 1e3, "speedup_vs_eager_tiled": base_tiled / default[1],
        "matmul_gflops": mm, "achieved_gflops": gflop / default[1],
        "fraction_of_matmul": gflop / default[1] / mm, **e2e, "peak_rss_mb": peak,
    }
    if memory_size:
        res.summary.update({"memory_size": memory_size, "model_loaded_rss_mb": loaded_mb,
                            "layer_peak_rss_mb": layer_mb})
    return res


def _default_backend(device: torch.device) -> str:
    from monitor.vision.backends import choose

    return choose("auto", device)
