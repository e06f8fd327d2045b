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

The build is written in the dataset format by :func:`write_dataset`, through
:class:`monitor.training.dataset.DatasetWriter` (which describes the format)::

    OUT/manifest.json            "source": {"generator": "pbf-monitor synth",
                                            "seed": S, "size": PX, "layers": N}
    OUT/images/<name>.png        8-bit grayscale, PX x PX
    OUT/masks/<class>/<name>.png 8-bit, 0 or 255, one per class per image
    OUT/nominal/<name>.png       the layer's nominal slice: 255 where a part is intended

Names are ``layer_%05d`` of the 1-based layer number (``start_layer + index``). The nominal
slices serve the daemon's part checks: copy a build's ``nominal/`` folder to
``nominal/<build>/`` beside the config and set ``[geometry] nominal =
"nominal/{build}/layer_{layer:05d}.png"`` (a mask slice fills the whole image: no frame keys).

Part events (``part_events=True``, ``pbf-monitor synth --part-events``): one part breaks
off (powder where its slice says part, from some layer to the end) and another distorts
for a few layers (swollen, or shifted off its slice; its melt outside the slice is
misprint). They come from their own random stream, so every layer they do not touch keeps
its bytes, and are listed in the manifest's ``source.part_events``: kind, mode, the part's
number (``part``, 1-based as in ``BuildGenerator.part_ids``), its centre in pixels at the
first layer (``at_px``), and the first and last layer numbers affected.

The plan lives in :mod:`monitor.training.synth_plan`, the drawing in
:mod:`monitor.training.synth_render`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from monitor.training.camera import STYLES, CameraStyle
from monitor.training.dataset import SYNTH_GENERATOR, DatasetWriter, write_png
from monitor.training.synth_plan import (
    U8,
    PartEvent,
    part_id_map,
    plan_build,
    plan_part_events,
    shape_at,
)
from monitor.training.synth_render import Camera, LayerRenderer, SynthLayer, with_thin
from monitor.vision.classes import DEFAULT_CLASS_NAMES

__all__ = ["CLASS_NAMES", "GENERATOR_NAME", "BuildGenerator", "SynthLayer", "write_dataset"]

# The generator draws exactly the default model's classes, in its channel order.
CLASS_NAMES = DEFAULT_CLASS_NAMES
GENERATOR_NAME = SYNTH_GENERATOR

_MIN_SIZE = 64
NOMINAL_DIR = "nominal"  # the dataset's nominal slices, one mask per image


