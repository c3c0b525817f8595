"""Robustness fuzzing: random pytrees, dtypes and configurations.

The property: for any valid configuration and finite gradients, a few steps of
`rmsprop` give finite updates and state that match the float64 reference
(``tests/reference.py``) within a tolerance set by the dtypes involved; any
invalid input raises one of the documented errors (ValueError for a bad
hyperparameter or mismatched trees, TypeError for non-float leaves) with a
message that names the problem. Nothing else: no unrelated exception, no NaN.

Two corners of the rule are ill-conditioned by mathematics, not by the code,
and are left out of the value comparison: ``centered`` with bias correction
(on step 1 the corrected variance is exactly ``g^2 - g^2 = 0``, so the update
is ``g / eps`` computed from a rounding residue) and ``centered`` with a decay
below 0.5 (the variance is a difference of nearly equal numbers).

The number of examples is set by ``RMSPROP_JAX_FUZZ_EXAMPLES`` (default 60
for the main property, the others in proportion).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import f32
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference import Hyper, RmspropReference, assert_tree_close

import rmsprop_jax
from rmsprop_jax import _compat

N_STEPS = 3
# Examples of the main property per run; the other properties scale with it.
# Raise it for a longer search, e.g. RMSPROP_JAX_FUZZ_EXAMPLES=1000.
FUZZ_EXAMPLES = int(os.environ.get("RMSPROP_JAX_FUZZ_EXAMPLES", "60"))


def budget(factor: float, minimum: int = 5) -> settings:
    """Settings for `factor` times the budget; no deadline (the first call of a shape compiles)."""
    return settings(
        max_examples=max(minimum, int(factor * FUZZ_EXAMPLES)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A leaf of a tree skeleton: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: str


DTYPES = ["float16", "bfloat16", "float32", "complex64"]
keys = st.text("abcdefgh", min_size=1, max_size=3)


def skeletons(dtypes: list[str]) -> st.SearchStrategy[Any]:
    shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple)
    leaves = st.one_of(st.none(), st.builds(Leaf, shapes, st.sampled_from(dtypes)))
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.dictionaries(keys, children, max_size=3),
            st.lists(children, max_size=3),
            st.lists(children, max_size=3).map(tuple),
        ),
        max_leaves=6,
    )


def build(skeleton: Any, fill: Any) -> Any:
    """The pytree of `skeleton` with every Leaf replaced by ``fill(leaf)``."""
    if isinstance(skeleton, Leaf):
        return fill(skeleton)
    if isinstance(skeleton, dict):
        return {k: build(v, fill) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [build(v, fill) for v in skeleton]
    if isinstance(skeleton, tuple):
        return tuple(build(v, fill) for v in skeleton)
    return None


def random_leaf(rng: np.random.Generator, leaf: Leaf, scale: float, zeros: float = 0.0) -> jax.Array:
    values = rng.normal(size=leaf.shape) * scale
    if leaf.dtype.startswith("complex"):
        values = values + 1j * rng.normal(size=leaf.shape) * scale
    if zeros:
        values = np.where(rng.random(leaf.shape) < zeros, 0, values)
    return jnp.asarray(values, leaf.dtype)


@st.composite
def hypers(draw: st.DrawFn) -> Hyper:
    centered = draw(st.booleans())
    bias_correction = draw(st.booleans()) and not centered
    decay = draw(st.sampled_from([0.5, 0.9, 0.99, 0.999] + ([] if centered else [0.0, 0.1])))
    momentum = draw(st.one_of(st.none(), st.sampled_from([0.0, 0.5, 0.9, 0.99])))
    schedule = draw(st.booleans())
    lr: Any = optax.linear_schedule(0.1, 0.01, 5) if schedule else draw(st.sampled_from([0.0, 1e-3, 0.1, 0.5]))
    weight_decay = draw(st.sampled_from([0.0, 0.0, 1e-3, 0.1]))
    # Hyperparameters are rounded to float32, the precision the package uses
    # for float32 leaves, so that the reference sees the same numbers.
    return Hyper(
        learning_rate=lr if schedule else f32(lr),
        decay=f32(decay),
        eps=f32(draw(st.sampled_from([0.0, 1e-8, 1e-6, 1e-3] if not centered else [1e-8, 1e-6, 1e-3]))),
        eps_in_sqrt=draw(st.booleans()),
        initial_scale=f32(draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]))),
        centered=centered,
        momentum=None if momentum is None else f32(momentum),
        nesterov=momentum is not None and draw(st.booleans()),
        lr_in_momentum=draw(st.booleans()),
        bias_correction=bias_correction,
        weight_decay=f32(weight_decay),
        decoupled_weight_decay=draw(st.booleans()),
        split_complex=draw(st.booleans()),
    )


def tolerance(dtypes: set[str], hyper: Hyper) -> float:
    """Relative tolerance: a few ulps of the narrowest dtype in play, float32 arithmetic at best.

    Bias correction divides by ``1 - decay**t``, which loses the digits that
    ``decay**t`` shares with 1: its relative error is about
    ``ulp * decay**t / (1 - decay**t) <= ulp / (1 - decay)`` for t >= 1.
    """
    f32_eps = float(jnp.finfo(jnp.float32).eps)
    eps = max([float(jnp.finfo(jnp.dtype(d)).eps) for d in dtypes] + [f32_eps])
    rtol = 8 * eps * N_STEPS + 1e-5
    if hyper.bias_correction:
        rtol += 4 * f32_eps / (1 - hyper.decay)
    return rtol


def all_finite(tree: Any) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def run_and_compare(skeleton: Any, hyper: Hyper, seed: int, *, skip_nonfinite: bool, grad_f32: bool) -> None:
    # A params tree that is None itself reads as "no params given" (see
    # test_params_tree_that_is_none_itself); every other tree is fair game.
    assume(not (skeleton is None and hyper.weight_decay > 0))
    rng = np.random.default_rng(seed)
    params = build(skeleton, lambda leaf: random_leaf(rng, leaf, 1.0))
    leaf_dtypes = {leaf.dtype for leaf in jax.tree.leaves(skeleton, is_leaf=lambda x: isinstance(x, Leaf))}

    def grad_dtype(leaf: Leaf) -> str:
        if grad_f32 and leaf.dtype in ("float16", "bfloat16"):
            return "float32"
        return leaf.dtype

    grads = [
        build(skeleton, lambda leaf: random_leaf(rng, Leaf(leaf.shape, grad_dtype(leaf)), 3.0, zeros=0.2))
        for _ in range(N_STEPS)
    ]
    tx = rmsprop_jax.rmsprop(**hyper.rmsprop_kwargs(), skip_nonfinite=skip_nonfinite)
    state = tx.init(params)
    ref = RmspropReference(params, hyper)
    update = jax.jit(tx.update)
    rtol = tolerance(leaf_dtypes, hyper)
    for i, g in enumerate(grads):
        want = ref.update(g, params)
        updates, state = update(g, state, params)
        assert jax.tree.structure(updates) == jax.tree.structure(params)
        assert all_finite(updates), f"step {i}: non-finite update"
        assert all_finite(state), f"step {i}: non-finite state"
        for u, p_leaf, gg in zip(jax.tree.leaves(updates), jax.tree.leaves(params), jax.tree.leaves(g), strict=True):
            assert u.dtype == gg.dtype and u.shape == p_leaf.shape
        assert_tree_close(updates, want, rtol, scale_floor=1e-30, what=f"updates at step {i}")
        params = optax.apply_updates(params, updates)
    assert_tree_close(state.nu, ref.nu, rtol, what="nu")
    if hyper.centered:
        assert_tree_close(state.mu, ref.mu, rtol, what="mu")
    if hyper.momentum is not None:
        assert_tree_close(state.momentum, ref.momentum, rtol, what="momentum")
    assert int(state.count) == N_STEPS
    if skip_nonfinite:
        assert int(state.skipped) == 0


@budget(1)
@given(
    skeleton=skeletons(DTYPES),
    hyper=hypers(),
    seed=st.integers(0, 2**16),
    skip_nonfinite=st.booleans(),
    grad_f32=st.booleans(),
)
def test_random_trees_and_configs_match_the_reference(
    skeleton: Any, hyper: Hyper, seed: int, skip_nonfinite: bool, grad_f32: bool
) -> None:
    run_and_compare(skeleton, hyper, seed, skip_nonfinite=skip_nonfinite, grad_f32=grad_f32)


@budget(0.4)
@given(skeleton=skeletons(["float64", "complex128", "float32"]), hyper=hypers(), seed=st.integers(0, 2**16))
def test_float64_under_x64_matches_the_reference(skeleton: Any, hyper: Hyper, seed: int) -> None:
    with _compat.enable_x64(True):
        run_and_compare(skeleton, hyper, seed, skip_nonfinite=False, grad_f32=False)
        rng = np.random.default_rng(seed)
        params = build(skeleton, lambda leaf: random_leaf(rng, leaf, 1.0))
        state = rmsprop_jax.rmsprop(0.1).init(params)
        for p, nu in zip(jax.tree.leaves(params), jax.tree.leaves(state.nu), strict=True):
            want = jnp.float64 if p.dtype in (jnp.float64, jnp.complex128) else jnp.float32
            assert nu.dtype == want  # float64 params keep float64 state


# --------------------------------------------------------------------------- documented errors

INVALID = {
    "learning_rate": [-0.1, math.nan],
    "decay": [-0.1, 1.0, 1.5, math.nan],
    "eps": [-1e-8, math.nan],
    "initial_scale": [-1.0],
    "momentum": [-0.1, 1.0, 2.0],
    "weight_decay": [-0.01],
    "nu_dtype": [jnp.int32, "not a dtype", jnp.complex64],
}


@st.composite
def invalid_configs(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    name = draw(st.sampled_from(sorted(INVALID)))
    kwargs: dict[str, Any] = {"learning_rate": 0.1, name: draw(st.sampled_from(INVALID[name]))}
    if draw(st.booleans()):
        kwargs["centered"] = True
    if name != "momentum" and draw(st.booleans()):
        kwargs["momentum"] = 0.9
    return name, kwargs


@budget(0.5, minimum=10)
@given(invalid_configs())
def test_invalid_hyperparameters_raise_documented_errors(config: tuple[str, dict[str, Any]]) -> None:
    name, kwargs = config
    with pytest.raises(ValueError, match=name):
        rmsprop_jax.rmsprop(**kwargs)
    if name in ("decay", "eps", "initial_scale", "nu_dtype"):
        scale_kwargs = {k: v for k, v in kwargs.items() if k in ("decay", "eps", "initial_scale", "nu_dtype")}
        with pytest.raises(ValueError, match=name):
            rmsprop_jax.scale_by_rms(**scale_kwargs)


def test_nesterov_without_momentum_is_a_documented_error() -> None:
    with pytest.raises(ValueError, match="nesterov"):
        rmsprop_jax.rmsprop(0.1, nesterov=True)


@budget(0.25, minimum=10)
@given(
    skeleton=skeletons(["float32", "bfloat16"]),
    int_dtype=st.sampled_from(["int32", "int8", "uint8", "bool"]),
    where=st.sampled_from(["params", "grads"]),
)
def test_non_float_leaves_raise_type_error(skeleton: Any, int_dtype: str, where: str) -> None:
    tree = {"ok": skeleton, "bad": Leaf((2,), int_dtype)}
    rng = np.random.default_rng(0)

    def fill(leaf: Leaf) -> jax.Array:
        if leaf.dtype in ("int32", "int8", "uint8", "bool"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return random_leaf(rng, leaf, 1.0)

    floats = build(tree, lambda leaf: random_leaf(rng, Leaf(leaf.shape, "float32"), 1.0))
    mixed = build(tree, fill)
    tx = rmsprop_jax.rmsprop(0.1)
    with pytest.raises(TypeError, match="floating or complex"):
        if where == "params":
            tx.init(mixed)
        else:
            tx.update(mixed, tx.init(floats), floats)


@budget(0.25, minimum=10)
@given(skeleton=skeletons(["float32"]), other=skeletons(["float32"]))
def test_mismatched_trees_raise_value_error(skeleton: Any, other: Any) -> None:
    rng = np.random.default_rng(0)
    params = build(skeleton, lambda leaf: random_leaf(rng, leaf, 1.0))
    grads = build(other, lambda leaf: random_leaf(rng, leaf, 1.0))
    assume(jax.tree.structure(params) != jax.tree.structure(grads))
    tx = rmsprop_jax.rmsprop(0.1, weight_decay=0.01)
    with pytest.raises(ValueError, match="tree structure"):
        tx.update(grads, tx.init(params), params)


def test_params_tree_that_is_none_itself() -> None:
    """``None`` is an empty pytree, but as the params argument it means "not given"."""
    tx = rmsprop_jax.rmsprop(0.1)
    updates, state = tx.update(None, tx.init(None), None)
    assert updates is None and int(state.count) == 1
    decayed = rmsprop_jax.rmsprop(0.1, weight_decay=0.01)
    with pytest.raises(ValueError, match="needs the params"):
        decayed.update(None, decayed.init(None), None)
