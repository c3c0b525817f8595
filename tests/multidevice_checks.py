"""Multi-device checks, run as a script on 8 simulated CPU devices.

``tests/test_sharding.py`` runs this file in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` so that the device
count of the main test process is not touched, and turns each check below
into one test. Run by hand with that flag, it prints one JSON line of
results.

Expectations come from the single-device run of the same optimizer on the
same data, from the params' own shardings, and from arithmetic on shapes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import rmsprop_jax
import rmsprop_jax.diagnostics
import rmsprop_jax.lowmem
from rmsprop_jax import _compat
from rmsprop_jax.sharding import abstract_state, zero1, zero1_state_shardings

RESULT_MARKER = "MULTIDEVICE-RESULTS "
N_DEVICES = 8
COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")

CHECKS: dict[str, Callable[[], None]] = {}


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__] = fn
    return fn


# --------------------------------------------------------------------------- helpers


def collectives(hlo: str) -> list[str]:
    """The HLO lines (of a compiled module) that contain a collective."""
    return [line.strip() for line in hlo.splitlines() if COLLECTIVE.search(line)]


def mesh_of(shape: tuple[int, ...], names: tuple[str, ...], axis_type: AxisType = AxisType.Auto) -> jax.sharding.Mesh:
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


def full_optimizer(**overrides: Any) -> optax.GradientTransformationExtraArgs:
    """rmsprop with every stateful and step-dependent option on."""
    kwargs: dict[str, Any] = dict(
        centered=True,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-3,
        skip_nonfinite=True,
    )
    kwargs.update(overrides)
    return rmsprop_jax.rmsprop(optax.exponential_decay(0.05, 2, 0.5), **kwargs)


def host_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((64, 32)).astype(np.float32),
        "v": rng.standard_normal((32, 16)).astype(np.float32),
        "b": rng.standard_normal(32).astype(np.float32),
        "s": np.float32(0.75),
    }


def host_batches(n: int, batch: int = 16) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Small-integer data: every batch sum in the gradients is exact in float32.

    The data-parallel gradient is a sum of per-device partial sums, in an
    order the single-device run does not use; with integers the sums are
    exact whatever the order, so the comparison isolates the optimizer.
    """
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        x = rng.integers(-3, 4, (batch, 64)).astype(np.float32)
        c = rng.integers(-2, 3, (batch, 32)).astype(np.float32)
        d = rng.integers(-2, 3, (batch, 16)).astype(np.float32)
        out.append((x, c, d))
    return out


def loss(p: dict[str, jax.Array], batch: tuple[jax.Array, ...]) -> jax.Array:
    x, c, d = batch
    h = x @ p["w"]
    k = x[:, :32] @ p["v"]
    data_term = jnp.sum(h * c) + jnp.sum(k * d) + jnp.sum(p["b"] * c) + p["s"] * jnp.sum(x)
    return data_term + 0.5 * sum(jnp.sum(q * q) for q in p.values())


def train(
    tx: optax.GradientTransformation,
    params: Any,
    batches: list[Any],
    put_batch: Callable[[Any], Any] = lambda b: b,
    out_shardings: Any = None,
) -> tuple[Any, Any]:
    state = tx.init(params)

    def step(p: Any, s: Any, batch: Any) -> tuple[Any, Any]:
        updates, s = tx.update(jax.grad(loss)(p, batch), s, p)
        return optax.apply_updates(p, updates), s

    jitted = jax.jit(step) if out_shardings is None else jax.jit(step, out_shardings=out_shardings)
    for batch in batches:
        params, state = jitted(params, state, put_batch(batch))
    return params, state


def single_device_run(tx: optax.GradientTransformation, n_steps: int) -> tuple[Any, Any]:
    device = jax.devices()[0]
    params = jax.device_put(host_params(), device)
    return train(tx, params, host_batches(n_steps), lambda b: jax.device_put(b, device))


def assert_bitwise(got: Any, want: Any, what: str) -> None:
    got_leaves, got_def = jax.tree.flatten(got)
    want_leaves, want_def = jax.tree.flatten(want)
    assert got_def == want_def, f"{what}: tree {got_def} != {want_def}"
    for i, (a, b) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: leaf {i} {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{what}: leaf {i} differs, max |diff| {np.max(np.abs(a - b))}"


def assert_spec(leaf: jax.Array, spec: P) -> None:
    """The leaf is laid out as `spec` on its mesh (trailing Nones do not matter)."""
    want = NamedSharding(leaf.sharding.mesh, spec)
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), f"{leaf.sharding} is not laid out as {spec}"


