"""Tests of `rmsprop_jax.rmsprop`: the float64 reference, optax.rmsprop, and optax composition."""

from __future__ import annotations

import itertools
import random
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import f32, random_problem, run_steps, step_slice, step_temp_bytes, steps_list
from hypothesis import assume, given
from hypothesis import strategies as st
from reference import INT32_MAX, Hyper, RmspropReference, apply, assert_tree_close, rmsprop_trajectory, to64

import rmsprop_jax

STEPS = 120
RTOL = 1e-5  # float32 against the float64 reference

# ---------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------

FLAG_VALUES = {
    "centered": (False, True),
    "bias_correction": (False, True),
    "eps_in_sqrt": (False, True),
    "momentum": ("off", "heavy_ball", "nesterov"),
    "lr_in_momentum": (True, False),
    "weight_decay": ("off", "coupled", "decoupled"),
    "mask": ("none", "tree", "callable"),
    "schedule": ("constant", "exponential", "piecewise"),
    "initial_scale": ("zero", "positive"),
}


def _well_posed(flags: dict) -> bool:
    # Centered with bias correction and v0 = 0 makes the first variance
    # estimate exactly zero (v̂ = g², m̂ = g), so the first step is g / eps and
    # float32 rounding decides it; that case is tested in test_numerics.
    return not (flags["centered"] and flags["bias_correction"] and flags["initial_scale"] == "zero")


def _pairs(row: dict) -> set:
    return {((a, row[a]), (b, row[b])) for a, b in itertools.combinations(sorted(row), 2)}


def pairwise_rows(seed: int = 0, candidates: int = 200) -> list[dict]:
    """A small set of flag combinations in which every pair of flag values occurs (a covering array)."""
    names = sorted(FLAG_VALUES)
    uncovered = {
        ((a, va), (b, vb))
        for a, b in itertools.combinations(names, 2)
        for va, vb in itertools.product(FLAG_VALUES[a], FLAG_VALUES[b])
    }
    rng = random.Random(seed)
    rows: list[dict] = []
    while uncovered:
        best_gain, best_row = -1, None
        for _ in range(candidates):
            row = {name: rng.choice(FLAG_VALUES[name]) for name in names}
            if not _well_posed(row):
                continue
            gain = len(_pairs(row) & uncovered)
            if gain > best_gain:
                best_gain, best_row = gain, row
        if best_gain <= 0:  # force the first uncovered pair in
            (a, va), (b, vb) = min(uncovered)
            while True:
                best_row = {name: rng.choice(FLAG_VALUES[name]) for name in names} | {a: va, b: vb}
                if _well_posed(best_row):
                    break
        rows.append(best_row)
        uncovered -= _pairs(best_row)
    return rows


PAIRWISE_ROWS = pairwise_rows()


def make_schedule(kind: str, lr: float):
    if kind == "constant":
        return lr
    if kind == "exponential":  # changes at every step
        return optax.exponential_decay(lr, transition_steps=10, decay_rate=0.5)
    return optax.piecewise_constant_schedule(lr, {40: 0.1, 80: 10.0})


def leaves_with_bias(params):
    return jax.tree.map(lambda x: x.ndim == 1, params)


def make_hyper(flags: dict, numbers: dict) -> Hyper:
    """A configuration from discrete flags and float32-representable numbers."""
    momentum = None if flags["momentum"] == "off" else numbers["momentum"]
    weight_decay = 0.0 if flags["weight_decay"] == "off" else numbers["weight_decay"]
    mask = {"none": None, "tree": {"w": True, "b": False}, "callable": leaves_with_bias}[flags["mask"]]
    return Hyper(
        learning_rate=make_schedule(flags["schedule"], numbers["learning_rate"]),
        decay=numbers["decay"],
        eps=numbers["eps"],
        eps_in_sqrt=flags["eps_in_sqrt"],
        initial_scale=0.0 if flags["initial_scale"] == "zero" else numbers["initial_scale"],
        centered=flags["centered"],
        momentum=momentum,
        nesterov=flags["momentum"] == "nesterov",
        lr_in_momentum=flags["lr_in_momentum"],
        bias_correction=flags["bias_correction"],
        weight_decay=weight_decay,
        decoupled_weight_decay=flags["weight_decay"] == "decoupled",
        weight_decay_mask=mask,
    )


