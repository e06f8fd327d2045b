"""Defects pasted into a real layer are defined against their own surroundings and their
masks are exactly the pixels changed."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from monitor.training.paste import PASTED, paste_defects
from monitor.vision.classes import DEFAULT_CLASS_NAMES

NAMES = list(DEFAULT_CLASS_NAMES)


def _bed(melt_delta: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 600 px bed of powder at 120 with two big parts and a ring, melt at 120 + delta, with
    grain and specular speckle."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:600, 0:600]
    part = ((np.abs(yy - 170) < 110) & (np.abs(xx - 170) < 120)) | (
        (yy - 420) ** 2 + (xx - 420) ** 2 < 130 ** 2)
    img = 120 + rng.normal(0, 4, (600, 600))
    img[part] += melt_delta + rng.normal(0, 6, int(part.sum()))
    img[part & (rng.random((600, 600)) < 0.1)] = 250
    return np.clip(img, 0, 255).astype(np.uint8), part


@pytest.mark.parametrize("delta", [-40.0, 70.0])
def test_each_class_against_its_own_surroundings(delta: float) -> None:
    img, part = _bed(delta)
    out, masks, pasted = paste_defects(img, part, np.random.default_rng(3),
                                       counts={c: 2 for c in PASTED})
    assert {p.cls for p in pasted} == set(PASTED)
    part_med = float(np.median(img[part]))
    powder_med = float(np.median(img[~part]))
    for p in pasted:
        v = out[p.mask].astype(float)
        if p.cls == "over_melting":
            assert v.mean() > part_med + 20, (delta, p.cls)
        elif p.cls == "under_melting":
            assert v.mean() < part_med - 20, (delta, p.cls)
        elif p.cls == "spatter":
            assert np.abs(v - powder_med).mean() > 30
            assert not (p.mask & part).any()
        elif p.cls == "misprint":  # melt texture on powder, away from the part
            assert not (p.mask & part).any()
            assert abs(np.median(v) - part_med) < abs(np.median(v) - powder_med)
        elif p.cls == "swelling":
            assert (p.mask & part).any() and (p.mask & ~part).any()  # across the outline
    # nothing changes outside the masks, and the masks agree with the pasted list
    changed = out != img
    assert not (changed & ~masks[1:].any(axis=0)).any()
    for c in PASTED:
        union = np.zeros_like(part)
        for p in pasted:
            if p.cls == c:
                union |= p.mask
        assert np.array_equal(masks[NAMES.index(c)], union)
    assert not (masks[NAMES.index("no_defect")] & (part | masks[1:].any(axis=0))).any()


def test_same_seed_same_paste_and_unknown_class_refused() -> None:
    img, part = _bed(30.0)
    a = paste_defects(img, part, np.random.default_rng(9))[0]
    b = paste_defects(img, part, np.random.default_rng(9))[0]
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="cannot paste"):
        paste_defects(img, part, np.random.default_rng(0), counts={"no_defect": 1})


def test_paste_a_dataset_through_the_cli(tmp_path: Path) -> None:
    """`dataset paste` copies a healthy synthetic build with defects pasted into every layer:
    its masks are the pasted pixels, the slices come along, and the model card's regenerate
    command makes the same dataset again."""
    from click.testing import CliRunner

    from monitor.cli import main
    from monitor.training.dataset import open_dataset
    from monitor.training.synth import write_dataset

    write_dataset(tmp_path / "h", layers=3, size=256, seed=7, defects=False, camera="varied")
    runner = CliRunner()
    res = runner.invoke(main, ["dataset", "paste", str(tmp_path / "h"), str(tmp_path / "p"),
                               "--per-class", "2", "--seed", "4"])
    assert res.exit_code == 0, res.output
    src, out = open_dataset(tmp_path / "h"), open_dataset(tmp_path / "p")
    assert out.names == src.names and out.classes == src.classes
    pasted = 0
    for name in out.names:
        (g0, m0), (g1, m1) = src.sample(name), out.sample(name)
        changed = np.abs(g1 - g0) > 1.5 / 255
        defects = m1[1:].any(axis=0)
        assert not m0[1:].any() and defects.any()  # healthy before, defects after
        assert not (changed & ~defects).any()  # only the pasted pixels changed
        assert not (m1[0] & defects).any()  # no_defect gives way to them
        assert (tmp_path / "p" / "nominal" / f"{name}.png").is_file()
        pasted += int(m1[NAMES.index("misprint")].any())
    assert pasted >= 2
    cmd = out.regenerate() or ""
    assert cmd == ("pbf-monitor synth h --layers 3 --size 256 --seed 7 --no-defects "
                   "--camera varied && pbf-monitor dataset paste h p --per-class 2 --seed 4")
    again = tmp_path / "again"
    again.mkdir()
    for part in cmd.split(" && "):
        args = [a if a not in ("h", "p") else str(again / a) for a in part.split()[1:]]
        res = runner.invoke(main, args)
        assert res.exit_code == 0, res.output
    twin = open_dataset(again / "p")
    for name in out.names:
        np.testing.assert_array_equal(twin.sample(name)[0], out.sample(name)[0])
        np.testing.assert_array_equal(twin.sample(name)[1], out.sample(name)[1])
    # an occupied output, or a dataset without slices, is refused with its reason
    res = runner.invoke(main, ["dataset", "paste", str(tmp_path / "h"), str(tmp_path / "p")])
    assert res.exit_code != 0 and "already exists" in res.output
    frame = tmp_path / "frame.png"
    cv2.imwrite(str(frame), np.full((64, 64), 120, np.uint8))
    res = runner.invoke(main, ["dataset", "clean-frames", str(frame), "--out",
                               str(tmp_path / "clean")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["dataset", "paste", str(tmp_path / "clean"),
                               str(tmp_path / "q")])
    assert res.exit_code != 0 and "names no nominal slices" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "q").exists()
