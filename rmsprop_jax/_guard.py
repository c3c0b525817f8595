"""The non-finite guard: skip a whole step whose inputs or results are not finite."""

from __future__ import annotations

from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import optax

State = TypeVar("State", bound=Any)


def all_finite(leaves: list[jax.Array]) -> jax.Array:
    """A scalar bool: every element of every leaf is finite (True for no leaves)."""
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in leaves]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def skip_if_nonfinite(
    grads: list[jax.Array], updates: optax.Updates, new_state: State, old_state: State
) -> tuple[optax.Updates, State]:
    """Keeps the step if the gradients, the updates and the new ``nu`` are all finite.

    Otherwise the updates are zeros, the state is the old one and its
    ``skipped`` counter goes up by one. The decision is global (one flag for
    the whole step) so the params never take a partial step in which some
    leaves moved and others did not; checking ``nu`` too catches a finite
    gradient whose square overflows, which would otherwise freeze that
    element forever. Under sharding the flag costs one scalar all-reduce.
    """
    finite = all_finite([*grads, *jax.tree.leaves(updates), *jax.tree.leaves(new_state.nu)])
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    kept = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        new_state._replace(skipped=None),
        old_state._replace(skipped=None),
    )
    skipped = jnp.where(finite, old_state.skipped, optax.safe_increment(old_state.skipped))
    return updates, kept._replace(skipped=skipped)
