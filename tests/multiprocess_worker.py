"""One process of the multi-process tests, started by ``rmsprop_jax.multihost.launch``.

``tests/test_multiprocess.py`` launches this file in several JAX processes
at once (``python multiprocess_worker.py SCENARIO --out DIR ...``) and
imports it for the single-device reference run and the shared helpers.
Importing it runs nothing.

The training problem has exact-sum gradients, so that every topology can be
compared bitwise with the single-device run: an L1 regression
``sum |x @ w + b - y|`` on small integer inputs and targets in [-3, 3].
Its gradients are ``x.T @ sign(residual)`` and ``sum(sign(residual))``,
sums of small integers that float32 adds exactly in any order, so gloo's
cross-process all-reduce gives the same bits as XLA's in-process sum.

Scenarios (each writes ``.npz`` files of the gathered params and optimizer
state, and JSON facts, into ``--out``):

* ``save`` (2 processes x 4 devices): train from scratch on a 1-D ``data``
  mesh, saving an orbax checkpoint at ``--save-at``; restore that
  checkpoint onto a (4, 2) ``("data", "model")`` mesh with the params split
  over ``model`` and resume; then train once more, checkpointing every
  ``--every`` steps, and process 1 SIGKILLs itself at ``--kill-at``.
* ``four`` (4 x 2): train from scratch; resume from the 2-process
  checkpoint; resume from the latest checkpoint the killed run left.
* ``single`` (1 x 8, no ``jax.distributed``): resume from the 2-process
  checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rmsprop_jax
from rmsprop_jax import multihost
from rmsprop_jax.sharding import abstract_state, zero1

BATCH = 64
FEATURES = 16
OUTPUTS = 256  # the state of w, (16, 256), is split over 8 devices along this dimension
SEED = 0
BIG_LEAF = ".nu['w']"  # a state leaf that zero1 splits

Params = dict[str, Any]


def make_tx() -> optax.GradientTransformation:
    return rmsprop_jax.rmsprop(1e-2, momentum=0.9)


def make_data(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `steps` batches: integer-valued float32 inputs ``(steps, B, F)`` and targets ``(steps, B, O)``.

    Batch t does not depend on `steps`.
    """
    xs, ys = [], []
    for t in range(steps):
        rng = np.random.default_rng([SEED, t])
        xs.append(rng.integers(-3, 4, size=(BATCH, FEATURES)))
        ys.append(rng.integers(-3, 4, size=(BATCH, OUTPUTS)))
    return np.asarray(xs, np.float32), np.asarray(ys, np.float32)


def init_params() -> Params:
    """Integer-valued initial params (on the host)."""
    rng = np.random.default_rng(SEED + 1)
    return {
        "w": rng.integers(-1, 2, size=(FEATURES, OUTPUTS)).astype(np.float32),
        "b": np.zeros((OUTPUTS,), np.float32),
    }


def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.sum(jnp.abs(x @ params["w"] + params["b"] - y))


def step_fn(tx: optax.GradientTransformation) -> Callable[..., tuple[Params, Any]]:
    @jax.jit
    def step(params: Params, state: Any, x: jax.Array, y: jax.Array) -> tuple[Params, Any]:
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def reference(steps: int) -> tuple[Params, Any]:
    """The single-device run: plain rmsprop, no mesh, no sharding."""
    xs, ys = make_data(steps)
    tx = make_tx()
    params = jax.tree.map(jnp.asarray, init_params())
    state = tx.init(params)
    step = step_fn(tx)
    for t in range(steps):
        params, state = step(params, state, jnp.asarray(xs[t]), jnp.asarray(ys[t]))
    return params, state


