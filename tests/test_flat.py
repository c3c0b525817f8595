"""Flat state (``flat=True``) and flat-parameter training (`rmsprop_jax.flat`)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import f32, random_problem, run_steps, step_slice, steps_list
from reference import Hyper, ScaleByRmsReference, assert_tree_close, rmsprop_trajectory

import rmsprop_jax
from rmsprop_jax.flat import STATE_ALIGN, FlatLayout


def _mixed_problem(seed: int, steps: int):
    """float32 and float16 leaves of several shapes, some of them scalars."""
    params, grads = random_problem(seed, steps)
    rng = np.random.default_rng(seed + 100)
    params["h"] = rng.normal(size=(2, 3)).astype(np.float16)
    grads["h"] = rng.normal(size=(steps, 2, 3)).astype(np.float16)
    params["s"] = np.float32(0.5)
    grads["s"] = rng.normal(size=steps).astype(np.float32)
    return params, grads


def test_layout_round_trip_groups_by_dtype_and_label():
    params, _ = _mixed_problem(0, 1)
    labels = {"w": True, "b": False, "h": True, "s": True}
    layout = FlatLayout(params, labels=labels)
    flat = layout.ravel(params)
    assert {k: v.dtype for k, v in flat.items()} == {
        "float32/0": jnp.float32,  # b (label False, first in tree order)
        "float16/1": jnp.float16,  # h
        "float32/1": jnp.float32,  # s, w
    }
    assert flat["float32/1"].shape == (1 + 12,) and layout.num_params == 4 + 6 + 1 + 12
    assert layout.labels() == {"float32/0": False, "float16/1": True, "float32/1": True}
    back = layout.unravel(flat)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        assert got.dtype == want.dtype and got.shape == np.shape(want)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="labels"):
        FlatLayout(params, labels={"w": True})


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"centered": True, "momentum": f32(0.9), "nesterov": True},
        {"weight_decay": f32(0.1), "weight_decay_mask": {"w": True, "b": False, "h": True, "s": False}},
        {"weight_decay": f32(0.1), "decoupled_weight_decay": True, "bias_correction": True},
    ],
)
def test_flat_state_gives_the_per_leaf_results(options):
    hyper = Hyper(learning_rate=f32(0.01), **options)
    params, grads = _mixed_problem(1, 25)
    per_leaf = run_steps(rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs()), params, grads)
    flat = run_steps(rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs(), flat=True), params, grads)
    for got, want in zip(jax.tree.leaves(flat[:2]), jax.tree.leaves(per_leaf[:2]), strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=1e-6, atol=1e-7)
    # And both follow the float64 reference (the float32 leaves; float16 outputs round).
    want_updates, _, ref = rmsprop_trajectory(hyper, params, steps_list(grads))
    for i, want in enumerate(want_updates):
        got = step_slice(flat[1], i)
        assert_tree_close({k: got[k] for k in ("w", "b", "s")}, {k: want[k] for k in ("w", "b", "s")}, 1e-5)
    # nu per leaf, read through the layout (float32 leaves: float16 params round differently).
    layout = FlatLayout(params, labels=options.get("weight_decay_mask"))
    nu = layout.unravel(flat[2].nu)
    assert_tree_close({k: nu[k] for k in ("w", "b", "s")}, {k: ref.nu[k] for k in ("w", "b", "s")}, 1e-5)


def test_flat_scale_by_rms_matches_the_reference():
    params, grads = random_problem(2, 20)
    tx = rmsprop_jax.scale_by_rms(decay=f32(0.95), centered=True, flat=True)
    state = tx.init(params)
    # 16 elements, padded to a whole multiple of STATE_ALIGN.
    assert set(state.nu) == {"float32/0"} and state.nu["float32/0"].shape == (STATE_ALIGN,)
    ref = ScaleByRmsReference(params, Hyper(decay=f32(0.95), centered=True))
    for g in steps_list(grads):
        s, state = tx.update(g, state)
        assert_tree_close(s, ref.update(g), 1e-5)
    # The padding sees zero gradients: its averages stay exactly zero.
    assert not np.any(np.asarray(state.nu["float32/0"][16:])) and not np.any(np.asarray(state.mu["float32/0"][16:]))


def _fusions(fn, *args) -> int:
    hlo = jax.jit(fn, donate_argnums=tuple(range(min(2, len(args))))).lower(*args).compile().as_text()
    entry = hlo[hlo.index("\nENTRY") :]
    return len(re.findall(r"\bfusion\(", entry.split("\n}\n")[0]))


def test_flat_state_writes_leaves_plus_a_constant_number_of_buffers():
    n_leaves = 60
    params = {f"p{i:03d}": jnp.full((8,), 1.0 + i) for i in range(n_leaves)}
    grads = jax.tree.map(lambda p: p * 0.1, params)

    def step_of(tx):
        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return step

    for options in ({}, {"centered": True, "momentum": 0.9}):
        per_leaf = rmsprop_jax.rmsprop(1e-3, **options)
        flat = rmsprop_jax.rmsprop(1e-3, flat=True, **options)
        n_per_leaf = _fusions(step_of(per_leaf), params, per_leaf.init(params), grads)
        n_flat = _fusions(step_of(flat), params, flat.init(params), grads)
        assert n_per_leaf >= 2 * n_leaves
        assert n_flat <= n_leaves + 6


def test_flat_parameter_training_runs_o1_kernels_and_matches_pytree_training():
    weights = [0.1 * jnp.cos(jnp.arange(16.0) + i).reshape(4, 4) for i in range(20)]
    params = {f"layer{i}": {"w": w, "b": jnp.zeros(4)} for i, w in enumerate(weights)}
    mask = jax.tree.map(lambda x: x.ndim == 2, params)  # decay the weights, not the biases
    layout = FlatLayout(params, labels=mask)
    x = jnp.linspace(-1, 1, 16).reshape(4, 4)

    def loss(tree):
        # Residual layers keep every gradient of order one. Through a plain tanh stack the first
        # layers' gradients vanish to the order of eps, where RMSprop's step g / (sqrt(nu) + eps)
        # turns ulp-level differences between two compilations into different steps.
        h = x
        for i in range(20):
            h = h + jnp.tanh(h @ tree[f"layer{i}"]["w"] + tree[f"layer{i}"]["b"])
        return jnp.sum((h - 0.5) ** 2)

    tx_tree = rmsprop_jax.rmsprop(0.01, weight_decay=0.1, weight_decay_mask=mask)
    tx_flat = rmsprop_jax.rmsprop(0.01, weight_decay=0.1, weight_decay_mask=layout.labels())

    def tree_step(p, s):
        u, s = tx_tree.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    def flat_step(fp, s):
        g = jax.grad(lambda fp: loss(layout.unravel(fp)))(fp)
        u, s = tx_flat.update(g, s, fp)
        return optax.apply_updates(fp, u), s

    fp = layout.ravel(params)
    tree_state, flat_state = tx_tree.init(params), tx_flat.init(fp)
    tree_fn, flat_fn = jax.jit(tree_step), jax.jit(flat_step)
    p = params
    for _ in range(30):
        p, tree_state = tree_fn(p, tree_state)
        fp, flat_state = flat_fn(fp, flat_state)
    assert_tree_close(layout.unravel(fp), p, 1e-5)
    # Same model, same backward pass: on top of it the flat optimizer step adds a constant
    # number of kernels, the pytree step at least one per leaf (its parameter output).
    n_grad = _fusions(lambda fp: jax.grad(lambda fp: loss(layout.unravel(fp)))(fp), layout.ravel(params))
    n_flat = _fusions(flat_step, layout.ravel(params), tx_flat.init(layout.ravel(params)))
    n_tree = _fusions(tree_step, params, tx_tree.init(params))
    assert n_flat <= n_grad + 8
    assert n_tree >= n_grad + 40
