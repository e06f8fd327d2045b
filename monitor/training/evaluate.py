"""Segmentation metrics, and evaluation of weights on a dataset through the daemon's Segmenter.

The metric functions here are the only ones: training's validation uses them too.

Pixel metrics sum true/false positives and false negatives over all layers before dividing
(so large layers weigh more than small ones); layer metrics ask, per layer, "does it contain
class X?" (any pixel) for the prediction and for the truth. A ratio whose denominator is zero
(e.g. precision of a class never predicted) is undefined: None in Python, null in JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitor.config import DEFAULT_TILE_SIZE
from monitor.geometry.reading import outside_zone, read_layer
from monitor.geometry.stray import stray_tracks
from monitor.training.dataset import Dataset, DatasetError
from monitor.vision.model import ModelInfo, load_weights, save_weights
from monitor.vision.segmenter import Segmenter
from monitor.vision.stats import NO_DEFECT

# Thresholds tried when recommending a per-class threshold.
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(2, 19))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den > 0 else None


@dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one class; None where the ratio is undefined (0/0)."""

    iou: float | None
    dice: float | None
    precision: float | None
    recall: float | None
    layer_precision: float | None
    layer_recall: float | None


@dataclass
class Counts:
    """Confusion counts per class (pixels summed over layers, and layers)."""

    classes: tuple[str, ...]
    tp: np.ndarray = field(init=False)  # (C,) int64 pixels
    fp: np.ndarray = field(init=False)
    fn: np.ndarray = field(init=False)
    layer_tp: np.ndarray = field(init=False)  # (C,) int64 layers
    layer_fp: np.ndarray = field(init=False)
    layer_fn: np.ndarray = field(init=False)
    layers: int = 0
    pixels: int = 0

    def __post_init__(self) -> None:
        n = len(self.classes)
        for name in ("tp", "fp", "fn", "layer_tp", "layer_fp", "layer_fn"):
            setattr(self, name, np.zeros(n, dtype=np.int64))

    def add(self, pred: np.ndarray, true: np.ndarray) -> None:
        """Add one layer: pred and true are (C, H, W) bool in the order of `classes`."""
        if pred.shape != true.shape or pred.shape[0] != len(self.classes):
            raise ValueError(f"pred {pred.shape} and true {true.shape} must both be "
                             f"({len(self.classes)}, H, W)")
        c = len(self.classes)
        p, t = pred.reshape(c, -1), true.reshape(c, -1)
        tp = np.count_nonzero(p & t, axis=1)
        self.tp += tp
        self.fp += np.count_nonzero(p, axis=1) - tp
        self.fn += np.count_nonzero(t, axis=1) - tp
        lp, lt = p.any(axis=1), t.any(axis=1)
        self.layer_tp += lp & lt
        self.layer_fp += lp & ~lt
        self.layer_fn += ~lp & lt
        self.layers += 1
        self.pixels += p.shape[1]

    def metrics(self) -> dict[str, ClassMetrics]:
        """Per-class IoU, Dice, precision, recall and layer-level precision/recall."""
        out = {}
        for i, name in enumerate(self.classes):
            tp, fp, fn = int(self.tp[i]), int(self.fp[i]), int(self.fn[i])
            ltp, lfp, lfn = int(self.layer_tp[i]), int(self.layer_fp[i]), int(self.layer_fn[i])
            out[name] = ClassMetrics(
                iou=_ratio(tp, tp + fp + fn),
                dice=_ratio(2 * tp, 2 * tp + fp + fn),
                precision=_ratio(tp, tp + fp),
                recall=_ratio(tp, tp + fn),
                layer_precision=_ratio(ltp, ltp + lfp),
                layer_recall=_ratio(ltp, ltp + lfn),
            )
        return out


def mean_iou_defects(metrics: dict[str, ClassMetrics]) -> float | None:
    """Mean IoU over the classes other than no_defect whose IoU is defined."""
    values = [m.iou for name, m in metrics.items() if name != NO_DEFECT and m.iou is not None]
    return float(np.mean(values)) if values else None


