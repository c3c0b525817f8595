r"""Low-memory optimizer state: stochastic rounding and an 8-bit blockwise ``nu``.

Two ways to store the state in fewer bytes, selected by options of
`rmsprop_jax.rmsprop` and `rmsprop_jax.scale_by_rms`:

* ``nu_dtype=jnp.bfloat16`` (or ``jnp.float16``): ``nu`` (and ``mu`` and the
  momentum buffer) in 2 bytes. Every step computes in float32 and writes the
  new state back with **stochastic rounding**: a value x between the two
  neighbouring representable numbers :math:`a \le x < b` is stored as b with
  probability :math:`(x - a) / (b - a)` and as a otherwise, so the stored
  value is x *in expectation*. With round-to-nearest, ``0.999 * v`` rounds
  back to v in bfloat16 (8 significant bits) and the average never forgets;
  with stochastic rounding it decays like :math:`0.999^t` on average.

* ``state_bits=8``: ``nu`` as one unsigned byte per element plus one float32
  scale per block of ``block_size`` elements (default 256) of the flattened
  leaf, 1 + 4/256 ≈ 1.016 bytes per parameter. Since :math:`v \ge 0` the code
  map is unsigned and uses all 256 codes: code c stands for

  .. math:: v = s_B \, (c / 255)^4

  so the spacing of the codes is finest near the top of the block, where
  most values lie (relative step ≈ 4/c: 1.6 % at the top, 2.8 % at
  :math:`0.1 s_B`, 10 % at :math:`6\cdot 10^{-4} s_B`), and the smallest
  non-zero code is :math:`s_B / 255^4 \approx 2.4\cdot 10^{-10} s_B`. A
  non-zero v is never stored as 0 (it would make the step g/ε explode):
  values below the first code are stored as code 1, which only shrinks their
  step. The new codes are drawn with stochastic rounding between the two
  neighbouring codes, unbiased in value; with decay 0.999 the per-step change
  of v is far below one code step and round-to-nearest would freeze v. The
  block scale is the bound :math:`s_B \leftarrow \gamma s_B + (1-\gamma)
  \max_{i\in B} g_i^2` of the block maximum (every stored v is at most
  :math:`s_B`), which needs only the gradients. Leaves smaller than one block
  (and complex ``nu`` of ``split_complex``) keep ``nu`` unquantized in the
  state dtype. Each step dequantizes, computes the new ``nu`` and the update
  in float32, then re-quantizes.

**Random bits.** The rounding is deterministic: the bits for element i of
buffer k (0 ``nu``, 1 ``mu``, 2 momentum) of leaf l at step t (the state's
1-based ``count``) are

.. math:: h = \mathrm{mix}(i \oplus \mathrm{mix}(t \cdot \phi + \mathrm{mix}(l \cdot c_1 + k \cdot c_2 + c_3)))

with mix the 32-bit integer finalizer "lowbias32" (C. Wellons, 2018:
``x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16``),
a bijection with good avalanche, and φ, c₁, c₂, c₃ odd 32-bit constants; the
top 24 bits give a uniform number in [0, 1). It costs a few integer
operations per element inside the update's fused loop, needs no key in the
state and is the same on every backend and under any sharding. Replaying a
step from the same state gives the same bits; a skipped step
(``skip_nonfinite``) does not advance ``count`` and so reuses them.

Example:
  >>> import jax.numpy as jnp, rmsprop_jax
  >>> from rmsprop_jax import lowmem
  >>> params = {"w": jnp.ones((4, 256)), "b": jnp.ones(16)}
  >>> tx = rmsprop_jax.rmsprop(1e-3, decay=0.999, state_bits=8)
  >>> state = tx.init(params)
  >>> state.nu["w"].codes.dtype, state.nu["w"].codes.shape, state.nu["b"].dtype
  (dtype('uint8'), (4, 256), dtype('float32'))
  >>> grads = {"w": jnp.full((4, 256), 2.0), "b": jnp.full(16, 2.0)}
  >>> updates, state = tx.update(grads, state, params)
  >>> nu = lowmem.nu_values(state.nu, params)  # float32, shaped like the params
  >>> round(float(nu["w"][0, 0]), 6), round(float(nu["b"][0]), 6)  # (1 - 0.999) * 2**2
  (0.004, 0.004)
  >>> lowmem.state_bytes(state.nu["w"]) / 1024  # bytes per element: 1 + 4 / 256
  1.015625
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "QuantizedArray",
    "StateCodec",
    "dequantize",
    "make_codec",
    "nu_values",
    "quantize",
    "random_bits",
    "state_bytes",
    "step_key",
    "stochastic_round",
    "uniform",
]

NU, MU, MOMENTUM = 0, 1, 2  # buffer ids mixed into the random bits
DEFAULT_BLOCK_SIZE = 256
_PHI, _C1, _C2, _C3 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F


class QuantizedArray(NamedTuple):
    """An 8-bit blockwise-quantized non-negative array (see the module docstring).

    Attributes:
      codes: uint8, shape ``(blocks, block_size)``: the flattened array, padded
        with zeros to whole blocks.
      scale: float32, shape ``(blocks,)``: each block's maximum.
    """

    codes: jax.Array
    scale: jax.Array


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


# --------------------------------------------------------------------------- random bits


def mix(x: jax.Array) -> jax.Array:
    """lowbias32: a bijective 32-bit integer hash (uint32 in, uint32 out)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def step_key(count: Any, leaf: int, buffer: int) -> jax.Array:
    """The uint32 key of one buffer of one leaf at step `count` (a scalar)."""
    salt = mix(jnp.uint32((leaf * _C1 + buffer * _C2 + _C3) % 2**32))
    return mix(jnp.asarray(count).astype(jnp.uint32) * jnp.uint32(_PHI) + salt)


