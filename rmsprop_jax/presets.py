"""Presets that reproduce other frameworks' RMSprop with `rmsprop_jax.rmsprop`.

Every framework's RMSprop computes something slightly different: epsilon
inside or outside the square root, an accumulator that starts at 0 or at 1,
the learning rate inside or outside the momentum buffer, coupled or decoupled
weight decay, complex numbers as :math:`|g|^2` or as pairs of reals. Each
function here takes a framework's own argument names and defaults, so the
arguments of a training script can be copied unchanged, and returns an
``optax.GradientTransformationExtraArgs`` built on :func:`rmsprop_jax.rmsprop`.

Wherever the framework accepts a learning rate, an optax schedule is accepted
too. It is called with the 0-based number of updates done so far, which is the
step counter every one of these frameworks passes to its own schedules.

The state of every preset is the core's `rmsprop_jax.RMSpropState`
(``count, nu, mu, momentum``): preprocessing such as PyTorch's ``maximize`` or
Keras' gradient clipping is stateless and runs in front of the core transform
without adding state. `rmsprop_jax.parity` runs each preset side by side with
the real framework; ``docs/parity.md`` lists the measured deviations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _checks
from rmsprop_jax.alias import rmsprop

__all__ = [
    "dqn_nature",
    "graves",
    "keras",
    "pytorch",
    "sonnet",
    "tf1",
    "tf_keras_legacy",
    "timm_tf",
]

# The fuzz factor that tf.keras substitutes for a falsy epsilon
# (``tf_keras.backend.epsilon()`` at its default setting).
_TF_KERAS_DEFAULT_EPSILON = 1e-7

GradientFn = Callable[[optax.Updates, optax.Params | None], optax.Updates]


def _tf_decay(decay: chex.Numeric) -> chex.Numeric:
    """The decay as TensorFlow uses it: cast to float32 before ``1 - decay``.

    TF casts every hyperparameter to the variable's dtype first, so its
    ``1 - decay`` is computed from the rounded decay. The core takes the
    complement of a Python number exactly, so a number is handed over as a
    float32 scalar; an array is used as given either way.
    """
    return np.float32(decay) if isinstance(decay, (int, float)) else decay


# --------------------------------------------------------------------------- #
# Argument checks phrased with each framework's own argument names.
# --------------------------------------------------------------------------- #


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}.")


def _check_unit(name: str, value: Any) -> None:
    """A coefficient in [0, 1), such as a decay rate or a momentum."""
    _checks.check_interval(name, value, 0.0, 1.0, high_open=True)


def _check_non_negative(name: str, value: Any) -> None:
    _checks.check_interval(name, value, 0.0)


def _check_learning_rate(name: str, value: Any) -> None:
    if callable(value):
        return
    _check_non_negative(name, value)


def _momentum_or_none(momentum: Any) -> Any:
    """The frameworks skip momentum (and keep no buffer) when it is exactly 0."""
    return None if _checks.concrete_float(momentum) == 0.0 else momentum


def _with_preprocessing(
    preprocess: GradientFn, inner: optax.GradientTransformationExtraArgs
) -> optax.GradientTransformationExtraArgs:
    """Runs a stateless gradient preprocessing step in front of `inner`.

    Unlike ``optax.chain``, this keeps `inner`'s state as the whole state, so a
    preset's state is a plain `RMSpropState` whatever its options.
    """

    def update_fn(
        updates: optax.Updates, state: Any, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, Any]:
        return inner.update(preprocess(updates, params), state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


# --------------------------------------------------------------------------- #
# PyTorch
# --------------------------------------------------------------------------- #


def pytorch(
    lr: optax.ScalarOrSchedule = 1e-2,
    alpha: chex.Numeric = 0.99,
    eps: chex.Numeric = 1e-8,
    weight_decay: chex.Numeric = 0.0,
    momentum: chex.Numeric = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""``torch.optim.RMSprop``.

    What PyTorch computes, per parameter, with :math:`\eta_t` the learning rate
    of step :math:`t`:

    1. :math:`g \leftarrow -g` if ``maximize``;
    2. coupled L2: :math:`g \leftarrow g + \lambda x` (``weight_decay``);
    3. :math:`v \leftarrow \alpha v + (1-\alpha) g^2`, with :math:`v_0 = 0`;
    4. centered: :math:`m \leftarrow \alpha m + (1-\alpha) g` and
       :math:`D = \sqrt{v - m^2} + \epsilon`, else :math:`D = \sqrt{v} + \epsilon`
       (epsilon **outside** the root);
    5. with momentum :math:`\mu > 0`: :math:`b \leftarrow \mu b + g/D`,
       :math:`x \leftarrow x - \eta_t b` (the learning rate is **outside** the
       buffer, so a schedule rescales the whole buffer); else
       :math:`x \leftarrow x - \eta_t g / D`.

    Complex parameters are treated as pairs of independent reals
    (``torch.view_as_real``): the real and imaginary parts each get their own
    average of squares.

    Mapping: ``rmsprop(lr, decay=alpha, eps=eps, eps_in_sqrt=False,
    centered=centered, momentum=momentum or None, lr_in_momentum=False,
    weight_decay=weight_decay, split_complex=True)``, with the sign of the
    gradients flipped in front of it when ``maximize``. When the learning rate
    is a schedule, it plays the part of a ``torch.optim.lr_scheduler`` that
    sets the group's ``lr`` before step :math:`t` to ``schedule(t)``.

    A ``torch.optim.RMSprop.state_dict()`` converts to this preset's state with
    `rmsprop_jax.interop.from_torch`, and back with
    `rmsprop_jax.interop.to_torch`.

    Args:
      lr: learning rate (a non-negative number or an optax schedule).
      alpha: smoothing constant of the averages, in [0, 1) (PyTorch also
        accepts values >= 1, which stop the averages from learning).
      eps: added to the denominator, outside the square root, >= 0.
      weight_decay: coupled L2 coefficient, >= 0.
      momentum: momentum in [0, 1); 0 keeps no momentum buffer.
      centered: divide by the running standard deviation instead of the RMS.
      maximize: maximise the objective (flip the gradients' sign).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      `rmsprop_jax.RMSpropState`. Pass the params to ``update`` when
      ``weight_decay`` is non-zero.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> tx = presets.pytorch(lr=0.01)
      >>> params = jnp.array([1.0, -2.0])
      >>> updates, state = tx.update(jnp.array([0.5, -3.0]), tx.init(params), params)
      >>> # From v0 = 0 the first step is lr * g / (sqrt(0.01 g^2) + eps) = 10 lr sign(g).
      >>> bool(jnp.allclose(updates, jnp.array([-0.1, 0.1])))
      True

    References:
      ``torch/optim/rmsprop.py`` (``RMSprop``, ``_single_tensor_rmsprop``,
      ``_multi_tensor_rmsprop``) in pytorch/pytorch; complex numbers as real
      pairs since pytorch/pytorch PR #83860.
    """
    _check_learning_rate("lr", lr)
    _check_unit("alpha", alpha)
    _check_non_negative("eps", eps)
    _check_non_negative("weight_decay", weight_decay)
    _check_unit("momentum", momentum)
    _check_bool("centered", centered)
    _check_bool("maximize", maximize)
    core = rmsprop(
        lr,
        decay=alpha,
        eps=eps,
        eps_in_sqrt=False,
        initial_scale=0.0,
        centered=centered,
        momentum=_momentum_or_none(momentum),
        lr_in_momentum=False,
        weight_decay=weight_decay,
        decoupled_weight_decay=False,
        split_complex=True,
    )
    if not maximize:
        return core
    return _with_preprocessing(lambda updates, params: jax.tree.map(jnp.negative, updates), core)


