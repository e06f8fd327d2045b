"""The dataset format: reading and checking a dataset folder, its one writer, the
deterministic train/validation split, and datasets of frames known to be clean.

The format (written only by :class:`DatasetWriter`: ``pbf-monitor synth``, the Peregrine
import and clean frames all go through it)::

    DIR/manifest.json            {"format": "pbf-monitor-dataset/1", "classes": [...],
                                  "images": ["layer_00001", ...], "source": {...}}
    DIR/images/<name>.png        8- or 16-bit grayscale
    DIR/masks/<class>/<name>.png one per class and image, nonzero = the class is present
                                 (written as 0 or 255)

Every file is written to a hidden temporary name in its own folder and renamed into place,
and a layer's masks are written before its image, so a watcher that reacts to a new image
finds complete files and the masks already there. The manifest is written last.

Images are decoded with :func:`monitor.vision.imaging.decode`, exactly as the daemon decodes camera
files, so training, evaluation and serving see the same pixel values.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from monitor.config import IMAGE_EXTENSIONS
from monitor.errors import ImageError, MonitorError
from monitor.vision.classes import DEFAULT_CLASS_NAMES, NO_DEFECT
from monitor.vision.imaging import decode

DATASET_FORMAT = "pbf-monitor-dataset/1"
MANIFEST = "manifest.json"
CLEAN_FRAMES = "pbf-monitor dataset clean-frames"  # source.generator of real clean frames
SYNTH_GENERATOR = "pbf-monitor synth"  # the manifest's source.generator of synthetic builds
PASTE_GENERATOR = "pbf-monitor dataset paste"  # ... of a dataset with defects pasted in
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

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
        return image_path(self.root, name)

    def mask_path(self, cls: str, name: str) -> Path:
        return mask_path(self.root, cls, name)

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

    def nominal(self, name: str, shape: tuple[int, int]) -> np.ndarray | None:
        """(H, W) bool nominal parts of one layer in its image's pixels, for a dataset that
        has them (source.nominal, as synthetic builds do); None otherwise."""
        template = self.source.get("nominal")
        if not isinstance(template, str):
            return None
        path = self.root / template.format(layer=self.layer_number(name))
        m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if m is None:
            raise DatasetError(f"{path}: missing or not a readable image (the manifest's "
                               f"source.nominal names one slice per layer)")
        if m.shape != shape:
            raise DatasetError(f"{path}: slice is {m.shape[1]}x{m.shape[0]} but its image "
                               f"is {shape[1]}x{shape[0]}")
        return np.asarray(m > 0)

    def regenerate(self) -> str | None:
        """The commands that make this dataset again, with folders by name (for a model
        card): `pbf-monitor synth`, and `dataset paste` after it for a pasted one."""
        s = self.source
        if s.get("generator") == PASTE_GENERATOR and isinstance(s.get("from_source"), dict):
            parent = Dataset(self.root.parent / str(s.get("from")), self.classes, (),
                             s["from_source"])
            first = parent.regenerate()
            return first and (f"{first} && pbf-monitor dataset paste {parent.root.name} "
                              f"{self.root.name} --per-class {s.get('per_class')} "
                              f"--seed {s.get('seed')}")
        cmd = self.synth_command()
        return cmd and cmd.replace(str(self.root), self.root.name, 1)

    def synth_command(self) -> str | None:
        """The `pbf-monitor synth` command that regenerates this dataset, if it was generated."""
        s = self.source
        if s.get("generator") != SYNTH_GENERATOR:
            return None
        cmd = (f"pbf-monitor synth {self.root} --layers {s.get('layers')} "
               f"--size {s.get('size')} --seed {s.get('seed')}")
        if s.get("part_events") is not None:
            cmd += " --part-events"
        if s.get("defects") is False:  # a healthy build: the negatives the card lists
            cmd += " --no-defects"
        if s.get("camera"):
            cmd += f" --camera {s['camera']}"
        return cmd


def image_path(root: Path, name: str) -> Path:
    return root / "images" / f"{name}.png"


def mask_path(root: Path, cls: str, name: str) -> Path:
    return root / "masks" / cls / f"{name}.png"


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
    manifest = root / MANIFEST
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
                or not all(isinstance(v, str) and NAME_RE.match(v) for v in value)):
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


# --- writing -----------------------------------------------------------------------------


class DatasetWriter:
    """The one writer of the dataset format: folders, each layer's files, the manifest last."""

    def __init__(self, root: Path, classes: Sequence[str]) -> None:
        self.root, self.classes = Path(root), tuple(classes)
        self.names: list[str] = []
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        for cls in self.classes:
            (self.root / "masks" / cls).mkdir(parents=True, exist_ok=True)

    def add(self, name: str, image: np.ndarray, masks: Iterable[np.ndarray]) -> None:
        """One layer: `image` (H, W) uint8 or uint16, stored as it is; `masks` (H, W) bool,
        one per class in the writer's order."""
        for cls, mask in zip(self.classes, masks, strict=True):
            write_png(mask_path(self.root, cls, name), mask.view(np.uint8) * np.uint8(255))
        # The image goes last: its arrival tells a watcher that the whole layer is there.
        write_png(image_path(self.root, name), image)
        self.names.append(name)

    def finish(self, source: Mapping[str, Any]) -> Path:
        """Write the manifest (what made the dataset goes in `source`); returns its path."""
        manifest = {"format": DATASET_FORMAT, "classes": list(self.classes),
                    "images": list(self.names), "source": dict(source)}
        path = self.root / MANIFEST
        _write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode())
        return path


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A hidden sibling folder to write a new dataset into, renamed to `out` (new, or an
    empty folder the caller checked) when the block succeeds and removed when it fails, so
    `out` either does not exist or is complete."""
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked by the caller
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def write_png(path: Path, image: np.ndarray) -> None:
    """Encode a PNG and write it atomically."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise DatasetError(f"{path}: could not encode PNG")
    _write_atomic(path, buf.tobytes())


# --- frames known to be clean -----------------------------------------------------------

def import_clean_frames(
    sources: Sequence[Path],
    out: Path,
    *,
    classes: Sequence[str] = DEFAULT_CLASS_NAMES,
    background: str = NO_DEFECT,
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
                            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        elif src.is_file():
            files.append(src)
        else:
            raise DatasetError(f"{src}: no such file or folder")
    if not files:
        raise DatasetError("no images found in " + ", ".join(str(s) for s in sources))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: already exists and is not an empty folder")
    with staged_folder(out) as tmp:
        writer = DatasetWriter(tmp, classes)
        for i, path in enumerate(files, start=1):
            try:
                gray = decode(path.read_bytes())
            except (OSError, ImageError) as e:
                raise DatasetError(f"{path}: {e}") from e
            writer.add(f"frame_{i:05d}", np.round(gray * 65535.0).astype(np.uint16),
                       (np.full(gray.shape, cls == background) for cls in classes))
        writer.finish({"generator": CLEAN_FRAMES,
                       "files": [str(f) for f in files], "background": background})
    return out / MANIFEST
