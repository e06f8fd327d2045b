"""Every inference backend gives eager fp32 PyTorch's answer; exports are cached."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monitor.config import DEFAULT_WEIGHTS
from monitor.errors import ConfigError
from monitor.training.synth import BuildGenerator
from monitor.vision.backends import choose, installed
from monitor.vision.segmenter import Segmenter

OTHERS = [b for b in ("openvino", "onnxruntime") if installed(b)]


@pytest.fixture(scope="module")
def layer() -> np.ndarray:
    """A real-size synthetic layer (1024 px: one whole tile)."""
    return BuildGenerator(size=1024, layers=6, seed=21).layer(4).image / np.float32(255)


@pytest.fixture(scope="module")
def reference(layer: np.ndarray) -> np.ndarray:
    return Segmenter(DEFAULT_WEIGHTS, device="cpu", backend="torch").predict(layer).probs


@pytest.mark.parametrize("backend", OTHERS)
def test_backend_matches_eager_fp32(backend: str, layer: np.ndarray, reference: np.ndarray,
                                    tmp_path: Path) -> None:
    seg = Segmenter(DEFAULT_WEIGHTS, device="cpu", backend=backend, cache_dir=tmp_path)
    assert seg.backend.name == backend
    probs = seg.predict(layer).probs
    assert np.abs(probs - reference).max() <= 1e-3


@pytest.mark.skipif(not installed("openvino"), reason="needs openvino")
def test_bf16_masks_mostly_agree(layer: np.ndarray, reference: np.ndarray,
                                 tmp_path: Path) -> None:
    # bf16 is an option, not the default: measured here, class-mask IoU against fp32 is
    # 0.97-0.99, short of the 0.99 bar for a default backend.
    seg = Segmenter(DEFAULT_WEIGHTS, device="cpu", backend="openvino", cache_dir=tmp_path,
                    precision="bf16")
    got = seg.predict(layer).masks
    want = reference >= seg.thresholds[:, None, None]
    for c in range(1, got.shape[0]):
        union = np.count_nonzero(got[c] | want[c])
        if union >= 100:
            assert np.count_nonzero(got[c] & want[c]) / union >= 0.95, c


@pytest.mark.skipif(not OTHERS, reason="needs onnxruntime or openvino")
def test_export_is_cached_by_weights_sha(tmp_path: Path, tiny_weights: Path) -> None:
    Segmenter(tiny_weights, device="cpu", backend=OTHERS[0], cache_dir=tmp_path)
    (onnx,) = tmp_path.glob("*.onnx")
    stamp = onnx.stat().st_mtime_ns
    Segmenter(tiny_weights, device="cpu", backend=OTHERS[0], cache_dir=tmp_path)
    assert onnx.stat().st_mtime_ns == stamp  # not exported again
    Segmenter(DEFAULT_WEIGHTS, device="cpu", backend=OTHERS[0], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.onnx"))) == 2  # other weights, another export


def test_old_exports_are_pruned(tmp_path: Path, tiny_weights: Path) -> None:
    """Every weights file gets an export (each adapt candidate too): only the newest
    KEEP_EXPORTS stay."""
    from monitor.vision.backends import KEEP_EXPORTS

    for i in range(KEEP_EXPORTS + 3):
        old = tmp_path / f"{i:064x}.onnx"
        old.write_bytes(b"x")
        os.utime(old, ns=(10**18 + i, 10**18 + i))  # 2001, one a ns apart: i = newest
    Segmenter(tiny_weights, device="cpu", backend=OTHERS[0], cache_dir=tmp_path)
    kept = sorted(p.name for p in tmp_path.glob("*.onnx"))
    assert len(kept) == KEEP_EXPORTS
    newest = {f"{i:064x}.onnx" for i in range(4, KEEP_EXPORTS + 3)}  # the 7 newest old ones
    assert newest <= set(kept)  # with the new export: 8


def test_auto_choice_and_refusals() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose("auto", cuda) == "torch"
    assert choose("auto", cpu) == (OTHERS[0] if OTHERS else "torch")
    if OTHERS:
        with pytest.raises(ConfigError, match="runs on the CPU"):
            choose(OTHERS[0], cuda)


@pytest.mark.skipif(not installed("openvino"), reason="needs openvino")
def test_openvino_backend_sends_and_stores_no_telemetry(tmp_path: Path,
                                                        tiny_weights: Path) -> None:
    """OpenVINO wrote ~/intel/openvino_ga_cid and ~/intel/stats (its telemetry client id
    and counters) on a plain read_model; under a fresh home nothing may appear."""
    home = tmp_path / "home"
    home.mkdir()
    probe = ("import sys\n"
             "from pathlib import Path\n"
             "import numpy as np\n"
             "from monitor.vision.segmenter import Segmenter\n"
             "seg = Segmenter(Path(sys.argv[1]), device='cpu', backend='openvino', "
             "cache_dir=Path(sys.argv[2]))\n"
             "print(seg.backend.name, seg.predict(np.zeros((64, 64), np.float32)).masks.shape)\n"
             "print('openvino_telemetry' in sys.modules and sys.modules['openvino_telemetry'])\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("CI", "TF_BUILD", "JENKINS_URL") and not k.startswith("XDG_")}
    env.update(HOME=str(home), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", probe, str(tiny_weights), str(tmp_path / "c")],
                         env=env, capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["openvino", "(6,", "64,", "64)", "None"], out
    assert [p for p in home.rglob("*")] == []