def random_numbers(rng: np.random.Generator) -> dict:
    """Realistic hyperparameter values, rounded to float32."""
    return {
        "learning_rate": f32(10 ** rng.uniform(-4, -1)),
        "decay": f32(rng.choice([0.9, 0.95, 0.99, 0.999, rng.uniform(0.8, 0.999)])),
        "eps": f32(10 ** rng.uniform(-10, -3)),
        "momentum": f32(rng.uniform(0.0, 0.95)),
        "weight_decay": f32(10 ** rng.uniform(-4, -1)),
        "initial_scale": f32(rng.choice([1.0, rng.uniform(0.1, 1.0)])),
    }


def check_against_reference(hyper: Hyper, params, grads, rtol: float = RTOL) -> None:
    """Runs rmsprop (jitted scan) and the reference over the same gradients and compares everything."""
    tx = rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs())
    final, updates, state = run_steps(tx, params, grads)
    want_updates, want_final, ref = rmsprop_trajectory(hyper, params, steps_list(grads))
    for i, want in enumerate(want_updates):
        assert_tree_close(step_slice(updates, i), want, rtol, what=f"update of step {i + 1}")
    assert_tree_close(final, want_final, rtol, what="final params")
    assert_tree_close(state.nu, ref.nu, rtol, what="nu")
    if hyper.centered:
        assert_tree_close(state.mu, ref.mu, rtol, what="mu")
    else:
        assert state.mu is None
    if hyper.momentum is None:
        assert state.momentum is None
    else:
        assert_tree_close(state.momentum, ref.momentum, rtol, what="momentum buffer")
    assert int(state.count) == len(want_updates)


# ---------------------------------------------------------------------------
# The float64 reference
# ---------------------------------------------------------------------------


def test_pairwise_rows_cover_every_pair_of_flag_values():
    covered = set().union(*(_pairs(row) for row in PAIRWISE_ROWS))
    for a, b in itertools.combinations(sorted(FLAG_VALUES), 2):
        for va, vb in itertools.product(FLAG_VALUES[a], FLAG_VALUES[b]):
            assert ((a, va), (b, vb)) in covered
    assert all(_well_posed(row) for row in PAIRWISE_ROWS)


@pytest.mark.parametrize("row", range(len(PAIRWISE_ROWS)))
def test_flag_combinations_match_reference(row):
    flags = PAIRWISE_ROWS[row]
    hyper = make_hyper(flags, random_numbers(np.random.default_rng(row)))
    params, grads = random_problem(seed=row, steps=STEPS)
    check_against_reference(hyper, params, grads)


@st.composite
def configurations(draw):
    flags = {name: draw(st.sampled_from(values)) for name, values in FLAG_VALUES.items()}
    assume(_well_posed(flags))
    numbers = {
        "learning_rate": f32(10 ** draw(st.floats(-4, -1))),
        "decay": f32(draw(st.one_of(st.sampled_from([0.9, 0.95, 0.99, 0.999]), st.floats(0.8, 0.999)))),
        "eps": f32(10 ** draw(st.floats(-10, -3))),
        "momentum": f32(draw(st.floats(0.0, 0.95))),
        "weight_decay": f32(10 ** draw(st.floats(-4, -1))),
        "initial_scale": f32(draw(st.floats(0.1, 1.0))),
    }
    return make_hyper(flags, numbers), draw(st.integers(0, 2**16))


@given(configurations())
def test_matches_reference(config):
    hyper, seed = config
    params, grads = random_problem(seed, STEPS)
    check_against_reference(hyper, params, grads)


