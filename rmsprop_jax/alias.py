"""The user-facing optimizer: RMS scaling, learning rate, momentum and weight decay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _checks, _placement, _random, formats
from rmsprop_jax._guard import skip_if_nonfinite
from rmsprop_jax.flat import flat_transform
from rmsprop_jax.transform import (
    check_layout,
    check_rms_args,
    compute_dtype,
    flatten_like_state,
    flatten_params,
    init_moments,
    moment_shardings,
    needs_zero_guard,
    rms_scale_leaf,
)

WeightDecayMask = Any | Callable[[optax.Params], Any]


class RMSpropState(NamedTuple):
    """State of `rmsprop`.

    The fields are the same for every hyperparameter value; options that are
    off hold None instead of parameter-sized arrays.

    Attributes:
      count: int32 number of updates applied (saturating). The learning-rate
        schedule is called with it before it is incremented.
      nu: running average of squared gradients, shaped like the params
        (with ``state_bits`` leaves of at least 4,096 elements are
        `rmsprop_jax.lowmem.QuantizedArray`, with ``factored=True`` large
        matrices are `rmsprop_jax.lowmem.FactoredArray`; with ``flat=True``
        the state is one vector per dtype, see `rmsprop_jax.flat.FlatLayout`).
      mu: running average of gradients when ``centered=True``, else None.
      momentum: momentum buffer when ``momentum`` is not None, else None.
      skipped: int32 number of steps skipped for non-finite values when
        ``skip_nonfinite=True``, else None.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    nu: optax.Updates
    mu: optax.Updates | None
    momentum: optax.Updates | None
    skipped: jax.Array | None = None


def _is_off(value: Any) -> bool:
    """True when a hyperparameter is a concrete zero, so its work can be skipped."""
    return _checks.concrete_float(value) == 0.0


def _rounded(product: jax.Array, x: jax.Array) -> jax.Array:
    """`product` (of `x` and scalars) as a rounded value of its own: not fused into a multiply-add nor reassociated."""
    return jnp.where(jnp.isnan(x), x, product)


def _decoupled_decay(
    update: jax.Array, x: jax.Array, wd: jax.Array, eta: jax.Array, *, params_first: bool | str
) -> jax.Array:
    """Adds ``-eta * wd * x`` to `update` (the compute-dtype update of params `x`).

    With `params_first` (for float32 and wider params) the decay is applied to
    the params before the step, as Keras does, and the update is returned as
    the difference of the new and old params: the same math with Keras'
    rounding of the params; ``"multiply"`` decays them as ``x * (1 - eta * wd)``
    instead (timm's in-place form: the factor and the decayed params each
    rounded once). Half-precision params always take the decay inside the
    update: rounded on its own, ``x - eta * wd * x`` is ``x`` in bfloat16
    for any realistic rate, and the decay would be lost.
    """
    x_wide = x.astype(update.dtype)
    if not params_first or jnp.finfo(x.dtype).bits < 32:
        return update - eta * wd * x_wide
    # Left alone, XLA contracts a product and the addition after it into one
    # fused multiply-add and folds (x * wd) * eta into x * (wd * eta), both
    # skipping roundings that the frameworks' separate operations do (timm
    # drifted 1.4e-6 from it in 200 steps). A select between two equal values
    # (both NaN when x is) makes each product a rounded value of its own.
    if params_first == "multiply":
        decayed = _rounded(x_wide * (1 - eta * wd), x_wide).astype(x.dtype)
    else:
        decayed = x_wide - _rounded(_rounded(x_wide * wd, x_wide) * eta, x_wide)  # Keras: (x * wd) * lr
        decayed = decayed.astype(x.dtype)
    stepped = (decayed.astype(update.dtype) + update).astype(x.dtype)
    return stepped.astype(update.dtype) - x_wide


