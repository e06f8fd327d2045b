"""Training a U-Net on one or more dataset folders; writes weights, a checkpoint and a model card.

Training sees random tiles at native resolution (never whole images resized: that erases
spatter), biased towards tiles that hold a defect so the rare classes are seen often, with
flips, rotations and brightness/contrast jitter. Validation runs every epoch on whole layers
held out by layer number, through the daemon's own Segmenter (same tiling, same thresholds),
and the best epoch by mean defect IoU is the weights file that is kept.

The checkpoint beside the weights (``NAME.ckpt.safetensors``) holds the model, the optimizer
and the schedule, so an interrupted run resumes with ``--resume``; like the weights it is a
safetensors file, nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from monitor.errors import MonitorError
from monitor.training.dataset import Dataset, DatasetError, open_dataset, split_by_layer
from monitor.training.evaluate import Counts, ThresholdSweep, metrics_json
from monitor.training.tiles import LayerCache, LayerRef, TileSampler, positive_weights
from monitor.vision.model import (
    DEPTH,
    NORM_METHODS,
    ModelInfo,
    UNet,
    file_sha256,
    load_weights,
    save_weights,
)
from monitor.vision.segmenter import Segmenter, resolve_device

log = logging.getLogger(__name__)

CKPT_FORMAT = "pbf-monitor-checkpoint/1"
MULTIPLE = 2**DEPTH


class TrainError(MonitorError):
    """Training options that cannot work, or a checkpoint that does not fit them."""


@dataclass(frozen=True)
class TrainOptions:
    """Everything that decides a training run (recorded in the model card)."""

    width: int = 16
    epochs: int = 30
    steps_per_epoch: int = 100
    tile: int = 256
    batch: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    pos_weight: str = "auto"  # "auto", "none", or one number for every class
    pos_weight_max: float = 20.0
    defect_bias: float = 0.7  # share of tiles centred on a defect pixel
    val_fraction: float = 0.2
    val_block: int = 5
    threshold: float = 0.5
    device: str = "auto"
    workers: int = 0
    seed: int = 0
    cache_mb: int = 2048
    calibrate: bool = True  # store per-class thresholds that maximise validation IoU
    norm: str = "flat"  # input normalisation (monitor.vision.model.NORM_METHODS)
    init: str = ""  # weights to start from (same width and classes), "" = random

    def check(self) -> None:
        if self.width < 1 or self.epochs < 1 or self.steps_per_epoch < 1 or self.batch < 1:
            raise TrainError("--width, --epochs, --steps and --batch must be at least 1")
        if self.tile < MULTIPLE or self.tile % MULTIPLE:
            raise TrainError(f"--tile {self.tile}: use a multiple of {MULTIPLE}")
        if not 0.0 <= self.defect_bias <= 1.0:
            raise TrainError(f"--defect-bias {self.defect_bias}: use a value in [0, 1]")
        if self.pos_weight not in ("auto", "none"):
            try:
                if float(self.pos_weight) <= 0:
                    raise ValueError
            except ValueError:
                raise TrainError(f"--pos-weight {self.pos_weight!r}: use auto, none or a "
                                 f"positive number") from None
        if self.lr <= 0:
            raise TrainError(f"--lr {self.lr}: use a positive learning rate")
        if self.norm not in NORM_METHODS:
            raise TrainError(f"--norm {self.norm!r}: use one of {', '.join(NORM_METHODS)}")


# --- data ------------------------------------------------------------------------------


@dataclass
class EpochResult:
    epoch: int
    loss: float
    seconds: float
    val: dict[str, Any] | None = None

    @property
    def score(self) -> float:
        """What "best" means: mean IoU over the defect classes on validation."""
        v = (self.val or {}).get("mean_iou_defects")
        return -1.0 if v is None else float(v)


@dataclass
class TrainResult:
    weights: Path
    card: Path
    best_epoch: int
    history: list[EpochResult] = field(default_factory=list)


def _schedule(opts: TrainOptions) -> Callable[[int], float]:
    total = opts.epochs * opts.steps_per_epoch

    def factor(step: int) -> float:
        if step < opts.warmup_steps:
            return (step + 1) / opts.warmup_steps
        t = (step - opts.warmup_steps) / max(total - opts.warmup_steps, 1)
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return factor


def validate(model: UNet, info: ModelInfo, refs: Sequence[LayerRef], device: torch.device,
             opts: TrainOptions, cache: LayerCache) -> tuple[Counts, ThresholdSweep]:
    """Whole held-out layers through the daemon's Segmenter."""
    model.eval()
    seg = Segmenter.from_model(model, info, device=device, threshold=opts.threshold)
    counts = Counts(info.class_names)
    sweep = ThresholdSweep(info.class_names)
    for ref in refs:
        gray, masks, _ = cache.get(ref)
        out = seg.predict(gray)
        counts.add(out.masks, masks)
        assert out.probs is not None  # asked for by default
        sweep.add(out.probs, masks)
    return counts, sweep


