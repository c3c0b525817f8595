"""Bad input gets a clear error: at construction for concrete values, at update time for trees and dtypes."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax

# How a message may spell the valid ranges.
HALF_OPEN_UNIT = r"\[0(\.0)?, ?1(\.0)?\)"  # [0, 1)
NON_NEGATIVE = r"(\[0(\.0)?, ?(inf|∞)|>= ?0|≥ ?0|non-?negative)"  # [0, inf], >= 0, non-negative


def both_transforms(**kwargs):
    """The argument checks that scale_by_rms and rmsprop share, run through both."""
    return [lambda: rmsprop_jax.scale_by_rms(**kwargs), lambda: rmsprop_jax.rmsprop(0.1, **kwargs)]


def assert_message(error: pytest.ExceptionInfo, name: str, valid_range: str) -> None:
    message = str(error.value)
    assert re.search(rf"\b{name}\b", message), message
    assert re.search(valid_range, message), message


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, math.nan, jnp.asarray(1.0), np.float32(-1.0)])
def test_decay_outside_unit_interval(value):
    for make in both_transforms(decay=value):
        with pytest.raises(ValueError) as error:
            make()
        assert_message(error, "decay", HALF_OPEN_UNIT)


@pytest.mark.parametrize("value", [-1e-8, -1.0, math.nan, jnp.asarray(-0.5)])
def test_negative_eps(value):
    for make in both_transforms(eps=value):
        with pytest.raises(ValueError) as error:
            make()
        assert_message(error, "eps", NON_NEGATIVE)


@pytest.mark.parametrize("value", [-1e-3, -1.0, math.nan, jnp.asarray(-0.1), jnp.asarray(math.nan)])
def test_bad_learning_rate(value):
    with pytest.raises(ValueError) as error:
        rmsprop_jax.rmsprop(value)
    assert_message(error, "learning_rate", NON_NEGATIVE)


@pytest.mark.parametrize("value", [1.0, 1.2, -0.5, math.nan, jnp.asarray(1.0)])
def test_momentum_outside_unit_interval(value):
    with pytest.raises(ValueError) as error:
        rmsprop_jax.rmsprop(0.1, momentum=value)
    assert_message(error, "momentum", HALF_OPEN_UNIT)


def test_nesterov_without_momentum():
    with pytest.raises(ValueError) as error:
        rmsprop_jax.rmsprop(0.1, nesterov=True)
    assert_message(error, "nesterov", r"momentum")
    assert_message(error, "momentum", HALF_OPEN_UNIT)


@pytest.mark.parametrize("value", [-1e-4, -1.0, math.nan, jnp.asarray(-0.1)])
def test_negative_weight_decay(value):
    for decoupled in (False, True):
        with pytest.raises(ValueError) as error:
            rmsprop_jax.rmsprop(0.1, weight_decay=value, decoupled_weight_decay=decoupled)
        assert_message(error, "weight_decay", NON_NEGATIVE)


@pytest.mark.parametrize("value", [-1e-3, -1.0, math.nan, jnp.asarray(-1.0)])
def test_negative_initial_scale(value):
    for make in both_transforms(initial_scale=value):
        with pytest.raises(ValueError) as error:
            make()
        assert_message(error, "initial_scale", NON_NEGATIVE)


@pytest.mark.parametrize("value", ["float99", "not a dtype", jnp.int32, np.int8, jnp.complex64, bool])
def test_unknown_nu_dtype(value):
    for make in both_transforms(nu_dtype=value):
        with pytest.raises((ValueError, TypeError)) as error:
            make()
        message = str(error.value)
        assert "nu_dtype" in message and "float" in message, message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"decay": 0.0},
        {"decay": 0.999999},
        {"eps": 0.0},
        {"initial_scale": 0.0},
        {"nu_dtype": jnp.bfloat16},
        {"nu_dtype": "float32"},
        {"nu_dtype": None},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    for make in both_transforms(**kwargs):
        make()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"learning_rate": 0.0},
        {"learning_rate": optax.linear_schedule(-1.0, 1.0, 10)},  # schedules are not evaluated here
        {"learning_rate": 0.1, "momentum": 0.0},
        {"learning_rate": 0.1, "momentum": 0.0, "nesterov": True},
        {"learning_rate": 0.1, "weight_decay": 0.0},
        {"learning_rate": jnp.asarray(0.1)},
    ],
)
def test_rmsprop_boundary_values_are_accepted(kwargs):
    rmsprop_jax.rmsprop(**kwargs)


def test_traced_hyperparameters_are_not_checked_at_construction():
    # Under jit the values are tracers; construction must not try to read them.
    @jax.jit
    def build_and_step(lr, decay, eps, momentum):
        tx = rmsprop_jax.rmsprop(lr, decay=decay, eps=eps, momentum=momentum)
        g = jnp.ones(2)
        return tx.update(g, tx.init(g))[0]

    assert np.all(np.isfinite(build_and_step(0.1, 0.9, 1e-8, 0.5)))


# ---------------------------------------------------------------------------
# Update time
# ---------------------------------------------------------------------------

MISMATCHED = [
    ({"a": jnp.ones(2), "b": jnp.ones(3)}, {"a": jnp.ones(2)}),
    ({"a": jnp.ones(2), "b": jnp.ones(3)}, {"a": jnp.ones(2), "c": jnp.ones(3)}),
    ([jnp.ones(2), jnp.ones(3)], (jnp.ones(2), jnp.ones(3))),
    ({"a": jnp.ones(2)}, {"a": [jnp.ones(2)]}),
]


@pytest.mark.parametrize("params, grads", MISMATCHED)
@pytest.mark.parametrize("transform", ["scale_by_rms", "rmsprop"])
def test_grads_with_another_tree_structure(params, grads, transform):
    if transform == "rmsprop":
        tx = rmsprop_jax.rmsprop(0.1, centered=True, momentum=0.9)
    else:
        tx = rmsprop_jax.scale_by_rms(centered=True)
    state = tx.init(params)
    with pytest.raises(ValueError) as error:
        tx.update(grads, state, params)
    message = str(error.value)
    assert str(jax.tree.structure(params)) in message, message
    assert str(jax.tree.structure(grads)) in message, message


def test_mismatch_is_reported_under_jit_too():
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    tx = rmsprop_jax.rmsprop(0.1)
    state = tx.init(params)
    with pytest.raises(ValueError, match="tree structure"):
        jax.jit(tx.update)({"a": jnp.ones(2)}, state)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_])
@pytest.mark.parametrize("transform", ["scale_by_rms", "rmsprop"])
def test_integer_params(dtype, transform):
    tx = rmsprop_jax.rmsprop(0.1) if transform == "rmsprop" else rmsprop_jax.scale_by_rms()
    params = {"x": jnp.ones(3, jnp.float32), "n": jnp.ones(3, dtype)}
    with pytest.raises(TypeError, match="floating or complex"):
        tx.init(params)


@pytest.mark.parametrize("transform", ["scale_by_rms", "rmsprop"])
def test_integer_gradients(transform):
    tx = rmsprop_jax.rmsprop(0.1) if transform == "rmsprop" else rmsprop_jax.scale_by_rms()
    state = tx.init({"n": jnp.ones(3)})
    with pytest.raises(TypeError, match="floating or complex"):
        tx.update({"n": jnp.ones(3, jnp.int32)}, state)


def test_weight_decay_without_params():
    tx = rmsprop_jax.rmsprop(0.1, weight_decay=0.1)
    state = tx.init({"x": jnp.ones(2)})
    with pytest.raises(ValueError, match="params"):
        tx.update({"x": jnp.ones(2)}, state)


def test_weight_decay_mask_with_another_structure():
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    tx = rmsprop_jax.rmsprop(0.1, weight_decay=0.1, weight_decay_mask={"a": True})
    state = tx.init(params)
    with pytest.raises(ValueError, match="weight_decay_mask"):
        tx.update(params, state, params)
