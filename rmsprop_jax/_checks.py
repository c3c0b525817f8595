"""Argument checks shared by the transforms.

Hyperparameters may be Python numbers, concrete arrays, or tracers (e.g. when
``optax.inject_hyperparams`` rebuilds the transform inside a jitted update).
Only values that are concrete can be checked at construction; tracers pass
through unchecked, which is why every check here first asks `concrete_float`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The smallest positive normal float32. Arithmetic runs in at least float32, so
# an eps at or above this can never vanish from a denominator; below it (or
# when eps is traced) the update guards 0/0 explicitly.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def concrete_float(value: Any) -> float | None:
    """Returns `value` as a Python float when it is a concrete scalar, else None."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (bool, int, float, np.number)):
        return float(value)
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        try:
            return float(value)
        except (TypeError, jax.errors.ConcretizationTypeError):
            return None
    return None


def check_interval(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    high_open: bool = False,
) -> None:
    """Raises ValueError if a concrete `value` is NaN or outside [low, high] (or [low, high))."""
    x = concrete_float(value)
    if x is None:
        return
    closing = ")" if high_open else "]"
    upper = "inf" if math.isinf(high) else f"{high:g}"
    above = x >= high if high_open else x > high
    if math.isnan(x) or x < low or above:
        raise ValueError(f"{name} must be in [{low:g}, {upper}{closing}, got {x!r}.")


def check_learning_rate(learning_rate: Any) -> None:
    """Rejects a concrete learning rate that is negative or NaN; schedules pass."""
    if callable(learning_rate):
        return
    check_interval("learning_rate", learning_rate, 0.0)


def resolve_state_dtype(nu_dtype: Any) -> jnp.dtype | None:
    """Validates `nu_dtype` and returns it as a dtype (None stays None)."""
    if nu_dtype is None:
        return None
    try:
        dtype = jnp.dtype(nu_dtype)
    except TypeError as error:
        raise ValueError(
            f"nu_dtype must be None or a floating dtype such as jnp.float32 or jnp.bfloat16, got {nu_dtype!r}."
        ) from error
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"nu_dtype must be None or a floating dtype such as jnp.float32 or jnp.bfloat16, got {dtype}.")
    return dtype


def check_inexact(leaves: list[jax.Array], what: str) -> None:
    """Raises TypeError when a leaf is not a floating or complex array."""
    for leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"rmsprop_jax requires floating or complex {what}; got a leaf of "
                f"dtype {dtype} with shape {jnp.shape(leaf)}. Mask integer leaves "
                "out (e.g. with optax.masked) or cast them to a floating dtype."
            )


def check_same_structure(
    expected: jax.tree_util.PyTreeDef,
    got: jax.tree_util.PyTreeDef,
    expected_name: str,
    got_name: str,
) -> None:
    """Raises ValueError naming both tree structures when they differ."""
    if expected != got:
        raise ValueError(
            f"The {got_name} do not have the tree structure of the {expected_name}.\n"
            f"  {expected_name}: {expected}\n  {got_name}: {got}"
        )


def mask_leaves(mask: Any, params: Any, treedef: jax.tree_util.PyTreeDef, name: str) -> list[bool]:
    """Per-leaf Python bools of a mask option: a tree of bools shaped like the params, or a function of them.

    None means True for every leaf.
    """
    if mask is None:
        return [True] * treedef.num_leaves
    tree = mask(params) if callable(mask) else mask
    leaves, mask_treedef = jax.tree.flatten(tree)
    check_same_structure(treedef, mask_treedef, "params", name)
    try:
        return [bool(leaf) for leaf in leaves]
    except jax.errors.ConcretizationTypeError as error:
        raise TypeError(f"{name} leaves must be Python bools, not traced arrays.") from error
