"""Adapting the running weights to one printer's camera, without anyone drawing a mask.

What a printer's own layers teach, and how:

- **builds marked good** (`pbf-monitor mark-good`): every defect class is 0 on every pixel
  (spatter only on the parts: good builds throw spatter onto the powder too);
  the nominal slices say where metal is, so `no_defect` (powder) is 1 away from the parts
  and 0 on them, and left out in a band along their outlines (registration is never exact);
- **synthetic defects pasted into those layers** (monitor.training.paste): positives on
  this very camera, so recall is kept while false alarms are trained away;
- **alarm verdicts**: a `false_alarm` on a defect-class alarm makes that class 0 on that
  layer; a `confirmed` one makes what the model marked of that class on that layer a target;
- **synthetic varied builds** (a quarter of each batch): the classes as the generator
  defines them, so the model does not forget what it has not seen on this printer.

Before and after, the held-out layers of this printer are measured (monitor.training.onsite):
the share of the nominal parts marked as defects and the recall of pasted defects. Weights
that got worse on either are not written.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from monitor.config import Config, PrinterConfig
from monitor.errors import MonitorError
from monitor.geometry.reading import MISPRINT
from monitor.geometry.stray import feature_scale
from monitor.records import VerdictAlarm
from monitor.training.onsite import (
    FOUND_SHARE,
    THRESHOLD_GRID,
    PastedShares,
    Site,
    SiteLayer,
    SiteScore,
    pasted_shares,
    score,
)
from monitor.training.paste import PASTED, paste_defects
from monitor.training.synth import CLASS_NAMES, BuildGenerator
from monitor.vision.classes import NO_DEFECT
from monitor.vision.imaging import FLAT_NORMS, apply_flat, flat_terms
from monitor.vision.model import file_sha256, load_weights, save_weights
from monitor.vision.segmenter import Segmenter, SegmenterOptions, resolve_device

log = logging.getLogger(__name__)

U8 = npt.NDArray[np.uint8]
Bool = npt.NDArray[np.bool_]
F32 = npt.NDArray[np.float32]


class AdaptError(MonitorError):
    """Adapting cannot start: no layers, no slices, no camera id, weights of another kind."""


@dataclass(frozen=True)
class AdaptOptions:
    """What decides an adaptation run (recorded in the model card)."""

    steps: int = 300
    batch: int = 8
    tile: int = 256
    lr: float = 5e-4
    paste_share: float = 0.5  # share of real tiles with defects pasted in
    synth_share: float = 0.25  # share of each batch from synthetic varied builds
    band_px: int = 6  # no_defect is not trained this close to a nominal outline
    holdout: float = 0.3  # share of each build's last layers held out (no --holdout-build)
    max_recall_drop: float = 0.05  # a pasted class may lose this much recall, no more
    recalibrate: bool = True  # choose the thresholds anew on the good layers (calibrated)
    # Defects of each class pasted per layer, to measure and calibrate by: one copy of the
    # layer takes them all, so more cost nothing; with 2, one missed spatter speck of 10
    # on the SLM held-out layers read as a recall drop of 0.1 (with 5: 0.96, not 0.8).
    pasted_per_layer: int = 5
    calibration_layers: int = 12  # good layers (evenly spread) the thresholds are chosen on
    seed: int = 0
    device: str = "auto"


@dataclass
class _Layer:
    """A training layer in memory: flat-field terms, labels and their weights."""

    name: str
    gray: U8
    bg: F32
    spread: float
    part: Bool  # nominal parts (all False when the layer has no slice)
    target: F32  # (C, H, W)
    weight: F32  # (C, H, W): 0 = not trained there
    pasteable: bool  # defects may be pasted in (a good layer with a slice)


@dataclass
class AdaptResult:
    weights: Path
    card: Path
    written: bool
    reason: str
    before: SiteScore
    after: SiteScore
    card_data: dict[str, Any] = field(default_factory=dict)


def split_holdout(items: Sequence[SiteLayer], share: float) -> tuple[list[SiteLayer],
                                                                      list[SiteLayer]]:
    """(train, held out): the last `share` of each build's layers (at least one) are held
    out when the build has two layers or more."""
    train: list[SiteLayer] = []
    held: list[SiteLayer] = []
    for build in sorted({i.build for i in items}):
        mine = sorted((i for i in items if i.build == build), key=lambda i: i.layer)
        k = max(1, round(share * len(mine))) if len(mine) > 1 else 0
        train += mine[:len(mine) - k]
        held += mine[len(mine) - k:]
    return train, held


def _labels(names: Sequence[str], part: Bool, band_px: int) -> tuple[F32, F32]:
    """Targets and weights of a good layer: no defect anywhere; powder away from parts."""
    c = len(names)
    h, w = part.shape
    target = np.zeros((c, h, w), dtype=np.float32)
    weight = np.ones((c, h, w), dtype=np.float32)
    if "spatter" in names:
        # Every real build throws spatter onto the powder, good ones too: off the parts a
        # good build says nothing about it (pasted specks still teach it).
        weight[names.index("spatter")][~part] = 0.0
    if NO_DEFECT in names:
        i = names.index(NO_DEFECT)
        target[i] = ~part
        if part.any():
            k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band_px + 1,) * 2)
            p8 = part.astype(np.uint8)
            band = cv2.dilate(p8, k).astype(bool) & ~cv2.erode(p8, k).astype(bool)
            weight[i][band] = 0.0
    return target, weight


class _Batches:
    """Tiles for each step: real layers (some with pasted defects) and synthetic ones."""

    def __init__(self, layers: list[_Layer], synth: list[tuple[F32, Bool]],
                 names: Sequence[str], opts: AdaptOptions, *, soft: bool,
                 pasted: Sequence[str] = PASTED) -> None:
        self.layers, self.synth, self.names, self.opts = layers, synth, tuple(names), opts
        self.soft = soft  # the weights' "flat-soft" normalisation
        self.pasted = tuple(c for c in pasted if c in self.names)  # classes taught by pasting

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.opts.seed, 5, step])
        n_synth = round(self.opts.synth_share * self.opts.batch) if self.synth else 0
        xs, ys, ws = [], [], []
        for k in range(self.opts.batch):
            x, y, w = self._synth(rng) if k < n_synth else self._real(rng)
            r = int(rng.integers(4))
            x, y, w = np.rot90(x, r), np.rot90(y, r, (1, 2)), np.rot90(w, r, (1, 2))
            if rng.random() < 0.5:
                x, y, w = x[:, ::-1], y[:, :, ::-1], w[:, :, ::-1]
            xs.append(np.ascontiguousarray(x)[None])
            ys.append(np.ascontiguousarray(y))
            ws.append(np.ascontiguousarray(w))
        return (torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)),
                torch.from_numpy(np.stack(ws)))

    def _window(self, rng: np.random.Generator, h: int, w: int, near: Bool | None,
                t: int) -> tuple[slice, slice]:
        """A t x t window (or the whole layer, if smaller), mostly around `near` pixels."""
        if near is not None and near.any() and rng.random() < 0.7:
            step = 4 if near.size > 1 << 18 else 1
            yy, xx = np.nonzero(near[::step, ::step])
            i = int(rng.integers(len(yy)))
            cy, cx = int(yy[i]) * step, int(xx[i]) * step
            y0, x0 = cy - int(rng.integers(t // 8, t - t // 8)), cx - int(
                rng.integers(t // 8, t - t // 8))
        else:
            y0, x0 = int(rng.integers(max(h - t, 0) + 1)), int(rng.integers(max(w - t, 0) + 1))
        y0, x0 = min(max(y0, 0), max(h - t, 0)), min(max(x0, 0), max(w - t, 0))
        return slice(y0, y0 + t), slice(x0, x0 + t)

    def _real(self, rng: np.random.Generator) -> tuple[F32, F32, F32]:
        """A tile of a real layer. With pasting, defects go into a window twice the tile's
        side (at the whole layer's scale, as evaluate-camera pastes them) and the tile is
        then cut around one of them."""
        lay = self.layers[int(rng.integers(len(self.layers)))]
        h, w = lay.gray.shape
        t = self.opts.tile
        paste = lay.pasteable and rng.random() < self.opts.paste_share
        big = self._window(rng, h, w, lay.part, 2 * t if paste else t)
        gray = lay.gray[big]
        target, weight = lay.target[:, big[0], big[1]], lay.weight[:, big[0], big[1]]
        focus = None
        if paste:
            counts = dict.fromkeys(self.pasted, 1)
            gray, masks, pasted = paste_defects(gray, lay.part[big], rng, counts=counts,
                                                classes=self.names,
                                                scale=feature_scale(lay.gray.shape))
            if pasted:
                target, weight = target.copy(), weight.copy()
                for i, c in enumerate(self.names):
                    if c != NO_DEFECT:
                        target[i] = np.maximum(target[i], masks[i])
                        weight[i][masks[i]] = 1.0
                    else:
                        target[i][masks.any(axis=0)] = 0.0
                focus = pasted[int(rng.integers(len(pasted)))].mask
        x = apply_flat(gray.astype(np.float32) / np.float32(255.0), lay.bg[big], lay.spread,
                       soft=self.soft)
        if paste:  # the tile inside the big window, on a pasted defect when there is one
            box = self._window(rng, gray.shape[0], gray.shape[1], focus, t)
            x, target, weight = x[box], target[:, box[0], box[1]], weight[:, box[0], box[1]]
        return _pad(x, target, weight, t)

    def _synth(self, rng: np.random.Generator) -> tuple[F32, F32, F32]:
        x, masks = self.synth[int(rng.integers(len(self.synth)))]
        h, w = x.shape
        box = self._window(rng, h, w, np.asarray(masks[1:].any(axis=0)), self.opts.tile)
        m = masks[:, box[0], box[1]].astype(np.float32)
        return _pad(x[box], m, np.ones_like(m), self.opts.tile)


def _pad(x: F32, y: F32, w: F32, t: int) -> tuple[F32, F32, F32]:
    ph, pw = t - x.shape[0], t - x.shape[1]
    if ph <= 0 and pw <= 0:
        return x, y, w
    x = np.pad(x, ((0, ph), (0, pw)), mode="reflect")
    y = np.pad(y, ((0, 0), (0, ph), (0, pw)), mode="reflect")
    w = np.pad(w, ((0, 0), (0, ph), (0, pw)))  # padding is not trained
    return x, y, w


def _synthetic(names: Sequence[str], seed: int, *, soft: bool) -> list[tuple[F32, Bool]]:
    """Two small varied synthetic builds, flattened, with masks in the model's order."""
    if set(names) != set(CLASS_NAMES):
        return []  # a model of other classes: the generator cannot keep them
    order = [CLASS_NAMES.index(c) for c in names]
    out = []
    for s in (seed * 2 + 9001, seed * 2 + 9002):
        gen = BuildGenerator(size=512, layers=8, seed=s, camera="varied")
        for lay in gen:
            g = lay.image.astype(np.float32) / 255.0
            bg, spread = flat_terms(g)
            out.append((apply_flat(g, bg, spread, soft=soft), lay.masks[order]))
    return out


def _load_layers(site: Site, items: Sequence[SiteLayer], names: Sequence[str],
                 opts: AdaptOptions, *, good: bool,
                 verdicts: dict[tuple[str, int], list[VerdictAlarm]],
                 before: Segmenter) -> list[_Layer]:
    out = []
    for item in items:
        gray, part = site.load(item)
        has_slice = part is not None
        part = part if part is not None else np.zeros(gray.shape, dtype=bool)
        g = gray.astype(np.float32) / 255.0
        bg, spread = flat_terms(g)
        if good:
            target, weight = _labels(names, part, opts.band_px)
            if not has_slice and NO_DEFECT in names:
                weight[names.index(NO_DEFECT)] = 0.0  # where metal is, is unknown
        else:
            target = np.zeros((len(names), *gray.shape), dtype=np.float32)
            weight = np.zeros_like(target)
        marks = verdicts.get((item.build, item.layer), [])
        pred = (before.predict(g, probs=False).masks
                if any(v.verdict == "confirmed" for v in marks) else None)
        for v in marks:
            if v.class_name not in names or v.class_name == NO_DEFECT:
                continue
            i = names.index(v.class_name)
            weight[i] = 1.0
            target[i] = pred[i] if pred is not None and v.verdict == "confirmed" else 0.0
        out.append(_Layer(f"{item.build}/{item.layer}", gray, bg, spread, part, target,
                          weight, good and has_slice))
    return out


def adapt(
    cfg: Config,
    printer: PrinterConfig,
    *,
    weights: Path,
    out: Path,
    train_items: Sequence[SiteLayer],
    holdout_items: Sequence[SiteLayer],
    verdict_items: Sequence[tuple[SiteLayer, VerdictAlarm]] = (),
    opts: AdaptOptions = AdaptOptions(),
    command: str = "",
    on_step: Callable[[int, int, float], None] | None = None,
) -> AdaptResult:
    """Fine-tune `weights` on a printer's good layers, measure before and after on the
    held-out layers, and write `out` (with a model card) unless it got worse."""
    camera_id = printer.camera.id
    if not camera_id:
        raise AdaptError("camera.id is empty: name this camera in the config ([camera] id) "
                         "so the adapted weights can say which camera they fit")
    if not train_items:
        raise AdaptError("no layers to adapt on: mark a finished healthy build good "
                         "(pbf-monitor mark-good BUILD) or name one with --build")
    site = Site(printer)
    if site.slices is None:
        raise AdaptError("geometry.nominal is empty: adapt needs the builds' nominal "
                         "slices to know where metal is")
    model, info = load_weights(weights)
    if info.norm not in FLAT_NORMS:
        raise AdaptError(f"{weights}: its input normalisation is {info.norm!r}; adapt needs "
                         "weights trained with --norm flat or flat-soft")
    names = info.class_names
    seg_opts = SegmenterOptions.from_config(cfg, weights)
    before_seg = Segmenter(weights, seg_opts)
    t0 = time.perf_counter()
    before = score(before_seg, site, holdout_items, seed=opts.seed,
                   per_class=opts.pasted_per_layer)
    log.info("before: %s", _summary(before))

    by_layer: dict[tuple[str, int], list[VerdictAlarm]] = {}
    for item, v in verdict_items:
        by_layer.setdefault((item.build, item.layer), []).append(v)
    train_keys = {(i.build, i.layer) for i in train_items}
    layers = _load_layers(site, train_items, names, opts, good=True, verdicts=by_layer,
                          before=before_seg)
    extra = [item for item, _ in verdict_items if (item.build, item.layer) not in train_keys]
    extra = list({(i.build, i.layer): i for i in extra}.values())
    layers += _load_layers(site, extra, names, opts, good=False, verdicts=by_layer,
                           before=before_seg)
    soft = info.norm == "flat-soft"
    # Misprints on the powder are found by their texture when the slice is read
    # (geometry.stray_track_z): taught by pasting too, the weights learnt to mark this
    # camera's melt as misprint inside its parts (held-out part area 0.64% -> 1.29%).
    pasted = [c for c in PASTED
              if not (c == MISPRINT and printer.geometry.stray_track_z > 0)]
    batches = _Batches(layers, _synthetic(names, opts.seed, soft=soft), names, opts,
                       soft=soft, pasted=pasted)

    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    model = model.to(device)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=1e-4)
    pos = torch.tensor([1.0 if c == NO_DEFECT else 10.0 for c in names],
                       device=device)[None, :, None, None]
    bce = nn.BCEWithLogitsLoss(reduction="none", pos_weight=pos)
    for step in range(opts.steps):
        x, y, w = (t.to(device) for t in batches.batch(step))
        lr = opts.lr * 0.5 * (1.0 + math.cos(math.pi * step / opts.steps))
        for g in optim.param_groups:
            g["lr"] = lr
        loss = (bce(model(x), y) * w).sum() / w.sum().clamp(min=1.0)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if on_step is not None:
            on_step(step + 1, opts.steps, float(loss.detach()))
    model = model.cpu().eval()

    cameras = tuple(dict.fromkeys([*info.adapted_cameras, camera_id]))
    facts = {**info.training, "adapted": {
        "camera": camera_id, "from_sha256": info.sha256, "steps": opts.steps,
        "layers": len(layers), "at": datetime.now(UTC).isoformat(timespec="seconds")}}
    new_info = replace(info, adapted_cameras=cameras, training=facts, sha256="")
    tmp = out.with_name(f".{out.name}.candidate")
    save_weights(tmp, model, new_info)
    try:
        chosen: dict[str, Any] = {}
        if opts.recalibrate:
            good = [(lay.gray, lay.part) for lay in layers if lay.pasteable]
            good = [good[i] for i in _spread(len(good), opts.calibration_layers)]
            n = opts.pasted_per_layer
            chosen = calibrated(pasted_shares(before_seg, good, seed=opts.seed, per_class=n,
                                              grid=False),
                                pasted_shares(Segmenter(tmp, replace(seg_opts)), good,
                                              seed=opts.seed, per_class=n),
                                {c: float(t) for c, t in zip(names, before_seg.thresholds,
                                                             strict=True)})
            new_info = replace(new_info, thresholds={
                **new_info.thresholds, **{c: v["threshold"] for c, v in chosen.items()}})
            save_weights(tmp, model, new_info)
            log.info("thresholds chosen on %d good layers: %s", len(good), ", ".join(
                f"{c} {v['from']:.2f} -> {v['threshold']:.2f}" for c, v in chosen.items()))
        after = score(Segmenter(tmp, replace(seg_opts)), site, holdout_items, seed=opts.seed,
                      per_class=opts.pasted_per_layer)
        log.info("after: %s", _summary(after))
        ok, reason = no_worse(before, after, opts)
        card = _card(out, weights, info.sha256, camera_id, opts, train_items, holdout_items,
                     verdict_items, before, after, ok, reason, command,
                     time.perf_counter() - t0)
        card["thresholds"] = chosen
        if ok:
            if out.is_file():  # the weights being replaced stay beside them
                shutil.copy2(out, out.with_name(out.stem + ".before-adapt.safetensors"))
            tmp.replace(out)
            card["sha256"] = file_sha256(out)
        card_file = out.with_suffix(".json")
        card_file.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    finally:
        tmp.unlink(missing_ok=True)
    return AdaptResult(out, card_file, ok, reason, before, after, card)