# --------------------------------------------------------------------------- #
# Keras 3
# --------------------------------------------------------------------------- #


def _clip_each_by_norm(updates: optax.Updates, clipnorm: Any) -> optax.Updates:
    """Keras' ``clipnorm``: each gradient scaled to an L2 norm of at most clipnorm."""

    def clip(g: jax.Array) -> jax.Array:
        squared = jnp.sum(jnp.square(g))
        norm = jnp.where(squared > 0, jnp.sqrt(jnp.where(squared > 0, squared, 1)), squared)
        limit = jnp.asarray(clipnorm, g.dtype)
        return g * limit / jnp.maximum(norm, limit)

    return jax.tree.map(clip, updates)


def _clip_by_global_norm(updates: optax.Updates, clip_norm: Any) -> optax.Updates:
    """Keras' ``global_clipnorm``: all gradients scaled by one factor."""
    leaves = jax.tree.leaves(updates)
    if not leaves:
        return updates
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves))
    limit = jnp.asarray(clip_norm, norm.dtype)
    # A non-finite norm gives a NaN factor, as in Keras.
    scale = limit * jnp.minimum(1 / norm, 1.0 / clip_norm) + (norm - norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates)


def _clip_by_value(updates: optax.Updates, clipvalue: Any) -> optax.Updates:
    """Keras' ``clipvalue``: each element clipped to [-clipvalue, clipvalue]."""
    return jax.tree.map(lambda g: jnp.clip(g, -clipvalue, clipvalue), updates)


