"""Nominal slices: mask images with stable ids, ASCII and binary CLI, STL and 3MF meshes."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import trimesh

from monitor.geometry.cli_format import CliLayer, Polyline, read_cli, write_cli
from monitor.geometry.slices import NominalSlices, SliceError, _MaskIds

FRAME_MM = (0.0, 0.0, 100.0, 100.0)
FRAME_PX = (200, 200)  # 0.5 mm per pixel


def _square(x0: float, y0: float, s: float, ccw: bool = True) -> np.ndarray:
    p = np.array([[x0, y0], [x0 + s, y0], [x0 + s, y0 + s], [x0, y0 + s]], float)
    return p if ccw else p[::-1]


def _layers() -> list[CliLayer]:
    # part 1: a 40 mm square with a 20 mm hole; part 2: a 10 mm square; z 0.05 and 0.10
    out = []
    for z in (0.05, 0.10):
        out.append(CliLayer(z, [Polyline(1, 1, _square(10, 10, 40)),
                                Polyline(1, 0, _square(20, 20, 20, ccw=False)),
                                Polyline(2, 1, _square(70, 70, 10)),
                                Polyline(3, 2, np.array([[0, 0], [5, 5]], float))]))
    return out


def _check_cli_slice(src: NominalSlices) -> None:
    s = src.get("B1", 2)
    assert s is not None and s.frame_px == FRAME_PX
    lab = s.labels
    # areas in frame px (0.25 mm² each): 40² - 20² = 1200 mm², 100 mm²; the open one ignored
    assert np.count_nonzero(lab == 1) * 0.25 == pytest.approx(1200, rel=0.03)
    assert np.count_nonzero(lab == 2) * 0.25 == pytest.approx(100, rel=0.05)
    assert 3 not in lab
    assert lab[200 - 60, 60] == 0          # inside the hole (y up: row = 200 - y / 0.5)
    assert lab[200 - 30, 30] == 1
    assert lab[200 - 150, 150] == 2
    assert src.get("B1", 7) is None         # no layer near z = 0.35
    assert src.get("missing", 2) is None


@pytest.mark.parametrize("binary", [False, True])
def test_cli_slices(tmp_path: Path, binary: bool) -> None:
    (tmp_path / "B1.cli").parent.mkdir(exist_ok=True)
    write_cli(tmp_path / "B1.cli", _layers(), binary=binary, units=0.005)
    parsed = read_cli(tmp_path / "B1.cli")
    assert [round(c.z_mm, 4) for c in parsed] == [0.05, 0.1]
    src = NominalSlices(str(tmp_path / "{build}.cli"), layer_thickness_mm=0.05,
                        frame_mm=FRAME_MM, frame_px=FRAME_PX)
    _check_cli_slice(src)


def test_binary_cli_short_commands(tmp_path: Path) -> None:
    # 128 layer (uint16 z), 129 polyline (uint16), 131 hatches (skipped); units 0.01 mm
    body = struct.pack("<HH", 128, 10)
    pts = (_square(10, 10, 40) / 0.01).astype("<u2")
    body += struct.pack("<H3H", 129, 4, 1, 4) + pts.tobytes()
    body += struct.pack("<H2H", 131, 9, 1) + np.zeros(4, "<u2").tobytes()
    head = b"$$HEADERSTART\n$$BINARY\n$$UNITS/0.01\n$$LAYERS/1\n$$HEADEREND"
    (tmp_path / "B.cli").write_bytes(head + body)
    layers = read_cli(tmp_path / "B.cli")
    assert len(layers) == 1 and layers[0].z_mm == pytest.approx(0.1)
    assert layers[0].polylines[0].id == 4
    np.testing.assert_allclose(layers[0].polylines[0].points, _square(10, 10, 40))


def test_bad_cli_is_a_slice_error(tmp_path: Path) -> None:
    (tmp_path / "B.cli").write_bytes(b"$$HEADERSTART\n$$BINARY\n$$HEADEREND" + b"\x99\x00")
    src = NominalSlices(str(tmp_path / "{build}.cli"), layer_thickness_mm=0.05,
                        frame_mm=FRAME_MM, frame_px=FRAME_PX)
    with pytest.raises(SliceError, match="unknown binary command 153"):
        src.get("B", 1)


def test_vector_source_needs_frame_mm() -> None:
    with pytest.raises(SliceError, match=r"geometry\.frame_mm"):
        NominalSlices("x/{build}.cli", layer_thickness_mm=0.05)


@pytest.mark.parametrize("suffix", [".stl", ".3mf"])
def test_mesh_slices(tmp_path: Path, suffix: str) -> None:
    box = trimesh.creation.box(extents=(40, 20, 1.0))
    box.apply_translation((30, 30, 0.5))              # 40 x 20 mm, z 0..1
    cyl = trimesh.creation.cylinder(radius=10, height=0.5, sections=64)
    cyl.apply_translation((70, 70, 0.25))             # r 10 mm, z 0..0.5
    trimesh.util.concatenate([box, cyl]).export(tmp_path / f"B1{suffix}")
    src = NominalSlices(str(tmp_path / f"{{build}}{suffix}"), layer_thickness_mm=0.05,
                        frame_mm=FRAME_MM, frame_px=FRAME_PX)
    s = src.get("B1", 3)
    assert s is not None
    ids = sorted(set(np.unique(s.labels).tolist()) - {0})
    assert len(ids) == 2
    areas = sorted(np.count_nonzero(s.labels == i) * 0.25 for i in ids)
    assert areas[0] == pytest.approx(np.pi * 100, rel=0.05)
    assert areas[1] == pytest.approx(800, rel=0.05)
    high = src.get("B1", 15)                           # z 0.725: only the box
    assert high is not None and len(set(np.unique(high.labels).tolist()) - {0}) == 1
    empty = src.get("B1", 40)
    assert empty is not None and not empty.labels.any()


def test_mask_slices_keep_ids_across_layers(tmp_path: Path) -> None:
    d = tmp_path / "nominal" / "B1"
    d.mkdir(parents=True)
    for layer, dx in [(1, 0), (2, 3), (3, 6)]:
        m = np.zeros((100, 120), np.uint8)
        m[10:30, 10 + dx:40 + dx] = 255
        m[60:90, 70:100] = 255
        if layer == 3:
            m[10:20, 100:110] = 255   # a new part appears
        cv2.imwrite(str(d / f"layer_{layer:05d}.png"), m)
    src = NominalSlices(str(tmp_path / "nominal/{build}/layer_{layer:05d}.png"),
                        layer_thickness_mm=0.05)
    first = src.get("B1", 1)
    assert first is not None and first.frame_px == (120, 100)
    a, b = int(first.labels[20, 20]), int(first.labels[70, 80])
    assert {a, b} == {1, 2}
    third = src.get("B1", 3)
    assert third is not None
    assert third.labels[20, 30] == a and third.labels[70, 80] == b
    assert third.labels[15, 105] == 3
    assert src.get("B1", 4) is None


def _reference_ids(seen: np.ndarray, part: np.ndarray, next_id: int) -> tuple[np.ndarray, int]:
    """Region by region: the most common earlier id (lowest on a tie), else a new one."""
    n, comp = cv2.connectedComponents(part.astype(np.uint8), connectivity=8)
    labels = np.zeros(part.shape, np.int32)
    for k in range(1, n):
        prev = seen[comp == k]
        prev = prev[prev > 0]
        if prev.size:
            pid = int(np.bincount(prev).argmax())
        else:
            pid, next_id = next_id, next_id + 1
        labels[comp == k] = pid
    return labels, next_id


@pytest.mark.parametrize("first_id", [1, 3_000_000])  # a small id table; one too big for it
def test_mask_ids_match_region_by_region_reference(first_id: int) -> None:
    rng = np.random.default_rng(7)
    ids = _MaskIds()
    ids.next_id = first_id
    seen, next_id = np.zeros((90, 110), np.int32), first_id
    for layer in range(6):
        part = np.zeros((90, 110), np.uint8)
        for _ in range(12):  # blobs that move, merge and split from layer to layer
            x, y, w, h = (int(v) for v in rng.integers([0, 0, 3, 3], [100, 100, 15, 15]))
            cv2.rectangle(part, (x, y), (x + w, y + h), 1, -1)
        if layer == 4:  # two earlier parts merged with equal votes: the lower id wins
            part[:] = 0
            part[0:10, 0:10] = 1
            seen[0:10, 0:5], seen[0:10, 5:10] = 9 + first_id, 4 + first_id
        ids.seen = seen.copy() if layer == 4 else ids.seen
        want, next_id = _reference_ids(seen, part > 0, next_id)
        got = ids.assign(part > 0)
        np.testing.assert_array_equal(got, want)
        seen = np.where(want > 0, want, seen)
        if layer == 4:
            assert got[0, 0] == 4 + first_id


def test_template_fields(tmp_path: Path) -> None:
    src = NominalSlices(str(tmp_path / "{build}/{stem}.png"), layer_thickness_mm=0.05)
    assert src.path("B", 3, "img_012000") == tmp_path / "B/img_012000.png"
    bad = NominalSlices(str(tmp_path / "{bild}.png"), layer_thickness_mm=0.05)
    with pytest.raises(SliceError, match="fields"):
        bad.get("B", 1)
