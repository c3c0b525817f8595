"""The framework presets: side by side with the real frameworks, and their own contracts."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rmsprop_jax import RMSpropState, _compat, parity, presets

# --------------------------------------------------------------------------- #
# Parity with the real frameworks
# --------------------------------------------------------------------------- #


def _run_frameworks() -> list[str]:
    """The frameworks compared by running them (the others are rule-checked)."""
    return [key for key, spec in parity.FRAMEWORKS.items() if spec.peer is not None]


def _report(deviations: dict[parity.Case, float], limit: float) -> str:
    worst = sorted(deviations.items(), key=lambda item: -item[1])[:5]
    over = sum(d > limit for d in deviations.values())
    lines = [f"{over} of {len(deviations)} configurations above {limit:g}; worst:"]
    lines += [f"  {d:.3e}  {case}" for case, d in worst]
    return "\n".join(lines)


@pytest.mark.parametrize("framework", _run_frameworks())
def test_matches_framework(framework: str, require_peer: Callable[[str], Any]) -> None:
    """The preset follows the real optimizer to within 1e-6 of the parameter
    scale after 200 float32 steps, for every configuration of the grid."""
    peer = parity.FRAMEWORKS[framework].peer
    assert peer is not None
    require_peer(peer)
    deviations = {case: parity.run_case(case) for case in parity.cases(framework)}
    assert max(deviations.values()) <= parity.TOLERANCE, _report(deviations, parity.TOLERANCE)


@pytest.mark.parametrize("framework", ["graves", "dqn_nature"])
def test_matches_published_rule(framework: str) -> None:
    """Rule-checked, not run: on float64 params the preset reproduces a float64
    transcription of the published update to rounding level."""
    deviations = {case: parity.run_case(case, precision="float64") for case in parity.cases(framework)}
    assert max(deviations.values()) <= 1e-12, _report(deviations, 1e-12)


def test_rule_check_detects_a_wrong_rule() -> None:
    """The float64 rule check is sharp enough to see a small change of the rule."""
    case = parity.cases("dqn_nature")[0]
    nudged = parity.Case(case.framework, tuple((k, v * 1.001 if k == "eps" else v) for k, v in case.options))
    problem = parity._as_float64(parity.make_problem(case))
    with _compat.enable_x64(True):
        ours = parity.run_preset(nudged, problem)
    assert parity.relative_deviation(ours, parity.run_reference(case, problem)) > 1e-9


def test_end_to_end_model_matches_torch(require_peer: Callable[[str], Any]) -> None:
    """A tanh MLP trained on minibatches for 200 steps, with torch computing its
    gradients and JAX its own, ends within the tolerance or within what a
    1-ulp change of the initial weights does to torch itself."""
    require_peer("torch")
    result = parity.model_parity()
    assert result["deviation"] <= max(parity.TOLERANCE, result["ulp_sensitivity"]), result


def test_missing_peer_skips_or_fails(monkeypatch: pytest.MonkeyPatch, require_peer: Callable[[str], Any]) -> None:
    def missing(name: str) -> Any:
        raise parity.PeerUnavailable(f"{name} is not installed")

    monkeypatch.setattr(parity, "load_peer", missing)
    monkeypatch.delenv(parity.REQUIRE_PEERS_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_peer("torch")
    monkeypatch.setenv(parity.REQUIRE_PEERS_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="required"):
        require_peer("torch")


def test_keras_is_loaded_with_tensorflow_without_leaking_backend(require_peer: Callable[[str], Any]) -> None:
    before = os.environ.get("KERAS_BACKEND")
    keras = require_peer("keras")
    assert keras.backend.backend() == "tensorflow"
    assert os.environ.get("KERAS_BACKEND") == before


def test_timm_is_loaded_without_leaving_stub_packages(require_peer: Callable[[str], Any]) -> None:
    real_timm = "timm" in sys.modules
    module = require_peer("timm")
    assert hasattr(module, "RMSpropTF")
    if not real_timm:
        assert "timm" not in sys.modules and "timm.optim" not in sys.modules


def test_grid_covers_the_required_axes() -> None:
    torch_cases = parity.cases("pytorch")
    assert len(torch_cases) >= 48
    for key in ("centered", "momentum", "weight_decay"):
        assert len({c.kwargs.get(key) for c in torch_cases}) >= 2, key
    assert {c.scheduled for c in torch_cases} == {False, True}
    assert len({(c.kwargs["alpha"], c.kwargs["eps"]) for c in torch_cases}) >= 3
    assert any(c.complex_params for c in torch_cases)
    assert parity.STEPS >= 200
    for framework in parity.FRAMEWORKS:
        assert {c.scheduled for c in parity.cases(framework)} == {False, True}, framework


# --------------------------------------------------------------------------- #
# Contracts that need no peer
# --------------------------------------------------------------------------- #

ALL_PRESETS: dict[str, Callable[..., optax.GradientTransformationExtraArgs]] = {
    "pytorch": lambda **kw: presets.pytorch(**kw),
    "keras": lambda **kw: presets.keras(**kw),
    "tf_keras_legacy": lambda **kw: presets.tf_keras_legacy(**kw),
    "tf1": lambda **kw: presets.tf1(0.01, **kw),
    "timm_tf": lambda **kw: presets.timm_tf(**kw),
    "sonnet": lambda **kw: presets.sonnet(0.01, **kw),
    "graves": lambda **kw: presets.graves(**kw),
    "dqn_nature": lambda **kw: presets.dqn_nature(**kw),
}


def _params() -> dict[str, jax.Array]:
    return {"w": jnp.array([[0.5, -1.0], [2.0, 0.25]]), "b": jnp.array([0.1, -0.3])}


def _grads(scale: float = 1.0) -> dict[str, jax.Array]:
    return {"w": scale * jnp.array([[0.2, -0.4], [1.5, 0.01]]), "b": scale * jnp.array([-0.7, 0.05])}


@pytest.mark.parametrize("name", sorted(ALL_PRESETS))
def test_state_is_rmsprop_state_and_steps_under_jit(name: str) -> None:
    tx = ALL_PRESETS[name]()
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    params = _params()
    state = tx.init(params)
    assert isinstance(state, RMSpropState)
    step = jax.jit(tx.update)
    for _ in range(3):
        updates, state = step(_grads(), state, params)
        params = optax.apply_updates(params, updates)
    assert int(state.count) == 3
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("name", sorted(ALL_PRESETS))
def test_schedule_is_called_with_the_step_count(name: str) -> None:
    """Step t uses schedule(t): the first update equals the constant-rate one,
    the second differs from it."""
    lr_name = parity.FRAMEWORKS[name].lr_name
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    scheduled = getattr(presets, name)(**{lr_name: schedule})
    constant = getattr(presets, name)(**{lr_name: 0.1})
    params = _params()
    s_state, c_state = scheduled.init(params), constant.init(params)
    for step in range(2):
        s_updates, s_state = scheduled.update(_grads(), s_state, params)
        c_updates, c_state = constant.update(_grads(), c_state, params)
        same = all(
            bool(jnp.allclose(a, b, rtol=1e-6))
            for a, b in zip(jax.tree.leaves(s_updates), jax.tree.leaves(c_updates), strict=True)
        )
        assert same == (step == 0), step


def test_momentum_zero_keeps_no_buffer() -> None:
    assert presets.pytorch().init(_params()).momentum is None
    assert presets.pytorch(momentum=0.9).init(_params()).momentum is not None
    assert presets.keras(momentum=0.0).init(_params()).momentum is None
    assert presets.tf1(0.1).init(_params()).momentum is None


def test_tf1_and_timm_start_from_ones() -> None:
    for tx in (presets.tf1(0.1), presets.timm_tf()):
        assert all(bool(jnp.all(v == 1.0)) for v in jax.tree.leaves(tx.init(_params()).nu))
    for tx in (presets.pytorch(), presets.keras(), presets.sonnet(0.1), presets.graves(), presets.tf_keras_legacy()):
        assert all(bool(jnp.all(v == 0.0)) for v in jax.tree.leaves(tx.init(_params()).nu))


def test_pytorch_maximize_flips_the_gradient_before_the_weight_decay() -> None:
    params = _params()
    plus = presets.pytorch(lr=0.1, weight_decay=0.3, momentum=0.5, maximize=True)
    minus = presets.pytorch(lr=0.1, weight_decay=0.3, momentum=0.5)
    negated = jax.tree.map(jnp.negative, _grads())
    u_plus, _ = plus.update(_grads(), plus.init(params), params)
    u_minus, _ = minus.update(negated, minus.init(params), params)
    chex_equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), u_plus, u_minus)
    assert all(jax.tree.leaves(chex_equal))


def test_pytorch_complex_parts_are_independent() -> None:
    """A purely imaginary gradient must leave the real part's average at zero."""
    tx = presets.pytorch(lr=0.1)
    params = jnp.array([1.0 + 1.0j], jnp.complex64)
    _, state = tx.update(jnp.array([0.0 + 2.0j], jnp.complex64), tx.init(params), params)
    assert float(state.nu[0].real) == 0.0
    assert np.isclose(float(state.nu[0].imag), 0.01 * 4.0)


