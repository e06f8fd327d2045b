from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from monitor.errors import WeightsError
from monitor.vision.model import UNet, file_sha256, load_weights, read_info
from tests.conftest import make_weights


@pytest.mark.parametrize(("width", "params"), [(64, 31_036_806), (16, 1_942_374), (8, 486_454)])
def test_parameter_count(width: int, params: int) -> None:
    model = UNet(in_channels=1, out_channels=6, base_channels=width)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize(("h", "w"), [(16, 16), (48, 64), (128, 32)])
def test_output_shape_matches_input(h: int, w: int) -> None:
    out = UNet(1, 6, 4).eval()(torch.zeros(2, 1, h, w))
    assert out.shape == (2, 6, h, w)


def test_roundtrip_rebuilds_same_model_and_metadata(tmp_path: Path) -> None:
    path = make_weights(tmp_path / "w.safetensors", width=4, classes=("a", "b", "c"))
    model, info = load_weights(path)
    assert info.class_names == ("a", "b", "c")
    assert info.base_channels == 4 and info.out_channels == 3
    assert info.sha256 == file_sha256(path)
    assert info.training == {"test": True}
    torch.manual_seed(1)
    x = torch.randn(1, 1, 32, 32)
    model2, _ = load_weights(path)
    with torch.inference_mode():
        assert torch.equal(model(x), model2(x))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["normalization"]) == {"mean": info.mean, "std": info.std,
                                                 "method": "global"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        (b"", "safetensors"),
        (b"garbage" * 20, "safetensors"),
        (pickle.dumps({"state_dict": 1}), "safetensors"),
    ],
)
def test_bad_weights_raise_one_clear_error(tmp_path: Path, content: bytes | None,
                                           message: str) -> None:
    path = tmp_path / "w.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=message) as e:
        load_weights(path)
    assert str(path) in str(e.value)


def test_foreign_safetensors_file_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError, match="format"):
        read_info(path)


def test_sha256_pin(tmp_path: Path) -> None:
    path = make_weights(tmp_path / "w.safetensors")
    load_weights(path, expected_sha256=file_sha256(path))
    with pytest.raises(WeightsError, match=r"model\.sha256"):
        load_weights(path, expected_sha256="0" * 64)


def test_bundled_default_weights_load() -> None:
    from monitor.config import DEFAULT_WEIGHTS

    _model, info = load_weights(DEFAULT_WEIGHTS)
    assert info.class_names == ("no_defect", "swelling", "spatter", "misprint",
                                "over_melting", "under_melting")
    assert DEFAULT_WEIGHTS.stat().st_size <= 10 * 2**20
