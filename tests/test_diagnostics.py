"""Tests of `rmsprop_jax.diagnostics` against the float64 reference and hand-computed values.

The defining property of the effective learning rate is that, without
momentum and weight decay, the last update was ``-lr * g`` element by element.
So the expected value is ``-u / g`` with ``u`` and ``g`` the last update and
gradient of the float64 reference, which never computes a learning rate itself.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import code_values_8bit, nnx_update, random_problem, run_steps, step_slice, steps_list
from reference import Hyper, RmspropReference, ScaleByRmsReference, to64

import rmsprop_jax
from rmsprop_jax import diagnostics

STEPS = 20
RTOL = 2e-5  # float32 state against the float64 reference


def _reference_last_step(hyper: Hyper, params, grads, *, scale_only: bool = False):
    """The float64 reference's last update and gradient, as lists of leaves."""
    ref = ScaleByRmsReference(params, hyper) if scale_only else RmspropReference(params, hyper)
    update = None
    for g in steps_list(grads):
        update = ref.update(g) if scale_only else ref.update(g, params)
    last_g = [to64(x) for x in jax.tree.leaves(step_slice(grads, STEPS - 1))]
    return [to64(u) for u in jax.tree.leaves(update)], last_g


def _rates_from_step(updates: list[np.ndarray], grads: list[np.ndarray], sign: float, split: bool) -> list[np.ndarray]:
    """``sign * u / g`` per element; split complex leaves packed as (re rate) + 1j (im rate)."""
    out = []
    for u, g in zip(updates, grads, strict=True):
        if np.iscomplexobj(g) and split:
            out.append(sign * (u.real / g.real) + 1j * sign * (u.imag / g.imag))
        elif np.iscomplexobj(g):
            rate = sign * u / g
            np.testing.assert_allclose(rate.imag, 0, atol=1e-12)  # a shared average scales by a real number
            out.append(rate.real)
        else:
            out.append(sign * u / g)
    return out


CONFIGS = {
    "default": Hyper(learning_rate=0.05),
    "large_eps": Hyper(learning_rate=0.05, eps=1e-3),
    "eps_in_sqrt": Hyper(learning_rate=0.05, eps=1e-4, eps_in_sqrt=True),
    "bias_correction": Hyper(learning_rate=0.05, decay=0.8, bias_correction=True),
    "centered": Hyper(learning_rate=0.05, centered=True, eps=1e-3),
    "centered_bias_sqrt": Hyper(
        learning_rate=0.05, decay=0.7, centered=True, bias_correction=True, eps_in_sqrt=True, eps=1e-5
    ),
    "initial_scale": Hyper(learning_rate=0.05, decay=0.95, initial_scale=1.0),
    "schedule": Hyper(learning_rate=optax.linear_schedule(0.1, 0.01, STEPS)),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_effective_learning_rate_is_the_last_steps_factor(name):
    hyper = CONFIGS[name]
    params, grads = random_problem(seed=3, steps=STEPS)
    _, _, state = run_steps(rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs()), params, grads)
    got = diagnostics.effective_learning_rate(
        state,
        hyper.learning_rate,
        decay=hyper.decay,
        eps=hyper.eps,
        eps_in_sqrt=hyper.eps_in_sqrt,
        bias_correction=hyper.bias_correction,
    )
    u, g = _reference_last_step(hyper, params, grads)
    want = _rates_from_step(u, g, -1.0, split=False)
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), want, strict=True):
        np.testing.assert_allclose(to64(got_leaf), want_leaf, rtol=RTOL)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("centered", [False, True])
def test_complex_params(split, centered):
    hyper = Hyper(learning_rate=0.05, eps=1e-3, centered=centered, split_complex=split)
    params, grads = random_problem(seed=5, steps=STEPS, complex_leaf=True)
    _, _, state = run_steps(rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs()), params, grads)
    got = diagnostics.effective_learning_rate(state, 0.05, eps=1e-3)
    assert jnp.iscomplexobj(got["z"]) == split
    u, g = _reference_last_step(hyper, params, grads)
    want = _rates_from_step(u, g, -1.0, split=split)
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), want, strict=True):
        np.testing.assert_allclose(to64(got_leaf), want_leaf, rtol=RTOL)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_scale_by_rms_state_defaults_to_the_bare_scale(bias_correction):
    hyper = Hyper(decay=0.8, eps=1e-3, bias_correction=bias_correction, centered=True)
    params, grads = random_problem(seed=7, steps=STEPS)
    tx = optax.chain(rmsprop_jax.scale_by_rms(**hyper.scale_by_rms_kwargs()), optax.scale(-0.1))
    _, _, state = run_steps(tx, params, grads)
    got = diagnostics.effective_learning_rate(state, decay=0.8, eps=1e-3, bias_correction=bias_correction)
    u, g = _reference_last_step(hyper, params, grads, scale_only=True)
    want = _rates_from_step(u, g, 1.0, split=False)  # scale_by_rms returns +g / denominator
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), want, strict=True):
        np.testing.assert_allclose(to64(got_leaf), want_leaf, rtol=RTOL)


