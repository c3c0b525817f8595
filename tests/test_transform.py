"""Tests of `rmsprop_jax.scale_by_rms`, the rescaling block."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import f32, random_problem, run_steps, step_slice, steps_list
from hypothesis import assume, given
from hypothesis import strategies as st
from reference import INT32_MAX, Hyper, ScaleByRmsReference, assert_tree_close, rmsprop_trajectory, to64

import rmsprop_jax
import rmsprop_jax.flat

STEPS = 120
RTOL = 1e-5


def scale_only_run(tx, params, grads):
    """Runs a transform over the gradients without touching the params; returns (updates, state)."""

    @jax.jit
    def run(state, grads):
        def body(state, g):
            u, state = tx.update(g, state)
            return state, u

        state, updates = jax.lax.scan(body, state, grads)
        return updates, state

    return run(tx.init(params), grads)


def check_against_reference(hyper: Hyper, params, grads, rtol: float = RTOL) -> None:
    tx = rmsprop_jax.scale_by_rms(**hyper.scale_by_rms_kwargs())
    updates, state = scale_only_run(tx, params, grads)
    ref = ScaleByRmsReference(params, hyper)
    for i, g in enumerate(steps_list(grads)):
        assert_tree_close(step_slice(updates, i), ref.update(g), rtol, what=f"step {i + 1}")
    assert_tree_close(state.nu, ref.nu, rtol, what="nu")
    if hyper.centered:
        assert_tree_close(state.mu, ref.mu, rtol, what="mu")
    else:
        assert state.mu is None
    assert state.count.dtype == jnp.int32
    assert int(state.count) == ref.count


@st.composite
def configurations(draw):
    centered = draw(st.booleans())
    bias_correction = draw(st.booleans())
    initial_scale = f32(draw(st.sampled_from([0.0, 1.0, 0.25])))
    # Centered + bias correction + v0 = 0 has a zero first variance (see test_numerics).
    assume(not (centered and bias_correction and initial_scale == 0.0))
    hyper = Hyper(
        decay=f32(draw(st.one_of(st.sampled_from([0.9, 0.99, 0.999]), st.floats(0.5, 0.999)))),
        eps=f32(10 ** draw(st.floats(-10, -2))),
        eps_in_sqrt=draw(st.booleans()),
        initial_scale=initial_scale,
        centered=centered,
        bias_correction=bias_correction,
        split_complex=draw(st.booleans()),
    )
    return hyper, draw(st.integers(0, 2**16)), draw(st.booleans())


@given(configurations())
def test_matches_reference(config):
    hyper, seed, complex_leaf = config
    params, grads = random_problem(seed, STEPS, complex_leaf=complex_leaf)
    check_against_reference(hyper, params, grads)


def test_only_rescales():
    # First step with the defaults: v = 0.1 g², so s = g / (√(0.1 g²) + 1e-8) — same sign as g, no lr.
    g = jnp.array([0.5, -2.0, 3e-3, 0.0, -7.0])
    tx = rmsprop_jax.scale_by_rms()
    s, _ = tx.update(g, tx.init(g))
    g64 = to64(g)
    want = g64 / (np.sqrt(0.1 * g64**2) + 1e-8)
    np.testing.assert_allclose(s, want, rtol=1e-6)
    assert np.all(np.sign(s) == np.sign(g64))


def test_chained_with_learning_rate_is_rmsprop():
    kwargs = {"decay": 0.95, "eps": 1e-6, "centered": True, "bias_correction": True, "initial_scale": 1.0}
    schedule = optax.exponential_decay(0.01, 10, 0.5)
    params, grads = random_problem(seed=20, steps=40)
    chained = optax.chain(rmsprop_jax.scale_by_rms(**kwargs), optax.scale_by_learning_rate(schedule))
    _, got, _ = run_steps(chained, params, grads)
    _, want, _ = run_steps(rmsprop_jax.rmsprop(schedule, **kwargs), params, grads)
    chex.assert_trees_all_close(got, want, rtol=1e-6)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("split_complex", [False, True])
def test_complex(centered, split_complex):
    hyper = Hyper(decay=f32(0.9), centered=centered, initial_scale=0.5, split_complex=split_complex)
    params, grads = random_problem(seed=21, steps=STEPS, complex_leaf=True)
    check_against_reference(hyper, params, grads)
    state = rmsprop_jax.scale_by_rms(**hyper.scale_by_rms_kwargs()).init(params)
    # |g|² is one real number per element unless the parts are split.
    assert state.nu["z"].dtype == (jnp.complex64 if split_complex else jnp.float32)
    assert state.nu["w"].dtype == jnp.float32
    if centered:
        assert state.mu["z"].dtype == jnp.complex64


def test_complex_magnitude_versus_split_parts():
    # g = 1 + 100i on the first step (v0 = 0, eps negligible):
    #   shared |g|²: s = g / √(0.1 · 10001)
    #   split parts: s = 1/√(0.1·1) + i·100/√(0.1·10⁴) = √10 (1 + i)
    g = jnp.array([1.0 + 100.0j], jnp.complex64)
    shared = rmsprop_jax.scale_by_rms(eps=0.0)
    split = rmsprop_jax.scale_by_rms(eps=0.0, split_complex=True)
    s_shared, _ = shared.update(g, shared.init(g))
    s_split, _ = split.update(g, split.init(g))
    np.testing.assert_allclose(s_shared, [(1 + 100j) / np.sqrt(0.1 * 10001)], rtol=1e-6)
    np.testing.assert_allclose(s_split, [np.sqrt(10) * (1 + 1j)], rtol=1e-6)


def test_zero_size_and_scalar_leaves():
    rng = np.random.default_rng(22)
    params = {"empty": np.zeros((0, 3), np.float32), "scalar": np.float32(2.0), "vec": np.ones(3, np.float32)}
    grads = {
        "empty": np.zeros((20, 0, 3), np.float32),
        "scalar": rng.normal(size=(20,)).astype(np.float32),
        "vec": rng.normal(size=(20, 3)).astype(np.float32),
    }
    hyper = Hyper(centered=True, bias_correction=True, initial_scale=1.0)
    check_against_reference(hyper, params, grads)
    state = rmsprop_jax.scale_by_rms().init(params)
    assert state.nu["empty"].shape == (0, 3) and state.nu["scalar"].shape == ()


def test_zero_size_and_scalar_leaves_in_rmsprop():
    rng = np.random.default_rng(23)
    params = {"empty": np.zeros((0,), np.float32), "scalar": np.float32(-1.5)}
    grads = {"empty": np.zeros((10, 0), np.float32), "scalar": rng.normal(size=(10,)).astype(np.float32)}
    hyper = Hyper(learning_rate=f32(0.1), momentum=f32(0.9), weight_decay=f32(0.1), centered=True, initial_scale=1.0)
    final, updates, _ = run_steps(rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs()), params, grads)
    want_updates, want_final, _ = rmsprop_trajectory(hyper, params, steps_list(grads))
    for i, want in enumerate(want_updates):
        assert_tree_close(step_slice(updates, i), want, RTOL, what=f"step {i + 1}")
    assert_tree_close(final, want_final, RTOL)


def test_none_leaves_pass_through():
    params = {"a": jnp.ones(2), "b": None}
    tx = rmsprop_jax.scale_by_rms()
    state = tx.init(params)
    s, state = tx.update({"a": jnp.array([3.0, -1.0]), "b": None}, state)
    assert s["b"] is None and state.nu["b"] is None
    np.testing.assert_allclose(s["a"], np.sqrt(10) * np.array([1.0, -1.0]), rtol=1e-6)


def test_state_is_a_named_tuple_with_int32_count_that_saturates():
    params, grads = random_problem(seed=24, steps=3)
    hyper = Hyper(bias_correction=True, centered=True, initial_scale=1.0)
    tx = rmsprop_jax.scale_by_rms(**hyper.scale_by_rms_kwargs())
    assert isinstance(tx, optax.GradientTransformation)
    state = tx.init(params)
    assert {"count", "nu", "mu"} <= set(state._fields)
    assert state.count.dtype == jnp.int32 and int(state.count) == 0
    state = state._replace(count=jnp.asarray(INT32_MAX - 1, jnp.int32))
    ref = ScaleByRmsReference(params, hyper, count=INT32_MAX - 1)
    step = jax.jit(tx.update)
    for g in steps_list(grads):
        s, state = step(g, state)
        assert state.count.dtype == jnp.int32 and int(state.count) == INT32_MAX
        assert_tree_close(s, ref.update(g), RTOL)


DECAY_ZERO_VARIANTS = {
    "plain": {},
    "centered": dict(centered=True),
    "bias_correction": dict(bias_correction=True, centered=True),
    "eps_in_sqrt": dict(eps_in_sqrt=True, centered=True),
    "initial_scale": dict(initial_scale=1.0, centered=True),
    "momentum": dict(momentum=0.9, centered=True),
    "nesterov": dict(momentum=0.9, nesterov=True, centered=True),
    "torch_momentum": dict(momentum=0.9, lr_in_momentum=False, centered=True),
    "decoupled_weight_decay": dict(weight_decay=0.1, decoupled_weight_decay=True, centered=True),
    "flat": dict(flat=True, centered=True),
}


RMSPROP_ONLY = ("momentum", "weight_decay", "flat")


@pytest.mark.parametrize(
    ("kind", "variant"),
    [("rmsprop", v) for v in sorted(DECAY_ZERO_VARIANTS)]
    + [("scale_by_rms", v) for v, kw in sorted(DECAY_ZERO_VARIANTS.items()) if not set(kw) & set(RMSPROP_ONLY)],
)
def test_decay_zero_keeps_exactly_the_last_gradient(kind, variant):
    """decay=0: mu == g and nu == |g|^2 bit for bit after every step (PyTorch's lerp is exact there).

    With ``m + 1·(g − m)`` instead, mu would carry rounding noise, and a
    centered step (whose variance is then exactly zero) would be decided by it.
    """
    kwargs = dict(DECAY_ZERO_VARIANTS[variant])
    if kind == "scale_by_rms":
        tx = rmsprop_jax.scale_by_rms(decay=0.0, **kwargs)
    else:
        tx = rmsprop_jax.rmsprop(0.01, decay=0.0, **kwargs)
    rng = np.random.default_rng(7)
    params = {"w": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32), "b": jnp.zeros(16, jnp.float32)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(4):
        grads = {k: jnp.asarray(rng.normal(size=v.shape) * 3.0, jnp.float32) for k, v in params.items()}
        _, state = update(grads, state, params)
        g = {k: np.asarray(v) for k, v in grads.items()}
        nu, mu = state.nu, state.mu
        if kwargs.get("flat"):
            layout = rmsprop_jax.flat.FlatLayout(params)
            nu, mu = layout.unravel(nu), layout.unravel(mu)
        chex.assert_trees_all_equal(nu, {k: v * v for k, v in g.items()})
        if kwargs.get("centered"):
            chex.assert_trees_all_equal(mu, g)