def assert_moved(before: Any, after: Any) -> None:
    """Guards the bitwise checks against a run that silently did nothing."""
    assert not np.array_equal(np.asarray(before["w"]), np.asarray(after["w"])), "the params did not move"


def shard_bytes(tree: Any) -> int:
    """Bytes of the first device's shards, summed over the leaves."""
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def param_specs(mesh: jax.sharding.Mesh) -> dict[str, NamedSharding]:
    """A mixed model-parallel layout: sharded on either dim, 1-D, scalar."""
    return {
        "w": NamedSharding(mesh, P(None, "model")),
        "v": NamedSharding(mesh, P("model", None)),
        "b": NamedSharding(mesh, P("model")),
        "s": NamedSharding(mesh, P()),
    }


# --------------------------------------------------------------------------- 1. sharding-native init


def state_layout_errors(params: Any, state: Any, mesh: jax.sharding.Mesh) -> list[str]:
    """Every param-shaped state leaf must have its param's sharding, every scalar be replicated on `mesh`."""
    errors = []
    param_sh = jax.tree.map(lambda p: p.sharding, params)
    for name in ("nu", "mu", "momentum"):
        subtree = getattr(state, name, None)
        if subtree is None:
            continue
        for (path, leaf), want in zip(
            jax.tree_util.tree_leaves_with_path(subtree), jax.tree.leaves(param_sh), strict=True
        ):
            if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
                errors.append(f"{name}{jax.tree_util.keystr(path)}: {leaf.sharding} != {want}")
    for name in ("count", "skipped"):
        leaf = getattr(state, name, None)
        if leaf is None:
            continue
        ok = (
            isinstance(leaf.sharding, NamedSharding)
            and leaf.sharding.mesh.devices.tolist() == mesh.devices.tolist()
            and leaf.sharding.is_fully_replicated
        )
        if not ok:
            errors.append(f"{name}: {leaf.sharding} is not replicated on the mesh")
    return errors


def init_combinations() -> list[tuple[str, str, bool, bool]]:
    return [
        (kind, axis, jit, with_mesh)
        for kind in ("rmsprop", "scale_by_rms")
        for axis in ("Auto", "Explicit")
        for jit in (False, True)
        for with_mesh in (False, True)
    ]


@check
def init_sharding_all_combinations() -> None:
    failures = []
    for kind, axis, jit, with_mesh in init_combinations():
        mesh = mesh_of((4, 2), ("data", "model"), getattr(AxisType, axis))
        shardings = {
            "w": NamedSharding(mesh, P("data", "model")),
            "v": NamedSharding(mesh, P(None, "model")),
            "u": NamedSharding(mesh, P("model", "data")),
            "b": NamedSharding(mesh, P("model")),
            "r": NamedSharding(mesh, P()),
            "s": NamedSharding(mesh, P()),
        }
        host = {
            "w": np.ones((16, 8), np.float32),
            "v": np.ones((4, 8), np.float32),
            "u": np.ones((8, 4), np.float32),
            "b": np.ones(6, np.float32),
            "r": np.ones((3, 5), np.float32),
            "s": np.float32(2.0),
        }
        params = jax.device_put(host, shardings)
        if kind == "rmsprop":
            tx = rmsprop_jax.rmsprop(0.1, centered=True, momentum=0.9, skip_nonfinite=True)
        else:
            tx = rmsprop_jax.scale_by_rms(centered=True, skip_nonfinite=True)
        init = jax.jit(tx.init) if jit else tx.init
        if with_mesh:
            with _compat.set_mesh(mesh):
                state = init(params)
        else:
            state = init(params)
        errors = state_layout_errors(params, state, mesh)
        if errors:
            failures.append(f"{kind} {axis} jit={jit} set_mesh={with_mesh}: {errors}")
    assert not failures, "\n".join(failures)


@check
def init_sharding_checker_rejects_wrong_layouts() -> None:
    """The layout check above fails on a state built on one device or replicated."""
    mesh = mesh_of((4, 2), ("data", "model"))
    params = jax.device_put({"w": np.ones((16, 8), np.float32)}, {"w": NamedSharding(mesh, P("data", "model"))})
    state = rmsprop_jax.rmsprop(0.1, centered=True, momentum=0.9).init(params)
    on_one_device = jax.device_put(state, jax.devices()[0])
    replicated = jax.device_put(state, NamedSharding(mesh, P()))
    assert not state_layout_errors(params, state, mesh)
    assert state_layout_errors(params, on_one_device, mesh)
    assert state_layout_errors(params, replicated, mesh)


# --------------------------------------------------------------------------- no collective in the step


