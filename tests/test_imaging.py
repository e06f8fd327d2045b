from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from monitor.errors import ImageError
from monitor.vision.imaging import decode, normalize, overlay
from tests.conftest import encode, layer_image


@pytest.mark.parametrize(
    ("ext", "dtype", "colour"),
    [
        (".png", np.uint8, False),
        (".png", np.uint16, False),
        (".tif", np.uint8, False),
        (".tif", np.uint16, False),
        (".jpg", np.uint8, False),
        (".bmp", np.uint8, False),
        (".png", np.uint8, True),
        (".jpg", np.uint8, True),
        (".tif", np.uint16, True),
    ],
)
def test_formats_decode_to_unit_gray(ext: str, dtype: type, colour: bool) -> None:
    img = layer_image(3, size=64, dtype=dtype)
    src = cv2.merge([img, img, img]) if colour else img
    gray = decode(encode(src, ext))
    assert gray.shape == (64, 64) and gray.dtype == np.float32
    expected = img.astype(np.float32) / np.iinfo(dtype).max
    tol = 0.06 if ext == ".jpg" else 0.01
    assert np.abs(gray - expected).mean() < tol
    assert gray.min() >= 0.0 and gray.max() <= 1.0


def test_rgba_and_float_tiff() -> None:
    img = layer_image(4, size=32)
    rgba = cv2.merge([img, img, img, np.full_like(img, 255)])
    assert decode(encode(rgba, ".png")).shape == (32, 32)
    f = img.astype(np.float32) / 255.0
    assert np.allclose(decode(encode(f, ".tif")), f, atol=1e-6)


def _png_header(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    def chunk_bytes(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    # A complete, tiny file whose header claims a huge image: a decompression bomb.
    return (b"\x89PNG\r\n\x1a\n" + chunk_bytes(b"IHDR", ihdr)
            + chunk_bytes(b"IDAT", zlib.compress(bytes(1000))) + chunk_bytes(b"IEND", b""))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello, this is text\n" * 10, "not a decodable image"),
        (encode(layer_image(), ".png")[:-40], "truncated PNG"),
        (encode(layer_image(), ".jpg")[:-200], "truncated JPEG"),
        (b"\x89PNG\r\n\x1a\n" + bytes(300), "truncated PNG"),
        (encode(np.zeros((1, 1), np.uint8), ".png"), "smaller than"),
        (encode(np.zeros((1, 2000), np.uint8), ".png"), "smaller than"),
        (_png_header(100_000, 100_000), "over the limit"),
    ],
)
def test_bad_input_gives_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageError, match=reason):
        decode(data, max_pixels=50_000_000)


def test_normalize_is_affine() -> None:
    x = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    assert np.allclose(normalize(x, 0.5, 0.25), [[-2.0, 0.0, 2.0]])


def test_overlay_tints_defects_only() -> None:
    gray = np.full((8, 8), 0.5, np.float32)
    masks = np.zeros((3, 8, 8), bool)
    masks[0] = True  # no_defect: not drawn
    masks[1, :2, :2] = True
    out = overlay(gray, masks, ("no_defect", "swelling", "spatter"))
    assert out.shape == (8, 8, 3)
    assert tuple(out[5, 5]) == (127, 127, 127)
    assert out[0, 0, 2] > out[0, 0, 0]  # red for swelling (BGR)