def test_keras_clipnorm_is_per_variable_and_global_clipnorm_is_global() -> None:
    params = _params()
    grads = _grads(10.0)
    norms = {k: float(jnp.linalg.norm(v)) for k, v in grads.items()}
    total = float(np.sqrt(sum(n**2 for n in norms.values())))

    def first_update(**clip: Any) -> dict[str, jax.Array]:
        # With momentum 0 and rho = 0, the update is -lr * g / sqrt(g^2 + eps): its
        # sign only. Use rho > 0 and compare the averages instead.
        tx = presets.keras(learning_rate=0.1, rho=0.5, **clip)
        _, state = tx.update(grads, tx.init(params), params)
        return {k: jnp.sqrt(v / 0.5) for k, v in state.nu.items()}  # |clipped g|

    per_variable = first_update(clipnorm=1.0)
    for k in grads:
        assert np.isclose(float(jnp.linalg.norm(per_variable[k])), 1.0, rtol=1e-5)
    global_ = first_update(global_clipnorm=1.0)
    for k in grads:
        assert np.isclose(float(jnp.linalg.norm(global_[k])), norms[k] / total, rtol=1e-5)
    by_value = first_update(clipvalue=0.5)
    assert float(jnp.max(jnp.concatenate([v.ravel() for v in by_value.values()]))) <= 0.5 + 1e-6
    unclipped = first_update(clipnorm=0.0)  # Keras: 0 means no clipping
    assert np.isclose(float(jnp.linalg.norm(unclipped["w"])), norms["w"], rtol=1e-5)