def compiled_step_hlo(tx: optax.GradientTransformation, params: Any, pinned: bool = True) -> str:
    """HLO of update + apply_updates, gradients laid out like the params.

    With `pinned`, the outputs must keep the inputs' layouts, as they must in a
    training loop that feeds them back.
    """
    state = tx.init(params)

    def step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    out = (jax.tree.map(lambda x: x.sharding, params), jax.tree.map(lambda x: x.sharding, state)) if pinned else None
    grads = jax.tree.map(lambda x: x * 0.5, params)
    return jax.jit(step, out_shardings=out).lower(params, state, grads).compile().as_text()


@check
def step_has_no_collective_when_state_follows_params() -> None:
    for axis in ("Auto", "Explicit"):
        mesh = mesh_of((4, 2), ("data", "model"), getattr(AxisType, axis))
        params = jax.device_put(
            {"w": np.ones((16, 8), np.float32), "b": np.ones(8, np.float32), "s": np.float32(1.0)},
            {
                "w": NamedSharding(mesh, P("data", "model")),
                "b": NamedSharding(mesh, P("model")),
                "s": NamedSharding(mesh, P()),
            },
        )
        for tx in (
            full_optimizer(skip_nonfinite=False),
            rmsprop_jax.rmsprop(0.1),
            optax.chain(rmsprop_jax.scale_by_rms(centered=True), optax.scale(-0.1)),
        ):
            found = collectives(compiled_step_hlo(tx, params))
            assert not found, f"{axis}: collectives in the step: {found}"


@check
def step_collective_check_detects_a_replicated_state() -> None:
    """Negative control: a replicated state with sharded params must be gathered."""
    mesh = mesh_of((4, 2), ("data", "model"))
    params = jax.device_put({"w": np.ones((16, 8), np.float32)}, {"w": NamedSharding(mesh, P("data", "model"))})
    tx = rmsprop_jax.rmsprop(0.1)
    state = jax.device_put(tx.init(params), NamedSharding(mesh, P()))

    def step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    out = (jax.tree.map(lambda x: x.sharding, params), jax.tree.map(lambda x: x.sharding, state))
    hlo = jax.jit(step, out_shardings=out).lower(params, state, params).compile().as_text()
    assert collectives(hlo), "expected a collective to rebuild the replicated state"


@check
def guard_costs_only_scalar_all_reduces() -> None:
    mesh = mesh_of((4, 2), ("data", "model"))
    params = jax.device_put(
        {"w": np.ones((16, 8), np.float32), "b": np.ones(8, np.float32)},
        {"w": NamedSharding(mesh, P("data", "model")), "b": NamedSharding(mesh, P("model"))},
    )
    found = collectives(compiled_step_hlo(full_optimizer(skip_nonfinite=True), params))
    assert found, "the global decision needs a reduction across devices"
    for line in found:
        head = line.split("all-reduce(")[0]
        assert "all-reduce(" in line, line
        shapes = re.findall(r"\b[a-z]+\d*\[[^\]]*\]", head)
        assert shapes and all(s.endswith("[]") for s in shapes), f"non-scalar all-reduce: {line[:200]}"


# --------------------------------------------------------------------------- bitwise parity with one device
#
# Each parity check runs one optimizer configuration for a few steps on one
# device and on a mesh, and compares every bit of params and state. The
# "guard" configuration runs in the "nofma" group, in a process where XLA may
# not contract a*b+c into fused multiply-adds (see test_sharding.py for why).

N_STEPS = 3
PARITY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "no_guard": ("default", dict(skip_nonfinite=False)),
    "guard": ("nofma", dict(skip_nonfinite=True)),
    "bias_correction": ("default", dict(skip_nonfinite=False, bias_correction=True, centered=False)),
}
GROUPS: dict[str, str] = {}
_reference_cache: dict[str, tuple[Any, Any]] = {}


def reference(config: str) -> tuple[Any, Any]:
    if config not in _reference_cache:
        _reference_cache[config] = single_device_run(full_optimizer(**PARITY_CONFIGS[config][1]), N_STEPS)
    return _reference_cache[config]


def data_batches(mesh: jax.sharding.Mesh) -> tuple[list[Any], Callable[[Any], Any]]:
    sharding = NamedSharding(mesh, P("data"))
    return host_batches(N_STEPS), lambda b: jax.device_put(b, sharding)


def parity_data_parallel(config: str) -> None:
    mesh = mesh_of((N_DEVICES,), ("data",))
    params = jax.device_put(host_params(), NamedSharding(mesh, P()))
    got = train(full_optimizer(**PARITY_CONFIGS[config][1]), params, *data_batches(mesh))
    assert got[1].nu["w"].sharding.is_fully_replicated
    assert_moved(host_params(), got[0])
    assert_bitwise(got, reference(config), f"data parallel [{config}]")


