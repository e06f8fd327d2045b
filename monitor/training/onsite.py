"""A printer's own layers, measured without labels: how much of the nominal parts the model
marks as defects, and how many synthetic defects pasted into those layers it finds.

The nominal slices say where metal should be, so on a healthy layer any defect marked on
them is (nearly always) a false one; pasting defects into the same layers (monitor.training.
paste) measures recall on exactly this camera's look. `pbf-monitor evaluate-camera` prints
both; `pbf-monitor adapt` uses them on held-out layers before and after adapting.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from monitor.config import IMAGE_EXTENSIONS, PrinterConfig
from monitor.daemon.watcher import parse_layer_path
from monitor.errors import MonitorError
from monitor.geometry.layer import LayerGeometry, layer_geometry, nominal_slices
from monitor.geometry.parts import tolerance_px
from monitor.geometry.reading import outside_zone, read_layer
from monitor.geometry.slices import NominalSlices
from monitor.geometry.stray import stray_tracks
from monitor.training.paste import PASTED, paste_defects
from monitor.vision.classes import NO_DEFECT
from monitor.vision.segmenter import Segmenter, drop_small_components

# A pasted defect counts as found when the model marks at least this share of its pixels
# with its class.
FOUND_SHARE = 0.1


class SiteError(MonitorError):
    """A printer's layers that cannot be measured (no slices, no images)."""


@dataclass(frozen=True)
class SiteLayer:
    """One layer image of a printer, by build and layer number."""

    build: str
    layer: int
    path: Path


