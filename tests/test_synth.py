"""Tests for the synthetic build generator and the dataset writer."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from monitor.training.synth import CLASS_NAMES, BuildGenerator, SynthLayer, write_dataset

NO_DEFECT, SWELLING, SPATTER, MISPRINT, OVER, UNDER = range(6)
DEFECTS = [SWELLING, SPATTER, MISPRINT, OVER, UNDER]
LAYERS = 40


@pytest.fixture(scope="module")
def build() -> list[SynthLayer]:
    """A whole 40-layer build at 128 px (about 0.2 s)."""
    return list(BuildGenerator(size=128, layers=LAYERS, seed=0))


@pytest.fixture(scope="module")
def build_parts() -> list[npt.NDArray[np.uint8]]:
    gen = BuildGenerator(size=128, layers=LAYERS, seed=0)
    return [gen.part_ids(i) for i in range(LAYERS)]


def test_class_names() -> None:
    assert CLASS_NAMES == (
        "no_defect",
        "swelling",
        "spatter",
        "misprint",
        "over_melting",
        "under_melting",
    )


@pytest.mark.parametrize("size", [128, 200])
def test_shapes_and_dtypes(size: int) -> None:
    lay = BuildGenerator(size=size, layers=3, seed=1).layer(2)
    assert lay.index == 2
    assert lay.image.shape == (size, size) and lay.image.dtype == np.uint8
    assert lay.masks.shape == (len(CLASS_NAMES), size, size) and lay.masks.dtype == np.bool_


def test_same_seed_same_bytes_in_any_order() -> None:
    a = BuildGenerator(size=128, layers=6, seed=3)
    b = BuildGenerator(size=128, layers=6, seed=3)
    forward = [a.layer(i) for i in range(6)]
    backward = [b.layer(i) for i in reversed(range(6))][::-1]
    for x, y in zip(forward, backward, strict=True):
        assert x.image.tobytes() == y.image.tobytes()
        assert x.masks.tobytes() == y.masks.tobytes()
    assert a.layer(4).image.tobytes() == forward[4].image.tobytes()  # again, after others


def test_different_seed_differs() -> None:
    a = BuildGenerator(size=128, layers=2, seed=0).layer(0)
    b = BuildGenerator(size=128, layers=2, seed=1).layer(0)
    assert a.image.tobytes() != b.image.tobytes()
    assert a.masks.tobytes() != b.masks.tobytes()


def test_consecutive_layers_differ_but_parts_change_slowly(
    build: list[SynthLayer], build_parts: list[npt.NDArray[np.uint8]]
) -> None:
    assert build[0].image.tobytes() != build[1].image.tobytes()
    for before, after in itertools.pairwise(build_parts):
        a, b = before > 0, after > 0
        assert (a & b).sum() / (a | b).sum() > 0.85


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"size": 32}, ValueError),
        ({"layers": 0}, ValueError),
        ({"seed": -1}, ValueError),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, int], error: type[Exception]) -> None:
    with pytest.raises(error):
        BuildGenerator(**kwargs)


@pytest.mark.parametrize("index", [-1, 5])
def test_layer_index_out_of_range(index: int) -> None:
    with pytest.raises(IndexError):
        BuildGenerator(size=128, layers=5, seed=0).layer(index)


@pytest.mark.parametrize("cls", DEFECTS, ids=[CLASS_NAMES[c] for c in DEFECTS])
def test_every_defect_is_common_but_not_everywhere(build: list[SynthLayer], cls: int) -> None:
    present = [bool(lay.masks[cls].any()) for lay in build]
    assert sum(present) >= 0.3 * LAYERS, f"{CLASS_NAMES[cls]} in only {sum(present)} layers"
    assert not all(present), f"{CLASS_NAMES[cls]} in every layer"


def test_swelling_persists_and_grows(build: list[SynthLayer]) -> None:
    areas = [int(lay.masks[SWELLING].sum()) for lay in build]
    runs: list[list[int]] = []
    for i, area in enumerate(areas):
        if area:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    assert len(runs) >= 2
    for run in runs:
        assert len(run) >= 3, f"swelling in layers {run} does not persist"
        for i, j in itertools.pairwise(run):
            # same place on the next layer
            assert (build[i].masks[SWELLING] & build[j].masks[SWELLING]).any()
        assert areas[run[-1]] > areas[run[0]], f"swelling in layers {run} does not grow"


def test_each_layer_lists_the_swelling_episodes_it_draws() -> None:
    """Scoring alarms against the plan needs the episodes actually drawn: one planned on a
    part that is not printed on those layers draws nothing (seed 201: the part of 2 of its 6
    episodes breaks off before they start)."""
    gen = BuildGenerator(size=128, layers=LAYERS, seed=201, part_events=True)
    eps = gen._plan.swellings
    drawn: dict[int, list[int]] = {}
    for lay in gen:
        for i in lay.swellings:
            drawn.setdefault(i, []).append(lay.index)
            assert eps[i].start <= lay.index < eps[i].stop
        assert bool(lay.swellings) == bool(lay.masks[SWELLING].any())
    planned = {i for i, ep in enumerate(eps) if ep.stop > ep.start}
    assert set(drawn) < planned  # some planned episode was never drawn
    assert len(drawn) >= 3


@pytest.mark.parametrize("size", [128, 512])
def test_spatter_specks_are_small(build: list[SynthLayer], size: int) -> None:
    layers = (
        build
        if size == 128
        else [BuildGenerator(size=512, layers=LAYERS, seed=0).layer(i) for i in range(4)]
    )
    seen = 0
    for lay in layers:
        n, _, stats, _ = cv2.connectedComponentsWithStats(
            lay.masks[SPATTER].view(np.uint8), connectivity=8
        )
        for _, _, w, h, area in stats[1:n]:
            assert w <= 6 and h <= 6 and area <= 36
            seen += 1
    assert seen > 0


def test_masks_are_consistent(
    build: list[SynthLayer], build_parts: list[npt.NDArray[np.uint8]]
) -> None:
    for lay, ids in zip(build, build_parts, strict=True):
        m, parts = lay.masks, ids > 0
        powder_covers = parts | m[SWELLING] | m[SPATTER] | m[MISPRINT]
        assert np.array_equal(m[NO_DEFECT], ~powder_covers)
        for cls in DEFECTS:
            assert not (m[NO_DEFECT] & m[cls]).any()
        assert not (m[MISPRINT] & parts).any()
        assert not (m[SPATTER] & parts).any()
        assert not (m[OVER] & ~parts).any()
        assert not (m[UNDER] & ~parts).any()


def _ring(mask: npt.NDArray[np.bool_], parts: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Part pixels just around `mask`."""
    kernel = np.ones((7, 7), np.uint8)
    grown = cv2.dilate(mask.view(np.uint8), kernel).view(np.bool_)
    return grown & parts & ~mask