def parity_model_parallel(config: str) -> None:
    for axis in ("Auto", "Explicit"):
        mesh = mesh_of((2, 4), ("data", "model"), getattr(AxisType, axis))
        params = jax.device_put(host_params(), param_specs(mesh))
        got = train(full_optimizer(**PARITY_CONFIGS[config][1]), params, *data_batches(mesh))
        assert_spec(got[1].nu["w"], P(None, "model"))
        assert_moved(host_params(), got[0])
        assert_bitwise(got, reference(config), f"model parallel ({axis}) [{config}]")


def parity_zero1_wrapper(config: str) -> None:
    for axis in ("Auto", "Explicit"):
        mesh = mesh_of((4, 2), ("data", "model"), getattr(AxisType, axis))
        params = jax.device_put(host_params(), param_specs(mesh))
        tx = zero1(full_optimizer(**PARITY_CONFIGS[config][1]), params, axis="data")
        params_out, state = got = train(tx, params, *data_batches(mesh))
        # w (64, 32) is model-sharded on dim 1, so dim 0 takes the data axis;
        # v (32, 16) is model-sharded on dim 0, so dim 1 (16, divisible by 4).
        assert_spec(state.nu["w"], P("data", "model"))
        assert_spec(state.momentum["v"], P("model", "data"))
        assert_spec(state.nu["b"], P("model"))
        assert state.count.sharding.is_fully_replicated
        for name, sharding in param_specs(mesh).items():
            assert params_out[name].sharding.is_equivalent_to(sharding, params_out[name].ndim), name
        assert_moved(host_params(), params_out)
        assert_bitwise(got, reference(config), f"ZeRO-1 wrapper ({axis}) [{config}]")


def parity_zero1_out_shardings(config: str) -> None:
    """The helper alone: state placed by device_put and kept by jit's out_shardings."""
    mesh = mesh_of((N_DEVICES,), ("data",))
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(host_params(), replicated)
    tx = full_optimizer(**PARITY_CONFIGS[config][1])
    state_sh = zero1_state_shardings(tx.init(params), axis="data")
    state = jax.device_put(tx.init(params), state_sh)

    def step(p: Any, s: Any, batch: Any) -> tuple[Any, Any]:
        updates, s = tx.update(jax.grad(loss)(p, batch), s, p)
        return optax.apply_updates(p, updates), s

    jitted = jax.jit(step, out_shardings=(jax.tree.map(lambda _: replicated, params), state_sh))
    batches, put = data_batches(mesh)
    for batch in batches:
        params, state = jitted(params, state, put(batch))
    assert_spec(state.nu["w"], P("data", None))
    assert_spec(state.nu["b"], P("data"))
    assert_spec(state.nu["s"], P())
    assert_bitwise((params, state), reference(config), f"ZeRO-1 out_shardings [{config}]")


PARITY_MODES = {
    "data_parallel": parity_data_parallel,
    "model_parallel": parity_model_parallel,
    "zero1_wrapper": parity_zero1_wrapper,
    "zero1_out_shardings": parity_zero1_out_shardings,
}
for _config, (_group, _) in PARITY_CONFIGS.items():
    for _mode, _fn in PARITY_MODES.items():
        _name = f"parity_{_mode}[{_config}]"
        CHECKS[_name] = lambda fn=_fn, config=_config: fn(config)
        GROUPS[_name] = _group


@check
def zero1_composes_with_multisteps_bitwise() -> None:
    config = PARITY_CONFIGS["no_guard"][1]

    def make() -> optax.MultiSteps:
        return optax.MultiSteps(full_optimizer(**config), every_k_schedule=2)

    want = single_device_run(make(), N_STEPS)
    mesh = mesh_of((N_DEVICES,), ("data",))
    params = jax.device_put(host_params(), NamedSharding(mesh, P()))
    got = train(zero1(make(), params, axis="data"), params, *data_batches(mesh))
    assert_spec(got[1].acc_grads["w"], P("data", None))
    assert_spec(got[1].inner_opt_state.nu["w"], P("data", None))
    assert_bitwise(got, want, "ZeRO-1 MultiSteps")


@check
def zero1_with_global_norm_clipping_matches_closely() -> None:
    """Global-norm clipping in the chain: XLA may sum the norm from the shards.

    The partial sums are combined in another order than on one device, so the
    comparison is to float32 rounding, not bitwise.
    """
    config = PARITY_CONFIGS["no_guard"][1]
    want = single_device_run(optax.chain(optax.clip_by_global_norm(1.0), full_optimizer(**config)), N_STEPS)
    mesh = mesh_of((N_DEVICES,), ("data",))
    params = jax.device_put(host_params(), NamedSharding(mesh, P()))
    tx = optax.chain(optax.clip_by_global_norm(1.0), zero1(full_optimizer(**config), params, axis="data"))
    got = train(tx, params, *data_batches(mesh))
    assert_spec(got[1][1].nu["w"], P("data", None))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@check
