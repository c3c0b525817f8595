"""ZeRO-1: shard the optimizer state over the data-parallel axis of a Mesh.

In plain data parallelism every replica holds the whole optimizer state. Since
the update is elementwise, each replica only needs the slice of the state that
matches a slice of the parameters; ZeRO stage 1 (Rajbhandari et al., 2020)
keeps one slice per replica, so the state memory per device drops by the size
of the data axis while the parameters stay replicated along it.

This module does it with JAX's own SPMD machinery, no hand-written
communication:

* `zero1_state_shardings` picks, for every array leaf of a tree (params or an
  optimizer state), a ``NamedSharding`` that additionally splits one dimension
  over the data axis;
* `zero1` wraps any optax transformation so that its state lives in that
  layout inside an ordinary ``jax.jit`` train step.

Cost. Inside the step XLA slices the (already all-reduced) gradients to the
local part of the state for free, updates the state shard, and all-gathers
the updates back to the parameters' layout: one all-gather over the data
axis per parameter whose state is split, of the size of that parameter (XLA
may fuse the gradient all-reduce and the slice into a reduce-scatter, which
makes the pair cost what the all-reduce of plain data parallelism costs).
Parameters whose state cannot be split (no free dimension divisible by the
axis size, or scalars) keep the parameter's layout and cost nothing. With
``skip_nonfinite=True`` the optimizer adds an all-reduce of a few booleans
for its global decision. Memory: each device holds ``1/axis_size`` of every
split state leaf, plus transient buffers of one parameter's size for the
gathered updates.

Results. Every element goes through the same arithmetic as in the unsharded
step, so the results are bitwise equal to it as long as XLA rounds both
programs alike. One thing can differ: on hardware with fused multiply-add,
XLA contracts ``a * b + c`` into one FMA inside a fusion, and which
operations share a fusion depends on the whole program, so a sharded and an
unsharded program can round an element differently in the last bit (this is
seen with ``skip_nonfinite=True``, whose all-reduce splits the fusions).
Reductions over whole gradients in the same step (e.g.
``optax.clip_by_global_norm``, inside or before the wrapper) may be computed
by XLA from the shards and an all-reduce, which sums in another order: their
results then agree with the unsharded step to rounding, not bitwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = ["zero1", "zero1_spec", "zero1_state_shardings"]

AxisName = str | tuple[str, ...]
MeshLike = Mesh | jax.sharding.AbstractMesh


def _axis_names(axis: AxisName) -> tuple[str, ...]:
    return (axis,) if isinstance(axis, str) else tuple(axis)


def _used_axes(entry: Any) -> set[str]:
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return set()
    if isinstance(entry, str):
        return {entry}
    return {name for name in entry if isinstance(name, str)}


def zero1_spec(shape: Sequence[int], spec: PartitionSpec, axis: AxisName, axis_size: int) -> PartitionSpec:
    """The ZeRO-1 ``PartitionSpec`` of one array, given its current spec.

    The rule, applied leaf by leaf: pick the largest dimension that is not
    sharded yet and whose size is a positive multiple of `axis_size` (the
    first such dimension on ties) and shard it over `axis`. The spec is
    returned unchanged when the array is a scalar, already uses `axis`, or has
    no such dimension (it then stays laid out like its parameter).

    Args:
      shape: the array's shape.
      spec: its current ``PartitionSpec`` (shorter specs are padded with None).
      axis: the mesh axis name (or tuple of names) to shard over.
      axis_size: the number of devices along `axis`.

    Returns:
      The new ``PartitionSpec``, as long as `shape`.

    Example:
      >>> from jax.sharding import PartitionSpec as P
      >>> zero1_spec((1024, 512), P(None, "model"), "data", 8)
      P('data', 'model')
      >>> zero1_spec((10, 3), P(), "data", 8)  # nothing divisible by 8
      P(None, None)
    """
    names = _axis_names(axis)
    entries = list(spec) + [None] * (len(shape) - len(spec))
    used = set().union(*(_used_axes(entry) for entry in entries))
    if used.intersection(names):
        return PartitionSpec(*entries)
    candidates = [d for d, n in enumerate(shape) if entries[d] is None and n >= axis_size and n % axis_size == 0]
    if not candidates:
        return PartitionSpec(*entries)
    best = max(candidates, key=lambda d: (shape[d], -d))
    entries[best] = axis if isinstance(axis, str) else tuple(names)
    return PartitionSpec(*entries)


def _leaf_sharding(leaf: Any) -> Any:
    """The sharding a leaf carries: ``.sharding`` of arrays and ShapeDtypeStructs, or None."""
    try:
        return leaf.sharding
    except AttributeError:
        return None


def _named(leaf: Any, mesh: MeshLike | None) -> NamedSharding:
    """A leaf's sharding as a NamedSharding; leaves without one are replicated on `mesh`."""
    sharding = _leaf_sharding(leaf)
    if isinstance(sharding, NamedSharding):
        return sharding
    if sharding is not None and not sharding.is_fully_replicated:
        raise ValueError(
            f"zero1 needs NamedSharding leaves (or replicated ones); got {sharding} for a leaf of shape "
            f"{getattr(leaf, 'shape', None)}. Place the params with jax.sharding.NamedSharding."
        )
    if mesh is None:
        raise ValueError(
            f"A leaf of shape {getattr(leaf, 'shape', None)} carries no NamedSharding; pass mesh= so that "
            "it can be laid out on the mesh."
        )
    return NamedSharding(mesh, PartitionSpec())