def test_defaults_are_the_seeds_rule():
    # v ← 0.9 v + 0.1 g², x ← x − η g / (√v + 1e-8), v0 = 0, written out by hand.
    params, grads = random_problem(seed=1, steps=20)
    lr = f32(0.01)
    _, updates, _ = run_steps(rmsprop_jax.rmsprop(lr), params, grads)
    v = jax.tree.map(lambda p: np.zeros(p.shape), params)
    for i, g in enumerate(steps_list(grads)):
        g = jax.tree.map(to64, g)
        v = jax.tree.map(lambda v, g: 0.9 * v + 0.1 * g * g, v, g)
        want = jax.tree.map(lambda g, v: -lr * g / (np.sqrt(v) + 1e-8), g, v)
        assert_tree_close(step_slice(updates, i), want, RTOL, what=f"step {i + 1}")


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("lr_in_momentum", [True, False])
def test_lr_in_momentum_with_changing_learning_rate(nesterov, lr_in_momentum):
    # The two placements of η only differ when η changes, so use a decaying schedule.
    hyper = Hyper(
        learning_rate=optax.exponential_decay(f32(0.05), transition_steps=5, decay_rate=0.3),
        momentum=f32(0.9),
        nesterov=nesterov,
        lr_in_momentum=lr_in_momentum,
    )
    params, grads = random_problem(seed=2, steps=STEPS)
    check_against_reference(hyper, params, grads)
    other = Hyper(**{**hyper.rmsprop_kwargs(), "lr_in_momentum": not lr_in_momentum})
    _, ours, _ = run_steps(rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs()), params, grads)
    _, theirs, _ = run_steps(rmsprop_jax.rmsprop(**other.rmsprop_kwargs()), params, grads)
    assert not np.allclose(ours["w"][-1], theirs["w"][-1], rtol=1e-2)


def test_schedule_is_called_with_zero_based_count():
    # η = 2^-count: the first step uses η = 1 exactly, the second η = 1/2.
    g = {"w": jnp.array([0.5, -2.0, 3.0])}
    tx = rmsprop_jax.rmsprop(lambda count: 2.0 ** (-count))
    state = tx.init(g)
    u1, state = tx.update(g, state)
    u2, state = tx.update(g, state)
    g64 = to64(g["w"])
    s1 = g64 / (np.sqrt(0.1 * g64**2) + 1e-8)
    s2 = g64 / (np.sqrt(0.19 * g64**2) + 1e-8)
    np.testing.assert_allclose(u1["w"], -1.0 * s1, rtol=1e-6)
    np.testing.assert_allclose(u2["w"], -0.5 * s2, rtol=1e-6)


@pytest.mark.parametrize("split_complex", [False, True])
def test_complex_params_match_reference(split_complex):
    hyper = Hyper(
        learning_rate=optax.exponential_decay(f32(0.02), transition_steps=10, decay_rate=0.5),
        decay=f32(0.95),
        initial_scale=1.0,
        centered=True,
        bias_correction=True,
        momentum=f32(0.8),
        nesterov=True,
        lr_in_momentum=False,
        weight_decay=f32(0.01),
        decoupled_weight_decay=True,
        split_complex=split_complex,
    )
    params, grads = random_problem(seed=3, steps=STEPS, complex_leaf=True)
    check_against_reference(hyper, params, grads)


@pytest.mark.parametrize("decoupled", [False, True])
def test_weight_decay_on_complex_params(decoupled):
    hyper = Hyper(learning_rate=f32(0.01), weight_decay=f32(0.05), decoupled_weight_decay=decoupled, momentum=f32(0.5))
    params, grads = random_problem(seed=4, steps=STEPS, complex_leaf=True)
    check_against_reference(hyper, params, grads)


# ---------------------------------------------------------------------------
# optax.rmsprop
# ---------------------------------------------------------------------------


@st.composite
def shared_configurations(draw):
    centered = draw(st.booleans())
    bias_correction = draw(st.booleans())
    initial_scale = draw(st.sampled_from([0.0, 1.0, f32(0.3)]))
    assume(not (centered and bias_correction and initial_scale == 0.0))
    momentum = draw(st.one_of(st.none(), st.floats(0.0, 0.95).map(f32)))
    return {
        "learning_rate": make_schedule(
            draw(st.sampled_from(["constant", "exponential", "piecewise"])), f32(10 ** draw(st.floats(-4, -1)))
        ),
        "decay": f32(draw(st.sampled_from([0.9, 0.95, 0.99, 0.999]))),
        "eps": f32(10 ** draw(st.floats(-10, -3))),
        "eps_in_sqrt": draw(st.booleans()),
        "initial_scale": initial_scale,
        "centered": centered,
        "momentum": momentum,
        "nesterov": momentum is not None and draw(st.booleans()),
        "bias_correction": bias_correction,
    }, draw(st.integers(0, 2**16))


