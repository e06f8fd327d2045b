"""Varied camera styles for synthetic builds: melt brighter or darker than powder, and
defects that stay defined against their own part whatever the camera."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from monitor.training.camera import CameraStyle
from monitor.training.dataset import open_dataset
from monitor.training.synth import BuildGenerator, write_dataset
from monitor.vision.classes import DEFAULT_CLASS_NAMES

NAMES = list(DEFAULT_CLASS_NAMES)
OVER, UNDER = NAMES.index("over_melting"), NAMES.index("under_melting")


def test_styles_differ_between_builds_and_cover_both_polarities() -> None:
    styles = [CameraStyle.draw(s) for s in range(40)]
    deltas = [st.melt_delta for st in styles]
    assert min(deltas) < -20 and max(deltas) > 60  # darker and brighter melt both occur
    assert {st.wall for st in styles} == {"none", "round", "side"}
    assert len({round(st.powder) for st in styles}) > 20
    assert CameraStyle.draw(7) == CameraStyle.draw(7)  # fixed by the seed


def test_varied_build_is_deterministic_and_consistent(tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "a", layers=3, size=256, seed=11, camera="varied").parent
    b = write_dataset(tmp_path / "b", layers=3, size=256, seed=11, camera="varied").parent
    for rel in ("images/layer_00002.png", "nominal/layer_00002.png",
                "masks/over_melting/layer_00002.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    ds = open_dataset(a)
    assert ds.source["camera"] == "varied"
    assert "--camera varied" in (ds.synth_command() or "")
    gray, masks = ds.sample("layer_00002")
    assert masks.shape[1:] == gray.shape


def _own_part_contrast(seed: int, cls: int) -> list[float]:
    """Per layer with the class: its mean grey minus the median of its own part around it."""
    gen = BuildGenerator(size=384, layers=30, seed=seed, camera="varied")
    out = []
    for lay in gen:
        m = lay.masks[cls]
        if m.sum() < 30:
            continue
        ids = gen.part_ids(lay.index)
        part_id = np.bincount(ids[m]).argmax()
        if part_id == 0:
            continue
        healthy = (ids == part_id) & ~lay.masks[1:].any(axis=0)
        if healthy.sum() < 30:
            continue
        out.append(float(lay.image[m].mean()) - float(np.median(lay.image[healthy])))
    return out


@pytest.mark.parametrize("seed", [s for s in range(300, 340)
                                  if CameraStyle.draw(s).melt_delta < -15][:2]
                         + [s for s in range(300, 340)
                            if 10 < CameraStyle.draw(s).melt_delta < 60][:1])
def test_defects_are_relative_to_their_own_part(seed: int) -> None:
    """Over-melting brighter than its own part and under-melting darker, on cameras where
    melt is darker than powder as much as where it is brighter."""
    over, under = _own_part_contrast(seed, OVER), _own_part_contrast(seed, UNDER)
    assert over or under
    assert all(v > 5 for v in over), over
    assert all(v < -5 for v in under), under


def test_classic_build_is_untouched_by_camera_styles() -> None:
    a = BuildGenerator(size=128, layers=2, seed=3).layer(1).image
    b = BuildGenerator(size=128, layers=2, seed=3, camera="classic").layer(1).image
    c = BuildGenerator(size=128, layers=2, seed=3, camera="varied").layer(1).image
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="camera"):
        BuildGenerator(size=128, layers=2, seed=3, camera="fancy")
