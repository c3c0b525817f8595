"""Flat-parameter training of a small network: O(1) optimizer kernels per step.

Trains the same MLP (with a weight-decay mask on the weight matrices only) twice on a toy
regression, once with the params as a pytree and once as flat vectors through
`rmsprop_jax.flat.FlatLayout`, checks that both reach the same params, and prints the time of a
training step (forward + backward + update) and the number of compiled kernels of each.

    python benchmarks/flat_params_example.py [--layers 40] [--width 32] [--steps 200]
"""

from __future__ import annotations

import argparse
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from rmsprop_jax.flat import FlatLayout


def init(key: jax.Array, layers: int, width: int) -> dict[str, dict[str, jax.Array]]:
    keys = jax.random.split(key, layers)
    return {
        f"layer{i:03d}": {"w": jax.random.normal(k, (width, width)) / np.sqrt(width), "b": jnp.zeros(width)}
        for i, k in enumerate(keys)
    }


def forward(params: dict, x: jax.Array) -> jax.Array:
    for layer in params.values():
        x = x + jnp.tanh(x @ layer["w"] + layer["b"])  # residual blocks keep a deep net trainable
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    key = jax.random.key(0)
    params = init(key, args.layers, args.width)
    x = jax.random.normal(jax.random.fold_in(key, 1), (64, args.width))
    y = jnp.sin(x)

    def loss(tree: dict) -> jax.Array:
        return jnp.mean((forward(tree, x) - y) ** 2)

    decay_mask = jax.tree.map(lambda a: a.ndim == 2, params)  # weights yes, biases no
    layout = FlatLayout(params, labels=decay_mask)  # one vector per (dtype, mask value)
    tx_tree = rmsprop_jax.rmsprop(1e-3, weight_decay=1e-4, weight_decay_mask=decay_mask)
    tx_flat = rmsprop_jax.rmsprop(1e-3, weight_decay=1e-4, weight_decay_mask=layout.labels())

    @jax.jit
    def tree_step(p: dict, s: optax.OptState) -> tuple[dict, optax.OptState]:
        updates, s = tx_tree.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    @jax.jit
    def flat_step(fp: dict, s: optax.OptState) -> tuple[dict, optax.OptState]:
        grads = jax.grad(lambda fp: loss(layout.unravel(fp)))(fp)  # gradients come out flat
        updates, s = tx_flat.update(grads, s, fp)
        return optax.apply_updates(fp, updates), s

    flat = layout.ravel(params)  # once, at the start of training
    runs = {"pytree": (tree_step, params, tx_tree.init(params)), "flat": (flat_step, flat, tx_flat.init(flat))}
    results = {}
    for name, (step, p, s) in runs.items():
        hlo = step.lower(p, s).compile().as_text()
        kernels = len(re.findall(r"\bfusion\(", hlo[hlo.index("\nENTRY") :]))
        p, s = step(p, s)  # compile and warm up
        jax.block_until_ready(p)
        start = time.perf_counter()
        for _ in range(args.steps - 1):
            p, s = step(p, s)
        jax.block_until_ready(p)
        seconds = (time.perf_counter() - start) / (args.steps - 1)
        results[name] = p
        print(f"{name:7s} {seconds * 1e6:9.1f} µs/step  {kernels:5d} kernels")
    final = layout.unravel(results["flat"])
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(results["pytree"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    print(f"same params after {args.steps} steps; final loss {float(loss(final)):.4g}")


if __name__ == "__main__":
    main()