def metrics_json(counts: Counts) -> dict[str, Any]:
    """{"classes": {name: {iou, dice, precision, recall, layer_precision, layer_recall}},
    "mean_iou_defects": float | None}"""
    m = counts.metrics()
    classes: dict[str, Any] = {}
    for i, (name, cm) in enumerate(m.items()):
        classes[name] = {
            **vars(cm),
            # Share of all pixels predicted / labelled as the class: on frames known to be
            # clean, the predicted share of a defect class is its false-alarm area.
            "predicted_fraction": _ratio(int(counts.tp[i] + counts.fp[i]), counts.pixels),
            "true_fraction": _ratio(int(counts.tp[i] + counts.fn[i]), counts.pixels),
            "true_layers": int(counts.layer_tp[i] + counts.layer_fn[i]),
            "predicted_layers": int(counts.layer_tp[i] + counts.layer_fp[i]),
        }
    return {"classes": classes, "mean_iou_defects": mean_iou_defects(m),
            "layers": counts.layers, "pixels": counts.pixels}


@dataclass
class ThresholdSweep:
    """Pixel counts at several thresholds, to recommend a per-class threshold."""

    classes: tuple[str, ...]
    grid: tuple[float, ...] = THRESHOLD_GRID
    tp: np.ndarray = field(init=False)  # (C, T) int64
    fp: np.ndarray = field(init=False)
    fn: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        shape = (len(self.classes), len(self.grid))
        self.tp, self.fp, self.fn = (np.zeros(shape, dtype=np.int64) for _ in range(3))

    def add(self, probs: np.ndarray, true: np.ndarray) -> None:
        """probs (C, H, W) float in [0, 1], true (C, H, W) bool."""
        c = len(self.classes)
        p, t = probs.reshape(c, -1), true.reshape(c, -1)
        npos = np.count_nonzero(t, axis=1)
        for j, thr in enumerate(self.grid):
            hit = p >= thr
            tp = np.count_nonzero(hit & t, axis=1)
            self.tp[:, j] += tp
            self.fp[:, j] += np.count_nonzero(hit, axis=1) - tp
            self.fn[:, j] += npos - tp

    def best(self) -> dict[str, dict[str, float | None]]:
        """Per class: the threshold with the highest IoU, that IoU and its recall."""
        out: dict[str, dict[str, float | None]] = {}
        for i, name in enumerate(self.classes):
            den = self.tp[i] + self.fp[i] + self.fn[i]
            if not den.any():
                continue
            iou = np.where(den > 0, self.tp[i] / np.maximum(den, 1), -1.0)
            j = int(np.argmax(iou))
            out[name] = {
                "threshold": self.grid[j],
                "iou": float(iou[j]),
                "recall": _ratio(int(self.tp[i, j]), int(self.tp[i, j] + self.fn[i, j])),
            }
        return out


def channel_map(dataset_classes: Sequence[str], model_classes: Sequence[str]) -> list[int]:
    """Dataset channel of each model class (by name); the model's classes must all exist."""
    missing = [c for c in model_classes if c not in dataset_classes]
    if missing:
        raise DatasetError(f"the model's classes {', '.join(missing)} are not in the "
                           f"dataset (its classes: {', '.join(dataset_classes)})")
    return [list(dataset_classes).index(c) for c in model_classes]