@given(shared_configurations())
def test_matches_optax_rmsprop(config):
    kwargs, seed = config
    params, grads = random_problem(seed, STEPS)
    final, updates, state = run_steps(rmsprop_jax.rmsprop(**kwargs), params, grads)
    want_final, want_updates, want_state = run_steps(optax.rmsprop(**kwargs), params, grads)
    for i in range(STEPS):
        assert_tree_close(step_slice(updates, i), step_slice(want_updates, i), RTOL, what=f"step {i + 1}")
    assert_tree_close(final, want_final, RTOL)
    assert_tree_close(optax.tree.get(state, "nu"), optax.tree.get(want_state, "nu"), RTOL)


def test_default_eps_placement_differs_from_optax():
    # Small gradients make √(v + eps) and √v + eps clearly different.
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.asarray(np.random.default_rng(5).normal(0, 1e-4, size=(10, 4)), jnp.float32)}
    _, ours, _ = run_steps(rmsprop_jax.rmsprop(0.1), params, grads)
    _, outside, _ = run_steps(optax.rmsprop(0.1, eps_in_sqrt=False), params, grads)
    _, optax_default, _ = run_steps(optax.rmsprop(0.1), params, grads)
    chex.assert_trees_all_close(ours, outside, rtol=1e-5)
    assert not np.allclose(ours["w"], optax_default["w"], rtol=1e-2)
    _, inside, _ = run_steps(rmsprop_jax.rmsprop(0.1, eps_in_sqrt=True), params, grads)
    chex.assert_trees_all_close(inside, optax_default, rtol=1e-5)


# ---------------------------------------------------------------------------
# jit, composition with optax, pytrees, state
# ---------------------------------------------------------------------------

FULL = Hyper(
    learning_rate=optax.exponential_decay(f32(0.01), transition_steps=3, decay_rate=0.5),
    decay=f32(0.95),
    eps_in_sqrt=True,
    initial_scale=f32(0.5),
    centered=True,
    momentum=f32(0.9),
    nesterov=True,
    lr_in_momentum=False,
    bias_correction=True,
    weight_decay=f32(0.01),
    decoupled_weight_decay=True,
    weight_decay_mask={"w": True, "b": False},
)


def test_jit_and_eager_agree():
    params, grads = random_problem(seed=6, steps=8)
    tx = rmsprop_jax.rmsprop(**FULL.rmsprop_kwargs())
    eager = run_steps(tx, params, grads, jit=False)
    jitted = run_steps(tx, params, grads, jit=True)
    for got, want in zip(eager, jitted, strict=True):
        assert_tree_close(got, want, 1e-6)


def test_chain_with_clip_by_global_norm():
    hyper = Hyper(learning_rate=f32(0.01), momentum=f32(0.9), centered=True, initial_scale=1.0)
    params, grads = random_problem(seed=7, steps=STEPS)
    tx = optax.chain(optax.clip_by_global_norm(1.0), rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs()))
    final, updates, state = run_steps(tx, params, grads)

    def clip(g):
        norm = np.sqrt(sum(np.sum(to64(x) ** 2) for x in jax.tree.leaves(g)))
        assert norm > 1.0  # the clip is active at every step
        return jax.tree.map(lambda x: to64(x) / norm, g)

    want_updates, want_final, ref = rmsprop_trajectory(hyper, params, [clip(g) for g in steps_list(grads)])
    for i, want in enumerate(want_updates):
        assert_tree_close(step_slice(updates, i), want, RTOL, what=f"step {i + 1}")
    assert_tree_close(final, want_final, RTOL)
    assert_tree_close(optax.tree.get(state, "nu"), ref.nu, RTOL)


