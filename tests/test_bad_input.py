"""A corpus of bad and odd inputs through the real daemon: each file gets exactly one
outcome (a record and a message, ok or error with a reason), or a logged skip when it is not
a layer; the daemon goes on."""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import create_engine, text

from monitor.cli import main
from monitor.daemon.daemon import Daemon
from tests.conftest import encode, wait_for_rows
from tests.test_alarm_daemon import NO_RULES, Rig, bright_weights, rig  # noqa: F401 (fixtures)


def _png_header_only(w: int, h: int) -> bytes:
    """A complete, tiny PNG whose header declares w x h pixels (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bad_input_corpus(rig: Callable[..., Rig], tmp_path: Path) -> None:  # noqa: F811
    r = rig(NO_RULES)
    d = r.build
    good = np.full((64, 64), 120, np.uint8)
    png = encode(good, ".png")
    jpg = encode(good, ".jpg")
    rgba = np.dstack([good, good, good, np.full_like(good, 255)])
    multipage = tmp_path / "multi.tif"
    Image.fromarray(good).save(multipage, save_all=True,
                               append_images=[Image.fromarray(255 - good)])
    errors = {
        1: ("empty.png", b""),
        2: ("truncated.png", png[: len(png) // 2]),
        3: ("truncated.jpg", jpg[: len(jpg) // 2]),
        4: ("magic.png", os.urandom(300)),
        5: ("text.png", b"this is not an image\n" * 20),
        6: ("tiny.png", encode(np.zeros((1, 1), np.uint8), ".png")),
        7: ("thin.png", encode(np.zeros((1, 100_000), np.uint8), ".png")),
        8: ("bomb.png", _png_header_only(100_000, 100_000)),
    }
    oks = {
        20: ("sixteen.tif", encode((good.astype(np.uint16) * 257), ".tif")),
        21: ("float.tif", encode(good.astype(np.float32) / 255, ".tif")),
        22: ("rgba.png", encode(rgba, ".png")),
        23: ("multi.tif", multipage.read_bytes()),
        24: ("plain.bmp", encode(good, ".bmp")),
    }
    def path(n: int, name: str) -> Path:  # the layer number is the name's last digits
        stem, ext = name.split(".")
        return d / f"{stem}_{n:05d}.{ext}"

    for n, (name, data) in {**errors, **oks}.items():
        path(n, name).write_bytes(data)
    # Not layers (a logged skip): a folder named like an image, a name without digits.
    (d / "layer_00030.png").mkdir()
    (d / "notes.png").write_bytes(png)
    # Named like a layer but unreadable: a symlink loop gets an error record.
    (d / "loop_00031.png").symlink_to(d / "loop_00031.png")
    errors[31] = ("loop.png", b"")
    # A named pipe must not hang the worker on open; a device is not an image either.
    os.mkfifo(d / "fifo_00032.png")
    errors[32] = ("fifo.png", b"")
    (d / "dev_00033.png").symlink_to("/dev/zero")
    errors[33] = ("dev.png", b"")
    # Deleted right after it was written: one outcome, whichever the daemon saw first.
    path(34, "gone.png").write_bytes(png)
    path(34, "gone.png").unlink()
    assert r.listener is not None
    listener = r.listener
    listener.wait(lambda: set(listener.layers()) >= set(errors) | set(oks) | {34}, timeout=120)
    # The same layer written again replaces it, and the message says so.
    path(20, "sixteen.tif").write_bytes(encode(good.astype(np.uint16) * 200, ".tif"))
    listener.wait(lambda: len(listener.layers().get(20, [])) == 2)
    listener.wait_heartbeat()

    layers = listener.layers()
    (gone,) = layers.pop(34)
    assert gone["status"] == "ok" or "disappeared" in gone["error"], gone
    assert set(layers) == set(errors) | set(oks), sorted(layers)
    for n in errors:
        (msg,) = layers[n]
        assert msg["status"] == "error" and msg["error"], (errors[n][0], msg)
    for n in oks:
        assert [m["status"] for m in layers[n]][-1] == "ok", (oks[n][0], layers[n])
    assert [m["replaced"] for m in layers[20]] == [False, True]
    assert "pixel" in layers[8][0]["error"]  # refused by the pixel limit, not decoded
    assert "not a regular file" in layers[32][0]["error"]
    assert "not a regular file" in layers[33][0]["error"]
    engine = create_engine(r.cfg.store_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT layer, count(*) FROM layers GROUP BY layer")).all()
    engine.dispose()
    assert sorted(rows) == sorted((n, 1) for n in {**errors, **oks, 34: 0})  # once each
    # ... and it goes on.
    cv2.imwrite(str(d / "layer_00040.png"), good)
    listener.wait(lambda: 40 in listener.layers())


def test_paths_with_spaces_and_non_ascii(tmp_path: Path, bright_weights: Path) -> None:  # noqa: F811
    root = tmp_path / "prüf stand Ø"
    root.mkdir()
    r = Rig(root, bright_weights, NO_RULES)
    try:
        r.start()
        build = r.cfg.watch.dir / "Bauteil Nr 7 — ÄÖÜ"
        build.mkdir(parents=True)
        img = np.full((64, 64), 100, np.uint8)
        img[10:20, 10:20] = 240
        (build / "Schicht 0003.png").write_bytes(encode(img, ".png"))
        assert r.listener is not None
        listener = r.listener
        listener.wait(lambda: 3 in listener.layers())
        (msg,) = listener.layers()[3]
        assert msg["status"] == "ok" and msg["build"] == "Bauteil Nr 7 — ÄÖÜ"
        assert msg["image"].endswith("Schicht 0003.png")
        assert msg["classes"]["swelling"]["pixel_count"] == 100
    finally:
        r.stop()


def test_watch_folder_deleted_and_made_again(rig: Callable[..., Rig]) -> None:  # noqa: F811
    import shutil
    import time

    r = rig(NO_RULES)  # periodic rescans off: only a re-armed watch can see the new folder
    r.write(1)
    shutil.rmtree(r.cfg.watch.dir)
    time.sleep(1.5)  # the settler notices the folder is gone
    r.build.mkdir(parents=True)
    time.sleep(1.5)  # ... and that it is back
    r.write(2)
    assert r.listener is not None
    assert [m["status"] for m in r.listener.layers()[2]] == ["ok"]


def test_burst_of_200_layers(rig: Callable[..., Rig]) -> None:  # noqa: F811
    r = rig(NO_RULES)
    for n in range(1, 201):
        r.write(n, (n % 80, 10, 8, 8), wait=False)
    assert r.listener is not None
    listener = r.listener
    listener.wait(lambda: len(listener.layers()) == 200, timeout=300)
    layers = listener.layers()
    assert all(len(layers[n]) == 1 and layers[n][0]["status"] == "ok" for n in range(1, 201))
    seqs = [m[0]["seq"] for _, m in sorted(layers.items())]
    assert seqs == sorted(seqs)  # handed over and published in layer order
    engine = create_engine(r.cfg.store_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*), count(DISTINCT layer) FROM layers")).one() == (
            200, 200)
    engine.dispose()


def test_unreadable_file(tmp_path: Path, bright_weights: Path) -> None:  # noqa: F811
    """A layer the daemon may not read gets an error record with the reason, and the next
    one is fine. Root reads everything, so under root (as in CI) the daemon runs without the
    capabilities that bypass file permissions (setpriv)."""
    import shutil
    import signal
    import subprocess
    import sys

    from tests.conftest import daemon_toml, wait_for_rows, write_config

    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv (util-linux) to drop CAP_DAC_*")
        prefix = [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]
    (tmp_path / "watch" / "B1").mkdir(parents=True)
    config = write_config(tmp_path / "config.toml", daemon_toml(bright_weights, extra=NO_RULES))
    secret = tmp_path / "watch" / "B1" / "layer_00001.png"
    secret.write_bytes(encode(np.full((64, 64), 120, np.uint8), ".png"))
    secret.chmod(0)
    (tmp_path / "watch" / "B1" / "layer_00002.png").write_bytes(
        encode(np.full((64, 64), 120, np.uint8), ".png"))
    log = tmp_path / "log"
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "monitor", "run", "--config",
                             str(config)], stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        rows = wait_for_rows(f"sqlite:///{tmp_path / 'state' / 'pbf-monitor.db'}",
                             "SELECT layer, status, error FROM layers ORDER BY layer", 2,
                             proc=proc, log=log)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert tuple(rows[0][:2]) == (1, "error") and "Permission denied" in rows[0][2], rows
    assert tuple(rows[1][:2]) == (2, "ok")


def test_names_that_are_not_utf8_are_stored_published_and_reported(
        rig: Callable[..., Rig]) -> None:  # noqa: F811
    """A file and a build folder whose names are not UTF-8: recorded with the bytes as \\xNN,
    published, reported under that name, and a rescan does not take them again."""
    r = rig(NO_RULES)
    png = encode(np.full((64, 64), 120, np.uint8), ".png")
    root = os.fsencode(r.cfg.watch.dir)
    with open(os.path.join(root, b"B1", b"layer_\xff\xfe_00001.png"), "wb") as f:
        f.write(png)
    os.mkdir(os.path.join(root, b"bad\xff\xfe"))
    with open(os.path.join(root, b"bad\xff\xfe", b"layer_00002.png"), "wb") as f:
        f.write(png)
    assert r.listener is not None
    r.listener.wait(lambda: {1, 2} <= set(r.listener.layers()))  # type: ignore[union-attr]
    published = {n: ps[0] for n, ps in r.listener.layers().items()}
    assert published[1]["build"] == "B1" and published[1]["status"] == "ok", published[1]
    assert published[2]["build"] == "bad\\xff\\xfe" and published[2]["status"] == "ok"
    engine = create_engine(r.cfg.store_url)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT b.name, l.layer, l.status, l.image_path, l.versions "
                                 "FROM layers l JOIN builds b ON b.id = l.build_id "
                                 "ORDER BY l.layer")).all()
    engine.dispose()
    assert [(b, n, s, v) for b, n, s, _, v in rows] == [("B1", 1, "ok", 1),
                                                        ("bad\\xff\\xfe", 2, "ok", 1)]
    assert rows[0][3].endswith("B1/layer_\\xff\\xfe_00001.png")
    # The name as printed (backslashes typed), and as the raw bytes a shell may pass.
    for name in ("bad\\xff\\xfe", os.fsdecode(b"bad\xff\xfe")):
        out = CliRunner().invoke(main, ["report", name, "--config", str(r.config),
                                        "--format", "json"])
        assert out.exit_code == 0, out.output
        assert [la["layer"] for la in json.loads(out.output)["layers"]] == [2]
    # After a restart, the rescan compares the escaped names with the folder: nothing is
    # taken again (the startup rescan's files go first; a new build's layer comes after).
    r.stop()
    daemon = Daemon(r.cfg)
    daemon.start()
    try:
        os.mkdir(os.path.join(root, b"zzz"))
        with open(os.path.join(root, b"zzz", b"layer_00009.png"), "wb") as f:
            f.write(png)
        rows = wait_for_rows(r.cfg.store_url, "SELECT layer, versions FROM layers "
                             "ORDER BY layer", 3)
    finally:
        daemon.stop()
    assert [tuple(x) for x in rows] == [(1, 1), (2, 1), (9, 1)]
