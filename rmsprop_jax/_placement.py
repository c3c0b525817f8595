"""Where arrays live: the shardings of params and state, for every kind of input and mesh.

The transforms and `rmsprop_jax.sharding` meet params in many forms: concrete
arrays (sharded or on one device), host NumPy arrays, ``jax.ShapeDtypeStruct``
(abstract init, checkpoint restore targets), and tracers inside ``jax.jit``,
whose sharding is known from their type on a mesh with Explicit axes and
unknown on Auto axes. This module turns each into a sharding (or None), and
runs computations so that the same code works on Auto and Explicit axes,
with or without ``jax.set_mesh``:

* on Explicit axes the arithmetic of a step runs inside
  ``jax.sharding.auto_axes``, where reshapes and concatenations need no
  sharding annotations, and its results are resharded to the layouts the
  caller asks for;
* placement uses ``jax.sharding.reshard`` on Explicit axes and
  ``with_sharding_constraint`` on Auto axes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from rmsprop_jax import _compat


def is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _has_explicit_axes(mesh: Any) -> bool:
    return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def leaf_sharding(x: Any) -> jax.sharding.Sharding | None:
    """The sharding of a leaf when it is known: arrays and ShapeDtypeStructs, tracers on Explicit axes."""
    if is_traced(x):
        sharding = jax.typeof(x).sharding
        if isinstance(sharding, NamedSharding) and not sharding.mesh.empty and _has_explicit_axes(sharding.mesh):
            return sharding
        return None
    sharding = getattr(x, "sharding", None)
    return sharding if isinstance(sharding, jax.sharding.Sharding) else None


def common_mesh(shardings: list[Any]) -> Any:
    """The mesh of the first NamedSharding among `shardings` (a Mesh or an AbstractMesh), or None."""
    for sharding in shardings:
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def is_explicit(sharding: Any) -> bool:
    return isinstance(sharding, NamedSharding) and _has_explicit_axes(sharding.mesh)


def replicated(mesh: Any) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def constrain(x: Any, sharding: Any) -> Any:
    """Places `x` as `sharding`, eagerly or inside jit (reshard on Explicit axes, a constraint on Auto)."""
    if sharding is None:
        return x
    if is_explicit(sharding):
        return _compat.reshard(x, sharding)
    if not is_traced(x) and isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def constrain_tree(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(constrain, tree, shardings)


def to_struct(x: Any) -> jax.ShapeDtypeStruct:
    """`x` as a ShapeDtypeStruct carrying its sharding when it is known."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=leaf_sharding(x))


def with_mesh_spec(sharding: Any, mesh: Any) -> Any:
    """The same layout on another mesh object with the same axes (e.g. an abstract or an Explicit twin)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(mesh, sharding.spec, memory_kind=sharding.memory_kind)
    return sharding


def explicit_mesh(shardings: list[Any]) -> Any:
    """The mesh of the first sharding on Explicit axes, or None."""
    for sharding in shardings:
        if is_explicit(sharding):
            return sharding.mesh
    return None


def explicit_mesh_of(tree: Any) -> Any:
    """The mesh of the first leaf of `tree` laid out on Explicit axes, or None."""
    return explicit_mesh([leaf_sharding(x) for x in jax.tree.leaves(tree)])


def in_auto_axes(fn: Callable[..., Any], out_shardings: Any, *args: Any) -> Any:
    """``fn(*args)``; on Explicit axes run as Auto axes and resharded to `out_shardings` (a tree for the outputs)."""
    flat = [s for s in jax.tree.leaves(out_shardings) if isinstance(s, jax.sharding.Sharding)]
    if explicit_mesh(flat) is None:
        return fn(*args)
    return _compat.auto_axes(fn, out_shardings)(*args)


def default_device_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def initialize(
    build: Callable[[Any], Any],
    shardings_for: Callable[..., Any],
    params: Any,
) -> Any:
    """Runs ``build(params)`` (a state built from param-shaped templates) with the state placed by rule.

    Args:
      build: makes the state from a tree shaped like `params` (tracers or
        arrays); only shapes and placements are read from it.
      shardings_for: ``(treedef, param leaves, their shardings, scalar
        sharding) -> tree of shardings for the state``; the leaves have
        ``.shape`` and ``.dtype``.
      params: arrays, host arrays, ShapeDtypeStructs or tracers.

    Under tracing (init called inside ``jax.jit`` or ``jax.eval_shape``) the
    state follows the tracers: by their types on Explicit axes, by data
    dependence on Auto axes. Otherwise the state is computed by one jitted
    function whose outputs are pinned to the rule's shardings, starting from
    zeros placed like the params (so ShapeDtypeStructs need no memory of
    their own).
    """
    leaves, treedef = jax.tree.flatten(params)
    if any(is_traced(x) for x in leaves):
        return _initialize_traced(build, shardings_for, params, treedef, leaves)

    structs = [to_struct(x) for x in leaves]
    shardings = [s.sharding for s in structs]
    mesh = common_mesh(shardings)
    if mesh is not None:
        shardings = [s if s is not None else replicated(mesh) for s in shardings]
        scalar: jax.sharding.Sharding = replicated(mesh)
    else:
        fallback = next((s for s in shardings if s is not None), None) or default_device_sharding()
        shardings = [s if s is not None else fallback for s in shardings]
        scalar = fallback

    def run() -> Any:
        zeros = [
            constrain(jnp.zeros(s.shape, s.dtype), sharding) for s, sharding in zip(structs, shardings, strict=True)
        ]
        return _initialize_traced(build, shardings_for, jax.tree.unflatten(treedef, zeros), treedef, zeros)

    return jax.jit(run, out_shardings=shardings_for(treedef, structs, shardings, scalar))()


def _initialize_traced(
    build: Callable[[Any], Any],
    shardings_for: Callable[..., Any],
    params: Any,
    treedef: jax.tree_util.PyTreeDef,
    leaves: list[Any],
) -> Any:
    shardings = [leaf_sharding(x) for x in leaves]
    mesh = explicit_mesh(shardings)
    if mesh is None:
        return build(params)
    shardings = [s if s is not None else replicated(mesh) for s in shardings]
    return in_auto_axes(build, shardings_for(treedef, leaves, shardings, replicated(mesh)), params)


def on_auto_axes(update: Callable[..., tuple[Any, Any]]) -> Callable[..., tuple[Any, Any]]:
    """Wraps ``update(updates, state, params, **extra)`` so that its arithmetic runs on Auto axes.

    On Explicit axes the new updates come back laid out like the incoming
    ones and the new state like the old one (leaves whose layout is unknown
    are replicated); elsewhere `update` runs as it is.
    """

    def wrapped(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        mesh = explicit_mesh_of((updates, state, params))
        if mesh is None:
            return update(updates, state, params, **extra)

        def layout(x: Any) -> Any:
            sharding = leaf_sharding(x)
            return sharding if isinstance(sharding, NamedSharding) else replicated(mesh)

        out = (jax.tree.map(layout, updates), jax.tree.map(layout, state))
        return _compat.auto_axes(lambda u, s, p: update(u, s, p, **extra), out)(updates, state, params)

    return wrapped
