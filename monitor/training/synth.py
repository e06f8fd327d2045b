"""Deterministic synthetic after-melt layers of a powder-bed-fusion build, with pixel masks.

Each layer is a grayscale camera image of the bed after melting: powder with grain
noise, low-frequency illumination and faint recoater streaks (running along the
image's y axis, the recoat direction), several parts whose cross-sections drift
slowly from layer to layer and carry a hatch texture whose angle alternates per
layer, and defects drawn on top. Masks are multi-label, channel order
``CLASS_NAMES``, and exact: a defect mask is exactly the pixels the defect was
drawn on. ``no_defect`` is the powder not covered by a part, misprint, swelling
or spatter. In the images generated here the five defect masks never overlap
(over/under-melting lie in different parts, away from swellings), though readers
must not rely on that.

A build is fixed by ``(size, layers, seed)``: the parts, swelling episodes and
which layers hold which defect are planned once from the seed, and every layer
draws its own randomness from ``numpy.random.default_rng([seed, 2, index])``, so
``layer(i)`` is the same whatever was generated before it.

Dataset format written by :func:`write_dataset` (read by training and evaluation)::

    OUT/manifest.json            {"format": "pbf-monitor-dataset/1",
                                  "classes": [the 6 CLASS_NAMES],
                                  "images": ["layer_00001", ...],
                                  "source": {"generator": "pbf-monitor synth",
                                             "seed": S, "size": PX, "layers": N}}
    OUT/images/<name>.png        8-bit grayscale, PX x PX
    OUT/masks/<class>/<name>.png 8-bit, 0 or 255, one per class per image

Names are ``layer_%05d`` of the 1-based layer number (``start_layer + index``).
Every file is written to a hidden temporary name in its own folder and renamed
into place, and a layer's masks are written before its image, so a watcher that
reacts to a new image finds complete files and the masks already there. The
manifest is written last.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import numpy.typing as npt

CLASS_NAMES: tuple[str, ...] = (
    "no_defect",
    "swelling",
    "spatter",
    "misprint",
    "over_melting",
    "under_melting",
)
DATASET_FORMAT = "pbf-monitor-dataset/1"
GENERATOR_NAME = "pbf-monitor synth"

NO_DEFECT, SWELLING, SPATTER, MISPRINT, OVER_MELTING, UNDER_MELTING = range(6)

F32 = npt.NDArray[np.float32]
Bool = npt.NDArray[np.bool_]
U8 = npt.NDArray[np.uint8]

_MIN_SIZE = 64
_GRID = 3  # parts sit in cells of a GRID x GRID layout so they never touch
_POWDER = 100.0  # powder grey level before illumination
_PART = 150.0  # melted-part grey level before illumination
_ILLUM_RES = 33  # the illumination field is planned at this resolution, then resized


@dataclass(frozen=True)
class SynthLayer:
    """One generated layer: image and exact per-class masks."""

    index: int  # 0-based layer index
    image: U8  # (H, W) grayscale
    masks: Bool  # (6, H, W), channel order = CLASS_NAMES


@dataclass(frozen=True)
class _Part:
    """A part's cross-section as a slowly varying superellipse; lengths are fractions of size."""

    cx: float
    cy: float
    half_w: float
    half_h: float
    exponent: float  # 2 = ellipse, large = rectangle
    angle: float
    spin: float  # radians per layer
    drift: float  # amplitude of the centre's wander
    grow: float  # relative amplitude of the size change
    period: float  # layers per drift/grow cycle: long, so layers change slowly
    phase: float
    hole: float  # inner/outer ratio of a tube, 0 for a solid part
    level: float  # brightness offset of this part's melt


@dataclass(frozen=True)
class _Swelling:
    """A swelling episode: grows at one corner/edge of a part for consecutive layers."""

    part: int
    anchor: float  # superellipse parameter of the boundary point it grows from
    start: int
    stop: int  # exclusive
    radius: float  # initial radius as a fraction of the part's smaller half-axis
    growth: float  # relative radius increase per layer
    aspect: float
    tilt: float


@dataclass(frozen=True)
class _Nick:
    """A recoater blade nick: a streak along the recoat direction from `start` on."""

    x: float  # fraction of width
    amplitude: float
    start: int


