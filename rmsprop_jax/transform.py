"""The RMS scaling block: squared-gradient averages and the per-element rescale.

Everything that `scale_by_rms` and the `rmsprop` alias share lives here: the
state dtypes, the creation of the moment buffers and the per-leaf arithmetic.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from rmsprop_jax import _checks, _placement, _random, formats
from rmsprop_jax._guard import skip_if_nonfinite
from rmsprop_jax.flat import flat_transform


class ScaleByRmsState(NamedTuple):
    """State of `scale_by_rms`.

    Attributes:
      count: int32 number of updates applied, saturating at the int32 maximum.
      nu: running average of squared gradients, shaped like the params and
        stored without bias correction. Real valued, also for complex params
        (it averages ``|g|^2``); with ``split_complex=True`` it is complex,
        holding the average of re(g)^2 in its real part and of im(g)^2 in its
        imaginary part. With ``state_bits`` leaves of at least 4,096 elements
        are `rmsprop_jax.lowmem.QuantizedArray`, with ``factored=True`` large
        matrices are `rmsprop_jax.lowmem.FactoredArray`, and with
        ``flat=True`` the state is one vector per dtype (see
        `rmsprop_jax.flat.FlatLayout`).
      mu: running average of gradients when ``centered=True``, else None.
      skipped: int32 number of steps skipped for non-finite values when
        ``skip_nonfinite=True``, else None.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    nu: optax.Updates
    mu: optax.Updates | None
    skipped: jax.Array | None = None


def compute_dtype(*dtypes: Any) -> jnp.dtype:
    """At least float32, and wide enough for every dtype given (complex stays complex)."""
    return jnp.result_type(jnp.float32, *dtypes)