def test_over_melting_brighter_and_under_melting_darker_than_part(
    build: list[SynthLayer], build_parts: list[npt.NDArray[np.uint8]]
) -> None:
    checked = 0
    for lay, ids in zip(build, build_parts, strict=True):
        image = lay.image.astype(np.float64)
        clean_part = (ids > 0) & ~lay.masks[DEFECTS].any(axis=0)
        for cls, sign in ((OVER, 1.0), (UNDER, -1.0)):
            mask = lay.masks[cls]
            ring = _ring(mask, clean_part)
            if mask.sum() < 5 or ring.sum() < 5:
                continue
            assert sign * (image[mask].mean() - image[ring].mean()) > 30, (lay.index, cls)
            checked += 1
    assert checked >= 10


def test_image_is_not_a_cartoon() -> None:
    lay = BuildGenerator(size=256, layers=2, seed=0).layer(0)
    image = lay.image.astype(np.float32)
    eroded = cv2.erode(lay.masks[NO_DEFECT].view(np.uint8), np.ones((7, 7), np.uint8))
    powder = eroded.view(np.bool_)
    grain = image - cv2.GaussianBlur(image, (0, 0), 2.0)
    assert grain[powder].std() > 2.0  # real frames: 2-5 grey levels of pixel-scale noise
    # Low-frequency illumination: powder brightness differs across the bed.
    blocks = [
        image[y : y + 64, x : x + 64][powder[y : y + 64, x : x + 64]].mean()
        for y in range(0, 256, 64)
        for x in range(0, 256, 64)
        if powder[y : y + 64, x : x + 64].sum() > 500
    ]
    assert max(blocks) - min(blocks) > 15
    # Parts are melted metal, distinctly brighter than the powder around them.
    parts = ~lay.masks[NO_DEFECT] & ~lay.masks[1:].any(axis=0)
    assert image[parts].mean() > image[powder].mean() + 20


def test_write_dataset_layout(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    seen: list[int] = []
    manifest_path = write_dataset(
        out, layers=3, size=96, seed=5, start_layer=7, progress=seen.append
    )
    assert manifest_path == out / "manifest.json"
    assert seen == [0, 1, 2]
    manifest = json.loads(manifest_path.read_text())
    names = ["layer_00007", "layer_00008", "layer_00009"]
    assert manifest == {
        "format": "pbf-monitor-dataset/1",
        "classes": list(CLASS_NAMES),
        "images": names,
        "source": {"generator": "pbf-monitor synth", "seed": 5, "size": 96, "layers": 3,
                   "nominal": "nominal/layer_{layer:05d}.png"},
    }
    gen = BuildGenerator(size=96, layers=3, seed=5)
    for i, name in enumerate(names):
        lay = gen.layer(i)
        image = cv2.imread(str(out / "images" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.dtype == np.uint8
        assert np.array_equal(image, lay.image)
        for c, cls in enumerate(CLASS_NAMES):
            mask = cv2.imread(str(out / "masks" / cls / f"{name}.png"), cv2.IMREAD_UNCHANGED)
            assert mask is not None and mask.shape == (96, 96)
            assert set(np.unique(mask).tolist()) <= {0, 255}
            assert np.array_equal(mask == 255, lay.masks[c])
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = ["manifest.json"] + [f"images/{n}.png" for n in names]
    expected += [f"masks/{c}/{n}.png" for c in CLASS_NAMES for n in names]
    expected += [f"nominal/{n}.png" for n in names]
    assert files == sorted(expected)  # and so no temp files are left behind
