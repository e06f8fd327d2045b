"""Reading and checking datasets; the deterministic train/validation split; Peregrine import.

The dataset format (written by :func:`monitor.training.synth.write_dataset` and
:func:`import_peregrine`)::

    DIR/manifest.json            {"format": "pbf-monitor-dataset/1", "classes": [...],
                                  "images": ["layer_00001", ...], "source": {...}}
    DIR/images/<name>.png        8- or 16-bit grayscale
    DIR/masks/<class>/<name>.png one per class and image, nonzero = the class is present

Images are decoded with :func:`monitor.vision.imaging.decode`, exactly as the daemon decodes camera
files, so training, evaluation and serving see the same pixel values.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from monitor.errors import ImageError, MonitorError
from monitor.training.synth import DATASET_FORMAT
from monitor.vision.imaging import decode
from monitor.vision.model import DEFAULT_CLASS_NAMES, DEFAULT_PEREGRINE_IDS

log = logging.getLogger(__name__)

# ORNL Peregrine v2023 class ids -> names in this project's style. Id 0 ("Powder") is this
# project's "no_defect". Older releases number the classes differently: pass explicit names.
PEREGRINE_2023_NAMES: dict[int, str] = {
    0: "no_defect",
    1: "printed",
    2: "recoater_hopping",
    3: "recoater_streaking",
    4: "incomplete_spreading",
    5: "swelling",
    6: "debris",
    7: "super_elevation",
    8: "spatter",
    9: "misprint",
    10: "over_melting",
    11: "under_melting",
}
_PEREGRINE_IMAGES = "slices/camera_data/visible/0"
_PEREGRINE_MASKS = "slices/segmentation_results"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class DatasetError(MonitorError):
    """A dataset folder or a file to import is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class Dataset:
    """An opened, checked dataset folder."""

    root: Path
    classes: tuple[str, ...]
    names: tuple[str, ...]
    source: dict[str, Any] = field(default_factory=dict)

    def image_path(self, name: str) -> Path:
        return self.root / "images" / f"{name}.png"

    def mask_path(self, cls: str, name: str) -> Path:
        return self.root / "masks" / cls / f"{name}.png"

    def image(self, name: str) -> np.ndarray:
        """(H, W) float32 gray in [0, 1], decoded like a camera file."""
        path = self.image_path(name)
        try:
            return decode(path.read_bytes())
        except OSError as e:
            raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from e
        except ImageError as e:
            raise DatasetError(f"{path}: {e}") from e

    def masks(self, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """(C, H, W) bool, channel order = classes; checks each mask against `shape`."""
        out: np.ndarray | None = None
        for c, cls in enumerate(self.classes):
            path = self.mask_path(cls, name)
            m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if m is None:
                raise DatasetError(f"{path}: missing or not a readable image "
                                   f"(every image needs a mask for each class)")
            if m.ndim == 3:
                m = m.max(axis=2)
            if shape is not None and m.shape != shape:
                raise DatasetError(f"{path}: mask is {m.shape[1]}x{m.shape[0]} but its image "
                                   f"is {shape[1]}x{shape[0]}")
            if out is None:
                out = np.zeros((len(self.classes), *m.shape), dtype=np.bool_)
            out[c] = m > 0
        assert out is not None  # classes is never empty (checked in open_dataset)
        return out

    def sample(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Image (H, W) float32 and masks (C, H, W) bool of one layer."""
        gray = self.image(name)
        return gray, self.masks(name, gray.shape)

    def layer_number(self, name: str) -> int:
        return layer_number(name)

    def synth_command(self) -> str | None:
        """The `pbf-monitor synth` command that regenerates this dataset, if it was generated."""
        s = self.source
        if s.get("generator") != "pbf-monitor synth":
            return None
        return (f"pbf-monitor synth {self.root} --layers {s.get('layers')} "
                f"--size {s.get('size')} --seed {s.get('seed')}")


def layer_number(name: str) -> int:
    """The layer number of an image name: its last run of digits (layer_00042 -> 42)."""
    digits = re.findall(r"\d+", name)
    if not digits:
        raise DatasetError(f"image name {name!r} has no layer number (expected e.g. layer_00042)")
    return int(digits[-1])


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises many types on garbage
        raise DatasetError(f"{path}: not a readable image ({e})") from e


def open_dataset(root: Path, *, check_files: bool = True) -> Dataset:
    """Open a dataset folder and check it; the error names the file and what is wrong.

    Args:
        root: dataset folder (holding manifest.json).
        check_files: also check that every image and mask exists and that the sizes agree
            (reads file headers only).
    """
    root = Path(root)
    manifest = root / "manifest.json"
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DatasetError(f"{manifest}: missing; a dataset folder needs a manifest.json "
                           f"(see `pbf-monitor synth` or `pbf-monitor dataset "
                           f"import-peregrine`)") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{manifest}: cannot read ({e})") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{manifest}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{manifest}: expected a JSON object")
    if data.get("format") != DATASET_FORMAT:
        raise DatasetError(f"{manifest}: 'format' is {data.get('format')!r}, "
                           f"expected {DATASET_FORMAT!r}")
    classes, names = data.get("classes"), data.get("images")
    for key, value in (("classes", classes), ("images", names)):
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, str) and _NAME_RE.match(v) for v in value)):
            raise DatasetError(f"{manifest}: '{key}' must be a non-empty list of names "
                               f"(letters, digits, '_', '-', '.')")
        if len(set(value)) != len(value):
            raise DatasetError(f"{manifest}: '{key}' lists a name twice")
    assert isinstance(classes, list) and isinstance(names, list)
    source = data.get("source", {})
    ds = Dataset(root=root, classes=tuple(classes), names=tuple(names),
                 source=source if isinstance(source, dict) else {})
    for n in ds.names:
        layer_number(n)
    if check_files:
        for n in ds.names:
            img = ds.image_path(n)
            try:
                size = _png_size(img)
            except FileNotFoundError as e:
                raise DatasetError(f"{img}: image listed in the manifest is missing") from e
            for cls in ds.classes:
                mp = ds.mask_path(cls, n)
                try:
                    msize = _png_size(mp)
                except FileNotFoundError as e:
                    raise DatasetError(f"{mp}: missing mask (class {cls!r} of image "
                                       f"{n!r})") from e
                if msize != size:
                    raise DatasetError(f"{mp}: mask is {msize[0]}x{msize[1]} but its image "
                                       f"is {size[0]}x{size[1]}")
    return ds


def split_by_layer(
    names: Sequence[str], *, val_fraction: float = 0.2, block: int = 5
) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split of image names by layer number.

    Neighbouring layers look alike, so layers are grouped into blocks of `block` consecutive
    layer numbers and whole blocks go to validation, spread evenly over the build. The same
    names always give the same split; no randomness is involved.

    Returns:
        (train names, validation names), each in layer order. With one block only (or
        val_fraction 0) validation is empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction={val_fraction}; use a value in [0, 1)")
    if block < 1:
        raise DatasetError(f"block={block}; use at least 1")
    ordered = sorted(names, key=lambda n: (layer_number(n), n))
    if not ordered or val_fraction == 0.0:
        return ordered, []
    first = layer_number(ordered[0])
    blocks = sorted({(layer_number(n) - first) // block for n in ordered})
    n_val = min(len(blocks) - 1, max(1, round(val_fraction * len(blocks))))
    if n_val <= 0:
        return ordered, []
    # Evenly spread: the block in the middle of each of n_val equal stretches.
    picked = {blocks[math.floor((i + 0.5) * len(blocks) / n_val)] for i in range(n_val)}
    val = [n for n in ordered if (layer_number(n) - first) // block in picked]
    train = [n for n in ordered if (layer_number(n) - first) // block not in picked]
    return train, val


# --- ORNL Peregrine v2023 import ---------------------------------------------------------


@dataclass(frozen=True)
class PeregrineImport:
    """What :func:`import_peregrine` wrote."""

    manifest: Path
    layers: int
    classes: tuple[str, ...]
    warnings: tuple[str, ...]


def parse_layer_range(text: str) -> range:
    """'A:B' (B exclusive; either may be omitted) or 'A' -> range; open ends use -1 markers."""
    m = re.fullmatch(r"\s*(\d*)\s*(?::\s*(\d*)\s*)?", text)
    if not m or (m.group(1) == "" and m.group(2) in (None, "")):
        raise DatasetError(f"--layers {text!r}: expected A:B (0-based, B exclusive), A: or :B")
    start = int(m.group(1)) if m.group(1) else 0
    if m.group(2) is None:
        return range(start, start + 1)
    stop = int(m.group(2)) if m.group(2) else -1
    if stop != -1 and stop <= start:
        raise DatasetError(f"--layers {text!r}: the range is empty")
    return range(start, stop)


def _to_png_range(layer: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A layer of any numeric type -> uint8 or uint16 for PNG, keeping the full range."""
    if layer.dtype == np.bool_:
        return layer.astype(np.uint8) * np.uint8(255)
    if layer.dtype in (np.uint8, np.uint16):
        return layer
    x = np.nan_to_num(layer.astype(np.float64), nan=lo, posinf=hi, neginf=lo)
    scaled = np.clip((x - lo) / max(hi - lo, 1e-12), 0.0, 1.0) * 65535.0
    return np.round(scaled).astype(np.uint16)


def _decode_names(raw: Any) -> list[str]:
    out = []
    for v in np.asarray(raw).reshape(-1).tolist():
        out.append(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
    return out


def _snake(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def import_peregrine(
    hdf5: Path,
    out: Path,
    *,
    class_ids: Sequence[int] = DEFAULT_PEREGRINE_IDS,
    class_names: Sequence[str] | None = None,
    layers: range | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PeregrineImport:
    """Convert an ORNL Peregrine v2023 HDF5 build into a dataset folder.

    After-melt images come from ``slices/camera_data/visible/0`` (one 2-D image per layer).
    8- and 16-bit images are written unchanged; other types (float, wider integers) are mapped
    linearly onto 16 bits with one scale for the whole build (floats: [min(0, lo), max(1, hi)]),
    recorded in the manifest. Masks come from ``slices/segmentation_results/<class id>``; a
    class id missing from the file gives all-zero masks and a warning.

    Everything is written into a hidden sibling folder that is renamed to `out` at the end, so
    `out` either does not exist or is complete.

    Args:
        hdf5: the Peregrine build file.
        out: new dataset folder (must not exist or be empty).
        class_ids: Peregrine class ids, in the order of the dataset's channels.
        class_names: channel names; default: the v2023 names of the ids (0 = no_defect).
        layers: 0-based layer indices to import (a stop of -1 means to the end); default all.
        progress: called with (done, total) after each layer.

    Returns:
        What was written, including the warnings (also logged).
    """
    import h5py  # type: ignore[import-untyped]

    ids = [int(i) for i in class_ids]
    if not ids:
        raise DatasetError("class_ids is empty; give at least one Peregrine class id")
    if len(set(ids)) != len(ids):
        raise DatasetError(f"class_ids {ids} lists an id twice")
    if class_names is not None:
        names = [str(n) for n in class_names]
        if len(names) != len(ids):
            raise DatasetError(f"{len(names)} class names for {len(ids)} class ids {ids}")
    elif ids == list(DEFAULT_PEREGRINE_IDS):
        names = list(DEFAULT_CLASS_NAMES)
    else:
        names = [PEREGRINE_2023_NAMES.get(i, f"class_{i}") for i in ids]
    bad = [n for n in names if not _NAME_RE.match(n)]
    if bad or len(set(names)) != len(names):
        raise DatasetError(f"class names must be unique words of letters, digits, '_', '-', "
                           f"'.'; got {names}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: already exists and is not an empty folder; choose a new "
                           f"output folder")
    messages: list[str] = []

    def warn(msg: str) -> None:
        messages.append(msg)
        log.warning("%s", msg)

    try:
        f = h5py.File(hdf5, "r")
    except FileNotFoundError as e:
        raise DatasetError(f"{hdf5}: file not found") from e
    except OSError as e:
        raise DatasetError(f"{hdf5}: not a readable HDF5 file ({e})") from e
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
    try:
        with f:
            if _PEREGRINE_IMAGES not in f:
                raise DatasetError(f"{hdf5}: no dataset {_PEREGRINE_IMAGES!r} (after-melt "
                                   f"images); is this a Peregrine v2023 build file?")
            images = f[_PEREGRINE_IMAGES]
            if len(images.shape) != 3:
                raise DatasetError(f"{hdf5}: {_PEREGRINE_IMAGES} has shape {images.shape}; "
                                   f"expected (layers, height, width)")
            n_layers, h, w = (int(s) for s in images.shape)
            sel = _select_layers(layers, n_layers, hdf5)
            file_names: list[str] = []
            group = f.get(_PEREGRINE_MASKS)
            if group is not None and "class_names" in group:
                file_names = _decode_names(group["class_names"][()])
            masks: list[Any] = []
            for cid, cname in zip(ids, names, strict=True):
                ds = group.get(str(cid)) if group is not None else None
                if ds is None:
                    warn(f"{hdf5}: no {_PEREGRINE_MASKS}/{cid}; class {cname!r} gets all-zero "
                         f"masks")
                elif ds.shape != images.shape:
                    raise DatasetError(f"{hdf5}: {_PEREGRINE_MASKS}/{cid} has shape "
                                       f"{ds.shape}, the images {images.shape}")
                if (class_names is None and cid < len(file_names)
                        and _snake(file_names[cid]) not in (cname, "powder")):
                    warn(f"{hdf5}: the file calls class id {cid} {file_names[cid]!r}, not "
                         f"{cname!r}; older releases number classes differently, so pass "
                         f"--class-ids/--class-names explicitly")
                masks.append(ds)
            lo, hi = _value_range(images, sel)
            for cname in names:
                (tmp / "masks" / cname).mkdir(parents=True, exist_ok=True)
            (tmp / "images").mkdir(parents=True, exist_ok=True)
            written: list[str] = []
            for done, i in enumerate(sel, start=1):
                name = f"layer_{i:05d}"
                _write_png(tmp / "images" / f"{name}.png", _to_png_range(images[i], lo, hi))
                for cname, ds in zip(names, masks, strict=True):
                    m = (np.zeros((h, w), np.uint8) if ds is None
                         else (np.asarray(ds[i]) != 0).astype(np.uint8) * np.uint8(255))
                    _write_png(tmp / "masks" / cname / f"{name}.png", m)
                written.append(name)
                if progress is not None:
                    progress(done, len(sel))
            manifest = {
                "format": DATASET_FORMAT,
                "classes": names,
                "images": written,
                "source": {
                    "generator": "pbf-monitor dataset import-peregrine",
                    "file": str(Path(hdf5).resolve()),
                    "class_ids": ids,
                    "file_class_names": file_names,
                    "layers": [sel[0], sel[-1] + 1] if sel else [],
                    "image_dtype": str(images.dtype),
                    "image_range": [lo, hi],
                    "warnings": messages,
                },
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n",
                                              encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PeregrineImport(manifest=out / "manifest.json", layers=len(written),
                           classes=tuple(names), warnings=tuple(messages))


def _select_layers(layers: range | None, n_layers: int, hdf5: Path) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    stop = n_layers if layers.stop == -1 else layers.stop
    if layers.start >= n_layers or stop > n_layers or layers.start < 0:
        raise DatasetError(f"{hdf5}: layers {layers.start}:{stop} outside the file's "
                           f"{n_layers} layers (0:{n_layers})")
    return list(range(layers.start, stop, layers.step))


def _value_range(images: Any, sel: list[int]) -> tuple[float, float]:
    """One linear scale for the whole import when the pixel type needs mapping to 16 bits."""
    dtype = np.dtype(images.dtype)
    if dtype in (np.uint8, np.uint16, np.bool_):
        return 0.0, float(np.iinfo(dtype).max) if dtype != np.bool_ else 1.0
    lo, hi = math.inf, -math.inf
    for i in sel:
        a = np.asarray(images[i], dtype=np.float64)
        finite = a[np.isfinite(a)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    if not math.isfinite(lo):
        lo, hi = 0.0, 1.0
    if dtype.kind == "f":
        return min(lo, 0.0), max(hi, 1.0)
    return min(lo, 0.0), max(hi, lo + 1.0)


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise DatasetError(f"{path}: could not encode PNG")
    path.write_bytes(buf.tobytes())



# --- frames known to be clean -----------------------------------------------------------

_IMAGE_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"}


def import_clean_frames(
    sources: Sequence[Path],
    out: Path,
    *,
    classes: Sequence[str] = DEFAULT_CLASS_NAMES,
    background: str = "no_defect",
) -> Path:
    """Make a dataset of camera frames known to hold no defect (hard negatives).

    Every defect mask is empty and the `background` class covers the whole frame. Training on
    such frames beside labelled layers teaches the model a shop's real camera noise, streaks and
    illumination, which cuts false alarms on clean beds. Images are written as 8- or 16-bit
    gray PNG named ``frame_%05d`` in the order given (folders: sorted by name).

    Returns:
        The manifest path.
    """
    if background not in classes:
        raise DatasetError(f"background class {background!r} is not one of {list(classes)}")
    files: list[Path] = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            files += sorted(p for p in src.iterdir()
                            if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith("."))
        elif src.is_file():
            files.append(src)
        else:
            raise DatasetError(f"{src}: no such file or folder")
    if not files:
        raise DatasetError("no images found in " + ", ".join(str(s) for s in sources))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: already exists and is not an empty folder")
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
    try:
        for cls in classes:
            (tmp / "masks" / cls).mkdir(parents=True, exist_ok=True)
        (tmp / "images").mkdir(parents=True, exist_ok=True)
        names = []
        for i, path in enumerate(files, start=1):
            try:
                gray = decode(path.read_bytes())
            except (OSError, ImageError) as e:
                raise DatasetError(f"{path}: {e}") from e
            name = f"frame_{i:05d}"
            _write_png(tmp / "images" / f"{name}.png",
                       np.round(gray * 65535.0).astype(np.uint16))
            for cls in classes:
                fill = 255 if cls == background else 0
                _write_png(tmp / "masks" / cls / f"{name}.png",
                           np.full(gray.shape, fill, dtype=np.uint8))
            names.append(name)
        manifest = {
            "format": DATASET_FORMAT, "classes": list(classes), "images": names,
            "source": {"generator": "pbf-monitor dataset clean-frames",
                       "files": [str(f) for f in files], "background": background},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n",
                                           encoding="utf-8")
        if out.exists():
            out.rmdir()
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "manifest.json"