def _spread(n: int, k: int) -> list[int]:
    """At most k of range(n), evenly spread."""
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)}) if n > k else \
        list(range(n))


# A class's threshold may move to where it marks this share of the good layers' parts, even
# if the weights before marked less (0.1%: a tenth of the false area adapt aims under).
FALSE_ALLOWANCE = 0.001
# A class the weights before found less often than this is served where the adapted ones
# find at least this much, when some threshold does so without more false marks.
RECALL_FLOOR = 0.7


def calibrated(before: PastedShares, after: PastedShares, thresholds: dict[str, float]
               ) -> dict[str, dict[str, float]]:
    """Per pasted class, the threshold the adapted weights serve: the highest of
    THRESHOLD_GRID at which they still find the pasted defects of the good layers as often
    as the weights before did at theirs (`thresholds`), each with twice the pixel share
    that counts as found (a margin for layers not seen), provided they mark no more of the
    good layers' parts there than the weights before did (or FALSE_ALLOWANCE).

    Fine-tuning moves a class's probabilities: trained away from a camera's false marks, a
    class may fall below a threshold chosen for the weights before (pasted spatter found
    1.00 -> 0.10 on the SLM builds) while its defects still stand out at a lower one; a
    class the model grew sure of may take a higher one, with fewer false marks. A class
    the weights before found less than RECALL_FLOOR of the time aims at that first (the
    adapted weights may have learnt it from the pasted defects). A class with nothing
    pasted keeps its threshold, and so does one no threshold serves both ways."""
    out: dict[str, dict[str, float]] = {}
    for c in dict.fromkeys(before.classes):
        had = before.recall_own(c)
        if had is None:
            continue
        got = [after.recall_at(c, k, 2 * FOUND_SHARE) or 0.0 for k in range(len(THRESHOLD_GRID))]
        limit = max(before.false_own[c], FALSE_ALLOWANCE)
        k = None
        for want in (max(had, RECALL_FLOOR), had):
            # the highest threshold finding as often as wanted, if it adds no false marks
            ok = [i for i, r in enumerate(got) if r >= want]
            if want > 0 and ok and after.false_grid[c][ok[-1]] <= limit:
                k = ok[-1]
                break
        if k is None:
            continue
        out[c] = {"threshold": THRESHOLD_GRID[k], "from": thresholds[c],
                  "recall_before": had, "recall": got[k],
                  "false_before": before.false_own[c], "false": after.false_grid[c][k],
                  "pasted": float(before.classes.count(c))}
    return out