def zero1_eager_update_matches() -> None:
    """Called outside jit, the wrapper places and computes the same values."""
    mesh = mesh_of((N_DEVICES,), ("data",))
    params = jax.device_put({"w": host_params()["w"]}, NamedSharding(mesh, P()))
    grads = jax.tree.map(lambda x: x * 0.25 + 1.0, params)

    def make() -> optax.GradientTransformation:
        return rmsprop_jax.rmsprop(0.1, momentum=0.9, skip_nonfinite=True)

    plain = make()
    want_updates, want_state = plain.update(grads, plain.init(params), params)
    tx = zero1(make(), params)
    updates, state = tx.update(grads, tx.init(params), params)
    assert_spec(state.nu["w"], P("data", None))
    assert updates["w"].sharding.is_fully_replicated
    assert_bitwise((updates, state), (want_updates, want_state), "eager ZeRO-1")


# --------------------------------------------------------------------------- ZeRO-1 memory and collectives


def divisible_params(mesh: jax.sharding.Mesh) -> Any:
    """Params whose every dimension of interest divides by 8."""
    rng = np.random.default_rng(2)
    host = {
        "w": rng.standard_normal((128, 64)).astype(np.float32),
        "v": rng.standard_normal((40, 24)).astype(np.float32),
        "b": rng.standard_normal(64).astype(np.float32),
    }
    return jax.device_put(host, NamedSharding(mesh, P()))


@check
def zero1_state_bytes_drop_by_axis_size() -> None:
    mesh = mesh_of((N_DEVICES,), ("data",))
    params = divisible_params(mesh)
    base = full_optimizer()
    plain_state = base.init(params)
    zero_state = zero1(base, params).init(params)
    moments = ("nu", "mu", "momentum")
    full = sum(leaf.nbytes for name in moments for leaf in jax.tree.leaves(getattr(plain_state, name)))
    plain_per_device = sum(shard_bytes(getattr(plain_state, name)) for name in moments)
    zero_per_device = sum(shard_bytes(getattr(zero_state, name)) for name in moments)
    assert plain_per_device == full, (plain_per_device, full)
    assert zero_per_device * N_DEVICES == full, (zero_per_device, full)

    def argument_bytes(state: Any) -> int:
        return jax.jit(lambda s: s).lower(state).compile().memory_analysis().argument_size_in_bytes

    scalars = 2 * 4  # count and skipped, int32, replicated
    assert argument_bytes(plain_state) == full + scalars
    assert argument_bytes(zero_state) == full // N_DEVICES + scalars


@check
def zero1_step_collectives_are_the_documented_ones() -> None:
    """Gradients in replicated: one all-gather per split parameter, plus the guard's scalar all-reduce."""
    mesh = mesh_of((N_DEVICES,), ("data",))
    params = divisible_params(mesh)
    for skip in (False, True):
        tx = zero1(full_optimizer(skip_nonfinite=skip), params)
        found = collectives(compiled_step_hlo(tx, params, pinned=False))
        gathers = [line for line in found if "all-gather(" in line]
        others = [line for line in found if "all-gather(" not in line]
        assert 1 <= len(gathers) <= len(params), found
        for line in gathers:
            assert "dimensions={0}" in line, line  # every leaf here splits its first dim
        if skip:
            assert others and all("all-reduce(" in line for line in others), found
        else:
            assert not others, found


# --------------------------------------------------------------------------- abstract params and abstract_state


AXIS_TYPES = ("Auto", "Explicit")
FORMATS: dict[str, dict[str, Any]] = {
    "float32": {},
    "bfloat16": dict(nu_dtype=jnp.bfloat16),
    "8bit": dict(state_bits=8),
    "flat": dict(flat=True),
    "flat_8bit": dict(flat=True, state_bits=8),
    "4bit": dict(state_bits=4),
    "4bit_rows": dict(state_bits=4, row_blocks=True),
    "factored": dict(factored=True, factored_min_dim=64),
}


def with_moments(kw: dict[str, Any]) -> dict[str, Any]:
    """Momentum, and centered where the format allows it (not with factored)."""
    return {"momentum": 0.9, "centered": not kw.get("factored", False), **kw}


def big_host_params() -> dict[str, np.ndarray]:
    """One leaf large enough to be quantized (>= 4096 elements), plus small ones; every dim divides by 8."""
    rng = np.random.default_rng(3)
    return {
        "w": rng.integers(-3, 4, (128, 64)).astype(np.float32),
        "b": rng.integers(-3, 4, 64).astype(np.float32),
        "s": np.float32(0.5),
    }


