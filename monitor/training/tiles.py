"""Training tiles: held-out-aware layer references, the decoded-layer cache, augmentation, and
the defect-biased sampler of native-resolution tiles."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from monitor.training.dataset import CLEAN_FRAMES, Dataset
from monitor.vision.classes import NO_DEFECT
from monitor.vision.imaging import FLAT_NORMS, flat_bound, flatten, normalize
from monitor.vision.model import ModelInfo

if TYPE_CHECKING:
    from monitor.training.train import TrainOptions


@dataclass(frozen=True)
class LayerRef:
    dataset: Dataset
    name: str

    @property
    def label(self) -> str:
        return f"{self.dataset.root.name}/{self.name}"


class LayerCache:
    """Decoded layers kept in memory up to a budget, loaded again when evicted. With a flat
    `norm` the cache holds the layer as such a model sees it (flattened whole, as serving
    does), so tiles never see a different background estimate; validation, which goes
    through the Segmenter and so normalises by itself, uses a cache of raw layers."""

    def __init__(self, classes: Sequence[str], budget_mb: int, *, norm: str = "global"
                 ) -> None:
        self.classes = tuple(classes)
        self.norm = norm
        self.budget = budget_mb * 2**20
        self.used = 0
        self._items: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, list[np.ndarray]]] = {}

    def get(self, ref: LayerRef) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Image (H, W) float32, masks (C, H, W) bool in training class order, and per class
        the flat indices of its pixels (for sampling tiles around defects)."""
        key = (str(ref.dataset.root), ref.name)
        hit = self._items.get(key)
        if hit is not None:
            return hit
        gray, masks = ref.dataset.sample(ref.name)
        if self.norm in FLAT_NORMS:
            gray = flatten(gray, soft=self.norm == "flat-soft")
        order = [ref.dataset.classes.index(c) for c in self.classes]
        masks = masks[order]
        where = [np.flatnonzero(m) for m in masks]
        item = (gray, masks, where)
        size = gray.nbytes + masks.nbytes + sum(w.nbytes for w in where)
        while self._items and self.used + size > self.budget:
            old = self._items.pop(next(iter(self._items)))
            self.used -= old[0].nbytes + old[1].nbytes + sum(w.nbytes for w in old[2])
        self._items[key] = item
        self.used += size
        return item


def rotate_flip(gray: np.ndarray, masks: np.ndarray, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """A random quarter-turn and mirror of a square tile and its (C, H, W) masks."""
    k = int(rng.integers(4))
    gray, masks = np.rot90(gray, k), np.rot90(masks, k, axes=(1, 2))
    if rng.random() < 0.5:
        gray, masks = gray[:, ::-1], masks[:, :, ::-1]
    return gray, masks


def augment(gray: np.ndarray, masks: np.ndarray, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """A random rotation/flip of the square tile, and brightness, contrast and gamma jitter."""
    gray, masks = rotate_flip(gray, masks, rng)
    gain = rng.uniform(0.8, 1.2)
    offset = rng.uniform(-0.06, 0.06)
    gamma = rng.uniform(0.8, 1.25)
    out = np.clip(gray, 0.0, 1.0) ** gamma * gain + offset
    return np.clip(out, 0.0, 1.0).astype(np.float32), np.ascontiguousarray(masks)


def augment_flat(x: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
                 bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotation/flip, and in the flattened space a contrast and offset change, sensor noise
    and a little blur: what is left of a camera's difference after flat-field normalisation."""
    x, masks = rotate_flip(x, masks, rng)
    out = np.ascontiguousarray(x, dtype=np.float32) * np.float32(rng.uniform(0.6, 1.6))
    out += np.float32(rng.uniform(-0.4, 0.4))
    if rng.random() < 0.3:
        out = np.asarray(cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.5, 1.2))),
                         dtype=np.float32)
    if rng.random() < 0.5:
        out += rng.normal(0.0, rng.uniform(0.05, 0.4), out.shape).astype(np.float32)
    return np.clip(out, -bound, bound), np.ascontiguousarray(masks)