def _ckpt_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".ckpt.safetensors")


def card_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".json")


def _save_checkpoint(path: Path, model: nn.Module, optim: torch.optim.Optimizer,
                     meta: dict[str, Any]) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state = optim.state_dict()
    for pid, st in state["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"optim.{pid}.{k}"] = t.detach().cpu().contiguous()
    meta = {**meta, "param_groups": state["param_groups"]}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": CKPT_FORMAT, "state": json.dumps(meta)})
    tmp.replace(path)


def _load_checkpoint(path: Path, model: nn.Module, optim: torch.optim.Optimizer
                     ) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise TrainError(f"{path}: not a readable checkpoint ({e})") from e
    if raw.get("format") != CKPT_FORMAT:
        raise TrainError(f"{path}: not a pbf-monitor training checkpoint")
    meta: dict[str, Any] = json.loads(raw["state"])
    msd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(msd, strict=True)
    except RuntimeError as e:
        raise TrainError(f"{path}: checkpoint does not fit this model (different --width or "
                         f"classes?)") from e
    ostate: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            ostate.setdefault(int(pid), {})[name] = v
    optim.load_state_dict({"state": ostate, "param_groups": meta.pop("param_groups")})
    return meta


def train(
    datasets: Sequence[Path],
    out: Path,
    opts: TrainOptions,
    *,
    resume: bool = False,
    command: str | None = None,
    on_progress: Callable[[str, int, int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train on the datasets; keep the best epoch in `out` and a model card beside it.

    Args:
        datasets: dataset folders; all must list the same classes (their order may differ).
        out: the weights file to write (``.safetensors``).
        opts: the run's options.
        resume: continue from ``out``'s checkpoint if there is one.
        command: the command line to record in the model card.
        on_progress: called with (phase, done, total, figures) as steps and epochs finish.
    """
    opts.check()
    if out.suffix != ".safetensors":
        raise TrainError(f"--out {out}: use a .safetensors file name")
    opened = _open_datasets(datasets)
    train_refs, val_refs = _split(opened, opts)
    run = _Run.start(opened[0].classes, train_refs, opts)
    ckpt = _ckpt_path(out)
    state = _resume(ckpt, run, opts) if resume and ckpt.is_file() else _State()
    log.info("training width %d on %s: %d train / %d validation layers, pos_weight %s",
             opts.width, run.device, len(train_refs), len(val_refs),
             [round(float(w), 2) for w in run.pos_weight])
    t_start = time.perf_counter()
    # Whole raw layers: the Segmenter normalises them itself, as in serving.
    val_cache = (run.sampler.cache if run.info.norm == "global"
                 else LayerCache(run.sampler.classes, opts.cache_mb // 2))
    for epoch in range(state.start_epoch, opts.epochs + 1):
        t0 = time.perf_counter()
        result = run.epoch(epoch, on_progress)
        sweep_best: dict[str, Any] = {}
        if val_refs:
            counts, sweep = validate(run.model, run.info, val_refs, run.device, opts,
                                     val_cache)
            result.val = metrics_json(counts)
            sweep_best = sweep.best()
        result.seconds = time.perf_counter() - t0
        state.history.append(result)
        improved = state.best.epoch == 0 or not val_refs or result.score > state.best.score
        if improved:
            state.best, state.best_sweep = result, sweep_best
            _write_weights(out, run.model, run.info, opts, opened, state.best, state.best_sweep)
        _save_checkpoint(ckpt, run.model, run.optim, {
            "epoch": epoch, "step": epoch * opts.steps_per_epoch, "options": asdict(opts),
            "history": [asdict(h) for h in state.history], "best_sweep": state.best_sweep,
            "seconds": state.elapsed_before + time.perf_counter() - t_start,
        })
        _report_epoch(result, improved, opts, on_progress)

    if not out.is_file():  # deleted since the checkpoint's best epoch: keep the last one
        state.best = state.history[-1]
        _write_weights(out, run.model, run.info, opts, opened, state.best, state.best_sweep)
    card = write_card(out, opts, opened, train_refs, val_refs, state.best, state.history,
                      state.best_sweep, run.device, command,
                      state.elapsed_before + time.perf_counter() - t_start)
    return TrainResult(weights=out, card=card, best_epoch=state.best.epoch,
                       history=state.history)


def _open_datasets(datasets: Sequence[Path]) -> list[Dataset]:
    """The datasets, opened and checked; all must list the same classes."""
    opened = [open_dataset(Path(d)) for d in datasets]
    if not opened:
        raise TrainError("give at least one dataset folder")
    classes = opened[0].classes
    for ds in opened[1:]:
        if set(ds.classes) != set(classes):
            raise DatasetError(f"{ds.root}: classes {list(ds.classes)} differ from "
                               f"{opened[0].root}'s {list(classes)}")
    return opened


def _split(opened: Sequence[Dataset], opts: TrainOptions
           ) -> tuple[list[LayerRef], list[LayerRef]]:
    """Training and validation layers of every dataset, held out by blocks of layers."""
    train_refs: list[LayerRef] = []
    val_refs: list[LayerRef] = []
    for ds in opened:
        tr, va = split_by_layer(ds.names, val_fraction=opts.val_fraction, block=opts.val_block)
        train_refs += [LayerRef(ds, n) for n in tr]
        val_refs += [LayerRef(ds, n) for n in va]
    if not train_refs:
        raise TrainError("no training layers after the validation split")
    return train_refs, val_refs


@dataclass
class _State:
    """Where a run stands: the epochs so far, the best one, and the time already spent."""

    history: list[EpochResult] = field(default_factory=list)
    best: EpochResult = field(
        default_factory=lambda: EpochResult(epoch=0, loss=math.inf, seconds=0.0))
    best_sweep: dict[str, Any] = field(default_factory=dict)
    start_epoch: int = 1
    elapsed_before: float = 0.0


@dataclass
class _Run:
    """The model and everything that steps it: optimizer, schedule, loss, sampler, precision."""

    opts: TrainOptions
    info: ModelInfo
    device: torch.device
    model: UNet
    optim: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    sampler: TileSampler
    pos_weight: torch.Tensor
    loss_fn: nn.Module
    amp_dtype: torch.dtype
    scaler: torch.amp.GradScaler

    @classmethod
    def start(cls, classes: tuple[str, ...], train_refs: Sequence[LayerRef],
              opts: TrainOptions) -> _Run:
        torch.manual_seed(opts.seed)
        device = resolve_device(opts.device)
        cuda = device.type == "cuda"
        if not cuda:
            torch.set_num_threads(max(torch.get_num_threads(), 1))
        info = ModelInfo(class_names=classes, base_channels=opts.width, norm=opts.norm)
        model = info.build()
        if opts.init:
            model.load_state_dict(_init_state(Path(opts.init), info))
        model = model.to(device)
        if cuda:
            torch.backends.cudnn.benchmark = True
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        optim = torch.optim.AdamW(model.parameters(), lr=opts.lr,
                                  weight_decay=opts.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, _schedule(opts))
        sampler = TileSampler(train_refs, classes, info, opts)
        pos_weight = positive_weights(sampler, opts).to(device)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight[:, None, None])
        amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)
        return cls(opts, info, device, model, optim, sched, sampler, pos_weight, loss_fn,
                   amp_dtype, scaler)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def epoch(self, epoch: int,
              on_progress: Callable[[str, int, int, dict[str, Any]], None] | None
              ) -> EpochResult:
        """One epoch of optimizer steps; the result has its mean loss (no validation yet)."""
        opts, device, cuda = self.opts, self.device, self.cuda
        self.sampler.epoch = epoch
        loader = torch.utils.data.DataLoader(
            self.sampler, batch_size=opts.batch, shuffle=False, num_workers=opts.workers,
            pin_memory=cuda, persistent_workers=False)
        self.model.train()
        total, n = 0.0, 0
        for step, (x, y) in enumerate(loader, start=1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cuda:
                x = x.to(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=cuda):
                logits = self.model(x)
            loss = self.loss_fn(logits.float(), y)
            self.optim.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optim)
            self.scaler.update()
            self.sched.step()
            total += float(loss.detach())
            n += 1
            if on_progress is not None:
                on_progress("step", step, opts.steps_per_epoch, {"loss": total / n})
        return EpochResult(epoch=epoch, loss=total / max(n, 1), seconds=0.0)


def _init_state(path: Path, info: ModelInfo) -> dict[str, torch.Tensor]:
    """The tensors of the weights a run starts from; they must fit the run's model."""
    model, init = load_weights(path)
    if init.base_channels != info.base_channels or init.class_names != info.class_names:
        raise TrainError(f"--init {path}: width {init.base_channels} and classes "
                         f"{list(init.class_names)} do not fit --width {info.base_channels} "
                         f"and the datasets' classes {list(info.class_names)}")
    return {k: v.clone() for k, v in model.state_dict().items()}


def _resume(ckpt: Path, run: _Run, opts: TrainOptions) -> _State:
    """Restore the model, optimizer and schedule from the checkpoint; the run's history."""
    meta = _load_checkpoint(ckpt, run.model, run.optim)
    if meta.get("options", {}).get("width") != opts.width:
        raise TrainError(f"{ckpt}: trained with --width {meta['options'].get('width')}")
    state = _State(start_epoch=int(meta["epoch"]) + 1)
    if state.start_epoch > opts.epochs:
        raise TrainError(f"{ckpt}: no epoch was trained; the checkpoint is already at "
                         f"epoch {state.start_epoch - 1} of {opts.epochs} (raise --epochs)")
    # Continue the schedule at the restored step (the factor depends on --epochs).
    run.sched.last_epoch = int(meta["step"])
    for group, base in zip(run.optim.param_groups, run.sched.base_lrs, strict=True):
        group["lr"] = base * _schedule(opts)(run.sched.last_epoch)
    state.history = [EpochResult(**h) for h in meta["history"]]
    state.best = max(state.history, key=lambda r: r.score, default=state.best)
    state.best_sweep = meta.get("best_sweep", {})
    state.elapsed_before = float(meta.get("seconds", 0.0))
    log.info("resuming %s after epoch %d", ckpt, state.start_epoch - 1)
    return state


def _report_epoch(result: EpochResult, improved: bool, opts: TrainOptions,
                  on_progress: Callable[[str, int, int, dict[str, Any]], None] | None) -> None:
    mean = (result.val or {}).get("mean_iou_defects")
    log.info("epoch %d/%d: loss %.4f, val mean defect IoU %s%s (%.0f s)", result.epoch,
             opts.epochs, result.loss, "-" if mean is None else f"{mean:.3f}",
             " (best)" if improved else "", result.seconds)
    if on_progress is not None:
        on_progress("epoch", result.epoch, opts.epochs,
                    {"loss": result.loss, "mean_iou_defects": mean, "best": improved})


def _training_facts(opts: TrainOptions, datasets: Sequence[Dataset], best: EpochResult
                    ) -> dict[str, Any]:
    return {
        "datasets": [str(d.root.name) for d in datasets],
        "epochs": opts.epochs, "best_epoch": best.epoch, "tile": opts.tile,
        "val_mean_iou_defects": (best.val or {}).get("mean_iou_defects"),
        "loss": "BCEWithLogits", "optimizer": "AdamW", "lr": opts.lr, "seed": opts.seed,
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _write_weights(out: Path, model: UNet, info: ModelInfo, opts: TrainOptions,
                   datasets: Sequence[Dataset], best: EpochResult, sweep: dict[str, Any]
                   ) -> None:
    facts = _training_facts(opts, datasets, best)
    thresholds = ({c: float(v["threshold"]) for c, v in sweep.items()} if opts.calibrate
                  else {})
    save_weights(out, model, ModelInfo(**{**info.__dict__, "training": facts,
                                          "thresholds": thresholds}))


def write_card(out: Path, opts: TrainOptions, datasets: Sequence[Dataset],
               train_refs: Sequence[LayerRef], val_refs: Sequence[LayerRef], best: EpochResult,
               history: list[EpochResult], sweep: dict[str, Any], device: torch.device,
               command: str | None, seconds: float) -> Path:
    """The model card: what the weights are, what they were trained on and how well they do."""
    card = {
        "weights": out.name,
        "sha256": file_sha256(out),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command or shlex.join(sys.argv),
        "architecture": {"name": "UNet", "base_channels": opts.width,
                         "classes": list(datasets[0].classes)},
        "data": [{
            # names relative to the dataset root: a card must not carry this machine's paths
            "path": d.root.name, "classes": list(d.classes), "layers": len(d.names),
            "source": d.source,
            "regenerate": d.regenerate(),
        } for d in datasets],
        "split": {"train_layers": len(train_refs), "validation_layers": len(val_refs),
                  "validation": [r.label for r in val_refs]},
        "options": asdict(opts),
        "best_epoch": best.epoch,
        "validation": best.val,
        "recommended_thresholds": sweep,
        "history": [asdict(h) for h in history],
        "environment": {"device": str(device), "torch": torch.__version__,
                        "python": platform.python_version(), "seconds": round(seconds, 1)},
    }
    path = card_path(out)
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path
