"""Numerics and dtypes: clamped centering, half precision, float64, state and update dtypes."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import f32, random_problem, run_steps, step_slice, steps_list
from reference import Hyper, RmspropReference, ScaleByRmsReference, assert_tree_close, rmsprop_trajectory, to64

import rmsprop_jax
from rmsprop_jax import _compat

# ---------------------------------------------------------------------------
# Centered mode: v̂ − |m̂|² must never reach the square root negative
# ---------------------------------------------------------------------------

CONSTANT_G = np.random.default_rng(30).uniform(-10, 10, size=256).astype(np.float32)


def naive_variance_minimum(decay: float, bias_correction: bool, steps: int) -> float:
    """min over steps and elements of v̂ − m̂² computed plainly in float32 (no clamp)."""
    d = jnp.float32(decay)
    g = jnp.asarray(CONSTANT_G)

    def body(carry, t):
        v, m = carry
        v = d * v + (1 - d) * g * g
        m = d * m + (1 - d) * g
        c = 1 - d ** t.astype(jnp.float32) if bias_correction else jnp.float32(1)
        return (v, m), jnp.min(v / c - (m / c) ** 2)

    zeros = jnp.zeros_like(g)
    _, minima = jax.jit(lambda: jax.lax.scan(body, (zeros, zeros), jnp.arange(1, steps + 1)))()
    return float(jnp.min(minima))


@pytest.mark.parametrize(
    "decay, bias_correction",
    [(0.5, False), (0.9, False), (0.9, True), (0.99, True), (0.999, True)],
)
@pytest.mark.parametrize("eps_in_sqrt", [False, True])
def test_centered_constant_gradients_never_nan(decay, bias_correction, eps_in_sqrt):
    steps = 10_000
    if (decay, bias_correction) != (0.9, False):
        # In exact arithmetic the variance of a constant gradient is ≥ 0, but
        # float32 rounding makes it negative here: only the clamp prevents √(<0).
        assert naive_variance_minimum(decay, bias_correction, steps) < 0
    tx = rmsprop_jax.rmsprop(
        1e-3, decay=decay, centered=True, bias_correction=bias_correction, eps_in_sqrt=eps_in_sqrt, momentum=0.9
    )
    params = {"w": jnp.zeros_like(CONSTANT_G)}
    g = {"w": jnp.asarray(CONSTANT_G)}

    @jax.jit
    def run(state):
        def body(state, _):
            u, state = tx.update(g, state)
            return state, (jnp.any(jnp.isnan(u["w"])), jnp.all(jnp.isfinite(u["w"])))

        return jax.lax.scan(body, state, None, length=steps)

    state, (any_nan, all_finite) = run(tx.init(params))
    assert not np.any(any_nan), f"NaN at step {int(np.argmax(any_nan)) + 1}"
    assert np.all(all_finite)
    chex.assert_tree_all_finite((state.nu, state.mu, state.momentum))
    assert int(state.count) == steps


@pytest.mark.parametrize("eps_in_sqrt", [False, True])
def test_centered_bias_corrected_first_step_has_zero_variance(eps_in_sqrt):
    # t = 1, v0 = 0: v̂ = g², m̂ = g, so the variance is exactly 0 and the
    # denominator is eps (or √eps) up to float32 rounding: huge, finite, no NaN.
    g = jnp.asarray(CONSTANT_G)
    tx = rmsprop_jax.scale_by_rms(centered=True, bias_correction=True, eps_in_sqrt=eps_in_sqrt)
    s, _ = tx.update(g, tx.init(g))
    chex.assert_tree_all_finite(s)
    # Rounding leaves at most a few ulps of g² in v̂ − m̂², i.e. a root ≤ ~1e-3 |g|.
    assert np.all(np.abs(s) > 100 * np.abs(to64(g)) / np.maximum(np.abs(to64(g)), 1))


# ---------------------------------------------------------------------------
# Half precision
# ---------------------------------------------------------------------------


def test_bf16_params_track_float64_nu_with_decay_0999():
    rng = np.random.default_rng(31)
    busy, quiet = 500, 2500
    params = {"w": jnp.asarray(rng.normal(size=16), jnp.bfloat16)}
    grads = np.concatenate([rng.normal(size=(busy, 16)), np.zeros((quiet, 16))])
    grads = {"w": jnp.asarray(grads, jnp.bfloat16)}
    hyper = Hyper(learning_rate=f32(1e-3), decay=f32(0.999))

    def nu_history(tx):
        @jax.jit
        def run(state):
            def body(state, g):
                u, state = tx.update(g, state)
                return state, (state.nu["w"], u["w"])

            return jax.lax.scan(body, state, grads)

        return run(tx.init(params))

    state, (nus, updates) = nu_history(rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs()))
    assert state.nu["w"].dtype == jnp.float32  # nu_dtype=None: float32 state for bf16 params
    assert updates.dtype == jnp.bfloat16

    ref = RmspropReference(params, hyper)
    want = []
    for g in steps_list(grads):
        ref.update(g, params)
        want.append(ref.nu["w"])
    want = np.stack(want)
    np.testing.assert_allclose(nus, want, rtol=1e-4)
    # The average really forgets: over the quiet phase it shrinks by 0.999^2500 ≈ 0.08.
    ratio = to64(nus[-1]) / to64(nus[busy - 1])
    np.testing.assert_allclose(ratio, 0.999**quiet, rtol=1e-3)

    # What the float32 state avoids: stored in bf16 with round-to-nearest,
    # 0.999·v rounds back to v, and the same quiet phase would not decay at all.
    v = jnp.asarray(nus[busy - 1], jnp.bfloat16)
    stuck = jax.lax.fori_loop(0, quiet, lambda _, v: (jnp.float32(0.999) * v).astype(jnp.bfloat16), v)
    chex.assert_trees_all_equal(stuck, v)


def fp16_problem(seed: int, steps: int):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=12), jnp.float16)}
    magnitude = 10 ** rng.uniform(np.log10(300), np.log10(60000), size=(steps, 12))  # g² overflows float16
    grads = {"w": jnp.asarray(rng.choice([-1.0, 1.0], size=(steps, 12)) * magnitude, jnp.float16)}
    return params, grads


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"centered": True, "initial_scale": 1.0},
        {"eps_in_sqrt": True, "bias_correction": True},
        {"momentum": 0.9, "nesterov": True},
    ],
)
def test_fp16_large_gradients_do_not_overflow(options):
    params, grads = fp16_problem(seed=32, steps=50)
    assert np.min(np.abs(to64(grads["w"]))) ** 2 > np.finfo(np.float16).max  # every g² overflows in float16
    hyper = Hyper(learning_rate=f32(1e-3), **options)
    tx = rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs())
    _, updates, state = run_steps(tx, jax.tree.map(jnp.zeros_like, params), grads)
    assert updates["w"].dtype == jnp.float16
    chex.assert_tree_all_finite((updates, state.nu))
    # Params stay at zero (no weight decay), so the reference sees the same inputs.
    want, _, ref = rmsprop_trajectory(hyper, jax.tree.map(jnp.zeros_like, params), steps_list(grads))
    for i, w in enumerate(want):
        assert_tree_close(step_slice(updates, i), w, 2e-3, what=f"step {i + 1}")  # float16 output rounding
    assert_tree_close(state.nu, ref.nu, 1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"eps_in_sqrt": True},
        {"centered": True},
        {"centered": True, "bias_correction": True},
        {"momentum": 0.9, "nesterov": True},
        {"nu_dtype": jnp.float16},
        {"eps": 0.0},
        {"eps": 1e-30, "eps_in_sqrt": True},
        {"weight_decay": 0.0, "decoupled_weight_decay": True},
    ],
)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_zero_gradients_give_zero_updates(options, dtype):
    params = {"w": jnp.ones(5, dtype)}
    tx = rmsprop_jax.rmsprop(1e-3, **options)
    zeros = {"w": jnp.zeros((4, 5), dtype)}
    _, updates, _ = run_steps(tx, params, zeros)
    assert updates["w"].dtype == dtype
    chex.assert_tree_all_finite(updates)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, zeros))


# ---------------------------------------------------------------------------
# float64 and dtypes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("split_complex", [False, True])
def test_float64_under_x64(split_complex):
    hyper = Hyper(
        # optax's schedules compute in float32 for an int32 count; this one stays float64.
        learning_rate=lambda count: 0.01 / (1 + jnp.asarray(count, jnp.float64) / 10),
        decay=0.999,
        centered=True,
        initial_scale=0.3,
        bias_correction=True,
        momentum=0.9,
        weight_decay=0.01,
        split_complex=split_complex,
    )
    params32, grads32 = random_problem(seed=33, steps=100, complex_leaf=True)
    with _compat.enable_x64(True):
        params = jax.tree.map(lambda x: jnp.asarray(to64(x)), params32)
        grads = jax.tree.map(lambda x: jnp.asarray(to64(x)), grads32)
        assert params["w"].dtype == jnp.float64 and params["z"].dtype == jnp.complex128
        final, updates, state = run_steps(rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs()), params, grads)
        assert updates["w"].dtype == jnp.float64 and updates["z"].dtype == jnp.complex128
        assert state.nu["w"].dtype == jnp.float64 and state.mu["z"].dtype == jnp.complex128
        assert state.nu["z"].dtype == (jnp.complex128 if split_complex else jnp.float64)
        want_updates, want_final, ref = rmsprop_trajectory(hyper, params, steps_list(grads))
    for i, want in enumerate(want_updates):
        assert_tree_close(step_slice(updates, i), want, 1e-10, what=f"step {i + 1}")
    assert_tree_close(final, want_final, 1e-10)
    assert_tree_close(state.nu, ref.nu, 1e-10)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32, jnp.complex64])
@pytest.mark.parametrize("transform", ["scale_by_rms", "rmsprop"])
def test_updates_have_the_gradients_dtype(dtype, transform):
    if transform == "rmsprop":
        tx = rmsprop_jax.rmsprop(0.1, momentum=0.9, centered=True, weight_decay=0.1)
    else:
        tx = rmsprop_jax.scale_by_rms(centered=True)
    params = {"w": jnp.ones(3, dtype), "s": jnp.asarray(2.0, dtype)}
    grads = {"w": jnp.asarray([0.5, -1.0, 2.0], dtype), "s": jnp.asarray(-3.0, dtype)}
    u, _ = tx.update(grads, tx.init(params), params)
    assert u["w"].dtype == dtype and u["s"].dtype == dtype
    chex.assert_tree_all_finite(u)


@pytest.mark.parametrize(
    "param_dtype, nu_dtype, want_nu, want_mu",
    [
        (jnp.bfloat16, None, jnp.float32, jnp.float32),
        (jnp.float16, None, jnp.float32, jnp.float32),
        (jnp.float32, None, jnp.float32, jnp.float32),
        (jnp.complex64, None, jnp.float32, jnp.complex64),
        (jnp.float32, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
        (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
        (jnp.bfloat16, jnp.float32, jnp.float32, jnp.float32),
    ],
)
def test_state_dtypes(param_dtype, nu_dtype, want_nu, want_mu):
    params = {"w": jnp.ones(3, param_dtype)}
    tx = rmsprop_jax.rmsprop(0.1, centered=True, momentum=0.9, nu_dtype=nu_dtype)
    state = tx.init(params)
    assert state.nu["w"].dtype == want_nu
    assert state.mu["w"].dtype == want_mu
    assert state.momentum["w"].dtype == want_mu
    _, _, new_state = run_steps(tx, params, {"w": jnp.ones((3, 3), param_dtype)})
    assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)


def test_explicit_bf16_state_for_float32_params():
    hyper = Hyper(learning_rate=f32(0.01), centered=True, initial_scale=1.0, momentum=f32(0.5))
    params, grads = random_problem(seed=34, steps=30)
    tx = rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs(), nu_dtype=jnp.bfloat16)
    _, updates, state = run_steps(tx, params, grads)
    for field in (state.nu, state.mu, state.momentum):
        assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(field))
    assert updates["w"].dtype == jnp.float32
    want_updates, _, ref = rmsprop_trajectory(hyper, params, steps_list(grads))
    # bf16 keeps 8 bits: the state and updates follow the reference to a few percent.
    assert_tree_close(state.nu, ref.nu, 5e-2)
    for i, want in enumerate(want_updates):
        assert_tree_close(step_slice(updates, i), want, 5e-2, what=f"step {i + 1}")


def test_scale_by_rms_half_precision_large_gradients():
    _, grads = fp16_problem(seed=35, steps=20)
    tx = rmsprop_jax.scale_by_rms(decay=0.99)
    params = {"w": jnp.zeros(12, jnp.float16)}
    state = tx.init(params)
    ref = ScaleByRmsReference(params, Hyper(decay=f32(0.99)))
    for g in steps_list(grads):
        s, state = tx.update(g, state)
        assert s["w"].dtype == jnp.float16
        assert_tree_close(s, ref.update(g), 2e-3)
