r"""Diagnostics: the per-element step sizes that RMSprop is taking, and scalars to log.

RMSprop divides every gradient element by its own running root mean square.
Without momentum, the step of element :math:`i` at step :math:`t` is

.. math::

  \Delta x_i = -\underbrace{\frac{\eta_t}{\sqrt{\hat v_{t,i}} + \epsilon}}_{\text{effective learning rate}}
  \; g_{t,i},

so :math:`\eta_t / (\sqrt{\hat v_{t,i}} + \epsilon)` is the learning rate that
element actually gets. This module computes it from an optimizer state,
together with a few jit-friendly scalars worth logging during training.

* `find_state` digs the `rmsprop_jax.RMSpropState` or
  `rmsprop_jax.ScaleByRmsState` out of any optimizer state: an
  ``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
  ``optax.masked``, the ``opt_state`` of a flax ``nnx.Optimizer``, or the
  state itself.
* `effective_learning_rate` returns the per-element learning rate, a tree
  shaped like the params.
* `summary` returns a flat dict of scalars (min/median/max of the effective
  learning rate per leaf and overall, the RMS of the gradient and of the
  update, the fraction of elements where epsilon dominates the denominator).

The state does not record the hyperparameters, so they are passed in with
the names of `rmsprop_jax.rmsprop`. When the state sits inside
``optax.inject_hyperparams``, ``learning_rate``, ``decay`` and ``eps`` are
read from the injected values unless given; ``eps_in_sqrt`` and
``bias_correction`` are static options and must always be passed when they are
on. Whether the state is centered (``mu`` is not None) and whether complex
params are split (``nu`` is complex) is read from the state.

References:
  Hinton, Srivastava and Swersky, *Neural Networks for Machine Learning*,
  lecture 6e (2012); Graves, *Generating Sequences With Recurrent Neural
  Networks*, arXiv:1308.0850 (2013), eqs. (38)-(41).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from rmsprop_jax import _placement, formats
from rmsprop_jax.alias import RMSpropState
from rmsprop_jax.transform import ScaleByRmsState, abs_squared

__all__ = ["effective_learning_rate", "find_state", "summary"]

RmsState = RMSpropState | ScaleByRmsState

# rmsprop's defaults, used for hyperparameters that are neither passed nor injected.
_DEFAULT_DECAY = 0.9
_DEFAULT_EPS = 1e-8


def _walk(node: Any, injected: Mapping[str, Any] | None) -> Iterator[tuple[RmsState, Mapping[str, Any] | None]]:
    """Yields every RMS state below `node` with the hyperparams of the innermost injection around it."""
    if isinstance(node, (RMSpropState, ScaleByRmsState)):
        yield node, injected
        return
    hyperparams = getattr(node, "hyperparams", None)
    if isinstance(hyperparams, Mapping) and hasattr(node, "inner_state"):
        # optax.inject_hyperparams (stateless or stateful): the inner state sees these values.
        yield from _walk(node.inner_state, hyperparams)
        return
    children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    if jax.tree_util.treedef_is_leaf(treedef):
        return
    for child in children:
        yield from _walk(child, injected)


def _find(opt_state: Any) -> tuple[RmsState, Mapping[str, Any] | None]:
    found = list(_walk(opt_state, None))
    if not found:
        raise ValueError(
            "No RMSpropState or ScaleByRmsState found in the optimizer state. Pass the state of "
            "rmsprop_jax.rmsprop or rmsprop_jax.scale_by_rms, or any optax state that contains one."
        )
    if len(found) > 1:
        raise ValueError(
            f"The optimizer state holds {len(found)} RMS states (e.g. one per optax.multi_transform "
            "group); pass the one to inspect, e.g. opt_state.inner_states['group'].inner_state."
        )
    return found[0]


def find_state(opt_state: Any) -> RMSpropState | ScaleByRmsState:
    """The one `RMSpropState` or `ScaleByRmsState` inside an optimizer state.

    The state tree is searched depth first, through optax chains (tuples),
    ``inject_hyperparams``, ``MultiSteps``, ``masked`` and any other pytree.

    Args:
      opt_state: the state returned by ``tx.init`` / ``tx.update``.

    Returns:
      The state of `rmsprop_jax.rmsprop` or `rmsprop_jax.scale_by_rms`.

    Raises:
      ValueError: there is no such state, or more than one.

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax
      >>> from rmsprop_jax import diagnostics
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), rmsprop_jax.rmsprop(1e-3))
      >>> state = tx.init({"w": jnp.zeros(3)})
      >>> type(diagnostics.find_state(state)).__name__
      'RMSpropState'
    """
    return _find(opt_state)[0]


def _scalar(value: Any) -> jax.Array:
    """A scalar that may come wrapped (e.g. in a flax nnx variable) as a plain array."""
    leaves = jax.tree.leaves(value)
    if len(leaves) != 1:
        raise ValueError(f"expected a scalar, got {value!r}")
    return jnp.asarray(leaves[0])


def _resolve(
    state: RmsState,
    injected: Mapping[str, Any] | None,
    learning_rate: Any,
    decay: Any,
    eps: Any,
) -> tuple[jax.Array, Any, Any]:
    """The learning rate of the last step taken, and decay and eps (explicit > injected > default)."""
    injected = injected or {}
    count = _scalar(state.count)
    if learning_rate is None:
        learning_rate = injected.get("learning_rate")
    if learning_rate is None:
        if isinstance(state, RMSpropState):
            raise ValueError(
                "The state of rmsprop does not record the learning rate: pass learning_rate= "
                "(a number or the schedule that was given to rmsprop)."
            )
        learning_rate = 1.0  # scale_by_rms applies no learning rate
    if callable(learning_rate):
        # The last step was taken with the schedule at the count it started from.
        learning_rate = learning_rate(jnp.maximum(count - 1, 0))
    decay = injected.get("decay", _DEFAULT_DECAY) if decay is None else decay
    eps = injected.get("eps", _DEFAULT_EPS) if eps is None else eps
    return jnp.asarray(learning_rate), decay, eps


def _leaf_parts(
    nu: jax.Array,
    mu: jax.Array | None,
    correction: jax.Array | None,
    eps: Any,
    eps_in_sqrt: bool,
) -> tuple[jax.Array, jax.Array]:
    """``(v_hat, denominator)`` of one leaf whose elements each have one real average."""
    real = jnp.result_type(jnp.float32, nu.dtype)
    v_hat = nu.astype(real)
    if correction is not None:
        v_hat = v_hat * correction.astype(real)
    if mu is not None:
        m_hat = mu.astype(jnp.result_type(real, mu.dtype))
        if correction is not None:
            m_hat = m_hat * correction.astype(real)
        v_hat = jnp.maximum(v_hat - abs_squared(m_hat).astype(real), 0)
    eps = jnp.asarray(eps, real)
    denominator = jnp.sqrt(v_hat + eps) if eps_in_sqrt else jnp.sqrt(v_hat) + eps
    return v_hat, denominator


def _per_leaf(
    state: RmsState,
    correction: jax.Array | None,
    eps: Any,
    eps_in_sqrt: bool,
    fn: Callable[[jax.Array, jax.Array], Any],
) -> list[tuple[Any, Any]]:
    """Applies ``fn(v_hat, denominator)`` to every leaf; split complex leaves give a (real, imag) pair."""
    nu_leaves = jax.tree.leaves(formats.decode(state.nu))
    for leaf in nu_leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"nu holds a {jnp.result_type(leaf)} array; the diagnostics need nu as floating-point values "
                "or in one of the formats of rmsprop_jax.formats."
            )
    mu_leaves: list[Any] = [None] * len(nu_leaves) if state.mu is None else jax.tree.leaves(state.mu)
    out = []
    for nu, mu in zip(nu_leaves, mu_leaves, strict=True):
        nu = jnp.asarray(nu)
        if jnp.iscomplexobj(nu):
            # split_complex: the real and imaginary parts are independent reals.
            re = fn(*_leaf_parts(nu.real, None if mu is None else mu.real, correction, eps, eps_in_sqrt))
            im = fn(*_leaf_parts(nu.imag, None if mu is None else mu.imag, correction, eps, eps_in_sqrt))
            out.append((re, im))
        else:
            out.append((fn(*_leaf_parts(nu, mu, correction, eps, eps_in_sqrt)), None))
    return out


def _correction(state: RmsState, decay: Any, bias_correction: bool) -> jax.Array | None:
    if not bias_correction:
        return None
    count = _scalar(state.count)
    real = jnp.result_type(jnp.float32, jnp.asarray(decay).dtype)
    # Before the first step there is nothing to correct (1 - decay**0 would be 0).
    return jnp.where(count > 0, 1 / (1 - jnp.asarray(decay, real) ** count.astype(real)), jnp.ones([], real))


def effective_learning_rate(
    opt_state: Any,
    learning_rate: Any = None,
    *,
    decay: Any = None,
    eps: Any = None,
    eps_in_sqrt: bool = False,
    bias_correction: bool = False,
) -> optax.Updates:
    r"""The learning rate each element got in the last step.

    From the state after step :math:`t` (``count`` = t),

    .. math::

      \eta^{\text{eff}}_i = \frac{\eta_t}{\sqrt{\hat v_{t,i}} + \epsilon}
      \quad\text{or, with } \texttt{eps\_in\_sqrt},\quad
      \frac{\eta_t}{\sqrt{\hat v_{t,i} + \epsilon}},

    with :math:`\hat v_t = v_t / (1 - \gamma^t)` under ``bias_correction``
    (no correction at ``count`` = 0) and, for a centered state,
    :math:`\hat v_t \leftarrow \max(\hat v_t - |\hat m_t|^2, 0)`. This is the
    factor of the last step: without momentum and weight decay the update of
    `rmsprop_jax.rmsprop` was exactly :math:`-\eta^{\text{eff}} \odot g`
    (for `rmsprop_jax.scale_by_rms`, :math:`+\eta^{\text{eff}} \odot g` with
    :math:`\eta = 1`). Momentum then sums these steps, multiplying a steady
    step by up to :math:`1/(1-\mu)`; that factor is not included. Where
    :math:`\hat v = 0` and :math:`\epsilon = 0` the result is inf.

    Complex params: with the default shared average the result is real. With
    ``split_complex=True`` (a complex ``nu``) the real and imaginary parts
    have separate rates, returned packed like the state:
    ``lr.real`` for the real parts, ``lr.imag`` for the imaginary parts.

    Args:
      opt_state: the state of `rmsprop_jax.rmsprop` or `rmsprop_jax.scale_by_rms`,
        or any optimizer state containing exactly one (see `find_state`).
      learning_rate: :math:`\eta`, a number, array or the optax schedule given
        to the optimizer (called with ``count - 1``, the count the last step
        started from). None: the injected value under
        ``optax.inject_hyperparams``, else 1 for `scale_by_rms` (the bare
        scale :math:`1/(\sqrt{\hat v} + \epsilon)`); required for `rmsprop`.
      decay: :math:`\gamma`, only used with ``bias_correction``. None: the
        injected value, else 0.9.
      eps: :math:`\epsilon`. None: the injected value, else 1e-8.
      eps_in_sqrt: the optimizer was built with ``eps_in_sqrt=True``.
      bias_correction: the optimizer was built with ``bias_correction=True``.

    Returns:
      A tree shaped like the params (the structure of ``nu``), in at least
      float32.

    Example:
      One step with gradients 1 and 10: :math:`v = 0.1 g^2`, so the rate is
      :math:`0.1 / (\sqrt{0.1}|g|) \approx 0.316/|g|`; the large gradient gets
      a ten times smaller learning rate.

      >>> import jax.numpy as jnp, optax, rmsprop_jax
      >>> from rmsprop_jax import diagnostics
      >>> tx = rmsprop_jax.rmsprop(learning_rate=0.1)
      >>> params = {"w": jnp.zeros(2)}
      >>> updates, state = tx.update({"w": jnp.array([1.0, 10.0])}, tx.init(params))
      >>> lr = diagnostics.effective_learning_rate(state, learning_rate=0.1)
      >>> lr["w"].round(4)
      Array([0.3162, 0.0316], dtype=float32)
      >>> bool(jnp.allclose(updates["w"], -lr["w"] * jnp.array([1.0, 10.0])))
      True

      Under ``inject_hyperparams`` the learning rate is read from the state:

      >>> tx = optax.inject_hyperparams(rmsprop_jax.rmsprop)(learning_rate=0.1)
      >>> _, state = tx.update({"w": jnp.array([1.0, 10.0])}, tx.init(params))
      >>> diagnostics.effective_learning_rate(state)["w"].round(4)
      Array([0.3162, 0.0316], dtype=float32)
    """
    state, injected = _find(opt_state)
    eta, decay, eps = _resolve(state, injected, learning_rate, decay, eps)

    def rates(state: RmsState, eta: jax.Array) -> Any:
        correction = _correction(state, decay, bias_correction)
        parts = _per_leaf(state, correction, eps, eps_in_sqrt, lambda _, den: eta.astype(den.dtype) / den)
        leaves = [lr if im is None else jax.lax.complex(lr, im) for lr, im in parts]
        return jax.tree.unflatten(jax.tree.structure(formats.decode(state.nu)), leaves)

    mesh = _placement.explicit_mesh_of(state)
    if mesh is None:
        return rates(state, eta)

    def layout(stored: Any) -> Any:
        # A dense nu's layout is its parameter's; decoded formats come back replicated.
        sharding = None if formats.is_stored_node(stored) else _placement.leaf_sharding(stored)
        return sharding if isinstance(sharding, NamedSharding) else _placement.replicated(mesh)

    out = jax.tree.map(layout, state.nu, is_leaf=formats.is_stored_node)
    return _placement.in_auto_axes(rates, out, state, eta)


def _leaf_name(path: tuple[Any, ...]) -> str:
    """'layer/kernel' for the path of a leaf (a trailing '.value' of a wrapped variable is dropped)."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            names.append(str(key.key))
        else:
            names.append(str(key))
    if len(names) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names.pop()
    return "/".join(names) if names else "root"


