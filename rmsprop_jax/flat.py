"""Flat state and flat parameters: O(1) kernels per step for models with many small leaves.

On XLA:CPU every buffer a step writes costs at least one loop kernel (a few
microseconds for a small leaf), and update + ``optax.apply_updates`` over a
pytree writes two buffers per leaf: the parameter and its ``nu``. Two remedies:

* ``rmsprop(..., flat=True)`` (and ``scale_by_rms(..., flat=True)``) keeps
  the state as one contiguous vector per group of leaves (a group is a dtype,
  split further by the weight-decay mask), so a pytree step writes the
  leaves plus one buffer per group instead of two buffers per leaf. The
  arithmetic is the per-leaf rule applied to the concatenated vectors, so
  the results are those of ``flat=False``. Read ``nu`` per leaf with
  ``FlatLayout(params, labels).unravel(state.nu)``; the labels are the
  weight-decay mask (None without one). Each state vector is padded with
  zeros to a multiple of `STATE_ALIGN` elements, so that it splits evenly
  over any power-of-two number of devices (`rmsprop_jax.sharding.zero1`);
  the padding never reaches the params.

* Flat-parameter training: keep the params themselves as one vector per
  group for the whole run (`FlatLayout.ravel` once), give the model a tree
  view of them inside the jitted step (`FlatLayout.unravel`: slices and
  reshapes that XLA fuses into their consumers) and differentiate with
  respect to the vectors. Gradients, the optimizer update and the parameter
  update are then a handful of kernels whatever the number of leaves. A
  per-leaf mask (e.g. weight decay) becomes one label per group:
  `FlatLayout.labels`.

Both trade compile time for step time on XLA:CPU: a slice of a vector at a
constant offset is a kernel of its own, so where a per-leaf step compiles one
kernel for all leaves of a shape, a flat step compiles one per leaf (at 1,000
leaves of 256, ``flat=True`` compiles in about 14 s against 5 s for
``optax.rmsprop``, then steps 1.4-1.9x faster). Offsets held as run-time
values would make the kernels identical again, but each leaf the step takes
or returns costs the jit dispatch a few microseconds at every call, which
undoes most of the gain (``benchmarks/NOTES.md``).

Example:
  >>> import jax, jax.numpy as jnp, optax, rmsprop_jax
  >>> from rmsprop_jax.flat import FlatLayout
  >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  >>> decay_mask = {"w": True, "b": False}
  >>> layout = FlatLayout(params, labels=decay_mask)
  >>> flat = layout.ravel(params)  # one vector per (dtype, label) group; leaves in tree order (b, w)
  >>> {k: v.shape for k, v in flat.items()}
  {'float32/0': (2,), 'float32/1': (6,)}
  >>> tx = rmsprop_jax.rmsprop(0.1, weight_decay=1e-2, weight_decay_mask=layout.labels())
  >>> state = tx.init(flat)
  >>> def loss(flat):
  ...     p = layout.unravel(flat)  # a tree view of the vectors
  ...     return jnp.sum((p["w"].sum(0) + p["b"] - 1.0) ** 2)
  >>> @jax.jit
  ... def step(flat, state):
  ...     grads = jax.grad(loss)(flat)
  ...     updates, state = tx.update(grads, state, flat)
  ...     return optax.apply_updates(flat, updates), state
  >>> for _ in range(50):
  ...     flat, state = step(flat, state)
  >>> round(float(loss(flat)), 2)
  0.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from rmsprop_jax import _checks, _placement

__all__ = ["STATE_ALIGN", "FlatLayout", "flat_transform"]

# Flat state vectors are padded to a multiple of this many elements: every
# power-of-two device count up to 4096 divides them, whatever the model.
STATE_ALIGN = 4096


class FlatLayout:
    """Where each leaf of a pytree lives in a few flat vectors.

    Leaves are grouped by dtype and, optionally, by a per-leaf label (such as
    a weight-decay mask); each group is one vector holding its leaves in tree
    order. Groups are named ``"<dtype>/<k>"`` with k the index of the label
    in order of first appearance. Only shapes and dtypes are read, so the
    layout can be built from arrays, tracers or ``jax.ShapeDtypeStruct``.

    Args:
      tree: the pytree (params, gradients...).
      labels: None, a pytree of hashable labels with the structure of
        `tree`, or a function from `tree` to one.
      align: `ravel` pads each vector with zeros to a multiple of this many
        elements (1: no padding).
    """

    def __init__(self, tree: Any, labels: Any = None, align: int = 1):
        leaves, self.treedef = jax.tree.flatten(tree)
        self.shapes = [tuple(np.shape(x)) for x in leaves]
        self.dtypes = [jnp.dtype(jnp.result_type(x)) for x in leaves]
        if callable(labels):
            labels = labels(tree)
        if labels is None:
            label_leaves: list[Hashable] = [None] * len(leaves)
        else:
            label_leaves, label_def = jax.tree.flatten(labels)
            _checks.check_same_structure(self.treedef, label_def, "tree", "labels")
        order: dict[Hashable, int] = {}
        for label in label_leaves:
            order.setdefault(label, len(order))
        self.label_of: dict[str, Hashable] = {}
        self.groups: dict[str, list[int]] = {}
        for i, (dtype, label) in enumerate(zip(self.dtypes, label_leaves, strict=True)):
            name = f"{dtype.name}/{order[label]}"
            self.groups.setdefault(name, []).append(i)
            self.label_of[name] = label
        self.offsets: dict[int, int] = {}
        self.sizes: dict[str, int] = {}
        for name, members in self.groups.items():
            offset = 0
            for i in members:
                self.offsets[i] = offset
                offset += math.prod(self.shapes[i])
            self.sizes[name] = offset
        self.align = align

    def padded_size(self, name: str) -> int:
        """The length of group `name`'s vector, padding included."""
        return -(-self.sizes[name] // self.align) * self.align

    def ravel(self, tree: Any) -> dict[str, jax.Array]:
        """The leaves of `tree` (structured like the layout's tree) concatenated per group."""
        leaves, treedef = jax.tree.flatten(tree)
        _checks.check_same_structure(self.treedef, treedef, "layout", "tree")
        out = {}
        for name, members in self.groups.items():
            parts = [jnp.reshape(leaves[i], (-1,)) for i in members]
            pad = self.padded_size(name) - self.sizes[name]
            if pad:
                parts.append(jnp.zeros(pad, self.dtypes[members[0]]))
            out[name] = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
        return out

    def unravel(self, flat: dict[str, jax.Array]) -> Any:
        """The tree view of per-group vectors.

        One ``lax.split`` per group: XLA fuses the pieces into their
        consumers, and under ``jax.grad`` its transpose is a single
        concatenation (slicing leaf by leaf would transpose to one padded
        full-size vector per leaf, summed: quadratic in the leaf count).
        Elements beyond the group's leaves (padding) are ignored.
        """
        leaves: list[Any] = [None] * len(self.shapes)
        for name, members in self.groups.items():
            sizes = [math.prod(self.shapes[i]) for i in members]
            vector = flat[name]
            pad = vector.shape[0] - self.sizes[name]
            if pad < 0:
                raise ValueError(
                    f"group {name!r} needs {self.sizes[name]} elements, got a vector of {vector.shape[0]}."
                )
            if pad:
                sizes.append(pad)
            pieces = jax.lax.split(vector, sizes) if len(sizes) > 1 else [vector]
            for i, piece in zip(members, pieces, strict=False):  # a last piece of padding is dropped
                leaves[i] = jnp.reshape(piece, self.shapes[i])
        return jax.tree.unflatten(self.treedef, leaves)

    def labels(self) -> dict[str, Hashable]:
        """The label of each group, e.g. ``weight_decay_mask=layout.labels()`` for the flat params."""
        return dict(self.label_of)

    @property
    def num_params(self) -> int:
        return sum(self.sizes.values())


def flat_transform(
    make: Callable[[Any], optax.GradientTransformation], mask: Any = None, uses_params: bool = False
) -> optax.GradientTransformationExtraArgs:
    """Runs a per-leaf transform on per-group vectors; the updates come back as a tree.

    Args:
      make: builds the inner transform given the weight-decay mask for the
        groups (a dict of bools, or None).
      mask: the per-leaf weight-decay mask (a tree of bools or a function of
        the params), or None.
      uses_params: the inner transform reads the params (weight decay), so
        they are concatenated too.

    The state is the inner transform's, with every parameter-sized field a
    dict of vectors keyed by group name (see `FlatLayout`).
    """

    make(None)  # validates the arguments now rather than at init

    def layout_for(tree: Any, params: Any) -> FlatLayout:
        if mask is None:
            return FlatLayout(tree, align=STATE_ALIGN)
        labels = mask(params if params is not None else tree) if callable(mask) else mask
        return FlatLayout(tree, labels=jax.tree.map(bool, labels), align=STATE_ALIGN)

    def inner(layout: FlatLayout) -> optax.GradientTransformation:
        return make(None if mask is None else layout.labels())

    def init_fn(params: optax.Params) -> optax.OptState:
        layout = layout_for(params, params)
        leaves = jax.tree.leaves(params)
        shardings = [_placement.leaf_sharding(x) for x in leaves]
        if any(_placement.is_traced(x) for x in leaves) and _placement.explicit_mesh(shardings) is None:
            # Inside jit on Auto axes: the vectors follow the params by data dependence.
            return inner(layout).init(layout.ravel(params))
        vectors = {
            name: jax.ShapeDtypeStruct(
                (layout.padded_size(name),),
                layout.dtypes[members[0]],
                sharding=vector_sharding(layout.padded_size(name), [shardings[i] for i in members]),
            )
            for name, members in layout.groups.items()
        }
        if any(_placement.is_traced(x) for x in leaves):
            vectors = {
                name: _placement.constrain(jnp.zeros(v.shape, v.dtype), v.sharding) for name, v in vectors.items()
            }
        return inner(layout).init(vectors)

    @_placement.on_auto_axes
    def update_fn(
        updates: optax.Updates, state: optax.OptState, params: optax.Params | None = None, **extra: Any
    ) -> tuple[optax.Updates, optax.OptState]:
        del extra
        layout = layout_for(updates, params)
        flat_params = None if params is None or not uses_params else layout.ravel(params)
        flat_updates, state = inner(layout).update(layout.ravel(updates), state, flat_params)
        return layout.unravel(flat_updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def vector_sharding(size: int, member_shardings: list[Any]) -> Any:
    """The layout of one flat state vector, given the shardings of the leaves it holds.

    The vector is split over every mesh axis that splits any of its leaves
    (as `rmsprop_jax.sharding.zero1` splits each leaf over the data axis)
    when those axes divide its length, and is replicated on the mesh
    otherwise; without a mesh it lives where its first leaf lives.
    """
    mesh = _placement.common_mesh(member_shardings)
    if mesh is None:
        return next((s for s in member_shardings if s is not None), None)
    axes: list[str] = []
    for sharding in member_shardings:
        if isinstance(sharding, NamedSharding):
            for entry in sharding.spec:
                for name in (entry,) if isinstance(entry, str) else tuple(entry or ()):
                    if name not in axes:
                        axes.append(name)
    sizes = dict(mesh.shape)
    if not axes or size % math.prod(sizes[a] for a in axes):
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec(tuple(axes) if len(axes) > 1 else axes[0]))
