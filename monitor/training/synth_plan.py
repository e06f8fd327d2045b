"""A synthetic build's plan, fixed by its seed: parts whose cross-sections drift from layer
to layer, swelling episodes, recoater nicks, which layers hold which defect, and the
illumination; with the raster helpers the renderer shares."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
Bool = npt.NDArray[np.bool_]
U8 = npt.NDArray[np.uint8]

_GRID = 3  # parts sit in cells of a GRID x GRID layout so they never touch
POWDER_LEVEL = 100.0  # powder grey level before illumination
PART_LEVEL = 150.0  # melted-part grey level before illumination
_ILLUM_RES = 33  # the illumination field is planned at this resolution, then resized


@dataclass(frozen=True)
class Part:
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
class Swelling:
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
class Nick:
    """A recoater blade nick: a streak along the recoat direction from `start` on."""

    x: float  # fraction of width
    amplitude: float
    start: int


@dataclass(frozen=True)
class Plan:
    """Everything about a build that is fixed by the seed."""

    parts: tuple[Part, ...]
    hatch_angle: float
    illumination: F32  # (_ILLUM_RES, _ILLUM_RES) gain field
    nicks: tuple[Nick, ...]
    swellings: tuple[Swelling, ...]
    spatter: frozenset[int]
    misprint: frozenset[int]
    over_melting: frozenset[int]
    under_melting: frozenset[int]


class Shape(NamedTuple):
    """A part's cross-section at one layer, in pixels."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float
    exponent: float
    hole: float


class Box(NamedTuple):
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


def box_around(cx: float, cy: float, half: float, size: int) -> Box:
    h = math.ceil(half) + 1
    return Box(
        max(0, int(cy) - h),
        min(size, int(cy) + h + 1),
        max(0, int(cx) - h),
        min(size, int(cx) + h + 1),
    )


def superellipse(
    shape: Shape, theta: npt.NDArray[np.float64], scale: float = 1.0
) -> npt.NDArray[np.float64]:
    """Points (N, 2) x, y on the outline at parameters theta."""
    c, s = np.cos(theta), np.sin(theta)
    e = 2.0 / shape.exponent
    x = shape.a * scale * np.sign(c) * np.abs(c) ** e
    y = shape.b * scale * np.sign(s) * np.abs(s) ** e
    ca, sa = math.cos(shape.angle), math.sin(shape.angle)
    return np.stack([shape.cx + ca * x - sa * y, shape.cy + sa * x + ca * y], axis=1)


def shape_at(p: Part, t: int, size: int) -> Shape:
    ph = 2.0 * math.pi * t / p.period + p.phase
    g = 1.0 + p.grow * math.sin(0.8 * ph + 1.0)
    return Shape(
        cx=(p.cx + p.drift * math.sin(ph)) * size,
        cy=(p.cy + p.drift * math.cos(1.3 * ph)) * size,
        a=p.half_w * g * size,
        b=p.half_h * g * size,
        angle=p.angle + p.spin * t,
        exponent=p.exponent,
        hole=p.hole,
    )


def shift(a: Bool, dy: int, dx: int) -> Bool:
    """a moved by (dy, dx) with zero fill (np.roll would wrap around)."""
    out = np.zeros_like(a)
    h, w = a.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def dilate(a: Bool, radius: int) -> Bool:
    if radius <= 0:
        return a.copy()
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return np.asarray(cv2.dilate(a.view(np.uint8), k), dtype=np.uint8).view(np.bool_)


def erode(a: Bool, radius: int) -> Bool:
    if radius <= 0:
        return a.copy()
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return np.asarray(cv2.erode(a.view(np.uint8), k), dtype=np.uint8).view(np.bool_)


