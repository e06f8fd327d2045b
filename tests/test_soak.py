"""The soak, shortened for CI: a daemon process through 150 small layers loses none, and its
memory and open files stay flat after warm-up (`pbf-monitor soak` runs 2,000)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from monitor.cli import main
from monitor.tools.soak import Sample, SoakResult, run_soak


def test_short_soak(tiny_weights: Path) -> None:
    res = run_soak(layers=150, size=64, warmup=50, every=10, weights=tiny_weights)
    assert res.failures(max_growth_mb=30) == [], res.summary(30)
    assert res.received == res.stored == 150 and res.stored_once
    assert len(res.after_warmup) >= 10  # enough samples for the trend to mean something


def test_soak_verdicts() -> None:
    """What counts as a failure: growth in the trend, not a single high sample."""
    res = SoakResult(layers=10, warmup=0, received=10, stored=10, stored_once=True)
    res.samples = [Sample(n, 100.0 + (5.0 if n == 4 else 0.0), 20 + (n == 5)) for n in range(8)]
    assert res.failures(30) == []
    res.samples = [Sample(n, 100.0 + 10 * n, 20 + n) for n in range(8)]
    failed = res.failures(30)
    assert any("memory grew 50.0 MB" in f for f in failed)
    assert any("open files grew by 5" in f for f in failed)
    res.stored = 9
    assert any("9 stored" in f for f in res.failures(30))


def test_soak_command_refuses_a_warmup_longer_than_the_run() -> None:
    out = CliRunner().invoke(main, ["soak", "--layers", "10", "--warmup", "10"])
    assert out.exit_code == 2 and "warm-up (10) must be less" in out.output