class TileSampler(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Random tiles, reproducible from (seed, epoch, index) so workers need no shared state."""

    def __init__(self, refs: Sequence[LayerRef], classes: Sequence[str], info: ModelInfo,
                 opts: TrainOptions) -> None:
        self.refs = list(refs)
        self.classes = tuple(classes)
        self.defect_ids = [i for i, c in enumerate(self.classes) if c != NO_DEFECT]
        self.info = info
        self.opts = opts
        self.cache = LayerCache(classes, opts.cache_mb, norm=info.norm)
        self.epoch = 0
        # Real clean frames, when given: one tile of every batch is drawn from them, so
        # every step sees a bed that must stay quiet.
        self.clean = [r for r in self.refs if r.dataset.source.get("generator") == CLEAN_FRAMES]
        self.parts = [r for r in self.refs if r not in self.clean] or self.refs

    def __len__(self) -> int:
        return self.opts.steps_per_epoch * self.opts.batch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.opts.seed, self.epoch, index))
        slot = index % self.opts.batch
        is_flat = self.info.norm in FLAT_NORMS
        if is_flat and slot == 0 and self.clean:
            pool = self.clean
        else:
            pool = self.parts if is_flat else self.refs
        ref = pool[int(rng.integers(len(pool)))]
        gray, masks, where = self.cache.get(ref)
        t = self.opts.tile
        h, w = gray.shape
        present = [c for c in self.defect_ids if where[c].size]
        # With "flat", the second tile of a batch is placed anywhere: healthy parts and
        # powder are negatives every step, not only when the bias misses.
        biased = not (is_flat and slot == 1) and rng.random() < self.opts.defect_bias
        if present and biased:
            # Pick the class first, then one of its pixels: rare classes are seen as often as
            # common ones, and a defect lands anywhere in the tile, not only in its centre.
            cls = present[int(rng.integers(len(present)))]
            flat = int(where[cls][int(rng.integers(where[cls].size))])
            cy, cx = divmod(flat, w)
            y0 = cy - int(rng.integers(t // 8, t - t // 8))
            x0 = cx - int(rng.integers(t // 8, t - t // 8))
        else:
            y0, x0 = int(rng.integers(max(h - t, 0) + 1)), int(rng.integers(max(w - t, 0) + 1))
        y0, x0 = min(max(y0, 0), max(h - t, 0)), min(max(x0, 0), max(w - t, 0))
        g = gray[y0:y0 + t, x0:x0 + t]
        m = masks[:, y0:y0 + t, x0:x0 + t]
        if g.shape != (t, t):  # a layer smaller than the tile: reflect-pad like serving
            ph, pw = t - g.shape[0], t - g.shape[1]
            g = np.pad(g, ((0, ph), (0, pw)), mode="reflect")
            m = np.pad(m, ((0, 0), (0, ph), (0, pw)), mode="reflect")
        if is_flat:
            x, m = augment_flat(g, m, rng, flat_bound(self.info.norm))
            x = x[None]
        else:
            g, m = augment(g, m, rng)
            x = normalize(g, self.info.mean, self.info.std)[None]
        return torch.from_numpy(x.copy()), torch.from_numpy(m.astype(np.float32))


# --- the loop --------------------------------------------------------------------------


def positive_weights(sampler: TileSampler, opts: TrainOptions, n_batches: int = 16) -> torch.Tensor:
    """Per-class weight of positive pixels: sqrt(neg/pos) over tiles as training sees them."""
    c = len(sampler.classes)
    if opts.pos_weight == "none":
        return torch.ones(c)
    if opts.pos_weight != "auto":
        return torch.full((c,), float(opts.pos_weight))
    pos = np.zeros(c)
    total = 0
    for i in range(min(n_batches * opts.batch, len(sampler))):
        _, m = sampler[i]
        pos += m.sum(dim=(1, 2)).numpy()
        total += m[0].numel()
    neg = total - pos
    w = np.sqrt(neg / np.maximum(pos, 1.0))
    return torch.tensor(np.clip(w, 1.0, opts.pos_weight_max), dtype=torch.float32)
