"""Inference backends: eager PyTorch, ONNX Runtime and OpenVINO behind one call.

Every backend takes a normalised (N, 1, H, W) float32 batch and returns (N, C, H, W) float32
logits. On a CPU, OpenVINO and ONNX Runtime run the same network several times faster than
eager PyTorch; on a GPU, PyTorch with autocast is used. The ONNX export is made once per
weights file and cached under its sha256, so a new model is exported on its first start
and an unchanged one never again.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from monitor.errors import ConfigError
from monitor.vision.model import ModelInfo, UNet

log = logging.getLogger(__name__)

BACKENDS = ("torch", "openvino", "onnxruntime")


class Backend(Protocol):
    name: str

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


def installed(name: str) -> bool:
    return name == "torch" or importlib.util.find_spec(name) is not None


def choose(name: str, device: torch.device) -> str:
    """'auto' -> the fastest backend installed for the device."""
    if name != "auto":
        if not installed(name):
            raise ConfigError(f"model.backend = {name!r} but {name} is not installed "
                              f"(pip install {name}, or use 'auto')")
        if name != "torch" and device.type == "cuda":
            raise ConfigError(f"model.backend = {name!r} runs on the CPU; with model.device "
                              f"'cuda' use 'torch' or 'auto'")
        return name
    if device.type == "cuda":
        return "torch"
    return next((b for b in ("openvino", "onnxruntime") if installed(b)), "torch")


def cpu_threads() -> int:
    """All the cores this process may use (a container or systemd may allow fewer)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class TorchBackend:
    """Eager PyTorch: channels_last, and autocast (bf16 or fp16) on CUDA."""

    name = "torch"

    def __init__(self, model: UNet, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.amp_dtype = (torch.bfloat16 if self.cuda and torch.cuda.is_bf16_supported()
                          else torch.float16)
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        self.model = model.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        t = t.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.cuda:
                with torch.autocast("cuda", dtype=self.amp_dtype):
                    out = self.model(t)
            else:
                out = self.model(t)
        result: np.ndarray = out.float().cpu().numpy()
        return result


KEEP_EXPORTS = 8  # ONNX exports kept in the cache folder, newest first


def export_onnx(model: UNet, info: ModelInfo, cache_dir: Path) -> Path:
    """The model as ONNX (dynamic batch and size), cached by the weights' sha256."""
    key = info.sha256 or "unhashed"
    path = cache_dir / f"{key}.onnx"
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    cpu = model.to("cpu").eval()
    dummy = torch.zeros(1, info.in_channels, 64, 64)
    dyn = {0: "n", 2: "h", 3: "w"}
    # The TorchScript exporter: the newer one needs onnxscript and gives the same graph here.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(cpu, (dummy,), str(tmp), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": dyn, "logits": dyn}, opset_version=17,
                          dynamo=False)
    tmp.replace(path)  # atomic: a concurrent start never reads half a file
    log.info("exported the model to %s", path)
    _prune(cache_dir, keep=KEEP_EXPORTS)
    return path


def _prune(cache_dir: Path, *, keep: int) -> None:
    """Delete all but the `keep` newest exports: each weights file gets its own (every
    `adapt` candidate, every evaluated file), and nothing else would ever remove them. A
    running backend has read its file already; an old model started again is exported
    again."""
    def age(p: Path) -> int:
        try:
            return p.stat().st_mtime_ns
        except OSError:
            return 0

    for old in sorted(cache_dir.glob("*.onnx"), key=age, reverse=True)[keep:]:
        # another process pruned it, or a read-only folder: harmless
        with contextlib.suppress(OSError):
            old.unlink()


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, onnx_path: Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cpu_threads()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), opts,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.session.run(None, {"x": np.ascontiguousarray(x)})[0]
        return out


def import_openvino() -> Any:
    """The openvino module, with its telemetry off.

    OpenVINO sends usage data to Google Analytics unless the user opted out, and keeps a
    client id and counters in ~/intel (openvino_ga_cid, stats) on a plain read_model. Its
    telemetry package is optional (openvino falls back to a stub that sends and writes
    nothing when it cannot be imported), so it is hidden from this process before openvino
    is first imported: nothing is changed on the machine, and no opt-out file is written.
    """
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
    elif sys.modules["openvino_telemetry"] is not None:
        log.warning("openvino_telemetry was imported before pbf-monitor could turn it off")
    import openvino as ov

    return ov


class OpenVinoBackend:
    name = "openvino"

    def __init__(self, onnx_path: Path, *, precision: str = "f32") -> None:
        ov = import_openvino()

        core = ov.Core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY",
                                  "INFERENCE_PRECISION_HINT": precision}
        self.compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.compiled(np.ascontiguousarray(x))[0]
        return out


def make_backend(name: str, model: UNet, info: ModelInfo, device: torch.device, *,
                 cache_dir: Path | None, precision: str = "f32") -> Backend:
    """The backend `name` ('auto' chooses) for this model on this device."""
    chosen = choose(name, device)
    if chosen == "torch":
        torch.set_num_threads(cpu_threads())
        return TorchBackend(model, device)
    if cache_dir is None:
        raise ConfigError(f"model.backend {chosen!r} needs a cache folder for its export")
    onnx_path = export_onnx(model, info, cache_dir)
    if chosen == "onnxruntime":
        return OnnxRuntimeBackend(onnx_path)
    return OpenVinoBackend(onnx_path, precision=precision)