def no_worse(before: SiteScore, after: SiteScore, opts: AdaptOptions) -> tuple[bool, str]:
    """Whether the adapted weights may replace the running ones, and why (not)."""
    bf, af = before.mean_false, after.mean_false
    if af is None or bf is None:
        return False, "no held-out layer with a nominal slice to measure on"
    if af > bf:
        return False, (f"the held-out layers' defect area on nominal parts rose from "
                       f"{bf:.2%} to {af:.2%}")
    rb, ra = before.recall(), after.recall()
    for c in PASTED:
        b, a = rb.get(c), ra.get(c)
        if b is not None and a is not None and a < b - opts.max_recall_drop:
            return False, f"recall of pasted {c} fell from {b:.2f} to {a:.2f}"
    return True, (f"defect area on nominal parts {bf:.2%} -> {af:.2%}, mean pasted recall "
                  f"{before.mean_recall or 0:.2f} -> {after.mean_recall or 0:.2f}")


def _summary(s: SiteScore) -> str:
    return (f"{len(s.layers)} layers, defect area on parts mean {s.mean_false or 0:.2%} "
            f"max {s.max_false or 0:.2%}, pasted recall "
            + ", ".join(f"{c} {r:.2f}" for c, r in s.recall().items() if r is not None))


def _card(out: Path, weights: Path, from_sha: str, camera: str, opts: AdaptOptions,
          train: Sequence[SiteLayer], held: Sequence[SiteLayer],
          verdicts: Sequence[tuple[SiteLayer, VerdictAlarm]], before: SiteScore,
          after: SiteScore, ok: bool, reason: str, command: str, seconds: float
          ) -> dict[str, Any]:
    def names(items: Sequence[SiteLayer]) -> dict[str, list[int]]:
        d: dict[str, list[int]] = {}
        for i in items:
            d.setdefault(i.build, []).append(i.layer)
        return d

    return {
        "weights": out.name, "written": ok, "reason": reason, "camera": camera,
        "adapted_from": {"weights": weights.name, "sha256": from_sha},
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "command": command,
        "data": {"good_layers": names(train), "held_out_layers": names(held),
                 "verdicts": [{"build": i.build, "layer": i.layer, "class": v.class_name,
                               "verdict": v.verdict} for i, v in verdicts],
                 "synthetic": "two varied builds of 8 layers (pbf-monitor synth --camera "
                              "varied), a quarter of each batch"},
        "options": asdict(opts),
        "held_out": {"before": before.as_json(), "after": after.as_json()},
        "seconds": round(seconds, 1),
    }