def _real(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.finfo(dtype).dtype


def _initial_nu_value(initial_scale: Any, fmt: formats.Format) -> Any:
    """A split complex nu starts at initial_scale in both components."""
    if isinstance(fmt, formats.Dense) and jnp.issubdtype(fmt.dtype, jnp.complexfloating):
        return initial_scale * (1 + 1j)
    return initial_scale


def init_moments(
    params: optax.Params,
    initial_scale: Any,
    centered: bool,
    storage: formats.Storage,
    momentum: bool = False,
) -> tuple[optax.Updates, optax.Updates | None, optax.Updates | None]:
    """Builds ``nu`` (filled with `initial_scale`) and zero ``mu`` / momentum buffers when used."""
    leaves, treedef = jax.tree.flatten(params)
    fmts = storage.leaf_formats(leaves, treedef)
    nu = [nu_fmt.init(p, _initial_nu_value(initial_scale, nu_fmt)) for p, (nu_fmt, _) in zip(leaves, fmts, strict=True)]

    def zeros() -> optax.Updates:
        return jax.tree.unflatten(treedef, [f.init(p, 0) for p, (_, f) in zip(leaves, fmts, strict=True)])

    return jax.tree.unflatten(treedef, nu), zeros() if centered else None, zeros() if momentum else None


def moment_shardings(
    leaves: list[Any],
    shardings: list[Any],
    treedef: jax.tree_util.PyTreeDef,
    centered: bool,
    storage: formats.Storage,
    momentum: bool = False,
) -> tuple[Any, Any, Any]:
    """The shardings of (nu, mu, momentum) for params `leaves` placed as `shardings` (`init_moments`' layout)."""
    fmts = storage.leaf_formats(leaves, treedef)
    nu = [f.shardings(p.shape, s) for p, s, (f, _) in zip(leaves, shardings, fmts, strict=True)]

    def like_params() -> Any:
        return jax.tree.unflatten(treedef, list(shardings))

    return jax.tree.unflatten(treedef, nu), like_params() if centered else None, like_params() if momentum else None


def flatten_like_state(
    updates: optax.Updates, nu: optax.Updates, mu: optax.Updates | None
) -> tuple[jax.tree_util.PyTreeDef, list[jax.Array], list[Any], list[Any]]:
    """Flattens the incoming updates and the moments, checking that they line up."""
    g, treedef = jax.tree.flatten(updates)
    nu_leaves, nu_treedef = jax.tree.flatten(nu, is_leaf=formats.is_stored_node)  # a stored node is one leaf
    _checks.check_same_structure(nu_treedef, treedef, "optimizer state (nu)", "updates")
    _checks.check_inexact(g, "gradients")
    mu_leaves = [None] * len(g) if mu is None else jax.tree.leaves(mu)
    return treedef, g, nu_leaves, mu_leaves


def flatten_params(params: optax.Params | None, treedef: jax.tree_util.PyTreeDef, why: str) -> list[jax.Array]:
    """The leaves of `params`, which must be given and match the updates."""
    if params is None:
        raise ValueError(f"{why} needs the params: call update(updates, state, params).")
    leaves, params_treedef = jax.tree.flatten(params)
    _checks.check_same_structure(treedef, params_treedef, "updates", "params")
    return leaves


def lerp(start: jax.Array, end: jax.Array, weight: Any) -> jax.Array:
    """``start + weight * (end - start)``, exact at both ends (PyTorch's ``lerp``).

    For weights of at least 1/2 the form ``end - (end - start) * (1 - weight)``
    is used, so weight 1 gives `end` exactly (``m + 1 * (g - m)`` is not `g` in
    floating point) while weight 0 gives `start`; with a traced weight the
    branch is chosen per call.
    """
    weight = jnp.asarray(weight, _real(start.dtype))
    low = start + weight * (end - start)
    high = end - (end - start) * (1 - weight)
    value = _checks.concrete_float(weight)
    if value is not None:
        return low if value < 0.5 else high
    return jnp.where(weight < 0.5, low, high)


def abs_squared(x: jax.Array) -> jax.Array:
    """|x|^2 elementwise: x * x, or one real magnitude per element for complex x."""
    return (jnp.conj(x) * x).real if jnp.iscomplexobj(x) else x * x


def rms_scale_leaf(
    g: jax.Array,
    nu: Any,
    mu: jax.Array | None,
    count: jax.Array,
    decay: Any,
    eps: Any,
    *,
    leaf: int,
    storage: formats.Storage,
    eps_in_sqrt: bool,
    centered: bool,
    bias_correction: bool,
    guard_zero: bool,
    numerator: Any = None,
    centered_average: str = "lerp",
    twin: bool = False,
) -> tuple[Any, Any, jax.Array | None]:
    """One leaf of the RMS step, in at least float32.

    Args:
      g: the incoming update (already cast to the compute dtype).
      nu, mu: this leaf's moments as stored. A complex ``nu`` means the real
        and imaginary parts are treated as independent reals.
      count: the 1-based step number t (used for bias correction and the
        random bits of stochastic rounding).
      leaf: the leaf's index (for the random bits).
      storage: the state formats.
      guard_zero: define 0/0 as 0, needed when eps may be zero.
      centered_average: "lerp" or "weighted", see `rmsprop_jax.rmsprop`.
      twin: return ``(s, s_twin)`` in place of ``s``, where ``s_twin`` has the
        same value bit for bit but is computed by separate operations from
        the new state. A step that needs ``s`` in two fused loops (Nesterov:
        the momentum buffer and the params) can then recompute it in each
        instead of XLA writing it out as a parameter-sized temporary: XLA
        does not duplicate a square root or a division into two consumers,
        and common-subexpression elimination would merge identical ones.
      numerator: None, or a scalar c: return ``(c * g) / denominator`` instead
        of ``g / denominator``. Folding a learning rate into the numerator
        makes the division the last operation, so that no compiler can fuse
        the product into a later ``params + updates`` (an FMA there rounds
        once instead of twice, and whether XLA forms it depends on the whole
        program: sharded and unsharded steps would differ in the last bit).

    Returns:
      ``(s, nu_new, mu_new)``: ``s`` in the compute dtype and the new moments
      in their storage formats.
    """
    kwargs = dict(
        leaf=leaf,
        storage=storage,
        eps_in_sqrt=eps_in_sqrt,
        centered=centered,
        bias_correction=bias_correction,
        guard_zero=guard_zero,
        numerator=numerator,
        centered_average=centered_average,
    )
    if not formats.is_stored_node(nu) and jnp.iscomplexobj(nu):
        if twin:
            raise ValueError("twin is not available for complex state.")
        # Split complex: run the real rule on (re, im) pairs and pack back.
        s, nu_pairs, mu_pairs = rms_scale_leaf(
            _as_pairs(g), _as_pairs(nu), None if mu is None else _as_pairs(mu), count, decay, eps, **kwargs
        )
        return _from_pairs(s), _from_pairs(nu_pairs).astype(nu.dtype), _from_pairs_or_none(mu_pairs, mu)
    nu_fmt, signed_fmt = storage.stored_formats(nu, mu)
    real = _real(g.dtype)
    # For a Python number the complement 1 - decay is taken exactly and then
    # rounded (as optax, PyTorch and Keras 3 do): float32(1 - 0.999) is 0.001,
    # while 1 - float32(0.999) is 1.3e-5 away from it. An array decay is used
    # as given, so its complement is computed in its own dtype (as TF1 does).
    # Kept as given too: a Python weight lets `lerp` pick its branch while tracing.
    weight = 1 - decay
    complement = jnp.asarray(weight, real)
    decay = jnp.asarray(decay, real)
    eps = jnp.asarray(eps, real)
    # |g|^2 (real for complex g), as a function of g so that a format can slice g first.
    squared = formats.Elementwise(abs_squared, (g,))
    v_new, nu_out = nu_fmt.average(nu, squared, decay, complement, _random.step_key(count, leaf, _random.NU))
    v_new, nu_out = formats.for_update(nu_fmt, v_new, nu_out, count, real)
    v_hat = v_new
    # Multiplying by the reciprocal, rather than dividing, is written out because
    # XLA makes that rewrite in some programs and not others (e.g. sharded vs
    # single-device); spelling it out keeps every program bitwise identical.
    correction = 1 / (1 - decay ** count.astype(real)) if bias_correction else None
    if correction is not None:
        v_hat = v_new * correction
    mu_out = None
    if centered:
        assert mu is not None and signed_fmt is not None
        # The interpolation form (PyTorch's lerp, TF's kernels) keeps the average of a
        # constant gradient exactly constant, and is exact at decay 0.
        mu_old = signed_fmt.load(mu, g.dtype)
        # "weighted" (Keras 3) rounds the same average as decay * m + (1 - decay) * g.
        mu_new = decay * mu_old + complement * g if centered_average == "weighted" else lerp(mu_old, g, weight)
        mu_out = signed_fmt.store(mu_new, mu, _random.step_key(count, leaf, _random.MU))
        mu_new, mu_out = formats.for_update(signed_fmt, mu_new, mu_out, count, g.dtype)
        m_hat = mu_new if correction is None else mu_new * correction
        m_squared = abs_squared(m_hat)
        # Rounding can make v - m^2 slightly negative (constant gradients do it
        # in float32 within ~1000 steps); the clamp keeps sqrt away from NaN.
        v_hat = jnp.maximum(v_hat - m_squared, 0)
    # With eps in the root, XLA would rewrite x / sqrt(y) as x * rsqrt(y), and a product can
    # fuse with a later ``params + updates`` into one FMA in some programs and not others;
    # the max (an identity here, NaN included) keeps the division.
    scaled = g if numerator is None else jnp.asarray(numerator, real) * g

    def rescale(v: jax.Array) -> jax.Array:
        denominator = jnp.maximum(jnp.sqrt(v + eps), 0) if eps_in_sqrt else jnp.sqrt(v) + eps
        out = scaled / denominator
        return jnp.where(g == 0, jnp.zeros_like(out), out) if guard_zero else out

    s = rescale(v_hat)
    if twin:
        # |v| is v for every v >= 0 (v_hat is never negative), but another operation.
        return (s, rescale(jnp.abs(v_hat))), nu_out, mu_out
    return s, nu_out, mu_out


def _as_pairs(x: jax.Array) -> jax.Array:
    return jnp.stack([x.real, x.imag], axis=-1)


def _from_pairs(x: jax.Array) -> jax.Array:
    return jax.lax.complex(x[..., 0], x[..., 1])


def _from_pairs_or_none(pairs: jax.Array | None, like: jax.Array | None) -> jax.Array | None:
    if pairs is None or like is None:
        return None
    return _from_pairs(pairs).astype(like.dtype)


def needs_zero_guard(eps: Any) -> bool:
    """Whether 0/0 can occur: eps traced, zero, or too small to survive float32."""
    value = _checks.concrete_float(eps)
    return value is None or value < _checks.FLOAT32_TINY


def check_layout(factored: Any, row_blocks: Any, *, centered: bool, flat: bool) -> None:
    """Rejects the per-leaf layout options (factored nu, row blocks) with options they do not combine with."""
    if centered and factored:
        raise ValueError(
            "centered=True does not combine with factored=True: the factored estimate of E[g^2] is a rank-1 fit "
            "that can fall below m^2, and the clamped variance would then give steps of lr/eps. Use one of them."
        )
    if flat and factored:
        raise ValueError(
            "factored=True needs the state per leaf (it factors matrices); flat=True stores 1-D vectors: use one."
        )
    if flat and row_blocks is not None:
        raise ValueError(
            "row_blocks chooses the block layout per leaf; flat=True stores 1-D vectors, whose blocks are runs of "
            "consecutive elements: drop one of them."
        )


def check_rms_args(decay: Any, eps: Any, initial_scale: Any, nu_dtype: Any) -> jnp.dtype | None:
    """Validates the arguments shared by `scale_by_rms` and `rmsprop`."""
    _checks.check_interval("decay", decay, 0.0, 1.0, high_open=True)
    _checks.check_interval("eps", eps, 0.0)
    _checks.check_interval("initial_scale", initial_scale, 0.0)
    return _checks.resolve_state_dtype(nu_dtype)


def scale_by_rms(
    decay: chex.Numeric = 0.9,
    eps: chex.Numeric = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    initial_scale: chex.Numeric = 0.0,
    centered: bool = False,
    bias_correction: bool = False,
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
) -> optax.GradientTransformation:
    r"""Rescales updates by the root of a running average of their squares.

    With :math:`g` the incoming update and :math:`t` the 1-based step,

    .. math::

      v_t = \gamma v_{t-1} + (1 - \gamma) |g_t|^2, \qquad
      s_t = \frac{g_t}{\sqrt{\hat v_t} + \epsilon}

    where :math:`v_0` is ``initial_scale``, :math:`\hat v_t = v_t` or, with
    ``bias_correction``, :math:`v_t / (1 - \gamma^t)`. With
    ``eps_in_sqrt=True`` the denominator is :math:`\sqrt{\hat v_t + \epsilon}`.
    With ``centered=True`` a running mean :math:`m_t` of :math:`g` is kept
    too and :math:`\hat v_t` is replaced by
    :math:`\max(\hat v_t - |\hat m_t|^2, 0)` (Graves, 2013).

    This block only rescales: it applies no learning rate and no sign flip,
    so it chains with any optax transform. For a complete optimizer use
    :func:`rmsprop_jax.rmsprop`.

    Args:
      decay: decay rate :math:`\gamma` of the averages, in [0, 1).
      eps: :math:`\epsilon` >= 0, added to the denominator.
      eps_in_sqrt: put eps inside the square root (optax/Keras/TF1) instead of
        outside it (the default, as in Hinton's lecture and PyTorch).
      initial_scale: starting value of ``nu`` (TF1 uses 1.0), >= 0.
      centered: divide by an estimate of the standard deviation instead of
        the root mean square.
      bias_correction: divide the averages by :math:`1 - \gamma^t` (the stored
        state stays uncorrected).
      nu_dtype: dtype of the state. None keeps the params' precision, except
        that bfloat16/float16 params get float32 state. For a smaller state
        prefer bfloat16: float16's range ends near 6e-8, so small squared
        gradients underflow and the steps grow.
      split_complex: treat the real and imaginary parts of complex params as
        independent reals, each with its own average (PyTorch's rule), instead
        of sharing one average of :math:`|g|^2` per element.
      skip_nonfinite: skip any step whose gradients, updates or new ``nu``
        hold a NaN or inf: the updates are zero, the state stays as it was and
        ``state.skipped`` counts the skipped steps.
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
      row_blocks: True, or a mask of the leaves (a pytree of bools, or a
        function of the params returning one) whose quantized ``nu`` keeps
        its blocks within rows, ``block_size`` consecutive elements along
        the last axis: for embedding tables (see :mod:`rmsprop_jax.lowmem`).
        Needs ``state_bits``; not with ``flat``.
      factored: store ``nu`` of leaves whose two largest axes both have at
        least ``factored_min_dim`` elements as Adafactor's running row and
        column means (:class:`rmsprop_jax.formats.FactoredArray`, n + m
        floats for an n × m leaf), estimating
        :math:`\hat v_{ij} = R_i C_j / \mathrm{mean}(R)`; other leaves keep
        their ``nu`` format (with ``state_bits``, quantized when large).
        Not with ``centered`` (the rank-1 estimate can fall below
        :math:`m^2`, which would give steps of lr/ε) nor ``flat``.
      factored_min_dim: see ``factored`` (default 128).
      flat: keep the state as one contiguous vector per dtype instead of one array per leaf,
        so that a step over many small leaves runs O(1) kernels for the state;
        same results. Read ``nu`` per leaf with
        ``rmsprop_jax.flat.FlatLayout(params).unravel(state.nu)``.

    Returns:
      An ``optax.GradientTransformation`` whose state is a `ScaleByRmsState`.

    Example:
      >>> import jax.numpy as jnp, optax, rmsprop_jax
      >>> tx = optax.chain(rmsprop_jax.scale_by_rms(), optax.scale(-0.1))
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([0.5, -4.0])}, state)
      >>> updates["w"].round(4)  # first step: -0.1 * g / sqrt(0.1 * g**2) = -0.1 * sign(g) / sqrt(0.1)
      Array([-0.3162,  0.3162], dtype=float32)

    References:
      Hinton, Srivastava and Swersky, *Neural Networks for Machine Learning*,
      lecture 6e (2012); Graves, *Generating Sequences With Recurrent Neural
      Networks*, arXiv:1308.0850 (2013), eqs. (38)-(41).
    """
    check_layout(factored, row_blocks, centered=centered, flat=flat)
    if flat:  # the same transform on per-dtype vectors (rmsprop_jax.flat)
        options = dict(locals())
        del options["flat"]
        return flat_transform(lambda _: scale_by_rms(**options))
    state_dtype = check_rms_args(decay, eps, initial_scale, nu_dtype)
    storage = formats.make_storage(
        state_dtype, split_complex, state_bits, block_size, stochastic_rounding, factored, factored_min_dim, row_blocks
    )
    guard_zero = needs_zero_guard(eps)

    def build(params: optax.Params) -> ScaleByRmsState:
        nu, mu, _ = init_moments(params, initial_scale, centered, storage)
        skipped = jnp.zeros([], jnp.int32) if skip_nonfinite else None
        return ScaleByRmsState(count=jnp.zeros([], jnp.int32), nu=nu, mu=mu, skipped=skipped)

    def shardings_for(
        treedef: jax.tree_util.PyTreeDef, leaves: list[Any], shardings: list[Any], scalar: Any
    ) -> ScaleByRmsState:
        nu, mu, _ = moment_shardings(leaves, shardings, treedef, centered, storage)
        return ScaleByRmsState(count=scalar, nu=nu, mu=mu, skipped=scalar if skip_nonfinite else None)

    def init_fn(params: optax.Params) -> ScaleByRmsState:
        # The state lands where its parameters are, whether init is called eagerly, under
        # jax.jit or jax.eval_shape, with arrays or ShapeDtypeStructs (see _placement.initialize).
        _checks.check_inexact(jax.tree.leaves(params), "params")
        return _placement.initialize(build, shardings_for, params)

    @_placement.on_auto_axes
    def update_fn(
        updates: optax.Updates, state: ScaleByRmsState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByRmsState]:
        del params
        treedef, g_leaves, nu_leaves, mu_leaves = flatten_like_state(updates, state.nu, state.mu)
        count = optax.safe_increment(state.count)
        out, nu_out, mu_out = [], [], []
        for i, (g, nu, mu) in enumerate(zip(g_leaves, nu_leaves, mu_leaves, strict=True)):
            cdtype = compute_dtype(g.dtype, formats.value_dtype(nu))
            s, nu_new, mu_new = rms_scale_leaf(
                g.astype(cdtype),
                nu,
                mu,
                count,
                decay,
                eps,
                leaf=i,
                storage=storage,
                eps_in_sqrt=eps_in_sqrt,
                centered=centered,
                bias_correction=bias_correction,
                guard_zero=guard_zero,
            )
            out.append(s.astype(g.dtype))
            nu_out.append(nu_new)
            mu_out.append(mu_new)
        new_mu = jax.tree.unflatten(treedef, mu_out) if centered else None
        new_updates = jax.tree.unflatten(treedef, out)
        new_state = ScaleByRmsState(
            count=count, nu=jax.tree.unflatten(treedef, nu_out), mu=new_mu, skipped=state.skipped
        )
        if skip_nonfinite:
            return skip_if_nonfinite(g_leaves, new_updates, new_state, state)
        return new_updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)