@dataclass
class Site:
    """A printer's watch folder and geometry: finds its layers and their nominal parts."""

    printer: PrinterConfig
    slices: NominalSlices | None = field(init=False)

    def __post_init__(self) -> None:
        self.slices = nominal_slices(self.printer.camera, self.printer.geometry)

    def layers(self, builds: Sequence[str] = ()) -> list[SiteLayer]:
        """Every layer image under the watch folder (of `builds`, when given), in order."""
        w = self.printer.watch
        root = w.dir
        if not root.is_dir():
            raise SiteError(f"watch.dir {root} is not a folder")
        pattern = re.compile(w.pattern) if w.pattern else None
        found: dict[tuple[str, int], SiteLayer] = {}
        walk = root.rglob("*") if w.recursive else root.glob("*")
        for p in sorted(walk):
            if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
                continue
            key = parse_layer_path(p.relative_to(root), pattern, layer_from=w.layer_from,
                                   layer_thickness_mm=self.printer.camera.layer_thickness_mm)
            if key is None or (builds and key.build not in builds):
                continue
            found[(key.build, key.layer)] = SiteLayer(key.build, key.layer, p)
        return [found[k] for k in sorted(found)]

    def load(self, item: SiteLayer) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_] | None]:
        """The layer as 8-bit gray, and its nominal parts in its pixels (None: no slice)."""
        img, geo = self._read(item)
        return img, None if geo.labels is None else geo.labels > 0

    def load_zones(self, item: SiteLayer) -> tuple[npt.NDArray[np.uint8],
                                                   npt.NDArray[np.bool_] | None,
                                                   npt.NDArray[np.bool_] | None]:
        """load(), and where the parts' outside thresholds apply: beyond the tolerance zone,
        within geometry.outside_reach_mm (None without a slice)."""
        img, geo = self._read(item)
        if geo.labels is None:
            return img, None, None
        g = self.printer.geometry
        tol = tolerance_px(geo.cal, geo.labels, g.tolerance_mm)
        reach = max(tol, tolerance_px(geo.cal, geo.labels, g.outside_reach_mm))
        part = geo.labels > 0
        return img, part, outside_zone(part, tol, reach)

    def _read(self, item: SiteLayer) -> tuple[npt.NDArray[np.uint8], LayerGeometry]:
        img = cv2.imread(str(item.path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise SiteError(f"{item.path}: cannot decode the image")
        geo = layer_geometry(self.printer.camera, self.printer.geometry, self.slices,
                             build=item.build, layer=item.layer, stem=item.path.stem,
                             image_shape=img.shape)
        return np.asarray(img, dtype=np.uint8), geo


@dataclass
class SiteScore:
    """False defect area on nominal parts, and recall of pasted defects, over some layers."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    pasted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PASTED, 0))
    found: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PASTED, 0))

    @property
    def mean_false(self) -> float | None:
        v = [r["defect_fraction"] for r in self.layers]
        return float(np.mean(v)) if v else None

    @property
    def max_false(self) -> float | None:
        v = [r["defect_fraction"] for r in self.layers]
        return float(np.max(v)) if v else None

    def recall(self) -> dict[str, float | None]:
        return {c: (self.found[c] / n if (n := self.pasted[c]) else None) for c in PASTED}

    @property
    def mean_recall(self) -> float | None:
        v = [r for r in self.recall().values() if r is not None]
        return float(np.mean(v)) if v else None

    def as_json(self) -> dict[str, Any]:
        return {"layers": self.layers, "mean_defect_fraction": self.mean_false,
                "max_defect_fraction": self.max_false,
                "pasted": self.pasted, "found": self.found, "recall": self.recall(),
                "mean_recall": self.mean_recall}


def score(seg: Segmenter, site: Site, items: Iterable[SiteLayer], *, paste: bool = True,
          seed: int = 0, per_class: int = 2) -> SiteScore:
    """Run the model on each layer that has a nominal slice, as the daemon would: the share
    of the nominal part area marked with any defect class, per layer; then, on a copy with
    `per_class` defects of each class pasted in, which of them it finds (read against the
    slice as the daemon reads a layer: monitor.geometry.reading)."""
    out = SiteScore()
    names = seg.class_names
    defect_ids = [i for i, c in enumerate(names) if c != NO_DEFECT]
    for n, item in enumerate(items):
        img, part, zone = site.load_zones(item)
        if part is None or zone is None or not part.any():
            continue
        g = site.printer.geometry
        masks = seg.predict(img.astype(np.float32) / 255.0, probs=False).masks
        # what the daemon would mark on the parts (the readings beyond them do not reach in)
        read = read_layer(masks, names, part, swelling_reach_px=g.swelling_reach_px,
                          gray=img, relative_k=g.relative_k)
        masks = masks if read is None else read
        marked = masks[defect_ids].any(axis=0) & part
        out.layers.append({
            "build": item.build, "layer": item.layer,
            "defect_fraction": float(marked.sum() / part.sum()),
            "classes": {names[i]: float((masks[i] & part).sum() / part.sum())
                        for i in defect_ids}})
        if not paste:
            continue
        rng = np.random.default_rng([seed, n])
        counts = {c: per_class for c in PASTED if c in names}
        img2, _, pasted = paste_defects(img, part, rng, counts=counts)
        res = seg.predict(img2.astype(np.float32) / 255.0, probs=False)
        tracks = stray_tracks(img2, zone, z_min=g.stray_track_z)
        read = read_layer(res.masks, names, part, loose=res.loose, zone=zone,
                          swelling_reach_px=g.swelling_reach_px, tracks=tracks, gray=img2,
                          relative_k=g.relative_k)
        masks2 = res.masks if read is None else read
        for p in pasted:
            hit = int((masks2[names.index(p.cls)] & p.mask).sum())
            out.pasted[p.cls] += 1
            out.found[p.cls] += hit >= max(1, FOUND_SHARE * int(p.mask.sum()))
    return out


def printer_of(printers: Sequence[PrinterConfig], name: str | None) -> PrinterConfig:
    """The printer called `name`, or the only one."""
    if name is None:
        if len(printers) > 1:
            raise SiteError(f"the config has {len(printers)} printers; name one with "
                            f"--printer ({', '.join(p.name for p in printers)})")
        return printers[0]
    for p in printers:
        if p.name == name:
            return p
    raise SiteError(f"--printer {name}: not in the config "
                    f"({', '.join(p.name or '(unnamed)' for p in printers)})")


# Thresholds a camera's calibration may choose (adapt): fine at the top, where a confident
# model's pasted defects sit.
THRESHOLD_GRID = (*(round(0.05 * k, 2) for k in range(1, 20)), 0.97, 0.98, 0.99)


@dataclass
class PastedShares:
    """Synthetic defects pasted into some layers, and how much of each a model marks: `own`
    at its thresholds (after its small-component filter, as the daemon serves it), `grid`
    at each of THRESHOLD_GRID in turn (the same filter). Also, per class, the share of the
    nominal parts (less the pasted defects) it marks: `false_own`, and `false_grid` per
    threshold."""

    classes: list[str] = field(default_factory=list)
    own: list[float] = field(default_factory=list)
    grid: list[list[float]] = field(default_factory=list)
    false_own: dict[str, float] = field(default_factory=dict)
    false_grid: dict[str, list[float]] = field(default_factory=dict)

    def recall_own(self, cls: str) -> float | None:
        v = [s >= FOUND_SHARE for c, s in zip(self.classes, self.own, strict=True) if c == cls]
        return float(np.mean(v)) if v else None

    def recall_at(self, cls: str, k: int, share: float = FOUND_SHARE) -> float | None:
        v = [g[k] >= share for c, g in zip(self.classes, self.grid, strict=True) if c == cls]
        return float(np.mean(v)) if v else None


def pasted_shares(seg: Segmenter, layers: Iterable[tuple[npt.NDArray[np.uint8],
                                                         npt.NDArray[np.bool_]]],
                  *, seed: int, per_class: int = 2, grid: bool = True) -> PastedShares:
    """Paste `per_class` defects of each class into each (image, nominal part mask) layer
    (the same ones for any model: they depend on the seed and the layer only) and measure
    the share of each that `seg` marks with its class, and the false marks around them;
    at each threshold of the grid too unless `grid` is False."""
    out = PastedShares()
    names = seg.class_names
    min_px = dict(seg.min_component_px)
    classes = [c for c in PASTED if c in names]
    false_px = {c: np.zeros(len(THRESHOLD_GRID) + 1) for c in classes}  # grid..., own
    clean_px = 0
    for n, (img, part) in enumerate(layers):
        rng = np.random.default_rng([seed, 7, n])
        img2, masks, pasted = paste_defects(img, part, rng,
                                            counts={c: per_class for c in classes},
                                            classes=names)
        res = seg.predict(img2.astype(np.float32) / 255.0, probs=grid)
        probs = res.probs if res.probs is not None else np.zeros((len(names), 0, 0))
        clean = part & ~masks.any(axis=0)  # the parts where nothing was pasted
        clean_px += int(clean.sum())
        for c in classes:
            i = names.index(c)
            mine = [p for p in pasted if p.cls == c]
            shares = [[0.0] * len(THRESHOLD_GRID) for _ in mine]
            for k, t in enumerate(THRESHOLD_GRID if grid else ()):
                m = probs[i] >= t
                if min_px.get(i, 0) > 1:
                    m = drop_small_components(m, min_px[i])[0]
                false_px[c][k] += int((m & clean).sum())
                for j, p in enumerate(mine):
                    shares[j][k] = float((m & p.mask).sum() / max(1, p.mask.sum()))
            false_px[c][-1] += int((res.masks[i] & clean).sum())
            for p, g in zip(mine, shares, strict=True):
                out.classes.append(c)
                out.own.append(float((res.masks[i] & p.mask).sum() / max(1, p.mask.sum())))
                out.grid.append(g)
    for c, px in false_px.items():
        f = px / max(1, clean_px)
        out.false_own[c] = float(f[-1])
        out.false_grid[c] = [float(v) for v in f[:-1]]
    return out
