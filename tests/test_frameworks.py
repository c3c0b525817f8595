"""rmsprop_jax inside flax (nnx.Optimizer, linen TrainState) and equinox.

Each test trains a small MLP with the framework's own training idiom and
checks it against the same network written by hand in plain JAX, started from
the same weights and trained with a plain optax loop: the framework must hand
the optimizer the right gradients, params and state, so the two runs agree to
float32 rounding, and the loss must fall.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import nnx_update

import rmsprop_jax

N_STEPS = 25


def make_tx() -> optax.GradientTransformation:
    return rmsprop_jax.rmsprop(
        1e-2, centered=True, momentum=0.9, weight_decay=1e-4, decoupled_weight_decay=True, skip_nonfinite=True
    )


def data() -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = (np.sin(x @ np.array([1.0, -2.0, 0.5, 0.0])) + 0.1 * rng.normal(size=32)).astype(np.float32)[:, None]
    return jnp.asarray(x), jnp.asarray(y)


def mlp(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """The reference network: (in, out) kernels, tanh hidden layer."""
    return jnp.tanh(x @ p["w0"] + p["b0"]) @ p["w1"] + p["b1"]


def mse(prediction: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((prediction - y) ** 2)


def plain_run(p: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], list[float]]:
    """The reference training loop: plain pytree, jax.grad, optax.apply_updates."""
    x, y = data()
    tx = make_tx()
    state = tx.init(p)

    @jax.jit
    def step(p: Any, state: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(lambda q: mse(mlp(q, x), y))(p)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    losses = []
    for _ in range(N_STEPS):
        p, state, loss = step(p, state)
        losses.append(float(loss))
    return p, losses


def assert_close_to_plain(got: dict[str, Any], want: dict[str, Any]) -> None:
    for name in want:
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=2e-5, atol=2e-6, err_msg=name)


def assert_learned(losses: list[float]) -> None:
    assert losses[-1] < 0.7 * losses[0], losses


def test_flax_nnx_optimizer() -> None:
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.hidden = nnx.Linear(4, 8, rngs=rngs)
            self.out = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.out(jnp.tanh(self.hidden(x)))

    model = MLP(nnx.Rngs(0))
    start = {
        "w0": model.hidden.kernel[...],
        "b0": model.hidden.bias[...],
        "w1": model.out.kernel[...],
        "b1": model.out.bias[...],
    }
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
    x, y = data()

    @nnx.jit
    def train_step(model: Any, optimizer: Any) -> jax.Array:
        loss, grads = nnx.value_and_grad(lambda m: mse(m(x), y))(model)
        nnx_update(optimizer, model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(N_STEPS)]
    want, want_losses = plain_run(start)
    got = {
        "w0": model.hidden.kernel[...],
        "b0": model.hidden.bias[...],
        "w1": model.out.kernel[...],
        "b1": model.out.bias[...],
    }
    assert_close_to_plain(got, want)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert_learned(losses)
    opt_state = optimizer.opt_state
    assert int(opt_state.count[...]) == N_STEPS
    assert int(opt_state.skipped[...]) == 0
    assert opt_state.nu["hidden"]["kernel"][...].shape == (4, 8)


def test_flax_linen_train_state() -> None:
    nn = pytest.importorskip("flax.linen")
    train_state = pytest.importorskip("flax.training.train_state")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            hidden = nn.Dense(8)(x)  # Dense_0
            return nn.Dense(1)(jnp.tanh(hidden))  # Dense_1

    x, y = data()
    model = MLP()
    variables = model.init(jax.random.key(0), x)
    state = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=make_tx())

    @jax.jit
    def train_step(state: Any) -> tuple[Any, jax.Array]:
        def loss_fn(params: Any) -> jax.Array:
            return mse(state.apply_fn({"params": params}, x), y)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    def as_plain(params: Any) -> dict[str, jax.Array]:
        return {
            "w0": params["Dense_0"]["kernel"],
            "b0": params["Dense_0"]["bias"],
            "w1": params["Dense_1"]["kernel"],
            "b1": params["Dense_1"]["bias"],
        }

    start = as_plain(state.params)
    losses = []
    for _ in range(N_STEPS):
        state, loss = train_step(state)
        losses.append(float(loss))
    want, want_losses = plain_run(start)
    assert_close_to_plain(as_plain(state.params), want)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert_learned(losses)
    assert int(state.step) == N_STEPS and int(state.opt_state.count) == N_STEPS
    assert jax.tree.structure(state.opt_state.nu) == jax.tree.structure(state.params)


def test_equinox_with_filter() -> None:
    eqx = pytest.importorskip("equinox")

    model = eqx.nn.MLP(in_size=4, out_size=1, width_size=8, depth=1, activation=jnp.tanh, key=jax.random.key(0))
    tx = make_tx()
    # eqx.filter keeps the float arrays and puts None in place of everything
    # else (the activation function, static sizes): the optimizer skips them.
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    x, y = data()

    @eqx.filter_jit
    def train_step(model: Any, opt_state: Any) -> tuple[Any, Any, jax.Array]:
        def loss_fn(m: Any) -> jax.Array:
            return mse(jax.vmap(m)(x), y)

        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    def as_plain(m: Any) -> dict[str, jax.Array]:
        # Equinox's Linear computes weight @ x: its weight is the transposed kernel.
        return {"w0": m.layers[0].weight.T, "b0": m.layers[0].bias, "w1": m.layers[1].weight.T, "b1": m.layers[1].bias}

    start = as_plain(model)
    losses = []
    for _ in range(N_STEPS):
        model, opt_state, loss = train_step(model, opt_state)
        losses.append(float(loss))
    want, want_losses = plain_run(start)
    assert_close_to_plain(as_plain(model), want)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert_learned(losses)
    assert int(opt_state.count) == N_STEPS
    assert opt_state.nu.layers[0].weight.shape == (8, 4)
    assert opt_state.nu.activation is None
