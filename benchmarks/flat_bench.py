"""Many small leaves: per-leaf state, flat state (``flat=True``) and flat-parameter training."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import rmsprop_jax
from benchmarks import measure, workloads
from rmsprop_jax import demo
from rmsprop_jax.flat import FlatLayout


def optimizer_rows(n_leaves: int, rounds: int, min_round_s: float, compile_only: bool = False) -> list[list[str]]:
    wl = workloads.many_small(n_leaves, 256)
    params_np, grads_np = workloads.arrays(wl)
    grads = jax.device_put(grads_np)
    layout = FlatLayout(params_np)
    runners, stats = {}, {}
    setups = {
        "optax.rmsprop (pytree)": (optax.rmsprop(1e-3, eps_in_sqrt=False), False),
        "rmsprop_jax (pytree)": (rmsprop_jax.rmsprop(1e-3), False),
        "rmsprop_jax flat=True (pytree)": (rmsprop_jax.rmsprop(1e-3, flat=True), False),
        "rmsprop_jax on flat params": (rmsprop_jax.rmsprop(1e-3), True),
    }
    for name, (tx, flat_params) in setups.items():
        p = jax.device_put(params_np)
        g = grads
        if flat_params:
            p, g = layout.ravel(p), layout.ravel(grads)
        state = tx.init(p)
        stats[name] = measure.compile_jax(measure.optax_step(tx), (p, state, g))
        runners[name] = measure.JaxRunner(stats[name].fn, p, state, g)
    if compile_only:
        return [[name, f"{c.compile_s:.2f}", str(c.fusions)] for name, c in stats.items()]
    timings = measure.time_interleaved(runners, rounds=rounds, min_round_s=min_round_s)
    base = timings["optax.rmsprop (pytree)"].median
    return [
        [
            name,
            measure.fmt_timing(t),
            f"{base / t.median:.1f}",
            str(stats[name].fusions),
            f"{stats[name].compile_s:.2f}",
        ]
        for name, t in timings.items()
    ]


def end_to_end_rows(rounds: int, min_round_s: float, n_leaves: int) -> list[list[str]]:
    """Forward + backward + update + apply, as a pytree and on flat params."""
    key = jax.random.key(0)
    cases = {}
    # A small RL-style MLP (8 -> 64 -> 64 -> 4) on a batch of 32.
    mlp = demo.init_mlp(key, [8, 64, 64, 4])
    x = jax.random.normal(key, (32, 8))
    y = jax.random.normal(jax.random.fold_in(key, 1), (32, 4))
    cases["MLP 8-64-64-4, batch 32"] = (mlp, lambda p: jnp.mean((demo.mlp(p, x) - y) ** 2))
    # Many small leaves: each leaf is fitted to its own target (a per-leaf quadratic model).
    wl = workloads.many_small(n_leaves, 256)
    many = jax.device_put(workloads.arrays(wl)[0])
    targets = jax.tree.map(lambda p: jnp.full_like(p, 0.5), many)

    def many_loss(p: Any) -> jax.Array:
        return sum(
            jnp.mean((jnp.tanh(a) - t) ** 2) for a, t in zip(jax.tree.leaves(p), jax.tree.leaves(targets), strict=True)
        )

    cases[f"{n_leaves} leaves x 256"] = (many, many_loss)
    rows = []
    for name, (params, loss) in cases.items():
        mask = jax.tree.map(lambda a: a.ndim > 1, params)
        layout = FlatLayout(params, labels=mask)
        tx_tree = rmsprop_jax.rmsprop(1e-3, weight_decay=1e-4, weight_decay_mask=mask)
        tx_flat = rmsprop_jax.rmsprop(1e-3, weight_decay=1e-4, weight_decay_mask=layout.labels())

        def tree_step(p: Any, s: Any, _: Any, loss: Any = loss, tx: Any = tx_tree) -> Any:
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, u), s

        def flat_step(fp: Any, s: Any, _: Any, loss: Any = loss, tx: Any = tx_flat, layout: Any = layout) -> Any:
            g = jax.grad(lambda fp: loss(layout.unravel(fp)))(fp)
            u, s = tx.update(g, s, fp)
            return optax.apply_updates(fp, u), s

        p_tree = jax.tree.map(jnp.copy, params)
        p_flat = layout.ravel(params)
        c_tree = measure.compile_jax(tree_step, (p_tree, tx_tree.init(p_tree), 0))
        c_flat = measure.compile_jax(flat_step, (p_flat, tx_flat.init(p_flat), 0))
        runners = {
            "pytree": measure.JaxRunner(c_tree.fn, p_tree, tx_tree.init(p_tree), 0),
            "flat": measure.JaxRunner(c_flat.fn, p_flat, tx_flat.init(p_flat), 0),
        }
        t = measure.time_interleaved(runners, rounds=rounds, min_round_s=min_round_s)
        rows.append(
            [
                name,
                measure.fmt_time(t["pytree"].median),
                measure.fmt_time(t["flat"].median),
                f"{t['pytree'].median / t['flat'].median:.1f}",
                f"{c_tree.fusions} / {c_flat.fusions}",
                f"{c_tree.compile_s:.2f} / {c_flat.compile_s:.2f}",
            ]
        )
    return rows


def section(ctx: Any) -> str:
    cfg = ctx.config
    many = 50 if cfg.quick else 2000
    ctx.log(f"many small leaves: {many} x 256")
    start = time.perf_counter()
    rows = optimizer_rows(many, cfg.rounds, cfg.min_round_s)
    out = [
        f"## Many small leaves ({many:,} leaves x 256 float32)",
        "",
        "Optimizer step (update + apply, jitted, donated). *flat=True*: the state is one vector, the params stay a "
        "pytree. *flat params*: params, gradients and state are one vector (`rmsprop_jax.flat.FlatLayout`).",
        "",
        measure.markdown_table(["setup", "step: median [min-max]", "speed-up vs optax", "fusions", "compile s"], rows),
        "",
    ]
    if not cfg.quick:
        ctx.log("many small leaves: compile time at 1,000 leaves")
        compile_rows = optimizer_rows(1000, cfg.rounds, cfg.min_round_s, compile_only=True)
        out += [
            "Compile time at 1,000 leaves x 256:",
            "",
            measure.markdown_table(["setup", "compile s", "fusions"], compile_rows),
            "",
        ]
    ctx.log("many small leaves: end to end")
    e2e = end_to_end_rows(cfg.rounds, cfg.min_round_s, many)
    out += [
        "End-to-end training step (forward + backward + rmsprop with a weight-decay mask + apply), pytree params vs "
        "flat params:",
        "",
        measure.markdown_table(
            ["model", "pytree", "flat params", "speed-up", "fusions pytree / flat", "compile s"], e2e
        ),
        "",
        f"(section took {time.perf_counter() - start:.0f} s)",
        "",
    ]
    return "\n".join(out)