def test_inject_hyperparams_changed_between_steps_under_jit():
    params, grads = random_problem(seed=8, steps=30)
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(
        learning_rate=0.01, decay=0.9, eps=1e-8, momentum=0.9, centered=True, initial_scale=1.0
    )
    traces = []

    @jax.jit
    def step(g, state, x):
        traces.append(None)
        return tx.update(g, state, x)

    state = tx.init(params)
    hyper = Hyper(
        learning_rate=f32(0.01), decay=f32(0.9), eps=f32(1e-8), momentum=f32(0.9), centered=True, initial_scale=1.0
    )
    ref = RmspropReference(params, hyper)
    x = params
    for i, g in enumerate(steps_list(grads)):
        if i % 10 == 9:  # new values every 10 steps
            values = {
                "learning_rate": f32(0.01 / (i + 1)),
                "decay": f32(0.9 + 0.003 * i),
                "eps": f32(10.0 ** (-8 + i / 10)),
                "momentum": f32(0.9 - 0.02 * i),
            }
            for name, value in values.items():
                state.hyperparams[name] = jnp.asarray(value, jnp.float32)
            hyper = Hyper(**{**hyper.rmsprop_kwargs(), **values})
        u, state = step(g, state, x)
        assert_tree_close(u, ref.update(g, x, hyper), RTOL, what=f"step {i + 1}")
        x = optax.apply_updates(x, u)
    assert len(traces) == 1  # the hyperparameters are traced, not baked in


def test_inject_hyperparams_weight_decay_and_initial_scale():
    params, grads = random_problem(seed=9, steps=20)
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(
        learning_rate=0.01, weight_decay=0.1, initial_scale=0.5, decoupled_weight_decay=True
    )
    _, updates, _ = run_steps(tx, params, grads)
    hyper = Hyper(learning_rate=f32(0.01), weight_decay=f32(0.1), initial_scale=0.5, decoupled_weight_decay=True)
    want_updates, _, _ = rmsprop_trajectory(hyper, params, steps_list(grads))
    for i, want in enumerate(want_updates):
        assert_tree_close(step_slice(updates, i), want, RTOL, what=f"step {i + 1}")


def test_inject_hyperparams_under_jit_without_params():
    # optax.rmsprop allows update(grads, state) with no params; weight_decay is 0 by default, so should we.
    params = {"w": jnp.ones(3)}
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=0.1)
    state = tx.init(params)
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    u, _ = jax.jit(tx.update)(grads, state)
    want = RmspropReference(params, Hyper(learning_rate=f32(0.1))).update(grads)
    assert_tree_close(u, want, RTOL)


def test_injected_nonzero_weight_decay_without_params_poisons_updates():
    # The decay cannot be applied without params and jit cannot raise: NaN, never a silent skip.
    params = {"w": jnp.ones(3)}
    tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=0.1, weight_decay=0.01)
    state = tx.init(params)
    u, _ = jax.jit(tx.update)({"w": jnp.array([1.0, -2.0, 0.5])}, state)
    assert np.all(np.isnan(np.asarray(u["w"])))


def test_multi_steps():
    k = 3
    hyper = Hyper(learning_rate=f32(0.01), momentum=f32(0.5), weight_decay=f32(0.01), bias_correction=True)
    params, grads = random_problem(seed=10, steps=k * 40)
    tx = optax.MultiSteps(rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs()), every_k_schedule=k)
    final, updates, _ = run_steps(tx, params, grads)
    micro = steps_list(grads)
    means = [
        jax.tree.map(lambda *g: np.mean([to64(x) for x in g], axis=0), *micro[i : i + k])
        for i in range(0, len(micro), k)
    ]
    want_updates, want_final, _ = rmsprop_trajectory(hyper, params, means)
    for i, want in enumerate(want_updates):
        for j in range(k - 1):
            chex.assert_trees_all_equal(step_slice(updates, k * i + j), jax.tree.map(np.zeros_like, params))
        assert_tree_close(step_slice(updates, k * i + k - 1), want, RTOL, what=f"outer step {i + 1}")
    assert_tree_close(final, want_final, RTOL)


def test_masked():
    hyper = Hyper(learning_rate=f32(0.01), centered=True, momentum=f32(0.9), weight_decay=f32(0.01))
    params, grads = random_problem(seed=11, steps=50)
    tx = optax.masked(rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs()), {"w": True, "b": False})
    _, updates, state = run_steps(tx, params, grads)
    chex.assert_trees_all_equal(updates["b"], grads["b"])  # masked out: passed through untouched
    want_updates, _, ref = rmsprop_trajectory(hyper, {"w": params["w"]}, [{"w": g["w"]} for g in steps_list(grads)])
    for i, want in enumerate(want_updates):
        assert_tree_close({"w": updates["w"][i]}, want, RTOL, what=f"step {i + 1}")
    nu = optax.tree.get(state, "nu")
    assert isinstance(nu["b"], optax.MaskedNode)
    assert_tree_close({"w": nu["w"]}, ref.nu, RTOL)


