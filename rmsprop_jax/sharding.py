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

from rmsprop_jax import _checks, _compat, _placement, formats

__all__ = ["abstract_state", "zero1", "zero1_spec", "zero1_state_shardings"]

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


def _named(leaf: Any, mesh: MeshLike | None) -> NamedSharding:
    """A leaf's sharding as a NamedSharding; leaves without one are replicated on `mesh`."""
    sharding = _placement.leaf_sharding(leaf)
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


def _axis_size(mesh: MeshLike, axis: AxisName) -> int:
    sizes = dict(mesh.shape)
    missing = [name for name in _axis_names(axis) if name not in sizes]
    if missing:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {dict(sizes)}.")
    return math.prod(sizes[name] for name in _axis_names(axis))


def _split(shape: Sequence[int], base: NamedSharding, axis: AxisName) -> NamedSharding:
    spec = zero1_spec(tuple(shape), base.spec, axis, _axis_size(base.mesh, axis))
    return NamedSharding(base.mesh, spec, memory_kind=base.memory_kind)


def zero1_state_shardings(tree: Any, mesh: MeshLike | None = None, axis: AxisName = "data") -> Any:
    """ZeRO-1 ``NamedSharding`` for every array leaf of `tree`.

    Each leaf keeps its current layout and, by the rule of `zero1_spec`, one
    more of its dimensions is split over `axis`: the largest one not sharded
    yet that the axis size divides. Leaves that cannot be split keep their
    layout; scalars (e.g. the step count) are replicated. A quantized or
    factored ``nu`` (`rmsprop_jax.formats.QuantizedArray`, `FactoredArray`)
    is split as a whole: its codes and scales, or row and column means,
    follow the split of the parameter they stand for. The result can
    be given to ``jax.device_put`` and to ``jax.jit``'s ``in_shardings`` /
    ``out_shardings``.

    Args:
      tree: a pytree whose leaves have ``.shape`` and, ideally, a
        ``NamedSharding`` in ``.sharding``: the optimizer state returned by
        ``tx.init(params)``, `abstract_state`, the params themselves, or
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

    def one(leaf: Any) -> Any:
        if formats.is_stored_node(leaf):
            # Split the parameter the node stands for, and lay the node out for that split.
            fmt = formats.format_of(leaf)
            param = fmt.param_sharding(jax.tree.map(lambda x: _named(x, mesh), leaf))
            return fmt.shardings(leaf.shape, _split(leaf.shape, param, axis))
        return _split(leaf.shape, _named(leaf, mesh), axis)

    return jax.tree.map(one, tree, is_leaf=formats.is_stored_node)


def _explicit_twin(mesh: MeshLike) -> MeshLike:
    """The mesh with every axis Explicit, so that tracing tracks every sharding in the types."""
    if all(t == AxisType.Explicit for t in mesh.axis_types):
        return mesh
    explicit = (AxisType.Explicit,) * len(mesh.axis_names)
    if isinstance(mesh, Mesh):
        return Mesh(mesh.devices, mesh.axis_names, axis_types=explicit)
    return mesh.update_axis_types(dict.fromkeys(mesh.axis_names, AxisType.Explicit))


def abstract_state(tx: optax.GradientTransformation, params: Any) -> Any:
    """The state ``tx.init(params)`` would give, as ``jax.ShapeDtypeStruct`` with concrete shardings.

    Nothing of the state's size is allocated: ``tx.init`` is traced with
    ``jax.eval_shape`` on a twin of the params' mesh whose axes are all
    Explicit, where every array carries its sharding in its type, and the
    shardings found are put back on the params' own mesh. This works for any
    transform whose ``init`` places its state like the params: those of
    rmsprop_jax in every state format (`rmsprop_jax.formats`), ``flat=True``,
    `zero1`-wrapped transforms, optax chains of them and optax's own
    transforms. Leaves whose sharding init does not fix (scalars) are
    replicated on the mesh.

    It is the target of a checkpoint restore, e.g. with orbax::

      target = {"params": param_structs, "opt_state": abstract_state(tx, param_structs)}
      restored = ocp.StandardCheckpointer().restore(path, target)

    with ``param_structs`` the params as ``jax.ShapeDtypeStruct`` with their
    ``NamedSharding`` on the mesh to restore onto (any process count or mesh
    shape: the state's shapes do not depend on the topology).

    Args:
      tx: the optax transformation.
      params: the params, as arrays or ``jax.ShapeDtypeStruct`` (with or without a sharding).

    Returns:
      A pytree of ``jax.ShapeDtypeStruct`` with the structure of the state.
      Without any ``NamedSharding`` among the params their sharding is that
      of the first param that has one, else the default device.

    Example:
      >>> import jax, jax.numpy as jnp, rmsprop_jax
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> from rmsprop_jax.sharding import abstract_state, zero1
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> params = {"w": jax.ShapeDtypeStruct((1024, 16), jnp.float32, sharding=NamedSharding(mesh, P()))}
      >>> tx = zero1(rmsprop_jax.rmsprop(1e-3, momentum=0.9), params, axis="data")
      >>> target = abstract_state(tx, params)
      >>> target.momentum["w"].shape, target.momentum["w"].sharding.spec
      ((1024, 16), P('data', None))
    """
    leaves, treedef = jax.tree.flatten(params)
    if any(_placement.is_traced(x) for x in leaves):
        raise TypeError("abstract_state needs params as arrays or jax.ShapeDtypeStruct, not traced values.")
    structs = [_placement.to_struct(x) for x in leaves]
    mesh = _placement.common_mesh([s.sharding for s in structs])
    if mesh is None:
        fallback = next((s.sharding for s in structs if s.sharding is not None), None)
        sharding = fallback or _placement.default_device_sharding()
        state = jax.eval_shape(tx.init, jax.tree.unflatten(treedef, structs))
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
    twin = _explicit_twin(mesh)
    twin_structs = [
        jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=_placement.with_mesh_spec(_named(s, mesh), twin))
        for s in structs
    ]
    context = _compat.set_mesh(twin) if isinstance(twin, Mesh) else _compat.use_abstract_mesh(twin)
    with context:
        state = _compat.eval_shape(tx.init, jax.tree.unflatten(treedef, twin_structs))

    def on_mesh(x: Any) -> jax.ShapeDtypeStruct:
        sharding = getattr(x, "sharding", None)
        spec = sharding.spec if isinstance(sharding, NamedSharding) and not sharding.mesh.empty else PartitionSpec()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree.map(on_mesh, state)


def _on(mesh: MeshLike, specs: Any) -> Any:
    """The NamedShardings of a tree of PartitionSpecs on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _specs(shardings: Any) -> Any:
    return jax.tree.map(lambda sharding: sharding.spec, shardings)


def zero1(
    tx: optax.GradientTransformation,
    params: Any,
    *,
    axis: AxisName = "data",
    mesh: MeshLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps `tx` so that its state is ZeRO-1 sharded over `axis`.

    The params keep their own layout (replicated along `axis`, possibly
    sharded along model axes); the state is laid out as `tx` lays it out for
    params split by `zero1_state_shardings` (every state buffer that follows
    a parameter is split with it, in any state format of
    `rmsprop_jax.formats`, and ``flat=True`` vectors are split whole), and
    every other state leaf (counts) is replicated. Inside ``update`` the
    gradients and params are sliced to the split layout (a local slice, no
    communication), the wrapped update runs on the local shard only, and the
    updates come back in the params' layout (one all-gather per split
    parameter). Nothing else changes: the values are those of `tx` (see the
    module docstring for the rounding caveats).

    Works eagerly and under ``jax.jit``, with Auto or Explicit mesh axes, with
    or without ``jax.set_mesh``; ``init`` takes arrays, host (NumPy) arrays or
    ``jax.ShapeDtypeStruct`` and builds the state directly in its split
    layout (`abstract_state` gives that layout without allocating it).

    Args:
      tx: the optax transformation to wrap, e.g. ``rmsprop_jax.rmsprop(...)``.
      params: the params (arrays, host arrays or ``jax.ShapeDtypeStruct``);
        only their shapes, dtypes and shardings are read.
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
    leaves, treedef = jax.tree.flatten(params)
    structs = [_placement.to_struct(x) for x in leaves]
    if mesh is None:
        mesh = _placement.common_mesh([s.sharding for s in structs])
        if mesh is None:
            raise ValueError("zero1 needs params placed with a NamedSharding, or mesh=.")
    param_shardings = [_named(s, mesh) for s in structs]
    split_shardings = [_split(s.shape, sh, axis) for s, sh in zip(structs, param_shardings, strict=True)]
    split_structs = [
        jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh) for s, sh in zip(structs, split_shardings, strict=True)
    ]
    param_specs = jax.tree.unflatten(treedef, [sh.spec for sh in param_shardings])
    split_specs = jax.tree.unflatten(treedef, [sh.spec for sh in split_shardings])
    state_specs = _specs(
        jax.tree.map(lambda x: x.sharding, abstract_state(tx, jax.tree.unflatten(treedef, split_structs)))
    )

    def mesh_of(tree: Any) -> MeshLike:
        """The mesh as the inputs see it: abstract inside jit on Explicit axes, concrete otherwise."""
        found = _placement.explicit_mesh_of(tree)
        return mesh if found is None else found

    def init_fn(params: optax.Params) -> optax.OptState:
        if any(_placement.is_traced(x) for x in jax.tree.leaves(params)):
            on = mesh_of(params)
            state = tx.init(_placement.constrain_tree(params, _on(on, split_specs)))
            return _placement.constrain_tree(state, _on(on, state_specs))

        def build() -> optax.OptState:
            zeros = [
                _placement.constrain(jax.numpy.zeros(s.shape, s.dtype), sh)
                for s, sh in zip(split_structs, split_shardings, strict=True)
            ]
            return init_fn(jax.tree.unflatten(treedef, zeros))

        _checks.check_same_structure(treedef, jax.tree.structure(params), "params given to zero1", "params")
        return jax.jit(build, out_shardings=_on(mesh, state_specs))()

    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, optax.OptState]:
        on = mesh_of((updates, state, params))
        updates = _placement.constrain_tree(updates, _on(on, split_specs))
        if params is not None:
            params = _placement.constrain_tree(params, _on(on, split_specs))
        state = _placement.constrain_tree(state, _on(on, state_specs))
        if isinstance(tx, optax.GradientTransformationExtraArgs):
            new_updates, new_state = tx.update(updates, state, params, **extra_args)
        else:
            new_updates, new_state = tx.update(updates, state, params)
        new_updates = _placement.constrain_tree(new_updates, _on(on, param_specs))
        return new_updates, _placement.constrain_tree(new_state, _on(on, state_specs))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
