"""Checkpoint and resume: the state is a plain pytree whose layout never changes.

A run that is stopped, saved (with orbax-checkpoint or with ``numpy.savez`` of
the leaves), restored and continued must produce bitwise the same params and
state as the run that was never interrupted. The expectations are the
uninterrupted run itself; nothing is compared with a stored number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rmsprop_jax

N_STEPS = 6
SPLIT = 3


def make_tx(kind: str = "full") -> optax.GradientTransformation:
    if kind == "full":
        schedule = optax.warmup_cosine_decay_schedule(0.0, 0.05, 2, 10)
        return rmsprop_jax.rmsprop(
            schedule,
            centered=True,
            momentum=0.9,
            nesterov=True,
            bias_correction=True,
            weight_decay=1e-3,
            skip_nonfinite=True,
        )
    if kind == "chain":
        return optax.chain(optax.clip_by_global_norm(1.0), rmsprop_jax.rmsprop(0.01, momentum=0.5))
    return rmsprop_jax.rmsprop(0.01)


def initial_params(dtype: Any = jnp.float32) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "dense": {"w": jnp.asarray(rng.normal(size=(8, 4)), dtype), "b": jnp.zeros(4, dtype)},
        "scale": jnp.asarray(1.5, dtype),
    }


def gradient_stream(n: int, dtype: Any = jnp.float32) -> list[Any]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        g = {
            "dense": {
                "w": jnp.asarray(rng.normal(size=(8, 4)), dtype),
                "b": jnp.asarray(rng.normal(size=4), dtype),
            },
            "scale": jnp.asarray(rng.normal(), dtype),
        }
        if i == 1:  # one skipped step, so the skip counter is part of what is restored
            g["dense"]["b"] = g["dense"]["b"].at[0].set(jnp.nan)
        out.append(g)
    return out


def make_step(tx: optax.GradientTransformation) -> Any:
    @jax.jit
    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def train(tx: optax.GradientTransformation, params: Any, state: Any, grads: list[Any]) -> tuple[Any, Any]:
    step = make_step(tx)
    for g in grads:
        params, state = step(params, state, g)
    return params, state


def assert_same_bits(a: Any, b: Any) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, (ta, tb)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, x.shape, y.dtype, y.shape)
        assert x.tobytes() == y.tobytes()


def uninterrupted(kind: str) -> tuple[Any, Any]:
    tx = make_tx(kind)
    params = initial_params()
    return train(tx, params, tx.init(params), gradient_stream(N_STEPS))


def first_half(kind: str) -> tuple[Any, Any]:
    tx = make_tx(kind)
    params = initial_params()
    return train(tx, params, tx.init(params), gradient_stream(N_STEPS)[:SPLIT])


def second_half(kind: str, params: Any, state: Any) -> tuple[Any, Any]:
    # A new optimizer object, as after a restart.
    return train(make_tx(kind), params, state, gradient_stream(N_STEPS)[SPLIT:])


@pytest.mark.parametrize("kind", ["full", "chain", "plain"])
def test_orbax_save_restore_continue_is_bitwise(kind: str, tmp_path: Path) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    want = uninterrupted(kind)
    params, state = first_half(kind)
    checkpointer = ocp.StandardCheckpointer()
    path = tmp_path / "checkpoint"
    checkpointer.save(path, {"params": params, "opt_state": state})
    checkpointer.wait_until_finished()
    del params, state

    # Restore into the structure a fresh process would build.
    tx = make_tx(kind)
    target = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p)}, initial_params())
    restored = checkpointer.restore(path, target)
    assert jax.tree.structure(restored) == jax.tree.structure(target)
    got = second_half(kind, restored["params"], restored["opt_state"])
    assert_same_bits(got, want)
    if kind == "full":
        assert int(got[1].skipped) == 1


@pytest.mark.parametrize("kind", ["full", "chain"])
def test_numpy_savez_restore_continue_is_bitwise(kind: str, tmp_path: Path) -> None:
    want = uninterrupted(kind)
    params, state = first_half(kind)
    leaves = jax.tree.leaves((params, state))
    np.savez(tmp_path / "checkpoint.npz", *[np.asarray(leaf) for leaf in leaves])
    del params, state, leaves

    tx = make_tx(kind)
    template = (initial_params(), tx.init(initial_params()))
    template_leaves, treedef = jax.tree.flatten(template)
    with np.load(tmp_path / "checkpoint.npz") as data:
        loaded = [data[f"arr_{i}"] for i in range(len(template_leaves))]
        assert len(data.files) == len(template_leaves)
    # npz has no bfloat16: such leaves come back as raw 2-byte records, so
    # every leaf is reinterpreted with the dtype of the fresh template.
    leaves = [
        jnp.asarray(np.asarray(x).view(t.dtype).reshape(t.shape)) for x, t in zip(loaded, template_leaves, strict=True)
    ]
    params, state = jax.tree.unflatten(treedef, leaves)
    assert_same_bits(second_half(kind, params, state), want)


def test_numpy_savez_roundtrip_with_bfloat16_params(tmp_path: Path) -> None:
    tx = make_tx("full")
    params = initial_params(jnp.bfloat16)
    grads = gradient_stream(N_STEPS, jnp.float32)
    want = train(tx, params, tx.init(params), grads)
    mid = train(tx, params, tx.init(params), grads[:SPLIT])
    leaves, treedef = jax.tree.flatten(mid)
    np.savez(tmp_path / "bf16.npz", *[np.asarray(x) for x in leaves])
    with np.load(tmp_path / "bf16.npz") as data:
        back = [jnp.asarray(np.asarray(data[f"arr_{i}"]).view(x.dtype)) for i, x in enumerate(leaves)]
    got = train(make_tx("full"), *jax.tree.unflatten(treedef, back), grads[SPLIT:])
    assert_same_bits(got, want)


def test_two_identical_runs_are_bitwise_identical() -> None:
    assert_same_bits(uninterrupted("full"), uninterrupted("full"))


def test_two_identical_runs_with_optimizer_rebuilt_are_identical_eagerly() -> None:
    def eager_run() -> tuple[Any, Any]:
        tx = make_tx("full")
        params = initial_params()
        state = tx.init(params)
        for g in gradient_stream(3):
            updates, state = tx.update(g, state, params)
            params = optax.apply_updates(params, updates)
        return params, state

    assert_same_bits(eager_run(), eager_run())


# --------------------------------------------------------------------------- stable layout


def layout(tree: Any) -> Any:
    return jax.tree.structure(tree), [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize(
    ("param_dtype", "grad_dtype"),
    [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32), (jnp.bfloat16, jnp.bfloat16), (jnp.float16, jnp.float32)],
    ids=["f32", "bf16-params-f32-grads", "bf16", "f16-params-f32-grads"],
)
def test_state_layout_is_stable_across_steps(param_dtype: Any, grad_dtype: Any) -> None:
    tx = make_tx("full")
    params = initial_params(param_dtype)
    state = tx.init(params)
    before = layout((params, state))
    # Half-precision params get float32 state.
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.nu))
    step = make_step(tx)
    for g in gradient_stream(4, grad_dtype):
        params, state = step(params, state, g)
        assert layout((params, state)) == before


@pytest.mark.parametrize(
    ("param_dtype", "grad_dtype"),
    [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32)],
    ids=["f32", "bf16-params-f32-grads"],
)
def test_lax_scan_over_steps_matches_the_python_loop(param_dtype: Any, grad_dtype: Any) -> None:
    """scan needs a carry whose types never change; its result is the loop's."""
    tx = make_tx("full")
    params = initial_params(param_dtype)
    grads = gradient_stream(N_STEPS, grad_dtype)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)

    @jax.jit
    def scanned(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        def body(carry: Any, g: Any) -> tuple[Any, None]:
            p, s = carry
            updates, s = tx.update(g, s, p)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(body, (params, state), grads)[0]

    got = scanned(params, tx.init(params), stacked)
    want = train(tx, params, tx.init(params), grads)
    assert layout(got) == layout(want)
    # The loop and the scan are different programs, so XLA may round a few
    # elements differently (fused multiply-adds); they agree to float32 accuracy.
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        # A few ulps of the leaf's own dtype (bfloat16 params: 8 bits of mantissa).
        rtol = 4 * float(jnp.finfo(w.dtype).eps) if jnp.issubdtype(w.dtype, jnp.floating) else 0
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=rtol, atol=rtol * 1e-3)
    assert int(got[1].skipped) == 1 and int(got[1].count) == N_STEPS - 1