def flatten(tree: Any, prefix: str) -> dict[str, np.ndarray]:
    """``{prefix + keypath: array}`` for every leaf, e.g. ``"state.nu['w']"``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


# --------------------------------------------------------------------------- inside a cluster


class Setup(NamedTuple):
    """Everything that depends on the mesh."""

    mesh: jax.sharding.Mesh
    param_structs: Params
    x_sharding: NamedSharding
    y_sharding: NamedSharding
    tx: optax.GradientTransformation
    step: Callable[..., tuple[Params, Any]]


def setup(mesh_shape: tuple[int, ...], names: tuple[str, ...]) -> Setup:
    """zero1 over ``data``; with a ``model`` axis the params are split along it too."""
    mesh = jax.make_mesh(mesh_shape, names)
    model = "model" if "model" in names else None
    host = init_params()
    specs = {"w": P(None, model), "b": P(model)}
    structs = {
        name: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, specs[name]))
        for name, a in host.items()
    }
    tx = zero1(make_tx(), structs, axis="data")
    return Setup(mesh, structs, NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data", model)), tx, step_fn(tx))


def fresh(s: Setup) -> tuple[Params, Any]:
    host = init_params()
    params = {name: jax.device_put(a, s.param_structs[name].sharding) for name, a in host.items()}
    return params, s.tx.init(params)


def global_batch(s: Setup, x: np.ndarray, y: np.ndarray) -> tuple[jax.Array, jax.Array]:
    return (
        jax.make_array_from_callback(x.shape, s.x_sharding, lambda index: x[index]),
        jax.make_array_from_callback(y.shape, s.y_sharding, lambda index: y[index]),
    )


def checkpoint_manager(directory: Path) -> Any:
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))


def save(manager: Any, step: int, params: Params, state: Any) -> None:
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": state}), force=True)


def restore(s: Setup, directory: Path, step: int | None = None) -> tuple[int, Params, Any]:
    """(step, params, state) of checkpoint `step` (default: the latest) in `directory`, laid out for `s`."""
    import orbax.checkpoint as ocp

    with checkpoint_manager(directory) as manager:
        step = manager.latest_step() if step is None else step
        assert step is not None, f"no checkpoint in {directory}"
        target = {"params": s.param_structs, "opt_state": abstract_state(s.tx, s.param_structs)}
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    return step, restored["params"], restored["opt_state"]


def train(
    s: Setup,
    params: Params,
    state: Any,
    start: int,
    stop: int,
    *,
    manager: Any = None,
    every: int = 0,
    save_at: int | None = None,
    kill_at: int | None = None,
) -> tuple[Params, Any]:
    xs, ys = make_data(stop)
    for t in range(start, stop):
        if kill_at is not None and t == kill_at and jax.process_index() == 1:
            print(f"process 1: SIGKILL at step {t}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        params, state = s.step(params, state, *global_batch(s, xs[t], ys[t]))
        done = t + 1
        if manager is not None and ((every and done % every == 0) or done == save_at):
            save(manager, done, params, state)
    return params, state


def dump(out: Path, name: str, params: Params, state: Any) -> None:
    """Gathers params and state on every process; process 0 writes them to ``out/name.npz``."""
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather({"params": params, "state": state}, tiled=True)
    if jax.process_index() == 0:
        np.savez(out / f"{name}.npz", **flatten(gathered["params"], "params"), **flatten(gathered["state"], "state"))


def holdings(out: Path, name: str, params: Params, state: Any) -> None:
    """Writes, per process, the bytes and shard indices of the big state leaf held by its devices."""
    leaves = dict(jax.tree_util.tree_flatten_with_path(state)[0])
    big = {jax.tree_util.keystr(path): leaf for path, leaf in leaves.items()}[BIG_LEAF]
    facts = {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "big_local_bytes": sum(shard.data.nbytes for shard in big.addressable_shards),
        "big_total_bytes": big.nbytes,
        # the block of the leaf that each local device holds, as [[start, stop] per dimension]
        "big_blocks": sorted(
            {
                tuple(index.indices(size)[:2] for index, size in zip(shard.index, big.shape, strict=True))
                for shard in big.addressable_shards
            }
        ),
        "state_bytes": multihost.state_bytes(state),
        "param_w_local_bytes": sum(shard.data.nbytes for shard in params["w"].addressable_shards),
    }
    (out / f"{name}_p{jax.process_index()}.json").write_text(json.dumps(facts))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["save", "four", "single"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save-at", type=int, required=True)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args(argv)
    multihost.initialize()
    out, steps = args.out, args.steps
    saved, faulty = out / "ckpt_2x4", out / "ckpt_fault"
    data = setup((jax.device_count(),), ("data",))

    if args.scenario == "save":
        params, state = fresh(data)
        holdings(out, "holdings_2x4", params, state)
        with checkpoint_manager(saved) as manager:
            params, state = train(data, params, state, 0, steps, manager=manager, save_at=args.save_at)
        dump(out, "dp_2x4", params, state)
        other = setup((4, 2), ("data", "model"))
        start, params, state = restore(other, saved, args.save_at)
        holdings(out, "holdings_mesh42", params, state)
        params, state = train(other, params, state, start, steps)
        dump(out, "restore_2x4_mesh42", params, state)
        print("phases done; training once more, to be killed", flush=True)
        params, state = fresh(data)
        with checkpoint_manager(faulty) as manager:
            train(data, params, state, 0, steps, manager=manager, every=args.every, kill_at=args.kill_at)
        print("the killed run finished?!", flush=True)
    elif args.scenario == "four":
        params, state = fresh(data)
        holdings(out, "holdings_4x2", params, state)
        params, state = train(data, params, state, 0, steps)
        dump(out, "dp_4x2", params, state)
        start, params, state = restore(data, saved, args.save_at)
        dump(out, "restored_at_save_4x2", params, state)
        params, state = train(data, params, state, start, steps)
        dump(out, "restore_4x2", params, state)
        start, params, state = restore(data, faulty)
        if jax.process_index() == 0:
            (out / "fault_resumed_at.json").write_text(json.dumps(start))
        params, state = train(data, params, state, start, steps)
        dump(out, "fault_resume_4x2", params, state)
    else:
        start, params, state = restore(data, saved, args.save_at)
        params, state = train(data, params, state, start, steps)
        dump(out, "restore_1x8", params, state)
    print(f"process {jax.process_index()}: {args.scenario} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