def test_apply_if_finite_skips_bad_steps():
    hyper = Hyper(
        learning_rate=optax.exponential_decay(f32(0.01), 5, 0.5),
        momentum=f32(0.9),
        bias_correction=True,
        centered=True,
        initial_scale=1.0,
    )
    params, grads = random_problem(seed=12, steps=30)
    bad = {7, 8, 20}
    for i in bad:
        grads["w"][i, 1, 2] = np.nan if i != 20 else np.inf
    tx = optax.apply_if_finite(rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs()), max_consecutive_errors=5)
    final, updates, state = run_steps(tx, params, grads)
    ref = RmspropReference(params, hyper)
    x = jax.tree.map(to64, params)
    for i, g in enumerate(steps_list(grads)):
        if i in bad:
            chex.assert_trees_all_equal(step_slice(updates, i), jax.tree.map(np.zeros_like, params))
            continue
        want = ref.update(g, x)
        assert_tree_close(step_slice(updates, i), want, RTOL, what=f"step {i + 1}")
        x = apply(x, want)
    assert_tree_close(final, x, RTOL)
    assert int(state.inner_state.count) == ref.count == 30 - len(bad)
    assert_tree_close(state.inner_state.nu, ref.nu, RTOL)


class Layer(NamedTuple):
    w: jax.Array
    b: jax.Array


def _arr(rng, shape):
    return rng.normal(size=shape).astype(np.float32)


TREES = {
    "dict": lambda rng: {"a": _arr(rng, (2, 3)), "b": _arr(rng, (3,))},
    "list": lambda rng: [_arr(rng, (2,)), _arr(rng, (3, 2))],
    "tuple": lambda rng: (_arr(rng, (2,)), {"c": _arr(rng, (2, 2))}),
    "namedtuple": lambda rng: Layer(w=_arr(rng, (2, 2)), b=_arr(rng, (2,))),
    "none_leaf": lambda rng: {"a": _arr(rng, (3,)), "frozen": None, "nested": [None, _arr(rng, (2,))]},
}


@pytest.mark.parametrize("kind", sorted(TREES))
def test_pytree_kinds(kind):
    rng = np.random.default_rng(13)
    params = TREES[kind](rng)
    grads = [TREES[kind](rng) for _ in range(20)]
    stacked = jax.tree.map(lambda *g: np.stack(g), *grads)
    hyper = Hyper(learning_rate=f32(0.01), centered=True, momentum=f32(0.9), weight_decay=f32(0.01))
    tx = rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs())
    final, updates, state = run_steps(tx, params, stacked)
    want_updates, want_final, ref = rmsprop_trajectory(hyper, params, grads)
    assert jax.tree.structure(state.nu) == jax.tree.structure(params)
    for i, want in enumerate(want_updates):
        assert_tree_close(step_slice(updates, i), want, RTOL, what=f"step {i + 1}")
    assert_tree_close(final, want_final, RTOL)
    assert_tree_close(optax.tree.get(state, "nu"), ref.nu, RTOL)


def test_tree_get_finds_nu():
    params, grads = random_problem(seed=14, steps=5)
    hyper = Hyper(learning_rate=f32(0.01), centered=True, momentum=f32(0.9))
    for tx in [
        rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs()),
        optax.chain(optax.clip(10.0), rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs())),
        optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=0.01, centered=True, momentum=0.9),
    ]:
        _, _, state = run_steps(tx, params, grads)
        _, _, ref = rmsprop_trajectory(hyper, params, steps_list(grads))
        assert_tree_close(optax.tree.get(state, "nu"), ref.nu, RTOL)