def blur(a: F32, sigma: float) -> F32:
    return np.asarray(cv2.GaussianBlur(a, (0, 0), sigma), dtype=np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> F32:
    """Correlated noise with unit standard deviation and correlation length ~sigma."""
    n = blur(rng.standard_normal(shape, dtype=np.float32), sigma)
    return n / np.float32(max(float(n.std()), 1e-6))


def _pick_layers(rng: np.random.Generator, layers: int, lo: float, hi: float) -> frozenset[int]:
    """A random subset of a fraction in [lo, hi] of the layers; never all or none if avoidable."""
    k = round(rng.uniform(lo, hi) * layers)
    if layers >= 2:
        k = min(max(k, 1), layers - 1)
    return frozenset(int(i) for i in rng.choice(layers, size=k, replace=False))


def _plan_swellings(rng: np.random.Generator, layers: int, n_parts: int) -> tuple[Swelling, ...]:
    """Episodes of 4-8 consecutive layers, separated by clean gaps, covering ~35-75% of layers.

    An episode swells one part, sometimes two (a heat build-up rarely stays local to one part).
    """
    best: tuple[Swelling, ...] = ()
    for _ in range(30):
        eps: list[Swelling] = []
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
                    Swelling(
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


def plan_build(seed: int, layers: int) -> Plan:
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
            Part(
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
        Nick(
            x=rng.uniform(0.05, 0.95),
            amplitude=rng.uniform(-7.0, 3.0),
            start=int(rng.integers(0, max(layers, 1))),
        )
        for _ in range(int(rng.integers(2, 6)))
    )
    return Plan(
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


def part_id_map(shapes: list[Shape], size: int) -> U8:
    """(H, W) 0 on powder, k+1 on part k."""
    ids = np.zeros((size, size), dtype=np.uint8)
    theta = np.linspace(0.0, 2 * math.pi, 160, endpoint=False)
    for k, sh in enumerate(shapes):
        # shift=4: sub-pixel vertices, so slow drift shows as smooth change, not 1-px jumps
        outer = np.round(superellipse(sh, theta) * 16).astype(np.int32)
        cv2.fillPoly(ids, [outer], k + 1, lineType=cv2.LINE_8, shift=4)
        if sh.hole > 0:
            inner = np.round(superellipse(sh, theta, sh.hole) * 16).astype(np.int32)
            cv2.fillPoly(ids, [inner], 0, lineType=cv2.LINE_8, shift=4)
    return ids



@dataclass(frozen=True)
class PartEvent:
    """A part printed unlike its slice from `start` (0-based layer index) to `stop`
    (exclusive): "missing" (broken off: powder where the slice says part, to the end of the
    build) or "distorted" (melt beyond the slice: the part "swollen" all round, or "shifted"
    along (`dx`, `dy`), by `reach`, a fraction of the layer's side)."""

    kind: str  # "missing" | "distorted"
    part: int  # index into Plan.parts
    start: int
    stop: int
    mode: str = ""  # distorted: "swollen" | "shifted"
    reach: float = 0.0
    dx: float = 0.0
    dy: float = 0.0


def plan_part_events(seed: int, layers: int, n_parts: int) -> tuple[PartEvent, ...]:
    """One part that breaks off and one that distorts, drawn from their own stream
    ``default_rng([seed, 14])`` so the rest of the build keeps its bytes."""
    rng = np.random.default_rng([seed, 14])
    if n_parts < 2 or layers < 4:
        return ()
    lost, bent = (int(k) for k in rng.permutation(n_parts)[:2])
    start = int(rng.integers(layers // 3, max(layers // 3 + 1, 2 * layers // 3)))
    missing = PartEvent("missing", lost, start, layers)
    d0 = int(rng.integers(1, max(2, layers // 2)))
    d1 = min(layers, d0 + int(rng.integers(3, 9)))
    # Melt 4-5 mm past the slice on a 512 px, 0.1 mm/px layer: a part that warps or swells
    # that far is what the geometry's part_excess is for (the printed-area classifier's
    # windows blur about 2 mm at that scale); smaller swellings are the model's.
    reach = float(rng.uniform(0.08, 0.1))
    if rng.random() < 0.5:
        bent_ev = PartEvent("distorted", bent, d0, d1, mode="swollen", reach=reach)
    else:
        ang = rng.uniform(0, 2 * math.pi)
        bent_ev = PartEvent("distorted", bent, d0, d1, mode="shifted", reach=reach,
                            dx=math.cos(ang), dy=math.sin(ang))
    return (missing, bent_ev)


def printed_shape(shape: Shape, ev: PartEvent, size: int) -> Shape:
    """The cross-section a distorted part is melted with, from its nominal one, on a layer
    `size` px wide."""
    d = ev.reach * size
    if ev.mode == "swollen":  # outward: a ring's hole keeps its size
        m = min(shape.a, shape.b)
        return shape._replace(a=shape.a + d, b=shape.b + d, hole=shape.hole * m / (m + d))
    return shape._replace(cx=shape.cx + ev.dx * d, cy=shape.cy + ev.dy * d)
