"""The non-finite guard: ``skip_nonfinite=True`` on `rmsprop` and `scale_by_rms`.

What the guard promises: when the gradients, the computed updates or the new
``nu`` hold a NaN or an inf anywhere, the whole step is skipped, i.e. all
updates are zero, the state (count, nu, mu, momentum) is bitwise the old one
and ``state.skipped`` goes up by one. A skipped step is therefore invisible:
the run continues exactly as if the bad gradients had never arrived, which is
what most of the tests below check against a run without them.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import Hyper, RmspropReference, assert_tree_close

import rmsprop_jax

F32_MAX = float(np.finfo(np.float32).max)


def params0() -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=4), jnp.float32),
    }


def grads_like(seed: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(0.2, 1.0, size=(3, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(0.0, 0.1, size=4), jnp.float32),
    }


def with_value(tree: dict[str, jax.Array], leaf: str, index: tuple[int, ...], value: float) -> dict[str, jax.Array]:
    out = dict(tree)
    out[leaf] = tree[leaf].at[index].set(value)
    return out


def guarded(kind: str, **kwargs: Any) -> optax.GradientTransformation:
    if kind == "rmsprop":
        options = dict(centered=True, momentum=0.9, weight_decay=1e-3)
        options.update(kwargs)
        return rmsprop_jax.rmsprop(0.1, skip_nonfinite=True, **options)
    return rmsprop_jax.scale_by_rms(centered=True, skip_nonfinite=True, **kwargs)


def moments(state: Any) -> Any:
    """Everything in the state except the skip counter."""
    return state._replace(skipped=None)


def assert_same_bits(a: Any, b: Any) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), (x, y)


def run(tx: optax.GradientTransformation, grads: list[Any], *, jit: bool = True) -> tuple[Any, Any, list[Any]]:
    params = params0()
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    all_updates = []
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
        all_updates.append(updates)
    return params, state, all_updates


KINDS = ["rmsprop", "scale_by_rms"]
BAD_VALUES = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", BAD_VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_nonfinite_gradient_skips_the_step(kind: str, bad: float, jit: bool) -> None:
    tx = guarded(kind)
    good = [grads_like(1), grads_like(2)]
    bad_grads = with_value(grads_like(3), "w", (1, 2), bad)
    _, state_before, _ = run(tx, good[:1], jit=jit)
    params, state, updates = run(tx, [good[0], bad_grads, good[1]], jit=jit)

    # The bad step: every update is zero (also in the leaf without the bad
    # element: the decision is global), the state is untouched.
    for leaf in jax.tree.leaves(updates[1]):
        assert np.all(np.asarray(leaf) == 0)
    want_params, want_state, want_updates = run(tx, good, jit=jit)
    assert_same_bits(moments(state), moments(want_state))
    assert_same_bits(params, want_params)
    assert_same_bits(updates[2], want_updates[1])
    assert int(state.skipped) == 1 and int(want_state.skipped) == 0
    assert int(state.count) == 2 == int(want_state.count)
    assert int(state_before.skipped) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_skipped_state_is_bitwise_the_old_state(kind: str) -> None:
    tx = guarded(kind)
    params = params0()
    state = tx.init(params)
    _, state = tx.update(grads_like(1), state, params)
    new_updates, new_state = jax.jit(tx.update)(with_value(grads_like(2), "b", (0,), np.nan), state, params)
    assert_same_bits(moments(new_state), moments(state))
    assert int(new_state.skipped) == int(state.skipped) + 1
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(new_updates))


@pytest.mark.parametrize("kind", KINDS)
def test_finite_gradient_whose_square_overflows_is_skipped(kind: str) -> None:
    # 1e20 is a finite float32 but its square (1e40) is not: without the guard
    # that element's nu would become inf and its parameter would never move again.
    big = 1e20
    with np.errstate(over="ignore"):
        assert np.isfinite(np.float32(big)) and not np.isfinite(np.float32(big) * np.float32(big))
    tx = guarded(kind)
    grads = with_value(grads_like(1), "w", (0, 0), big)
    params, state, updates = run(tx, [grads_like(2), grads, grads_like(3)])
    want_params, want_state, _ = run(tx, [grads_like(2), grads_like(3)])
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates[1]))
    assert_same_bits(moments(state), moments(want_state))
    assert_same_bits(params, want_params)
    assert int(state.skipped) == 1


def test_unguarded_overflowing_square_freezes_the_element() -> None:
    """What the guard prevents: the documented default keeps an inf in nu for good."""
    tx = rmsprop_jax.rmsprop(0.1)
    grads = with_value(grads_like(1), "w", (0, 0), 1e20)
    params, state, updates = run(tx, [grads, grads_like(2), grads_like(3)])
    assert np.isinf(np.asarray(state.nu["w"])[0, 0])
    for u in updates[1:]:
        assert np.asarray(u["w"])[0, 0] == 0  # g / inf: the element is frozen
    assert np.all(np.isfinite(np.asarray(params["w"])))


def test_update_that_overflows_is_skipped() -> None:
    # Finite gradients and finite nu, but the learning rate times the scaled
    # gradient (about sqrt(10) on the first step) exceeds the float32 range.
    huge = F32_MAX / 2
    tx = rmsprop_jax.rmsprop(huge, skip_nonfinite=True)
    params = params0()
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(grads_like(1), state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert_same_bits(moments(new_state), moments(state))
    assert int(new_state.skipped) == 1
    # Unguarded, the same step produces infinities.
    bad, _ = rmsprop_jax.rmsprop(huge).update(grads_like(1), rmsprop_jax.rmsprop(huge).init(params), params)
    assert not np.all(np.isfinite(np.asarray(bad["w"])))


def test_schedule_that_goes_nonfinite_skips_only_those_steps() -> None:
    """A learning rate that is inf at step 1 only: that step is skipped, the others run."""

    def schedule(count: jax.Array) -> jax.Array:
        return jnp.where(count == 1, jnp.inf, 0.1)

    tx = rmsprop_jax.rmsprop(schedule, momentum=0.9, skip_nonfinite=True)
    params, state, updates = run(tx, [grads_like(1), grads_like(2), grads_like(3)])
    assert any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates[0]))
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates[1]))
    # The count did not advance on the skipped step, so the third call sees
    # count == 1 again and is skipped too: the schedule is evaluated at the
    # same count until a step is taken. This is the documented state-unchanged rule.
    assert int(state.count) == 1 and int(state.skipped) == 2
    assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(params))


def test_momentum_overflow_is_skipped_as_the_float64_reference_predicts() -> None:
    """The momentum buffer grows past the float32 range after a few steps.

    Which steps are skipped is predicted by the float64 reference: a step is
    skipped exactly when its update or new state does not fit in float32, and
    a skipped step leaves the reference's state where it was too.
    """
    lr, momentum = 6e37, 0.9
    tx = rmsprop_jax.rmsprop(lr, momentum=momentum, skip_nonfinite=True)
    hyper = Hyper(learning_rate=lr, momentum=momentum)
    params = params0()
    ref = RmspropReference(params, hyper)
    state = tx.init(params)
    g = grads_like(1)
    decisions = []
    for _ in range(5):
        before = copy.deepcopy(ref)
        want = ref.update(g, params)
        fits = all(np.all(np.abs(u) < F32_MAX) for u in jax.tree.leaves(want)) and all(
            np.all(np.abs(b) < F32_MAX) for b in jax.tree.leaves(ref.momentum)
        )
        if not fits:
            ref = before
        updates, new_state = jax.jit(tx.update)(g, state, params)
        skipped = int(new_state.skipped) == int(state.skipped) + 1
        assert skipped == (not fits)
        if skipped:
            assert_same_bits(moments(new_state), moments(state))
            assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
        else:
            assert_tree_close(updates, want, 1e-5)
        decisions.append(skipped)
        state = new_state
    assert decisions[0] is False and any(decisions), decisions  # both branches ran


def test_every_skip_is_counted() -> None:
    tx = guarded("rmsprop")
    bad = with_value(grads_like(1), "w", (0, 0), np.nan)
    _, state, _ = run(tx, [bad, grads_like(2), bad, bad, grads_like(3)])
    assert int(state.skipped) == 3 and int(state.count) == 2


def test_skipped_is_int32_and_state_structure_is_fixed() -> None:
    tx = guarded("rmsprop")
    state = tx.init(params0())
    assert state.skipped.dtype == jnp.int32 and state.skipped.shape == ()
    _, after = tx.update(with_value(grads_like(1), "w", (0, 0), np.nan), state, params0())
    assert jax.tree.structure(after) == jax.tree.structure(state)


def test_guard_inside_scan() -> None:
    tx = guarded("rmsprop")
    stream = [grads_like(1), with_value(grads_like(2), "b", (1,), np.inf), grads_like(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *stream)

    @jax.jit
    def scan(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        def body(carry: Any, g: Any) -> tuple[Any, None]:
            p, s = carry
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, state), grads)[0]

    params, state = scan(params0(), tx.init(params0()), stacked)
    want_params, want_state, _ = run(tx, [stream[0], stream[2]])
    assert_same_bits(params, want_params)
    assert_same_bits(moments(state), moments(want_state))
    assert int(state.skipped) == 1


# --------------------------------------------------------------------------- the default lets non-finite values through


def test_default_lets_nan_through() -> None:
    tx = rmsprop_jax.rmsprop(0.1)
    params = params0()
    state = tx.init(params)
    assert state.skipped is None
    updates, state = tx.update(with_value(grads_like(1), "w", (1, 1), np.nan), state, params)
    w = np.asarray(updates["w"])
    assert np.isnan(w[1, 1]) and np.isnan(np.asarray(state.nu["w"])[1, 1])
    # Elementwise: the other elements are updated normally.
    assert np.all(np.isfinite(np.delete(w.ravel(), 1 * 4 + 1)))
    assert np.all(np.isfinite(np.asarray(updates["b"])))


def test_scale_by_rms_default_lets_inf_through() -> None:
    tx = rmsprop_jax.scale_by_rms()
    params = params0()
    updates, state = tx.update(with_value(grads_like(1), "b", (2,), np.inf), tx.init(params))
    assert state.skipped is None
    assert not np.isfinite(np.asarray(updates["b"])[2])


# --------------------------------------------------------------------------- composition


def test_composes_with_apply_if_finite_on_bad_gradients() -> None:
    """apply_if_finite sees the NaN gradient first and keeps the old inner state."""
    tx = optax.apply_if_finite(guarded("rmsprop"), max_consecutive_errors=5)
    bad = with_value(grads_like(2), "w", (0, 0), np.nan)
    params, state, updates = run(tx, [grads_like(1), bad, grads_like(3)])
    want_params, want_state, _ = run(guarded("rmsprop"), [grads_like(1), grads_like(3)])
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates[1]))
    assert int(state.total_notfinite) == 1
    assert int(state.inner_state.skipped) == 0  # the inner new state was discarded
    assert_same_bits(params, want_params)
    assert_same_bits(moments(state.inner_state), moments(want_state))


def test_composes_with_apply_if_finite_on_bad_updates() -> None:
    """Finite gradients, non-finite update: apply_if_finite lets it through, the guard skips it."""
    huge = F32_MAX / 2
    tx = optax.apply_if_finite(rmsprop_jax.rmsprop(huge, skip_nonfinite=True), max_consecutive_errors=5)
    params = params0()
    state = tx.init(params)
    updates, state = tx.update(grads_like(1), state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert int(state.total_notfinite) == 0
    assert int(state.inner_state.skipped) == 1


def test_guard_still_protects_when_apply_if_finite_gives_up() -> None:
    """After max_consecutive_errors apply_if_finite passes the inner result on; it is still a skip."""
    tx = optax.apply_if_finite(guarded("rmsprop"), max_consecutive_errors=1)
    bad = with_value(grads_like(2), "w", (0, 0), np.nan)
    params, state, updates = run(tx, [grads_like(1), bad, bad, bad])
    for step in updates[1:]:
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(step))
    assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(params))
    assert int(state.inner_state.skipped) >= 1
    assert int(state.inner_state.count) == 1


def test_composes_with_multisteps() -> None:
    """A NaN mini-step poisons MultiSteps' accumulator; the guard keeps params and state clean.

    optax.MultiSteps resets its accumulator as ``(1 - emit) * acc``, which keeps
    a NaN, so every later inner step sees it: each one is skipped, the params
    stay where the last good step left them and nothing non-finite reaches the
    inner state. To drop bad mini-steps instead, pass
    ``should_skip_update_fn=optax.skip_not_finite`` (next test).
    """
    tx = optax.MultiSteps(guarded("rmsprop"), every_k_schedule=2)
    bad = with_value(grads_like(3), "b", (3,), np.nan)
    stream = [grads_like(1), grads_like(2), bad, grads_like(4), grads_like(5), grads_like(6)]
    params, state, updates = run(tx, stream)
    want_params, want_state, _ = run(tx, stream[:2])
    inner = state.inner_opt_state
    assert int(inner.skipped) == 2 and int(inner.count) == 1
    assert_same_bits(params, want_params)
    assert_same_bits(moments(inner), moments(want_state.inner_opt_state))
    for step in updates[2:]:
        assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(step))


def test_composes_with_multisteps_skipping_bad_ministeps() -> None:
    tx = optax.MultiSteps(guarded("rmsprop"), every_k_schedule=2, should_skip_update_fn=optax.skip_not_finite)
    bad = with_value(grads_like(2), "b", (3,), np.nan)
    params, state, _ = run(tx, [grads_like(1), bad, grads_like(3)])
    want_params, want_state, _ = run(tx, [grads_like(1), grads_like(3)])
    assert int(state.inner_opt_state.skipped) == 0  # MultiSteps dropped the mini-step itself
    assert_same_bits(params, want_params)
    assert_same_bits(moments(state.inner_opt_state), moments(want_state.inner_opt_state))