def make_variant(variant: str) -> optax.GradientTransformation:
    base: dict[str, Any] = dict(centered=True, momentum=0.9, skip_nonfinite=True)
    variants: dict[str, tuple[Any, dict[str, Any]]] = {
        "base": (0.01, {}),
        "decay": (0.01, dict(decay=0.999)),
        "eps": (0.01, dict(eps=0.0)),
        "eps_in_sqrt": (0.01, dict(eps=1e-3, eps_in_sqrt=True)),
        "momentum_value": (0.01, dict(momentum=0.0)),
        "nesterov": (0.01, dict(nesterov=True)),
        "torch_momentum": (0.01, dict(lr_in_momentum=False)),
        "initial_scale": (0.01, dict(initial_scale=1.0)),
        "weight_decay": (0.01, dict(weight_decay=0.1)),
        "decoupled": (0.01, dict(weight_decay=0.1, decoupled_weight_decay=True)),
        "bias_correction": (0.01, dict(bias_correction=True)),
        "schedule": (optax.linear_schedule(0.1, 0.0, 100), {}),
        "array_lr": (jnp.asarray(0.01), {}),
        "nu_dtype": (0.01, dict(nu_dtype=jnp.float32)),
    }
    lr, extra = variants[variant]
    return rmsprop_jax.rmsprop(lr, **{**base, **extra})


VARIANTS = [
    "decay",
    "eps",
    "eps_in_sqrt",
    "momentum_value",
    "nesterov",
    "torch_momentum",
    "initial_scale",
    "weight_decay",
    "decoupled",
    "bias_correction",
    "schedule",
    "array_lr",
    "nu_dtype",
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_structure_does_not_depend_on_hyperparameter_values(variant: str) -> None:
    params = initial_params()
    want = layout(make_variant("base").init(params))
    assert layout(make_variant(variant).init(params)) == want
    # And a checkpoint of one restores into the other's template.
    state = make_variant("base").init(params)
    _, state = make_step(make_variant("base"))(params, state, gradient_stream(1)[0])
    _, again = make_step(make_variant(variant))(params, state, gradient_stream(2)[1])
    assert layout(again) == want
