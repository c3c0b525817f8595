"""Checkpoint conversion between ``torch.optim.RMSprop`` and `presets.pytorch`.

`from_torch` turns ``torch.optim.RMSprop.state_dict()`` into the state of
``presets.pytorch(...)``, and `to_torch` turns that state back into a
dictionary that ``torch.optim.RMSprop.load_state_dict`` accepts, so a run can
move between the two frameworks mid-training.

torch is optional: importing this module does not import it, and
`from_torch` reads the state dict's tensors through NumPy without importing
torch (a state dict loaded with ``torch.load`` already holds tensors). Only
`to_torch` imports torch, to build tensors.

Lining up the parameters
------------------------
A torch state dict refers to parameters by their position in the optimizer's
param groups, which is the order of ``model.parameters()`` (and so of
``model.named_parameters()``) when the optimizer was built from it. The JAX
params given to `from_torch` must flatten (``jax.tree.leaves``) to that order.
A list does, so the simplest route is::

    names = [name for name, _ in model.named_parameters()]
    leaves = [jnp.asarray(p.detach().numpy()) for _, p in model.named_parameters()]
    state = interop.from_torch(optimizer.state_dict(), leaves)
    tx = presets.pytorch(**interop.pytorch_kwargs(optimizer.state_dict()))

Dicts flatten in sorted key order, which is generally *not* the torch order
(``"fc.bias"`` sorts before ``"fc.weight"``), so convert with lists and key
them afterwards if you like; params and state only need the same structure::

    keyed = lambda field: None if field is None else dict(zip(names, field))
    params = keyed(leaves)
    state = state._replace(nu=keyed(state.nu), mu=keyed(state.mu), momentum=keyed(state.momentum))

and go back to torch order before `to_torch`
(``state._replace(nu=[state.nu[n] for n in names], ...)``). torch's
``nn.Linear`` stores its weight as ``(out_features, in_features)``; a JAX model
that uses ``(in, out)`` must transpose the weights and the state alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import presets
from rmsprop_jax.alias import RMSpropState

__all__ = ["from_torch", "pytorch_kwargs", "to_torch"]

# The hyperparameters of a torch.optim.RMSprop param group that presets.pytorch takes.
_PRESET_KEYS = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize")
_TORCH_DEFAULTS: dict[str, Any] = {
    "lr": 1e-2,
    "alpha": 0.99,
    "eps": 1e-8,
    "weight_decay": 0.0,
    "momentum": 0.0,
    "centered": False,
    "maximize": False,
}


def _to_numpy(value: Any) -> np.ndarray:
    """A NumPy copy of a torch tensor (without importing torch) or array-like."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor
        value = value.detach()
        if getattr(value, "is_sparse", False):
            raise ValueError("Sparse tensors are not supported in an RMSprop state dict.")
        if str(value.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            value = value.float()
        for resolve in ("resolve_conj", "resolve_neg"):
            if hasattr(value, resolve):
                value = getattr(value, resolve)()
        return np.array(value.cpu().numpy())
    return np.array(value)


def _scalar(value: Any) -> Any:
    """A Python number from a number or a one-element tensor (torch allows a Tensor lr)."""
    if isinstance(value, (bool, int, float)):
        return value
    return _to_numpy(value).reshape(()).item()


def _groups(optimizer_state_dict: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if not isinstance(optimizer_state_dict, Mapping) or "param_groups" not in optimizer_state_dict:
        raise TypeError(
            "Expected a torch.optim.RMSprop state dict (a mapping with 'state' and 'param_groups'), got "
            f"{type(optimizer_state_dict).__name__}."
        )
    groups = list(optimizer_state_dict["param_groups"])
    if not groups:
        raise ValueError("The state dict has no param_groups.")
    return groups


def pytorch_kwargs(optimizer_state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The `presets.pytorch` arguments that match a ``torch.optim.RMSprop`` state dict.

    Args:
      optimizer_state_dict: ``torch.optim.RMSprop(...).state_dict()``.

    Returns:
      ``lr``, ``alpha``, ``eps``, ``weight_decay``, ``momentum``,
      ``centered`` and ``maximize`` of its param groups.

    Raises:
      ValueError: when the param groups have different hyperparameters; use
        one preset per group then (e.g. with ``optax.partition``).

    Example:
      >>> from rmsprop_jax import interop, presets
      >>> state_dict = {"state": {}, "param_groups": [{"lr": 0.1, "alpha": 0.9, "eps": 1e-8,
      ...     "weight_decay": 0, "momentum": 0.9, "centered": True, "maximize": False, "params": [0]}]}
      >>> interop.pytorch_kwargs(state_dict)
      {'lr': 0.1, 'alpha': 0.9, 'eps': 1e-08, 'weight_decay': 0, 'momentum': 0.9, 'centered': True, 'maximize': False}
      >>> tx = presets.pytorch(**interop.pytorch_kwargs(state_dict))
    """
    groups = _groups(optimizer_state_dict)
    kwargs = {key: _scalar(groups[0].get(key, _TORCH_DEFAULTS[key])) for key in _PRESET_KEYS}
    for index, group in enumerate(groups[1:], start=1):
        for key in _PRESET_KEYS:
            value = _scalar(group.get(key, _TORCH_DEFAULTS[key]))
            if value != kwargs[key]:
                raise ValueError(
                    f"param_groups[{index}] has {key}={value!r} but param_groups[0] has {key}={kwargs[key]!r}: "
                    "one preset cannot reproduce both groups. Convert each group's parameters separately and "
                    "combine one preset per group with optax.partition."
                )
    return kwargs


def _param_labels(groups: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[str | None]]:
    """The torch parameter ids in optimizer order, and their names when recorded."""
    ids: list[Any] = []
    names: list[str | None] = []
    for group in groups:
        group_ids = list(group["params"])
        group_names = list(group.get("param_names", [None] * len(group_ids)))
        ids += group_ids
        names += group_names + [None] * (len(group_ids) - len(group_names))
    return ids, names


def _structure_flags(groups: Sequence[Mapping[str, Any]]) -> tuple[bool, bool]:
    """(centered, has momentum buffer), which must agree across groups."""
    flags = {(bool(g.get("centered", False)), _scalar(g.get("momentum", 0.0)) > 0) for g in groups}
    if len(flags) > 1:
        raise ValueError(
            "The param groups disagree on centered or on having momentum, so their states have different "
            "buffers; convert each group separately."
        )
    ((centered, has_momentum),) = flags
    return centered, has_momentum


def from_torch(optimizer_state_dict: Mapping[str, Any], params: optax.Params) -> RMSpropState:
    """Converts a ``torch.optim.RMSprop`` state dict into the state of `presets.pytorch`.

    The torch buffers map one to one: ``square_avg`` to ``nu``, ``grad_avg``
    to ``mu`` (centered only) and ``momentum_buffer`` to ``momentum`` (when
    momentum > 0). Complex parameters keep their layout: torch's complex
    ``square_avg`` holds the average of the squared real parts in its real
    part and of the imaginary parts in its imaginary part, which is how
    ``split_complex`` stores ``nu``. The per-parameter ``step`` becomes the
    shared ``count`` (the largest, if they differ; it only drives learning-rate
    schedules, which torch keeps outside the optimizer). Parameters without
    state (never updated) start from zeros, as torch would.

    Args:
      optimizer_state_dict: ``optimizer.state_dict()`` of a
        ``torch.optim.RMSprop``, holding torch tensors or arrays.
      params: the JAX params, whose leaves are in the torch parameter order
        (see the module docstring) and have the torch shapes.

    Returns:
      An `rmsprop_jax.RMSpropState` for ``presets.pytorch(**pytorch_kwargs(
      optimizer_state_dict))`` and `params`.

    Raises:
      ValueError: when the number of parameters, a shape, or the real/complex
        kind does not match; the message names the parameter.

    Example:
      >>> import numpy as np, jax.numpy as jnp
      >>> from rmsprop_jax import interop
      >>> state_dict = {
      ...     "state": {0: {"step": 3.0, "square_avg": np.full((2,), 0.25, np.float32)}},
      ...     "param_groups": [{"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0,
      ...                       "momentum": 0, "centered": False, "params": [0]}],
      ... }
      >>> state = interop.from_torch(state_dict, [jnp.zeros(2)])
      >>> int(state.count), state.nu[0]
      (3, Array([0.25, 0.25], dtype=float32))
    """
    groups = _groups(optimizer_state_dict)
    centered, has_momentum = _structure_flags(groups)
    ids, names = _param_labels(groups)
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if len(paths_and_leaves) != len(ids):
        raise ValueError(
            f"The state dict's param_groups list {len(ids)} parameters but params has "
            f"{len(paths_and_leaves)} leaves; pass the params that the torch optimizer was built with, "
            "in the same order."
        )
    template = presets.pytorch(momentum=0.5 if has_momentum else 0.0, centered=centered).init(params)
    nu = jax.tree.leaves(template.nu)
    mu = [None] * len(nu) if template.mu is None else jax.tree.leaves(template.mu)
    buf = [None] * len(nu) if template.momentum is None else jax.tree.leaves(template.momentum)
    all_state = optimizer_state_dict.get("state", {})
    steps: list[float] = []

    for i, ((path, leaf), pid) in enumerate(zip(paths_and_leaves, ids, strict=True)):
        label = f"parameter {i}"
        if names[i] is not None:
            label += f" ({names[i]!r})"
        label += f", params leaf {jax.tree_util.keystr(path) or '<root>'}"
        entry = all_state.get(pid, all_state.get(str(pid)))
        if not entry:
            continue
        leaf_shape = tuple(np.shape(leaf))
        leaf_complex = bool(jnp.iscomplexobj(leaf))

        def read(
            key: str,
            like: Any,
            label: str = label,
            entry: Any = entry,
            leaf_shape: tuple[int, ...] = leaf_shape,
            leaf_complex: bool = leaf_complex,
        ) -> jax.Array:
            if key not in entry:
                raise ValueError(f"{label}: its torch state has no {key!r} (keys: {sorted(entry)}).")
            array = _to_numpy(entry[key])
            if tuple(array.shape) != leaf_shape:
                raise ValueError(
                    f"{label}: torch {key!r} has shape {tuple(array.shape)} but the params leaf has shape {leaf_shape}."
                )
            if np.iscomplexobj(array) != leaf_complex:
                kinds = ("complex", "real") if np.iscomplexobj(array) else ("real", "complex")
                raise ValueError(f"{label}: torch {key!r} is {kinds[0]} but the params leaf is {kinds[1]}.")
            return jnp.asarray(array, dtype=like.dtype)

        nu[i] = read("square_avg", nu[i])
        if centered:
            mu[i] = read("grad_avg", mu[i])
        if has_momentum:
            buf[i] = read("momentum_buffer", buf[i])
        if "step" in entry:
            steps.append(float(_scalar(entry["step"])))

    count = max(steps, default=0.0)
    if not math.isfinite(count) or count < 0:
        raise ValueError(f"Invalid step count {count!r} in the state dict.")
    return RMSpropState(
        count=jnp.asarray(min(round(count), np.iinfo(np.int32).max), jnp.int32),
        nu=jax.tree.unflatten(treedef, nu),
        mu=None if template.mu is None else jax.tree.unflatten(treedef, mu),
        momentum=None if template.momentum is None else jax.tree.unflatten(treedef, buf),
    )


def _torch_array(leaf: Any) -> np.ndarray:
    """A NumPy array that ``torch.from_numpy`` accepts (bfloat16/float16 state goes to float32)."""
    array = np.array(leaf)
    if array.dtype not in (np.float32, np.float64, np.complex64, np.complex128):
        array = array.astype(np.complex64 if np.iscomplexobj(array) else np.float32)
    return array


def to_torch(
    state: RMSpropState,
    *,
    lr: optax.ScalarOrSchedule = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
    params: optax.Params | None = None,
) -> dict[str, Any]:
    """Converts the state of `presets.pytorch` into a ``torch.optim.RMSprop`` state dict.

    Load the result with ``optimizer.load_state_dict(...)`` into an optimizer
    built over the torch parameters in the order of ``jax.tree.leaves`` of the
    params (see the module docstring); ``load_state_dict`` moves the buffers to
    each parameter's device and dtype. This function imports torch.

    Args:
      state: the `rmsprop_jax.RMSpropState` of ``presets.pytorch(...)``.
      lr, alpha, eps, weight_decay, momentum, centered, maximize: the
        arguments given to `presets.pytorch`; they become the param group's
        hyperparameters. A schedule is evaluated at ``state.count``, the
        learning rate of the next step.
      params: optionally, the params, to check the state against them (shape
        and real/complex kind of every leaf).

    Returns:
      ``{"state": {i: {"step", "square_avg", ...}}, "param_groups": [...]}``
      with one param group listing parameters ``0 .. n-1``. A state that has
      not been updated yet (count 0) gives an empty ``"state"``, as a fresh
      torch optimizer has.

    Raises:
      ValueError: when the state does not match the arguments (e.g.
        ``centered=True`` without ``mu``) or the params.
      ImportError: when torch is not installed.
    """
    if not isinstance(state, RMSpropState):
        raise TypeError(
            f"to_torch expects the RMSpropState of presets.pytorch, got {type(state).__name__}. If the preset "
            "sits inside optax.chain, pass the chain's RMSpropState element."
        )
    presets.pytorch(lr, alpha, eps, weight_decay, momentum, centered, maximize)  # validates the arguments
    has_momentum = momentum > 0
    if centered != (state.mu is not None):
        raise ValueError(
            f"centered={centered} but the state {'has no' if state.mu is None else 'has a'} gradient average (mu)."
        )
    if has_momentum != (state.momentum is not None):
        raise ValueError(
            f"momentum={momentum} but the state {'has no' if state.momentum is None else 'has a'} momentum buffer."
        )
    nu = jax.tree.leaves(state.nu)
    mu = [None] * len(nu) if state.mu is None else jax.tree.leaves(state.mu)
    buf = [None] * len(nu) if state.momentum is None else jax.tree.leaves(state.momentum)
    for name, leaves in (("mu", mu), ("momentum", buf)):
        for i, (v, other) in enumerate(zip(nu, leaves, strict=True)):
            if other is not None and jnp.iscomplexobj(other) and not jnp.iscomplexobj(v):
                raise ValueError(
                    f"parameter {i}: {name} is complex but nu is real, so the state was made with "
                    "split_complex=False; torch needs presets.pytorch's split_complex layout."
                )
    if params is not None:
        p_leaves = jax.tree.leaves(params)
        if len(p_leaves) != len(nu):
            raise ValueError(f"The state has {len(nu)} leaves but params has {len(p_leaves)}.")
        for i, (p, v) in enumerate(zip(p_leaves, nu, strict=True)):
            if np.shape(p) != np.shape(v):
                raise ValueError(f"parameter {i}: nu has shape {np.shape(v)} but the params leaf {np.shape(p)}.")
            if jnp.iscomplexobj(p) != jnp.iscomplexobj(v):
                raise ValueError(
                    f"parameter {i}: the params leaf is {'complex' if jnp.iscomplexobj(p) else 'real'} but nu is "
                    f"{'complex' if jnp.iscomplexobj(v) else 'real'}."
                )

    import torch  # optional dependency: imported only here

    count = int(state.count)
    lr_value = float(lr(count)) if callable(lr) else float(lr)
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    torch_state: dict[int, dict[str, Any]] = {}
    if count > 0:
        for i, (v, m, b) in enumerate(zip(nu, mu, buf, strict=True)):
            entry = {
                "step": torch.tensor(float(count), dtype=step_dtype),
                "square_avg": torch.from_numpy(_torch_array(v)),
            }
            if b is not None:
                entry["momentum_buffer"] = torch.from_numpy(_torch_array(b))
            if m is not None:
                entry["grad_avg"] = torch.from_numpy(_torch_array(m))
            torch_state[i] = entry
    group = {
        "lr": lr_value,
        "momentum": momentum,
        "alpha": alpha,
        "eps": eps,
        "centered": centered,
        "weight_decay": weight_decay,
        "capturable": False,
        "foreach": None,
        "maximize": maximize,
        "differentiable": False,
        "params": list(range(len(nu))),
    }
    return {"state": torch_state, "param_groups": [group]}
