"""Low-memory state: bytes per parameter, step time, and quality against float32 state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from benchmarks import embedding_blocks, measure
from rmsprop_jax import demo, lowmem

STATES: dict[str, dict[str, Any]] = {
    "float32": {},
    "bfloat16 + SR": {"nu_dtype": jnp.bfloat16},
    "float16 + SR": {"nu_dtype": jnp.float16},
    "8-bit + SR": {"state_bits": 8},
    "4-bit + SR": {"state_bits": 4},
    "factored": {"factored": True},
}
# A control for the classification tables: float32 state with a 12 % larger learning rate, the mean size of a
# 4-bit step relative to the float32 step on the signal-swamping stream. It tells larger steps from other effects
# of the rounding noise.
LR_CONTROLS: dict[str, float] = {"float32, lr x1.12": 1.12}
# The block layouts on an embedding-shaped leaf (rows of 128).
EMBEDDING_STATES: dict[str, dict[str, Any]] = {
    "float32": {},
    "8-bit + SR": {"state_bits": 8},
    "8-bit + SR, row blocks": {"state_bits": 8, "row_blocks": True},
    "4-bit + SR": {"state_bits": 4},
    "4-bit + SR, row blocks": {"state_bits": 4, "row_blocks": True},
}


def step_costs(
    n: int, rounds: int, min_round_s: float, cols: int = 1000, states: dict[str, dict[str, Any]] = STATES
) -> list[list[str]]:
    shape = (n // cols, cols)  # a matrix, so that the factored format applies
    params = {"w": jnp.ones(shape)}
    grads = {"w": jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32) * 1e-2)}
    runners, stats, nbytes = {}, {}, {}
    for name, options in states.items():
        tx = rmsprop_jax.rmsprop(1e-3, decay=0.999, **options)
        p = jax.tree.map(jnp.copy, params)
        state = tx.init(p)
        nbytes[name] = lowmem.state_bytes(state.nu) / n
        stats[name] = measure.compile_jax(measure.optax_step(tx), (p, state, grads))
        runners[name] = measure.JaxRunner(stats[name].fn, p, state, grads)
    timings = measure.time_interleaved(runners, rounds=rounds, min_round_s=min_round_s)
    base = timings["float32"].median
    return [
        [
            name,
            f"{nbytes[name]:.3f}",
            measure.fmt_timing(t),
            f"{t.median / base:.2f}",
            f"{stats[name].bytes_accessed / n:.1f}",
            str(stats[name].fusions),
            measure.fmt_bytes(stats[name].temp_bytes),
        ]
        for name, t in timings.items()
    ]


def nu_error(n: int, steps: int) -> list[list[str]]:
    """The stored nu against a float32 run on the same gradient stream (decay 0.999, gradients shrink 100x halfway).

    Besides the error of nu itself, the step-size ratio: with the same gradient, a step taken with the stored
    nu is sqrt(nu_float32 / nu_stored) times the float32 step (ε aside).
    """
    rng = np.random.default_rng(1)
    scales = 10 ** rng.uniform(-1, 1, size=n)
    grads = (rng.normal(size=(steps, n)) * scales).astype(np.float32)
    grads[steps // 2 :] *= 0.01  # signal swamping: (1 - decay) g^2 is now far below one code step
    shape = (n // 256, 256)  # a matrix, so that the factored format applies when n >= 128 * 256
    grads = grads.reshape((steps, *shape))
    params = {"w": jnp.zeros(shape)}

    def final_nu(options: dict[str, Any]) -> np.ndarray:
        tx = rmsprop_jax.scale_by_rms(decay=0.999, **options)

        @jax.jit
        def run(state: Any, grads: jax.Array) -> Any:
            return jax.lax.scan(lambda s, g: (tx.update({"w": g}, s)[1], None), state, grads)[0]

        state = run(tx.init(params), jnp.asarray(grads))
        return np.asarray(lowmem.nu_values(state.nu, params)["w"], np.float64)

    want = final_nu({})
    rows = []
    for name, options in STATES.items():
        if not options:
            continue
        got = final_nu(options)
        rel = np.abs(got / want - 1)
        step = np.sqrt(want / got)
        rows.append(
            [
                name,
                f"{np.median(rel):.2%}",
                f"{np.quantile(rel, 0.99):.2%}",
                f"{np.mean(got) / np.mean(want) - 1:+.2%}",
                f"{np.mean(step):.3f}",
                f"{np.median(step):.3f}",
            ]
        )
    return rows


def _train(loss: Any, params: Any, batches: Any, tx: optax.GradientTransformation) -> float:
    @jax.jit
    def run(params: Any, state: Any) -> Any:
        def body(carry: Any, batch: Any) -> Any:
            p, s = carry
            g = jax.grad(loss)(p, batch)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, state), batches)[0][0]

    return run(params, tx.init(params))


# params, batch indices per step, training inputs and labels, test inputs and labels
Problem = tuple[Any, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]


def _classification_quality(problems: list[Problem]) -> dict[str, tuple[float, float]]:
    """Final training loss and test accuracy of every state, means over the problems (one per seed)."""
    runs = {name: (options, 1.0) for name, options in STATES.items()}
    runs.update({name: ({}, scale) for name, scale in LR_CONTROLS.items()})
    out = {}
    for name, (options, lr_scale) in runs.items():
        results = []
        for params, idx, x_train, y_train, x_test, y_test in problems:
            tx = rmsprop_jax.rmsprop(3e-4 * lr_scale, decay=0.999, **options)
            final = _train(lambda p, i, xs=x_train, ys=y_train: demo.loss_fn(p, xs[i], ys[i]), params, idx, tx)
            loss = float(demo.loss_fn(final, x_train, y_train))
            results.append((loss, float(demo.accuracy(final, x_test, y_test))))
        loss, acc = np.mean(np.asarray(results), axis=0)
        out[name] = (float(loss), float(acc))
    return out


def digits_quality(steps: int, seeds: int) -> dict[str, tuple[float, float]] | None:
    """The digits MLP, batches of 32."""
    try:
        import sklearn.datasets
    except ImportError:
        return None
    problems = []
    for seed in range(seeds):
        data = demo.load_data(sklearn.datasets, seed)
        params = demo.init_mlp(jax.random.key(seed), [64, 256, 256, 10])
        idx = jnp.asarray(demo.batch_indices(data.x_train.shape[0], steps, 32, seed))
        problems.append((params, idx, data.x_train, data.y_train, data.x_test, data.y_test))
    return _classification_quality(problems)


def teacher_quality(steps: int, width: int, seeds: int, train: int, test: int) -> dict[str, tuple[float, float]]:
    """A wide MLP learning the classes a random MLP of the same shape assigns to Gaussian inputs.

    Inputs of 64 dimensions, 10 classes (the teacher's largest logit, scaled so that its decisions
    are not all one class), `train` samples seen in minibatches of 128, accuracy on `test` fresh
    samples. Its width × width layer is large enough to be quantized and factored, unlike the
    digits MLP's first and last layers.
    """
    sizes = [64, width, width, 10]
    problems = []
    for seed in range(seeds):
        key = jax.random.key(1000 + seed)
        teacher = jax.tree.map(lambda w: 2.0 * w, demo.init_mlp(jax.random.fold_in(key, 1), sizes))
        x = jax.random.normal(jax.random.fold_in(key, 2), (train + test, 64))
        y = jnp.argmax(demo.mlp(teacher, x), axis=-1)
        student = demo.init_mlp(jax.random.fold_in(key, 3), sizes)
        idx = jnp.asarray(demo.batch_indices(train, steps, 128, seed))
        problems.append((student, idx, x[:train], y[:train], x[train:], y[train:]))
    return _classification_quality(problems)


def regression_quality(steps: int, depth: int, width: int, seeds: int, samples: int) -> dict[str, float]:
    """A deep tanh MLP fitting a random teacher of the same shape from noisy labels (full batch).

    There are many more samples than parameters, so the student cannot memorize the label noise and
    the final loss measures the fit, not a chaotic interpolation trajectory.
    """
    out = {}
    for name, options in STATES.items():
        losses = []
        for seed in range(seeds):
            key = jax.random.key(100 + seed)
            sizes = [32] + [width] * depth + [1]
            teacher = demo.init_mlp(jax.random.fold_in(key, 1), sizes)
            student = demo.init_mlp(jax.random.fold_in(key, 2), sizes)
            x = jax.random.normal(jax.random.fold_in(key, 3), (samples, 32))

            def net(p: Any, x: jax.Array) -> jax.Array:
                for i in range(len(p) // 2):
                    x = x @ p[f"w{i}"] + p[f"b{i}"]
                    if i < len(p) // 2 - 1:
                        x = jnp.tanh(x)
                return x

            y = net(teacher, x)
            y = y + 0.3 * jnp.std(y) * jax.random.normal(jax.random.fold_in(key, 4), y.shape)

            def loss(p: Any, _: Any, x: jax.Array = x, y: jax.Array = y) -> jax.Array:
                return jnp.mean((net(p, x) - y) ** 2)

            tx = rmsprop_jax.rmsprop(1e-3, decay=0.999, **options)
            final = _train(loss, student, jnp.zeros(steps), tx)
            losses.append(float(loss(final, None)))
        out[name] = float(np.mean(losses))
    return out


def quality_rows(results: dict[str, float]) -> list[list[str]]:
    base = results["float32"]
    return [[name, f"{value:.4g}", f"{value / base - 1:+.2%}"] for name, value in results.items()]


def accuracy_rows(results: dict[str, tuple[float, float]]) -> list[list[str]]:
    base_loss, base_acc = results["float32"]
    return [
        [name, f"{loss:.4g}", f"{loss / base_loss - 1:+.2%}", f"{acc:.2%}", f"{100 * (acc - base_acc):+.2f}"]
        for name, (loss, acc) in results.items()
    ]


ACCURACY_HEADER = ["state", "final loss", "vs float32 state", "test accuracy", "vs float32 (points)"]


def section(ctx: Any) -> str:
    cfg = ctx.config
    n = 100_000 if cfg.quick else 10_000_000
    ctx.log(f"low-memory state: step cost at {n:,} params")
    cost_rows = step_costs(n, cfg.rounds, cfg.min_round_s)
    ctx.log("low-memory state: nu error")
    err_rows = nu_error(1024 if cfg.quick else 65536, 50 if cfg.quick else 2000)
    ctx.log("low-memory state: quality")
    digits = None if cfg.quick else digits_quality(1000, 3)  # the smoke run skips it (scikit-learn, compiles)
    wide = {"steps": 2000, "width": 512, "seeds": 3, "train": 32768, "test": 8192}
    if cfg.quick:
        wide = {"steps": 10, "width": 16, "seeds": 1, "train": 256, "test": 64}
    teacher = teacher_quality(**wide)
    reg = {"steps": 1000, "depth": 8, "width": 32, "seeds": 4, "samples": 16384}
    if cfg.quick:
        reg = {"steps": 20, "depth": 2, "width": 16, "seeds": 1, "samples": 256}
    regression = regression_quality(**reg)
    ctx.log("low-memory state: embedding tables")
    embedding_costs = step_costs(n, cfg.rounds, cfg.min_round_s, cols=128, states=EMBEDDING_STATES)
    embedding = embedding_blocks.compare(quick=cfg.quick)
    out = [
        "## Low-memory state",
        "",
        f"`rmsprop(1e-3, decay=0.999, ...)`, one ({n // 1000:,}, 1,000) leaf of float32 params, update + apply jitted "
        "with donation. *state B/param*: bytes of `nu` per parameter (8-bit: codes + one float32 scale per 256; "
        "4-bit: two codes per byte + one float32 scale per 128; factored: row and column means). "
        "SR = stochastic rounding.",
        "",
        measure.markdown_table(
            ["state", "state B/param", "step: median [min-max]", "x float32 state", "XLA B/param", "fusions", "temp"],
            cost_rows,
        ),
        "",
        "Signal swamping: the stored `nu` against a float32-state run on the same gradient stream (decay 0.999, "
        "per-element gradient scales over 2 decades, all gradients 100x smaller for the second half): its relative "
        "error, the bias of its mean, and the size of a step taken with it relative to the float32 step, "
        "sqrt(nu_float32 / nu), over the elements:",
        "",
        measure.markdown_table(
            ["state", "median rel. error", "99th percentile", "mean nu vs float32", "step: mean", "step: median"],
            err_rows,
        ),
        "",
    ]
    if digits is not None:
        out += [
            "Digits MLP (64-256-256-10, batch 32, lr 3e-4, decay 0.999, "
            f"{30 if cfg.quick else 1000} steps; final full training loss and test accuracy, "
            f"mean of {1 if cfg.quick else 3} seeds; *float32, lr x1.12*: float32 state with a 12 % larger learning "
            "rate, the mean 4-bit step above):",
            "",
            measure.markdown_table(ACCURACY_HEADER, accuracy_rows(digits)),
            "",
        ]
    out += [
        f"Wide teacher-student classification (MLP 64-{wide['width']}-{wide['width']}-10 learning the classes of a "
        f"random MLP of the same shape, {wide['train']:,} training samples in batches of 128, lr 3e-4, decay 0.999, "
        f"{wide['steps']} steps; final training loss and accuracy on {wide['test']:,} fresh samples, mean of "
        f"{wide['seeds']} seeds; the {wide['width']} x {wide['width']} layer is quantized or factored; the lr x1.12 "
        "control as above):",
        "",
        measure.markdown_table(ACCURACY_HEADER, accuracy_rows(teacher)),
        "",
    ]
    out += [
        f"Synthetic regression (tanh MLP, depth {reg['depth']}, width {reg['width']}, a random teacher of the same "
        f"shape, labels with 30 % noise, full batch of {reg['samples']:,}, lr 1e-3, decay 0.999, {reg['steps']} "
        f"steps; final loss, mean of {reg['seeds']} seeds):",
        "",
        measure.markdown_table(["state", "final loss", "vs float32 state"], quality_rows(regression)),
        "",
        f"Embedding tables. Step cost on one ({n // 128:,}, 128) leaf, as above; row blocks hold "
        "`block_size` consecutive elements of one row (here one block per row) instead of `block_size` rows "
        "of one column:",
        "",
        measure.markdown_table(
            ["state", "state B/param", "step: median [min-max]", "x float32 state", "XLA B/param", "fusions", "temp"],
            embedding_costs,
        ),
        "",
        "The decoded `nu` of a table under Zipf(1.1) token gradients against float32 state "
        "(`python -m benchmarks.embedding_blocks`"
        + (" --quick" if cfg.quick else "")
        + "; frequency classes by hits over the run):",
        "",
        measure.markdown_table(embedding_blocks.HEADER, embedding_blocks.table_rows(embedding)),
        "",
    ]
    return "\n".join(out)