def test_hand_computed_centered_bias_corrected_state():
    # count 2, decay 0.5: correction 1 / (1 - 0.25) = 4/3, so v̂ = 2/3, m̂ = 0.4,
    # variance 2/3 - 0.16; the rate is 0.1 / (sqrt(variance) + 0.01).
    state = rmsprop_jax.RMSpropState(
        count=jnp.asarray(2, jnp.int32),
        nu={"w": jnp.asarray([0.5], jnp.float32)},
        mu={"w": jnp.asarray([0.3], jnp.float32)},
        momentum=None,
    )
    got = diagnostics.effective_learning_rate(state, 0.1, decay=0.5, eps=0.01, bias_correction=True)
    want = 0.1 / (math.sqrt(2 / 3 - 0.16) + 0.01)
    np.testing.assert_allclose(float(got["w"][0]), want, rtol=1e-6)
    inside = diagnostics.effective_learning_rate(
        state, 0.1, decay=0.5, eps=0.01, bias_correction=True, eps_in_sqrt=True
    )
    np.testing.assert_allclose(float(inside["w"][0]), 0.1 / math.sqrt(2 / 3 - 0.16 + 0.01), rtol=1e-6)


def test_bias_correction_before_the_first_step_is_finite():
    tx = rmsprop_jax.rmsprop(0.1, initial_scale=1.0, bias_correction=True)
    state = tx.init({"w": jnp.zeros(3)})
    got = diagnostics.effective_learning_rate(state, 0.1, bias_correction=True)
    np.testing.assert_allclose(np.asarray(got["w"]), 0.1 / (1 + 1e-8), rtol=1e-6)


def test_schedule_is_read_at_the_count_the_last_step_started_from():
    # A schedule that is 1 at count 0, 2 at count 1, 3 at count 2, ...
    schedule = lambda count: 1.0 + count  # noqa: E731
    tx = rmsprop_jax.rmsprop(schedule)
    params = {"w": jnp.zeros(1)}
    state = tx.init(params)
    g = {"w": jnp.ones(1)}
    for _ in range(3):
        _, state = tx.update(g, state)
    # v = 1 - 0.9**3 after three unit gradients; the third step used the schedule at count 2.
    want = 3.0 / (math.sqrt(1 - 0.9**3) + 1e-8)
    got = diagnostics.effective_learning_rate(state, schedule)
    np.testing.assert_allclose(float(got["w"][0]), want, rtol=1e-6)


# ---------------------------------------------------------------------------
# Finding the state and the injected hyperparameters
# ---------------------------------------------------------------------------


def test_injected_hyperparameters_are_used():
    hyper = Hyper(learning_rate=0.03, decay=0.75, eps=1e-3, bias_correction=True)
    params, grads = random_problem(seed=11, steps=STEPS)
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop, static_args=("bias_correction",))(
        learning_rate=0.03, decay=0.75, eps=1e-3, bias_correction=True
    )
    _, _, state = run_steps(tx, params, grads)
    got = diagnostics.effective_learning_rate(state, bias_correction=True)
    u, g = _reference_last_step(hyper, params, grads)
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), _rates_from_step(u, g, -1.0, split=False), strict=True):
        np.testing.assert_allclose(to64(got_leaf), want_leaf, rtol=RTOL)
    # An explicit value wins over the injected one.
    halved = diagnostics.effective_learning_rate(state, 0.015, bias_correction=True)
    for a, b in zip(jax.tree.leaves(halved), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(to64(a), to64(b) / 2, rtol=1e-6)


def test_injected_schedule_gives_the_last_steps_rate():
    schedule = optax.linear_schedule(0.1, 0.01, STEPS)
    hyper = Hyper(learning_rate=schedule)
    params, grads = random_problem(seed=13, steps=STEPS)
    tx = optax.chain(optax.identity(), optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=schedule))
    _, _, state = run_steps(tx, params, grads)
    got = diagnostics.effective_learning_rate(state)
    u, g = _reference_last_step(hyper, params, grads)
    for got_leaf, want_leaf in zip(jax.tree.leaves(got), _rates_from_step(u, g, -1.0, split=False), strict=True):
        np.testing.assert_allclose(to64(got_leaf), want_leaf, rtol=RTOL)


