"""ORNL Peregrine v2023 HDF5 build -> a dataset folder (``pbf-monitor dataset
import-peregrine``)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitor.training.dataset import NAME_RE, DatasetError, DatasetWriter, staged_folder
from monitor.vision.classes import DEFAULT_CLASS_NAMES, DEFAULT_PEREGRINE_IDS, PEREGRINE_2023_NAMES

log = logging.getLogger(__name__)

_PEREGRINE_IMAGES = "slices/camera_data/visible/0"
_PEREGRINE_MASKS = "slices/segmentation_results"


@dataclass(frozen=True)
class PeregrineImport:
    """What :func:`import_peregrine` wrote."""

    manifest: Path
    layers: int
    classes: tuple[str, ...]
    warnings: tuple[str, ...]


@dataclass
class _Masks:
    """Where each channel's masks come from (None: all zero), and the file's own names."""

    sources: list[Any] = field(default_factory=list)
    file_names: list[str] = field(default_factory=list)


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
    names = _channel_names(ids, class_names)
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
    with staged_folder(out) as tmp, f:
        images = _images(f, hdf5)
        sel = _select_layers(layers, int(images.shape[0]), hdf5)
        masks = _masks(f, hdf5, images, ids, names, explicit=class_names is not None,
                       warn=warn)
        lo, hi = _value_range(images, sel)
        writer = DatasetWriter(tmp, names)
        _write_layers(writer, images, masks.sources, sel, lo, hi, progress)
        writer.finish({
            "generator": "pbf-monitor dataset import-peregrine",
            "file": str(Path(hdf5).resolve()),
            "class_ids": ids,
            "file_class_names": masks.file_names,
            "layers": [sel[0], sel[-1] + 1] if sel else [],
            "image_dtype": str(images.dtype),
            "image_range": [lo, hi],
            "warnings": messages,
        })
    return PeregrineImport(manifest=out / "manifest.json", layers=len(writer.names),
                           classes=tuple(names), warnings=tuple(messages))


def _channel_names(ids: list[int], class_names: Sequence[str] | None) -> list[str]:
    """The dataset's channel names: given, the default model's, or Peregrine's for the ids."""
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
    bad = [n for n in names if not NAME_RE.match(n)]
    if bad or len(set(names)) != len(names):
        raise DatasetError(f"class names must be unique words of letters, digits, '_', '-', "
                           f"'.'; got {names}")
    return names


def _images(f: Any, hdf5: Path) -> Any:
    """The after-melt images, (layers, height, width)."""
    if _PEREGRINE_IMAGES not in f:
        raise DatasetError(f"{hdf5}: no dataset {_PEREGRINE_IMAGES!r} (after-melt "
                           f"images); is this a Peregrine v2023 build file?")
    images = f[_PEREGRINE_IMAGES]
    if len(images.shape) != 3:
        raise DatasetError(f"{hdf5}: {_PEREGRINE_IMAGES} has shape {images.shape}; "
                           f"expected (layers, height, width)")
    return images


def _masks(f: Any, hdf5: Path, images: Any, ids: list[int], names: list[str], *,
           explicit: bool, warn: Callable[[str], None]) -> _Masks:
    """Each channel's mask dataset; warns about missing ones and, unless the names were
    given, about ids the file names differently (older releases number classes otherwise)."""
    found = _Masks()
    group = f.get(_PEREGRINE_MASKS)
    if group is not None and "class_names" in group:
        found.file_names = _decode_names(group["class_names"][()])
    for cid, cname in zip(ids, names, strict=True):
        ds = group.get(str(cid)) if group is not None else None
        if ds is None:
            warn(f"{hdf5}: no {_PEREGRINE_MASKS}/{cid}; class {cname!r} gets all-zero "
                 f"masks")
        elif ds.shape != images.shape:
            raise DatasetError(f"{hdf5}: {_PEREGRINE_MASKS}/{cid} has shape "
                               f"{ds.shape}, the images {images.shape}")
        if (not explicit and cid < len(found.file_names)
                and _snake(found.file_names[cid]) not in (cname, "powder")):
            warn(f"{hdf5}: the file calls class id {cid} {found.file_names[cid]!r}, not "
                 f"{cname!r}; older releases number classes differently, so pass "
                 f"--class-ids/--class-names explicitly")
        found.sources.append(ds)
    return found


def _write_layers(writer: DatasetWriter, images: Any, masks: list[Any], sel: list[int],
                  lo: float, hi: float, progress: Callable[[int, int], None] | None) -> None:
    h, w = (int(s) for s in images.shape[1:])
    for done, i in enumerate(sel, start=1):
        writer.add(f"layer_{i:05d}", _to_png_range(images[i], lo, hi),
                   (np.zeros((h, w), np.bool_) if ds is None else np.asarray(ds[i]) != 0
                    for ds in masks))
        if progress is not None:
            progress(done, len(sel))


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