@dataclass(frozen=True)
class _Plan:
    """Everything about a build that is fixed by the seed."""

    parts: tuple[_Part, ...]
    hatch_angle: float
    illumination: F32  # (_ILLUM_RES, _ILLUM_RES) gain field
    nicks: tuple[_Nick, ...]
    swellings: tuple[_Swelling, ...]
    spatter: frozenset[int]
    misprint: frozenset[int]
    over_melting: frozenset[int]
    under_melting: frozenset[int]


class _Shape(NamedTuple):
    """A part's cross-section at one layer, in pixels."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float
    exponent: float
    hole: float


class _Box(NamedTuple):
    """A crop [y0:y1, x0:x1] of the image."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def sl(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def grid(self) -> tuple[F32, F32]:
        """Pixel-centre coordinates (Y column, X row) for broadcasting."""
        ys = np.arange(self.y0, self.y1, dtype=np.float32)[:, None]
        xs = np.arange(self.x0, self.x1, dtype=np.float32)[None, :]
        return ys, xs


def _box(cx: float, cy: float, half: float, size: int) -> _Box:
    h = math.ceil(half) + 1
    return _Box(
        max(0, int(cy) - h),
        min(size, int(cy) + h + 1),
        max(0, int(cx) - h),
        min(size, int(cx) + h + 1),
    )


def _superellipse(
    shape: _Shape, theta: npt.NDArray[np.float64], scale: float = 1.0
) -> npt.NDArray[np.float64]:
    """Points (N, 2) x, y on the outline at parameters theta."""
    c, s = np.cos(theta), np.sin(theta)
    e = 2.0 / shape.exponent
    x = shape.a * scale * np.sign(c) * np.abs(c) ** e
    y = shape.b * scale * np.sign(s) * np.abs(s) ** e
    ca, sa = math.cos(shape.angle), math.sin(shape.angle)
    return np.stack([shape.cx + ca * x - sa * y, shape.cy + sa * x + ca * y], axis=1)


def _shape_at(p: _Part, t: int, size: int) -> _Shape:
    ph = 2.0 * math.pi * t / p.period + p.phase
    g = 1.0 + p.grow * math.sin(0.8 * ph + 1.0)
    return _Shape(
        cx=(p.cx + p.drift * math.sin(ph)) * size,
        cy=(p.cy + p.drift * math.cos(1.3 * ph)) * size,
        a=p.half_w * g * size,
        b=p.half_h * g * size,
        angle=p.angle + p.spin * t,
        exponent=p.exponent,
        hole=p.hole,
    )


def _shift(a: Bool, dy: int, dx: int) -> Bool:
    """a moved by (dy, dx) with zero fill (np.roll would wrap around)."""
    out = np.zeros_like(a)
    h, w = a.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _dilate(a: Bool, radius: int) -> Bool:
    if radius <= 0:
        return a.copy()
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return np.asarray(cv2.dilate(a.view(np.uint8), k), dtype=np.uint8).view(np.bool_)


def _erode(a: Bool, radius: int) -> Bool:
    if radius <= 0:
        return a.copy()
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return np.asarray(cv2.erode(a.view(np.uint8), k), dtype=np.uint8).view(np.bool_)