def rmsprop(
    learning_rate: optax.ScalarOrSchedule,
    decay: chex.Numeric = 0.9,
    eps: chex.Numeric = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    initial_scale: chex.Numeric = 0.0,
    centered: bool = False,
    centered_average: str = "lerp",
    momentum: chex.Numeric | None = None,
    nesterov: bool = False,
    lr_in_momentum: bool = True,
    bias_correction: bool = False,
    weight_decay: chex.Numeric = 0.0,
    decoupled_weight_decay: bool = False,
    weight_decay_mask: WeightDecayMask | None = None,
    decay_params_first: bool | str = False,
    nu_dtype: Any = None,
    split_complex: bool = False,
    skip_nonfinite: bool = False,
    stochastic_rounding: bool | None = None,
    state_bits: int | None = None,
    block_size: int | None = None,
    row_blocks: Any = None,
    factored: bool = False,
    factored_min_dim: int | None = None,
    flat: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""RMSprop: gradient descent with per-element step sizes from a running RMS.

    With :math:`g` the gradient, :math:`x` the params, :math:`t` the 1-based
    step and :math:`\eta_t` the learning rate (a schedule is called with
    :math:`t-1`), one step is

    1. coupled weight decay: :math:`g \leftarrow g + \lambda x`;
    2. :math:`v \leftarrow \gamma v + (1-\gamma)|g|^2`, with
       :math:`v_0` = ``initial_scale``;
    3. centered: :math:`m \leftarrow \gamma m + (1-\gamma) g` and
       :math:`\hat v \leftarrow \max(\hat v - |\hat m|^2, 0)`;
    4. bias correction: :math:`\hat v = v / (1-\gamma^t)`,
       :math:`\hat m = m / (1-\gamma^t)`;
    5. :math:`s = g / (\sqrt{\hat v} + \epsilon)`, or
       :math:`g / \sqrt{\hat v + \epsilon}` with ``eps_in_sqrt``;
    6. momentum :math:`\mu`: with ``lr_in_momentum`` (TF1/Keras/optax)
       :math:`b \leftarrow \mu b + \eta_t s`, update :math:`-b` (Nesterov:
       :math:`-(\mu b + \eta_t s)`); otherwise (PyTorch)
       :math:`b \leftarrow \mu b + s`, update :math:`-\eta_t b` (Nesterov:
       :math:`-\eta_t(\mu b + s)`); no momentum: update :math:`-\eta_t s`;
    7. decoupled weight decay: update :math:`\leftarrow` update
       :math:`- \eta_t \lambda x` (not passed through the momentum).

    With the defaults this is the rule of Hinton's lecture 6e,
    :math:`x \leftarrow x - \eta g/(\sqrt{v} + 10^{-8})` with
    :math:`\gamma = 0.9` and :math:`v_0 = 0`. Note that ``optax.rmsprop``
    defaults to eps inside the root; pass ``eps_in_sqrt=True`` to match it.

    Args:
      learning_rate: a non-negative number, a scalar array, or an optax
        schedule called with the 0-based step count.
      decay: decay rate :math:`\gamma` of the averages, in [0, 1).
      eps: :math:`\epsilon` >= 0.
      eps_in_sqrt: put eps inside the square root.
      initial_scale: starting value of ``nu``, >= 0 (TF1 uses 1.0).
      centered: normalise by the running standard deviation (Graves, 2013).
      centered_average: how the gradient average of ``centered`` is rounded:
        ``"lerp"`` (default; PyTorch's and TF's kernels, exact at both ends
        of the decay) or ``"weighted"``, :math:`\gamma m + (1-\gamma) g`
        (Keras 3). The same value up to the last bit.
      momentum: momentum coefficient in [0, 1), or None for no momentum
        (and no momentum buffer).
      nesterov: use Nesterov momentum (needs ``momentum``).
      lr_in_momentum: scale by the learning rate before the momentum buffer
        (TF1, Keras, optax) rather than after it (PyTorch). The two differ
        only when the learning rate changes over time.
      bias_correction: correct the averages for their zero start as in Adam.
      weight_decay: :math:`\lambda` >= 0. A non-zero value needs the params
        in ``update``; when it is a traced array (``inject_hyperparams``) and
        no params are given, the updates are NaN unless it is zero.
      decoupled_weight_decay: apply weight decay to the update, scaled by the
        learning rate (AdamW/Keras), instead of adding it to the gradient
        (PyTorch's L2).
      weight_decay_mask: a pytree of bools shaped like the params, or a
        function from params to one, selecting the leaves to decay.
      decay_params_first: with decoupled weight decay and float32 or wider
        params, decay the params before the step and return the difference of
        the new and old params (Keras' rounding, ``x - (x·λ)·η``; the updates
        are then rounded to the params' precision). ``"multiply"`` decays
        them as ``x·(1 - η·λ)`` instead (timm's in-place rounding). For exact
        parity with those frameworks.
      nu_dtype: dtype of the state (``nu``, ``mu`` and momentum). None keeps
        the params' precision, except bfloat16/float16 params get float32.
        For a smaller state prefer bfloat16: float16's range ends near 6e-8,
        so small squared gradients underflow and the steps grow.
      split_complex: treat the real and imaginary parts of complex params as
        independent reals (PyTorch) instead of averaging :math:`|g|^2`.
      skip_nonfinite: skip any step whose gradients, updates or new ``nu``
        hold a NaN or inf: the updates are zero, the state (count, averages,
        momentum) stays as it was and ``state.skipped`` counts the skipped
        steps. The decision is global for the step.
      stochastic_rounding: round state stored below float32 precision
        (``nu_dtype`` bfloat16/float16, ``state_bits``) stochastically, so
        that it stays unbiased and a decay close to 1 still forgets. None
        (default) means on; see :mod:`rmsprop_jax.lowmem`.
      state_bits: None, or 8 or 4 to store ``nu`` as 8-bit (4-bit) codes
        with a float32 scale per block
        (:class:`rmsprop_jax.formats.QuantizedArray`): about 1.016 (0.53)
        bytes per element; leaves under 4096 elements stay unquantized.
      block_size: elements per block, consecutive rows down the leaf's first
        axis (default 256 for 8 bits, 128 for 4; needs ``state_bits``).
      row_blocks: True, or a pytree of bools shaped like the params, or a
        function of the params returning one (as ``weight_decay_mask``):
        quantized leaves where it is True get their blocks along the last axis,
        ``block_size`` consecutive elements of one row, instead of down the
        first axis. For embedding tables: a block down the first axis mixes
        frequent and rare tokens, whose ``nu`` then comes out coarse
        (``python -m benchmarks.embedding_blocks``). Needs ``state_bits``;
        not with ``flat``.
      factored: store ``nu`` of leaves whose two largest axes both have at
        least ``factored_min_dim`` elements as Adafactor's running row and
        column means (:class:`rmsprop_jax.formats.FactoredArray`, n + m
        floats for an n × m leaf), estimating
        :math:`\hat v_{ij} = R_i C_j / \mathrm{mean}(R)`; other leaves keep
        their ``nu`` format (with ``state_bits``, quantized when large).
        Not with ``centered`` (the rank-1 estimate can fall below
        :math:`m^2`, which would give steps of lr/ε) nor ``flat``.
      factored_min_dim: see ``factored`` (default 128).
      flat: keep the state as one contiguous vector per dtype (and per
        weight-decay mask value) instead of one array per leaf,
        so that a step over many small leaves runs O(1) kernels for the state;
        same results. Read ``nu`` per leaf with
        ``rmsprop_jax.flat.FlatLayout(params, weight_decay_mask).unravel(state.nu)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      `RMSpropState`. Its updates are to be added to the params with
      ``optax.apply_updates``; they have the dtype of the gradients.

    Example:
      >>> import jax, jax.numpy as jnp, optax, rmsprop_jax
      >>> loss = lambda p: jnp.sum((p["w"] - 3.0) ** 2)
      >>> tx = optax.chain(optax.clip_by_global_norm(1.0), rmsprop_jax.rmsprop(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...     updates, state = tx.update(jax.grad(loss)(params), state, params)
      ...     return optax.apply_updates(params, updates), state
      >>> for _ in range(100):
      ...     params, state = step(params, state)
      >>> bool(jnp.allclose(params["w"], 3.0, atol=0.1))
      True

    References:
      Hinton, Srivastava and Swersky, *Neural Networks for Machine Learning*,
      lecture 6e (2012); Graves, *Generating Sequences With Recurrent Neural
      Networks*, arXiv:1308.0850 (2013); Loshchilov and Hutter, *Decoupled
      Weight Decay Regularization*, ICLR 2019.
    """
    check_layout(factored, row_blocks, centered=centered, flat=flat)
    if centered_average not in ("lerp", "weighted"):
        raise ValueError(f'centered_average must be "lerp" or "weighted", got {centered_average!r}.')
    if not (isinstance(decay_params_first, bool) or decay_params_first == "multiply"):
        raise ValueError(f'decay_params_first must be False, True or "multiply", got {decay_params_first!r}.')
    if flat:  # the same transform on per-dtype vectors (rmsprop_jax.flat)
        options = dict(locals())
        del options["flat"], options["weight_decay_mask"]
        return flat_transform(
            lambda mask: rmsprop(**options, weight_decay_mask=mask),
            weight_decay_mask,
            uses_params=not _is_off(weight_decay),
        )
    state_dtype = check_rms_args(decay, eps, initial_scale, nu_dtype)
    storage = formats.make_storage(
        state_dtype, split_complex, state_bits, block_size, stochastic_rounding, factored, factored_min_dim, row_blocks
    )
    _checks.check_learning_rate(learning_rate)
    if momentum is None:
        if nesterov:
            raise ValueError("nesterov=True needs momentum: pass momentum in [0, 1), e.g. 0.9.")
    else:
        _checks.check_interval("momentum", momentum, 0.0, 1.0, high_open=True)
    _checks.check_interval("weight_decay", weight_decay, 0.0)
    guard_zero = needs_zero_guard(eps)
    use_decay = not _is_off(weight_decay)
    coupled = use_decay and not decoupled_weight_decay
    decoupled = use_decay and decoupled_weight_decay

    def build(params: optax.Params) -> RMSpropState:
        nu, mu, buffer = init_moments(params, initial_scale, centered, storage, momentum=momentum is not None)
        skipped = jnp.zeros([], jnp.int32) if skip_nonfinite else None
        return RMSpropState(count=jnp.zeros([], jnp.int32), nu=nu, mu=mu, momentum=buffer, skipped=skipped)

    def shardings_for(
        treedef: jax.tree_util.PyTreeDef, leaves: list[Any], shardings: list[Any], scalar: Any
    ) -> RMSpropState:
        nu, mu, buffer = moment_shardings(leaves, shardings, treedef, centered, storage, momentum=momentum is not None)
        return RMSpropState(count=scalar, nu=nu, mu=mu, momentum=buffer, skipped=scalar if skip_nonfinite else None)

    def init_fn(params: optax.Params) -> RMSpropState:
        # See scale_by_rms: the state lands where its parameters are.
        _checks.check_inexact(jax.tree.leaves(params), "params")
        return _placement.initialize(build, shardings_for, params)

    @_placement.on_auto_axes
    def update_fn(
        updates: optax.Updates, state: RMSpropState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, RMSpropState]:
        del extra_args
        treedef, g_leaves, nu_leaves, mu_leaves = flatten_like_state(updates, state.nu, state.mu)
        n = len(g_leaves)
        x_leaves: list[Any] = [None] * n
        decay_mask = [False] * n
        unapplied_decay = None
        if use_decay and params is None and _checks.concrete_float(weight_decay) is None:
            # inject_hyperparams passes even the default weight_decay=0.0 as an array,
            # so update(grads, state) without params has to work. A non-zero value
            # then cannot be applied, and nothing can be raised inside jit: the
            # updates become NaN instead of silently skipping the decay.
            unapplied_decay = jnp.asarray(weight_decay)
        elif use_decay:
            x_leaves = flatten_params(params, treedef, "weight_decay")
            decay_mask = _checks.mask_leaves(weight_decay_mask, params, treedef, "weight_decay_mask")
        b_leaves = [None] * n if state.momentum is None else jax.tree.leaves(state.momentum)

        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        count = optax.safe_increment(state.count)
        out, nu_out, mu_out, b_out = [], [], [], []
        leaves = zip(g_leaves, nu_leaves, mu_leaves, b_leaves, x_leaves, decay_mask, strict=True)
        for i, (g, nu, mu, b, x, decays) in enumerate(leaves):
            cdtype = compute_dtype(g.dtype, formats.value_dtype(nu))
            real = jnp.finfo(cdtype).dtype
            eta = jnp.asarray(lr, real)
            wd = jnp.asarray(weight_decay, real)
            g32 = g.astype(cdtype)
            if coupled and decays:
                g32 = g32 + wd * x.astype(cdtype)
            s, nu_new, mu_new = rms_scale_leaf(
                g32,
                nu,
                mu,
                count,
                decay,
                eps,
                leaf=i,
                storage=storage,
                eps_in_sqrt=eps_in_sqrt,
                centered=centered,
                centered_average=centered_average,
                bias_correction=bias_correction,
                guard_zero=guard_zero,
                # Without momentum the update is -eta * g / denominator, with the division last.
                numerator=-eta if b is None else None,
                twin=nesterov and b is not None and not jnp.iscomplexobj(g32),
            )
            s, s_twin = s if isinstance(s, tuple) else (s, s)
            if b is None:
                update = s
            else:
                mom = jnp.asarray(momentum, real)
                step = eta * s if lr_in_momentum else s
                b_new = mom * b.astype(cdtype) + step
                _, b_fmt = storage.stored_formats(nu, b)
                assert b_fmt is not None
                b = b_fmt.store(b_new, b, _random.step_key(count, i, _random.MOMENTUM))
                b_new, b = formats.for_update(b_fmt, b_new, b, count, cdtype)
                # The twin (the same value) lets XLA recompute the step next to the params.
                direction = mom * b_new + (eta * s_twin if lr_in_momentum else s_twin) if nesterov else b_new
                update = -direction if lr_in_momentum else -eta * direction
            if decoupled and decays:
                update = _decoupled_decay(update, x, wd, eta, params_first=decay_params_first)
            if unapplied_decay is not None:
                update = jnp.where(unapplied_decay == 0, update, jnp.nan)
            out.append(update.astype(g.dtype))
            nu_out.append(nu_new)
            mu_out.append(mu_new)
            b_out.append(b)
        new_updates = jax.tree.unflatten(treedef, out)
        new_state = RMSpropState(
            count=count,
            nu=jax.tree.unflatten(treedef, nu_out),
            mu=jax.tree.unflatten(treedef, mu_out) if centered else None,
            momentum=None if state.momentum is None else jax.tree.unflatten(treedef, b_out),
            skipped=state.skipped,
        )
        if skip_nonfinite:
            return skip_if_nonfinite(g_leaves, new_updates, new_state, state)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
