"""Drawing one synthetic layer from its build's plan: powder, melted parts with their hatch,
illumination, and the defects with their exact masks. The order of the random draws is part
of the format: a given seed must give the same bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from monitor.training.camera import CameraStyle
from monitor.training.synth_plan import (
    F32,
    PART_LEVEL,
    POWDER_LEVEL,
    U8,
    Bool,
    Box,
    PartEvent,
    Plan,
    Swelling,
    blur,
    box_around,
    dilate,
    erode,
    part_id_map,
    printed_shape,
    shape_at,
    shift,
    smooth_noise,
    superellipse,
)
from monitor.vision.classes import DEFAULT_CLASS_NAMES

NO_DEFECT, SWELLING, SPATTER, MISPRINT, OVER_MELTING, UNDER_MELTING = range(6)


@dataclass(frozen=True)
class Camera:
    """A varied build's camera: its style, the seed its draws come from, and the bed's thin
    structures (ids after the plan's parts; 0 elsewhere)."""

    style: CameraStyle
    seed: int
    thin: U8


def with_thin(ids: U8, thin: U8, n_parts: int) -> U8:
    """A part map with the thin structures added after the plan's `n_parts` parts."""
    if not thin.any():
        return ids
    return np.where((thin > 0) & (ids == 0), thin.astype(np.int32) + n_parts,
                    ids).astype(np.uint8)


@dataclass(frozen=True)
class SynthLayer:
    """One generated layer: image and exact per-class masks."""

    index: int  # 0-based layer index
    image: U8  # (H, W) grayscale
    masks: Bool  # (6, H, W), channel order = DEFAULT_CLASS_NAMES
    # Indices (into the plan's swellings) of the episodes drawn here. An episode on a part
    # that has not started, has ended or broke off draws nothing on that layer.
    swellings: tuple[int, ...] = ()


class LayerRenderer:
    """Draws one layer; holds its scene, part map and masks while they are built."""

    def __init__(self, plan: Plan, size: int, index: int, rng: np.random.Generator,
                 events: tuple[PartEvent, ...] = (), camera: Camera | None = None) -> None:
        self.plan, self.size, self.index, self.rng = plan, size, index, rng
        self.camera = camera
        self.shapes = [shape_at(p, index, size) for p in plan.parts]
        # What the slice says; the parts below are what is melted (part events change them).
        self.nominal = part_id_map(self.shapes, size)
        if camera is not None:
            self.nominal = with_thin(self.nominal, camera.thin, len(plan.parts))
        active = [e for e in events if e.start <= index < e.stop]
        for e in active:
            if e.kind == "distorted":
                self.shapes[e.part] = printed_shape(self.shapes[e.part], e, size)
        self.levels = np.array(
            [PART_LEVEL + p.level + rng.normal(0.0, 3.0) for p in plan.parts], dtype=np.float32
        )
        if camera is not None and camera.thin.any():
            extra = int(camera.thin.max())
            self.levels = np.concatenate(
                [self.levels, np.full(extra, self.levels.mean(), dtype=np.float32)])
        self.masks = np.zeros((len(DEFAULT_CLASS_NAMES), size, size), dtype=np.bool_)
        # Hatch period ~ a scan-track pitch: a few pixels, finer beds get more pixels per track.
        self.period = max(3.0, size / 220.0)
        self.gap = max(4, round(size / 100))  # powder kept between a part and a misprint
        self.ids = part_id_map(self.shapes, size) if active else self.nominal
        if active and camera is not None:
            self.ids = with_thin(self.ids, camera.thin, len(plan.parts))
        for e in active:
            if e.kind == "missing":  # broken off: powder where the slice says part
                self.ids = np.where(self.ids == e.part + 1, 0, self.ids).astype(np.uint8)

    # --- background and parts -------------------------------------------------

    def powder(self, grain: F32, uneven: F32) -> F32:
        s, rng = self.size, self.rng
        scene = POWDER_LEVEL + 2.5 * uneven + grain
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
        ys, xs = Box(0, self.size, 0, self.size).grid()
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
        lut = np.concatenate([[POWDER_LEVEL], self.levels]).astype(np.float32)
        tracks = 10.0 * np.cos(two_pi * u) + offsets[track] + 4.0 * ripple
        return np.asarray(lut[ids] + tracks + 0.8 * grain + 2.0 * uneven, dtype=np.float32)

    def interior_point(self, k: int, inset: float) -> tuple[float, float] | None:
        """A random pixel of part k at least `inset` px from its edge (or any pixel of it)."""
        sh = self.shapes[k]
        box = box_around(sh.cx, sh.cy, max(sh.a, sh.b) * 1.5, self.size)
        inside = self.ids[box.sl] == k + 1
        deep = erode(inside, int(inset))
        pick = deep if deep.any() else inside
        yy, xx = np.nonzero(pick)
        if len(yy) == 0:
            return None
        i = int(self.rng.integers(0, len(yy)))
        return float(xx[i] + box.x0), float(yy[i] + box.y0)

    def blob(self, cx: float, cy: float, r: float) -> tuple[Box, Bool]:
        """An irregular round region (a few low harmonics on the radius)."""
        box = box_around(cx, cy, r * 1.5, self.size)
        ys, xs = box.grid()
        dx, dy = xs - np.float32(cx), ys - np.float32(cy)
        phi = np.arctan2(dy, dx)
        radius = np.full_like(phi, np.float32(r))
        for h in (2, 3, 4):
            radius += np.float32(r * self.rng.uniform(0.0, 0.16)) * np.cos(
                h * phi + np.float32(self.rng.uniform(0, 7))
            )
        return box, (dx * dx + dy * dy) <= radius * radius

    def defect_region(self, k: int) -> tuple[Box, Bool] | None:
        sh = self.shapes[k]
        r = max(3.0, self.rng.uniform(0.35, 0.6) * min(sh.a, sh.b) * (1.0 - sh.hole))
        p = self.interior_point(k, 0.5 * r)
        if p is None:
            return None
        box, blob = self.blob(p[0], p[1], r)
        region = blob & (self.ids[box.sl] == k + 1) & ~self.masks[SWELLING][box.sl]
        return (box, region) if region.any() else None

    # --- the whole layer ------------------------------------------------------

    def render(self) -> SynthLayer:
        s, rng, plan, t = self.size, self.rng, self.plan, self.index
        # Grain: pixel-scale noise with the ~0.65 lag-1 correlation measured on real frames.
        grain = 12.0 * blur(rng.standard_normal((s, s), dtype=np.float32), 0.8)
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
        rim = parts & ~erode(parts, max(1, round(s / 700)))
        scene[rim] += 12.0

        if t in plan.misprint:
            draw_misprint(self, scene, grain)
        swelling_parts = set()
        drawn: list[int] = []
        for i, ep in enumerate(plan.swellings):
            if ep.start <= t < ep.stop:
                if draw_swelling(self, scene, ep):
                    drawn.append(i)
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
            draw_under_melting(self, scene, k)

        if self.camera is None:
            gain = np.asarray(cv2.resize(plan.illumination, (s, s),
                                         interpolation=cv2.INTER_LINEAR), dtype=np.float32)
            image = scene * (gain * np.float32(1.0 + rng.normal(0.0, 0.015)))
        else:  # the camera lights the scene itself (Camera.style.photograph)
            image = scene.copy()
        for k in pool[:n_over]:
            draw_over_melting(self, image, k)
        if t in plan.spatter:
            draw_spatter(self, image)

        # A distorted part's melt outside its slice is misprint (melt outside the intended
        # geometry); the swelling there is already its own class.
        self.masks[MISPRINT] |= parts & (self.nominal == 0) & ~self.masks[SWELLING]
        defects = self.masks[SWELLING] | self.masks[SPATTER] | self.masks[MISPRINT]
        self.masks[NO_DEFECT] = ~(parts | defects)
        if self.camera is not None:
            out, masks = self.camera.style.photograph(self, image, self.camera.seed)
            return SynthLayer(index=t, image=out, masks=masks, swellings=tuple(drawn))
        out = np.clip(image + 0.5, 0, 255).astype(np.uint8)
        return SynthLayer(index=t, image=out, masks=self.masks, swellings=tuple(drawn))


def draw_misprint(lay: LayerRenderer, scene: F32, grain: F32) -> None:
    """Ragged patch of scan tracks on powder next to a part, outside every part."""
    forbid = dilate((lay.ids > 0) | (lay.nominal > 0), lay.gap)
    for _ in range(int(lay.rng.integers(1, 3))):
        for _attempt in range(6):
            k = int(lay.rng.integers(0, len(lay.shapes)))
            sh = lay.shapes[k]
            half_u = max(4.0, lay.rng.uniform(0.3, 0.6) * min(sh.a, sh.b))
            half_v = max(5.0, lay.rng.uniform(0.5, 0.9) * max(sh.a, sh.b))
            theta = lay.rng.uniform(0, 2 * math.pi)
            bx, by = superellipse(sh, np.array([theta]))[0]
            nx, ny = bx - sh.cx, by - sh.cy
            norm = math.hypot(nx, ny) or 1.0
            out = 0.7 * max(half_u, half_v) + lay.gap + 1
            cx, cy = bx + nx / norm * out, by + ny / norm * out
            box = box_around(cx, cy, math.hypot(half_u, half_v), lay.size)
            if box.y1 - box.y0 < 3 or box.x1 - box.x0 < 3:
                continue
            ys, xs = box.grid()
            # Tracks follow this layer's hatch direction, like the scan that went astray.
            ang = lay.plan.hatch_angle + (math.pi / 2 if lay.index % 2 else 0.0)
            ca, sa = np.float32(math.cos(ang)), np.float32(math.sin(ang))
            u = (xs - np.float32(cx)) * ca + (ys - np.float32(cy)) * sa
            v = -(xs - np.float32(cx)) * sa + (ys - np.float32(cy)) * ca
            pitch = lay.period * 1.4
            n_tracks = int(2 * half_u / pitch) + 2
            tr = np.clip(((u + half_u) / pitch).astype(np.int64), 0, n_tracks - 1)
            lo = -half_v * lay.rng.uniform(0.35, 1.0, n_tracks).astype(np.float32)
            hi = half_v * lay.rng.uniform(0.35, 1.0, n_tracks).astype(np.float32)
            region = (np.abs(u) <= half_u) & (v >= lo[tr]) & (v <= hi[tr]) & ~forbid[box.sl]
            region &= ~lay.masks[MISPRINT][box.sl]
            if region.sum() < 0.25 * half_u * half_v:
                continue  # mostly clipped away by a part or the bed edge: try elsewhere
            # Poorly fused tracks: strong stripe contrast and uneven track brightness.
            offs = lay.rng.normal(0.0, 12.0, n_tracks).astype(np.float32)
            tex = (
                float(lay.levels.mean())
                - 8.0
                + 20.0 * np.cos(np.float32(2 * math.pi / pitch) * u)
                + offs[tr]
                + 0.8 * grain[box.sl]
            )
            scene[box.sl][region] = tex[region]
            lay.masks[MISPRINT][box.sl] |= region
            break


def draw_swelling(lay: LayerRenderer, scene: F32, ep: Swelling) -> bool:
    """Bright raised blob at a part's corner/edge with a lit rim and a shadowed rim; False
    when the part is not on this layer, so there is nothing to draw."""
    k = ep.part
    sh = lay.shapes[k]
    r = max(2.5, ep.radius * min(sh.a, sh.b)) * (1.0 + ep.growth * (lay.index - ep.start))
    bx, by = superellipse(sh, np.array([ep.anchor]))[0]
    nx, ny = bx - sh.cx, by - sh.cy
    norm = math.hypot(nx, ny) or 1.0
    ex, ey = bx + 0.1 * r * nx / norm, by + 0.1 * r * ny / norm
    # Warped metal overhangs the powder a little, but never reaches a misprint's gap.
    bulge = min(lay.gap - 1, max(1, round(0.3 * r)))
    rim = max(1, min(round(0.1 * r), 1 + lay.size // 300))
    box = box_around(ex, ey, r + bulge + rim + 2, lay.size)
    ys, xs = box.grid()
    phi = math.atan2(ny, nx) + ep.tilt
    cp, sp = np.float32(math.cos(phi)), np.float32(math.sin(phi))
    du, dv = xs - np.float32(ex), ys - np.float32(ey)
    a = (du * cp + dv * sp) / np.float32(r)
    b = (-du * sp + dv * cp) / np.float32(r * ep.aspect)
    region = (a * a + b * b <= 1.0) & dilate(lay.ids[box.sl] == k + 1, bulge)
    if not region.any():
        return False
    mottle = smooth_noise(lay.rng, region.shape, max(1.0, r / 6.0))
    # The warped metal keeps its hatch (unlike a glossy over-melt), lifted towards the light.
    hatch = np.where(lay.ids[box.sl] == k + 1, scene[box.sl] - lay.levels[k], 0.0)
    tex = 1.4 * hatch + lay.levels[k] + 65.0 + 12.0 * mottle
    # Light from the top-left: the raised edge facing it glints, the far edge is in shadow.
    lit = region & ~shift(region, rim, rim)
    shadow = region & ~shift(region, -rim, -rim)
    tex = np.where(
        lit, 245.0 + 4.0 * mottle, np.where(shadow, 58.0 + 6.0 * mottle, tex)
    ).astype(np.float32)
    scene[box.sl][region] = tex[region]
    lay.masks[SWELLING][box.sl] |= region
    return True


def draw_under_melting(lay: LayerRenderer, scene: F32, k: int) -> None:
    """Dark, rough region inside part k with speckled pores; the hatch shows faintly."""
    found = lay.defect_region(k)
    if found is None:
        return
    box, region = found
    crop = scene[box.sl]
    rough = smooth_noise(lay.rng, region.shape, 0.8)
    tex = 0.4 * (crop - lay.levels[k]) + lay.levels[k] - 72.0 + 9.0 * rough
    seeds = lay.rng.random(region.shape) < 0.07
    pore_px = max(2, round(lay.size / 1024) + 1)
    pores = np.asarray(
        cv2.dilate(seeds.view(np.uint8), np.ones((pore_px, pore_px), np.uint8)), dtype=bool
    )
    pores |= lay.rng.random(region.shape) < 0.05
    tex = np.where(pores, 22.0 + 6.0 * rough, tex).astype(np.float32)
    crop[region] = tex[region]
    lay.masks[UNDER_MELTING][box.sl] |= region


def draw_over_melting(lay: LayerRenderer, image: F32, k: int) -> None:
    """Glossy, saturated, smooth region inside part k (after lighting: a specular glint)."""
    found = lay.defect_region(k)
    if found is None:
        return
    box, region = found
    ys, xs = box.grid()
    h, w = region.shape
    yy, xx = np.nonzero(region)
    # A specular glint: a saturated core off-centre, falling off smoothly to a bright sheen.
    i = int(lay.rng.integers(0, len(yy)))
    hx, hy = float(xx[i] + box.x0), float(yy[i] + box.y0)
    reach = np.float32(max(2.0, 0.45 * max(h, w)))
    bump = np.exp(-((xs - np.float32(hx)) ** 2 + (ys - np.float32(hy)) ** 2) / (reach * reach))
    gloss = (
        lay.rng.uniform(195.0, 212.0)
        + 65.0 * bump
        + 1.2 * lay.rng.standard_normal(region.shape)
    )
    # Feather inward only, so nothing outside the mask changes.
    f = region.astype(np.float32)
    wgt = np.minimum(1.0, 1.7 * blur(f, max(0.8, min(h, w) / 16.0))) * f
    crop = image[box.sl]
    crop[...] = crop * (1.0 - wgt) + gloss.astype(np.float32) * wgt
    lay.masks[OVER_MELTING][box.sl] |= region


def draw_spatter(lay: LayerRenderer, image: F32) -> None:
    """Specks 2-6 px across on powder near melted areas; physically small at any scale."""
    s, rng = lay.size, lay.rng
    melted = (lay.ids > 0) | lay.masks[MISPRINT] | lay.masks[SWELLING]
    edge = melted & ~erode(melted, 1)
    pts = cv2.findNonZero(edge.view(np.uint8))
    if pts is None:
        return
    edge_xy = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    # Centres >= 4 px from melt, so a speck (radius <= 3) never touches it.
    forbid = dilate(melted, 4)
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
        lay.masks[SPATTER][sl] |= stamp