@pytest.mark.parametrize(
    "kwargs, buffers",
    [
        ({}, 1),
        ({"centered": True}, 2),
        ({"momentum": 0.9}, 2),
        ({"centered": True, "momentum": 0.9, "nesterov": True}, 3),
        (
            {
                "learning_rate": optax.cosine_decay_schedule(0.1, 100),
                "bias_correction": True,
                "eps_in_sqrt": True,
                "initial_scale": 1.0,
                "lr_in_momentum": False,
                "weight_decay": 0.1,
                "decoupled_weight_decay": True,
                "weight_decay_mask": {"w": True, "b": False},
            },
            1,
        ),
        ({"weight_decay": 0.1}, 1),
    ],
)
def test_unused_options_allocate_nothing(kwargs, buffers):
    params, grads = random_problem(seed=15, steps=3)
    n_params = sum(np.size(p) for p in jax.tree.leaves(params))
    tx = rmsprop_jax.rmsprop(**{"learning_rate": 0.1, **kwargs})
    state = tx.init(params)
    assert sum(np.size(leaf) for leaf in jax.tree.leaves(state)) == buffers * n_params + 1  # + the count
    assert (state.mu is None) == (not kwargs.get("centered", False))
    assert (state.momentum is None) == ("momentum" not in kwargs)
    _, _, new_state = run_steps(tx, params, grads)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_count_is_int32_and_saturates():
    hyper = Hyper(learning_rate=f32(0.1), bias_correction=True, decay=f32(0.9))
    params, grads = random_problem(seed=16, steps=3)
    tx = rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs())
    state = tx.init(params)
    assert state.count.dtype == jnp.int32 and int(state.count) == 0
    state = state._replace(count=jnp.asarray(INT32_MAX - 1, jnp.int32))
    ref = RmspropReference(params, hyper, count=INT32_MAX - 1)
    step = jax.jit(tx.update)
    counts = []
    for g in steps_list(grads):
        u, state = step(g, state, params)
        assert state.count.dtype == jnp.int32
        counts.append(int(state.count))
        assert_tree_close(u, ref.update(g, params), RTOL)
    assert counts == [INT32_MAX] * 3


def test_hyperparameters_as_jax_arrays():
    hyper = Hyper(
        learning_rate=f32(0.01),
        decay=f32(0.95),
        eps=f32(1e-6),
        initial_scale=f32(0.5),
        momentum=f32(0.8),
        weight_decay=f32(0.01),
        centered=True,
    )
    numeric = ("learning_rate", "decay", "eps", "initial_scale", "momentum", "weight_decay")
    kwargs = {k: jnp.asarray(v, jnp.float32) if k in numeric else v for k, v in hyper.rmsprop_kwargs().items()}
    params, grads = random_problem(seed=17, steps=30)
    _, updates, _ = run_steps(rmsprop_jax.rmsprop(**kwargs), params, grads)
    want_updates, _, _ = rmsprop_trajectory(hyper, params, steps_list(grads))
    for i, want in enumerate(want_updates):
        assert_tree_close(step_slice(updates, i), want, RTOL, what=f"step {i + 1}")


def test_types_state_and_extra_args():
    params, grads = random_problem(seed=18, steps=1)
    g = step_slice(grads, 0)
    tx = rmsprop_jax.rmsprop(0.1, momentum=0.9)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    state = tx.init(params)
    assert isinstance(state, tuple) and {"count", "nu", "mu", "momentum"} <= set(state._fields)
    plain, _ = tx.update(g, state, params)
    # Extra keyword arguments (as optax passes in chains with line searches) are accepted and ignored.
    extra, _ = tx.update(g, state, params, value=jnp.float32(1.0), grad=g)
    chex.assert_trees_all_equal(plain, extra)
    chained = optax.chain(rmsprop_jax.rmsprop(0.1, momentum=0.9), optax.scale(1.0))
    with_extra, _ = chained.update(g, chained.init(params), params, value=jnp.float32(1.0))
    chex.assert_trees_all_close(with_extra, plain, rtol=1e-6)


