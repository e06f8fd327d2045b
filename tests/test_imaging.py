from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

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
        (b"hello, this is text\n" * 10, "not a supported image format"),
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


def hdr_header(w: int, h: int) -> bytes:
    """A Radiance HDR file declaring w x h pixels, with one scanline of data (OpenCV picks
    its HDR decoder by these bytes whatever the file is called)."""
    return (b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n" + f"-Y {h} +X {w}\n".encode()
            + bytes(4 * 64))


OTHER_FORMATS = {
    "hdr": hdr_header(15000, 15000),
    "pfm": b"Pf\n15000 15000\n-1.0\n" + bytes(64),
    "pgm": b"P5\n15000 15000\n255\n" + bytes(64),
    "pam": b"P7\nWIDTH 15000\nHEIGHT 15000\nDEPTH 1\nMAXVAL 255\nTUPLTYPE GRAYSCALE\nENDHDR\n",
    "webp": b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(40),
    "jp2": b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(64),
    "exr": b"v/1\x01" + bytes(64),
    "sunras": b"\x59\xa6\x6a\x95" + bytes(64),
    "bigtiff": b"II+\x00" + bytes(64),
}


@pytest.mark.parametrize("kind", sorted(OTHER_FORMATS))
def test_formats_whose_size_is_not_checked_are_refused_unread(kind: str) -> None:
    with pytest.raises(ImageError, match="not a supported image format"):
        decode(OTHER_FORMATS[kind], max_pixels=50_000_000)


@pytest.mark.parametrize("ext", [".hdr", ".pgm", ".pfm"])
def test_opencv_would_decode_these_by_content(ext: str) -> None:
    """Why they are refused: OpenCV decodes them whatever the file name says, at the size
    their header declares, and Pillow cannot read their header to check it first."""
    img = np.full((20, 20, 3) if ext != ".pgm" else (20, 20), 0.5, np.float32)
    if ext == ".pgm":
        img = (img * 255).astype(np.uint8)
    data = encode(img, ext)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is not None
    with pytest.raises(ImageError, match="not a supported image format"):
        decode(data)


def test_hdr_bomb_is_refused_without_allocating(tmp_path: Path) -> None:
    """A 15000x15000 Radiance HDR named .png was decoded at 6.7 GB before the pixel limit
    refused it: now the peak memory of decoding it stays where it was."""
    bomb = tmp_path / "layer_00005.png"
    bomb.write_bytes(hdr_header(15000, 15000))
    probe = (
        "import resource, sys\n"
        "from monitor.errors import ImageError\n"
        "from monitor.vision.imaging import decode\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    decode(data, max_pixels=200_000_000)\n"
        "except ImageError as e:\n"
        "    print(e)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", probe, str(bomb)], capture_output=True,
                         text=True, env=env, check=True, timeout=120).stdout.splitlines()
    assert out[0].startswith("not a supported image format"), out
    assert int(out[1]) < 10 * 1024, out  # KB: nothing the size of the image was allocated