def _keras_clipping(clipnorm: Any, clipvalue: Any, global_clipnorm: Any) -> GradientFn | None:
    """The clipping Keras applies, or None; rejects more than one clipping argument."""
    given = {
        name: value
        for name, value in (("clipnorm", clipnorm), ("clipvalue", clipvalue), ("global_clipnorm", global_clipnorm))
        if value is not None
    }
    if len(given) > 1:
        raise ValueError(
            "Only one of clipnorm, clipvalue and global_clipnorm can be set, as in Keras; got "
            + ", ".join(f"{name}={value!r}" for name, value in given.items())
            + "."
        )
    if not given:
        return None
    ((name, value),) = given.items()
    _check_non_negative(name, value)
    if _checks.concrete_float(value) == 0.0:
        return None  # Keras skips clipping when the value is 0.
    if name == "clipnorm":
        return lambda updates, params: _clip_each_by_norm(updates, value)
    if name == "global_clipnorm":
        return lambda updates, params: _clip_by_global_norm(updates, value)
    return lambda updates, params: _clip_by_value(updates, value)


def keras(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    rho: chex.Numeric = 0.9,
    momentum: chex.Numeric = 0.0,
    epsilon: chex.Numeric = 1e-7,
    centered: bool = False,
    weight_decay: chex.Numeric | None = None,
    clipnorm: chex.Numeric | None = None,
    clipvalue: chex.Numeric | None = None,
    global_clipnorm: chex.Numeric | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Keras 3 ``keras.optimizers.RMSprop`` (also ``tf.keras`` in TF >= 2.16).

    What Keras computes in one ``apply``, with :math:`\eta_t` the current
    learning rate (a schedule is called with the 0-based ``iterations``):

    1. clipping, at most one of: ``clipnorm`` scales each gradient to an L2
       norm of at most ``clipnorm`` (per variable); ``global_clipnorm``
       scales all gradients by one factor so that their joint norm is at most
       ``global_clipnorm``; ``clipvalue`` clips each element to
       :math:`[-c, c]`. A value of 0 means no clipping;
    2. decoupled weight decay at the current learning rate:
       :math:`x \leftarrow x - \eta_t \lambda x` (before the step, and not
       through the momentum buffer);
    3. :math:`v \leftarrow \rho v + (1-\rho) g^2`, :math:`v_0 = 0`; centered:
       :math:`m \leftarrow \rho m + (1-\rho) g` and the denominator is
       :math:`\sqrt{v - m^2 + \epsilon}`, else :math:`\sqrt{v + \epsilon}`
       (epsilon **inside** the root);
    4. with momentum :math:`\mu > 0`: :math:`b \leftarrow \mu b + \eta_t
       g/D`, :math:`x \leftarrow x - b` (the learning rate is inside the
       buffer; despite the docstring there is no :math:`1-\mu` factor); else
       :math:`x \leftarrow x - \eta_t g/D`.

    Mapping: the clipping above, then ``rmsprop(learning_rate, decay=rho,
    eps=epsilon, eps_in_sqrt=True, centered=centered, momentum=momentum or
    None, lr_in_momentum=True, weight_decay=weight_decay,
    decoupled_weight_decay=True, decay_params_first=True,
    centered_average="weighted")``. Keras decays the
    params before the step, which is the same arithmetic as adding the decay
    to the update (the Keras step does not read the params);
    ``decay_params_first`` reproduces its rounding of the params too.

    Keras' ``exclude_from_weight_decay``, EMA, loss scaling and gradient
    accumulation are not arguments of this preset: the core
    :func:`rmsprop_jax.rmsprop` takes a ``weight_decay_mask``, and optax has
    ``optax.MultiSteps`` for gradient accumulation.

    Args:
      learning_rate: learning rate (a non-negative number or an optax
        schedule).
      rho: decay of the averages, in [0, 1).
      momentum: momentum in [0, 1); 0 keeps no momentum buffer.
      epsilon: added inside the square root, >= 0.
      centered: divide by the running standard deviation instead of the RMS.
      weight_decay: decoupled weight decay, >= 0, or None.
      clipnorm: per-variable L2 norm limit, or None.
      clipvalue: elementwise limit, or None.
      global_clipnorm: global L2 norm limit, or None.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      `rmsprop_jax.RMSpropState`. Pass the params to ``update`` when
      ``weight_decay`` is set.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> tx = presets.keras(learning_rate=0.01, weight_decay=0.5, clipvalue=1.0)
      >>> params = jnp.array([2.0])
      >>> updates, state = tx.update(jnp.array([4.0]), tx.init(params), params)
      >>> # g is clipped to 1, v = 0.1, then the step and the decay 0.01 * 0.5 * x:
      >>> bool(jnp.allclose(updates, -0.01 * 1.0 / jnp.sqrt(0.1 + 1e-7) - 0.01 * 0.5 * 2.0))
      True

    References:
      ``keras/src/optimizers/rmsprop.py`` (``update_step``) and
      ``keras/src/optimizers/base_optimizer.py`` (``apply``,
      ``_clip_gradients``, ``_clip_by_norm``, ``clip_by_global_norm``,
      ``_apply_weight_decay``) in keras-team/keras.
    """
    _check_learning_rate("learning_rate", learning_rate)
    _check_unit("rho", rho)
    _check_unit("momentum", momentum)
    _check_non_negative("epsilon", epsilon)
    _check_bool("centered", centered)
    if weight_decay is not None:
        _check_non_negative("weight_decay", weight_decay)
    clipping = _keras_clipping(clipnorm, clipvalue, global_clipnorm)
    core = rmsprop(
        learning_rate,
        decay=rho,
        eps=epsilon,
        eps_in_sqrt=True,
        initial_scale=0.0,
        centered=centered,
        centered_average="weighted",
        momentum=_momentum_or_none(momentum),
        lr_in_momentum=True,
        weight_decay=0.0 if weight_decay is None else weight_decay,
        decoupled_weight_decay=True,
        decay_params_first=True,
    )
    return core if clipping is None else _with_preprocessing(clipping, core)


# --------------------------------------------------------------------------- #
# TensorFlow: optimizer_v2 (tf.keras <= 2.10, tf_keras legacy) and TF1
# --------------------------------------------------------------------------- #


def tf_keras_legacy(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    rho: chex.Numeric = 0.9,
    momentum: chex.Numeric = 0.0,
    epsilon: chex.Numeric = 1e-7,
    centered: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""The optimizer_v2 ``RMSprop`` of tf.keras (TF <= 2.10).

    Available today as ``tf_keras.optimizers.legacy.RMSprop`` from the
    ``tf-keras`` package (in TF >= 2.16 ``tf.keras.optimizers.legacy`` is
    only a stub). Its averages start at 0, and **where epsilon goes depends on
    the momentum**:

    - ``momentum > 0`` (or a tensor): the fused TF kernel
      (``ResourceApplyRMSProp`` / ``ResourceApplyCenteredRMSProp``), as in
      `tf1` but starting from 0: :math:`b \leftarrow \mu b + \eta_t
      g/\sqrt{\tilde v + \epsilon}`, :math:`x \leftarrow x - b`, with
      :math:`\tilde v = v` or :math:`v - m^2` when centered (epsilon
      **inside** the root, learning rate inside the buffer);
    - ``momentum == 0``: Python code computing
      :math:`x \leftarrow x - \eta_t g / (\sqrt{\tilde v} + \epsilon)`
      (epsilon **outside** the root).

    A falsy ``epsilon`` (0) is replaced by the fuzz factor 1e-7, as tf.keras
    does. The legacy ``decay`` keyword (inverse-time decay of the learning
    rate) is not an argument here: pass
    ``optax.inverse_time_decay``-style schedules as ``learning_rate``.

    Mapping: ``rmsprop(learning_rate, decay=rho, eps=epsilon,
    eps_in_sqrt=momentum > 0, centered=centered, momentum=momentum or None,
    lr_in_momentum=True)``.

    Args:
      learning_rate: learning rate (a non-negative number or an optax
        schedule).
      rho: decay of the averages, in [0, 1).
      momentum: momentum in [0, 1); it also selects where epsilon goes. A
        traced (non-concrete) momentum counts as non-zero, as a tensor does
        in tf.keras: with ``optax.inject_hyperparams``, pass
        ``static_args=("momentum", "epsilon")`` to keep a momentum of 0 on
        the epsilon-outside path.
      epsilon: >= 0; 0 is replaced by 1e-7.
      centered: divide by the running standard deviation instead of the RMS.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      `rmsprop_jax.RMSpropState`.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> g = jnp.array([0.3])
      >>> plain = presets.tf_keras_legacy(learning_rate=0.1, epsilon=0.5)
      >>> heavy = presets.tf_keras_legacy(learning_rate=0.1, epsilon=0.5, momentum=0.5)
      >>> u_plain, _ = plain.update(g, plain.init(g))
      >>> u_heavy, _ = heavy.update(g, heavy.init(g))
      >>> v = 0.1 * 0.3**2
      >>> bool(jnp.allclose(u_plain, -0.1 * 0.3 / (jnp.sqrt(v) + 0.5)))  # eps outside
      True
      >>> bool(jnp.allclose(u_heavy, -0.1 * 0.3 / jnp.sqrt(v + 0.5)))  # eps inside
      True

    References:
      ``tf_keras/src/optimizers/legacy/rmsprop.py`` (``_resource_apply_dense``)
      in keras-team/tf-keras, formerly
      ``tensorflow/python/keras/optimizer_v2/rmsprop.py``; the kernels in
      ``tensorflow/core/kernels/training_ops.cc``; tensorflow/tensorflow
      issue #41115.
    """
    _check_learning_rate("learning_rate", learning_rate)
    _check_unit("rho", rho)
    _check_unit("momentum", momentum)
    _check_non_negative("epsilon", epsilon)
    _check_bool("centered", centered)
    if _checks.concrete_float(epsilon) == 0.0:
        epsilon = _TF_KERAS_DEFAULT_EPSILON
    heavy_ball = _checks.concrete_float(momentum) != 0.0
    return rmsprop(
        learning_rate,
        decay=_tf_decay(rho),
        eps=epsilon,
        eps_in_sqrt=heavy_ball,
        initial_scale=0.0,
        centered=centered,
        momentum=momentum if heavy_ball else None,
        lr_in_momentum=True,
    )


def _tf_kernel_rule(
    learning_rate: optax.ScalarOrSchedule,
    decay: chex.Numeric,
    momentum: chex.Numeric,
    epsilon: chex.Numeric,
    centered: bool,
    *,
    initial_scale: float,
) -> optax.GradientTransformationExtraArgs:
    """The rule of TF's RMSProp kernels, shared by TF1 and Sonnet: eps inside the root, lr inside momentum."""
    _check_learning_rate("learning_rate", learning_rate)
    _check_unit("decay", decay)
    _check_unit("momentum", momentum)
    _check_non_negative("epsilon", epsilon)
    _check_bool("centered", centered)
    return rmsprop(
        learning_rate,
        decay=_tf_decay(decay),
        eps=epsilon,
        eps_in_sqrt=True,
        initial_scale=initial_scale,
        centered=centered,
        momentum=_momentum_or_none(momentum),
        lr_in_momentum=True,
    )


def tf1(
    learning_rate: optax.ScalarOrSchedule,
    decay: chex.Numeric = 0.9,
    momentum: chex.Numeric = 0.0,
    epsilon: chex.Numeric = 1e-10,
    centered: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""``tf.compat.v1.train.RMSPropOptimizer`` (TF1; Dopamine's TF agents).

    What the TF kernels compute (``ApplyRMSProp`` / ``ApplyCenteredRMSProp``):
    :math:`v \leftarrow v + (1-\rho)(g^2 - v)` with :math:`v_0 = 1` (the
    ``rms`` slot starts at **ones**); centered:
    :math:`m \leftarrow m + (1-\rho)(g - m)` and
    :math:`\tilde v = v - m^2`, else :math:`\tilde v = v`;
    :math:`b \leftarrow \mu b + \eta g/\sqrt{\tilde v + \epsilon}` (epsilon
    **inside** the root, learning rate inside the buffer) and
    :math:`x \leftarrow x - b`. The momentum slot exists even when
    :math:`\mu = 0`, where it holds the last step.

    Mapping: ``rmsprop(learning_rate, decay=decay, eps=epsilon,
    eps_in_sqrt=True, initial_scale=1.0, centered=centered,
    momentum=momentum or None, lr_in_momentum=True)``. The TF1 optimizer has
    no step counter of its own: a schedule here corresponds to a learning
    rate computed from a ``global_step`` that ``minimize`` increments after
    the update (e.g. ``tf.compat.v1.train.exponential_decay``).

    TF1 squares complex gradients as :math:`g \cdot g` (not :math:`|g|^2`);
    this preset does not reproduce that and averages :math:`|g|^2`.

    Args:
      learning_rate: learning rate (a non-negative number or an optax
        schedule); required, as in TF1.
      decay: decay of the averages, in [0, 1).
      momentum: momentum in [0, 1).
      epsilon: added inside the square root, >= 0.
      centered: divide by the running standard deviation instead of the RMS.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      `rmsprop_jax.RMSpropState` (``nu`` starts at ones).

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> tx = presets.tf1(learning_rate=0.01)
      >>> g = jnp.array([0.5])
      >>> updates, state = tx.update(g, tx.init(g))
      >>> # v = 1 + 0.1 (g^2 - 1): the ones start keeps the first steps small.
      >>> bool(jnp.allclose(updates, -0.01 * 0.5 / jnp.sqrt(0.9 + 0.1 * 0.25 + 1e-10)))
      True

    References:
      ``tensorflow/python/training/rmsprop.py`` (``RMSPropOptimizer``) and
      ``tensorflow/core/kernels/training_ops.cc`` (``ApplyRMSProp``,
      ``ApplyCenteredRMSProp``) in tensorflow/tensorflow; tensorflow/tensorflow
      issue #40670 (the ones initialisation).
    """
    return _tf_kernel_rule(learning_rate, decay, momentum, epsilon, centered, initial_scale=1.0)


# --------------------------------------------------------------------------- #
# timm and Sonnet
# --------------------------------------------------------------------------- #


def timm_tf(
    lr: optax.ScalarOrSchedule = 1e-2,
    alpha: chex.Numeric = 0.9,
    eps: chex.Numeric = 1e-10,
    weight_decay: chex.Numeric = 0.0,
    momentum: chex.Numeric = 0.0,
    centered: bool = False,
    decoupled_decay: bool = False,
    lr_in_momentum: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""timm's ``RMSpropTF`` (EfficientNet-family training recipes).

    TF1's rule on PyTorch: :math:`v_0 = 1`, the lerp-form average
    :math:`v \leftarrow v + (1-\alpha)(g^2 - v)`, epsilon **inside** the root;
    centered: :math:`m \leftarrow m + (1-\alpha)(g - m)` and
    :math:`D = \sqrt{v - m^2 + \epsilon}`. Weight decay is coupled
    (:math:`g \leftarrow g + \lambda x`) or, with ``decoupled_decay``,
    :math:`x \leftarrow x (1 - \eta_t \lambda)` before the step. With momentum
    :math:`\mu > 0`: ``lr_in_momentum`` (default, TF style)
    :math:`b \leftarrow \mu b + \eta_t g/D`, :math:`x \leftarrow x - b`;
    otherwise (PyTorch style) :math:`b \leftarrow \mu b + g/D`,
    :math:`x \leftarrow x - \eta_t b`. Without momentum
    :math:`x \leftarrow x - \eta_t g/D`.

    Mapping: ``rmsprop(lr, decay=alpha, eps=eps, eps_in_sqrt=True,
    initial_scale=1.0, centered=centered, momentum=momentum or None,
    lr_in_momentum=lr_in_momentum, weight_decay=weight_decay,
    decoupled_weight_decay=decoupled_decay, decay_params_first="multiply"
    if decoupled_decay else False)`` (timm decays the params in place before
    the step). timm's ``caution`` and
    ``corrected_weight_decay`` options are not covered.

    Args:
      lr: learning rate (a non-negative number or an optax schedule).
      alpha: decay of the averages, in [0, 1).
      eps: added inside the square root, >= 0.
      weight_decay: weight decay coefficient, >= 0.
      momentum: momentum in [0, 1); 0 keeps no momentum buffer.
      centered: divide by the running standard deviation instead of the RMS.
      decoupled_decay: decay the params directly by :math:`\eta_t \lambda x`
        instead of adding :math:`\lambda x` to the gradient.
      lr_in_momentum: apply the learning rate inside the momentum buffer.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      `rmsprop_jax.RMSpropState` (``nu`` starts at ones).

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> tx = presets.timm_tf(lr=0.016, weight_decay=1e-5, momentum=0.9, eps=1e-3)
      >>> params = jnp.array([1.0])
      >>> updates, state = tx.update(jnp.array([0.2]), tx.init(params), params)
      >>> g = 0.2 + 1e-5 * 1.0
      >>> bool(jnp.allclose(updates, -0.016 * g / jnp.sqrt(0.9 + 0.1 * g**2 + 1e-3)))
      True

    References:
      ``timm/optim/rmsprop_tf.py`` (``RMSpropTF``, ``_single_tensor_rmsprop_tf``)
      in huggingface/pytorch-image-models.
    """
    _check_learning_rate("lr", lr)
    _check_unit("alpha", alpha)
    _check_non_negative("eps", eps)
    _check_non_negative("weight_decay", weight_decay)
    _check_unit("momentum", momentum)
    _check_bool("centered", centered)
    _check_bool("decoupled_decay", decoupled_decay)
    _check_bool("lr_in_momentum", lr_in_momentum)
    return rmsprop(
        lr,
        decay=alpha,
        eps=eps,
        eps_in_sqrt=True,
        initial_scale=1.0,
        centered=centered,
        momentum=_momentum_or_none(momentum),
        lr_in_momentum=lr_in_momentum,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_decay,
        decay_params_first="multiply" if decoupled_decay else False,
    )


def sonnet(
    learning_rate: optax.ScalarOrSchedule,
    decay: chex.Numeric = 0.9,
    momentum: chex.Numeric = 0.0,
    epsilon: chex.Numeric = 1e-10,
    centered: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Sonnet 2's ``snt.optimizers.RMSProp``.

    Sonnet computes :math:`v \leftarrow \rho v + (1-\rho) g^2` from
    :math:`v_0 = 0` (**unlike** TF1's ones), centered
    :math:`m \leftarrow \rho m + (1-\rho) g`, then
    :math:`b \leftarrow \mu b + \eta g / \sqrt{\tilde v + \epsilon}` with
    :math:`\tilde v = v` or :math:`v - m^2`, and :math:`x \leftarrow x - b`
    (epsilon inside the root, learning rate inside the buffer).

    Mapping: ``rmsprop(learning_rate, decay=decay, eps=epsilon,
    eps_in_sqrt=True, initial_scale=0.0, centered=centered,
    momentum=momentum or None, lr_in_momentum=True)``. Sonnet reads its
    hyperparameters at every ``apply`` (they may be ``tf.Variable``\ s); a
    schedule here plays the part of a learning-rate variable assigned
    ``schedule(t)`` before step :math:`t`.

    Args:
      learning_rate: learning rate (a non-negative number or an optax
        schedule); required, as in Sonnet.
      decay: decay of the averages, in [0, 1).
      momentum: momentum in [0, 1).
      epsilon: added inside the square root, >= 0.
      centered: divide by the running standard deviation instead of the RMS.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      `rmsprop_jax.RMSpropState`.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> tx = presets.sonnet(learning_rate=0.1, momentum=0.9)
      >>> g = jnp.array([2.0])
      >>> updates, state = tx.update(g, tx.init(g))
      >>> bool(jnp.allclose(updates, -0.1 * 2.0 / jnp.sqrt(0.1 * 4.0 + 1e-10)))
      True

    References:
      ``sonnet/src/optimizers/rmsprop.py`` (``RMSProp``, ``rmsprop_update``)
      in google-deepmind/sonnet.
    """
    return _tf_kernel_rule(learning_rate, decay, momentum, epsilon, centered, initial_scale=0.0)


# --------------------------------------------------------------------------- #
# Published rules: Graves (2013) and the Nature DQN code
# --------------------------------------------------------------------------- #


def graves(
    learning_rate: optax.ScalarOrSchedule = 1e-4,
    decay: chex.Numeric = 0.95,
    momentum: chex.Numeric = 0.9,
    eps: chex.Numeric = 1e-4,
) -> optax.GradientTransformationExtraArgs:
    r"""The centered RMSprop of Graves (2013), eqs. (38)-(41).

    With :math:`\varepsilon` the loss gradient,

    .. math::

      n \leftarrow \aleph n + (1-\aleph)\varepsilon^2, \quad
      g \leftarrow \aleph g + (1-\aleph)\varepsilon, \quad
      \Delta \leftarrow \beth \Delta
        - \gimel \frac{\varepsilon}{\sqrt{n - g^2 + k}}, \quad
      w \leftarrow w + \Delta

    with :math:`\aleph` = ``decay`` = 0.95, :math:`\beth` = ``momentum`` =
    0.9, :math:`\gimel` = ``learning_rate`` = 1e-4 and :math:`k` = ``eps`` =
    1e-4; the averages start at zero.

    Mapping: ``rmsprop(learning_rate, decay=decay, eps=eps, eps_in_sqrt=True,
    centered=True, momentum=momentum or None, lr_in_momentum=True)``. No
    runnable reference implementation exists, so this preset is checked
    against a float64 transcription of the equations above
    ("rule-checked, not run").

    Args:
      learning_rate: :math:`\gimel` (a non-negative number or an optax
        schedule).
      decay: :math:`\aleph`, in [0, 1).
      momentum: :math:`\beth`, in [0, 1).
      eps: :math:`k`, added inside the square root, >= 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      `rmsprop_jax.RMSpropState`.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> tx = presets.graves()
      >>> g = jnp.array([0.1])
      >>> updates, state = tx.update(g, tx.init(g))
      >>> n, m = 0.05 * 0.1**2, 0.05 * 0.1
      >>> bool(jnp.allclose(updates, -1e-4 * 0.1 / jnp.sqrt(n - m**2 + 1e-4)))
      True

    References:
      A. Graves, *Generating Sequences With Recurrent Neural Networks*,
      arXiv:1308.0850 (2013), section 4, eqs. (38)-(41).
    """
    _check_learning_rate("learning_rate", learning_rate)
    _check_unit("decay", decay)
    _check_unit("momentum", momentum)
    _check_non_negative("eps", eps)
    return rmsprop(
        learning_rate,
        decay=decay,
        eps=eps,
        eps_in_sqrt=True,
        initial_scale=0.0,
        centered=True,
        momentum=_momentum_or_none(momentum),
        lr_in_momentum=True,
    )


def dqn_nature(
    learning_rate: optax.ScalarOrSchedule = 2.5e-4,
    decay: chex.Numeric = 0.95,
    eps: chex.Numeric = 0.01,
) -> optax.GradientTransformationExtraArgs:
    r"""The RMSprop of the Nature DQN code (Mnih et al., 2015; Lua Torch7).

    The code keeps :math:`d = -\partial L/\partial w` (the ascent direction)
    and computes :math:`m \leftarrow 0.95 m + 0.05 d`,
    :math:`v \leftarrow 0.95 v + 0.05 d^2`,
    :math:`w \leftarrow w + \eta d/\sqrt{v - m^2 + 0.01}`, from zero
    averages and without momentum: centered RMSprop with epsilon (the paper's
    "min squared gradient") **inside** the root. The code anneals
    :math:`\eta` linearly between ``lr`` and ``lr_end`` (equal by default);
    pass an optax schedule to reproduce that.

    This is not Dopamine's TF DQN optimizer, which is
    ``tf1(0.00025, decay=0.95, epsilon=1e-5, centered=True)`` (ones start,
    smaller epsilon).

    Mapping: ``rmsprop(learning_rate, decay=decay, eps=eps, eps_in_sqrt=True,
    centered=True)``, fed the usual loss gradient. The Lua code cannot run
    here, so this preset is checked against a float64 transcription of it
    ("rule-checked, not run").

    Args:
      learning_rate: :math:`\eta` (a non-negative number or an optax
        schedule).
      decay: decay of both averages (0.95 in the code), in [0, 1).
      eps: added inside the square root (0.01 in the code), >= 0.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      `rmsprop_jax.RMSpropState`.

    Example:
      >>> import jax.numpy as jnp
      >>> from rmsprop_jax import presets
      >>> tx = presets.dqn_nature()
      >>> g = jnp.array([1.0])
      >>> updates, state = tx.update(g, tx.init(g))
      >>> bool(jnp.allclose(updates, -2.5e-4 * 1.0 / jnp.sqrt(0.05 - 0.05**2 + 0.01)))
      True

    References:
      ``dqn/NeuralQLearner.lua`` (``nql:qLearnMinibatch``) and ``run_gpu`` of
      the DQN 3.0 Lua code released with Mnih et al., *Human-level control
      through deep reinforcement learning*, Nature 518 (2015).
    """
    _check_learning_rate("learning_rate", learning_rate)
    _check_unit("decay", decay)
    _check_non_negative("eps", eps)
    return rmsprop(
        learning_rate,
        decay=decay,
        eps=eps,
        eps_in_sqrt=True,
        initial_scale=0.0,
        centered=True,
    )
