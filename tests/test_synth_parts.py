"""Synthetic builds with nominal slices and part events: a part that breaks off, one that
distorts; every layer the events do not touch keeps its bytes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from monitor.cli import main
from monitor.training.synth import BuildGenerator
from monitor.training.synth_render import MISPRINT, NO_DEFECT

LAYERS, SIZE = 12, 256


@pytest.fixture(scope="module")
def builds() -> tuple[BuildGenerator, BuildGenerator]:
    return (BuildGenerator(size=SIZE, layers=LAYERS, seed=4),
            BuildGenerator(size=SIZE, layers=LAYERS, seed=4, part_events=True))


def _touched(gen: BuildGenerator) -> set[int]:
    return {i for e in gen.events for i in range(e.start, e.stop)}


def test_layers_without_events_keep_their_bytes(
    builds: tuple[BuildGenerator, BuildGenerator],
) -> None:
    plain, evented = builds
    assert plain.events == () and len(evented.events) == 2
    touched = _touched(evented)
    assert 0 < len(touched) < LAYERS
    for i in range(LAYERS):
        a, b = plain.layer(i), evented.layer(i)
        same = np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
        assert same == (i not in touched), i
        assert np.array_equal(plain.part_ids(i), evented.part_ids(i))  # slices never change


def test_missing_part_is_powder_where_its_slice_says_part(
    builds: tuple[BuildGenerator, BuildGenerator],
) -> None:
    plain, evented = builds
    (ev,) = [e for e in evented.events if e.kind == "missing"]
    assert ev.stop == LAYERS  # broken off: never printed again
    for i in (ev.start, LAYERS - 1):
        part = evented.part_ids(i) == ev.part + 1
        lay, ref = evented.layer(i), plain.layer(i)
        assert lay.masks[NO_DEFECT][part].all()  # labelled powder
        powder = ref.masks[NO_DEFECT] & (evented.part_ids(i) == 0)
        # looks like powder: as dark as the powder around, far below the melt it was
        assert abs(float(lay.image[part].mean()) - float(ref.image[powder].mean())) < 15
        assert float(ref.image[part].mean()) > float(lay.image[part].mean()) + 20


def test_distorted_part_melts_outside_its_slice(
    builds: tuple[BuildGenerator, BuildGenerator],
) -> None:
    _, evented = builds
    (ev,) = [e for e in evented.events if e.kind == "distorted"]
    for i in range(ev.start, ev.stop):
        lay = evented.layer(i)
        nominal = evented.part_ids(i) > 0
        outside = lay.masks[MISPRINT] & ~nominal
        # the melt beyond the slice is misprint, next to the distorted part
        near = cv2.dilate((evented.part_ids(i) == ev.part + 1).astype(np.uint8),
                          np.ones((41, 41), np.uint8)) > 0
        assert (outside & near).sum() > 30, i


def test_synth_command_writes_nominal_and_events(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    r = CliRunner().invoke(main, ["synth", str(out), "--layers", "8", "--size", "96",
                                  "--seed", "3", "--part-events"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    src = manifest["source"]
    assert src["nominal"] == "nominal/layer_{layer:05d}.png"
    kinds = sorted(e["kind"] for e in src["part_events"])
    assert kinds == ["distorted", "missing"]
    for e in src["part_events"]:
        assert 1 <= e["first_layer"] <= e["last_layer"] <= 8 and len(e["at_px"]) == 2
    gen = BuildGenerator(size=96, layers=8, seed=3, part_events=True)
    for i, name in enumerate(manifest["images"]):
        nominal = cv2.imread(str(out / src["nominal"].format(layer=i + 1)), 0)
        assert name == f"layer_{i + 1:05d}"
        assert np.array_equal(nominal > 0, gen.part_ids(i) > 0)
        assert set(np.unique(nominal).tolist()) <= {0, 255}
