"""Smoke test of the benchmark suite: ``python -m benchmarks.run --quick`` must keep working."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)


def test_quick_run_writes_every_section(tmp_path):
    from benchmarks import run

    out = tmp_path / "results.md"
    report = run.main(["--quick", "--rounds", "1", "--out", str(out)])
    assert out.read_text() == report
    for heading in ("## Optimizer step", "## Low-memory state", "## Many small leaves", "streaming bandwidth"):
        assert heading in report
    # rmsprop_jax and optax rows are always there; PyTorch rows only when it is installed.
    assert "| plain | rmsprop_jax |" in report and "| plain | optax.rmsprop |" in report
    try:
        import torch  # noqa: F401
    except ImportError:
        assert "torch foreach" not in report
    else:
        assert "torch foreach" in report


def test_quick_run_without_torch(tmp_path):
    from benchmarks import run

    report = run.main(
        ["--quick", "--rounds", "1", "--no-torch", "--only", "optimizers", "--out", str(tmp_path / "r.md")]
    )
    assert "torch" not in report.split("## Optimizer step")[1].replace("torch.optim.RMSprop", "")