def _blur(a: F32, sigma: float) -> F32:
    return np.asarray(cv2.GaussianBlur(a, (0, 0), sigma), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> F32:
    """Correlated noise with unit standard deviation and correlation length ~sigma."""
    n = _blur(rng.standard_normal(shape, dtype=np.float32), sigma)
    return n / np.float32(max(float(n.std()), 1e-6))


def _pick_layers(rng: np.random.Generator, layers: int, lo: float, hi: float) -> frozenset[int]:
    """A random subset of a fraction in [lo, hi] of the layers; never all or none if avoidable."""
    k = round(rng.uniform(lo, hi) * layers)
    if layers >= 2:
        k = min(max(k, 1), layers - 1)
    return frozenset(int(i) for i in rng.choice(layers, size=k, replace=False))


def _plan_swellings(rng: np.random.Generator, layers: int, n_parts: int) -> tuple[_Swelling, ...]:
    """Episodes of 4-8 consecutive layers, separated by clean gaps, covering ~35-75% of layers.

    An episode swells one part, sometimes two (a heat build-up rarely stays local to one part).
    """
    best: tuple[_Swelling, ...] = ()
    for _ in range(30):
        eps: list[_Swelling] = []
        covered = 0
        t = int(rng.integers(0, 4))
        while t < layers:
            dur = min(int(rng.integers(4, 9)), layers - t)
            if dur < min(3, layers):
                break
            n = 2 if rng.random() < 0.4 and n_parts > 1 else 1
            for part in rng.permutation(n_parts)[:n]:
                corner = rng.random() < 0.7  # swellings start mostly at corners
                base = (
                    math.pi / 4 + math.pi / 2 * int(rng.integers(0, 4))
                    if corner
                    else rng.uniform(0, 2 * math.pi)
                )
                eps.append(
                    _Swelling(
                        part=int(part),
                        anchor=base + rng.normal(0.0, 0.12),
                        start=t,
                        stop=t + dur,
                        radius=rng.uniform(0.4, 0.55),
                        growth=rng.uniform(0.12, 0.22),
                        aspect=rng.uniform(0.6, 1.0),
                        tilt=rng.uniform(-0.5, 0.5),
                    )
                )
            covered += dur
            t += dur + int(rng.integers(2, 7))
        best = tuple(eps)
        if layers < 12 or 0.35 * layers <= covered <= 0.75 * layers:
            break
    return best


def _plan(seed: int, layers: int) -> _Plan:
    rng = np.random.default_rng([seed, 1])
    margin = 0.05
    cell = (1.0 - 2 * margin) / _GRID
    cells = rng.permutation(_GRID * _GRID)[: int(rng.integers(5, 9))]
    parts = []
    for c in cells:
        hw, hh = rng.uniform(0.2, 0.36, size=2) * cell
        exponent = float(rng.choice([2.0, 3.0, 5.0, 12.0, 40.0]))
        diag = math.hypot(hw, hh) if exponent > 2.5 else max(hw, hh)
        shrink = min(1.0, 0.38 * cell / diag)  # keep a rotated part inside its cell
        parts.append(
            _Part(
                cx=margin + (c % _GRID + 0.5) * cell + rng.uniform(-0.04, 0.04) * cell,
                cy=margin + (c // _GRID + 0.5) * cell + rng.uniform(-0.04, 0.04) * cell,
                half_w=hw * shrink,
                half_h=hh * shrink,
                exponent=exponent,
                angle=rng.uniform(0, math.pi),
                spin=rng.normal(0.0, 0.004),
                drift=rng.uniform(0.0, 0.025) * cell,
                grow=rng.uniform(0.03, 0.12),
                period=rng.uniform(50, 150),
                phase=rng.uniform(0, 2 * math.pi),
                hole=rng.uniform(0.35, 0.55) if rng.random() < 0.25 else 0.0,
                level=rng.normal(0.0, 8.0),
            )
        )
    # Camera lighting: a strong gradient across the bed (as in real frames, ~0.6-1.25),
    # a vignette, and soft blotches; fixed for the build.
    g = np.linspace(-1.0, 1.0, _ILLUM_RES, dtype=np.float32)
    gy, gx = np.meshgrid(g, g, indexing="ij")
    psi = rng.uniform(0, 2 * math.pi)
    blotch = cv2.resize(
        rng.normal(0.0, 0.05, (5, 5)).astype(np.float32),
        (_ILLUM_RES, _ILLUM_RES),
        interpolation=cv2.INTER_CUBIC,
    )
    illum = (
        0.97
        + rng.uniform(0.12, 0.22) * (gx * math.cos(psi) + gy * math.sin(psi))
        - rng.uniform(0.05, 0.12) * (gx**2 + gy**2)
        + blotch
    ).astype(np.float32)
    nicks = tuple(
        _Nick(
            x=rng.uniform(0.05, 0.95),
            amplitude=rng.uniform(-7.0, 3.0),
            start=int(rng.integers(0, max(layers, 1))),
        )
        for _ in range(int(rng.integers(2, 6)))
    )
    return _Plan(
        parts=tuple(parts),
        hatch_angle=rng.uniform(0.2, 1.3),
        illumination=np.clip(illum, 0.45, 1.4),
        nicks=nicks,
        swellings=_plan_swellings(rng, layers, len(parts)),
        spatter=_pick_layers(rng, layers, 0.4, 0.65),
        misprint=_pick_layers(rng, layers, 0.35, 0.6),
        over_melting=_pick_layers(rng, layers, 0.35, 0.6),
        under_melting=_pick_layers(rng, layers, 0.35, 0.6),
    )


def _part_ids(shapes: list[_Shape], size: int) -> U8:
    """(H, W) 0 on powder, k+1 on part k."""
    ids = np.zeros((size, size), dtype=np.uint8)
    theta = np.linspace(0.0, 2 * math.pi, 160, endpoint=False)
    for k, sh in enumerate(shapes):
        # shift=4: sub-pixel vertices, so slow drift shows as smooth change, not 1-px jumps
        outer = np.round(_superellipse(sh, theta) * 16).astype(np.int32)
        cv2.fillPoly(ids, [outer], k + 1, lineType=cv2.LINE_8, shift=4)
        if sh.hole > 0:
            inner = np.round(_superellipse(sh, theta, sh.hole) * 16).astype(np.int32)
            cv2.fillPoly(ids, [inner], 0, lineType=cv2.LINE_8, shift=4)
    return ids


class _Renderer:
    """Draws one layer; holds its scene, part map and masks while they are built."""

    def __init__(self, plan: _Plan, size: int, index: int, rng: np.random.Generator) -> None:
        self.plan, self.size, self.index, self.rng = plan, size, index, rng
        self.shapes = [_shape_at(p, index, size) for p in plan.parts]
        self.levels = np.array(
            [_PART + p.level + rng.normal(0.0, 3.0) for p in plan.parts], dtype=np.float32
        )
        self.masks = np.zeros((len(CLASS_NAMES), size, size), dtype=np.bool_)
        # Hatch period ~ a scan-track pitch: a few pixels, finer beds get more pixels per track.
        self.period = max(3.0, size / 220.0)
        self.gap = max(4, round(size / 100))  # powder kept between a part and a misprint
        self.ids = _part_ids(self.shapes, size)

    # --- background and parts -------------------------------------------------

    def powder(self, grain: F32, uneven: F32) -> F32:
        s, rng = self.size, self.rng
        scene = _POWDER + 2.5 * uneven + grain
        # Streaks run along the recoat direction (y), so they are a profile over x.
        xs = np.arange(s, dtype=np.float32)
        profile = np.zeros(s, dtype=np.float32)
        width = max(0.7, s / 1400.0)
        streaks = [(n.x, n.amplitude) for n in self.plan.nicks if n.start <= self.index]
        streaks += [
            (rng.uniform(0, 1), rng.uniform(-5.0, 3.0)) for _ in range(int(rng.integers(0, 4)))
        ]
        for x, amp in streaks:
            profile += amp * np.exp(-(((xs - x * s) / width) ** 2))
        scene += profile[None, :]
        return scene

    def melt(self, ids: U8, grain: F32, uneven: F32) -> F32:
        """Melted-metal texture: per-part level, hatch tracks with ripples, per-track brightness."""
        angle = self.plan.hatch_angle + (math.pi / 2 if self.index % 2 else 0.0)
        ys, xs = _Box(0, self.size, 0, self.size).grid()
        ca, sa = math.cos(angle), math.sin(angle)
        u = xs * np.float32(ca / self.period) + ys * np.float32(
            sa / self.period
        )  # across tracks, in pitches
        v = ys * np.float32(ca / self.period) - xs * np.float32(sa / self.period)  # along tracks
        track = np.floor(u).astype(np.int64) % 97
        two_pi = np.float32(2 * math.pi)
        offsets = self.rng.normal(0.0, 6.0, 97).astype(np.float32)
        phases = self.rng.uniform(0.0, 2 * math.pi, 97).astype(np.float32)
        # Solidified tracks: a crest and a brightness per track, melt-pool ripples along each.
        ripple = np.cos(v * np.float32(two_pi / 2.5) + phases[track])
        lut = np.concatenate([[_POWDER], self.levels]).astype(np.float32)
        tracks = 10.0 * np.cos(two_pi * u) + offsets[track] + 4.0 * ripple
        return np.asarray(lut[ids] + tracks + 0.8 * grain + 2.0 * uneven, dtype=np.float32)

    # --- defects -------------------------------------------------------------

    def _interior_point(self, k: int, inset: float) -> tuple[float, float] | None:
        """A random pixel of part k at least `inset` px from its edge (or any pixel of it)."""
        sh = self.shapes[k]
        box = _box(sh.cx, sh.cy, max(sh.a, sh.b) * 1.5, self.size)
        inside = self.ids[box.sl] == k + 1
        deep = _erode(inside, int(inset))
        pick = deep if deep.any() else inside
        yy, xx = np.nonzero(pick)
        if len(yy) == 0:
            return None
        i = int(self.rng.integers(0, len(yy)))
        return float(xx[i] + box.x0), float(yy[i] + box.y0)

    def _blob(self, cx: float, cy: float, r: float) -> tuple[_Box, Bool]:
        """An irregular round region (a few low harmonics on the radius)."""
        box = _box(cx, cy, r * 1.5, self.size)
        ys, xs = box.grid()
        dx, dy = xs - np.float32(cx), ys - np.float32(cy)
        phi = np.arctan2(dy, dx)
        radius = np.full_like(phi, np.float32(r))
        for h in (2, 3, 4):
            radius += np.float32(r * self.rng.uniform(0.0, 0.16)) * np.cos(
                h * phi + np.float32(self.rng.uniform(0, 7))
            )
        return box, (dx * dx + dy * dy) <= radius * radius

    def misprint(self, scene: F32, grain: F32) -> None:
        """Ragged patch of scan tracks on powder next to a part, outside every part."""
        forbid = _dilate(self.ids > 0, self.gap)
        for _ in range(int(self.rng.integers(1, 3))):
            for _attempt in range(6):
                k = int(self.rng.integers(0, len(self.shapes)))
                sh = self.shapes[k]
                half_u = max(4.0, self.rng.uniform(0.3, 0.6) * min(sh.a, sh.b))
                half_v = max(5.0, self.rng.uniform(0.5, 0.9) * max(sh.a, sh.b))
                theta = self.rng.uniform(0, 2 * math.pi)
                bx, by = _superellipse(sh, np.array([theta]))[0]
                nx, ny = bx - sh.cx, by - sh.cy
                norm = math.hypot(nx, ny) or 1.0
                out = 0.7 * max(half_u, half_v) + self.gap + 1
                cx, cy = bx + nx / norm * out, by + ny / norm * out
                box = _box(cx, cy, math.hypot(half_u, half_v), self.size)
                if box.y1 - box.y0 < 3 or box.x1 - box.x0 < 3:
                    continue
                ys, xs = box.grid()
                # Tracks follow this layer's hatch direction, like the scan that went astray.
                ang = self.plan.hatch_angle + (math.pi / 2 if self.index % 2 else 0.0)
                ca, sa = np.float32(math.cos(ang)), np.float32(math.sin(ang))
                u = (xs - np.float32(cx)) * ca + (ys - np.float32(cy)) * sa
                v = -(xs - np.float32(cx)) * sa + (ys - np.float32(cy)) * ca
                pitch = self.period * 1.4
                n_tracks = int(2 * half_u / pitch) + 2
                tr = np.clip(((u + half_u) / pitch).astype(np.int64), 0, n_tracks - 1)
                lo = -half_v * self.rng.uniform(0.35, 1.0, n_tracks).astype(np.float32)
                hi = half_v * self.rng.uniform(0.35, 1.0, n_tracks).astype(np.float32)
                region = (np.abs(u) <= half_u) & (v >= lo[tr]) & (v <= hi[tr]) & ~forbid[box.sl]
                region &= ~self.masks[MISPRINT][box.sl]
                if region.sum() < 0.25 * half_u * half_v:
                    continue  # mostly clipped away by a part or the bed edge: try elsewhere
                # Poorly fused tracks: strong stripe contrast and uneven track brightness.
                offs = self.rng.normal(0.0, 12.0, n_tracks).astype(np.float32)
                tex = (
                    float(self.levels.mean())
                    - 8.0
                    + 20.0 * np.cos(np.float32(2 * math.pi / pitch) * u)
                    + offs[tr]
                    + 0.8 * grain[box.sl]
                )
                scene[box.sl][region] = tex[region]
                self.masks[MISPRINT][box.sl] |= region
                break

    def swelling(self, scene: F32, ep: _Swelling) -> None:
        """Bright raised blob at a part's corner/edge with a lit rim and a shadowed rim."""
        k = ep.part
        sh = self.shapes[k]
        r = max(2.5, ep.radius * min(sh.a, sh.b)) * (1.0 + ep.growth * (self.index - ep.start))
        bx, by = _superellipse(sh, np.array([ep.anchor]))[0]
        nx, ny = bx - sh.cx, by - sh.cy
        norm = math.hypot(nx, ny) or 1.0
        ex, ey = bx + 0.1 * r * nx / norm, by + 0.1 * r * ny / norm
        # Warped metal overhangs the powder a little, but never reaches a misprint's gap.
        bulge = min(self.gap - 1, max(1, round(0.3 * r)))
        rim = max(1, min(round(0.1 * r), 1 + self.size // 300))
        box = _box(ex, ey, r + bulge + rim + 2, self.size)
        ys, xs = box.grid()
        phi = math.atan2(ny, nx) + ep.tilt
        cp, sp = np.float32(math.cos(phi)), np.float32(math.sin(phi))
        du, dv = xs - np.float32(ex), ys - np.float32(ey)
        a = (du * cp + dv * sp) / np.float32(r)
        b = (-du * sp + dv * cp) / np.float32(r * ep.aspect)
        region = (a * a + b * b <= 1.0) & _dilate(self.ids[box.sl] == k + 1, bulge)
        if not region.any():
            return
        mottle = _smooth_noise(self.rng, region.shape, max(1.0, r / 6.0))
        # The warped metal keeps its hatch (unlike a glossy over-melt), lifted towards the light.
        hatch = np.where(self.ids[box.sl] == k + 1, scene[box.sl] - self.levels[k], 0.0)
        tex = 1.4 * hatch + self.levels[k] + 65.0 + 12.0 * mottle
        # Light from the top-left: the raised edge facing it glints, the far edge is in shadow.
        lit = region & ~_shift(region, rim, rim)
        shadow = region & ~_shift(region, -rim, -rim)
        tex = np.where(
            lit, 245.0 + 4.0 * mottle, np.where(shadow, 58.0 + 6.0 * mottle, tex)
        ).astype(np.float32)
        scene[box.sl][region] = tex[region]
        self.masks[SWELLING][box.sl] |= region

    def _defect_region(self, k: int) -> tuple[_Box, Bool] | None:
        sh = self.shapes[k]
        r = max(3.0, self.rng.uniform(0.35, 0.6) * min(sh.a, sh.b) * (1.0 - sh.hole))
        p = self._interior_point(k, 0.5 * r)
        if p is None:
            return None
        box, blob = self._blob(p[0], p[1], r)
        region = blob & (self.ids[box.sl] == k + 1) & ~self.masks[SWELLING][box.sl]
        return (box, region) if region.any() else None

    def under_melting(self, scene: F32, k: int) -> None:
        """Dark, rough region inside part k with speckled pores; the hatch shows faintly."""
        found = self._defect_region(k)
        if found is None:
            return
        box, region = found
        crop = scene[box.sl]
        rough = _smooth_noise(self.rng, region.shape, 0.8)
        tex = 0.4 * (crop - self.levels[k]) + self.levels[k] - 72.0 + 9.0 * rough
        seeds = self.rng.random(region.shape) < 0.07
        pore_px = max(2, round(self.size / 1024) + 1)
        pores = np.asarray(
            cv2.dilate(seeds.view(np.uint8), np.ones((pore_px, pore_px), np.uint8)), dtype=bool
        )
        pores |= self.rng.random(region.shape) < 0.05
        tex = np.where(pores, 22.0 + 6.0 * rough, tex).astype(np.float32)
        crop[region] = tex[region]
        self.masks[UNDER_MELTING][box.sl] |= region

    def over_melting(self, image: F32, k: int) -> None:
        """Glossy, saturated, smooth region inside part k (after lighting: a specular glint)."""
        found = self._defect_region(k)
        if found is None:
            return
        box, region = found
        ys, xs = box.grid()
        h, w = region.shape
        yy, xx = np.nonzero(region)
        # A specular glint: a saturated core off-centre, falling off smoothly to a bright sheen.
        i = int(self.rng.integers(0, len(yy)))
        hx, hy = float(xx[i] + box.x0), float(yy[i] + box.y0)
        reach = np.float32(max(2.0, 0.45 * max(h, w)))
        bump = np.exp(-((xs - np.float32(hx)) ** 2 + (ys - np.float32(hy)) ** 2) / (reach * reach))
        gloss = (
            self.rng.uniform(195.0, 212.0)
            + 65.0 * bump
            + 1.2 * self.rng.standard_normal(region.shape)
        )
        # Feather inward only, so nothing outside the mask changes.
        f = region.astype(np.float32)
        wgt = np.minimum(1.0, 1.7 * _blur(f, max(0.8, min(h, w) / 16.0))) * f
        crop = image[box.sl]
        crop[...] = crop * (1.0 - wgt) + gloss.astype(np.float32) * wgt
        self.masks[OVER_MELTING][box.sl] |= region

    def spatter(self, image: F32) -> None:
        """Specks 2-6 px across on powder near melted areas; physically small at any scale."""
        s, rng = self.size, self.rng
        melted = (self.ids > 0) | self.masks[MISPRINT] | self.masks[SWELLING]
        edge = melted & ~_erode(melted, 1)
        pts = cv2.findNonZero(edge.view(np.uint8))
        if pts is None:
            return
        edge_xy = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        # Centres >= 4 px from melt, so a speck (radius <= 3) never touches it.
        forbid = _dilate(melted, 4)
        n = max(4, round(rng.uniform(35, 80) * s / 512))
        reach = max(10.0, 0.07 * s)
        m = 10 * n
        base = edge_xy[rng.integers(0, len(edge_xy), m)]
        dist = 4.0 + reach * rng.random(m) ** 1.7  # ejecta land mostly close to the melt pool
        ang = rng.uniform(0, 2 * math.pi, m)
        step = np.stack([np.cos(ang), np.sin(ang)], 1) * dist[:, None]
        cand = np.round(base + step).astype(np.int64)
        ok = (cand[:, 0] >= 3) & (cand[:, 0] < s - 4) & (cand[:, 1] >= 3) & (cand[:, 1] < s - 4)
        cand = cand[ok]
        cand = cand[~forbid[cand[:, 1], cand[:, 0]]]
        # Keep specks >= 10 px apart so each stays its own component: one speck per 9-px cell,
        # none in a neighbouring cell (an O(1) check per candidate, even for thousands).
        taken = np.zeros((s // 9 + 3, s // 9 + 3), dtype=np.bool_)
        kept: list[tuple[int, int]] = []
        for x, y in cand.tolist():
            cy, cx = y // 9 + 1, x // 9 + 1
            if not taken[cy - 1 : cy + 2, cx - 1 : cx + 2].any():
                taken[cy, cx] = True
                kept.append((x, y))
                if len(kept) == n:
                    break
        for x, y in kept:
            d = int(rng.choice([2, 3, 3, 4, 4, 5, 6]))
            c = (d - 1) / 2.0
            g = np.arange(d) - c
            stamp = (g[:, None] ** 2 + g[None, :] ** 2) <= (d / 2.0) ** 2 + 0.1
            y0, x0 = y - d // 2, x - d // 2
            sl = (slice(y0, y0 + d), slice(x0, x0 + d))
            stamp &= ~melted[sl]
            value = rng.uniform(185.0, 255.0) if rng.random() < 0.65 else rng.uniform(15.0, 45.0)
            image[sl][stamp] = value + rng.normal(0.0, 4.0, int(stamp.sum()))
            self.masks[SPATTER][sl] |= stamp

    # --- the whole layer ------------------------------------------------------

    def render(self) -> SynthLayer:
        s, rng, plan, t = self.size, self.rng, self.plan, self.index
        # Grain: pixel-scale noise with the ~0.65 lag-1 correlation measured on real frames.
        grain = 12.0 * _blur(rng.standard_normal((s, s), dtype=np.float32), 0.8)
        parts = self.ids > 0
        # Spreading leaves slightly uneven density, melting uneven heat: a coarse field whose
        # scale is a fixed fraction of the bed.
        coarse = rng.standard_normal((24, 24), dtype=np.float32)
        uneven = np.asarray(
            cv2.resize(coarse, (s, s), interpolation=cv2.INTER_CUBIC), dtype=np.float32
        )
        scene = self.powder(grain, uneven)
        np.copyto(scene, self.melt(self.ids, grain, uneven), where=parts)
        # Contour pass: the outline scan leaves a slightly brighter rim.
        rim = parts & ~_erode(parts, max(1, round(s / 700)))
        scene[rim] += 12.0

        if t in plan.misprint:
            self.misprint(scene, grain)
        swelling_parts = set()
        for ep in plan.swellings:
            if ep.start <= t < ep.stop:
                self.swelling(scene, ep)
                swelling_parts.add(ep.part)
        # Over- and under-melting: 1-2 regions each, every one in its own part, parts with a
        # swelling last, so the classes stay apart.
        pool = [int(k) for k in rng.permutation(len(self.shapes)) if int(k) not in swelling_parts]
        pool += sorted(swelling_parts)
        n_over = int(rng.integers(1, 3)) if t in plan.over_melting else 0
        n_under = int(rng.integers(1, 3)) if t in plan.under_melting else 0
        n_under = min(n_under, len(pool) - min(n_over, 1))
        n_over = min(n_over, len(pool) - n_under)
        for k in pool[n_over : n_over + n_under]:
            self.under_melting(scene, k)

        gain = np.asarray(
            cv2.resize(plan.illumination, (s, s), interpolation=cv2.INTER_LINEAR), dtype=np.float32
        )
        image = scene * (gain * np.float32(1.0 + rng.normal(0.0, 0.015)))
        for k in pool[:n_over]:
            self.over_melting(image, k)
        if t in plan.spatter:
            self.spatter(image)

        defects = self.masks[SWELLING] | self.masks[SPATTER] | self.masks[MISPRINT]
        self.masks[NO_DEFECT] = ~(parts | defects)
        out = np.clip(image + 0.5, 0, 255).astype(np.uint8)
        return SynthLayer(index=t, image=out, masks=self.masks)


class BuildGenerator:
    """A synthetic build: `layer(i)` renders layer i deterministically from (size, layers, seed)."""

    def __init__(self, *, size: int = 512, layers: int = 40, seed: int = 0) -> None:
        if size < _MIN_SIZE:
            raise ValueError(f"size={size} is too small; use at least {_MIN_SIZE} px")
        if layers < 1:
            raise ValueError(f"layers={layers}; a build needs at least 1 layer")
        if seed < 0:
            raise ValueError(f"seed={seed}; use a non-negative integer")
        self.size, self.layers, self.seed = size, layers, seed
        self._plan = _plan(seed, layers)

    def _check(self, index: int) -> None:
        if not 0 <= index < self.layers:
            raise IndexError(f"layer index {index} out of range 0..{self.layers - 1}")

    def layer(self, index: int) -> SynthLayer:
        """Render layer `index` (0-based)."""
        self._check(index)
        rng = np.random.default_rng([self.seed, 2, index])
        return _Renderer(self._plan, self.size, index, rng).render()

    def part_ids(self, index: int) -> U8:
        """(H, W) uint8 map of the intended part geometry at layer `index`: 0 powder, k+1 part k.

        Like Peregrine's ``part_ids``; misprints and the overhang of a swelling lie outside it.
        """
        self._check(index)
        return _part_ids([_shape_at(p, index, self.size) for p in self._plan.parts], self.size)

    def __len__(self) -> int:
        return self.layers

    def __iter__(self) -> Iterator[SynthLayer]:
        for i in range(self.layers):
            yield self.layer(i)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a hidden temp file in the same folder, then rename over `path`."""
    # Not tempfile.mkstemp: its 0600 mode would hide the files from a daemon running as
    # another user; os.open with 0o666 honours the umask like an ordinary write.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_png(path: Path, image: U8) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path.name} as PNG")
    _write_atomic(path, buf.tobytes())


def write_dataset(
    out: Path,
    *,
    layers: int,
    size: int,
    seed: int,
    start_layer: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a build in the dataset format; returns the manifest path.

    Args:
        out: dataset folder, created if missing; existing files of the same names are replaced.
        layers: number of layers to generate.
        size: image side in pixels.
        seed: build seed.
        start_layer: layer number of the first image (names are ``layer_%05d``).
        progress: called with each layer's 0-based index once that layer is written.

    Returns:
        The path of ``manifest.json``.
    """
    if start_layer < 0:
        raise ValueError(f"start_layer={start_layer}; use a non-negative layer number")
    gen = BuildGenerator(size=size, layers=layers, seed=seed)
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name in CLASS_NAMES:
        (out / "masks" / name).mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for lay in gen:
        name = f"layer_{start_layer + lay.index:05d}"
        for cls, mask in zip(CLASS_NAMES, lay.masks, strict=True):
            _write_png(out / "masks" / cls / f"{name}.png", mask.view(np.uint8) * np.uint8(255))
        # The image goes last: its arrival tells a watcher that the whole layer is there.
        _write_png(images / f"{name}.png", lay.image)
        names.append(name)
        if progress is not None:
            progress(lay.index)
    manifest = {
        "format": DATASET_FORMAT,
        "classes": list(CLASS_NAMES),
        "images": names,
        "source": {"generator": GENERATOR_NAME, "seed": seed, "size": size, "layers": layers},
    }
    path = out / "manifest.json"
    _write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return path
