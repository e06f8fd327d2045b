"""Dataset folders: reading and checking, the split by layer, Peregrine and clean-frame imports."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from monitor.training.dataset import (
    DatasetError,
    import_clean_frames,
    layer_number,
    open_dataset,
    split_by_layer,
)
from monitor.training.peregrine import import_peregrine, parse_layer_range
from monitor.training.synth import BuildGenerator, write_dataset
from monitor.vision.classes import DEFAULT_CLASS_NAMES
from tests.conftest import encode, layer_image


@pytest.fixture(scope="module")
def synth_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "build"
    write_dataset(out, layers=6, size=64, seed=3)
    return out


def test_open_synth_dataset_matches_generator(synth_ds: Path) -> None:
    ds = open_dataset(synth_ds)
    assert ds.classes == DEFAULT_CLASS_NAMES
    assert ds.names == tuple(f"layer_{i:05d}" for i in range(1, 7))
    assert ds.synth_command() == f"pbf-monitor synth {synth_ds} --layers 6 --size 64 --seed 3"
    gray, masks = ds.sample("layer_00003")
    lay = BuildGenerator(size=64, layers=6, seed=3).layer(2)
    assert gray.dtype == np.float32 and gray.shape == (64, 64)
    np.testing.assert_allclose(gray, lay.image / 255.0, atol=1e-6)
    np.testing.assert_array_equal(masks, lay.masks)


def test_synth_command_regenerates_a_healthy_build_with_part_events(tmp_path: Path) -> None:
    """A model card's regenerate command for a healthy build once dropped --no-defects, so
    it rebuilt a build full of defects in place of the negatives trained on."""
    from click.testing import CliRunner

    from monitor.cli import main

    write_dataset(tmp_path / "h", layers=3, size=64, seed=5, defects=False, part_events=True,
                  camera="varied")
    cmd = open_dataset(tmp_path / "h").synth_command() or ""
    assert cmd.endswith("--seed 5 --part-events --no-defects --camera varied"), cmd
    args = cmd.split()[2:]
    args[0] = str(tmp_path / "again")
    res = CliRunner().invoke(main, ["synth", *args])
    assert res.exit_code == 0, res.output
    for name in ("layer_00001", "layer_00003"):
        a = open_dataset(tmp_path / "h").sample(name)
        b = open_dataset(tmp_path / "again").sample(name)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert not b[1][1:].any()  # no defect drawn


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no_manifest", "manifest.json: missing"),
        ("bad_json", "not valid JSON"),
        ("wrong_format", "'format' is 'other/1'"),
        ("missing_mask", "masks/spatter/layer_00002.png: missing mask"),
        ("mask_size", "mask is 32x32 but its image is 64x64"),
        ("missing_image", "images/layer_00004.png: image listed in the manifest is missing"),
        ("duplicate_class", "'classes' lists a name twice"),
    ],
)
def test_broken_dataset_names_the_file(synth_ds: Path, tmp_path: Path, breakage: str,
                                       message: str) -> None:
    ds = _copy(synth_ds, tmp_path / "ds")
    manifest = ds / "manifest.json"
    data = json.loads(manifest.read_text())
    if breakage == "no_manifest":
        manifest.unlink()
    elif breakage == "bad_json":
        manifest.write_text("{")
    elif breakage == "wrong_format":
        manifest.write_text(json.dumps({**data, "format": "other/1"}))
    elif breakage == "missing_mask":
        (ds / "masks" / "spatter" / "layer_00002.png").unlink()
    elif breakage == "mask_size":
        cv2.imwrite(str(ds / "masks" / "misprint" / "layer_00005.png"),
                    np.zeros((32, 32), np.uint8))
    elif breakage == "missing_image":
        (ds / "images" / "layer_00004.png").unlink()
    elif breakage == "duplicate_class":
        manifest.write_text(json.dumps({**data, "classes": ["a", "a"]}))
    with pytest.raises(DatasetError, match=message.replace(".", r"\.").replace("'", "'")):
        open_dataset(ds)


def test_layer_number() -> None:
    assert layer_number("layer_00042") == 42
    assert layer_number("B7_2024_L12") == 12
    with pytest.raises(DatasetError, match="no layer number"):
        layer_number("photo")


def test_split_by_layer_is_deterministic_whole_blocks_and_spread() -> None:
    names = [f"layer_{i:05d}" for i in range(1, 101)]
    shuffled = list(reversed(names))
    train, val = split_by_layer(shuffled, val_fraction=0.2, block=5)
    assert (train, val) == split_by_layer(names, val_fraction=0.2, block=5)
    assert sorted(train + val) == names and not set(train) & set(val)
    assert len(val) == 20
    blocks = {(layer_number(n) - 1) // 5 for n in val}
    assert len(blocks) == 4  # whole blocks: no validation layer has a training neighbour inside
    assert all(all(f"layer_{b * 5 + k + 1:05d}" in val for k in range(5)) for b in blocks)
    assert min(blocks) < 5 < 10 <= max(blocks)  # spread over the build, not one end
    assert split_by_layer(names, val_fraction=0.0) == (names, [])
    with pytest.raises(DatasetError, match="val_fraction"):
        split_by_layer(names, val_fraction=1.0)


def test_split_keeps_a_training_block_with_few_layers() -> None:
    train, val = split_by_layer(["l1", "l2", "l6", "l7"], val_fraction=0.9, block=5)
    assert train and val


def test_parse_layer_range() -> None:
    assert parse_layer_range("2:5") == range(2, 5)
    assert parse_layer_range("3") == range(3, 4)
    assert parse_layer_range(":4") == range(0, 4)
    assert parse_layer_range("7:") == range(7, -1)
    for bad in ("5:2", "a:b", ":"):
        with pytest.raises(DatasetError, match="--layers"):
            parse_layer_range(bad)


# --- Peregrine ------------------------------------------------------------------------

V2023_NAMES = ["Powder", "Printed", "Recoater Hopping", "Recoater Streaking",
               "Incomplete Spreading", "Swelling", "Debris", "Super-Elevation", "Spatter",
               "Misprint", "Over Melting", "Under Melting"]


def write_peregrine(path: Path, *, layers: int = 5, h: int = 40, w: int = 48,
                    dtype: str = "uint8", skip_ids: tuple[int, ...] = ()) -> np.ndarray:
    """A small HDF5 file in the Peregrine v2023 layout; returns the mask stack (12, L, H, W)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (layers, h, w)).astype(np.uint8)
    masks = np.zeros((12, layers, h, w), dtype=np.uint8)
    for cid in range(12):
        for i in range(layers):
            y, x = (cid * 3 + i) % (h - 4), (cid * 5 + 2 * i) % (w - 4)
            masks[cid, i, y:y + 3, x:x + 4] = 1
    with h5py.File(path, "w") as f:
        data = images if dtype == "uint8" else images.astype(dtype) / 255.0 * 3.0
        f.create_dataset("slices/camera_data/visible/0", data=data, compression="gzip")
        f.create_dataset("slices/camera_data/visible/1", data=images)
        for cid in range(12):
            if cid not in skip_ids:
                f.create_dataset(f"slices/segmentation_results/{cid}", data=masks[cid] > 0)
        f["slices/segmentation_results/class_names"] = np.array(V2023_NAMES, dtype="S")
        f.create_dataset("slices/part_ids", data=np.zeros((layers, h, w), np.uint32))
        f.create_dataset("temporal/layer_times", data=np.arange(layers, dtype=np.float64))
    return masks