def test_find_state_through_wrappers():
    params = {"w": jnp.zeros(3)}
    inner = rmsprop_jax.rmsprop(0.1)
    wrapped = {
        "chain": optax.chain(optax.clip(1.0), inner),
        "multisteps": optax.MultiSteps(inner, every_k_schedule=2),
        "masked": optax.masked(inner, {"w": True}),
        "scale_by_rms": optax.chain(rmsprop_jax.scale_by_rms(), optax.scale(-1.0)),
    }
    for name, tx in wrapped.items():
        found = diagnostics.find_state(tx.init(params))
        assert isinstance(found, rmsprop_jax.RMSpropState | rmsprop_jax.ScaleByRmsState), name
        assert found.nu["w"].shape == (3,), name


def test_nnx_optimizer_state_and_leaf_names():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, rmsprop_jax.rmsprop(0.1), wrt=nnx.Param)

    def loss(model):
        return jnp.sum(model(jnp.ones((1, 2))) ** 2)

    nnx_update(optimizer, model, nnx.grad(loss)(model))
    logs = diagnostics.summary(optimizer.opt_state, learning_rate=0.1)
    assert {"lr_max/kernel", "lr_max/bias"} <= set(logs)
    rates = diagnostics.effective_learning_rate(optimizer.opt_state, 0.1)
    # One step from v = 0: the rate is 0.1 / (sqrt(0.1) |g| + eps), at most 0.1 / sqrt(0.1) / |g|.
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(rates))


def test_errors():
    params = {"w": jnp.zeros(3)}
    with pytest.raises(ValueError, match="No RMSpropState"):
        diagnostics.find_state(optax.adam(1e-3).init(params))
    two = optax.multi_transform(
        {"a": rmsprop_jax.rmsprop(0.1), "b": rmsprop_jax.rmsprop(0.2)}, {"w": "a", "v": "b"}
    ).init({"w": jnp.zeros(1), "v": jnp.zeros(1)})
    with pytest.raises(ValueError, match="2 RMS states"):
        diagnostics.find_state(two)
    with pytest.raises(ValueError, match="learning_rate"):
        diagnostics.effective_learning_rate(rmsprop_jax.rmsprop(0.1).init(params))
    coded = rmsprop_jax.ScaleByRmsState(count=jnp.asarray(1), nu={"w": jnp.zeros(3, jnp.uint8)}, mu=None)
    with pytest.raises(TypeError, match="floating-point"):
        diagnostics.summary(coded)


def test_quantized_nu_is_decoded_by_its_code_map():
    rng = np.random.default_rng(5)
    params = {"w": jnp.zeros((16, 512)), "b": jnp.zeros(3)}
    grads = {"w": jnp.asarray(rng.normal(size=(16, 512)), jnp.float32), "b": jnp.ones(3)}
    tx = rmsprop_jax.rmsprop(0.1, decay=0.9, state_bits=8)
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(grads, state, params)
    q = state.nu["w"]
    # Code c of a block with scale s stands for s times the map's ratio; the first axis (16) holds
    # less than a block, so the blocks are 256 consecutive elements of the flattened leaf.
    ratio = code_values_8bit()[np.asarray(q.codes).reshape(32, 256)]
    v = (np.asarray(q.scale, np.float64)[:, None] * ratio).reshape(16, 512)
    lr = diagnostics.effective_learning_rate(state, learning_rate=0.1)
    np.testing.assert_allclose(np.asarray(lr["w"], np.float64), 0.1 / (np.sqrt(v) + 1e-8), rtol=1e-6)
    logs = diagnostics.summary(state, learning_rate=0.1)
    np.testing.assert_allclose(float(logs["lr_max/w"]), np.max(0.1 / (np.sqrt(v) + 1e-8)), rtol=1e-6)
    assert "lr_max/b" in logs and not any("codes" in key or "scale" in key for key in logs)


# ---------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------


def test_summary_statistics_match_numpy_on_the_reference():
    hyper = Hyper(learning_rate=0.05, eps=1e-3, centered=True)
    params, grads = random_problem(seed=17, steps=STEPS)
    tx = rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs())
    _, updates, state = run_steps(tx, params, grads)
    last_update = step_slice(updates, STEPS - 1)
    last_grads = step_slice(grads, STEPS - 1)
    logs = diagnostics.summary(state, last_grads, last_update, learning_rate=0.05, eps=1e-3)

    u, g = _reference_last_step(hyper, params, grads)
    rates = dict(zip(["b", "w"], _rates_from_step(u, g, -1.0, split=False), strict=True))  # leaves in key order
    everything = np.concatenate([r.ravel() for r in rates.values()])
    for stat, fn in (("min", np.min), ("median", np.median), ("max", np.max)):
        np.testing.assert_allclose(float(logs[f"lr_{stat}"]), fn(everything), rtol=RTOL)
        for leaf, r in rates.items():
            np.testing.assert_allclose(float(logs[f"lr_{stat}/{leaf}"]), fn(r), rtol=RTOL)
    n = sum(x.size for x in g)
    np.testing.assert_allclose(float(logs["grad_rms"]), math.sqrt(sum(np.sum(x**2) for x in g) / n), rtol=1e-6)
    np.testing.assert_allclose(float(logs["update_rms"]), math.sqrt(sum(np.sum(x**2) for x in u) / n), rtol=RTOL)
    assert float(logs["eps_dominated_fraction"]) == 0.0  # every element here has |g| >> eps


