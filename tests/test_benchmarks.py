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


def test_code_map_candidates_decode_their_own_codes_and_round_without_bias():
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import code_maps
    from rmsprop_jax import formats

    # The "m0" candidate at 4 bits is the library's 4-bit map: code c stands for s·2^(c - 15), code 0 for 0.
    decode, _ = code_maps.CANDIDATES[4]["m0"]
    grid = np.where(np.arange(16) > 0, 2.0 ** (np.arange(16) - 15.0), 0.0)
    np.testing.assert_array_equal(np.asarray(decode(jnp.arange(16)), np.float64), grid)
    v = jnp.asarray(grid[np.arange(256) % 16] * 2.0, jnp.float32).reshape(256, 1)
    q = formats.quantize(v.at[::128].set(2.0), block_size=128, code_bits=4)
    codes = np.stack([np.asarray(q.codes) & 15, np.asarray(q.codes) >> 4], 1).reshape(256, 1)
    want = np.arange(256) % 16
    want[::128] = 15  # the block maxima
    np.testing.assert_array_equal(codes[:, 0], want)  # every grid value gets its own code
    np.testing.assert_allclose(2.0 * np.asarray(decode(codes)), np.asarray(formats.dequantize(q)), rtol=1e-6)
    # "m5/m3" is the library's 8-bit map: a block holding every code value gets every code.
    decode, _ = code_maps.CANDIDATES[8]["m5/m3"]
    q = formats.quantize(jnp.asarray(decode(jnp.arange(256)) * 2.0, jnp.float32), block_size=256)
    np.testing.assert_array_equal(np.asarray(q.codes), np.arange(256))
    # Exponent–mantissa codes: 1.0 is the top code, each binade holds 2^M codes, code 0 is 0.
    decode, encode = code_maps.exponent_mantissa_map(8, 4)
    values = np.asarray(decode(jnp.arange(256)), np.float64)
    assert values[0] == 0 and values[255] == 1 and values[255 - 16] == 0.5 and np.all(np.diff(values) > 0)
    codes = encode(jnp.asarray(values[1:], jnp.float32), jnp.zeros(255))
    np.testing.assert_array_equal(np.asarray(codes), np.arange(1, 256))
    # Stochastic rounding in value: the mean of many draws is the ratio itself.
    r = jnp.full(20000, 0.3, jnp.float32)
    u = jnp.asarray(np.random.default_rng(0).random(20000), jnp.float32)
    lo, hi = values[values <= 0.3].max(), values[values > 0.3].min()
    assert abs(float(np.mean(np.asarray(decode(encode(r, u))))) - 0.3) < 4 * (hi - lo) / 2 / np.sqrt(20000)
    rows = code_maps.compare(quick=True)
    assert [row[:2] for row in rows][:2] == [["8-bit", "power"], ["8-bit", "m3"]] and len(rows) == 9


def test_embedding_blocks_rows_are_unbiased_never_zero_and_row_blocks_beat_column_blocks():
    from benchmarks import embedding_blocks

    rows = embedding_blocks.compare(quick=True)
    assert [row["state"] for row in rows][::3] == ["8-bit", "8-bit rows", "4-bit", "4-bit rows"]
    error = {(row["state"], row["tokens"]): row["median_rel_error"] for row in rows}
    for bits in ("8-bit", "4-bit"):
        for tokens in ("mid (10-99)", "rare (1-9)"):
            # A row block holds one token's dimensions: its scale follows that token's own g².
            assert error[(f"{bits} rows", tokens)] < 0.8 * error[(bits, tokens)], (bits, tokens, error)
    for row in rows:
        # Stochastic rounding keeps the stored mean right and no non-zero v decodes to 0, rare tokens included.
        assert row["rows"] > 0 and row["zeros"] == 0
        # 4-bit's lowest code is 6.1e-5 of the block scale and smaller values are stored as it: on the 44
        # frequent rows of this short run, whose averages hold few hits, that lifts the mean by up to 6 %
        # (0.8 % on the full table of `python -m benchmarks.embedding_blocks`).
        assert abs(row["mean_bias"]) < (0.08 if row["state"].startswith("4-bit") else 0.02), row
        # Unbiased but noisy v: 1/sqrt of it is larger on average (Jensen), never smaller by much.
        assert row["step_mean"] > 0.99, row