def zero1_state_shardings(tree: Any, mesh: MeshLike | None = None, axis: AxisName = "data") -> Any:
    """ZeRO-1 ``NamedSharding`` for every array leaf of `tree`.

    Each leaf keeps its current layout and, by the rule of `zero1_spec`, one
    more of its dimensions is split over `axis`: the largest one not sharded
    yet that the axis size divides. Leaves that cannot be split keep their
    layout; scalars (e.g. the step count) are replicated. The result can be
    given to ``jax.device_put`` and to ``jax.jit``'s ``in_shardings`` /
    ``out_shardings``.

    Args:
      tree: a pytree whose leaves have ``.shape`` and, ideally, a
        ``NamedSharding`` in ``.sharding``: the optimizer state returned by
        ``tx.init(params)``, ``jax.eval_shape(tx.init, params)`` (with
        Explicit mesh axes), the params themselves, or
        ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` leaves built from
        the params' shardings. Leaves whose sharding is missing or not a
        ``NamedSharding`` count as replicated. None leaves stay None.
      mesh: the mesh for leaves that carry no ``NamedSharding``. Leaves that
        do carry one keep its mesh.
      axis: the data-parallel mesh axis (or a tuple of axes) to shard over.

    Returns:
      A pytree of ``NamedSharding`` with the structure of `tree`.

    Raises:
      ValueError: `axis` is not an axis of the mesh, or a leaf has neither a
        ``NamedSharding`` nor a `mesh` to fall back on.

    Example:
      >>> import jax, jax.numpy as jnp, rmsprop_jax
      >>> from rmsprop_jax.sharding import zero1_state_shardings
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> params = {"w": jnp.zeros((4096, 64)), "b": jnp.zeros(64)}
      >>> state = rmsprop_jax.rmsprop(1e-3).init(params)
      >>> shardings = zero1_state_shardings(state, mesh, axis="data")
      >>> shardings.nu["w"].spec  # the largest dim divisible by the axis size
      P('data', None)
      >>> shardings.count.spec  # scalars are replicated
      P()
      >>> state = jax.device_put(state, shardings)
    """

    def one(leaf: Any) -> NamedSharding:
        base = _named(leaf, mesh)
        sizes = dict(base.mesh.shape)
        missing = [name for name in _axis_names(axis) if name not in sizes]
        if missing:
            raise ValueError(f"axis {axis!r} is not an axis of the mesh {dict(sizes)}.")
        axis_size = math.prod(sizes[name] for name in _axis_names(axis))
        return NamedSharding(base.mesh, zero1_spec(tuple(leaf.shape), base.spec, axis, axis_size))

    return jax.tree.map(one, tree)