class BuildGenerator:
    """A synthetic build: `layer(i)` renders layer i deterministically from (size, layers, seed)."""

    def __init__(self, *, size: int = 512, layers: int = 40, seed: int = 0,
                 part_events: bool = False, defects: bool = True,
                 camera: str = "classic") -> None:
        if size < _MIN_SIZE:
            raise ValueError(f"size={size} is too small; use at least {_MIN_SIZE} px")
        if layers < 1:
            raise ValueError(f"layers={layers}; a build needs at least 1 layer")
        if seed < 0:
            raise ValueError(f"seed={seed}; use a non-negative integer")
        self.size, self.layers, self.seed = size, layers, seed
        self._plan = plan_build(seed, layers)
        if not defects:  # a healthy build: parts, lighting and recoater streaks only
            self._plan = dataclasses.replace(
                self._plan, swellings=(), spatter=frozenset(), misprint=frozenset(),
                over_melting=frozenset(), under_melting=frozenset())
        self.events: tuple[PartEvent, ...] = (
            plan_part_events(seed, layers, len(self._plan.parts)) if part_events else ())
        if camera not in STYLES:
            raise ValueError(f"camera={camera!r}; use one of {', '.join(STYLES)}")
        self.camera: Camera | None = None
        if camera == "varied":  # this build's own camera, drawn from its seed
            style = CameraStyle.draw(seed)
            occupied = np.zeros((size, size), dtype=np.bool_)
            for t in {0, layers // 2, layers - 1}:
                occupied |= self._plain_ids(t) > 0
            self.camera = Camera(style, seed, style.thin_parts(seed, size, occupied))

    def _check(self, index: int) -> None:
        if not 0 <= index < self.layers:
            raise IndexError(f"layer index {index} out of range 0..{self.layers - 1}")

    def layer(self, index: int) -> SynthLayer:
        """Render layer `index` (0-based)."""
        self._check(index)
        rng = np.random.default_rng([self.seed, 2, index])
        return LayerRenderer(self._plan, self.size, index, rng, self.events,
                             self.camera).render()

    def _plain_ids(self, index: int) -> U8:
        return part_id_map([shape_at(p, index, self.size) for p in self._plan.parts], self.size)

    def part_ids(self, index: int) -> U8:
        """(H, W) uint8 map of the intended part geometry at layer `index`: 0 powder, k+1 part k.

        Like Peregrine's ``part_ids``; misprints and the overhang of a swelling lie outside it.
        """
        self._check(index)
        ids = self._plain_ids(index)
        if self.camera is None:
            return ids
        ids = with_thin(ids, self.camera.thin, len(self._plan.parts))
        return np.asarray(self.camera.style.view(ids, nearest=True))

    def nominal(self, index: int) -> U8:
        """(H, W) uint8 nominal slice of layer `index`: 255 where a part is intended."""
        return np.where(self.part_ids(index) > 0, 255, 0).astype(np.uint8)

    def events_json(self, start_layer: int = 1) -> list[dict[str, object]]:
        """The part events as the manifest records them (layer numbers from start_layer)."""
        out: list[dict[str, object]] = []
        for e in self.events:
            sh = shape_at(self._plan.parts[e.part], e.start, self.size)
            ev: dict[str, object] = {
                "kind": e.kind, "part": e.part + 1, "at_px": [round(sh.cx, 1), round(sh.cy, 1)],
                "first_layer": start_layer + e.start, "last_layer": start_layer + e.stop - 1}
            if e.kind == "distorted":
                ev["mode"] = e.mode
                ev["reach_px"] = round(e.reach * self.size, 1)
                if e.mode == "shifted":
                    ev["direction"] = [round(e.dx, 3), round(e.dy, 3)]
            out.append(ev)
        return out

    def __len__(self) -> int:
        return self.layers

    def __iter__(self) -> Iterator[SynthLayer]:
        for i in range(self.layers):
            yield self.layer(i)


def write_dataset(
    out: Path,
    *,
    layers: int,
    size: int,
    seed: int,
    start_layer: int = 1,
    part_events: bool = False,
    defects: bool = True,
    camera: str = "classic",
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a build in the dataset format; returns the manifest path.

    Args:
        out: dataset folder, created if missing; existing files of the same names are replaced.
        layers: number of layers to generate.
        size: image side in pixels.
        seed: build seed.
        start_layer: layer number of the first image (names are ``layer_%05d``).
        part_events: a part breaks off and another distorts (see the module docstring).
        defects: False draws no defect (swelling, spatter, misprint, over/under melting): a
            healthy build, e.g. to count false alarms.
        camera: "classic" (the original look) or "varied": a camera style drawn from the
            seed (monitor.training.camera).
        progress: called with each layer's 0-based index once that layer is written.

    Returns:
        The path of ``manifest.json``.
    """
    if start_layer < 0:
        raise ValueError(f"start_layer={start_layer}; use a non-negative layer number")
    gen = BuildGenerator(size=size, layers=layers, seed=seed, part_events=part_events,
                         defects=defects, camera=camera)
    writer = DatasetWriter(Path(out), CLASS_NAMES)
    nominal = Path(out) / NOMINAL_DIR
    nominal.mkdir(parents=True, exist_ok=True)
    for lay in gen:
        name = f"layer_{start_layer + lay.index:05d}"
        writer.add(name, lay.image, lay.masks)
        write_png(nominal / f"{name}.png", gen.nominal(lay.index))
        if progress is not None:
            progress(lay.index)
    source: dict[str, object] = {"generator": GENERATOR_NAME, "seed": seed, "size": size,
                                 "layers": layers,
                                 "nominal": f"{NOMINAL_DIR}/layer_{{layer:05d}}.png"}
    if not defects:
        source["defects"] = False
    if camera != "classic":
        source["camera"] = camera
    if part_events:
        source["part_events"] = gen.events_json(start_layer)
    return writer.finish(source)

