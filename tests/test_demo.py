"""Tests of the digits demo (`python -m rmsprop_jax demo`)."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from rmsprop_jax import __main__ as cli
from rmsprop_jax import demo

FLAGS = ("--steps", "--batch-size", "--lr", "--sgd-lr", "--target", "--seed", "--out", "--no-progress")


def test_smoke_short_run_writes_png_and_sane_results(tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    steps = 60
    result = demo.main(["--steps", str(steps), "--lr", "0.01", "--sgd-lr", "0.3", "--out", str(out), "--no-progress"])

    assert out.is_file()
    assert out.read_bytes().startswith(b"\x89PNG")
    assert out.stat().st_size > 10_000
    assert result.out == str(out)
    assert set(result.runs) == {"rmsprop_jax", "optax.rmsprop", "sgd"}
    assert {name: list(grid) for name, grid in result.grids.items()} == {
        "rmsprop_jax": [0.01],
        "optax.rmsprop": [0.01],
        "sgd": [0.3],
    }
    for name, run in result.runs.items():
        assert run.name == name
        assert run.losses.shape == run.test_accuracies.shape == (steps,)
        assert np.all(np.isfinite(run.losses))
        assert run.final_loss == run.losses[-1]
        # Cross-entropy starts near log(10) for 10 classes; 60 steps must cut it well down.
        assert 0 < run.final_loss < 0.5 * math.log(10)
        assert 0.0 <= run.test_accuracy <= 1.0
        assert run.test_accuracy > 0.8
        if run.steps_to_target is not None:
            assert 1 <= run.steps_to_target <= steps
            assert run.test_accuracies[run.steps_to_target - 1] >= result.target
            assert np.all(run.test_accuracies[: run.steps_to_target - 1] < result.target)
    assert result.runs["rmsprop_jax"].learning_rate == 0.01
    assert result.runs["sgd"].learning_rate == 0.3


def test_default_settings_rmsprop_beats_tuned_sgd(tmp_path: Path) -> None:
    # The default run takes a few seconds; this is exactly what the command line does.
    stream = io.StringIO()
    result = demo.run_demo(out=str(tmp_path / "d.png"), progress=False, stream=stream)
    rms, sgd = result.runs["rmsprop_jax"], result.runs["sgd"]

    # Every optimizer was tuned over a grid of the same size, without the test set.
    assert len(result.grids["sgd"]) == len(result.grids["rmsprop_jax"]) == 5
    assert demo.selection_score(sgd) == min(result.grids["sgd"].values())
    assert demo.selection_score(rms) == min(result.grids["rmsprop_jax"].values())
    assert rms.steps_to_target is not None and sgd.steps_to_target is not None
    assert rms.steps_to_target < sgd.steps_to_target
    assert rms.final_loss < sgd.final_loss / 10
    assert rms.test_accuracy >= result.target
    # The same algorithm with eps in a slightly different place behaves the same.
    optax_run = result.runs["optax.rmsprop"]
    assert optax_run.learning_rate == rms.learning_rate
    assert optax_run.steps_to_target == rms.steps_to_target
    text = stream.getvalue()
    assert "steps to 95%" in text
    assert "rmsprop_jax" in text and "optax.rmsprop" in text and "sgd" in text


def test_steps_to_target_is_first_step_at_or_above_target() -> None:
    accs = np.array([0.5, 0.94, 0.95, 0.93, 0.97])
    assert demo.first_reached(accs, 0.95) == 3
    assert demo.first_reached(accs, 0.5) == 1
    assert demo.first_reached(accs, 0.98) is None


def test_selection_score_is_geometric_mean_with_floor_and_divergence_last() -> None:
    def run(losses: list[float]) -> demo.RunResult:
        curve = np.array(losses)
        return demo.RunResult("sgd", 0.1, curve, np.zeros_like(curve), curve[-1], 0.0, None)

    assert demo.selection_score(run([1.0, 0.01])) == pytest.approx(0.1)
    assert demo.selection_score(run([1e-4, 0.0])) == pytest.approx(1e-6)  # 0 counts as the 1e-8 floor
    assert demo.selection_score(run([0.5, math.nan, 0.1])) == math.inf
    # Getting low sooner wins even when the last steps tie.
    assert demo.selection_score(run([1.0, 0.01, 0.01])) < demo.selection_score(run([1.0, 1.0, 0.01]))


def test_report_says_not_reached() -> None:
    losses = np.array([1.0, 0.5])
    accs = np.array([0.5, 0.6])
    run = demo.RunResult("sgd", 0.1, losses, accs, 0.5, 0.6, None)
    runs = {"rmsprop_jax": run._replace(name="rmsprop_jax"), "optax.rmsprop": run._replace(name="optax.rmsprop")}
    runs["sgd"] = run
    grids = {name: {0.1: 0.5} for name in runs}
    data = demo.Data(jnp.zeros((8, 64)), jnp.zeros(8), jnp.zeros((2, 64)), jnp.zeros(2))
    stream = io.StringIO()
    demo._report(runs, grids, data, 64, "batch size 4", 2, 0.95, "x.png", stream)
    text = stream.getvalue()
    assert text.count("not reached") == 3
    assert "Curves saved to x.png" in text


def test_batch_indices_cover_each_epoch_once() -> None:
    idx = demo.batch_indices(n_train=100, steps=7, batch_size=32, seed=0)
    assert idx.shape == (7, 32)
    first_epoch = idx[:3].ravel()
    assert len(set(first_epoch.tolist())) == first_epoch.size
    full = demo.batch_indices(n_train=100, steps=3, batch_size=0, seed=0)
    assert full.shape == (3, 100)


def test_demo_help_documents_every_flag() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "rmsprop_jax", "demo", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    for flag in FLAGS:
        assert flag in proc.stdout
    assert "digits" in proc.stdout


def test_top_level_help_lists_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--target", "1.5"], ["--lr", "-1"], ["--steps", "ten"]])
def test_bad_flags_are_rejected(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", *argv])
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A None entry in sys.modules makes that import fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--steps", "1", "--out", str(tmp_path / "x.png"), "--no-progress"])
    assert 'pip install "rmsprop-jax[demo]"' in str(exit_info.value.code)
    assert not (tmp_path / "x.png").exists()


def test_importing_the_package_needs_no_demo_extra() -> None:
    code = (
        "import sys, rmsprop_jax, rmsprop_jax.demo, rmsprop_jax.__main__; "
        "loaded = [m for m in ('sklearn', 'matplotlib', 'tqdm') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