def _rms(tree: Any) -> jax.Array:
    """Root mean square over every element of every leaf, scaled so that large values cannot overflow."""
    magnitudes = [jnp.abs(jnp.asarray(x)) for x in jax.tree.leaves(tree)]
    leaves = [x.ravel().astype(jnp.result_type(jnp.float32, x.dtype)) for x in magnitudes if x.size]
    if not leaves:
        return jnp.asarray(jnp.nan, jnp.float32)
    dtype = jnp.result_type(*leaves)
    big = jnp.max(jnp.stack([jnp.max(x).astype(dtype) for x in leaves]))
    safe = jnp.where((big > 0) & jnp.isfinite(big), big, 1)
    total = sum(jnp.sum(jnp.square(x.astype(dtype) / safe)) for x in leaves)
    size = sum(x.size for x in leaves)
    # 0 stays 0, and inf or NaN anywhere is returned as is.
    return jnp.where((big > 0) & jnp.isfinite(big), safe * jnp.sqrt(total / size), big)


def summary(
    opt_state: Any,
    grads: Any = None,
    updates: Any = None,
    *,
    learning_rate: Any = None,
    decay: Any = None,
    eps: Any = None,
    eps_in_sqrt: bool = False,
    bias_correction: bool = False,
    per_leaf: bool = True,
) -> dict[str, jax.Array]:
    r"""Scalars for a training log: the spread of the effective learning rate and the size of the step.

    With :math:`\eta^{\text{eff}}` from `effective_learning_rate` (the
    hyperparameter arguments mean the same), the returned dict holds

    * ``lr_min``, ``lr_median``, ``lr_max``: over all elements of all leaves;
    * ``lr_min/<leaf>``, ``lr_median/<leaf>``, ``lr_max/<leaf>`` for each leaf,
      named by its path in the params (``"layer/kernel"``), when `per_leaf`;
    * ``eps_dominated_fraction``: the fraction of elements whose denominator
      is dominated by epsilon, :math:`\sqrt{\hat v} < \epsilon`, i.e.
      :math:`\hat v < \epsilon^2` (with ``eps_in_sqrt``: :math:`\hat v < \epsilon`).
      There the step is no longer normalised: it is :math:`\approx \eta g/\epsilon`;
    * ``grad_rms`` when `grads` is given and ``update_rms`` when `updates`
      is given: :math:`\sqrt{\tfrac1N \sum_i |x_i|^2}` over all N elements.

    Every value is a scalar array and the keys depend only on the tree
    structure, so ``summary`` can run inside ``jax.jit`` or ``lax.scan`` and
    its output can be stacked over steps. Split complex leaves count as two
    real elements per entry. Leaves with no elements are left out. The
    medians sort the elements, which for very large models costs a few copies
    of the state; pass ``per_leaf=False`` to skip the per-leaf entries.

    Args:
      opt_state: as for `effective_learning_rate`.
      grads: the gradients of the step, optional.
      updates: the updates the optimizer returned, optional.
      learning_rate, decay, eps, eps_in_sqrt, bias_correction: as for
        `effective_learning_rate`.
      per_leaf: include the per-leaf learning-rate entries.

    Returns:
      A dict from name to float scalar array (at least float32).

    Example:
      >>> import jax, jax.numpy as jnp, optax, rmsprop_jax
      >>> from rmsprop_jax import diagnostics
      >>> tx = optax.chain(optax.clip_by_global_norm(10.0), rmsprop_jax.rmsprop(0.1))
      >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
      >>> grads = {"a": jnp.array([1.0, 10.0]), "b": jnp.array([0.0, 0.0])}
      >>> @jax.jit
      ... def step(state):
      ...     updates, state = tx.update(grads, state, params)
      ...     return state, diagnostics.summary(state, grads, updates, learning_rate=0.1)
      >>> state, logs = step(tx.init(params))
      >>> sorted(logs)  # doctest: +NORMALIZE_WHITESPACE
      ['eps_dominated_fraction', 'grad_rms', 'lr_max', 'lr_max/a', 'lr_max/b', 'lr_median',
       'lr_median/a', 'lr_median/b', 'lr_min', 'lr_min/a', 'lr_min/b', 'update_rms']
      >>> float(logs["eps_dominated_fraction"])  # b has seen only zero gradients: v = 0 < eps**2
      0.5
      >>> print(f"{float(logs['lr_max/b']):.0e}")  # there the rate is 0.1 / eps
      1e+07
    """
    state, injected = _find(opt_state)
    eta, decay, eps = _resolve(state, injected, learning_rate, decay, eps)

    def scalars(state: RmsState, grads: Any, updates: Any, eta: jax.Array) -> dict[str, jax.Array]:
        correction = _correction(state, decay, bias_correction)

        def rate_and_dominated(v_hat: jax.Array, den: jax.Array) -> tuple[jax.Array, jax.Array]:
            e = jnp.asarray(eps, v_hat.dtype)
            return eta.astype(den.dtype) / den, v_hat < (e if eps_in_sqrt else e * e)

        parts = _per_leaf(state, correction, eps, eps_in_sqrt, rate_and_dominated)
        nu = formats.decode(state.nu)
        paths = [_leaf_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(nu)[0]]
        out: dict[str, jax.Array] = {}
        rates, dominated = [], []
        for name, (re, im) in zip(paths, parts, strict=True):
            pieces = [re] if im is None else [re, im]
            lr = jnp.concatenate([p[0].ravel() for p in pieces])
            if lr.size == 0:
                continue
            rates.append(lr)
            dominated.append(jnp.concatenate([p[1].ravel() for p in pieces]))
            if per_leaf:
                out[f"lr_min/{name}"] = jnp.min(lr)
                out[f"lr_median/{name}"] = jnp.median(lr)
                out[f"lr_max/{name}"] = jnp.max(lr)
        if rates:
            all_rates = jnp.concatenate(rates)
            out["lr_min"] = jnp.min(all_rates)
            out["lr_median"] = jnp.median(all_rates)
            out["lr_max"] = jnp.max(all_rates)
            out["eps_dominated_fraction"] = jnp.mean(jnp.concatenate(dominated).astype(all_rates.dtype))
        else:
            nan = jnp.asarray(jnp.nan, jnp.float32)
            out.update(lr_min=nan, lr_median=nan, lr_max=nan, eps_dominated_fraction=nan)
        if grads is not None:
            out["grad_rms"] = _rms(grads)
        if updates is not None:
            out["update_rms"] = _rms(updates)
        return out

    # On Explicit mesh axes the sorts of the medians need unsharded operands: run on Auto axes.
    mesh = _placement.explicit_mesh_of((state, grads, updates))
    if mesh is None:
        return scalars(state, grads, updates, eta)
    return _placement.in_auto_axes(scalars, _placement.replicated(mesh), state, grads, updates, eta)
