"""Synthetic defects pasted into a printer's own layers, with their exact masks.

No real layer comes with defect masks, so recall on a real camera is measured (and kept,
while adapting) by pasting defects into real layers. Each defect is defined against what is
around it in *this* image, never by an absolute grey level:

- over_melting: a smooth, glossy spot inside a part, clearly brighter than that part;
- under_melting: a rough, porous spot inside a part, clearly darker than that part;
- swelling: a raised blob on a part's edge reaching into the powder, lit on one side and
  shadowed on the other;
- spatter: specks on the powder near a part, brighter or darker than that powder;
- misprint: loose scan tracks on the powder next to a part: stripes of the layer's own
  melt texture (cut from a part) across a patch, each track ending raggedly, as far from
  the powder as the melt around their source is and at least clearly apart from it.

"Clearly" is in the part's own spread (its MAD) and its distance to black or white, so the
same defect is as visible on a dull camera as on a bright one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from monitor.geometry.parts import disk
from monitor.geometry.stray import feature_scale
from monitor.training.dataset import (
    PASTE_GENERATOR,
    DatasetError,
    DatasetWriter,
    open_dataset,
    staged_folder,
    write_png,
)
from monitor.vision.classes import DEFAULT_CLASS_NAMES, NO_DEFECT

U8 = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]
Bool = npt.NDArray[np.bool_]

PASTED = ("swelling", "spatter", "misprint", "over_melting", "under_melting")


@dataclass(frozen=True)
class Pasted:
    """One pasted defect: its class and its pixels."""

    cls: str
    mask: Bool  # (H, W)


def _dilate(m: Bool, r: int) -> Bool:
    return cv2.dilate(m.view(np.uint8), disk(r)).astype(bool) if r > 0 else m


def _stats(img: F32, where: Bool) -> tuple[float, float]:
    """Median and robust spread (1.4826 MAD, at least 2 grey levels) of img over where."""
    v = img[where]
    if v.size == 0:
        return float(np.median(img)), 8.0
    med = float(np.median(v))
    return med, max(2.0, 1.4826 * float(np.median(np.abs(v - med))))


class Paster:
    """Pastes defects into one image. `scale` is the image's feature size: defects are sized
    relative to it (1.0 for a ~1000 px bed). Every defect is drawn in a box around it, and
    where it may go comes from two distance transforms, so a 5 Mpx layer takes well under a
    second."""

    def __init__(self, image: U8, part: Bool, rng: np.random.Generator, *,
                 scale: float | None = None) -> None:
        self.img = image.astype(np.float32)
        self.part = part
        self.rng = rng
        h, w = image.shape
        self.scale = scale if scale is not None else feature_scale((h, w))
        self.taken = np.zeros((h, w), dtype=bool)
        self.out: list[Pasted] = []
        p8 = part.astype(np.uint8)
        # Distance of every pixel to the powder (inside parts) and to a part (outside).
        self.d_in = cv2.distanceTransform(p8, cv2.DIST_L2, 3)
        self.d_out = cv2.distanceTransform(1 - p8, cv2.DIST_L2, 3)

    def _box(self, cx: float, cy: float, half: float) -> tuple[slice, slice]:
        h, w = self.img.shape
        y0, y1 = max(0, int(cy - half)), min(h, int(cy + half) + 2)
        x0, x1 = max(0, int(cx - half)), min(w, int(cx + half) + 2)
        return slice(y0, y1), slice(x0, x1)

    def _blob(self, cx: float, cy: float, r: float) -> tuple[tuple[slice, slice], Bool]:
        """An irregular round region, as a box of the image and the region inside it."""
        box = self._box(cx, cy, 1.6 * r)
        ys, xs = np.ogrid[box[0], box[1]]
        phi = np.arctan2(ys - cy, xs - cx)
        rad: npt.NDArray[np.float64] = np.full(phi.shape, r)
        for k in (2, 3, 5):
            rad = rad + r * self.rng.uniform(0.0, 0.18) * np.cos(k * phi + self.rng.uniform(0, 7))
        inside = ((xs - cx) ** 2 + (ys - cy) ** 2) <= rad * rad
        return box, np.asarray(inside & ~self.taken[box])

    def _pick(self, where: Bool) -> tuple[float, float] | None:
        ys, xs = np.nonzero(where & ~self.taken)
        if len(ys) == 0:
            return None
        i = int(self.rng.integers(len(ys)))
        return float(xs[i]), float(ys[i])

    def _keep(self, cls: str, box: tuple[slice, slice], mask: Bool) -> None:
        full = np.zeros(self.img.shape, dtype=bool)
        full[box] = mask
        pad = max(6, round(12 * self.scale))
        grown = self._box((box[1].start + box[1].stop) / 2, (box[0].start + box[0].stop) / 2,
                          max(box[0].stop - box[0].start, box[1].stop - box[1].start) / 2
                          + pad)
        self.taken[grown] |= _dilate(full[grown], pad)
        self.out.append(Pasted(cls, full))

    def _inside(self, r: float) -> tuple[tuple[slice, slice], Bool, float, float] | None:
        p = self._pick(self.d_in > r * 1.2 + 2)
        if p is None:
            return None
        box, blob = self._blob(p[0], p[1], r)
        blob &= self.part[box]
        if blob.sum() < 0.5 * math.pi * r * r:
            return None
        wide = self._box(p[0], p[1], 3.5 * r)
        local = self.part[wide].copy()
        local[box[0].start - wide[0].start:box[0].stop - wide[0].start,
              box[1].start - wide[1].start:box[1].stop - wide[1].start] &= ~blob
        med, spread = _stats(self.img[wide], local)
        return box, blob, med, spread

    def over_melting(self) -> bool:
        r = self.rng.uniform(10, 28) * self.scale
        got = self._inside(r)
        if got is None:
            return False
        box, blob, med, spread = got
        lift = max(5.0 * spread, 0.45 * (255.0 - med), 35.0)
        f = cv2.GaussianBlur(blob.astype(np.float32), (0, 0), max(1.0, r / 6))
        wgt = np.minimum(1.0, 1.6 * f) * blob
        tex = med + lift + self.rng.normal(0.0, 0.3 * spread, blob.shape)
        crop = self.img[box]
        crop[...] = crop * (1 - wgt) + tex.astype(np.float32) * wgt
        self._keep("over_melting", box, blob)
        return True

    def under_melting(self) -> bool:
        r = self.rng.uniform(10, 28) * self.scale
        got = self._inside(r)
        if got is None:
            return False
        box, blob, med, spread = got
        drop = max(5.0 * spread, 0.5 * med, 35.0)
        crop = self.img[box]
        # The part's own texture shows faintly through a darker, rougher surface with pores.
        rough = cv2.GaussianBlur(self.rng.standard_normal(blob.shape).astype(np.float32),
                                 (0, 0), 0.8)
        tex = 0.4 * (crop - med) + med - drop + 2.0 * spread * rough
        pores = self.rng.random(blob.shape) < 0.08
        tex = np.where(pores, 0.35 * (med - drop), tex)
        crop[blob] = tex[blob]
        self._keep("under_melting", box, blob)
        return True

    def swelling(self) -> bool:
        p = self._pick((self.d_in > 0) & (self.d_in <= 2))
        if p is None:
            return False
        r = self.rng.uniform(9, 22) * self.scale
        box, blob = self._blob(p[0], p[1], r)
        if blob.sum() < 0.5 * math.pi * r * r:
            return False
        wide = self._box(p[0], p[1], 3 * r)
        med, spread = _stats(self.img[wide], self.part[wide])
        lift = max(4.0 * spread, 0.4 * (255.0 - med), 30.0)
        rim = max(1, round(0.15 * r))
        lit = blob & ~np.roll(np.roll(blob, rim, 0), rim, 1)
        shadow = blob & ~np.roll(np.roll(blob, -rim, 0), -rim, 1)
        tex = med + lift + self.rng.normal(0.0, spread, blob.shape).astype(np.float32)
        tex[lit] = min(255.0, med + 1.6 * lift)
        tex[shadow] = max(0.0, med - lift)
        crop = self.img[box]
        crop[blob] = tex[blob]
        self._keep("swelling", box, blob)
        return True

    def spatter(self) -> bool:
        reach = 60 * self.scale
        ring = (self.d_out > max(5.0, 6 * self.scale)) & (self.d_out < reach)
        p = self._pick(ring)
        if p is None:
            return False
        box = self._box(p[0], p[1], reach / 2)
        med, spread = _stats(self.img[box], ring[box])
        mask = np.zeros(self.img[box].shape, dtype=bool)
        where = ring[box] & ~self.taken[box]
        ys, xs = np.nonzero(where)
        if len(ys) == 0:
            return False
        for i in self.rng.permutation(len(ys))[:int(self.rng.integers(4, 10))]:
            d = int(self.rng.integers(2, 5 + round(2 * self.scale)))
            speck = np.zeros(mask.shape, dtype=np.uint8)
            cv2.circle(speck, (int(xs[i]), int(ys[i])), max(1, d // 2), 1, -1)
            s = speck.astype(bool) & ~_dilate(mask, 4)
            if not s.any():
                continue
            off = max(6.0 * spread, 60.0)
            v = min(255.0, med + off) if self.rng.random() < 0.5 else max(0.0, med - off)
            self.img[box][s] = v + self.rng.normal(0.0, 3.0, int(s.sum()))
            mask |= s
        if not mask.any():
            return False
        self._keep("spatter", box, mask)
        return True

    def misprint(self) -> bool:
        gap = max(4, round(8 * self.scale))
        r = self.rng.uniform(14, 36) * self.scale
        p = self._pick((self.d_out > gap + r + 1) & (self.d_out < gap + 2 * r))
        src = self._pick(self.d_in > 1.6 * r + 2)
        if p is None or src is None:
            return False
        box = self._box(p[0], p[1], 1.6 * r)
        ys, xs = np.ogrid[box[0], box[1]]
        # Tracks across the patch at a random angle; each ends where it ends.
        ang = self.rng.uniform(0, math.pi)
        u = (xs - p[0]) * math.cos(ang) + (ys - p[1]) * math.sin(ang)
        v = -(xs - p[0]) * math.sin(ang) + (ys - p[1]) * math.cos(ang)
        pitch = max(3.0, self.rng.uniform(3.0, 6.0) * self.scale)
        n = int(2 * r / pitch) + 2
        track = np.clip(((u + r) / pitch).astype(np.int64), 0, n - 1)
        lo = -r * self.rng.uniform(0.35, 1.0, n)
        hi = r * self.rng.uniform(0.35, 1.0, n)
        region = (np.abs(u) <= r) & (v >= lo[track]) & (v <= hi[track])
        region &= (self.d_out[box] > gap) & ~self.taken[box]
        if region.sum() < 0.4 * math.pi * r * r:
            return False
        # The layer's own melt texture, moved from inside a part onto the powder; the
        # poorly fused tracks alternate with the powder between them.
        dy, dx = int(src[1] - p[1]), int(src[0] - p[0])
        h, w = self.img.shape
        yi = np.clip(np.arange(box[0].start, box[0].stop) + dy, 0, h - 1)
        xi = np.clip(np.arange(box[1].start, box[1].stop) + dx, 0, w - 1)
        moved = self.img[np.ix_(yi, xi)]
        # Its level: the layer's melt against its powder, at least clearly apart from the
        # powder it lies on (a patch of melt as grey as the powder would be no defect).
        wide = self._box(p[0], p[1], 3 * r)
        powder, spread = _stats(self.img[wide], ~self.part[wide] & ~self.taken[wide])
        # melt and powder around the source (the box reaches past its part's edge)
        near = self._box(src[0], src[1], float(self.d_in[int(src[1]), int(src[0])]) + 3 * r)
        melt = _stats(self.img[near], self.part[near])[0] - \
            _stats(self.img[near], ~self.part[near])[0]
        sign = math.copysign(1.0, melt) if melt else float(self.rng.choice([-1.0, 1.0]))
        level = powder + sign * max(abs(melt), 5.0 * spread, 35.0)
        moved = moved - float(np.median(moved)) + float(np.clip(level, 0.0, 255.0))
        crest = np.cos(2 * math.pi * u / pitch) > -0.3
        crop = self.img[box]
        fill = region & crest
        crop[fill] = moved[fill]
        self._keep("misprint", box, region)
        return True

    def result(self, classes: Sequence[str] = DEFAULT_CLASS_NAMES) -> tuple[U8, Bool]:
        """The image and per-class masks (no_defect: powder away from parts and pastes)."""
        masks = np.zeros((len(classes), *self.img.shape), dtype=bool)
        for p in self.out:
            if p.cls in classes:
                masks[classes.index(p.cls)] |= p.mask
        if "no_defect" in classes:
            masks[classes.index("no_defect")] = ~(self.part | masks.any(axis=0))
        return np.clip(self.img + 0.5, 0, 255).astype(np.uint8), masks


def paste_defects(image: U8, part: Bool, rng: np.random.Generator, *,
                  counts: dict[str, int] | None = None,
                  classes: Sequence[str] = DEFAULT_CLASS_NAMES,
                  scale: float | None = None) -> tuple[U8, Bool, list[Pasted]]:
    """Paste defects into a (H, W) uint8 layer whose nominal parts (in its pixels) are
    `part`. `counts`: how many of each class to try (default one each); `scale`: the size
    of defects, by default from the image's size (give the whole layer's, feature_scale,
    when pasting into a crop of it). Returns the image, (C, H, W) masks in `classes` order
    and the pasted defects one by one."""
    paster = Paster(image, part, rng, scale=scale)
    todo = counts if counts is not None else {c: 1 for c in PASTED}
    for cls, n in todo.items():
        if cls not in PASTED:
            raise ValueError(f"cannot paste class {cls!r}; classes: {', '.join(PASTED)}")
        for _ in range(n):
            for _attempt in range(4):
                if getattr(paster, cls)():
                    break
    img, masks = paster.result(classes)
    return img, masks, paster.out


def paste_dataset(src: Path, out: Path, *, per_class: int = 2, seed: int = 0) -> Path:
    """A copy of dataset `src` with defects pasted into every layer: training examples of
    defects defined against their own surroundings, on any camera look (healthy builds of
    varied synthetic cameras are the usual source). `src` needs its nominal slices (the
    part masks the defects are placed by); its own masks are kept, and the pasted classes
    are added to them. Returns the manifest path."""
    ds = open_dataset(src)
    template = ds.source.get("nominal")
    if not isinstance(template, str):
        raise DatasetError(f"{src}: its manifest names no nominal slices (source.nominal); "
                           f"defects are placed by the parts")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: already exists and is not an empty folder")
    counts = {c: per_class for c in PASTED if c in ds.classes}
    with staged_folder(out) as tmp:
        writer = DatasetWriter(tmp, ds.classes)
        for i, name in enumerate(ds.names):
            gray, own = ds.sample(name)
            part = ds.nominal(name, gray.shape)
            assert part is not None  # the template was checked above
            img = np.round(gray * 255.0).astype(np.uint8)
            img, masks, _ = paste_defects(img, part, np.random.default_rng([seed, i]),
                                          counts=counts, classes=ds.classes)
            masks |= own
            if NO_DEFECT in ds.classes:
                k = ds.classes.index(NO_DEFECT)
                masks[k] = own[k] & ~np.delete(masks, k, axis=0).any(axis=0)
            writer.add(name, img, masks)
            target = tmp / template.format(layer=ds.layer_number(name))
            target.parent.mkdir(parents=True, exist_ok=True)
            write_png(target, np.where(part, 255, 0).astype(np.uint8))
        writer.finish({"generator": PASTE_GENERATOR, "from": ds.root.name,
                       "from_source": ds.source, "per_class": per_class, "seed": seed,
                       "nominal": template})
    return out / "manifest.json"
