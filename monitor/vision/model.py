"""The U-Net and its self-describing safetensors weights.

A weights file carries, in its safetensors metadata, everything needed to rebuild and use the
model: architecture, class names, input normalisation and how it was trained. Loading never
unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import nn

from monitor.errors import WeightsError
from monitor.vision.imaging import FLAT_NORMS

FORMAT = "pbf-monitor-unet/1"
NORM_METHODS = ("global", *FLAT_NORMS)
DEPTH = 4  # down-sampling steps: inputs are padded to a multiple of 2**DEPTH


class DoubleConv(nn.Sequential):
    """(Conv 3x3 without bias -> BatchNorm -> ReLU) x 2"""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Transposed-conv upscaling, concatenation of the skip, then DoubleConv"""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = DoubleConv(cin, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))  # type: ignore[no-any-return]


class UNet(nn.Module):
    """The seed's plain U-Net: 4 levels, logits out (one channel per class, multi-label)."""

    def __init__(
        self, in_channels: int = 1, out_channels: int = 6, base_channels: int = 64
    ) -> None:
        super().__init__()
        w = [base_channels * 2**i for i in range(DEPTH + 1)]  # 64 128 256 512 1024
        self.inc = DoubleConv(in_channels, w[0])
        self.downs = nn.ModuleList(DoubleConv(w[i], w[i + 1]) for i in range(DEPTH))
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(Up(w[i + 1], w[i]) for i in reversed(range(DEPTH)))
        self.outc = nn.Conv2d(w[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, in, H, W) with H, W multiples of 16 -> (N, out, H, W) logits
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(self.pool(skips[-1])))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.outc(y)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ModelInfo:
    """What a weights file says about its model."""

    class_names: tuple[str, ...]
    base_channels: int
    in_channels: int = 1
    mean: float = 0.5  # input normalisation on the [0, 1] scale
    std: float = 0.25
    # "global": (x - mean) / std; "flat", "flat-soft": flat-field normalised, bright and
    # dark extremes clipped or compressed (monitor.vision.imaging).
    norm: str = "global"
    training: dict[str, Any] = field(default_factory=dict)
    # Per-class probability thresholds calibrated on validation data; config overrides them.
    thresholds: dict[str, float] = field(default_factory=dict)
    sha256: str = ""  # of the file it was loaded from
    # Cameras ([camera] id) the weights were adapted to: only there are their defect classes
    # trusted enough for critical alarms and the hook (see monitor.alarms.trust).
    adapted_cameras: tuple[str, ...] = ()

    @property
    def out_channels(self) -> int:
        return len(self.class_names)

    def build(self) -> UNet:
        return UNet(self.in_channels, self.out_channels, self.base_channels)


def file_signature(path: Path) -> tuple[int, int, int]:
    """(inode, size, mtime) of a file: changes when it is replaced or rewritten."""
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(path: Path, model: UNet, info: ModelInfo) -> str:
    """Write model weights and metadata atomically; returns the file's sha256."""
    meta = {
        "format": FORMAT,
        "class_names": json.dumps(list(info.class_names)),
        "base_channels": str(info.base_channels),
        "in_channels": str(info.in_channels),
        "normalization": json.dumps({"mean": info.mean, "std": info.std,
                                     "method": info.norm}),
        "training": json.dumps(info.training),
        "thresholds": json.dumps(info.thresholds),
        "adapted_cameras": json.dumps(list(info.adapted_cameras)),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.chmod(0o644)  # a service user must be able to read shipped weights
    tmp.replace(path)
    return file_sha256(path)


def read_info(path: Path) -> ModelInfo:
    """Read only the metadata of a weights file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta: dict[str, str] = f.metadata() or {}
    except FileNotFoundError as e:
        raise WeightsError(f"{path}: weights file not found") from e
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from e
    return _info(path, meta)


def _info(path: Path, meta: dict[str, str]) -> ModelInfo:
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path}: metadata 'format' is {meta.get('format')!r}, "
                           f"expected {FORMAT!r}")
    try:
        norm = json.loads(meta["normalization"])
        return ModelInfo(
            class_names=tuple(json.loads(meta["class_names"])),
            base_channels=int(meta["base_channels"]),
            in_channels=int(meta.get("in_channels", "1")),
            mean=float(norm["mean"]),
            std=float(norm["std"]),
            norm=_norm_method(str(norm.get("method", "global"))),
            training=json.loads(meta.get("training", "{}")),
            thresholds={str(k): float(v)
                        for k, v in json.loads(meta.get("thresholds", "{}")).items()},
            adapted_cameras=tuple(str(c) for c in json.loads(meta.get("adapted_cameras",
                                                                      "[]"))),
        )
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise WeightsError(f"{path}: incomplete model metadata ({e!r})") from e


def _norm_method(name: str) -> str:
    if name not in NORM_METHODS:
        raise ValueError(f"normalization method {name!r} is not one of {NORM_METHODS}")
    return name


def _metadata(path: Path, data: bytes) -> dict[str, str]:
    """The __metadata__ of safetensors bytes: a little-endian u64 header length, then the
    JSON header."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < n <= len(data) - 8:
        raise WeightsError(f"{path}: not a safetensors file (bad header length; is it "
                           f"complete?)")
    try:
        header = json.loads(data[8:8 + n])
        meta = header.get("__metadata__") or {}
    except (ValueError, AttributeError) as e:
        raise WeightsError(f"{path}: not a safetensors file (header: {e})") from e
    if not isinstance(meta, dict):
        raise WeightsError(f"{path}: not a safetensors file (metadata is not a table)")
    return {str(k): str(v) for k, v in meta.items()}


def load_weights(path: Path, *, expected_sha256: str = "") -> tuple[UNet, ModelInfo]:
    """Rebuild a model from a weights file, in eval mode on the CPU.

    The file is read once, so its sha256, metadata and tensors all come from the same bytes
    even if it is replaced meanwhile; one that changes while being read is refused.
    """
    try:
        before = file_signature(path)
        data = path.read_bytes()
        after = file_signature(path)
    except FileNotFoundError as e:
        raise WeightsError(f"{path}: weights file not found") from e
    except IsADirectoryError as e:
        raise WeightsError(f"{path}: is a folder, not a weights file") from e
    except OSError as e:
        raise WeightsError(f"{path}: cannot read weights ({e.strerror or e})") from e
    if before != after or len(data) != after[1]:
        raise WeightsError(f"{path}: changed while being read (still being copied?); "
                           f"replace it atomically (write elsewhere, then rename)")
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 and sha != expected_sha256:
        raise WeightsError(f"{path}: sha256 is {sha}, config model.sha256 expects "
                           f"{expected_sha256}")
    info = _info(path, _metadata(path, data))
    model = info.build()
    try:
        state = load(data)
    except SafetensorError as e:
        raise WeightsError(f"{path}: incomplete or damaged safetensors file ({e})") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path}: tensors do not match the model in its metadata ({e})") from e
    model.eval()
    return model, ModelInfo(**{**info.__dict__, "sha256": sha})


def set_adapted_cameras(path: Path, cameras: Sequence[str]) -> str:
    """Rewrite a weights file saying it was adapted to `cameras` ([camera] id values); the
    tensors are unchanged. Returns the new sha256. (`pbf-monitor adapt` names the camera in
    the weights it writes; this marks weights adapted elsewhere, and serves the tests.)"""
    model, info = load_weights(path)
    return save_weights(path, model, replace(info, adapted_cameras=tuple(cameras)))