def int_grads(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(4)
    shapes = {k: np.shape(v) for k, v in big_host_params().items()}
    return [{k: rng.integers(-3, 4, s).astype(np.float32) for k, s in shapes.items()} for _ in range(n)]


def structs(params: Any) -> Any:
    return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), params)


def assert_same_layout(got: Any, want: Any, what: str) -> None:
    """Same tree, shapes, dtypes and equivalent shardings (arrays or ShapeDtypeStructs)."""
    got_leaves, got_def = jax.tree.flatten(got)
    want_leaves, want_def = jax.tree.flatten(want)
    assert got_def == want_def, f"{what}: tree {got_def} != {want_def}"
    for i, (a, b) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype), f"{what}: leaf {i} {a.shape}{a.dtype} != {b.shape}{b.dtype}"
        if not a.shape and not isinstance(b.sharding, NamedSharding):
            continue  # a scalar that init left uncommitted (optax's counts): any placement is right
        assert a.sharding.is_equivalent_to(b.sharding, len(a.shape)), f"{what}: leaf {i} {a.sharding} != {b.sharding}"


def transforms(params: Any) -> dict[str, optax.GradientTransformation]:
    """Every kind of transform whose state follows the params."""
    out: dict[str, optax.GradientTransformation] = {
        f"rmsprop[{name}]": rmsprop_jax.rmsprop(0.1, **with_moments(kw)) for name, kw in FORMATS.items()
    }
    out["scale_by_rms"] = rmsprop_jax.scale_by_rms(centered=True, initial_scale=1.0)
    out["chain"] = optax.chain(optax.clip_by_global_norm(1.0), rmsprop_jax.rmsprop(0.1, state_bits=8))
    out["optax.adam"] = optax.adam(0.1)
    out["multisteps"] = optax.MultiSteps(rmsprop_jax.rmsprop(0.1, momentum=0.9), every_k_schedule=2)
    for name in ("float32", "8bit", "flat", "flat_8bit", "4bit", "4bit_rows", "factored"):
        out[f"zero1[{name}]"] = zero1(rmsprop_jax.rmsprop(0.1, momentum=0.9, **FORMATS[name]), params)
    return out


@check
def init_accepts_shape_dtype_structs() -> None:
    """ShapeDtypeStruct params, with or without a sharding: concrete state, placed by the struct."""
    failures = []
    for axis in AXIS_TYPES:
        mesh = mesh_of((4, 2), ("data", "model"), getattr(AxisType, axis))
        params = jax.device_put(
            big_host_params(),
            {
                "w": NamedSharding(mesh, P("data", "model")),
                "b": NamedSharding(mesh, P("model")),
                "s": NamedSharding(mesh, P()),
            },
        )
        for name, tx in transforms(params).items():
            for traced in (False, True):
                # Traced: init called inside a jitted function that builds the structs itself.
                if traced and name in ("optax.adam", "multisteps"):
                    continue  # optax's own inits do not place state built under a trace
                init = (lambda s, tx=tx: jax.jit(lambda: tx.init(s))()) if traced else tx.init
                try:
                    want = tx.init(params)
                    got = init(structs(params))
                    assert_same_layout(got, want, "sharded structs")
                    assert_bitwise(got, want, "values")
                    if not name.startswith("zero1"):
                        bare = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
                        local = init(bare)
                        assert_bitwise(local, tx.init(jax.tree.map(np.asarray, params)), "bare structs")
                        for leaf in jax.tree.leaves(local):
                            assert leaf.sharding.device_set == {jax.devices()[0]}, leaf.sharding
                except Exception as error:
                    failures.append(f"{axis} traced={traced} {name}: {type(error).__name__}: {error}")
    assert not failures, "\n".join(failures)


@check
def init_state_values_from_structs() -> None:
    """nu starts at initial_scale, every other moment at zero."""
    mesh = mesh_of((N_DEVICES,), ("data",))
    params = structs(jax.device_put(big_host_params(), NamedSharding(mesh, P())))
    for name, kw in FORMATS.items():
        tx = rmsprop_jax.rmsprop(0.1, initial_scale=0.25, **with_moments(kw))
        state = tx.init(params)
        nu = rmsprop_jax.lowmem.nu_values(state.nu)
        for leaf in jax.tree.leaves(nu):
            assert np.all(np.asarray(leaf, np.float32) == 0.25), (name, np.unique(np.asarray(leaf)))
        for moment in (state.mu, state.momentum):
            for leaf in jax.tree.leaves(moment):
                assert not np.any(np.asarray(leaf)), name