def _constrain(tree: Any, shardings: Any) -> Any:
    """Pins a tree to the given shardings inside (or outside) jit.

    Auto mesh axes use ``with_sharding_constraint``; meshes with Explicit axes
    carry shardings in the types and need ``jax.sharding.reshard``.
    """

    def one(x: Any, sharding: NamedSharding) -> Any:
        if any(t == AxisType.Explicit for t in sharding.mesh.axis_types):
            return jax.sharding.reshard(x, sharding)
        return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(one, tree, shardings)


def zero1(
    tx: optax.GradientTransformation,
    params: Any,
    *,
    axis: AxisName = "data",
    mesh: MeshLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps `tx` so that its state is ZeRO-1 sharded over `axis`.

    The params keep their own layout (replicated along `axis`, possibly
    sharded along model axes); every state leaf that has the shape of a
    parameter is laid out with the `zero1_state_shardings` of that parameter,
    every other state leaf (counts) is replicated. Inside ``update`` the
    gradients and params are sliced to the same layout (a local slice, no
    communication), the wrapped update runs on the local shard only, and the
    updates come back in the params' layout (one all-gather per split
    parameter). Nothing else changes: the values are those of `tx` (see the
    module docstring for the one rounding caveat).

    Works eagerly and under ``jax.jit``, with Auto or Explicit mesh axes. The
    wrapped `tx` must build its state from the params tree in the way of
    optax's transforms (``optax.tree_map_params`` is used to find the leaves
    that follow the params).

    Args:
      tx: the optax transformation to wrap, e.g. ``rmsprop_jax.rmsprop(...)``.
      params: the params (arrays or ``jax.ShapeDtypeStruct`` with a
        ``NamedSharding``), only their shapes and shardings are read.
      axis: the data-parallel mesh axis (or tuple of axes).
      mesh: the mesh for params that carry no ``NamedSharding``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with the state of `tx`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, rmsprop_jax
      >>> from rmsprop_jax.sharding import zero1
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> params = jax.device_put({"w": jnp.ones((256, 16))}, NamedSharding(mesh, P()))
      >>> tx = zero1(rmsprop_jax.rmsprop(1e-2, momentum=0.9), params, axis="data")
      >>> state = tx.init(params)
      >>> state.nu["w"].sharding.spec
      P('data', None)
      >>> @jax.jit
      ... def step(params, state):
      ...     grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      ...     updates, state = tx.update(grads, state, params)
      ...     return optax.apply_updates(params, updates), state
      >>> params, state = step(params, state)
      >>> params["w"].sharding.is_fully_replicated  # the params keep their layout
      True
      >>> state.momentum["w"].sharding.spec  # the state stays split
      P('data', None)
    """
    if mesh is None:
        named = [leaf.sharding for leaf in jax.tree.leaves(params) if isinstance(_leaf_sharding(leaf), NamedSharding)]
        if not named:
            raise ValueError("zero1 needs params placed with a NamedSharding, or mesh=.")
        mesh = named[0].mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = jax.tree.map(lambda p: _named(p, mesh), params)
    split_shardings = zero1_state_shardings(params, mesh, axis)
    abstract_state = jax.eval_shape(tx.init, params)

    state_shardings = optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract_state, split_shardings, transform_non_params=lambda _: replicated
    )

    @jax.jit
    def init_fn(params: optax.Params) -> optax.OptState:
        return _constrain(tx.init(params), state_shardings)

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, optax.OptState]:
        updates = _constrain(updates, split_shardings)
        if params is not None:
            params = _constrain(params, split_shardings)
        state = _constrain(state, state_shardings)
        if isinstance(tx, optax.GradientTransformationExtraArgs):
            new_updates, new_state = tx.update(updates, state, params, **extra_args)
        else:
            new_updates, new_state = tx.update(updates, state, params)
        return _constrain(new_updates, param_shardings), _constrain(new_state, state_shardings)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
