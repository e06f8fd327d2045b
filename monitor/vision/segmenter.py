"""Weights loaded once; a gray image -> per-class probabilities and masks.

Images are served at native resolution: small ones are padded to a multiple of 16, large ones
are cut into overlapping tiles so memory stays bounded. Each output pixel comes from the tile
whose centre is nearest, so seams fall in the middle of overlaps where both tiles saw context.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from monitor.config import DEFAULT_TILE_SIZE, Config
from monitor.errors import ConfigError, DeviceError
from monitor.vision.backends import Backend, make_backend
from monitor.vision.imaging import model_input
from monitor.vision.model import DEPTH, ModelInfo, UNet, load_weights, read_info
from monitor.vision.stats import Found, label_components, per_class

log = logging.getLogger(__name__)
MULTIPLE = 2**DEPTH


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> a usable torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("model.device = 'cuda' but no CUDA GPU is available "
                          "(use 'auto' or 'cpu')")
    return torch.device(name)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis as (start, stop, keep_from, keep_to) in image coordinates.

    A length that fits one tile gives one span that may run past the end (the caller pads).
    """
    if length <= tile:
        return [(0, _round_up(length, MULTIPLE), 0, length)]
    n = math.ceil((length - overlap) / (tile - overlap))
    # The smallest tile that still covers the length with n tiles overlapping by at least
    # `overlap`: n full-size tiles would overlap far more than asked (a 2048 px side in 1024 px
    # tiles is 3 tiles, 2.25x the pixels in 2D; 3 tiles of 736 px are 1.16x).
    tile = min(tile, _round_up(math.ceil((length + (n - 1) * overlap) / n), MULTIPLE))
    starts = [round(i * (length - tile) / (n - 1)) for i in range(n)]
    cuts = [0] + [(starts[i + 1] + starts[i] + tile) // 2 for i in range(n - 1)] + [length]
    return [(s, s + tile, cuts[i], cuts[i + 1]) for i, s in enumerate(starts)]


@dataclass(frozen=True)
class Segmentation:
    probs: np.ndarray | None  # (C, H, W) float32 in [0, 1]; None when not asked for
    masks: np.ndarray  # (C, H, W) bool
    infer_ms: float
    # Per filtered class index, the components the filter kept (statistics reuse them).
    found: dict[int, Found] = field(default_factory=dict)
    # Per class index with an outside threshold (model.outside_thresholds): its mask at that
    # lower threshold, filtered alike; the geometry keeps it beyond the parts only.
    loose: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class SegmenterOptions:
    """How a Segmenter serves its model: the one list of the options and their defaults."""

    device: str = "auto"  # 'auto' | 'cpu' | 'cuda' (or a torch device's name, e.g. 'cuda:1')
    tile_size: int = DEFAULT_TILE_SIZE
    tile_overlap: int = 64
    threshold: float = 0.5  # for classes without their own (below) or a calibrated one
    thresholds: Mapping[str, float] = field(default_factory=dict)
    min_component_px: Mapping[str, int] = field(default_factory=dict)  # per class
    outside_thresholds: Mapping[str, float] = field(default_factory=dict)  # beyond the parts
    backend: str = "torch"
    cache_dir: Path | None = None  # where the backends' exports are kept
    precision: str = "f32"  # the CPU engines' precision
    batch_size: int = 0  # tiles per model call; 0 = 8 on a GPU, 1 on a CPU

    @classmethod
    def from_config(cls, cfg: Config, weights: Path | None = None) -> SegmenterOptions:
        """The options [model] sets; `weights` are other weights given on the command line."""
        m = cfg.model
        return cls(device=m.device, tile_size=m.tile_size, tile_overlap=m.tile_overlap,
                   threshold=m.threshold, thresholds=m.thresholds,
                   min_component_px=min_component_px(cfg, weights),
                   outside_thresholds=outside_thresholds(cfg, weights), backend=m.backend,
                   cache_dir=cfg.state_dir / "cache", precision=m.cpu_precision,
                   batch_size=m.batch_size)


class Segmenter:
    """Owns the model: one instance, used from one thread."""

    def __init__(self, weights: Path, options: SegmenterOptions | None = None, *,
                 expected_sha256: str = "", **overrides: Any) -> None:
        """Load `weights` and serve them with `options`; keyword `overrides` replace single
        options (``Segmenter(weights, device="cpu")``)."""
        model, info = load_weights(weights, expected_sha256=expected_sha256)
        self._serve(model, info, replace(options or SegmenterOptions(), **overrides))
        name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        log.info("model %s (width %d, classes %s) on %s with the %s backend%s",
                 self.info.sha256[:12], self.info.base_channels, ",".join(self.info.class_names),
                 name, self.backend.name, " (autocast)" if self.cuda else "")

    @classmethod
    def from_config(cls, cfg: Config, weights: Path | None = None) -> Segmenter:
        """The Segmenter the daemon, `infer` and `evaluate` use; `weights` overrides the
        config's (then model.sha256 is not checked)."""
        return cls(weights or cfg.model.weights, SegmenterOptions.from_config(cfg, weights),
                   expected_sha256="" if weights else cfg.model.sha256)

    @classmethod
    def from_model(cls, model: UNet, info: ModelInfo, *, device: torch.device,
                   options: SegmenterOptions | None = None, **overrides: Any) -> Segmenter:
        """Serve a model already in memory (training's validation, the benchmark): same
        tiling and thresholds as the daemon. The caller puts the model in eval mode."""
        self = cls.__new__(cls)
        self._serve(model, info,
                    replace(options or SegmenterOptions(), **overrides, device=str(device)))
        return self

    def _serve(self, model: UNet, info: ModelInfo, opts: SegmenterOptions) -> None:
        self.device = resolve_device(opts.device)
        if opts.tile_overlap >= opts.tile_size // 2:
            raise ConfigError(f"model.tile_overlap ({opts.tile_overlap}) must be less than "
                              f"half of model.tile_size ({opts.tile_size})")
        self.info = info
        self.set_thresholds(opts.threshold, opts.thresholds, opts.min_component_px,
                            opts.outside_thresholds)
        self.tile_size = opts.tile_size
        self.tile_overlap = opts.tile_overlap
        self.cuda = self.device.type == "cuda"
        # 0 = auto: a GPU gains from several tiles per call; a CPU engine already uses every
        # core on one, and a batch would only multiply the memory.
        self.batch_size = opts.batch_size or (8 if self.cuda else 1)
        self.backend: Backend = make_backend(opts.backend, model, info, self.device,
                                             cache_dir=opts.cache_dir, precision=opts.precision)

    def set_thresholds(self, threshold: float, thresholds: Mapping[str, float] | None,
                       min_component_px: Mapping[str, int] | None = None,
                       outside_thresholds: Mapping[str, float] | None = None) -> None:
        """Thresholds and component filters, checked, then swapped in at once (SIGHUP)."""
        for key, given in (("thresholds", thresholds), ("min_component_mm2", min_component_px),
                           ("outside_thresholds", outside_thresholds)):
            unknown = set(given or {}) - set(self.info.class_names)
            if unknown:
                raise ConfigError(f"model.{key}.{sorted(unknown)[0]}: unknown class; the "
                                  f"weights' classes are {', '.join(self.info.class_names)}")
        # Per class: the config's value, else the one calibrated into the weights, else the
        # config's default threshold.
        chosen = {**self.info.thresholds, **(thresholds or {})}
        values = np.array([chosen.get(c, threshold) for c in self.info.class_names],
                          dtype=np.float32)
        filters = [(i, int((min_component_px or {})[c])) for i, c in enumerate(self.class_names)
                   if (min_component_px or {}).get(c, 0) > 1]
        # The same cut on the logits (sigmoid is monotonic): 0 -> -inf, 1 -> +inf.
        # Outside thresholds only where they are lower than the class's own (else the loose
        # mask would add nothing).
        loose = [(i, float(v)) for i, c in enumerate(self.class_names)
                 if (v := (outside_thresholds or {}).get(c)) is not None and v < values[i]]
        with np.errstate(divide="ignore"):
            logits = (np.log(values) - np.log1p(-values)).astype(np.float32)
            loose_cut = [(i, float(np.log(v) - np.log1p(-v))) for i, v in loose]
        # one assignment: a reload swaps them from another thread
        self.thresholds, self.logit_thresholds, self.min_component_px, self.loose_cuts = (
            values, logits, filters, loose_cut)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    @property
    def model_info(self) -> ModelInfo:
        return self.info

    def warm_up(self) -> None:
        """One small inference so the first real layer does not pay for lazy initialisation."""
        self.predict(np.zeros((64, 64), dtype=np.float32))

    def predict(self, gray: np.ndarray, *, probs: bool = True) -> Segmentation:
        """(H, W) float32 gray in [0, 1] -> thresholded masks, and the probabilities unless
        `probs` is False."""
        return self.predict_many([gray], probs=probs)[0]

    def predict_many(self, grays: list[np.ndarray], *, probs: bool = True
                     ) -> list[Segmentation]:
        """Several layers at once (a backlog): their tiles go through the model in batches
        of up to `batch_size`, which keeps a GPU busy; each result is what predict() gives.
        infer_ms is the batch's time shared out by pixels.

        Masks are the logits compared with the thresholds' logits, tile by tile, so the
        daemon (probs=False) never computes a sigmoid nor holds a float array of the layer:
        for a 2048 px layer that saves about 40 ms, and 400 MB on a 4096 px one."""
        t0 = time.perf_counter()
        work: list[tuple[int, tuple[int, int, int, int, int, int], np.ndarray]] = []
        n_classes = len(self.class_names)
        masks, prob_maps = [], []
        # Read once: a reload (SIGHUP) swaps them from another thread.
        logit_cut, filters, loose_cuts = (self.logit_thresholds, self.min_component_px,
                                          self.loose_cuts)
        cut = logit_cut[:, None, None]
        loose_masks: list[np.ndarray] = []
        for n, gray in enumerate(grays):
            h, w = gray.shape
            x = model_input(gray, self.info.norm, self.info.mean, self.info.std)
            ys = tile_spans(h, self.tile_size, self.tile_overlap)
            xs = tile_spans(w, self.tile_size, self.tile_overlap)
            # Reflect-pad so every tile is full size and a multiple of 16.
            ph, pw = max(ys[-1][1], h), max(xs[-1][1], w)
            if (ph, pw) != (h, w):
                x = np.pad(x, ((0, ph - h), (0, pw - w)), mode="reflect")
            masks.append(np.empty((n_classes, h, w), dtype=bool))
            loose_masks.append(np.empty((len(loose_cuts), h, w), dtype=bool))
            if probs:
                prob_maps.append(np.empty((n_classes, h, w), dtype=np.float32))
            for y0, y1, ky0, ky1 in ys:
                for x0, x1, kx0, kx1 in xs:
                    work.append((n, (y0, x0, ky0, ky1, kx0, kx1), x[y0:y1, x0:x1]))
        # Tiles of one shape share a batch (a whole small layer is one "tile" of its size).
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, (_, _, tile) in enumerate(work):
            by_shape.setdefault(tile.shape, []).append(i)
        with torch.inference_mode():
            for indices in by_shape.values():
                for k in range(0, len(indices), self.batch_size):
                    chunk = indices[k:k + self.batch_size]
                    batch = np.stack([work[i][2] for i in chunk])[:, None]
                    logits = self.backend(batch)
                    for i, z in zip(chunk, logits, strict=True):
                        n, (y0, x0, ky0, ky1, kx0, kx1), _ = work[i]
                        kept = z[:, ky0 - y0:ky1 - y0, kx0 - x0:kx1 - x0]
                        np.greater_equal(kept, cut, out=masks[n][:, ky0:ky1, kx0:kx1])
                        for j, (c, lc) in enumerate(loose_cuts):
                            np.greater_equal(kept[c], lc,
                                             out=loose_masks[n][j, ky0:ky1, kx0:kx1])
                        if probs:
                            prob_maps[n][:, ky0:ky1, kx0:kx1] = torch.sigmoid(
                                torch.from_numpy(kept)).numpy()
        results = []
        total_px = sum(g.size for g in grays) or 1
        elapsed_ms = (time.perf_counter() - t0) * 1000.0
        for k, (gray, mask) in enumerate(zip(grays, masks, strict=True)):

            def drop(j: int, mask: np.ndarray = mask) -> tuple[int, Found | None]:
                i, min_px = filters[j]
                mask[i], found = drop_small_components(mask[i], min_px)
                return i, found

            found = {i: f for i, f in per_class(drop, len(filters), gray.size) if f is not None}
            min_px = dict(filters)
            loose = {c: (drop_small_components(m, min_px[c])[0] if min_px.get(c, 0) > 1 else m)
                     for (c, _), m in zip(loose_cuts, loose_masks[k], strict=True)}
            results.append(Segmentation(prob_maps[k] if probs else None, mask,
                                        elapsed_ms * gray.size / total_px, found, loose))
        return results


def min_component_px(cfg: Config, override: Path | None) -> dict[str, int]:
    """model.min_component_mm2 in pixels. The built-in defaults, and a config's values when
    other weights are given on the command line, name classes those weights may not have:
    such entries are skipped rather than refused."""
    px_mm2 = cfg.camera.pixel_size_mm ** 2
    wanted = _for_weights(cfg, override, "min_component_mm2")
    return {c: math.ceil(a / px_mm2) for c, a in wanted.items()}


def outside_thresholds(cfg: Config, override: Path | None) -> dict[str, float]:
    """model.outside_thresholds, skipping classes the weights lack as min_component_px
    does."""
    return _for_weights(cfg, override, "outside_thresholds")


def _for_weights(cfg: Config, override: Path | None, key: str) -> dict[str, float]:
    """A per-class [model] table; where it was not written in the config, or other weights
    are given, only the classes the weights have."""
    m = cfg.model
    wanted: dict[str, float] = dict(getattr(m, key))
    if override is not None or key not in m.model_fields_set:
        names = set(read_info(override or m.weights).class_names)
        wanted = {c: v for c, v in wanted.items() if c in names}
    return wanted


def drop_small_components(mask: np.ndarray, min_px: int) -> tuple[np.ndarray, Found | None]:
    """The mask without its 8-connected components smaller than min_px pixels, and the
    components it keeps (None for an empty mask)."""
    if not mask.any():
        return mask, None
    lab = label_components(mask)
    keep = lab.stats[:, cv2.CC_STAT_AREA] >= min_px  # the background's row is ignored
    if keep[1:].all():
        return mask, lab.found()
    return lab.keeping(mask, keep), lab.found(keep)
