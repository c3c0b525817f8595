"""PyTorch checkpoint conversion: `rmsprop_jax.interop`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rmsprop_jax import RMSpropState, interop, parity, presets, rmsprop


def test_importing_rmsprop_jax_imports_no_framework() -> None:
    code = (
        "import sys\n"
        "import rmsprop_jax, rmsprop_jax.presets, rmsprop_jax.interop, rmsprop_jax.parity\n"
        "loaded = [m for m in ('torch', 'tensorflow', 'keras', 'tf_keras', 'sonnet', 'timm') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- #
# Conversion of plain state dicts (NumPy arrays stand in for tensors)
# --------------------------------------------------------------------------- #


def _group(**overrides: Any) -> dict[str, Any]:
    group = {
        "lr": 0.01,
        "alpha": 0.99,
        "eps": 1e-8,
        "weight_decay": 0,
        "momentum": 0.9,
        "centered": True,
        "capturable": False,
        "foreach": None,
        "maximize": False,
        "differentiable": False,
        "params": [0, 1],
    }
    group.update(overrides)
    return group


def _state_dict(**overrides: Any) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    state = {
        i: {
            "step": np.float32(7.0),
            "square_avg": rng.uniform(size=shape).astype(np.float32),
            "momentum_buffer": rng.normal(size=shape).astype(np.float32),
            "grad_avg": rng.normal(size=shape).astype(np.float32),
        }
        for i, shape in enumerate([(3, 2), (3,)])
    }
    return {"state": state, "param_groups": [_group(**overrides)]}


def _params() -> list[jax.Array]:
    return [jnp.zeros((3, 2)), jnp.zeros(3)]


def test_from_torch_maps_every_buffer() -> None:
    sd = _state_dict()
    state = interop.from_torch(sd, _params())
    assert isinstance(state, RMSpropState)
    assert int(state.count) == 7
    for i in range(2):
        np.testing.assert_array_equal(state.nu[i], sd["state"][i]["square_avg"])
        np.testing.assert_array_equal(state.mu[i], sd["state"][i]["grad_avg"])
        np.testing.assert_array_equal(state.momentum[i], sd["state"][i]["momentum_buffer"])
    # The state fits the preset built from the same state dict.
    tx = presets.pytorch(**interop.pytorch_kwargs(sd))
    assert jax.tree.structure(tx.init(_params())) == jax.tree.structure(state)


def test_from_torch_without_state_gives_the_initial_state() -> None:
    sd = {"state": {}, "param_groups": [_group(momentum=0, centered=False)]}
    state = interop.from_torch(sd, _params())
    assert int(state.count) == 0 and state.mu is None and state.momentum is None
    assert all(bool(jnp.all(v == 0)) for v in state.nu)


def test_from_torch_keeps_complex_parts_apart() -> None:
    nu = np.array([0.25 + 4.0j], np.complex64)  # re-average 0.25, im-average 4
    sd = {
        "state": {0: {"step": 1.0, "square_avg": nu}},
        "param_groups": [_group(momentum=0, centered=False, params=[0])],
    }
    state = interop.from_torch(sd, [jnp.zeros(1, jnp.complex64)])
    np.testing.assert_array_equal(state.nu[0], nu)
    with pytest.raises(ValueError, match=r"parameter 0.*complex.*real"):
        interop.from_torch(sd, [jnp.zeros(1)])


def test_from_torch_names_the_parameter_with_a_wrong_shape() -> None:
    sd = _state_dict()
    sd["param_groups"][0]["param_names"] = ["fc.weight", "fc.bias"]
    with pytest.raises(ValueError, match=r"parameter 0 \('fc.weight'\), params leaf \[0\].*\(3, 2\).*\(2, 3\)"):
        interop.from_torch(sd, [jnp.zeros((2, 3)), jnp.zeros(3)])


def test_from_torch_rejects_a_wrong_number_of_params() -> None:
    with pytest.raises(ValueError, match=r"2 parameters but params has 3 leaves"):
        interop.from_torch(_state_dict(), [*_params(), jnp.zeros(1)])


def test_from_torch_reports_a_missing_buffer() -> None:
    sd = _state_dict()
    del sd["state"][1]["grad_avg"]
    with pytest.raises(ValueError, match=r"parameter 1.*'grad_avg'"):
        interop.from_torch(sd, _params())


def test_groups_must_agree() -> None:
    sd = _state_dict()
    sd["param_groups"] = [_group(params=[0]), _group(params=[1], lr=0.1)]
    assert int(interop.from_torch(sd, _params()).count) == 7  # the state does not depend on lr
    with pytest.raises(ValueError, match=r"param_groups\[1\] has lr=0.1"):
        interop.pytorch_kwargs(sd)
    sd["param_groups"] = [_group(params=[0]), _group(params=[1], centered=False)]
    with pytest.raises(ValueError, match="disagree on centered"):
        interop.from_torch(sd, _params())


def test_not_a_state_dict() -> None:
    with pytest.raises(TypeError, match="state dict"):
        interop.from_torch([1, 2], _params())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- #
# With torch
# --------------------------------------------------------------------------- #


def test_checkpoint_round_trip_both_directions(require_peer: Callable[[str], Any]) -> None:
    """50 steps in one framework, convert, 50 more in the other: the same
    parameters as 100 steps in one framework (an MLP, centered, momentum,
    weight decay and a learning-rate schedule)."""
    require_peer("torch")
    deviations = parity.checkpoint_round_trip(50)
    assert max(deviations.values()) <= parity.TOLERANCE, deviations


def test_complex_checkpoint_from_torch(require_peer: Callable[[str], Any]) -> None:
    """Complex parameters: 50 steps in torch, convert, 50 more with the preset."""
    torch = require_peer("torch")
    case = parity.Case("pytorch", (("momentum", 0.9), ("centered", True), ("weight_decay", 0.05)), complex_params=True)
    problem = parity.make_problem(case, steps=100)
    params = [torch.nn.Parameter(torch.tensor(x)) for x in problem.x0]
    optimizer = torch.optim.RMSprop(params, lr=0.01, **case.kwargs)

    def torch_steps(start: int, stop: int) -> None:
        for t in range(start, stop):
            for p, g in zip(params, problem.grads, strict=True):
                p.grad = torch.from_numpy(g[t].copy())
            optimizer.step()

    torch_steps(0, 50)
    midway = [jnp.asarray(p.detach().numpy().copy()) for p in params]
    state = interop.from_torch(optimizer.state_dict(), midway)
    tx = presets.pytorch(lr=0.01, **case.kwargs)
    x = midway
    for t in range(50, 100):
        updates, state = tx.update([jnp.asarray(g[t]) for g in problem.grads], state, x)
        x = optax.apply_updates(x, updates)
    torch_steps(50, 100)
    deviation = parity.relative_deviation(x, [p.detach().numpy() for p in params])
    assert deviation <= parity.TOLERANCE


def test_to_torch_loads_into_torch_and_converts_back(require_peer: Callable[[str], Any]) -> None:
    torch = require_peer("torch")
    kwargs = {"lr": 0.05, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.01, "momentum": 0.5, "centered": True}
    params = [jnp.ones((4, 3)), jnp.array([1.0 + 2.0j, -0.5j], jnp.complex64)]
    tx = presets.pytorch(**kwargs)
    state = tx.init(params)
    for scale in (1.0, -0.5, 2.0):
        grads = [scale * jnp.ones((4, 3)), jnp.array([scale + 0.5j, -1.0], jnp.complex64)]
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)

    torch_params = [torch.nn.Parameter(torch.tensor(np.asarray(p))) for p in params]
    optimizer = torch.optim.RMSprop(torch_params, lr=1.0)
    optimizer.load_state_dict(interop.to_torch(state, params=params, **kwargs))
    group = optimizer.param_groups[0]
    assert (group["lr"], group["alpha"], group["momentum"], group["centered"]) == (0.05, 0.9, 0.5, True)
    back = interop.from_torch(optimizer.state_dict(), params)
    assert int(back.count) == 3
    for ours, theirs in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_to_torch_of_a_fresh_state_is_a_fresh_optimizer(require_peer: Callable[[str], Any]) -> None:
    torch = require_peer("torch")
    params = [jnp.ones(3)]
    state = presets.pytorch().init(params)
    sd = interop.to_torch(state)
    assert sd["state"] == {}
    torch.optim.RMSprop([torch.nn.Parameter(torch.ones(3))]).load_state_dict(sd)


def test_to_torch_rejects_mismatched_arguments() -> None:
    params = [jnp.ones(3)]
    state = presets.pytorch(momentum=0.9).init(params)
    with pytest.raises(ValueError, match=r"momentum=0\.0 but the state has a momentum buffer"):
        interop.to_torch(state)
    with pytest.raises(ValueError, match="centered=True but the state has no gradient average"):
        interop.to_torch(state, momentum=0.9, centered=True)
    with pytest.raises(ValueError, match=r"parameter 0: nu has shape \(3,\)"):
        interop.to_torch(state, momentum=0.9, params=[jnp.ones(4)])
    with pytest.raises(TypeError, match="RMSpropState"):
        interop.to_torch((state,), momentum=0.9)  # type: ignore[arg-type]
    unsplit = rmsprop(0.1, momentum=0.9).init([jnp.ones(2, jnp.complex64)])
    with pytest.raises(ValueError, match="split_complex=False"):
        interop.to_torch(unsplit, momentum=0.9)
