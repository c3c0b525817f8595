r"""How the optimizer state is stored: one format per state buffer, chosen leaf by leaf.

`rmsprop_jax.rmsprop` and `rmsprop_jax.scale_by_rms` keep up to three
parameter-sized buffers per leaf: the average of squared gradients ``nu``
(never negative), and the signed averages ``mu`` (centered) and momentum.
Every way of storing one of them is a *format*, and everything that touches
the state (the update, ``init``, ``flat=True``, `rmsprop_jax.sharding.zero1`,
`rmsprop_jax.diagnostics`, checkpoints) goes through this one interface:

* ``init(like, value)``: the stored form of a buffer filled with `value`,
  built from an array shaped like the parameter (so that under ``jax.jit``
  it is placed like the parameter);
* ``shardings(sharding)``: the sharding of every stored array, given the
  parameter's sharding;
* ``load(stored, dtype)`` / ``store(x, stored, key)``: decode for computing,
  and encode the new value with the format's rounding;
* ``average(stored, x, decay, complement, key)``: the running average
  :math:`v \leftarrow \gamma v + (1 - \gamma) x` of a buffer, returning the
  new value in float32 for this step's update and its stored form; `x` is an
  array or an `Elementwise` function of arrays, which a format may slice
  before computing it;
* ``decode(stored)``: the values for reading (diagnostics, plots);
* ``reads_back``: whether this step's update uses the stored new value
  (`for_update`) instead of the float32 value before rounding.

The formats:

* `Dense`: an array of a floating dtype shaped like the parameter (float32,
  or bfloat16/float16 with stochastic rounding, see `rmsprop_jax.lowmem`).
* `Blockwise`: ``nu`` as 8-bit (or 4-bit, two per byte) codes plus a float32
  scale per block of ``block_size`` elements (down the first axis, or along
  the last one with ``row_blocks``), a `QuantizedArray`.
* `Factored`: ``nu`` of a large matrix as Adafactor's running row and column
  means, a `FactoredArray`.

`Storage` holds the options of a transform and picks the format of each
leaf's buffers from its shape and dtype; leaves a format cannot hold (too
small, complex) get `Dense`. `format_of` reads the format back from a stored
buffer, so code that only has the state (diagnostics, `zero1`) needs no
options. Adding a format means a class with the methods above, a stored
node if it is not a plain array, and a line in `Storage.formats` and
`format_of`. The stored form of a buffer is a plain array or
a registered pytree node, so the state stays a pytree of arrays whose
structure depends only on the options and the params' shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rmsprop_jax import _checks, _random

__all__ = [
    "Blockwise",
    "Dense",
    "Elementwise",
    "Factored",
    "FactoredArray",
    "QuantizedArray",
    "Storage",
    "block_view",
    "decode",
    "dequantize",
    "factored_axes",
    "for_update",
    "format_of",
    "is_stored_node",
    "make_storage",
    "quantize",
    "state_bytes",
    "written",
]

DEFAULT_BLOCK_SIZE = 256
DEFAULT_BLOCK_SIZE_4BIT = 128
DEFAULT_FACTORED_MIN_DIM = 128
# Leaves with fewer elements keep a dense float32 nu: their state is small, and a
# block scale per few elements would cost more than it saves (bitsandbytes' rule).
MIN_QUANTIZED_SIZE = 4096


# --------------------------------------------------------------------------- stored nodes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A blockwise-quantized non-negative array (the `Blockwise` format).

    The array is viewed as ``(rows,) + trailing`` (`block_view`). Column
    blocks (the default): the rows are its first axis, or the fewest
    leading axes merged that hold a block, and a block is ``block_size``
    consecutive rows at one position of the trailing axes (the last block of
    each column may be shorter). Blocks that run down a major axis keep
    every loop of the step contiguous, the block maxima included. Row blocks
    (``row_blocks``, for embedding tables): the rows are all axes but the
    last, and a block is ``block_size`` consecutive elements of one row (the
    last block of each row may be shorter), so that no block mixes rows.
    A block stores one float32 scale and one code per element.

    Attributes:
      codes: uint8. 8 bits: one code per byte, shaped like the array. 4 bits:
        two codes per byte, rows 2i and 2i + 1 in the low and high nibbles of
        packed row i, shape ``(ceil(rows / 2),) + trailing`` (an odd last row
        is paired with zero codes).
      scale: float32, each block's scale, an upper bound of its values:
        shape ``(ceil(rows / block_size),) + trailing`` for column blocks,
        ``(rows, ceil(cols / block_size))`` for row blocks.
      shape: the shape of the array the codes stand for (static).
      block_size: elements per block (static).
      bits: bits per code, 8 or 4 (static).
      row_blocks: blocks along the last axis instead of down the rows (static).
    """

    codes: Any
    scale: Any
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(default=DEFAULT_BLOCK_SIZE, metadata=dict(static=True))
    bits: int = dataclasses.field(default=8, metadata=dict(static=True))
    row_blocks: bool = dataclasses.field(default=False, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FactoredArray:
    r"""A non-negative array stored as running row and column means (the `Factored` format).

    For an array of shape ``shape`` factored over the axes ``axes = (a, b)``
    (its two largest, a < b), ``row`` holds the means over axis b (shape
    without b) and ``col`` the means over axis a (shape without a); the
    array stands for :math:`v_{ij} = R_i C_j / \mathrm{mean}_i R_i` in every
    slice of the other axes (Adafactor's rank-1 estimate).
    """

    row: Any
    col: Any
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    axes: tuple[int, int] = dataclasses.field(metadata=dict(static=True))


def is_stored_node(x: Any) -> bool:
    """Whether `x` is the stored form of one buffer that is not a plain array."""
    return isinstance(x, (QuantizedArray, FactoredArray))


@dataclasses.dataclass(frozen=True)
class Elementwise:
    """The input of an average given as ``fn(*operands)``, an elementwise function of arrays shaped alike.

    A format that computes on slices of the input (4-bit pairs of rows)
    slices the operands and applies `fn` to the slices: XLA:CPU computes a
    strided slice of a fused elementwise value ~4x slower than the same
    function of slices of its operands.
    """

    fn: Callable[..., jax.Array]
    operands: tuple[jax.Array, ...]

    def of(self, view: Callable[[jax.Array], jax.Array]) -> jax.Array:
        """`fn` applied to ``view(operand)`` of each operand."""
        return self.fn(*(view(x) for x in self.operands))

    def twin(self) -> jax.Array:
        """The same values as ``value(self)`` for an even `fn` (a squared magnitude), by operations XLA keeps apart.

        `fn` is applied to ``max(a, -a)``, the magnitude of each real operand
        ``a``. A second consumer of the value that reads this twin gets its
        own copy of the cheap producer: XLA merges identical expressions, and
        rewrites ``abs(a) * abs(a)`` to ``a * a``, but keeps ``max(a, -a)``.
        Complex operands give the value itself.
        """
        if any(jnp.iscomplexobj(x) for x in self.operands):
            return value(self)
        return self.of(lambda a: jnp.maximum(a, -a))


def value(x: jax.Array | Elementwise) -> jax.Array:
    """The array an average input stands for."""
    return x.of(lambda a: a) if isinstance(x, Elementwise) else x


def written(stored: Any, token: jax.Array) -> Any:
    """`stored` (arrays) unchanged, as a value that XLA writes out before anything reads it.

    Reading a new buffer back through this keeps XLA from recomputing it
    from the old one in every kernel that uses it (it duplicates cheap
    elementwise producers into their consumers): the kernel that reads it
    then runs after the one that writes it, and the old buffer, overwritten
    in place, needs no copy. It is a conditional on an integer scalar
    `token` known only at run time (the step count, a random key), whose
    branches are two different identities: XLA removes a conditional whose
    branches are the same, and does not fuse across one. Either branch gives
    `stored` (the other adds a zero; only a −0.0 would become +0.0). The
    predicate reads the token as int32: ``>= 0`` of an unsigned key would
    always hold, and XLA would fold the conditional away.
    """
    predicate = jnp.asarray(token).astype(jnp.int32) >= 0
    return jax.lax.cond(predicate, lambda t: t, lambda t: jax.tree.map(lambda a: a + jnp.zeros((), a.dtype), t), stored)


def for_update(fmt: Format, value: jax.Array, stored: Any, count: jax.Array, dtype: Any) -> tuple[jax.Array, Any]:
    """``(value for this step's update, stored form)`` of a new buffer that `fmt` stored from `value`.

    The float32 `value` itself, or, where ``fmt.reads_back``, the stored
    form loaded back in `dtype` through `written`.
    """
    if not fmt.reads_back:
        return value, stored
    stored = written(stored, count)
    return fmt.load(stored, dtype), stored


# --------------------------------------------------------------------------- the block view


def _uses_row_blocks(shape: Sequence[int], row_blocks: bool) -> bool:
    """Whether row blocks are used for an array of `shape`: at least two axes and more than one row.

    An array that is one row (or a vector) has its blocks along that row in
    the column layout too, which needs no pad row for 4-bit pairs.
    """
    return bool(row_blocks) and len(shape) >= 2 and math.prod(shape[:-1]) > 1


def block_split(shape: Sequence[int], block_size: int, row_blocks: bool = False) -> int:
    """How many leading axes are merged into the view's rows (see `block_view`)."""
    if row_blocks:
        return len(shape) - 1
    k = 1
    while k < len(shape) and math.prod(shape[:k]) < block_size:
        k += 1
    return min(k, len(shape))


def block_view(shape: Sequence[int], block_size: int, row_blocks: bool = False) -> tuple[int, tuple[int, ...]]:
    """``(rows, trailing)``: the array viewed as ``(rows,) + trailing``.

    Column blocks: `rows` is the product of the fewest leading axes that
    hold a block (the first axis alone when it does), `trailing` the other
    axes, and a block is `block_size` consecutive rows at one position of
    the trailing axes (the last block of a column may be shorter). Row
    blocks (an array of at least two axes): `rows` is the product of all
    axes but the last, `trailing` the last one, and a block is `block_size`
    consecutive elements of a row (the last block of a row may be shorter).
    """
    k = block_split(shape, block_size, row_blocks)
    return math.prod(shape[:k]), tuple(shape[k:])


def _view(q: QuantizedArray) -> tuple[int, tuple[int, ...]]:
    return block_view(q.shape, q.block_size, q.row_blocks)


def _repeat(scale: jax.Array, block_size: int, rows: int) -> jax.Array:
    """Each block's scale repeated down its rows, ``(rows,) + trailing``.

    A broadcast and a slice rather than a padded ``(blocks, block_size)``
    view: XLA fuses it into the element loops, where a padded view would make
    it write out padded copies of the inputs.
    """
    wide = jnp.broadcast_to(scale[:, None], (scale.shape[0], block_size, *scale.shape[1:]))
    return wide.reshape((-1, *scale.shape[1:]))[:rows]


def _spread(scale: jax.Array, block_size: int, row_blocks: bool, view_shape: Sequence[int]) -> jax.Array:
    """Each block's scale over its elements of the view `view_shape` (a broadcast, as in `_repeat`)."""
    if not row_blocks:
        return _repeat(scale, block_size, view_shape[0])
    wide = jnp.broadcast_to(scale[:, :, None], (*scale.shape, block_size))
    return wide.reshape((scale.shape[0], -1))[:, : view_shape[-1]]


# Halvings that XLA:CPU fuses with their producer (the squared gradient) into one kernel.
_FUSED_HALVINGS = 3


def tree_reduce(
    x: jax.Array, axis: int, combine: Callable, reduce: Callable, stop: int = 16, token: jax.Array | None = None
) -> jax.Array:
    """Reduces `axis` by combining its halves elementwise while it is even and longer than `stop`, then `reduce`.

    XLA:CPU (jaxlib 0.10) sends a plain reduction over a major axis to a
    library kernel that runs several times slower than the memory traffic,
    while each halving is an elementwise loop. XLA fuses the halvings from
    the last one up, about four to a kernel, and where the rest no longer
    fits with their producer it writes the producer out (the squared
    gradient, 4 bytes per parameter). With a run-time `token`, the value
    after the first `_FUSED_HALVINGS` halvings goes through `written`
    instead: one kernel reads `x` and writes an eighth of it, and the
    remaining halvings read that.
    """
    axis = axis % x.ndim
    level = 0
    while x.shape[axis] > stop and x.shape[axis] % 2 == 0:
        if level == _FUSED_HALVINGS and token is not None:
            x = written(x, token)
        half = x.shape[axis] // 2
        x = combine(jax.lax.slice_in_dim(x, 0, half, axis=axis), jax.lax.slice_in_dim(x, half, 2 * half, axis=axis))
        level += 1
    return reduce(x, axis=axis)


def _block_maxima(
    x: jax.Array | Elementwise, block_size: int, row_blocks: bool = False, token: jax.Array | None = None
) -> jax.Array:
    """The maximum of each block of the view `x` (NaN if a block holds one), shaped like the scales.

    `x` is the view or an `Elementwise` function of arrays shaped like it,
    whose operands are sliced rather than the fused value (see
    `Elementwise`). Column blocks run down a major axis, so every step of
    the reduction is an elementwise maximum of contiguous rows: ~3x faster
    on XLA:CPU than row blocks, whose maxima reduce within each vector. The
    whole blocks halve down to single rows, with the `token` of `tree_reduce`:
    the library reduction that a shorter tree ends in reads the partial
    maxima ~3x slower than halvings do.
    """
    axis = 1 if row_blocks else 0
    shape = x.operands[0].shape if isinstance(x, Elementwise) else x.shape
    n = shape[axis]
    whole = n // block_size

    def rows(start: int, stop: int) -> jax.Array:
        cut = functools.partial(jax.lax.slice_in_dim, start_index=start, limit_index=stop, axis=axis)
        return x.of(cut).astype(jnp.float32) if isinstance(x, Elementwise) else cut(x)

    parts = []
    if whole:
        blocks = rows(0, whole * block_size).reshape((*shape[:axis], whole, block_size, *shape[axis + 1 :]))
        parts.append(tree_reduce(blocks, axis + 1, jnp.maximum, jnp.max, stop=1, token=token))
    if whole * block_size < n:  # the shorter last block: the whole row when rows are shorter than a block
        rest = tree_reduce(rows(whole * block_size, n), axis, jnp.maximum, jnp.max, stop=1, token=token)
        parts.append(jnp.expand_dims(rest, axis))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _inverse(scale: jax.Array) -> jax.Array:
    """1 / scale, 0 where the scale is 0 (an all-zero block) or NaN.

    The division is the last operation so that XLA writes the (small) result
    out instead of fusing a select into the element loops: there, a select
    before the reshape into pairs of rows made the 4-bit state kernel compute
    indices per element, 4x slower.
    """
    return 1 / jnp.where(scale > 0, scale, jnp.inf)


# --------------------------------------------------------------------------- the code maps

# 8-bit codes are a small float format below the block scale s. Code c stands for the float32
# ratio v/s whose bits are those of 1.0 minus (255 - c) steps: 32 codes per binade (5 mantissa
# bits) over the top FINE_BINADES = 4 binades (codes 255 down to 128 = 1/16), then 8 codes per
# binade (3 mantissa bits) down to code 1 ≈ 1.2e-6; code 0 is 0. The codes are the top bits of
# the float32 ratio, so encoding and decoding are integer operations; the finer top keeps the
# values near the block maximum (where most lie) within 1.6-3.1 % steps. 4-bit codes are the
# same kind of float with no mantissa bits: code c stands for s·2^(c - 15), one code per binade
# down to code 1 = 2^-14 ≈ 6.1e-5 (4.2 decades), code 0 for 0.
CODES = 255
FINE_BINADES, FINE_BITS, COARSE_BITS = 4, 5, 3
# (levels, fine_binades, fine_bits, coarse_bits) of the float map of each code width.
_FLOAT_MAPS = {8: (CODES, FINE_BINADES, FINE_BITS, COARSE_BITS), 4: (15, 15, 0, 0)}
_ONE_BITS = 0x3F800000  # the bits of float32 1.0


def _levels(bits: int) -> int:
    return (1 << bits) - 1


def _float_segments(levels: int, fine_binades: int, fine_bits: int, coarse_bits: int) -> tuple[int, int, int, int]:
    """``(lowest fine code, ratio bits where the fine codes end, fine offset, coarse offset)`` of a float map.

    Code c of a segment whose codes are `shift` ratio bits apart stands for
    the ratio whose bits are ``offset + (c << shift)``.
    """
    split_code, split_bits = levels - (fine_binades << fine_bits), _ONE_BITS - (fine_binades << 23)
    fine = _ONE_BITS - (levels << (23 - fine_bits))
    coarse = split_bits - (split_code << (23 - coarse_bits))
    return split_code, split_bits, fine, coarse


def _segment(
    fine: jax.Array, fine_offset: int, coarse_offset: int, fine_bits: int, coarse_bits: int
) -> tuple[jax.Array, jax.Array]:
    """``(offset, shift)`` of each element's segment (see `_float_segments`).

    The segment picks two constants and the arithmetic is shared: cheaper
    than computing both segments' results and selecting one.
    """
    offset = jnp.where(fine, jnp.int32(fine_offset), jnp.int32(coarse_offset))
    shift = jnp.where(fine, jnp.int32(23 - fine_bits), jnp.int32(23 - coarse_bits))
    return offset, shift


def float_value(
    code: jax.Array,
    levels: int = CODES,
    fine_binades: int = FINE_BINADES,
    fine_bits: int = FINE_BITS,
    coarse_bits: int = COARSE_BITS,
) -> jax.Array:
    """The ratio v/s of float codes, in float32.

    Code `levels` is 1.0; each code below steps down by one unit of a float
    with `fine_bits` mantissa bits over the top `fine_binades` binades, and
    of one with `coarse_bits` under them; code 0 is 0.
    """
    c = code.astype(jnp.int32)
    split_code, _, fine_offset, coarse_offset = _float_segments(levels, fine_binades, fine_bits, coarse_bits)
    offset, shift = _segment(c >= split_code, fine_offset, coarse_offset, fine_bits, coarse_bits)
    ratio = jax.lax.bitcast_convert_type(offset + (c << shift), jnp.float32)
    return jnp.where(c > 0, ratio, 0.0)


def float_codes(
    r: jax.Array,
    bits: jax.Array | None,
    levels: int = CODES,
    fine_binades: int = FINE_BINADES,
    fine_bits: int = FINE_BITS,
    coarse_bits: int = COARSE_BITS,
) -> jax.Array:
    """Float codes (see `float_value`) of ratios `r` >= 0: nearest in value, or stochastic given uint32 `bits`.

    Between two neighbouring codes the values step linearly, so adding
    (random, or half a step of) bits below the kept ones and truncating
    rounds up with probability proportional to the distance: unbiased in
    value. A non-zero ratio under the lowest code is stored as code 1 (never
    as 0: 1/√0 is a huge step); ratios above 1 and NaN are stored as the top
    code (a NaN's block scale is NaN too).
    """
    _, split_bits, fine_offset, coarse_offset = _float_segments(levels, fine_binades, fine_bits, coarse_bits)
    x = jax.lax.bitcast_convert_type(r, jnp.int32)
    offset, shift = _segment(x >= split_bits, fine_offset, coarse_offset, fine_bits, coarse_bits)
    # Half a step, or the top `shift` random bits.
    below = jnp.int32(1) << (shift - 1) if bits is None else (bits >> (32 - shift).astype(jnp.uint32)).astype(jnp.int32)
    code = (x - offset + below) >> shift
    return jnp.clip(code, jnp.where(r > 0, 1, 0), levels).astype(jnp.uint8)


def _code_value(code: jax.Array, code_bits: int) -> jax.Array:
    """The ratio v/s of codes of the format's float map (`_FLOAT_MAPS`)."""
    return float_value(code, *_FLOAT_MAPS[code_bits])


def _encode(x: jax.Array, inverse: jax.Array, bits: jax.Array | None, code_bits: int) -> jax.Array:
    """Codes of non-negative `x` given 1/scale repeated over its elements (`inverse`), elementwise.

    Both callers pass values >= 0 (`quantize` clamps its input, an average of
    squares cannot be negative), and both maps clip ratios above 1 to the top
    code, so the ratio needs neither a clamp nor a select here (two operations
    per element fewer).
    """
    r = x * inverse
    return float_codes(r, bits, *_FLOAT_MAPS[code_bits])


# --------------------------------------------------------------------------- 4-bit pairs of rows


def _paired(x: jax.Array, k: int) -> jax.Array:
    """Rows k, k + 2, k + 4, ... of `x` (an odd count padded with a zero row).

    Row 2i of a 4-bit array sits in the low nibbles of packed row i and row
    2i + 1 in the high ones. Pairing rows (not neighbouring elements of a
    row) keeps every loop over a row contiguous, so packing and unpacking
    vectorize; both rows of a pair lie in one block (blocks hold an even
    number of rows) for column blocks.
    """
    rows = x[k::2]  # a strided slice maps indices affinely; a reshape into pairs would divide per element
    if rows.shape[0] < -(-x.shape[0] // 2):
        rows = jnp.pad(rows, [(0, 1)] + [(0, 0)] * (x.ndim - 1))
    return rows


def _pair_scale(scale: jax.Array, block_size: int, row_blocks: bool, k: int, packed_shape: Sequence[int]) -> jax.Array:
    """The scale of each element of rows k, k + 2, ... (shaped like the packed codes).

    With column blocks packed row i lies in block i // (block_size / 2) for
    both sets; with row blocks row 2i + k has scales of its own.
    """
    if row_blocks:
        return _spread(_paired(scale, k), block_size, True, packed_shape)
    return _repeat(scale, block_size // 2, packed_shape[0])


def _encode_pairs(
    rows_of_pair: Callable[[int], jax.Array],
    inverse: jax.Array,
    block_size: int,
    row_blocks: bool,
    bits_of_pair: Callable[[int], jax.Array | None],
) -> jax.Array:
    """Packed 4-bit codes of the rows ``rows_of_pair(k)`` (rows k, k + 2, ... of the values), k = 0 and 1.

    Each set of rows comes with its own random bits. Computing the two sets
    from arrays reshaped into pairs would cost index arithmetic per element.
    """

    def codes(k: int) -> jax.Array:
        rows = rows_of_pair(k)
        return _encode(rows, _pair_scale(inverse, block_size, row_blocks, k, rows.shape), bits_of_pair(k), 4)

    return codes(0) | (codes(1) << 4)


def _codes(q: QuantizedArray) -> jax.Array:
    """The codes of `q` in its block view ``(rows,) + trailing``, one per element."""
    rows, trailing = _view(q)
    if q.bits == 8:
        return q.codes.reshape((rows, *trailing))
    packed = q.codes.astype(jnp.int32)
    both = jnp.broadcast_to(packed[:, None], (packed.shape[0], 2, *packed.shape[1:]))
    shift = jax.lax.broadcasted_iota(jnp.int32, both.shape, 1) * 4  # the same for a whole row
    return ((both >> shift) & 15).reshape((-1, *packed.shape[1:]))[:rows]


def _decode_view(q: QuantizedArray) -> jax.Array:
    """The float32 values of `q` in its block view ``(rows,) + trailing``."""
    rows, trailing = _view(q)
    return _spread(q.scale, q.block_size, q.row_blocks, (rows, *trailing)) * _code_value(_codes(q), q.bits)


def _store(
    x: jax.Array, scale: jax.Array, block_size: int, row_blocks: bool, code_bits: int, bits: jax.Array | None
) -> jax.Array:
    """The stored codes of `x` (the block view) given the new block scales and random `bits` shaped like `x`."""
    inverse = _inverse(scale)
    if code_bits == 8:
        return _encode(x, _spread(inverse, block_size, row_blocks, x.shape), bits, 8)
    return _encode_pairs(
        lambda k: _paired(x, k), inverse, block_size, row_blocks, lambda k: None if bits is None else _paired(bits, k)
    )


def _check_block(block_size: int, code_bits: int) -> None:
    if code_bits == 4 and block_size % 2:
        raise ValueError(f"4-bit codes pack pairs of rows within a block: block_size must be even, got {block_size}.")


def quantize(
    v: jax.Array,
    block_size: int = DEFAULT_BLOCK_SIZE,
    bits: jax.Array | None = None,
    *,
    code_bits: int = 8,
    row_blocks: bool = False,
) -> QuantizedArray:
    """Quantizes non-negative `v` to 8-bit (or 4-bit) codes per block of `block_size` elements.

    The scale of each block is its maximum, stored as the top code. Each value
    is rounded between its two neighbouring codes in value (not in code): to
    the nearer one, or, given random `bits`, up with probability
    (v − q_c) / (q_(c+1) − q_c), which makes the result unbiased.

    Args:
      v: float32 values >= 0 (negative values are treated as 0).
      block_size: elements per block.
      bits: uint32 random bits shaped like ``v`` in its block view (see
        `block_view`) for stochastic rounding; None rounds to the nearest
        code.
      code_bits: 8, or 4 for two codes per byte.
      row_blocks: blocks along the last axis (within rows) instead of down
        the first (see `QuantizedArray`); ignored for vectors and single
        rows, whose column blocks already run along the row.

    Returns:
      A `QuantizedArray`. Every non-zero value gets a non-zero code.

    Example:
      >>> import jax.numpy as jnp
      >>> q = quantize(jnp.array([4.0, 1.0, 0.1, 1e-20, 0.0]), block_size=8)
      >>> q.codes, q.scale
      (Array([255, 191, 116,   1,   0], dtype=uint8), Array([4.], dtype=float32))
      >>> dequantize(q)  # 1 = 4·2^-2 is a code; 0.1 rounds to 4·2^-6·13/8; 1e-20 rounds up to code 1
      Array([4.0000000e+00, 1.0000000e+00, 1.0156250e-01, 4.7683716e-06,
             0.0000000e+00], dtype=float32)
    """
    shape = tuple(np.shape(v))
    _check_block(block_size, code_bits)
    row_blocks = _uses_row_blocks(shape, row_blocks)
    rows, trailing = block_view(shape, block_size, row_blocks)
    x = jnp.asarray(v, jnp.float32).reshape((rows, *trailing))
    x = jnp.where(x <= 0, 0, x)
    scale = _block_maxima(x, block_size, row_blocks)
    codes = _store(x, scale, block_size, row_blocks, code_bits, bits)
    codes = codes.reshape(shape) if code_bits == 8 else codes
    return QuantizedArray(codes, scale, shape, block_size, code_bits, row_blocks)


def dequantize(q: QuantizedArray, shape: Sequence[int] | None = None) -> jax.Array:
    """The float32 values of `q`, shaped like the array it stands for.

    Args:
      q: the quantized array.
      shape: optional; if given it must equal ``q.shape``.
    """
    if shape is not None and tuple(shape) != q.shape:
        raise ValueError(f"the quantized array has shape {q.shape}, not {tuple(shape)}.")
    return _decode_view(q).reshape(q.shape)


# --------------------------------------------------------------------------- formats


def _low_precision(dtype: Any) -> bool:
    """A real floating dtype narrower than float32 (bfloat16, float16, float8...)."""
    dtype = jnp.dtype(dtype)
    return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


def filled_like(p: jax.Array, value: Any, dtype: Any) -> jax.Array:
    """An array of `value` shaped like `p` that is placed (sharded) like `p`.

    A broadcast constant carries no placement, so under ``jax.jit`` sharding
    propagation would leave it on one device or replicate it. Deriving it from
    `p` makes every element depend on the matching element of `p`, so the
    state lands exactly where its parameter is; the select keeps the result
    exact when `p` holds inf or NaN (where ``p * 0`` is NaN).
    """
    p = jnp.asarray(p)
    # |p| * 0 is +0.0 (p * 0 would be -0.0 for negative p) and real also for complex p.
    zero = jnp.where(jnp.isfinite(p), jnp.abs(p) * 0, 0)
    return zero.astype(dtype) + jnp.asarray(value, dtype)


def _axis_size(mesh: Any, entry: Any) -> int:
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    sizes = dict(mesh.shape)
    return math.prod(sizes[name] for name in names)


@dataclasses.dataclass(frozen=True)
class Dense:
    """A buffer stored as an array of `dtype` shaped like its parameter.

    Below float32 precision the new value is rounded stochastically when
    `stochastic` (unbiased: a decay close to 1 still forgets), else to nearest.
    """

    dtype: Any
    stochastic: bool = True

    @property
    def rounds_stochastically(self) -> bool:
        return self.stochastic and _low_precision(self.dtype)

    @property
    def reads_back(self) -> bool:
        """True for bfloat16: the update reads the written buffer (see `written`).

        Computing the update from the float32 value means recomputing it from
        the old buffer next to the params, while another kernel overwrites
        that buffer in place; XLA then copies the old buffer first (2 bytes
        per param for bfloat16, and a state-sized temporary).

        Only for dtypes with float32's exponent range. float16 underflows
        below 6e-8, where (1 − γ)·g² of small gradients lies: its stored `v`
        can be 0, and a step that read it back would divide by ε alone. So
        float16 state keeps the copy and steps with the float32 value.
        """
        return _low_precision(self.dtype) and jnp.finfo(self.dtype).minexp <= jnp.finfo(jnp.float32).minexp

    def init(self, like: jax.Array, value: Any) -> jax.Array:
        return filled_like(like, value, self.dtype)

    def shardings(self, shape: Sequence[int], sharding: Any) -> Any:
        """The parameter's own sharding."""
        del shape
        return sharding

    def param_sharding(self, sharding: Any) -> Any:
        """The parameter's sharding, given the buffer's (the same)."""
        return sharding

    def load(self, stored: jax.Array, dtype: Any) -> jax.Array:
        return stored.astype(dtype)

    def store(self, x: jax.Array, stored: Any, key: jax.Array) -> jax.Array:
        if not self.rounds_stochastically:
            return x.astype(self.dtype)
        return _random.stochastic_round(x, self.dtype, _random.random_bits(x.shape, key))

    def average(
        self, stored: jax.Array, x: jax.Array | Elementwise, decay: jax.Array, complement: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        x = value(x)
        v = decay * self.load(stored, x.dtype) + complement * x
        return v, self.store(v, stored, key)

    def decode(self, stored: jax.Array) -> jax.Array:
        return jnp.asarray(stored)


@dataclasses.dataclass(frozen=True)
class Blockwise:
    r"""A non-negative buffer as 8-bit (or 4-bit) codes with a float32 scale per block (see `QuantizedArray`).

    8-bit code c of a block with scale s stands for s times a small float
    (`float_value`: 32 codes per binade over the top four binades, 8 per
    binade below, down to :math:`1.2\cdot 10^{-6} s`); 4-bit code c for
    :math:`s\,2^{c-15}` (one code per binade, down to
    :math:`6.1\cdot 10^{-5} s`). The new scale after an average is the bound
    :math:`\gamma s + (1-\gamma)\max x` of the block's new maximum, which
    needs only the new inputs `x` (computing the exact maximum of the new
    values would make XLA write them out in float32 first). Codes are drawn
    with stochastic rounding between the two neighbouring codes when
    `stochastic`, else to the nearest. `row_blocks` lays the blocks along
    the last axis (see `QuantizedArray`).
    """

    block_size: int = DEFAULT_BLOCK_SIZE
    stochastic: bool = True
    bits: int = 8
    row_blocks: bool = False

    def _quantized(self, codes: Any, scale: Any, shape: tuple[int, ...]) -> QuantizedArray:
        return QuantizedArray(codes, scale, shape, self.block_size, self.bits, self.row_blocks)

    def init(self, like: jax.Array, value: Any) -> QuantizedArray:
        shape = tuple(like.shape)
        rows, trailing = block_view(shape, self.block_size, self.row_blocks)
        zeros = filled_like(like, 0, jnp.float32).reshape((rows, *trailing))
        top = (zeros + jnp.where(jnp.asarray(value) > 0, _levels(self.bits), 0)).astype(jnp.uint8)
        codes = top.reshape(shape) if self.bits == 8 else _paired(top, 0) | (_paired(top, 1) << 4)
        # One element per block: a slice, not the block maxima, which XLA would constant-fold for
        # seconds on constant params.
        corners = zeros[:, :: self.block_size] if self.row_blocks else zeros[:: self.block_size]
        return self._quantized(codes, corners + jnp.asarray(value, jnp.float32), shape)

    def shardings(self, shape: Sequence[int], sharding: Any) -> QuantizedArray:
        """8-bit codes are laid out like the parameter; 4-bit codes and the scales like it where blocks allow.

        Along the view's rows, column-block scales follow the parameter's
        first axis only when every shard holds whole blocks, and packed 4-bit
        codes only when every shard holds whole pairs of rows; otherwise they
        are replicated along it. Merged leading axes are laid out like the
        first one when the others are not sharded. Row-block scales follow
        the last axis only when every shard of it holds whole blocks.
        """
        shape = tuple(shape)
        if not isinstance(sharding, NamedSharding):
            return self._quantized(sharding, sharding, shape)
        spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
        k = block_split(shape, self.block_size, self.row_blocks)
        rows = math.prod(shape[:k])

        def whole(entry: Any, axis: int, count: int, multiple: int) -> Any:
            """`entry` (of `axis`) if every shard of the `count` elements along it holds a multiple of `multiple`."""
            if entry is None or entry is PartitionSpec.UNCONSTRAINED:
                return None
            size = _axis_size(sharding.mesh, entry)
            return entry if shape[axis] % size == 0 and (count // size) % multiple == 0 else None

        first = spec[0] if spec and all(e is None for e in spec[1:k]) else None

        def on(*entries: Any) -> NamedSharding:
            return NamedSharding(sharding.mesh, PartitionSpec(*entries), memory_kind=sharding.memory_kind)

        codes = sharding if self.bits == 8 else on(whole(first, 0, rows, 2), *spec[k:])
        if self.row_blocks:
            last = len(shape) - 1
            scale = on(whole(first, 0, rows, 1), whole(spec[last], last, shape[last], self.block_size))
        else:
            scale = on(whole(first, 0, rows, self.block_size), *spec[k:])
        return self._quantized(codes, scale, shape)

    def param_sharding(self, shardings: QuantizedArray) -> Any:
        """The parameter's layout, as the codes' shardings show it."""
        codes = shardings.codes
        if self.bits == 8 or not isinstance(codes, NamedSharding):
            return codes
        shape = shardings.shape
        k = block_split(shape, self.block_size, self.row_blocks)
        spec = list(codes.spec) + [None] * (len(shape) - k + 1 - len(codes.spec))
        entries = [spec[0], *([None] * (k - 1)), *spec[1:]]
        return NamedSharding(codes.mesh, PartitionSpec(*entries), memory_kind=codes.memory_kind)

    def load(self, stored: QuantizedArray, dtype: Any) -> jax.Array:
        return self.decode(stored).astype(dtype)

    def average(
        self,
        stored: QuantizedArray,
        x: jax.Array | Elementwise,
        decay: jax.Array,
        complement: jax.Array,
        key: jax.Array,
    ) -> tuple[jax.Array, QuantizedArray]:
        rows, trailing = _view(stored)

        def view(a: jax.Array) -> jax.Array:
            return a.reshape((rows, *trailing))

        x_view = view(value(x).astype(jnp.float32))
        v = decay * _decode_view(stored) + complement * x_view
        viewed = Elementwise(x.fn, tuple(view(a) for a in x.operands)) if isinstance(x, Elementwise) else x_view
        maxima = _block_maxima(viewed, self.block_size, self.row_blocks, key)
        scale = decay * stored.scale + complement * maxima
        if self.bits == 8:
            bits = _random.random_bits(v.shape, key) if self.stochastic else None
            codes = _store(v, scale, self.block_size, self.row_blocks, 8, bits).reshape(stored.shape)
        else:
            old = stored.codes.astype(jnp.int32)

            def v_of_pair(k: int) -> jax.Array:
                # Each set of rows recomputes its v from its own nibbles and slices of g (see Elementwise).
                old_scale = _pair_scale(stored.scale, self.block_size, self.row_blocks, k, old.shape)
                old_k = old_scale * _code_value((old >> (4 * k)) & 15, 4)
                x_k = viewed.of(lambda a: _paired(a, k)) if isinstance(viewed, Elementwise) else _paired(x_view, k)
                return decay * old_k + complement * x_k.astype(jnp.float32)

            # One hash per byte, its halves for the two sets of rows: half the hashing of one per element.
            halves = _random.split_halves(_random.random_bits(stored.codes.shape, key)) if self.stochastic else None

            def bits_of_pair(k: int) -> jax.Array | None:
                return None if halves is None else halves[k]

            codes = _encode_pairs(v_of_pair, _inverse(scale), self.block_size, self.row_blocks, bits_of_pair)
        return v.reshape(stored.shape), self._quantized(codes, scale, stored.shape)

    def decode(self, stored: QuantizedArray) -> jax.Array:
        return dequantize(stored)

    @property
    def reads_back(self) -> bool:
        """True for 8-bit codes: the update reads the stored codes back (see `written`).

        Computing the update from the float32 value means decoding the old
        codes next to the params while another kernel overwrites them in
        place, so XLA copies them first (1 byte per param and a temporary).
        8-bit codes are within 1.6-3.1 % of the value near the block maximum
        (6-12.5 % far below it), which moves a step by half that. 4-bit codes
        are a factor of 2 apart, and keep the float32 value.
        """
        return self.bits == 8


# Adafactor's ε₁, added to the squared gradient before the row and column means so
# that an all-zero row cannot make the estimate 0/0.
FACTORED_EPS = 1e-30


def factored_axes(shape: Sequence[int], min_dim: int) -> tuple[int, int] | None:
    """The two largest axes (in axis order) when both have at least `min_dim` elements, else None.

    Ties go to the later axes, as in ``optax.scale_by_factored_rms``.
    """
    if len(shape) < 2:
        return None
    order = np.argsort(np.asarray(shape), kind="stable")
    a, b = sorted(int(i) for i in order[-2:])
    return (a, b) if min(shape[a], shape[b]) >= min_dim else None


@dataclasses.dataclass(frozen=True)
class Factored:
    r"""A non-negative buffer as Adafactor's row and column means (a `FactoredArray`).

    The average runs on the means: :math:`R \leftarrow \gamma R + (1-\gamma)
    \mathrm{mean}_j(x_{ij} + \epsilon_1)`, :math:`C \leftarrow \gamma C +
    (1-\gamma) \mathrm{mean}_i(x_{ij} + \epsilon_1)`, and the buffer stands for
    :math:`\hat v_{ij} = R_i C_j / \mathrm{mean}_i R_i` (0 where the means
    are 0). For a rank-1 input (:math:`x_{ij} = r_i c_j`) the estimate is
    exact; in general it is the rank-1 fit that Shazeer and Stern (2018)
    derive. Memory: n + m floats for an n × m leaf.
    """

    axes: tuple[int, int]

    def _reconstruct(self, row: jax.Array, col: jax.Array) -> jax.Array:
        a, b = self.axes
        mean = jnp.mean(row, axis=a, keepdims=True)  # row has no axis b, so a is still a
        r = jnp.expand_dims(row, b)
        c = jnp.expand_dims(col, a)
        m = jnp.expand_dims(mean, b)
        safe = jnp.where(m > 0, m, 1)
        return jnp.where(m > 0, (r * c) / safe, 0)

    def init(self, like: jax.Array, value: Any) -> FactoredArray:
        a, b = self.axes
        zeros = filled_like(like, 0, jnp.float32)
        # Means of a constant are the constant; derived from `like` so they are placed like it, by a
        # slice rather than a reduction, which XLA would constant-fold for seconds on constant params.
        row = jax.lax.index_in_dim(zeros, 0, b, keepdims=False) + jnp.asarray(value, jnp.float32)
        col = jax.lax.index_in_dim(zeros, 0, a, keepdims=False) + jnp.asarray(value, jnp.float32)
        return FactoredArray(row, col, tuple(like.shape), self.axes)

    def shardings(self, shape: Sequence[int], sharding: Any) -> FactoredArray:
        """The means keep the parameter's layout on the axes they keep."""
        shape = tuple(shape)
        if not isinstance(sharding, NamedSharding):
            return FactoredArray(sharding, sharding, shape, self.axes)
        spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
        a, b = self.axes

        def without(axis: int) -> NamedSharding:
            kept = PartitionSpec(*(e for i, e in enumerate(spec) if i != axis))
            return NamedSharding(sharding.mesh, kept, memory_kind=sharding.memory_kind)

        return FactoredArray(without(b), without(a), shape, self.axes)

    def param_sharding(self, shardings: FactoredArray) -> Any:
        """The parameter's layout as the means' shardings show it."""
        row, col = shardings.row, shardings.col
        if not isinstance(row, NamedSharding) or not isinstance(col, NamedSharding):
            return row
        b = self.axes[1]
        ndim = len(shardings.shape)
        row_spec = list(row.spec) + [None] * (ndim - 1 - len(row.spec))
        col_spec = list(col.spec) + [None] * (ndim - 1 - len(col.spec))
        spec = [*row_spec[:b], col_spec[b - 1], *row_spec[b:]]  # col has no axis a < b
        return NamedSharding(row.mesh, PartitionSpec(*spec), memory_kind=row.memory_kind)

    def load(self, stored: FactoredArray, dtype: Any) -> jax.Array:
        return self.decode(stored).astype(dtype)

    def average(
        self, stored: FactoredArray, x: jax.Array | Elementwise, decay: jax.Array, complement: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, FactoredArray]:
        a, b = self.axes
        squares = value(x).astype(jnp.float32)
        shape = squares.shape
        eps = jnp.float32(FACTORED_EPS)  # mean(x + ε₁) = mean(x) + ε₁, added once per mean
        # Sums over axis b (the last one of a matrix) are a plain reduction, which the library kernel
        # fuses with its producer only when the producer has no other consumer, hence a twin of the
        # squares. Axis a, a major one, reduces by halving contiguous rows (see `tree_reduce`).
        twin = x.twin() if isinstance(x, Elementwise) else squares
        row = decay * stored.row + complement * (jnp.sum(twin.astype(jnp.float32), axis=b) / shape[b] + eps)
        # The random key is only a run-time token here (see `written`): float32 means need no rounding.
        col_sums = tree_reduce(squares, a, jnp.add, jnp.sum, token=key)
        col = decay * stored.col + complement * (col_sums / shape[a] + eps)
        return self._reconstruct(row, col), FactoredArray(row, col, stored.shape, self.axes)

    def decode(self, stored: FactoredArray) -> jax.Array:
        return self._reconstruct(stored.row, stored.col)

    # The factors are small, and the update already computes the new ones.
    reads_back = False


Format = Dense | Blockwise | Factored


# --------------------------------------------------------------------------- choosing formats per leaf


def state_dtypes(
    param_dtype: Any, nu_dtype: jnp.dtype | None, split_complex: bool = False
) -> tuple[jnp.dtype, jnp.dtype]:
    """The dtypes of (nu, mu and momentum) for one leaf.

    By default the state follows the params, except that half-precision params
    get float32 state: in bfloat16 ``0.999 * v`` rounds back to ``v`` and the
    average would never forget. Complex params keep a real ``nu`` (it holds
    |g|^2) and complex ``mu``/momentum; with `split_complex`, ``nu`` is complex
    too, holding the average of re(g)^2 in its real part and of im(g)^2 in
    its imaginary part.
    """
    param_dtype = jnp.dtype(param_dtype)
    real = jnp.finfo(param_dtype).dtype
    if nu_dtype is None:
        nu_dtype = jnp.dtype(jnp.float32) if real.itemsize < 4 else real
    if jnp.issubdtype(param_dtype, jnp.complexfloating):
        complex_dtype = jnp.result_type(nu_dtype, jnp.complex64)
        return (complex_dtype if split_complex else nu_dtype), complex_dtype
    return nu_dtype, nu_dtype


@dataclasses.dataclass(frozen=True)
class Storage:
    """The storage options of one transform; picks the formats of each leaf's buffers.

    Attributes:
      nu_dtype: the state dtype (None: follow the params, float32 for half precision).
      split_complex: complex params keep a complex ``nu`` (see `state_dtypes`).
      state_bits: None, or 8 or 4 for a `Blockwise` ``nu`` on large real leaves.
      block_size: elements per block of the quantized ``nu``.
      stochastic: round state stored below float32 precision stochastically.
      factored: a `Factored` ``nu`` for real leaves whose two largest axes
        both have at least `factored_min_dim` elements (before quantizing).
      factored_min_dim: see `factored`.
      row_blocks: None, a bool for every leaf, or a tree of bools shaped
        like the params (or a function of the params returning one):
        quantized leaves where it is True get row blocks (see
        `QuantizedArray`).
    """

    nu_dtype: Any = None
    split_complex: bool = False
    state_bits: int | None = None
    block_size: int = DEFAULT_BLOCK_SIZE
    stochastic: bool = True
    factored: bool = False
    factored_min_dim: int = DEFAULT_FACTORED_MIN_DIM
    row_blocks: Any = None

    def formats(self, shape: Sequence[int], param_dtype: Any, row_blocks: bool = False) -> tuple[Format, Dense]:
        """``(format of nu, format of mu and momentum)`` for a leaf of this shape and dtype."""
        d_nu, d_signed = state_dtypes(param_dtype, self.nu_dtype, self.split_complex)
        signed = Dense(d_signed, self.stochastic)
        real = jnp.issubdtype(jnp.dtype(d_nu), jnp.floating)
        axes = factored_axes(shape, self.factored_min_dim) if self.factored and real else None
        if axes is not None:
            return Factored(axes), signed
        if self.state_bits is not None and self.quantizes(shape, d_nu):
            rows = _uses_row_blocks(shape, row_blocks)
            return Blockwise(self.block_size, self.stochastic, self.state_bits, rows), signed
        return Dense(d_nu, self.stochastic), signed

    def leaf_formats(self, leaves: list[Any], treedef: jax.tree_util.PyTreeDef) -> list[tuple[Format, Dense]]:
        """`formats` of every leaf of the params ``treedef.unflatten(leaves)`` (arrays or shape structs)."""
        if self.row_blocks is None or isinstance(self.row_blocks, bool):
            rows = [bool(self.row_blocks)] * len(leaves)
        else:
            rows = _checks.mask_leaves(self.row_blocks, jax.tree.unflatten(treedef, leaves), treedef, "row_blocks")
        return [self.formats(p.shape, p.dtype, r) for p, r in zip(leaves, rows, strict=True)]

    def stored_formats(self, nu: Any, mu: Any = None) -> tuple[Format, Dense | None]:
        """The formats of a leaf's stored ``nu`` and ``mu`` (or momentum), read from what is stored."""
        return format_of(nu, self.stochastic), None if mu is None else Dense(mu.dtype, self.stochastic)

    def quantizes(self, shape: Sequence[int], dtype: Any) -> bool:
        return (
            self.state_bits is not None
            and math.prod(shape) >= max(MIN_QUANTIZED_SIZE, self.block_size)
            and jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
        )


def format_of(stored: Any, stochastic: bool = True) -> Format:
    """The format a stored buffer (array or stored node) was written in."""
    if isinstance(stored, QuantizedArray):
        return Blockwise(stored.block_size, stochastic, stored.bits, stored.row_blocks)
    if isinstance(stored, FactoredArray):
        return Factored(stored.axes)
    return Dense(stored.dtype, stochastic)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def make_storage(
    nu_dtype: jnp.dtype | None,
    split_complex: bool,
    state_bits: Any,
    block_size: Any,
    stochastic_rounding: Any,
    factored: Any = False,
    factored_min_dim: Any = None,
    row_blocks: Any = None,
) -> Storage:
    """Validates the storage options of `rmsprop` / `scale_by_rms`.

    Args:
      nu_dtype: the resolved state dtype (None: follow the params).
      split_complex: see `state_dtypes`.
      state_bits: None, or 8 or 4 for the blockwise-quantized ``nu``.
      block_size: elements per quantization block (needs ``state_bits``);
        None means 256 for 8 bits and 128 for 4.
      stochastic_rounding: None (on whenever state is stored below float32
        precision), True or False.
      factored: True for a factored ``nu`` on large matrices.
      factored_min_dim: the smallest size of both factored axes (needs
        ``factored``); None means 128.
      row_blocks: None, or a mask of the leaves whose quantized ``nu`` gets
        row blocks (needs ``state_bits``).
    """
    if state_bits is not None and (isinstance(state_bits, bool) or state_bits not in (4, 8)):
        raise ValueError(f"state_bits must be None, 8 or 4, got {state_bits!r}.")
    if block_size is not None:
        if state_bits is None:
            raise ValueError("block_size applies to the quantized state: pass state_bits=8 or 4 with it.")
        _check_positive_int("block_size", block_size)
        _check_block(block_size, state_bits)
    if stochastic_rounding is not None and not isinstance(stochastic_rounding, (bool, np.bool_)):
        raise ValueError(f"stochastic_rounding must be None, True or False, got {stochastic_rounding!r}.")
    if not isinstance(factored, (bool, np.bool_)):
        raise ValueError(f"factored must be True or False, got {factored!r}.")
    if factored_min_dim is not None:
        if not factored:
            raise ValueError("factored_min_dim applies to the factored state: pass factored=True with it.")
        _check_positive_int("factored_min_dim", factored_min_dim)
    if row_blocks is not None and state_bits is None:
        raise ValueError("row_blocks applies to the quantized state: pass state_bits=8 or 4 with it.")
    stochastic = bool(stochastic_rounding) if stochastic_rounding is not None else True
    default_block = DEFAULT_BLOCK_SIZE_4BIT if state_bits == 4 else DEFAULT_BLOCK_SIZE
    return Storage(
        nu_dtype,
        bool(split_complex),
        state_bits,
        int(block_size or default_block),
        stochastic,
        bool(factored),
        int(factored_min_dim or DEFAULT_FACTORED_MIN_DIM),
        row_blocks,
    )


# --------------------------------------------------------------------------- reading the state


def decode(nu: Any, params: Any = None) -> Any:
    """``nu`` as plain arrays shaped like the params (quantized and factored leaves decoded to float32).

    Args:
      nu: the ``nu`` field of a state (any tree of stored buffers).
      params: optional; if given, its leaves must match ``nu``'s in number and shape.
    """
    leaves, treedef = jax.tree.flatten(nu, is_leaf=is_stored_node)
    out = [format_of(x).decode(x) if is_stored_node(x) else x for x in leaves]
    if params is not None:
        shapes = [tuple(np.shape(p)) for p in jax.tree.leaves(params)]
        if len(shapes) != len(out):
            raise ValueError(f"nu has {len(out)} leaves but the params have {len(shapes)}.")
        for x, shape in zip(out, shapes, strict=True):
            if tuple(np.shape(x)) != shape:
                raise ValueError(f"a nu leaf of shape {np.shape(x)} does not match its parameter's shape {shape}.")
    return jax.tree.unflatten(treedef, out)


def value_dtype(stored: Any) -> jnp.dtype:
    """The dtype a stored buffer holds its values in (float32 for quantized ones)."""
    return jnp.dtype(jnp.float32) if is_stored_node(stored) else jnp.dtype(stored.dtype)


def state_bytes(tree: Any) -> int:
    """Bytes held by the arrays of a state tree (codes and scales included)."""
    return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
