"""Per-device optimizer-state memory and collectives of ZeRO-1 vs plain data parallelism.

Builds a ~10M-parameter MLP on an 8-device mesh (simulated on the CPU unless
real devices are present), compiles one data-parallel train step with the
state replicated and one with `rmsprop_jax.sharding.zero1`, and prints the
per-device state bytes (from the arrays' shards and from
``compiled.memory_analysis()``) and the collectives in each compiled step.

Run: python benchmarks/zero1_memory.py
"""

from __future__ import annotations

import itertools
import os
import re

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rmsprop_jax
from rmsprop_jax.sharding import zero1

COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
WIDTHS = (1024, 4096, 1024, 1024)


def collectives(hlo: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for match in COLLECTIVE.finditer(hlo):
        found[match.group(1)] = found.get(match.group(1), 0) + 1
    return found


def per_device_bytes(tree: object) -> int:
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def main() -> None:
    n = min(8, jax.device_count())
    mesh = jax.make_mesh((n,), ("data",))
    rng = np.random.default_rng(0)
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(WIDTHS)):
        params[f"w{i}"] = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        params[f"b{i}"] = np.zeros(b, np.float32)
    n_params = sum(p.size for p in params.values())
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
    batch = jax.device_put(rng.standard_normal((8 * n, WIDTHS[0])).astype(np.float32), NamedSharding(mesh, P("data")))

    def loss(p: dict, x: jax.Array) -> jax.Array:
        for i in range(len(WIDTHS) - 1):
            x = jnp.tanh(x @ p[f"w{i}"] + p[f"b{i}"])
        return jnp.mean(x**2)

    base = rmsprop_jax.rmsprop(1e-3, centered=True, momentum=0.9)
    print(f"devices: {n}, params: {n_params:,} float32, optimizer: rmsprop(centered=True, momentum=0.9)")
    for name, tx in (("data-parallel", base), ("ZeRO-1", zero1(base, params, axis="data"))):
        state = tx.init(params)

        def step(p: dict, s: object, x: jax.Array, tx: optax.GradientTransformation = tx) -> tuple:
            updates, s = tx.update(jax.grad(loss)(p, x), s, p)
            return optax.apply_updates(p, updates), s

        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, batch).compile()
        memory = compiled.memory_analysis()
        state_only = jax.jit(lambda s: s).lower(state).compile().memory_analysis()
        print(f"\n{name}:")
        print(f"  state bytes per device (shards):          {per_device_bytes(state):>12,}")
        print(f"  state bytes per device (memory_analysis): {state_only.argument_size_in_bytes:>12,}")
        print(f"  step arguments per device:                {memory.argument_size_in_bytes:>12,}")
        print(f"  step temporaries per device:              {memory.temp_size_in_bytes:>12,}")
        print(f"  collectives in the step: {collectives(compiled.as_text())}")


if __name__ == "__main__":
    main()
