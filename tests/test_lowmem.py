"""Low-memory state: stochastic rounding (bfloat16/float16) and the 8-bit blockwise ``nu``.

Expectations come from float64 arithmetic (tests/reference.py) and from the
definition of the rounding, never from the package's own output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import code_values_8bit, f32, random_problem, run_steps, step_slice, step_temp_bytes, steps_list
from reference import Hyper, ScaleByRmsReference, assert_tree_close, rmsprop_trajectory, to64

import rmsprop_jax
from rmsprop_jax import lowmem

# ---------------------------------------------------------------------------
# Random bits and stochastic rounding
# ---------------------------------------------------------------------------


def test_random_bits_are_uniform_and_independent_across_steps_leaves_and_buffers():
    n = 1 << 16
    u = {
        key: np.asarray(lowmem.uniform(lowmem.random_bits((n,), lowmem.step_key(*key))), np.float64)
        for key in [(1, 0, 0), (2, 0, 0), (1, 1, 0), (1, 0, 1)]
    }
    for sample in u.values():
        assert abs(sample.mean() - 0.5) < 0.01
        counts = np.histogram(sample, bins=16, range=(0, 1))[0]
        chi2 = np.sum((counts - n / 16) ** 2 / (n / 16))
        assert chi2 < 45  # 15 degrees of freedom: p < 1e-4 above 45
        assert abs(np.corrcoef(sample[:-1], sample[1:])[0, 1]) < 0.02  # neighbouring elements
    base = u[(1, 0, 0)]
    for other in [(2, 0, 0), (1, 1, 0), (1, 0, 1)]:
        assert abs(np.corrcoef(base, u[other])[0, 1]) < 0.02
        assert np.mean(base == u[other]) < 0.01


def _neighbours(x: np.ndarray, mantissa_bits: int, min_exponent: int) -> tuple[np.ndarray, np.ndarray]:
    """The representable magnitudes a <= |x| < b of a binary float format (float64 arithmetic)."""
    magnitude = np.abs(x)
    exponent = np.maximum(np.floor(np.log2(magnitude)), min_exponent)
    spacing = 2.0 ** (exponent - mantissa_bits)
    low = np.floor(magnitude / spacing) * spacing
    return low, low + spacing


@pytest.mark.parametrize(
    "dtype, mantissa_bits, min_exponent",
    [(jnp.bfloat16, 7, -126), (jnp.float16, 10, -14)],
)
def test_stochastic_round_is_unbiased_and_picks_a_neighbour(dtype, mantissa_bits, min_exponent):
    rng = np.random.default_rng(0)
    # Magnitudes across many binades, subnormals of float16 included, both signs.
    x = (rng.choice([-1, 1], 64) * 10 ** rng.uniform(-6.5, 3, 64)).astype(np.float32)
    draws = 4000
    bits = lowmem.random_bits((draws, x.size), jnp.uint32(12345))
    rounded = np.asarray(lowmem.stochastic_round(jnp.broadcast_to(jnp.asarray(x), (draws, x.size)), dtype, bits))
    assert rounded.dtype == jnp.dtype(dtype)
    rounded = rounded.astype(np.float64)
    x64 = x.astype(np.float64)
    low, high = _neighbours(x64, mantissa_bits, min_exponent)
    magnitudes = np.abs(rounded)
    assert np.all((magnitudes == low) | (magnitudes == high))
    assert np.all(np.sign(rounded[rounded != 0]) == np.sign(np.broadcast_to(x64, rounded.shape)[rounded != 0]))
    p_up = (np.abs(x64) - low) / (high - low)
    # The mean of Bernoulli(p) draws: within 5 standard errors.
    np.testing.assert_array_less(np.abs(np.mean(magnitudes == high, axis=0) - p_up), 5 * 0.5 / np.sqrt(draws))


def test_stochastic_round_keeps_representable_values_and_non_finite():
    x = jnp.array([0.0, -0.0, 1.0, -2.5, 65504.0, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
    bits = lowmem.random_bits(x.shape, jnp.uint32(7))
    for dtype in (jnp.bfloat16, jnp.float16):
        out = np.asarray(lowmem.stochastic_round(x, dtype, bits)).astype(np.float64)
        want = np.asarray(x, np.float64)
        if dtype == jnp.bfloat16:
            want[4] = np.nan  # 65504 is not a bfloat16: checked separately below
        np.testing.assert_array_equal(out[:4], want[:4])
        assert np.isinf(out[5]) and out[5] > 0 and np.isinf(out[6]) and out[6] < 0 and np.isnan(out[7])


# ---------------------------------------------------------------------------
# bfloat16 / float16 state
# ---------------------------------------------------------------------------


def _nu_after_quiet_phase(tx, n=4096, busy=300, quiet=2000, seed=1):
    rng = np.random.default_rng(seed)
    grads = np.concatenate([rng.normal(size=(busy, n)), np.zeros((quiet, n))]).astype(np.float32)
    params = {"w": jnp.zeros(n)}

    @jax.jit
    def run(state, grads):
        def body(state, g):
            _, state = tx.update({"w": g}, state, params)
            return state, jnp.mean(lowmem.nu_values(state.nu, params)["w"].astype(jnp.float32))

        return jax.lax.scan(body, state, grads)

    _, means = run(tx.init(params), grads)
    return np.asarray(means, np.float64), busy


@pytest.mark.parametrize("options", [{"nu_dtype": jnp.bfloat16}, {"nu_dtype": jnp.float16}, {"state_bits": 8}])
def test_low_memory_state_still_forgets_with_decay_0999(options):
    means, busy = _nu_after_quiet_phase(rmsprop_jax.scale_by_rms(decay=0.999, **options))
    quiet = len(means) - busy
    np.testing.assert_allclose(means[-1] / means[busy - 1], 0.999**quiet, rtol=0.02)


def test_bf16_round_to_nearest_freezes_which_is_why_rounding_is_stochastic():
    tx = rmsprop_jax.scale_by_rms(decay=0.999, nu_dtype=jnp.bfloat16, stochastic_rounding=False)
    means, busy = _nu_after_quiet_phase(tx)
    assert means[-1] / means[busy - 1] > 0.9  # should be 0.999**2000 = 0.135


def test_bf16_state_follows_the_float64_reference():
    hyper = Hyper(learning_rate=f32(0.01), decay=f32(0.99), centered=True, initial_scale=1.0, momentum=f32(0.5))
    params, grads = random_problem(seed=3, steps=60)
    tx = rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs(), nu_dtype=jnp.bfloat16)
    _, updates, state = run_steps(tx, params, grads)
    for field in (state.nu, state.mu, state.momentum):
        assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(field))
    want_updates, _, ref = rmsprop_trajectory(hyper, params, steps_list(grads))
    # Each update reads the buffers as stored (rounded): with the learning rate inside the momentum
    # buffer, it is minus the stored buffer, exactly.
    last = step_slice(updates, len(want_updates) - 1)
    for u, b in zip(jax.tree.leaves(last), jax.tree.leaves(state.momentum), strict=True):
        np.testing.assert_array_equal(np.asarray(u), -np.asarray(b, np.float32))
    # Centered: the stored v and m each carry up to 2^-8 of rounding per step, and v - m^2 magnifies it where
    # they nearly cancel. Over 16 random streams (key salts) the worst update of this run lies within 0.037
    # (|want| + max |want|) of the reference; 3e-2 failed on 3 of them.
    for i, want in enumerate(want_updates):
        assert_tree_close(step_slice(updates, i), want, 5e-2, what=f"step {i + 1}")
    assert_tree_close(state.nu, ref.nu, 3e-2)


@pytest.mark.parametrize(
    "options",
    [
        {"nu_dtype": jnp.bfloat16},
        {"nu_dtype": jnp.bfloat16, "stochastic_rounding": False},
        {"nu_dtype": jnp.bfloat16, "centered": True, "momentum": 0.9},
        {"nu_dtype": jnp.bfloat16, "momentum": 0.9, "nesterov": True},
    ],
    ids=["bf16", "bf16-nearest", "bf16-centered-momentum", "bf16-nesterov"],
)
def test_bf16_state_step_needs_no_copy_of_the_old_state(options):
    """The update reads the new buffers as written, so XLA does not copy the old ones before overwriting them."""
    n = 1 << 20
    params = {"w": jnp.ones(n)}
    assert step_temp_bytes(rmsprop_jax.rmsprop(1e-3, **options), params) < n // 100


@pytest.mark.parametrize("options", [{}, {"centered": True, "momentum": 0.9}], ids=["plain", "centered-momentum"])
def test_f16_state_steps_like_float32_where_the_average_underflows_float16(options):
    """(1 − γ)·g² below float16's smallest subnormal (6e-8) is stored as 0 or 6e-8; the step must not see it.

    With g = 1e-4 and γ = 0.999 the new v is 1e-11: its √ is 3.2e-6 and the
    step g/(√v + ε) about 31.6. A step computed from the stored float16 v
    would divide by ε alone (1e4) or by √6e-8 (0.4).
    """
    params = {"w": jnp.zeros(4096)}
    grads = {"w": jnp.full(4096, 1e-4)}

    def first_step(**state_options):
        tx = rmsprop_jax.rmsprop(1.0, decay=0.999, **options, **state_options)
        return jax.jit(tx.update)(grads, tx.init(params), params)

    want, _ = first_step()
    got, state = first_step(nu_dtype=jnp.float16)
    assert float(jnp.min(state.nu["w"].astype(jnp.float32))) < 1e-10  # the stored v did underflow
    np.testing.assert_allclose(np.asarray(got["w"]), np.asarray(want["w"]), rtol=1e-6)


def test_stochastic_rounding_is_deterministic_given_the_step():
    params = {"w": jnp.zeros(4096)}
    tx = rmsprop_jax.scale_by_rms(decay=0.999, nu_dtype=jnp.bfloat16)
    state = tx.init(params)._replace(nu={"w": jnp.full(4096, 1.0, jnp.bfloat16)})
    g = {"w": jnp.full(4096, 0.5)}
    _, a = tx.update(g, state)
    _, b = jax.jit(tx.update)(g, state)
    np.testing.assert_array_equal(np.asarray(a.nu["w"], np.float64), np.asarray(b.nu["w"], np.float64))
    # 0.999 + 0.001 / 4 lies between 0.99609375 and 1 in bfloat16: up with probability 0.3.
    up = np.mean(np.asarray(a.nu["w"], np.float64) == 1.0)
    assert abs(up - (0.99925 - 0.99609375) / (1 - 0.99609375)) < 0.03
    _, c = tx.update(g, state._replace(count=state.count + 1))
    assert np.mean(np.asarray(a.nu["w"]) != np.asarray(c.nu["w"])) > 0.2  # another step, other bits


# ---------------------------------------------------------------------------
# 8-bit nu
# ---------------------------------------------------------------------------


def test_code_map_is_unsigned_and_uses_all_256_codes():
    values = code_values_8bit()
    assert values[0] == 0 and values[-1] == 1 and np.all(np.diff(values) > 0)
    assert values[128 - 1] == 1 / 16 and values[1] == 2.0**-19 * 10 / 16  # ≈ 1.2e-6
    # Codes are 1.6-3.1 % apart (in value) over the top four binades and 6.2-12.5 % below.
    spacing = np.diff(values[1:]) / values[1:-1]
    assert np.all(spacing[127:] <= 1 / 31 + 1e-12) and np.all(spacing[:126] <= 1 / 7 + 1e-12)
    v = jnp.asarray(values * 3.0, jnp.float32)  # one block holding every code value, max 3
    q = lowmem.quantize(v, block_size=256)
    np.testing.assert_array_equal(np.asarray(q.codes).ravel(), np.arange(256))
    np.testing.assert_allclose(np.asarray(lowmem.dequantize(q, (256,)), np.float64), values * 3.0, rtol=1e-5)


def test_quantize_rounds_to_the_nearest_code_and_never_to_zero():
    rng = np.random.default_rng(5)
    v = (10 ** rng.uniform(-30, 0, size=(8, 256))).astype(np.float32)
    v[:, 0] = 1.0  # block maxima
    q = lowmem.quantize(jnp.asarray(v), block_size=256)
    codes = np.asarray(q.codes)
    assert np.all(codes >= 1) and np.all(codes[:, 0] == 255)
    grid = code_values_8bit()
    got = grid[codes]
    v64 = v.astype(np.float64)
    nearest = grid[np.argmin(np.abs(grid[None, None, :] - v64[..., None]), axis=-1)]
    representable = v64 >= grid[1] / 2
    np.testing.assert_allclose(got[representable], nearest[representable], rtol=1e-5)
    np.testing.assert_array_equal(got[~representable], grid[1])  # below the first code: rounded up to it


def test_stochastic_quantization_is_unbiased():
    rng = np.random.default_rng(6)
    v = (10 ** rng.uniform(-5, 0, size=256)).astype(np.float32)
    v[0] = 1.0
    draws = 2000
    v_draws = jnp.broadcast_to(jnp.asarray(v), (draws, 256))
    bits = lowmem.random_bits((draws, 256), jnp.uint32(99))
    q = lowmem.quantize(v_draws, block_size=256, bits=bits)
    got = np.asarray(lowmem.dequantize(q, (draws, 256)), np.float64)
    grid = code_values_8bit()
    # The standard error of the mean is at most half a code spacing / sqrt(draws).
    upper = grid[np.searchsorted(grid, v.astype(np.float64))]
    spacing = upper - grid[np.maximum(np.searchsorted(grid, v.astype(np.float64)) - 1, 0)]
    np.testing.assert_array_less(np.abs(got.mean(axis=0) - v), 5 * 0.5 * spacing / np.sqrt(draws) + 1e-12)


def test_8bit_state_layout_bytes_and_small_leaves():
    params = {
        "big": jnp.zeros((300, 333)),  # blocks of 128, 128 and 44 rows down each of the 333 columns
        "narrow": jnp.zeros((64, 100)),  # a first axis shorter than a block: the leading axes are merged
        "mid": jnp.zeros(4000),  # below 4096 elements
        "small": jnp.zeros(100),
        "scalar": jnp.zeros(()),
    }
    tx = rmsprop_jax.rmsprop(1e-3, state_bits=8, block_size=128)
    state = tx.init(params)
    big, narrow = state.nu["big"], state.nu["narrow"]
    assert isinstance(big, lowmem.QuantizedArray) and isinstance(narrow, lowmem.QuantizedArray)
    assert big.codes.dtype == jnp.uint8 and big.codes.shape == (300, 333) and big.shape == (300, 333)
    assert big.scale.dtype == jnp.float32 and big.scale.shape == (3, 333)
    assert narrow.codes.shape == (64, 100) and narrow.scale.shape == (50,)
    for name in ("mid", "small", "scalar"):
        assert state.nu[name].dtype == jnp.float32 and state.nu[name].shape == params[name].shape
    assert lowmem.state_bytes(big) == 99900 + 3 * 333 * 4
    assert lowmem.state_bytes(narrow) == 6400 + 50 * 4
    default = rmsprop_jax.rmsprop(1e-3, state_bits=8).init({"w": jnp.zeros((100, 1024))})
    assert lowmem.state_bytes(default.nu) / 102400 == 1 + 4 / 256
    grads = jax.tree.map(jnp.ones_like, params)
    _, new_state = jax.jit(tx.update)(grads, state, params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)


def test_8bit_nu_tracks_the_float64_reference_and_round_to_nearest_does_not():
    # Half of each block goes quiet while the other half stays busy: the quiet elements'
    # average has to shrink relative to their block, by far less than one code step per step.
    rng = np.random.default_rng(7)
    n, steps, decay = 8192, 1500, f32(0.999)  # at least 4096 elements, so that nu is quantized
    scales = 10 ** rng.uniform(-1.5, 1, size=n)
    grads = rng.normal(size=(steps, n)) * scales
    grads[steps // 3 :, ::2] = 0.0
    grads = grads.astype(np.float32)
    params = {"w": np.zeros(n, np.float32)}
    ref = ScaleByRmsReference(params, Hyper(decay=decay))
    for g in grads:
        ref.update({"w": g})
    want = to64(ref.nu["w"])

    def final_nu(**options):
        tx = rmsprop_jax.scale_by_rms(decay=decay, state_bits=8, **options)

        @jax.jit
        def run(state, grads):
            return jax.lax.scan(lambda s, g: (tx.update({"w": g}, s)[1], None), state, grads)[0]

        state = run(tx.init(params), grads)
        return to64(lowmem.nu_values(state.nu, params)["w"])

    got = final_nu()
    quiet = np.zeros(n, bool)
    quiet[::2] = True
    # Busy elements sit near their block's scale, on fine codes. Quiet ones fall far below it,
    # onto coarse low codes: unbiased on average up to a small upward drift (measured +5 %), and
    # noisier elementwise.
    for part, drift, spread in ((~quiet, 0.03, 0.15), (quiet, 0.08, 0.4)):
        ratio = got[part] / want[part]
        assert abs(np.mean(ratio) - 1) < drift
        assert np.median(np.abs(ratio - 1)) < spread
    frozen = final_nu(stochastic_rounding=False)
    assert np.median(frozen[quiet] / want[quiet]) > 2  # round-to-nearest cannot follow the decay


def test_8bit_updates_follow_the_float64_reference():
    hyper = Hyper(learning_rate=f32(0.01), decay=f32(0.9), momentum=f32(0.9))
    rng = np.random.default_rng(8)
    params = {"w": rng.normal(size=(32, 128)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    grads = {
        "w": rng.normal(0.1, 1, size=(40, 32, 128)).astype(np.float32),
        "b": rng.normal(size=(40, 5)).astype(np.float32),
    }
    tx = rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs(), state_bits=8)
    assert isinstance(tx.init(params).nu["w"], lowmem.QuantizedArray)
    _, updates, _ = run_steps(tx, params, grads)
    want_updates, _, _ = rmsprop_trajectory(hyper, params, steps_list(grads))
    # Each update uses the new nu as stored: step 1 (zero momentum) is -lr g / (sqrt(decoded nu) + eps).
    first, state = tx.update(step_slice(grads, 0), tx.init(params), params)
    nu = lowmem.nu_values(state.nu, params)
    for name in params:
        g = grads[name][0].astype(np.float64)
        want = -hyper.learning_rate * g / (np.sqrt(to64(nu[name])) + hyper.eps)
        np.testing.assert_allclose(to64(first[name]), want, rtol=1e-5)
        np.testing.assert_allclose(to64(step_slice(updates, 0)[name]), to64(first[name]), rtol=1e-6)
    # Within 10 % of the float64 trajectory, except where a v of step 1 lay under the lowest code
    # of its block (~1.2e-6 of the block's scale) and was stored as that code: step 1 is smaller
    # there, and the momentum carries the difference.
    under = {}
    for i, want in enumerate(want_updates):
        got = step_slice(updates, i)
        for name in params:
            g_i, w_i = to64(got[name]), to64(want[name])
            off = np.abs(g_i - w_i) > 0.1 * (np.abs(w_i) + np.max(np.abs(w_i)))  # as assert_tree_close(0.1)
            if i == 0:
                assert off.mean() < 0.01 and np.all(np.abs(g_i[off]) < np.abs(w_i[off])), name
                under[name] = off
            assert not np.any(off & ~under[name]), f"step {i + 1} {name}"


def test_8bit_state_with_the_nonfinite_guard_keeps_the_state():
    params = {"w": jnp.ones(4096)}
    tx = rmsprop_jax.rmsprop(0.1, state_bits=8, skip_nonfinite=True)
    state = tx.init(params)
    assert isinstance(state.nu["w"], lowmem.QuantizedArray)
    _, state = tx.update({"w": jnp.ones(4096)}, state, params)
    bad = jnp.ones(4096).at[3].set(jnp.nan)
    updates, kept = tx.update({"w": bad}, state, params)
    assert int(kept.skipped) == 1 and np.all(np.asarray(updates["w"]) == 0)
    for x, y in zip(jax.tree.leaves(kept.nu), jax.tree.leaves(state.nu), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"state_bits": 3}, "state_bits"),
        ({"state_bits": True}, "state_bits"),
        ({"block_size": 64}, "block_size"),
        ({"state_bits": 8, "block_size": 0}, "block_size"),
        ({"state_bits": 8, "block_size": 2.5}, "block_size"),
        ({"stochastic_rounding": "yes"}, "stochastic_rounding"),
    ],
)
def test_low_memory_arguments_are_validated(options, match):
    for make in (lambda **kw: rmsprop_jax.rmsprop(1e-3, **kw), rmsprop_jax.scale_by_rms):
        with pytest.raises(ValueError, match=match):
            make(**options)
