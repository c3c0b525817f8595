"""Quantized ``nu`` of an embedding table: how rare tokens fare when blocks mix tokens.

``python -m benchmarks.embedding_blocks`` trains nothing: it feeds the same sparse gradients to
``scale_by_rms(decay=0.999)`` with float32, 8-bit and 4-bit state and compares the decoded
``nu`` with the float32 one, row by row. The table is (8,192 tokens, 128 dims); each step draws
512 tokens from a Zipf(1.1) distribution whose frequent tokens are scattered over the rows, and
each drawn token's row gets a Gaussian gradient. Column blocks (the default) run down the first
axis, so one block holds ``block_size`` consecutive tokens at one dimension, frequent and rare
ones together: the block scale follows the frequent tokens' g², and a rare token's ``v`` sits
many binades below it. Row blocks (``row_blocks=True``) hold dimensions of one token only.

Reported per frequency class (hits over the run): the median relative error of the decoded
``nu``, the bias of its mean, and the mean over elements of the step size relative to the
float32 step, sqrt(nu_float32 / nu).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import rmsprop_jax
from benchmarks import measure
from rmsprop_jax import lowmem

CLASSES = (("frequent (100+ hits)", 100, np.inf), ("mid (10-99)", 10, 100), ("rare (1-9)", 1, 10))
HEADER = ["state", "tokens", "rows", "median rel. error", "mean nu vs float32", "step: mean"]


def compare(quick: bool = False, block_size: int | None = None, seed: int = 0) -> list[dict]:
    """One row per (format, frequency class); see the module docstring."""
    vocab, dim, batch, steps = (2048, 64, 128, 300) if quick else (8192, 128, 512, 2000)
    rng = np.random.default_rng(seed)
    freq = 1.0 / np.arange(1, vocab + 1) ** 1.1
    freq /= freq.sum()
    rows_of_rank = rng.permutation(vocab)
    params = {"emb": jnp.zeros((vocab, dim), jnp.float32)}
    formats = {"float32": {}}
    for bits in (8, 4):
        formats[f"{bits}-bit"] = {"state_bits": bits}
        formats[f"{bits}-bit rows"] = {"state_bits": bits, "row_blocks": True}
    txs = {
        name: rmsprop_jax.scale_by_rms(decay=0.999, block_size=block_size if kw else None, **kw)
        for name, kw in formats.items()
    }
    states = {name: tx.init(params) for name, tx in txs.items()}
    updates = {name: jax.jit(tx.update) for name, tx in txs.items()}
    hits = np.zeros(vocab)
    for _ in range(steps):
        tokens = rows_of_rank[rng.choice(vocab, size=batch, p=freq)]
        np.add.at(hits, tokens, 1)
        grad = np.zeros((vocab, dim), np.float32)
        np.add.at(grad, tokens, 0.01 * rng.standard_normal((batch, dim)).astype(np.float32))
        grads = {"emb": jnp.asarray(grad)}
        for name in states:
            _, states[name] = updates[name](grads, states[name])
    ref = np.asarray(lowmem.nu_values(states["float32"].nu, params)["emb"], np.float64)
    rows = []
    for name in list(formats)[1:]:
        got = np.asarray(lowmem.nu_values(states[name].nu, params)["emb"], np.float64)
        for label, low, high in CLASSES:
            chosen = (hits >= low) & (hits < high)
            r, q = ref[chosen], got[chosen]
            rows.append(
                {
                    "state": name,
                    "tokens": label,
                    "rows": int(chosen.sum()),
                    "median_rel_error": float(np.median(np.abs(q - r) / r)),
                    "mean_bias": float(q.mean() / r.mean() - 1.0),
                    "step_mean": float(np.mean(np.sqrt(r / q))),
                    "zeros": int(np.count_nonzero(q == 0)),
                }
            )
    return rows


def table_rows(rows: list[dict]) -> list[list[str]]:
    """`compare`'s rows as the cells of a table under `HEADER`."""
    return [
        [
            row["state"],
            row["tokens"],
            str(row["rows"]),
            f"{row['median_rel_error']:.1%}",
            f"{row['mean_bias']:+.2%}",
            f"{row['step_mean']:.3f}",
        ]
        for row in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller table and fewer steps")
    parser.add_argument("--block-size", type=int, default=None, help="block_size for every quantized format")
    args = parser.parse_args()
    print(measure.markdown_table(HEADER, table_rows(compare(quick=args.quick, block_size=args.block_size))))


if __name__ == "__main__":
    main()
