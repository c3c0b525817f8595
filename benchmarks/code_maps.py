"""Which code map should blockwise ``nu`` use? Quality of candidate maps under the same averaging loop.

``python -m benchmarks.code_maps`` runs a blockwise running average of g² (decay 0.999, a float32
scale per block that bounds the block's values, stochastic rounding) with each candidate map and
compares the decoded values with the float32 average of the same gradients:

* **power**: code c stands for s·(c/L)⁴ (the earlier 4-bit map; its encoder needs two square
  roots per element);
* **exponent–mantissa (mM)**: code c stands for the float32 whose bits are those of 1.0 minus
  (L − c)·2^(23 − M), i.e. M mantissa bits per binade below the block scale, 0 for code 0. Its
  codes are the top bits of the float32 ratio v/s, so encoding is integer arithmetic; m0 at 4 bits
  (one code per binade) is the 4-bit map in use (`rmsprop_jax.formats`);
* **two segments (mA/mB)**: A mantissa bits per binade over the top binades, B below them;
  m5/m3 (the top 4 binades, 128 codes, at 5 bits) is the 8-bit map in use, m4/m3 splits at
  8 binades.

Two gradient streams: *mixed*, per-element gradient scales over 2 decades with half of the
elements going quiet halfway (their average must keep decaying); *swamping*, unit gradients for
1,500 steps and then 100× smaller ones for 2,500 steps.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import measure
from rmsprop_jax import _random, formats

Decode = Callable[[jax.Array], jax.Array]  # codes -> ratio v/s in [0, 1]
Encode = Callable[[jax.Array, jax.Array], jax.Array]  # (ratio, uniform draws) -> codes


def _bits(u: jax.Array) -> jax.Array:
    return (u * 2.0**24).astype(jnp.uint32) << 8  # the formats draw from the top bits


def power_value(code: jax.Array, levels: int) -> jax.Array:
    """The ratio v/s = (c / L)^4 of fourth-power codes with top code L = `levels`, in float32."""
    t = code.astype(jnp.float32) * jnp.float32(1 / levels)
    t2 = t * t
    return t2 * t2


def power_codes(r: jax.Array, u: jax.Array, levels: int) -> jax.Array:
    """Fourth-power codes of ratios `r` in [0, 1], rounded stochastically with uniform draws `u`."""
    low = jnp.clip(jnp.floor(jnp.sqrt(jnp.sqrt(r)) * levels), 0, levels - 1)
    q_low, q_high = power_value(low, levels), power_value(low + 1, levels)
    code = low + (u * (q_high - q_low) < r - q_low).astype(jnp.float32)  # up with probability ∝ distance
    code = jnp.where(r > 0, jnp.maximum(code, 1), code)  # never store a non-zero v as 0
    return code.astype(jnp.uint8)


def power_map(bits: int) -> tuple[Decode, Encode]:
    """The fourth-power map with top code 2^bits − 1."""
    levels = (1 << bits) - 1
    return (lambda c: power_value(c, levels)), (lambda r, u: power_codes(r, u, levels))


def float_map(bits: int, fine_binades: int, fine_bits: int, coarse_bits: int) -> tuple[Decode, Encode]:
    """The float map of `rmsprop_jax.formats` (`formats.float_value`) with the given segments."""
    shape = dict(levels=(1 << bits) - 1, fine_binades=fine_binades, fine_bits=fine_bits, coarse_bits=coarse_bits)
    return (lambda c: formats.float_value(c, **shape)), (lambda r, u: formats.float_codes(r, _bits(u), **shape))


def exponent_mantissa_map(bits: int, mantissa_bits: int) -> tuple[Decode, Encode]:
    """One segment of `mantissa_bits` per binade over all the codes."""
    levels = (1 << bits) - 1
    return float_map(bits, -(-(levels + 1) // (1 << mantissa_bits)), mantissa_bits, mantissa_bits)


def run_average(code_map: tuple[Decode, Encode], block: int, grads: np.ndarray, decay: float) -> tuple:
    """Final decoded blockwise average and the float32 average of the same gradients (float64 arrays)."""
    decode, encode = code_map
    steps, n = grads.shape

    def step(carry: tuple, inputs: tuple) -> tuple:
        (codes, scale, exact), (t, g) = carry, inputs
        x = (g * g).reshape(-1, block)
        v = decay * scale[:, None] * decode(codes) + (1 - decay) * x
        new_scale = decay * scale + (1 - decay) * x.max(axis=1)
        inverse = 1 / jnp.where(new_scale > 0, new_scale, jnp.inf)
        u = _random.uniform(_random.random_bits(v.shape, _random.step_key(t, 0, 0)))
        codes = encode(jnp.minimum(v * inverse[:, None], 1), u).astype(jnp.int32)
        return (codes, new_scale, decay * exact + (1 - decay) * x), None

    init = (jnp.zeros((n // block, block), jnp.int32), jnp.zeros(n // block), jnp.zeros((n // block, block)))
    scan = jax.jit(lambda c, g: jax.lax.scan(step, c, (jnp.arange(steps), g))[0])
    codes, scale, exact = scan(init, jnp.asarray(grads))
    return np.asarray(scale[:, None] * decode(codes), np.float64).ravel(), np.asarray(exact, np.float64).ravel()


def streams(quick: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    n, steps = (4096, 200) if quick else (65536, 2000)
    mixed = (rng.normal(size=(steps, n)) * 10 ** rng.uniform(-1, 1, size=n)).astype(np.float32)
    mixed[steps // 2 :, ::2] = 0
    loud, quiet = (150, 250) if quick else (1500, 2500)
    scales = np.concatenate([np.ones(loud), np.full(quiet, 0.01)]).astype(np.float32)
    swamping = (rng.normal(size=(loud + quiet, 8192 if not quick else 2048)) * scales[:, None]).astype(np.float32)
    return {"mixed": mixed, "swamping": swamping}


CANDIDATES: dict[int, dict[str, tuple[Decode, Encode]]] = {
    8: {
        "power": power_map(8),
        "m3": exponent_mantissa_map(8, 3),
        "m4": exponent_mantissa_map(8, 4),
        "m5": exponent_mantissa_map(8, 5),
        "m5/m3": float_map(8, formats.FINE_BINADES, formats.FINE_BITS, formats.COARSE_BITS),
        "m4/m3": float_map(8, 8, 4, 3),
    },
    4: {"power": power_map(4), "m0": exponent_mantissa_map(4, 0), "m1": exponent_mantissa_map(4, 1)},
}


def compare(quick: bool = False) -> list[list[str]]:
    data = streams(quick)
    rows = []
    for bits, maps in CANDIDATES.items():
        block = 256 if bits == 8 else 128
        for name, code_map in maps.items():
            row = [f"{bits}-bit", name]
            for grads in data.values():
                got, want = run_average(code_map, block, grads, 0.999)
                rel = np.abs(got[want > 0] / want[want > 0] - 1)
                bias = got.mean() / want.mean() - 1
                row += [f"{np.median(rel):.1%}", f"{np.quantile(rel, 0.99):.0%}", f"{bias:+.2%}"]
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small streams: a smoke test")
    args = parser.parse_args()
    header = ["bits", "map"] + [f"{s}: {m}" for s in ("mixed", "swamping") for m in ("median", "p99", "mean")]
    print(measure.markdown_table(header, compare(args.quick)))


if __name__ == "__main__":
    main()