def random_bits(shape: tuple[int, ...], key: jax.Array, offset: int = 0) -> jax.Array:
    """uint32 bits for every element of `shape`: ``mix((offset + linear index) ^ key)``."""
    size = math.prod(shape)
    index = jax.lax.iota(jnp.uint32, size) + jnp.uint32(offset % 2**32) if size else jnp.zeros(0, jnp.uint32)
    return mix(index.reshape(shape) ^ key)


def uniform(bits: jax.Array) -> jax.Array:
    """float32 numbers in [0, 1) from the top 24 of 32 random bits (exact)."""
    return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


# --------------------------------------------------------------------------- stochastic rounding


def stochastic_round(x: jax.Array, dtype: Any, bits: jax.Array) -> jax.Array:
    """Rounds float32 `x` to the narrower float `dtype` up or down at random, unbiased: E[result] = x.

    With a ≤ |x| < b the neighbours of |x| in `dtype`, the magnitude becomes b
    with probability (|x| − a) / (b − a) and a otherwise, decided by the
    uint32 random `bits`. For bfloat16 this is the classic integer trick: add
    16 random bits below the 16 bits that bfloat16 keeps and truncate. For
    other dtypes (float16, ...) the spacing of `dtype` at |x| (a power of two
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


# --------------------------------------------------------------------------- 8-bit codes


# The 8-bit code map: code c stands for s_B·(c/255)^4, with s_B the block scale.
CODES = 255


def _code_value(code: jax.Array) -> jax.Array:
    """(c / 255)^4 in float32."""
    t = code.astype(jnp.float32) * jnp.float32(1 / CODES)
    t2 = t * t
    return t2 * t2


def blocks_of(n: int, block_size: int) -> int:
    return -(-n // block_size)


def _to_blocks(x: jax.Array, block_size: int) -> jax.Array:
    flat = x.reshape(-1)
    pad = blocks_of(flat.size, block_size) * block_size - flat.size
    if pad:
        flat = jnp.pad(flat, (0, pad))
    return flat.reshape(-1, block_size)


def _split_blocks(x: jax.Array, block_size: int) -> list[jax.Array]:
    """The whole blocks of flattened `x` as rows, then (if any) the last block padded with zeros."""
    flat = x.reshape(-1)
    full = flat.size // block_size
    parts = [flat[: full * block_size].reshape(full, block_size)] if full else []
    if flat.size > full * block_size:
        parts.append(jnp.pad(flat[full * block_size :], (0, (full + 1) * block_size - flat.size))[None])
    return parts


def _from_blocks(blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    size = math.prod(shape)
    return blocks.reshape(-1)[:size].reshape(shape)


def quantize(v: jax.Array, block_size: int = DEFAULT_BLOCK_SIZE, bits: jax.Array | None = None) -> QuantizedArray:
    """Quantizes non-negative `v` to 8-bit codes per block of `block_size` flattened elements.

    The scale of each block is its maximum, stored as code 255. Each value is
    rounded between its two neighbouring codes, c = floor(255·(v/s_B)^(1/4))
    and c + 1, in value (not in code): to the nearer one, or, given random
    `bits`, up with probability (v − q_c) / (q_(c+1) − q_c), which makes the
    result unbiased.

    Args:
      v: float32 values >= 0 (negative values are treated as 0).
      block_size: elements per block.
      bits: uint32 random bits shaped like the padded blocks,
        ``(blocks, block_size)``, for stochastic rounding; None rounds to the
        nearest code.

    Returns:
      A `QuantizedArray`. Every non-zero value gets a non-zero code.

    Example:
      >>> import jax.numpy as jnp
      >>> q = quantize(jnp.array([4.0, 1.0, 1e-20, 0.0]), block_size=4)
      >>> q.codes, q.scale
      (Array([[255, 180,   1,   0]], dtype=uint8), Array([4.], dtype=float32))
      >>> dequantize(q, (4,))  # 1.0 comes back as 4·(180/255)^4; 1e-20 rounds up to code 1
      Array([4.0000000e+00, 9.9309164e-01, 9.4601793e-10, 0.0000000e+00], dtype=float32)
    """
    blocks = _to_blocks(v.astype(jnp.float32), block_size)
    blocks = jnp.where(blocks <= 0, 0, blocks)  # also turns -0.0 into +0.0; NaN stays NaN
    return _encode(blocks, block_max(blocks), bits)


def block_max(blocks: jax.Array) -> jax.Array:
    """The maximum of each row of `blocks` (NaN if the row holds one).

    Written as a tree of elementwise maxima down to 16 columns, then a
    reduction: XLA:CPU (jaxlib 0.10) sends a plain row reduction of long rows
    to a library kernel that is ~10x slower than the memory traffic, while
    the elementwise tree fuses into one loop.
    """
    while blocks.shape[1] > 16 and blocks.shape[1] % 2 == 0:
        half = blocks.shape[1] // 2
        blocks = jnp.maximum(blocks[:, :half], blocks[:, half:])
    return jnp.max(blocks, axis=1)


def _encode(blocks: jax.Array, scale: jax.Array, bits: jax.Array | None) -> QuantizedArray:
    """Codes of non-negative `blocks` relative to `scale` (>= every value of its block)."""
    inv = jnp.where(scale > 0, 1 / jnp.where(scale > 0, scale, 1), 0)
    r = jnp.minimum(blocks * inv[:, None], 1)
    low = jnp.clip(jnp.floor(jnp.sqrt(jnp.sqrt(r)) * CODES), 0, CODES - 1)
    q_low, q_high = _code_value(low), _code_value(low + 1)
    # The nearest code in value, or the upper one with probability (r - q_low) / (q_high - q_low).
    up = r - q_low > q_high - r if bits is None else uniform(bits) * (q_high - q_low) < r - q_low
    code = low + up.astype(jnp.float32)
    code = jnp.where(r > 0, jnp.maximum(code, 1), code)  # never store a non-zero v as 0
    return QuantizedArray(code.astype(jnp.uint8), scale)


def dequantize(q: QuantizedArray, shape: tuple[int, ...]) -> jax.Array:
    """The float32 values of `q`, shaped `shape` (the padding is dropped)."""
    values = q.scale[:, None] * _code_value(q.codes)
    return _from_blocks(values, tuple(shape))


# --------------------------------------------------------------------------- the codec used by the transforms


def _low_precision(dtype: Any) -> bool:
    """A real floating dtype narrower than float32 (bfloat16, float16, float8...)."""
    dtype = jnp.dtype(dtype)
    return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


class StateCodec:
    """How `scale_by_rms` / `rmsprop` store their state when a low-memory option is on.

    Built by `make_codec`; None stands for the plain float state.
    """

    def __init__(self, state_bits: int | None, block_size: int, stochastic: bool):
        self.state_bits = state_bits
        self.block_size = block_size
        self.stochastic = stochastic

    def quantizes(self, shape: tuple[int, ...], dtype: Any) -> bool:
        """Whether a ``nu`` leaf of this shape and (unquantized) dtype is stored in 8 bits."""
        return (
            self.state_bits == 8
            and math.prod(shape) >= self.block_size
            and jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
        )

    def init_nu(self, p: jax.Array, value: Any, dtype: Any, plain: Any) -> Any:
        """The initial ``nu`` of one leaf; `plain` is the unquantized initial array."""
        if not self.quantizes(jnp.shape(p), dtype):
            return plain
        blocks = _to_blocks(plain.astype(jnp.float32), self.block_size)
        index = jax.lax.iota(jnp.int32, blocks.size).reshape(blocks.shape)
        valid = index < plain.size  # the padding holds zeros
        filled = jnp.asarray(value, jnp.float32) > 0
        codes = jnp.where(valid & filled, CODES, 0).astype(jnp.uint8)
        return QuantizedArray(codes, jnp.max(jnp.where(valid, blocks, 0), axis=1))

    def load(self, stored: Any, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        """A state leaf as an array of `dtype` (the compute dtype)."""
        if is_quantized(stored):
            return dequantize(stored, shape).astype(dtype)
        return stored.astype(dtype)

    def round(self, x: jax.Array, dtype: Any, count: jax.Array, leaf: int, buffer: int) -> jax.Array:
        """`x` cast to the storage `dtype`, stochastically when it is narrower than float32."""
        if not (self.stochastic and _low_precision(dtype)):
            return x.astype(dtype)
        return stochastic_round(x, dtype, random_bits(x.shape, step_key(count, leaf, buffer)))

    def store_nu(self, nu: jax.Array, like: Any, count: jax.Array, leaf: int, squared: jax.Array, decay: Any) -> Any:
        """The new ``nu`` (computed in float32 or wider) in the storage format of `like`.

        For an 8-bit leaf the new block scale is the bound
        ``decay * s_B + (1 - decay) * max_B |g|^2`` of the new block maximum
        (every stored v is at most s_B), which needs only the gradients:
        computing the exact maximum of the new ``nu`` would make XLA write
        ``nu`` out in float32 first. The code grid is a float format, so its
        relative resolution does not depend on how tight the scale is.
        """
        if not is_quantized(like):
            return self.round(nu, like.dtype, count, leaf, NU)
        real = jnp.float32
        complement = jnp.asarray(1 - decay, real)  # as in rms_scale_leaf
        full = nu.size // self.block_size
        # Whole blocks and the ragged last block are handled apart: padding the whole leaf to
        # whole blocks makes XLA write a padded copy of it.
        g2 = _split_blocks(squared.astype(real), self.block_size)
        g2_max = jnp.concatenate([block_max(part) for part in g2])
        scale = jnp.asarray(decay, real) * like.scale + complement * g2_max
        bits = random_bits(like.codes.shape, step_key(count, leaf, NU)) if self.stochastic else None
        codes = []
        for start, part in zip((0, full), _split_blocks(nu.astype(real), self.block_size), strict=False):
            rows = slice(start, start + part.shape[0])
            part_bits = None if bits is None else bits[rows]
            codes.append(_encode(jnp.where(part <= 0, 0, part), scale[rows], part_bits).codes)
        return QuantizedArray(codes[0] if len(codes) == 1 else jnp.concatenate(codes), scale)

    def leaf_fn(self, leaf: int) -> Any:
        """`rms_scale_leaf` for leaf number `leaf`, reading the state in its storage format and writing it back.

        The update is computed from the new moments in float32, before they
        are rounded for storage (as with float32 state); the rounding only
        affects the state that the next step continues from.
        """
        from rmsprop_jax.transform import rms_scale_leaf  # the transforms import this module

        def scale_leaf(
            g: jax.Array, nu: Any, mu: jax.Array | None, count: jax.Array, decay: Any, eps: Any, **kwargs: Any
        ) -> tuple[jax.Array, Any, jax.Array | None]:
            real = jnp.finfo(g.dtype).dtype
            nu_in = self.load(nu, g.shape, real if is_quantized(nu) else jnp.result_type(nu.dtype, real))
            mu_in = None if mu is None else mu.astype(jnp.result_type(mu.dtype, g.dtype))
            s, nu_new, mu_new = rms_scale_leaf(g, nu_in, mu_in, count, decay, eps, **kwargs)
            squared = (jnp.conj(g) * g).real if jnp.iscomplexobj(g) else g * g
            nu_out = self.store_nu(nu_new, nu, count, leaf, squared, decay)
            mu_out = None if mu is None or mu_new is None else self.round(mu_new, mu.dtype, count, leaf, MU)
            return s, nu_out, mu_out

        return scale_leaf


def dtype_of(stored: Any) -> jnp.dtype:
    """The dtype a state leaf holds its values in (float32 for an 8-bit leaf)."""
    return jnp.dtype(jnp.float32) if is_quantized(stored) else jnp.dtype(stored.dtype)


def make_codec(
    nu_dtype: jnp.dtype | None, state_bits: Any, block_size: Any, stochastic_rounding: Any
) -> StateCodec | None:
    """Validates the low-memory options; returns None when the state is plain floats rounded to nearest.

    Args:
      nu_dtype: the resolved state dtype (None: follow the params).
      state_bits: None, or 8 for the blockwise-quantized ``nu``.
      block_size: elements per quantization block (needs ``state_bits=8``);
        None means 256.
      stochastic_rounding: None (on whenever state is stored below float32
        precision), True or False.
    """
    if state_bits is not None and (isinstance(state_bits, bool) or state_bits != 8):
        raise ValueError(f"state_bits must be None or 8, got {state_bits!r}.")
    if block_size is not None:
        if state_bits is None:
            raise ValueError("block_size applies to the 8-bit state: pass state_bits=8 with it.")
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}.")
    if stochastic_rounding is not None and not isinstance(stochastic_rounding, (bool, np.bool_)):
        raise ValueError(f"stochastic_rounding must be None, True or False, got {stochastic_rounding!r}.")
    narrow = nu_dtype is not None and _low_precision(nu_dtype)
    stochastic = bool(stochastic_rounding) if stochastic_rounding is not None else True
    if state_bits is None and not (narrow and stochastic):
        return None
    return StateCodec(state_bits, int(block_size or DEFAULT_BLOCK_SIZE), stochastic)


# --------------------------------------------------------------------------- reading the state


def nu_values(nu: Any, params: Any) -> Any:
    """``nu`` as plain arrays shaped like the params (8-bit leaves dequantized to float32)."""
    leaves, treedef = jax.tree.flatten(nu, is_leaf=is_quantized)
    shapes = [jnp.shape(p) for p in jax.tree.leaves(params)]
    if len(shapes) != len(leaves):
        raise ValueError(f"nu has {len(leaves)} leaves but the params have {len(shapes)}.")
    out = [dequantize(x, s) if is_quantized(x) else x for x, s in zip(leaves, shapes, strict=True)]
    return jax.tree.unflatten(treedef, out)


def state_bytes(tree: Any) -> int:
    """Bytes held by the arrays of a state tree (codes and scales included)."""
    return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
