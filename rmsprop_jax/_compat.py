"""The JAX APIs that are newer than the oldest supported jax (0.5.3), detected once.

Each name below is JAX's current API where this jax has it, and its older
equivalent otherwise; the package and its tests use only these names, so on
a current jax the programs they build are exactly those of the current API.

* ``reshard`` and ``auto_axes`` (Explicit axes): in ``jax.sharding`` from
  jax 0.7, in ``jax.experimental.shard`` before, where ``auto_axes`` named
  its keyword ``out_shardings`` up to 0.6.1.
* ``set_mesh``: ``jax.set_mesh`` from jax 0.7.1, ``jax.sharding.use_mesh``
  before (not the ``jax.sharding.set_mesh`` of those versions, which sets
  the mesh globally instead of for a ``with`` block).
* ``use_abstract_mesh``: public in ``jax.sharding`` from jax 0.7.2, only
  JAX's internal one before.
* ``enable_x64``: ``jax.enable_x64`` from jax 0.8, ``jax.experimental.enable_x64`` before.
* ``DISTRIBUTED_TIMEOUTS``: whether ``jax.distributed.initialize`` takes
  heartbeat and shutdown timeouts (from jax 0.7; before, JAX's own hold).
* ``eval_shape``: ``jax.eval_shape``, whose results carry the shardings of
  their types (on Explicit axes) from jax 0.6.2 on; before, they are read
  from the output types of the traced program. This one is a change of
  behaviour, not of names, so it is told by the version.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.experimental
import jax.sharding

if hasattr(jax.sharding, "use_abstract_mesh"):
    use_abstract_mesh: Callable[[jax.sharding.AbstractMesh], Any] = jax.sharding.use_abstract_mesh
else:
    from jax._src import mesh as _mesh

    use_abstract_mesh = _mesh.use_abstract_mesh

if hasattr(jax.sharding, "auto_axes"):
    reshard: Callable[[Any, Any], Any] = jax.sharding.reshard

    def auto_axes(fn: Callable[..., Any], out_sharding: Any) -> Callable[..., Any]:
        """``fn`` run on Auto axes, its results resharded to `out_sharding` (a tree for the outputs)."""
        return jax.sharding.auto_axes(fn, out_sharding=out_sharding)

else:
    from jax.experimental import shard as _shard  # type: ignore[attr-defined]  # gone from current jax

    reshard = _shard.reshard
    _OUT_SHARDING = (
        "out_sharding" if "out_sharding" in inspect.signature(_shard.auto_axes).parameters else "out_shardings"
    )

    def auto_axes(fn: Callable[..., Any], out_sharding: Any) -> Callable[..., Any]:
        """``fn`` run on Auto axes, its results resharded to `out_sharding` (a tree for the outputs)."""
        # This auto_axes reads the mesh from the context only: enter the outputs' mesh.
        mesh = next(s.mesh for s in jax.tree.leaves(out_sharding) if isinstance(s, jax.sharding.NamedSharding))

        def run(*args: Any) -> Any:
            with use_abstract_mesh(mesh.abstract_mesh):
                return _shard.auto_axes(fn, **{_OUT_SHARDING: out_sharding})(*args)

        return run


if hasattr(jax, "set_mesh"):
    set_mesh: Callable[[jax.sharding.Mesh], Any] = jax.set_mesh
else:
    set_mesh = jax.sharding.use_mesh  # type: ignore[attr-defined]  # gone from current jax

if hasattr(jax, "enable_x64"):
    enable_x64: Callable[[bool], Any] = jax.enable_x64
else:
    enable_x64 = jax.experimental.enable_x64  # type: ignore[attr-defined]  # gone from current jax

DISTRIBUTED_TIMEOUTS = "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters

if jax.__version_info__ >= (0, 6, 2):
    eval_shape: Callable[..., Any] = jax.eval_shape
else:

    def eval_shape(fn: Callable[..., Any], *args: Any) -> Any:
        """``jax.eval_shape(fn, *args)``, each result with the sharding of its type."""
        jaxpr, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        leaves, treedef = jax.tree.flatten(shapes)
        typed = [
            jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=aval.sharding)
            for s, aval in zip(leaves, jaxpr.out_avals, strict=True)
        ]
        return jax.tree.unflatten(treedef, typed)
