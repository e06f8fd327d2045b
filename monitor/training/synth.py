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

Names are ``layer_%05d`` of the 1-based layer number (``start_layer + index``). The plan lives
in :mod:`monitor.training.synth_plan`, the drawing in :mod:`monitor.training.synth_render`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from monitor.training.dataset import SYNTH_GENERATOR, DatasetWriter
from monitor.training.synth_plan import U8, part_id_map, plan_build, shape_at
from monitor.training.synth_render import LayerRenderer, SynthLayer
from monitor.vision.classes import DEFAULT_CLASS_NAMES

__all__ = ["CLASS_NAMES", "GENERATOR_NAME", "BuildGenerator", "SynthLayer", "write_dataset"]

# The generator draws exactly the default model's classes, in its channel order.
CLASS_NAMES = DEFAULT_CLASS_NAMES
GENERATOR_NAME = SYNTH_GENERATOR

_MIN_SIZE = 64


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
        self._plan = plan_build(seed, layers)

    def _check(self, index: int) -> None:
        if not 0 <= index < self.layers:
            raise IndexError(f"layer index {index} out of range 0..{self.layers - 1}")

    def layer(self, index: int) -> SynthLayer:
        """Render layer `index` (0-based)."""
        self._check(index)
        rng = np.random.default_rng([self.seed, 2, index])
        return LayerRenderer(self._plan, self.size, index, rng).render()

    def part_ids(self, index: int) -> U8:
        """(H, W) uint8 map of the intended part geometry at layer `index`: 0 powder, k+1 part k.

        Like Peregrine's ``part_ids``; misprints and the overhang of a swelling lie outside it.
        """
        self._check(index)
        return part_id_map([shape_at(p, index, self.size) for p in self._plan.parts], self.size)

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
    writer = DatasetWriter(Path(out), CLASS_NAMES)
    for lay in gen:
        writer.add(f"layer_{start_layer + lay.index:05d}", lay.image, lay.masks)
        if progress is not None:
            progress(lay.index)
    return writer.finish({"generator": GENERATOR_NAME, "seed": seed, "size": size,
                          "layers": layers})
