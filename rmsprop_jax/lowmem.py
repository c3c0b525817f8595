r"""Low-memory optimizer state: stochastic rounding, 8-bit and 4-bit blockwise ``nu``, factored ``nu``.

Ways to store the state in fewer bytes, selected by options of
`rmsprop_jax.rmsprop` and `rmsprop_jax.scale_by_rms`:

* ``nu_dtype=jnp.bfloat16`` (or ``jnp.float16``): ``nu`` (and ``mu`` and the
  momentum buffer) in 2 bytes. Every step computes in float32 and writes the
  new state back with **stochastic rounding**: a value x between the two
  neighbouring representable numbers :math:`a \le x < b` is stored as b with
  probability :math:`(x - a) / (b - a)` and as a otherwise, so the stored
  value is x *in expectation*. With round-to-nearest, ``0.999 * v`` rounds
  back to v in bfloat16 (8 significant bits) and the average never forgets;
  with stochastic rounding it decays like :math:`0.999^t` on average. With
  bfloat16 the update uses the new buffers as stored (rounded), so that XLA
  overwrites the old state in place instead of copying it first
  (`rmsprop_jax.formats.written`). float16 cannot: it underflows below 6e-8,
  where (1 − γ)·g² of small gradients lies, so its update uses the float32
  value and XLA keeps the copy.

* ``state_bits=8``: ``nu`` as one unsigned byte per element plus one float32
  scale per block of ``block_size`` elements (default 256) running down the
  leaf's first axis (its leading axes merged when the first one is shorter
  than a block): a block is 256 consecutive rows in one column, 1 + 4/256 ≈
  1.016 bytes per parameter. The codes are shaped like the leaf, so they
  shard like it. Blocks down a major axis keep every loop of the step
  contiguous: on XLA:CPU the block maxima of blocks along the last axis
  cost ~3x more (they reduce within each vector). Since :math:`v \ge 0` the
  code map is unsigned and uses all 256 codes: code c stands for
  :math:`s_B` times a small float below 1, with 5 mantissa bits (32 codes
  per binade, steps of 1.6-3.1 %) over the top four binades, codes 255 down
  to 128 = 1/16, and 3 mantissa bits (8 per binade, steps of 6-12.5 %)
  below, down to code 1 at :math:`2^{-19}\cdot 10/16 \approx 1.2\cdot
  10^{-6} s_B`; code 0 is 0. The codes are the top bits of the float32
  ratio :math:`v / s_B`, so encoding and decoding are integer operations
  (the earlier fourth-power map, :math:`(c/255)^4`, needs two square roots
  per element: its codes kernel alone took 10.3 ms at 1e7 elements on 2 CPU
  cores, the float map's 4.3 ms). It was chosen with
  ``python -m benchmarks.code_maps``: under signal swamping its median
  elementwise error is 5.9 % (fourth-power map 7.5 %) and on values spread
  over four decades 16.5 % (15.9 %). A non-zero v is never stored as 0 (it
  would make the step g/ε explode): values below the first code are stored
  as code 1, which only shrinks their step. The new codes are drawn with
  stochastic rounding between the two neighbouring codes, unbiased in
  value; with decay 0.999 the per-step change of v is far below one code
  step and round-to-nearest would freeze v. The block scale is the bound
  :math:`s_B \leftarrow \gamma s_B + (1-\gamma) \max_{i\in B} g_i^2` of the
  block maximum (every stored v is at most :math:`s_B`), which needs only
  the gradients. Leaves of fewer than 4096 elements (and complex ``nu`` of
  ``split_complex``) keep ``nu`` unquantized in the state dtype. Each step
  decodes, computes the new ``nu`` in float32 and re-quantizes it; the
  update reads the stored codes back (like bfloat16 state, so that XLA
  overwrites the old codes in place instead of copying them first), so a
  step moves by at most half a code step of v.

* ``state_bits=4``: a float map with no mantissa bits, one code per binade:
  :math:`v = s_B\,2^{c-15}` for codes 1-15 (down to :math:`2^{-14} s_B
  \approx 6.1\cdot 10^{-5} s_B`, 4.2 decades), code 0 only for v = 0; two
  codes per byte and a float32 scale per block of 128 rows by default: 0.5 +
  4/128 ≈ 0.53 bytes per parameter. A byte holds the codes of the same
  element in two neighbouring rows (rows 2i and 2i + 1), which lie in one
  block, so every loop stays contiguous; an odd last row is paired with zero
  codes. Like the 8-bit codes they are the top bits of the float32 ratio, so
  encoding is integer arithmetic: 1.9-2.1× the float32-state step with the
  earlier fourth-power map :math:`(c/15)^4` (two square roots per element to
  encode), 1.20-1.34× with this one (1e7 parameters, 2 CPU cores). With 16 codes a step of v is far below one
  code for any decay near 1 (*signal swamping*): with round-to-nearest the
  stored v sticks, while stochastic rounding keeps the mean unbiased at the
  price of elementwise noise, which the square root halves in the step. On
  8,192 elements at decay 0.999, 1,000 steps of unit-scale gradients and
  then 2,000 steps 100× smaller, the mean of the stored v ends +30 % above
  the float32 average with round-to-nearest and within 0.1 % with
  stochastic rounding. The noise makes 4-bit steps larger on average, since
  1/√v of an unbiased but noisy v is larger than 1/√ of its mean (see
  ``benchmarks/RESULTS.md`` for the swamping stream's figures), so 4-bit
  state acts like a somewhat larger learning rate, and its update keeps the
  float32 value of the step. The map was chosen by measurement
  (``python -m benchmarks.code_maps`` and ``benchmarks/RESULTS.md``): on
  values whose scales spread over two decades it has a lower median error
  than the fourth-power map (51 % against 62 %) and a smaller mean step
  (1.12× against 1.42× the float32 step), on a stream of one scale a higher
  one (48 % against 34 %), with the same training quality.

* ``row_blocks`` (with ``state_bits``; True, or a mask of the leaves): the
  blocks of those leaves run along the last axis instead, ``block_size``
  consecutive elements of one row (one block per row when the rows are
  shorter). For embedding tables, whose rows are tokens: a column block
  holds ``block_size`` tokens, frequent and rare together, and the rare
  tokens' ``v`` lies binades below the block scale, where codes are
  coarse. On an (8,192, 128) table under Zipf(1.1) token gradients
  (``python -m benchmarks.embedding_blocks``) row blocks bring the median
  error of the decoded ``nu`` from 14-16 % to 1.2-4.0 % (8-bit) and from
  47-48 % to 29-44 % (4-bit), and rare tokens' mean 4-bit step from 1.24×
  to 1.08× the float32 step. Their block maxima reduce within each row,
  which costs more on the CPU in long rows: at 1e7 parameters in rows of
  128 a row-block step took 0.96-1.01× the column-block step (8-bit) and
  0.97-0.99× (4-bit) in two timings; in rows of 1,000, 1.48× (8-bit) and
  1.06× (4-bit) in one.

* ``factored=True``: ``nu`` of every matrix whose two largest axes both have
  at least ``factored_min_dim`` (128) elements is kept as Adafactor's
  running row and column means R and C of :math:`g^2 + 10^{-30}` and read as
  :math:`\hat v_{ij} = R_i C_j / \mathrm{mean}(R)` (Shazeer and Stern,
  *Adafactor*, ICML 2018; the axes are those ``optax.scale_by_factored_rms``
  picks): n + m floats for an n × m matrix, 0.008 bytes per parameter at
  1024 × 1024. It combines with ``state_bits`` (the other large leaves are
  quantized), not with ``centered`` or ``flat``.

**Random bits.** The rounding is deterministic: the bits for element i of
buffer k (0 ``nu``, 1 ``mu``, 2 momentum) of leaf l at step t (the state's
1-based ``count``) are

.. math:: h = \mathrm{scramble}(i \oplus \mathrm{mix}(t \cdot \phi + \mathrm{mix}(l \cdot c_1 + k \cdot c_2 + c_3)))

with mix the 32-bit integer finalizer "lowbias32" (C. Wellons, 2018:
``x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16``),
a bijection with good avalanche, scramble its middle three operations
(``x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b``), and φ, c₁, c₂, c₃ odd
32-bit constants; the top 24 bits give a uniform number in [0, 1). The key
is fully mixed, so each element's bits are uniform and independent across
steps; the per-element hash only decorrelates the elements of one step
(correlations under 0.003 at offsets 1 to 65,536). Packed 4-bit codes take
one h per byte (i its index in the packed codes): its top 16 bits round the
element of the even row and its low 16 bits that of the odd row, which
resolves the probability of rounding up to 2⁻¹⁶ of a code step; the two
halves are uncorrelated (under 0.002). It costs five integer operations per
element (per byte for 4-bit) inside the update's fused loop, needs no key in
the state and is the same on every backend and under any sharding. Replaying a
step from the same state gives the same bits; a skipped step
(``skip_nonfinite``) does not advance ``count`` and so reuses them.

Example:
  >>> import jax.numpy as jnp, rmsprop_jax
  >>> from rmsprop_jax import lowmem
  >>> params = {"w": jnp.ones((16, 256)), "b": jnp.ones(16)}
  >>> tx = rmsprop_jax.rmsprop(1e-3, decay=0.999, state_bits=8)
  >>> state = tx.init(params)
  >>> state.nu["w"].codes.dtype, state.nu["w"].codes.shape, state.nu["b"].dtype
  (dtype('uint8'), (16, 256), dtype('float32'))
  >>> grads = {"w": jnp.full((16, 256), 2.0), "b": jnp.full(16, 2.0)}
  >>> updates, state = tx.update(grads, state, params)
  >>> nu = lowmem.nu_values(state.nu, params)  # float32, shaped like the params
  >>> round(float(nu["w"][0, 0]), 6), round(float(nu["b"][0]), 6)  # (1 - 0.999) * 2**2
  (0.004, 0.004)
  >>> lowmem.state_bytes(state.nu["w"]) / 4096  # bytes per element: 1 + 4 / 256
  1.015625
"""

from __future__ import annotations

from rmsprop_jax._random import random_bits, step_key, stochastic_round, uniform
from rmsprop_jax.formats import FactoredArray, QuantizedArray, dequantize, quantize, state_bytes
from rmsprop_jax.formats import decode as nu_values

__all__ = [
    "FactoredArray",
    "QuantizedArray",
    "dequantize",
    "nu_values",
    "quantize",
    "random_bits",
    "state_bytes",
    "step_key",
    "stochastic_round",
    "uniform",
]