@pytest.mark.parametrize(("eps_in_sqrt", "want"), [(False, 0.4), (True, 0.6)])
def test_eps_dominated_fraction(eps_in_sqrt, want):
    # eps = 1e-8: outside the root eps dominates where v < 1e-16, inside where v < 1e-8.
    nu = jnp.asarray([0.0, 5e-17, 2e-16, 2e-8, 1.0], jnp.float32)
    state = rmsprop_jax.ScaleByRmsState(count=jnp.asarray(5, jnp.int32), nu={"w": nu}, mu=None)
    logs = diagnostics.summary(state, eps=1e-8, eps_in_sqrt=eps_in_sqrt)
    np.testing.assert_allclose(float(logs["eps_dominated_fraction"]), want, rtol=1e-6)


def test_eps_dominated_fraction_uses_the_centered_variance():
    # v̂ - m² = 1 - 1 = 0 for the first element, 1 - 0 = 1 for the second.
    state = rmsprop_jax.RMSpropState(
        count=jnp.asarray(3, jnp.int32),
        nu={"w": jnp.ones(2)},
        mu={"w": jnp.asarray([1.0, 0.0])},
        momentum=None,
    )
    logs = diagnostics.summary(state, learning_rate=1.0)
    assert float(logs["eps_dominated_fraction"]) == 0.5
    np.testing.assert_allclose(float(logs["lr_max"]), 1e8, rtol=1e-6)  # 1 / (0 + eps)
    np.testing.assert_allclose(float(logs["lr_min"]), 1 / (1 + 1e-8), rtol=1e-6)


def test_split_complex_leaves_count_twice():
    # The real parts have v = 4 (rate 1/2), the imaginary parts v = 1/4 (rate 2).
    nu = jnp.full((3,), 4.0 + 0.25j, jnp.complex64)
    state = rmsprop_jax.ScaleByRmsState(count=jnp.asarray(1, jnp.int32), nu={"z": nu}, mu=None)
    logs = diagnostics.summary(state, eps=0.0)
    assert float(logs["lr_min"]) == 0.5
    assert float(logs["lr_max"]) == 2.0
    assert float(logs["lr_median/z"]) == pytest.approx(1.25)  # median of three 0.5s and three 2s


def test_summary_under_jit_and_scan():
    params, grads = random_problem(seed=19, steps=STEPS)
    tx = rmsprop_jax.rmsprop(0.05)

    def body(carry, g):
        p, s = carry
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), diagnostics.summary(s, g, u, learning_rate=0.05)

    (_, state), logs = jax.jit(lambda c, gs: jax.lax.scan(body, c, gs))((params, tx.init(params)), grads)
    assert all(v.shape == (STEPS,) for v in logs.values())
    eager = diagnostics.summary(state, learning_rate=0.05)
    for key, value in eager.items():
        np.testing.assert_allclose(float(value), float(logs[key][-1]), rtol=1e-6, err_msg=key)


def test_rms_does_not_overflow_and_passes_inf_and_nan():
    big = {"a": jnp.full((4,), 1e30, jnp.float32), "b": jnp.zeros((4,), jnp.float32)}
    state = rmsprop_jax.ScaleByRmsState(count=jnp.asarray(1, jnp.int32), nu={"a": jnp.ones(4)}, mu=None)
    logs = diagnostics.summary(state, grads=big, per_leaf=False)
    np.testing.assert_allclose(float(logs["grad_rms"]), 1e30 / math.sqrt(2), rtol=1e-6)
    assert float(diagnostics.summary(state, grads={"a": jnp.zeros(3)})["grad_rms"]) == 0.0
    assert float(diagnostics.summary(state, grads={"a": jnp.asarray([1.0, jnp.inf])})["grad_rms"]) == math.inf
    assert math.isnan(float(diagnostics.summary(state, grads={"a": jnp.asarray([1.0, jnp.nan])})["grad_rms"]))


def test_empty_leaves_are_left_out():
    state = rmsprop_jax.rmsprop(1.0).init({"empty": jnp.zeros((0, 3)), "w": jnp.zeros(2)})
    state = state._replace(nu={"empty": state.nu["empty"], "w": jnp.asarray([1.0, 4.0])})
    logs = diagnostics.summary(state, learning_rate=1.0, eps=0.0)
    assert "lr_min/empty" not in logs
    assert float(logs["lr_min"]) == 0.5
    assert float(logs["lr_max"]) == 1.0