@check
def abstract_state_matches_init() -> None:
    failures = []
    for axis in AXIS_TYPES:
        mesh = mesh_of((4, 2), ("data", "model"), getattr(AxisType, axis))
        shardings = {
            "w": NamedSharding(mesh, P(None, "model")),
            "b": NamedSharding(mesh, P()),
            "s": NamedSharding(mesh, P()),
        }
        params = jax.device_put(big_host_params(), shardings)
        for name, tx in transforms(params).items():
            for given in ("arrays", "structs"):
                try:
                    got = abstract_state(tx, params if given == "arrays" else structs(params))
                    for leaf in jax.tree.leaves(got):
                        assert isinstance(leaf, jax.ShapeDtypeStruct), type(leaf)
                        assert isinstance(leaf.sharding, NamedSharding), leaf.sharding
                        assert leaf.sharding.mesh.devices.tolist() == mesh.devices.tolist(), leaf.sharding
                    assert_same_layout(got, tx.init(params), name)
                except Exception as error:
                    failures.append(f"{axis} {name} from {given}: {type(error).__name__}: {error}")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- Explicit/Auto x set_mesh x eager/jit


def mesh_context(mesh: jax.sharding.Mesh, with_mesh: bool) -> Any:
    return _compat.set_mesh(mesh) if with_mesh else contextlib.nullcontext()


@check
def zero1_and_diagnostics_in_every_mode() -> None:
    """zero1 from host arrays, its updates and the diagnostics, in every mode, equal the unsharded values."""
    host = big_host_params()
    grads = int_grads(2)
    make = lambda: rmsprop_jax.rmsprop(0.1, momentum=0.9, centered=True)  # noqa: E731
    plain = make()
    wants = {}
    for jit in (False, True):
        update = jax.jit(plain.update) if jit else plain.update
        want_state = plain.init(host)
        for g in grads:
            want_updates, want_state = update(g, want_state, host)
        wants[jit] = (want_updates, want_state)
    summary = functools.partial(rmsprop_jax.diagnostics.summary, learning_rate=0.1)
    want_summary = summary(want_state)
    want_lr = rmsprop_jax.diagnostics.effective_learning_rate(want_state, 0.1)
    failures = []
    for axis in AXIS_TYPES:
        mesh = mesh_of((N_DEVICES,), ("data",), getattr(AxisType, axis))
        for with_mesh in (False, True):
            for jit in (False, True):
                where = f"{axis} set_mesh={with_mesh} jit={jit}"
                try:
                    with mesh_context(mesh, with_mesh):
                        tx = zero1(make(), host, mesh=mesh)
                        state = tx.init(host)
                        assert_spec(state.nu["w"], P("data", None))
                        params = jax.device_put(host, NamedSharding(mesh, P()))
                        update = jax.jit(tx.update) if jit else tx.update
                        for g in grads:
                            updates, state = update(jax.device_put(g, NamedSharding(mesh, P())), state, params)
                        assert_spec(state.nu["w"], P("data", None))
                        assert updates["w"].sharding.is_fully_replicated
                        summarize = jax.jit(summary) if jit else summary
                        rates = (
                            jax.jit(rmsprop_jax.diagnostics.effective_learning_rate)
                            if jit
                            else rmsprop_jax.diagnostics.effective_learning_rate
                        )
                        got_summary = summarize(state)
                        got_lr = rates(state, 0.1)
                    assert_bitwise((updates, state), wants[jit], "update")
                    assert got_summary.keys() == want_summary.keys()
                    for key, value in want_summary.items():
                        np.testing.assert_allclose(
                            np.asarray(got_summary[key]), np.asarray(value), rtol=1e-6, err_msg=key
                        )
                    for a, b in zip(jax.tree.leaves(got_lr), jax.tree.leaves(want_lr), strict=True):
                        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
                except Exception as error:
                    failures.append(f"{where}: {type(error).__name__}: {error}")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- zero1 of every state format


def stepped(tx: optax.GradientTransformation, params: Any, put: Callable[[Any], Any]) -> tuple[Any, Any]:
    state = tx.init(params)

    @jax.jit
    def step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    for g in int_grads(N_STEPS):
        params, state = step(params, state, put(g))
    return params, state


