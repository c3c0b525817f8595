"""Test helpers: gradient streams, a jitted multi-step driver for optax transforms, and a flax nnx update."""

from __future__ import annotations

import inspect
from typing import Any

import jax
import numpy as np
import optax


def f32(x: float) -> float:
    """`x` rounded to the nearest float32, so the float64 reference sees the same number as the package."""
    return float(np.float32(x))


def random_problem(seed: int, steps: int, *, complex_leaf: bool = False) -> tuple[Any, Any]:
    """float32 params and a fixed stream of `steps` gradients (leading axis = step).

    The gradients do not depend on the params, so float32 rounding in the
    trajectory is not amplified by a loss landscape. The two leaves have very
    different gradient scales (and "w" a nonzero mean), so the per-element
    scaling, centering and eps all matter.
    """
    rng = np.random.default_rng(seed)
    params = {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(np.float32),
    }
    grads = {
        "w": rng.normal(0.3, 1.0, size=(steps, 3, 4)).astype(np.float32),
        "b": rng.normal(0.0, 1e-2, size=(steps, 4)).astype(np.float32),
    }
    if complex_leaf:
        params["z"] = (rng.normal(size=(5,)) + 1j * rng.normal(size=(5,))).astype(np.complex64)
        # Real and imaginary parts on different scales, so splitting them matters.
        grads["z"] = (rng.normal(0.2, 1.0, size=(steps, 5)) + 1j * rng.normal(0.0, 0.05, size=(steps, 5))).astype(
            np.complex64
        )
    return params, grads


def step_slice(stacked: Any, i: int) -> Any:
    """The tree of step `i` from a tree of stacked (step-major) arrays."""
    return jax.tree.map(lambda a: a[i], stacked)


def steps_list(stacked: Any) -> list[Any]:
    """A tree of stacked arrays as a list of per-step trees."""
    n = len(jax.tree.leaves(stacked)[0])
    return [step_slice(stacked, i) for i in range(n)]


def run_steps(tx: optax.GradientTransformation, params: Any, grads: Any, *, jit: bool = True, state: Any = None):
    """Applies `tx` to a stream of gradients, adding each update to the params.

    Returns ``(final_params, updates, final_state)`` with ``updates`` stacked
    along a leading step axis. With ``jit=True`` the whole run is one jitted
    ``lax.scan``; with ``jit=False`` it is a Python loop of eager updates.
    """
    if state is None:
        state = tx.init(params)
    if not jit:
        updates = []
        for g in steps_list(grads):
            u, state = tx.update(g, state, params)
            params = optax.apply_updates(params, u)
            updates.append(u)
        return params, jax.tree.map(lambda *u: np.stack(u), *updates), state

    def body(carry, g):
        p, s = carry
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), u

    @jax.jit
    def run(params, state, grads):
        (params, state), updates = jax.lax.scan(body, (params, state), grads)
        return params, updates, state

    return run(params, state, grads)


def nnx_update(optimizer: Any, model: Any, grads: Any) -> None:
    """``optimizer.update(model, grads)`` of a flax ``nnx.Optimizer``; before flax 0.11 the optimizer
    holds the model itself and takes the gradients only."""
    if "model" in inspect.signature(optimizer.update).parameters:
        optimizer.update(model, grads)
    else:
        optimizer.update(grads)


def step_temp_bytes(tx: optax.GradientTransformation, params: Any) -> int:
    """XLA's temporary buffer size for a jitted update + apply, params and state donated."""
    state = tx.init(params)

    def step(p: Any, s: Any, g: Any) -> Any:
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def code_values_8bit() -> np.ndarray:
    """The 256 ratios v/s of the 8-bit code map, from its definition (float64).

    A float below 1.0 with 5 mantissa bits over the top 4 binades and 3 below:
    for c >= 128, with 255 - c = 32k + j, code c is 2^-k (64 - j) / 64; for
    0 < c < 128, with 127 - c = 8k + j, it is 2^-(4 + k) (16 - j) / 16; code 0 is 0.
    """
    c = np.arange(256)
    d_fine, d_coarse = 255 - c, 127 - c
    fine = 2.0 ** -(d_fine // 32).astype(np.float64) * (64 - d_fine % 32) / 64
    coarse = 2.0 ** -(4 + d_coarse // 8).astype(np.float64) * (16 - d_coarse % 8) / 16
    return np.where(c >= 128, fine, np.where(c > 0, coarse, 0.0))