def evaluate(
    dataset: Dataset,
    segmenter: Segmenter,
    *,
    names: Sequence[str] | None = None,
    sweep: ThresholdSweep | None = None,
    progress: Callable[[int], None] | None = None,
    swelling_reach_px: int = 0,
    outside_px: tuple[int, int] | None = None,
    stray_track_z: float = 0.0,
    relative_k: float = 0.0,
) -> Counts:
    """Segment each layer with `segmenter` and count against the dataset's masks.

    Args:
        dataset: the opened dataset.
        segmenter: the daemon's Segmenter (its tiling and thresholds are used).
        names: image names to use (default: all).
        sweep: also accumulate counts at other thresholds here (the model's own classes).
        progress: called with the number of layers done.
        swelling_reach_px: as geometry.swelling_reach_px, where the dataset has nominal
            slices: the masks read against them as the daemon reads a layer (0 = off).
        outside_px: (tolerance, reach) in pixels, where the dataset has nominal slices:
            the Segmenter's outside thresholds hold between the two (None = off).
        stray_track_z: as geometry.stray_track_z, between the same two (0 = off).
        relative_k: as geometry.relative_k, where the dataset has nominal slices (0 = off).
    """
    chans = channel_map(dataset.classes, segmenter.class_names)
    counts = Counts(segmenter.class_names)
    for done, name in enumerate(names if names is not None else dataset.names, start=1):
        gray, true = dataset.sample(name)
        true = true[chans]
        result = segmenter.predict(gray, probs=sweep is not None)
        masks = result.masks
        wanted = swelling_reach_px or relative_k or \
            (outside_px and (result.loose or stray_track_z))
        part = dataset.nominal(name, gray.shape) if wanted else None
        if part is not None:
            zone = outside_zone(part, *outside_px) if outside_px else None
            tracks = None if zone is None or not stray_track_z else \
                stray_tracks(gray, zone, z_min=stray_track_z)
            read = read_layer(masks, segmenter.class_names, part, loose=result.loose,
                              zone=zone, swelling_reach_px=swelling_reach_px, tracks=tracks,
                              gray=gray, relative_k=relative_k)
            masks = masks if read is None else read
        counts.add(masks, true)
        if sweep is not None:
            assert result.probs is not None
            sweep.add(result.probs, true)
        if progress is not None:
            progress(done)
    return counts


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def metrics_table(counts: Counts, *, title: str = "") -> Any:
    """A rich Table of the metrics."""
    from rich.table import Table

    m = counts.metrics()
    mean = mean_iou_defects(m)
    t = Table(title=title, caption=f"mean IoU over defect classes: {_fmt(mean)}  "
                                   f"({counts.layers} layers)")
    for col in ("class", "IoU", "Dice", "precision", "recall", "layer prec.", "layer recall",
                "true layers", "pred. layers"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for i, (name, cm) in enumerate(m.items()):
        true_layers = int(counts.layer_tp[i] + counts.layer_fn[i])
        pred_layers = int(counts.layer_tp[i] + counts.layer_fp[i])
        t.add_row(name, _fmt(cm.iou), _fmt(cm.dice), _fmt(cm.precision), _fmt(cm.recall),
                  _fmt(cm.layer_precision), _fmt(cm.layer_recall), str(true_layers),
                  str(pred_layers))
    return t


def calibrate(
    weights: Path,
    dataset: Dataset,
    out: Path,
    *,
    tile_size: int = DEFAULT_TILE_SIZE,
    tile_overlap: int = 64,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, float | None]]:
    """Store in `out` a copy of `weights` whose per-class thresholds maximise IoU on `dataset`.

    Classes the dataset never shows nor the model predicts keep their current threshold.

    Returns:
        Per class: the chosen threshold, its IoU and recall.
    """
    import torch

    seg = Segmenter(weights, device="auto", tile_size=tile_size, tile_overlap=tile_overlap)
    sweep = ThresholdSweep(seg.class_names)
    evaluate(dataset, seg, sweep=sweep, progress=progress)
    best = sweep.best()
    model, info = load_weights(weights)
    thresholds = {**info.thresholds,
                  **{c: float(v["threshold"]) for c, v in best.items()
                     if v["threshold"] is not None}}
    training = {**info.training, "calibration": {
        "dataset": dataset.root.name, "layers": len(dataset.names), "from": info.sha256,
        "per_class": best, "torch": torch.__version__}}
    save_weights(out, model, ModelInfo(**{**info.__dict__, "thresholds": thresholds,
                                          "training": training, "sha256": ""}))
    return best