@check
def zero1_of_every_format_splits_and_matches() -> None:
    failures = []
    for name, kw in FORMATS.items():
        for axis in AXIS_TYPES:
            try:
                make = lambda: rmsprop_jax.rmsprop(0.1, **with_moments(kw))  # noqa: E731, B023
                device = jax.devices()[0]
                want = stepped(
                    make(), jax.device_put(big_host_params(), device), functools.partial(jax.device_put, device=device)
                )
                mesh = mesh_of((N_DEVICES,), ("data",), getattr(AxisType, axis))
                replicated = NamedSharding(mesh, P())
                params = jax.device_put(big_host_params(), replicated)
                tx = zero1(make(), params)
                got = stepped(tx, params, functools.partial(jax.device_put, device=replicated))
                if name in ("bfloat16", "factored"):
                    # Not bitwise. bfloat16: XLA contracts the float32 arithmetic around the
                    # bfloat16 loads into FMAs differently in the two programs (last-bit
                    # differences, which stochastic rounding can turn into one bfloat16 ulp of
                    # the state). factored: the means over a split axis are summed per shard.
                    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                        rtol = 1e-2 if a.dtype == jnp.bfloat16 else 1e-5
                        np.testing.assert_allclose(
                            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol, atol=1e-6
                        )
                else:
                    assert_bitwise(got, want, "zero1 vs unsharded")
                moments = [getattr(got[1], m) for m in ("nu", "mu", "momentum") if getattr(got[1], m) is not None]
                # The flat vectors are split whole; otherwise the big leaf is.
                big = moments if name.startswith("flat") else [m["w"] for m in moments]
                if name == "factored":
                    # w (128, 64) splits its rows: the row means split with them, the
                    # column means (over the split axis) are replicated.
                    assert_spec(got[1].nu["w"].row, P("data"))
                    assert got[1].nu["w"].col.sharding.is_fully_replicated
                    big = [m["w"] for m in moments[1:]]
                if name == "4bit":
                    # 4-bit blocks run down 128 rows of w; a shard holds 16 rows, so the
                    # (1, 64) scales cannot split with them and stay replicated (256 bytes).
                    assert got[1].nu["w"].scale.sharding.is_fully_replicated
                    assert_spec(got[1].nu["w"].codes, P("data"))
                    big = [got[1].nu["w"].codes, *big[1:]]
                if name == "4bit_rows":
                    # Row blocks: one block per row of w (64 < 128 elements), so the (128, 1)
                    # scales split with the rows, as the (64, 64) packed codes do.
                    assert_spec(got[1].nu["w"].scale, P("data"))
                    assert_spec(got[1].nu["w"].codes, P("data"))
                    big = [got[1].nu["w"].codes, got[1].nu["w"].scale, *big[1:]]
                total = rmsprop_jax.lowmem.state_bytes(big)
                per_device = shard_bytes(big)
                assert per_device * N_DEVICES == total, (per_device, total)
            except Exception as error:
                failures.append(f"{name} {axis}: {type(error).__name__}: {error}")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- bitwise zero1, default flags

BITWISE_CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "centered": dict(centered=True),
    "bias_correction": dict(bias_correction=True),
    "eps_in_sqrt": dict(eps_in_sqrt=True),
    "momentum": dict(momentum=0.9),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "8bit": dict(state_bits=8),
    "8bit_centered_momentum": dict(state_bits=8, centered=True, momentum=0.9),
}


@check
def zero1_bitwise_for_every_listed_variant() -> None:
    """With XLA's default flags (FMA on where the CPU has it), on integer data."""
    device = jax.devices()[0]
    failures = []
    for name, kw in BITWISE_CONFIGS.items():
        want = stepped(rmsprop_jax.rmsprop(0.05, **kw), jax.device_put(big_host_params(), device), lambda g: g)
        assert_moved(big_host_params(), want[0])
        for axis in AXIS_TYPES:
            mesh = mesh_of((N_DEVICES,), ("data",), getattr(AxisType, axis))
            replicated = NamedSharding(mesh, P())
            for with_mesh in (False, True):
                try:
                    with mesh_context(mesh, with_mesh):
                        params = jax.device_put(big_host_params(), replicated)
                        got = stepped(
                            zero1(rmsprop_jax.rmsprop(0.05, **kw), params),
                            params,
                            functools.partial(jax.device_put, device=replicated),
                        )
                    assert_bitwise(got, want, name)
                except Exception as error:
                    failures.append(f"{name} {axis} set_mesh={with_mesh}: {error}")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------- main


def group_of(name: str) -> str:
    return GROUPS.get(name, "default")


def run_all(group: str) -> dict[str, str]:
    assert jax.device_count() == N_DEVICES, f"expected {N_DEVICES} devices, got {jax.devices()}"
    results = {}
    for name, fn in CHECKS.items():
        if group_of(name) != group:
            continue
        try:
            fn()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    return results


if __name__ == "__main__":
    print(RESULT_MARKER + json.dumps(run_all(sys.argv[1] if len(sys.argv) > 1 else "default")))
    sys.exit(0)
