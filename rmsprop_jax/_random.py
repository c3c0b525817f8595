"""Counter-based random bits and stochastic rounding, shared by the state formats.

The bits are a hash of (step, leaf, buffer, element index), so no key is kept
in the state and they are the same on every backend and under any sharding;
`rmsprop_jax.lowmem` documents the formula.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

NU, MU, MOMENTUM = 0, 1, 2  # buffer ids mixed into the random bits
_PHI, _C1, _C2, _C3 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F


def mix(x: jax.Array) -> jax.Array:
    """lowbias32: a bijective 32-bit integer hash (uint32 in, uint32 out)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def scramble(x: jax.Array) -> jax.Array:
    """The per-element hash: lowbias32's two multiplies and the xorshift between them (a bijection).

    Its input is the element index xored with a fully mixed `step_key`, so
    for each element it is uniform and independent from step to step
    whatever the hash; the hash only has to decorrelate the elements of one
    step, and its top bits (the only ones used) do not need lowbias32's
    outer xorshifts for that: neighbouring and same-column elements stay
    uncorrelated (below 0.003 at every offset tried). Two operations fewer
    per element make the 8-bit step ~8 % faster on the CPU.
    """
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    return x * jnp.uint32(0x846CA68B)


def step_key(count: Any, leaf: int, buffer: int) -> jax.Array:
    """The uint32 key of one buffer of one leaf at step `count` (a scalar)."""
    salt = mix(jnp.uint32((leaf * _C1 + buffer * _C2 + _C3) % 2**32))
    return mix(jnp.asarray(count).astype(jnp.uint32) * jnp.uint32(_PHI) + salt)


def random_bits(shape: tuple[int, ...], key: jax.Array, offset: int = 0) -> jax.Array:
    """uint32 bits for every element of `shape`: ``scramble((offset + linear index) ^ key)``."""
    size = math.prod(shape)
    index = jax.lax.iota(jnp.uint32, size) + jnp.uint32(offset % 2**32) if size else jnp.zeros(0, jnp.uint32)
    return scramble(index.reshape(shape) ^ key)


def split_halves(bits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two sets of random bits from one: the top 16 bits of `bits`, and its low 16 bits, each as the top of a uint32.

    For stochastic rounding that reads the top bits of a word, 16 bits
    resolve the probability of rounding up to 2^-16 of a code step. The two
    halves of `scramble`'s output are uncorrelated (below 0.002) and each as
    uniform as its top bits.
    """
    return bits & jnp.uint32(0xFFFF0000), bits << 16


def uniform(bits: jax.Array) -> jax.Array:
    """float32 numbers in [0, 1) from the top 24 of 32 random bits (exact)."""
    return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


# --------------------------------------------------------------------------- stochastic rounding


def stochastic_round(x: jax.Array, dtype: Any, bits: jax.Array) -> jax.Array:
    """Rounds float32 `x` to the narrower float `dtype` up or down at random, unbiased: E[result] = x.

    With a ≤ ``|x|`` < b the neighbours of ``|x|`` in `dtype`, the magnitude
    becomes b with probability (``|x|`` − a) / (b − a) and a otherwise, decided
    by the uint32 random `bits`. For bfloat16 this is the classic integer
    trick: add 16 random bits below the 16 bits that bfloat16 keeps and
    truncate. For other dtypes (float16, ...) the spacing of `dtype` at ``|x|`` (a power of two
    found from the float32 exponent, or the subnormal spacing) is used the
    same way in float32. Representable values stay exact, NaN stays NaN, inf
    stays inf; beyond the largest finite number the result may be inf.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.full(4, 1.0 + 2.0**-9)  # a quarter of the way from 1 to 1 + 2**-7 (bfloat16)
      >>> u = jnp.array([0.0, 0.2, 0.8, 0.9])  # up for the top quarter of the random bits
      >>> stochastic_round(x, jnp.bfloat16, (u * 2.0**32).astype(jnp.uint32))
      Array([1, 1, 1.00781, 1.00781], dtype=bfloat16)
    """
    dtype = jnp.dtype(dtype)
    x = x.astype(jnp.float32)
    if dtype == jnp.dtype(jnp.bfloat16):
        raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
        raw = jnp.where(x == x, raw, jnp.uint32(0x7FC00000))  # a NaN whose payload sits in the low bits
        rounded = (raw + (bits >> 16)) >> 16
        return jax.lax.bitcast_convert_type(rounded.astype(jnp.uint16), jnp.bfloat16)
    info = jnp.finfo(dtype)
    # The spacing of dtype at |x|: 2^(max(e, min normal exponent) - mantissa bits), e = exponent of |x|.
    exponent = (jax.lax.bitcast_convert_type(x, jnp.uint32) >> 23 & 0xFF).astype(jnp.int32) - 127
    spacing_exp = jnp.maximum(exponent, int(info.minexp)) - int(info.nmant)
    spacing = jax.lax.bitcast_convert_type((spacing_exp + 127) << 23, jnp.float32)
    magnitude = jnp.abs(x)
    low = jnp.floor(magnitude / spacing) * spacing  # exact: spacing is a power of two
    up = uniform(bits) * spacing < magnitude - low
    out = jnp.sign(x) * (low + jnp.where(up, spacing, 0))
    return jnp.where(jnp.isfinite(x), out, x).astype(dtype)
