"""RMSprop against tuned SGD on real data: L2-regularised logistic regression on scikit-learn's data sets.

Both data sets ship inside scikit-learn. Their raw features are used, so the
problems are ill-conditioned in the way per-parameter step sizes are meant
for. The optimum f* is computed independently with Newton's method in
float64 (and certified by strong convexity); the target is a fixed gap above
it. Each optimizer gets its best learning rate from the same grid.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax

datasets = pytest.importorskip("sklearn.datasets")

L2 = 1e-3  # ridge on weights and biases: the objective is L2-strongly convex
STEPS = 1000
LOADERS = {"digits": "load_digits", "breast_cancer": "load_breast_cancer"}


@functools.cache
def dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw features with a constant bias feature appended, and one-hot labels."""
    x, y = getattr(datasets, LOADERS[name])(return_X_y=True)
    x = np.hstack([x, np.ones((len(y), 1))])
    return x, np.eye(int(y.max()) + 1)[y]


def objective64(name: str, theta: np.ndarray, hessian: bool = True):
    """Mean softmax cross-entropy + L2/2·‖θ‖², its gradient and (optionally) Hessian, in float64."""
    x, y = dataset(name)
    n, d = x.shape
    k = y.shape[1]
    w = theta.reshape(d, k)
    z = x @ w
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    value = np.mean(lse - np.sum(y * z, axis=1)) + 0.5 * L2 * np.sum(w**2)
    p = np.exp(z - lse[:, None])
    grad = (x.T @ (p - y) / n + L2 * w).ravel()
    if not hessian:
        return value, grad
    h = np.zeros((d, k, d, k))
    for a in range(k):
        for c in range(a, k):
            weights = p[:, a] * (float(a == c) - p[:, c])
            block = (x * weights[:, None]).T @ x / n
            h[:, a, :, c] = block
            h[:, c, :, a] = block.T
    return value, grad, h.reshape(d * k, d * k) + L2 * np.eye(d * k)


@functools.cache
def optimum(name: str) -> float:
    """f* by damped Newton in float64, certified by strong convexity."""
    x, y = dataset(name)
    theta = np.zeros(x.shape[1] * y.shape[1])
    for _ in range(100):
        value, grad, hess = objective64(name, theta)
        step = np.linalg.solve(hess, grad)
        decrement = grad @ step
        if decrement < 1e-20:
            break
        t = 1.0
        while objective64(name, theta - t * step, hessian=False)[0] > value - 0.25 * t * decrement:
            t /= 2
        theta = theta - t * step
    value, grad = objective64(name, theta, hessian=False)
    # L2-strong convexity: f(θ) − f* ≤ ‖∇f(θ)‖² / (2·L2).
    assert grad @ grad / (2 * L2) < 1e-12
    return float(value)


def loss_curves(name: str, make_tx, grid: list[float]) -> np.ndarray:
    """Full-batch training from zero for every learning rate in `grid`; returns losses [lr, step]."""
    x, y = dataset(name)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    def loss(w):
        return jnp.mean(-jnp.sum(y * jax.nn.log_softmax(x @ w), axis=1)) + 0.5 * L2 * jnp.sum(w**2)

    @jax.jit
    @jax.vmap
    def train(lr):
        tx = make_tx(lr)
        w = jnp.zeros((x.shape[1], y.shape[1]))

        def body(carry, _):
            w, state = carry
            value, grad = jax.value_and_grad(loss)(w)
            updates, state = tx.update(grad, state, w)
            return (optax.apply_updates(w, updates), state), value

        _, values = jax.lax.scan(body, (w, tx.init(w)), None, length=STEPS)
        return values

    return np.asarray(train(jnp.asarray(grid, jnp.float32)))


def steps_to_target(curve: np.ndarray, target: float) -> float:
    """First step whose loss is at most `target` (inf if never; NaN losses never count)."""
    hit = np.nonzero(curve <= target)[0]
    return float(hit[0]) if hit.size else np.inf


def tuned(name: str, make_tx, grid: list[float], target: float) -> tuple[float, float]:
    """Steps to `target` at the best learning rate of `grid`, and that rate.

    Rates are ranked by steps to the target, ties (never reaching it) by the
    lowest loss reached. The grid must bracket the best rate: the next larger
    rate ranks worse, so the search did not stop short of faster settings.
    """
    curves = loss_curves(name, make_tx, grid)
    ranks = [(steps_to_target(c, target), float(np.nanmin(c)) if np.any(np.isfinite(c)) else np.inf) for c in curves]
    best = min(range(len(grid)), key=lambda i: ranks[i])
    assert best < len(grid) - 1 and ranks[best + 1] > ranks[best], (name, ranks)
    return ranks[best][0], grid[best]


@pytest.mark.parametrize(
    "name, gap, grid",
    [
        # 1,797 8×8 images, 10 classes: correlated pixels, scales 0..16.
        ("digits", 0.01, [float(10**e) for e in np.arange(-3.0, 0.01, 0.25)]),
        # 569 tumours, 30 features whose scales range from 1e-3 to 4e3 (Hessian condition ~1e7).
        ("breast_cancer", 0.1, [float(10**e) for e in np.arange(-8.0, 0.01, 0.5)]),
    ],
)
def test_rmsprop_beats_tuned_sgd(name, gap, grid):
    f_star = optimum(name)
    target = f_star + gap
    _, y = dataset(name)
    assert np.log(y.shape[1]) > target  # the start (uniform predictions, loss ln k) is above the target

    sgd_steps, _ = tuned(name, optax.sgd, grid, target)
    rmsprop_steps, _ = tuned(name, rmsprop_jax.rmsprop, grid, target)

    assert np.isfinite(rmsprop_steps), rmsprop_steps
    # Tuned SGD needs at least 25% more steps (or does not get there within STEPS).
    assert 1.25 * rmsprop_steps <= sgd_steps, (rmsprop_steps, sgd_steps)