@pytest.mark.parametrize(
    "option, decayed",
    [
        # Keras: x1 = x - (x * wd) * lr in float32, then x2 = x1 + u.
        (True, lambda x, lr, wd: (x - (x * wd) * lr).astype(np.float32)),
        # timm: x1 = x * (1 - lr * wd) in place, then x2 = x1 + u.
        ("multiply", lambda x, lr, wd: (x * (np.float32(1) - lr * wd)).astype(np.float32)),
    ],
    ids=["keras", "multiply"],
)
def test_decay_params_first_rounds_the_decayed_params_under_jit(option, decayed):
    # u is the step without decay. The step is small next to |x| (as in training), so x2 - x is
    # exact and x + (x2 - x) is x2. Under jit XLA may fuse a product and the addition after it into
    # one fused multiply-add, which would skip the rounding of x1.
    rng = np.random.default_rng(22)
    x = (rng.choice([-1.0, 1.0], 4096) * rng.uniform(0.5, 2.0, 4096)).astype(np.float32)
    g = rng.standard_normal(4096).astype(np.float32)
    lr, wd = np.float32(1e-2), np.float32(0.05)
    plain = rmsprop_jax.rmsprop(float(lr))
    u0 = np.asarray(plain.update({"w": jnp.asarray(g)}, plain.init({"w": jnp.asarray(x)}))[0]["w"])
    want = (decayed(x, lr, wd) + u0).astype(np.float32)
    fused = x.astype(np.float64) * np.float64(np.float32(1) - lr * wd) + u0.astype(np.float64)
    assert np.any(fused.astype(np.float32) != want)  # the check can see a fused multiply-add
    tx = rmsprop_jax.rmsprop(float(lr), weight_decay=float(wd), decoupled_weight_decay=True, decay_params_first=option)

    @jax.jit
    def step(params: Any) -> Any:
        u, _ = tx.update({"w": jnp.asarray(g)}, tx.init(params), params)
        return optax.apply_updates(params, u)

    np.testing.assert_array_equal(np.asarray(step({"w": jnp.asarray(x)})["w"]), want)


def test_decay_params_first_keeps_the_decay_in_the_update_for_bfloat16():
    # Rounded on its own, x - lr * wd * x is x in bfloat16: the option must not lose the decay there.
    params = {"w": jnp.linspace(-2.0, 2.0, 64, dtype=jnp.bfloat16)}
    grads = {"w": jnp.full((64,), 0.3, jnp.bfloat16)}
    kwargs = dict(weight_decay=0.05, decoupled_weight_decay=True)
    first = rmsprop_jax.rmsprop(0.01, decay_params_first=True, **kwargs)
    default = rmsprop_jax.rmsprop(0.01, **kwargs)
    u_first, _ = first.update(grads, first.init(params), params)
    u_default, _ = default.update(grads, default.init(params), params)
    np.testing.assert_array_equal(np.asarray(u_first["w"]), np.asarray(u_default["w"]))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"centered_average": "keras"}, "centered_average"),
        ({"decay_params_first": "divide"}, "decay_params_first"),
        ({"decay_params_first": 1}, "decay_params_first"),
    ],
)
def test_rounding_form_options_are_validated(options, match):
    with pytest.raises(ValueError, match=match):
        rmsprop_jax.rmsprop(1e-3, **options)


def test_rounding_forms_compute_the_same_values():
    """The forms differ only in rounding: every pair agrees to float32 precision, and each is a real change."""
    rng = np.random.default_rng(11)
    params = {"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)}
    grads = [{"w": jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)} for _ in range(20)]

    def run(**options):
        tx = rmsprop_jax.rmsprop(0.05, centered=True, weight_decay=0.1, decoupled_weight_decay=True, **options)
        step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
        p, s = params, tx.init(params)
        for g in grads:
            p, s = step(p, s, g)
        return np.asarray(p["w"], np.float64), np.asarray(s.mu["w"], np.float64)

    base = run()
    for options in ({"centered_average": "weighted"}, {"decay_params_first": True}, {"decay_params_first": "multiply"}):
        got = run(**options)
        for a, b in zip(got, base, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(options))
        assert any(not np.array_equal(a, b) for a, b in zip(got, base, strict=True)), options


@pytest.mark.parametrize("lr_in_momentum", [True, False])
def test_nesterov_step_needs_no_parameter_sized_temporary(lr_in_momentum):
    """Nesterov's step feeds the buffer and the params; it is recomputed in each loop, never written out."""
    n = 1 << 20
    params = {"w": jnp.ones(n)}
    kwargs = dict(momentum=0.9, lr_in_momentum=lr_in_momentum)
    control = optax.rmsprop(1e-3, momentum=0.9, nesterov=True)
    assert step_temp_bytes(control, params) >= 4 * n  # the control: optax writes it
    assert step_temp_bytes(rmsprop_jax.rmsprop(1e-3, nesterov=True, **kwargs), params) < 4 * n // 100