def test_import_peregrine_default_mapping(tmp_path: Path) -> None:
    src = tmp_path / "build.hdf5"
    masks = write_peregrine(src)
    calls: list[tuple[int, int]] = []
    result = import_peregrine(src, tmp_path / "out", progress=lambda d, t: calls.append((d, t)))
    assert result.layers == 5 and result.warnings == ()
    assert calls[-1] == (5, 5)
    ds = open_dataset(tmp_path / "out")
    assert ds.classes == DEFAULT_CLASS_NAMES
    assert ds.names == tuple(f"layer_{i:05d}" for i in range(5))
    with h5py.File(src) as f:
        raw = f["slices/camera_data/visible/0"][3]
    gray, got = ds.sample("layer_00003")
    np.testing.assert_allclose(gray, raw / 255.0, atol=1e-6)  # 8-bit kept unchanged
    for ch, cid in enumerate((0, 5, 8, 9, 10, 11)):
        np.testing.assert_array_equal(got[ch], masks[cid, 3] > 0)
    source = json.loads((tmp_path / "out" / "manifest.json").read_text())["source"]
    assert source["class_ids"] == [0, 5, 8, 9, 10, 11] and source["layers"] == [0, 5]


def test_import_peregrine_custom_mapping_range_and_float_images(tmp_path: Path) -> None:
    src = tmp_path / "build.hdf5"
    masks = write_peregrine(src, layers=6, dtype="float32", skip_ids=(11,))
    result = import_peregrine(src, tmp_path / "out", class_ids=[6, 11],
                              class_names=["debris", "under"], layers=range(2, 4))
    assert result.classes == ("debris", "under") and result.layers == 2
    assert any("segmentation_results/11" in w for w in result.warnings)
    ds = open_dataset(tmp_path / "out")
    assert ds.names == ("layer_00002", "layer_00003")
    gray, got = ds.sample("layer_00002")
    np.testing.assert_array_equal(got[0], masks[6, 2] > 0)
    assert not got[1].any()  # the missing class id gives empty masks, with a warning
    with h5py.File(src) as f:
        raw = f["slices/camera_data/visible/0"][2:4]
    # Floats are mapped with one scale for the imported layers: [min(0, lo), max(1, hi)].
    hi = max(1.0, float(raw.max()))
    np.testing.assert_allclose(gray, raw[0] / hi, atol=1.0 / 65535)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_ids": [0, 0]}, "lists an id twice"),
        ({"class_ids": [0, 5], "class_names": ["a"]}, "1 class names for 2 class ids"),
        ({"layers": range(3, 9)}, "outside the file's 5 layers"),
    ],
)
def test_import_peregrine_rejects_bad_options(tmp_path: Path, kwargs: dict, message: str
                                              ) -> None:
    src = tmp_path / "build.hdf5"
    write_peregrine(src)
    with pytest.raises(DatasetError, match=message):
        import_peregrine(src, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_import_peregrine_rejects_other_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="file not found"):
        import_peregrine(tmp_path / "nope.hdf5", tmp_path / "out")
    (tmp_path / "text.hdf5").write_text("hello")
    with pytest.raises(DatasetError, match="not a readable HDF5 file"):
        import_peregrine(tmp_path / "text.hdf5", tmp_path / "out")
    with h5py.File(tmp_path / "other.hdf5", "w") as f:
        f["x"] = 1
    with pytest.raises(DatasetError, match="is this a Peregrine v2023 build file"):
        import_peregrine(tmp_path / "other.hdf5", tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    write_peregrine(tmp_path / "ok.hdf5")
    with pytest.raises(DatasetError, match="not an empty folder"):
        import_peregrine(tmp_path / "ok.hdf5", tmp_path / "full")


def test_import_peregrine_warns_on_renumbered_classes(tmp_path: Path) -> None:
    src = tmp_path / "old.hdf5"
    write_peregrine(src)
    with h5py.File(src, "r+") as f:
        del f["slices/segmentation_results/class_names"]
        names = list(V2023_NAMES)
        names[5], names[6] = names[6], names[5]
        f["slices/segmentation_results/class_names"] = np.array(names, dtype="S")
    result = import_peregrine(src, tmp_path / "out")
    assert any("calls class id 5 'Debris'" in w for w in result.warnings)


# --- clean frames ---------------------------------------------------------------------

def test_clean_frames(tmp_path: Path) -> None:
    src = tmp_path / "frames"
    src.mkdir()
    (src / "b.jpg").write_bytes(encode(layer_image(1, 64), ".jpg"))
    (src / "a.png").write_bytes(encode(layer_image(2, 64, np.uint16), ".png"))
    (src / "notes.txt").write_text("not an image")
    import_clean_frames([src], tmp_path / "neg")
    ds = open_dataset(tmp_path / "neg")
    assert ds.names == ("frame_00001", "frame_00002")
    gray, masks = ds.sample("frame_00001")  # a.png, sorted by name, 16-bit kept
    np.testing.assert_allclose(gray, layer_image(2, 64, np.uint16) / 65535.0, atol=1e-6)
    assert masks[0].all() and not masks[1:].any()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"x\.png"):
        import_clean_frames([bad], tmp_path / "neg2")
    assert not (tmp_path / "neg2").exists()


def test_cli_import_peregrine(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from monitor.cli import main

    src = tmp_path / "build.hdf5"
    write_peregrine(src, layers=4)
    r = CliRunner().invoke(main, ["dataset", "import-peregrine", str(src), str(tmp_path / "o"),
                                  "--class-ids", "0,8", "--layers", "1:3"])
    assert r.exit_code == 0, r.output
    assert "wrote 2 layers, classes no_defect, spatter" in r.output
    assert open_dataset(tmp_path / "o").names == ("layer_00001", "layer_00002")
    r = CliRunner().invoke(main, ["dataset", "import-peregrine", str(src), str(tmp_path / "p"),
                                  "--class-ids", "zero"])
    assert r.exit_code == 2 and "--class-ids 'zero'" in r.output