def test_keras_weight_decay_is_decoupled_and_uses_the_current_learning_rate() -> None:
    params = {"x": jnp.array([2.0])}
    schedule = optax.piecewise_constant_schedule(0.1, {1: 0.5})
    tx = presets.keras(learning_rate=schedule, weight_decay=0.2)
    state = tx.init(params)
    zero = {"x": jnp.array([0.0])}
    u0, state = tx.update(zero, state, params)
    u1, state = tx.update(zero, state, params)
    assert np.isclose(float(u0["x"][0]), -0.1 * 0.2 * 2.0)
    assert np.isclose(float(u1["x"][0]), -0.05 * 0.2 * 2.0)


def test_tf_keras_legacy_epsilon_placement_follows_momentum() -> None:
    g = jnp.array([0.3])
    v = 0.1 * 0.09
    plain = presets.tf_keras_legacy(learning_rate=1.0, epsilon=0.5)
    heavy = presets.tf_keras_legacy(learning_rate=1.0, epsilon=0.5, momentum=0.5)
    assert np.isclose(float(plain.update(g, plain.init(g))[0][0]), -0.3 / (np.sqrt(v) + 0.5), rtol=1e-6)
    assert np.isclose(float(heavy.update(g, heavy.init(g))[0][0]), -0.3 / np.sqrt(v + 0.5), rtol=1e-6)
    # A falsy epsilon becomes the tf.keras fuzz factor 1e-7.
    zero = presets.tf_keras_legacy(learning_rate=1.0, epsilon=0.0)
    fuzz = presets.tf_keras_legacy(learning_rate=1.0, epsilon=1e-7)
    tiny = jnp.array([1e-5])
    assert float(zero.update(tiny, zero.init(tiny))[0][0]) == float(fuzz.update(tiny, fuzz.init(tiny))[0][0])


def test_presets_work_with_inject_hyperparams() -> None:
    params = _params()
    for tx in (
        optax.inject_hyperparams(presets.pytorch)(lr=0.1, alpha=0.9, momentum=0.5),
        optax.inject_hyperparams(presets.keras)(learning_rate=0.1, weight_decay=0.01),
        optax.inject_hyperparams(presets.tf_keras_legacy)(learning_rate=0.1, momentum=0.5),
    ):
        state = tx.init(params)
        updates, state = jax.jit(tx.update)(_grads(), state, params)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: presets.pytorch(lr=-1.0), "lr"),
        (lambda: presets.pytorch(alpha=1.0), "alpha"),
        (lambda: presets.pytorch(eps=-1e-8), "eps"),
        (lambda: presets.pytorch(weight_decay=-0.1), "weight_decay"),
        (lambda: presets.pytorch(momentum=1.5), "momentum"),
        (lambda: presets.pytorch(centered=1), "centered"),
        (lambda: presets.pytorch(maximize="yes"), "maximize"),
        (lambda: presets.keras(rho=1.2), "rho"),
        (lambda: presets.keras(epsilon=-1.0), "epsilon"),
        (lambda: presets.keras(weight_decay=-0.1), "weight_decay"),
        (lambda: presets.keras(clipnorm=1.0, clipvalue=1.0), "Only one of"),
        (lambda: presets.keras(global_clipnorm=-1.0), "global_clipnorm"),
        (lambda: presets.tf_keras_legacy(momentum=-0.1), "momentum"),
        (lambda: presets.tf1(float("nan")), "learning_rate"),
        (lambda: presets.tf1(0.1, decay=1.0), "decay"),
        (lambda: presets.timm_tf(decoupled_decay=None), "decoupled_decay"),
        (lambda: presets.timm_tf(lr_in_momentum=0), "lr_in_momentum"),
        (lambda: presets.sonnet(0.1, epsilon=-1.0), "epsilon"),
        (lambda: presets.graves(momentum=1.0), "momentum"),
        (lambda: presets.dqn_nature(eps=-0.01), "eps"),
    ],
)
def test_invalid_arguments_are_rejected_with_the_framework_name(make: Callable[[], Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        make()
