"""The next layer's slice placed before its image comes (PartMeter.prefetch)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from monitor.config import CameraConfig, GeometryConfig
from monitor.daemon.parts import PartMeter


def _slice(path: Path, x0: int) -> None:
    m = np.zeros((80, 100), np.uint8)
    m[20:60, x0:x0 + 30] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), m)


def _meter(tmp_path: Path, template: str = "nominal/{build}/layer_{layer:05d}.png"
           ) -> PartMeter:
    return PartMeter(CameraConfig(), GeometryConfig(nominal=str(tmp_path / template)))


def _layer(tmp_path: Path, meter: PartMeter, layer: int) -> np.ndarray:
    gray = np.full((80, 100), 0.4, np.float32)
    prep = meter.prepare("B", layer, path=tmp_path / f"layer_{layer:05d}.png", gray=gray)
    assert prep is not None
    return prep.labels


def test_a_prefetched_slice_is_the_one_read_when_the_layer_comes(tmp_path: Path) -> None:
    nominal = tmp_path / "nominal" / "B"
    for layer, x0 in ((1, 10), (2, 12)):
        _slice(nominal / f"layer_{layer:05d}.png", x0)
    meter, fresh = _meter(tmp_path), _meter(tmp_path)
    _layer(tmp_path, meter, 1)
    _layer(tmp_path, fresh, 1)
    meter.prefetch("B", 2, (100, 80))
    assert meter._next is not None  # placed ahead
    np.testing.assert_array_equal(_layer(tmp_path, meter, 2), _layer(tmp_path, fresh, 2))
    assert meter._next is None  # taken


def test_a_slice_rewritten_after_the_prefetch_is_read_again(tmp_path: Path) -> None:
    nominal = tmp_path / "nominal" / "B"
    _slice(nominal / "layer_00001.png", 10)
    _slice(nominal / "layer_00002.png", 10)
    meter = _meter(tmp_path)
    _layer(tmp_path, meter, 1)
    meter.prefetch("B", 2, (100, 80))
    _slice(nominal / "layer_00002.png", 60)  # the machine wrote it again
    st = (nominal / "layer_00002.png").stat()
    os.utime(nominal / "layer_00002.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    labels = _layer(tmp_path, meter, 2)
    assert labels[40, 70] > 0 and labels[40, 20] == 0  # the new part, not the prefetched


def test_no_prefetch_for_a_layer_already_prepared_or_a_stem_template(tmp_path: Path) -> None:
    nominal = tmp_path / "nominal" / "B"
    for layer in (1, 2):
        _slice(nominal / f"layer_{layer:05d}.png", 10)
    meter = _meter(tmp_path)
    _layer(tmp_path, meter, 2)
    meter.prefetch("B", 2, (100, 80))  # a backlog: layer 2 came before layer 1 was done
    assert meter._next is None
    stem = _meter(tmp_path, "nominal/{build}/{stem}.png")
    _slice(tmp_path / "nominal" / "B" / "layer_00003.png", 10)
    stem.prefetch("B", 3, (100, 80))  # the next image's name is not known
    assert stem._next is None
    missing = _meter(tmp_path)
    missing.prefetch("B", 7, (100, 80))  # no slice yet: nothing kept
    assert missing._next is None
