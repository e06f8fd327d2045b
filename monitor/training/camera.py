"""Camera styles for synthetic builds: how one real camera differs from another.

A synthetic layer is first drawn on a fixed scale (powder at 100, melt at about 150, every
defect at its own offset from the part or powder around it). A camera style then photographs
that scene the way one machine would: powder at its own grey, melt brighter *or darker* than
the powder by its own amount, hatch texture and specular glints of its own strength, a
lighting gradient and vignetting, the chamber wall or a round plate's edge, ghosts of earlier
layers under the fresh powder, thin walls, rings and lattices, blur, noise, JPEG, a zoom
(pixel size) and an oblique view.

What makes a defect is kept relative: each pixel of a part is mapped as the part's new level
plus its old offset from the part's old level (scaled), so an over-melted spot stays brighter
than its own part and an under-melted one darker, whatever the melt's polarity. Brightness
against the powder alone is never what marks a defect.

The style is drawn from the build's seed, so a build looks the same on every layer, and the
same arguments give the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from monitor.training.synth_plan import F32, U8, Bool, blur, dilate, smooth_noise

if TYPE_CHECKING:
    from monitor.training.synth_render import LayerRenderer

STYLES = ("classic", "varied")  # classic: the original look, byte for byte
_SWELLING, _SPATTER, _MISPRINT, _OVER, _UNDER = 1, 2, 3, 4, 5
_MELT_LOW, _MELT_HIGH = 45.0, 228.0  # melt level limits: room for darker and brighter defects


def _place(out: U8, shape: Bool, free: Bool, n: int) -> bool:
    """Put `shape` into `out` as id n if it lies wholly in `free` (then kept clear of the
    next ones); False if it does not fit."""
    if not shape.any() or (shape & ~free).any():
        return False
    out[shape] = n
    free &= ~dilate(shape, max(4, out.shape[0] // 60))
    return True


@dataclass(frozen=True)
class CameraStyle:
    """One camera's look, fixed per build."""

    powder: float  # powder grey at the centre of the bed
    melt_delta: float  # melt minus powder (negative: melt darker, as in shared/data/slm)
    powder_texture: float  # scale of the powder's grain and streaks
    hatch: float  # scale of the melt's hatch, ripples and per-track brightness
    defect_gain: float  # scale of every defect's offset from its surroundings
    glint: float  # share of melt pixels that glint (specular speckle)
    glint_level: float  # how far a glint rises above the melt
    gradient: tuple[float, float]  # gain change across the bed in x and y
    vignette: float  # gain lost at the corners
    wall: str  # "none", "round" (round plate) or "side" (chamber wall on one side)
    wall_level: float
    wall_extent: float
    ghosts: float  # strength of earlier layers under the powder, as a share of melt_delta
    thin: int  # thin walls, rings, lattices and text-like strokes on the bed
    blur: float  # optics, in pixels
    noise: float  # sensor noise, grey levels
    jpeg: int  # quality, 0 = none
    zoom: float  # >= 1: the camera sees the centre of the bed larger (finer pixels)
    tilt: float  # oblique view: how far the far edge shrinks
    coupons: int = 0  # groups of small test coupons (squares and discs of 6-24 px)

    @classmethod
    def draw(cls, seed: int) -> CameraStyle:
        """The style of build `seed`."""
        rng = np.random.default_rng([seed, 77])
        powder = float(rng.uniform(60.0, 170.0))
        sign = -1.0 if rng.random() < 0.4 else 1.0
        delta = sign * float(rng.uniform(8.0, 90.0))
        if sign > 0 and rng.random() < 0.35:
            # Melt near saturation; its glints saturate. The melt itself stays a little below
            # white (and above black, below), or a brighter (darker) defect could not show.
            delta = 255.0 - powder + float(rng.uniform(-20.0, 30.0))
        delta = float(np.clip(delta, _MELT_LOW - powder, _MELT_HIGH - powder))
        wall = str(rng.choice(["none", "round", "side"], p=[0.35, 0.35, 0.3]))
        return cls(
            powder=powder, melt_delta=delta,
            powder_texture=float(rng.uniform(0.4, 2.0)),
            hatch=float(rng.uniform(0.2, 2.2)),
            defect_gain=float(rng.uniform(0.55, 1.1)),
            glint=float(rng.choice([0.0, rng.uniform(0.01, 0.25)], p=[0.3, 0.7])),
            glint_level=float(rng.uniform(40.0, 160.0)),
            gradient=(float(rng.uniform(-0.45, 0.45)), float(rng.uniform(-0.45, 0.45))),
            vignette=float(rng.uniform(0.0, 0.45)),
            wall=wall, wall_level=float(rng.uniform(20.0, 220.0)),
            wall_extent=float(rng.uniform(0.04, 0.15)),
            ghosts=float(rng.uniform(0.0, 0.4)),
            thin=int(rng.integers(0, 6)),
            blur=float(rng.uniform(0.0, 1.3)),
            noise=float(rng.uniform(0.5, 6.0)),
            jpeg=int(rng.choice(np.array([0, int(rng.integers(60, 96))]))),
            zoom=float(rng.choice([1.0, rng.uniform(1.0, 2.0)])),
            tilt=float(rng.choice([0.0, rng.uniform(0.0, 0.25)])),
            coupons=int(rng.integers(0, 4)),
        )

    # --- geometry that belongs to the camera or the bed, the same on every layer ---------

    def view(self, a: np.ndarray, *, nearest: bool) -> np.ndarray:
        """What the camera sees of a (H, W) or (C, H, W) bed-frame array: the zoomed crop
        through the oblique view. Masks and part maps go through it with `nearest`."""
        if self.zoom <= 1.0 and self.tilt <= 0.0:
            return a
        h, w = a.shape[-2:]
        cw, ch = w / self.zoom, h / self.zoom
        x0, y0 = (w - cw) / 2, (h - ch) / 2
        # Source quad (a crop) -> the full frame; the top edge is further away (narrower).
        k = self.tilt * cw / 2
        src = np.array([[x0 + k, y0], [x0 + cw - k, y0], [x0 + cw, y0 + ch], [x0, y0 + ch]],
                       dtype=np.float32)
        dst = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
        m = cv2.getPerspectiveTransform(src, dst)
        interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
        if a.ndim == 2:
            return self._warp(a, m, interp)
        return np.stack([self._warp(c, m, interp) for c in a])

    @staticmethod
    def _warp(a: np.ndarray, m: np.ndarray, interp: int) -> np.ndarray:
        src = a.view(np.uint8) if a.dtype == np.bool_ else a
        out = cv2.warpPerspective(src, m, (a.shape[1], a.shape[0]), flags=interp,
                                  borderMode=cv2.BORDER_REFLECT)
        return out.astype(np.bool_) if a.dtype == np.bool_ else out

    def thin_parts(self, seed: int, size: int, occupied: Bool) -> U8:
        """(H, W) map of this bed's thin structures (1..n), away from `occupied`: thin walls,
        rings, lattices and text-like strokes, 2-4 px wide, as real plates carry them."""
        out = np.zeros((size, size), dtype=np.uint8)
        if self.thin == 0:
            return out
        rng = np.random.default_rng([seed, 78])
        free = ~dilate(occupied, max(4, size // 60))
        for n in range(1, self.thin + 1):
            for _ in range(12):
                r = float(rng.uniform(0.03, 0.09)) * size
                cx, cy = (float(v) for v in rng.uniform(r + 2, size - r - 2, 2))
                canvas = np.zeros((size, size), dtype=np.uint8)
                width = int(rng.integers(2, 5))
                kind = rng.choice(["wall", "ring", "lattice", "text"])
                if kind == "wall":
                    ang = rng.uniform(0, math.pi)
                    dx, dy = r * math.cos(ang), r * math.sin(ang)
                    cv2.line(canvas, (round(cx - dx), round(cy - dy)),
                             (round(cx + dx), round(cy + dy)), 1, width)
                elif kind == "ring":
                    cv2.circle(canvas, (round(cx), round(cy)), round(r * 0.6), 1, width)
                elif kind == "lattice":
                    step = max(width + 3, round(r / rng.uniform(2.0, 4.0)))
                    x0, y0, x1, y1 = round(cx - r), round(cy - r), round(cx + r), round(cy + r)
                    for v in range(x0, x1 + 1, step):
                        cv2.line(canvas, (v, y0), (v, y1), 1, width)
                    for v in range(y0, y1 + 1, step):
                        cv2.line(canvas, (x0, v), (x1, v), 1, width)
                else:  # a few glyph-like strokes
                    pts = rng.uniform(-r, r, (int(rng.integers(3, 7)), 2))
                    pts = (pts + np.array([cx, cy])).round().astype(np.int32)
                    cv2.polylines(canvas, [pts], False, 1, width)
                if _place(out, canvas > 0, free, n):
                    break
        self._coupons(np.random.default_rng([seed, 81]), out, free)
        return out

    def _coupons(self, rng: np.random.Generator, out: U8, free: Bool) -> None:
        """Groups of small coupons: a whole part no larger than a defect, which the model
        must not take for one (real plates carry rows of them)."""
        size = out.shape[0]
        n = int(out.max())
        for _ in range(self.coupons):
            side = int(rng.integers(6, 25)) * size // 512 + 1
            rows, cols = (int(v) for v in rng.integers(2, 5, 2))
            pitch = side * float(rng.uniform(1.8, 3.0))
            disc = rng.random() < 0.4
            for _attempt in range(12):
                x0, y0 = (float(v) for v in rng.uniform(0, size - cols * pitch - side, 2))
                canvas = np.zeros((size, size), dtype=np.uint8)
                for r in range(rows):
                    for c in range(cols):
                        cx, cy = round(x0 + c * pitch + side / 2), round(y0 + r * pitch + side / 2)
                        if disc:
                            cv2.circle(canvas, (cx, cy), side // 2, 1, -1)
                        else:
                            cv2.rectangle(canvas, (cx - side // 2, cy - side // 2),
                                          (cx + side // 2, cy + side // 2), 1, -1)
                if _place(out, canvas > 0, free, n + 1):
                    n += 1
                    break

    def ghost_map(self, seed: int, index: int, size: int) -> F32:
        """(H, W) 0..1: parts of earlier layers showing through the fresh powder."""
        if self.ghosts <= 0.0:
            return np.zeros((size, size), dtype=np.float32)
        rng = np.random.default_rng([seed, 79])
        ghost = np.zeros((size, size), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 5))):
            c = rng.uniform(0.1, 0.9, 2) * size
            ax = rng.uniform(0.03, 0.12, 2) * size
            cv2.ellipse(ghost, (round(c[0]), round(c[1])), (round(ax[0]), round(ax[1])),
                        float(rng.uniform(0, 180)), 0, 360, 1, -1)
        # A ghost fades as powder piles on: strongest for a few layers after its part ended.
        fade = 0.5 + 0.5 * math.cos(index / 7.0)
        return blur(ghost.astype(np.float32), 1.5) * np.float32(fade)

    # --- the photograph ------------------------------------------------------------------

    def photograph(self, lay: LayerRenderer, scene: F32, seed: int) -> tuple[U8, Bool]:
        """The drawn layer (fixed scale) as this camera records it, with its masks."""
        rng = np.random.default_rng([seed, 80, lay.index])
        s = lay.size
        masks = lay.masks
        ids = lay.ids
        parts = ids > 0
        defects = masks[_SWELLING] | masks[_OVER] | masks[_UNDER]
        base = np.full((s, s), self.powder, dtype=np.float32)
        ref = np.full((s, s), 100.0, dtype=np.float32)
        scale = np.full((s, s), self.powder_texture, dtype=np.float32)
        # Each part keeps a little level of its own, as parts of real plates do.
        part_base = np.concatenate([[0.0], self.melt_delta * (1.0 + rng.normal(0.0, 0.08,
                                                                               len(lay.levels)))])
        lut_ref = np.concatenate([[100.0], lay.levels]).astype(np.float32)
        melt = parts | masks[_MISPRINT]
        base[parts] += part_base[ids[parts]]
        ref[parts] = lut_ref[ids[parts]]
        mis = masks[_MISPRINT] & ~parts
        base[mis] += self.melt_delta
        ref[mis] = float(lay.levels.mean()) - 8.0
        scale[melt] = self.hatch
        # Defects keep their offset from their own part (or powder), scaled.
        near = defects & ~parts
        base[near] += self.melt_delta
        ref[near] = float(lay.levels.mean())
        scale[defects | masks[_SPATTER]] = self.defect_gain
        img = base + scale * (scene - ref)

        healthy_melt = melt & ~defects
        if self.glint > 0.0:
            g = (rng.random((s, s)) < self.glint) & healthy_melt
            g = dilate(g, 1) & healthy_melt if rng.random() < 0.5 else g
            img[g] += self.glint_level * rng.uniform(0.4, 1.0, int(g.sum())).astype(np.float32)
        powder = ~melt & ~defects & ~masks[_SPATTER]
        ghost = self.ghost_map(seed, lay.index, s)
        img += np.where(powder, np.float32(self.ghosts * self.melt_delta) * ghost, 0.0)
        if self.wall != "none":
            wall = self._wall(s) & ~dilate(melt | defects | masks[_SPATTER], 3)
            tex = self.wall_level + 12.0 * smooth_noise(rng, (s, s), 3.0)
            img = np.where(wall, tex, img).astype(np.float32)
        img *= self._gain(s)
        if self.blur > 0.3:
            img = np.asarray(cv2.GaussianBlur(img, (0, 0), self.blur), dtype=np.float32)
        img += rng.normal(0.0, self.noise, (s, s)).astype(np.float32)
        out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        if self.jpeg:
            ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg])
            out = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if ok else out
        return np.asarray(self.view(out, nearest=False)), np.asarray(self.view(masks, nearest=True))

    def _gain(self, s: int) -> F32:
        ys, xs = np.mgrid[0:s, 0:s].astype(np.float32) / np.float32(s) - np.float32(0.5)
        gain = 1.0 + self.gradient[0] * xs + self.gradient[1] * ys
        gain *= 1.0 - self.vignette * (xs * xs + ys * ys) * 2.0
        return np.asarray(np.maximum(gain, 0.2), dtype=np.float32)

    def _wall(self, s: int) -> Bool:
        ys, xs = np.mgrid[0:s, 0:s].astype(np.float32) / np.float32(s)
        if self.wall == "round":
            r = 0.5 + 0.2 - self.wall_extent
            return np.asarray((xs - 0.5) ** 2 + (ys - 0.5) ** 2 > r * r)
        return np.asarray(xs < self.wall_extent)
