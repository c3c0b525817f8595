"""A float64 NumPy model of the RMSprop update rule that rmsprop_jax specifies.

It is written from the specification of the update rule, one numbered step at a
time, and shares no code with the package. Real leaves are computed in float64,
complex leaves in complex128; JAX is only used to flatten and rebuild pytrees
and to call learning-rate schedules with an int32 count, as an optimizer would.

With g the incoming gradient, x the params, t the 1-based step and η_t the
learning rate at count t - 1 (a schedule is called with t - 1):

1. coupled weight decay: g ← g + wd·x
2. v ← decay·v + (1 − decay)·|g|², v starting at ``initial_scale``
3. centered: m ← decay·m + (1 − decay)·g, variance = max(v̂ − |m̂|², 0)
4. bias correction: v̂ = v / (1 − decay^t), m̂ = m / (1 − decay^t); the stored
   state stays uncorrected
5. denominator √v̂ + eps, or √(v̂ + eps) with ``eps_in_sqrt``
6. s = g / denominator
7. momentum μ: with ``lr_in_momentum`` b ← μ·b + η_t·s and update −b
   (Nesterov −(μ·b + η_t·s)); otherwise b ← μ·b + s and update −η_t·b
   (Nesterov −η_t·(μ·b + s)); without momentum update −η_t·s
8. decoupled weight decay: update ← update − η_t·wd·x, outside the momentum

For complex leaves |g|² = re(conj(g)·g) and v is real. With ``split_complex``
the real and imaginary parts are independent reals, each with its own averages
(PyTorch's rule); the state then packs the two averages of v as the real and
imaginary parts of one complex number.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Hyper:
    """The hyperparameters of one RMSprop configuration (the package's argument names)."""

    learning_rate: float | Callable[[int], Any] = 1e-2
    decay: float = 0.9
    eps: float = 1e-8
    eps_in_sqrt: bool = False
    initial_scale: float = 0.0
    centered: bool = False
    momentum: float | None = None
    nesterov: bool = False
    lr_in_momentum: bool = True
    bias_correction: bool = False
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    weight_decay_mask: Any = None
    split_complex: bool = False

    def rmsprop_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``rmsprop_jax.rmsprop``."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def scale_by_rms_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``rmsprop_jax.scale_by_rms`` (the options it has)."""
        names = ("decay", "eps", "eps_in_sqrt", "initial_scale", "centered", "bias_correction", "split_complex")
        return {name: getattr(self, name) for name in names}

    def learning_rate_at(self, count: int) -> float:
        """η for the step taken when the stored count is `count` (0-based).

        A schedule is called with the count as an int32 scalar, the dtype of
        the optimizer's step counter.
        """
        lr = self.learning_rate
        return float(lr(jnp.asarray(count, jnp.int32))) if callable(lr) else float(lr)


def to64(x: Any) -> np.ndarray:
    """`x` as a float64 array, or complex128 when it is complex."""
    a = np.asarray(x)
    return a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)


def _abs2(z: np.ndarray) -> np.ndarray:
    return np.real(np.conj(z) * z)


def _divide(g: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """g / denominator, with 0 / 0 taken as 0 (possible only when eps is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        s = g / denominator
    return np.where(g == 0, np.zeros_like(s), s)


def _rms_leaf(g, nu, mu, t: int, h: Hyper):
    """Steps 2-6 for one leaf whose elements each have one average (real, or complex not split)."""
    nu = h.decay * nu + (1 - h.decay) * _abs2(g)
    if h.centered:
        mu = h.decay * mu + (1 - h.decay) * g
    correction = 1 - h.decay**t if h.bias_correction else 1.0
    v_hat = nu / correction
    if h.centered:
        m_hat = mu / correction
        v_hat = np.maximum(v_hat - _abs2(m_hat), 0.0)
    denominator = np.sqrt(v_hat + h.eps) if h.eps_in_sqrt else np.sqrt(v_hat) + h.eps
    return _divide(g, denominator), nu, mu


def _split(leaf_g: np.ndarray, h: Hyper) -> bool:
    return h.split_complex and np.iscomplexobj(leaf_g)


def _rms_step(g, nu, mu, t: int, h: Hyper):
    """Steps 2-6 for one leaf; split complex leaves hold (real part, imaginary part) pairs."""
    if not _split(g, h):
        return _rms_leaf(g, nu, mu, t, h)
    s_re, nu_re, mu_re = _rms_leaf(g.real, nu[0], None if mu is None else mu[0], t, h)
    s_im, nu_im, mu_im = _rms_leaf(g.imag, nu[1], None if mu is None else mu[1], t, h)
    return s_re + 1j * s_im, (nu_re, nu_im), None if mu is None else (mu_re, mu_im)


def _init_moments(x: np.ndarray, h: Hyper):
    shape = np.shape(x)
    if _split(x, h):
        nu = (np.full(shape, h.initial_scale, np.float64), np.full(shape, h.initial_scale, np.float64))
        mu = (np.zeros(shape), np.zeros(shape)) if h.centered else None
        return nu, mu
    nu = np.full(shape, h.initial_scale, np.float64)
    mu = np.zeros(shape, x.dtype) if h.centered else None
    return nu, mu


def _packed(moment):
    """A moment as the package stores it: a split pair becomes one complex array."""
    if isinstance(moment, tuple):
        return moment[0] + 1j * moment[1]
    return moment


class ScaleByRmsReference:
    """Steps 2-6 only: what ``scale_by_rms`` returns (no learning rate, no sign flip)."""

    def __init__(self, params: Any, hyper: Hyper, count: int = 0):
        leaves, self.treedef = jax.tree.flatten(params)
        leaves = [to64(x) for x in leaves]
        self.hyper = hyper
        self.count = count
        moments = [_init_moments(x, hyper) for x in leaves]
        self._nu = [nu for nu, _ in moments]
        self._mu = [mu for _, mu in moments]

    @property
    def nu(self) -> Any:
        return jax.tree.unflatten(self.treedef, [_packed(nu) for nu in self._nu])

    @property
    def mu(self) -> Any:
        if not self.hyper.centered:
            return None
        return jax.tree.unflatten(self.treedef, [_packed(mu) for mu in self._mu])

    def _advance(self, hyper: Hyper | None) -> tuple[Hyper, int, int]:
        """Switches to `hyper` (if given) and returns it, the previous count and t."""
        if hyper is not None:
            self.hyper = hyper
        previous = self.count
        self.count = min(self.count + 1, INT32_MAX)
        return self.hyper, previous, self.count

    def _scale(self, g_leaves: list[np.ndarray], t: int, h: Hyper) -> list[np.ndarray]:
        out = []
        for i, g in enumerate(g_leaves):
            s, self._nu[i], self._mu[i] = _rms_step(g, self._nu[i], self._mu[i], t, h)
            out.append(s)
        return out

    def _flatten(self, tree: Any) -> list[np.ndarray]:
        leaves, treedef = jax.tree.flatten(tree)
        assert treedef == self.treedef, (treedef, self.treedef)
        return [to64(x) for x in leaves]

    def update(self, grads: Any, hyper: Hyper | None = None) -> Any:
        h, _, t = self._advance(hyper)
        return jax.tree.unflatten(self.treedef, self._scale(self._flatten(grads), t, h))


class RmspropReference(ScaleByRmsReference):
    """The full optimizer: steps 1-8. ``update`` returns what is added to the params."""

    def __init__(self, params: Any, hyper: Hyper, count: int = 0):
        super().__init__(params, hyper, count)
        leaves = jax.tree.leaves(params)
        self._b = [np.zeros(np.shape(x), to64(x).dtype) for x in leaves] if hyper.momentum is not None else None

    @property
    def momentum(self) -> Any:
        return None if self._b is None else jax.tree.unflatten(self.treedef, self._b)

    def _decay_mask(self, params: Any, h: Hyper) -> list[bool]:
        mask = h.weight_decay_mask
        if mask is None:
            return [True] * self.treedef.num_leaves
        if callable(mask):
            mask = mask(params)
        leaves, treedef = jax.tree.flatten(mask)
        assert treedef == self.treedef, (treedef, self.treedef)
        return [bool(leaf) for leaf in leaves]

    def update(self, grads: Any, params: Any = None, hyper: Hyper | None = None) -> Any:
        h, previous, t = self._advance(hyper)
        eta = h.learning_rate_at(previous)
        g_leaves = self._flatten(grads)
        n = len(g_leaves)
        if h.weight_decay > 0:
            x_leaves = self._flatten(params)
            decays = self._decay_mask(params, h)
        else:
            x_leaves, decays = [None] * n, [False] * n
        coupled = h.weight_decay > 0 and not h.decoupled_weight_decay
        decoupled = h.weight_decay > 0 and h.decoupled_weight_decay

        g_leaves = [
            g + h.weight_decay * x if coupled and d else g for g, x, d in zip(g_leaves, x_leaves, decays, strict=True)
        ]
        s_leaves = self._scale(g_leaves, t, h)
        out = []
        for i, (s, x, d) in enumerate(zip(s_leaves, x_leaves, decays, strict=True)):
            if h.momentum is None:
                update = -eta * s
            else:
                mu = h.momentum
                step = eta * s if h.lr_in_momentum else s
                self._b[i] = mu * self._b[i] + step
                direction = mu * self._b[i] + step if h.nesterov else self._b[i]
                update = -direction if h.lr_in_momentum else -eta * direction
            if decoupled and d:
                update = update - eta * h.weight_decay * x
            out.append(update)
        return jax.tree.unflatten(self.treedef, out)


def apply(params: Any, updates: Any) -> Any:
    """params + updates in float64 (complex128 for complex leaves)."""
    return jax.tree.map(lambda x, u: to64(x) + u, params, updates)


def rmsprop_trajectory(hyper: Hyper, params: Any, grads: Sequence[Any]) -> tuple[list[Any], Any, RmspropReference]:
    """Runs the reference over a fixed sequence of gradient trees.

    Returns the update of every step, the final params and the reference
    (whose ``nu``, ``mu``, ``momentum`` and ``count`` are the final state).
    """
    ref = RmspropReference(params, hyper)
    x = jax.tree.map(to64, params)
    updates = []
    for g in grads:
        u = ref.update(g, x)
        updates.append(u)
        x = apply(x, u)
    return updates, x, ref


def assert_tree_close(got: Any, want: Any, rtol: float, *, scale_floor: float = 0.0, what: str = "") -> None:
    """Leafwise comparison at relative tolerance `rtol`.

    Each leaf must have the same tree position and shape, and every element
    must be within ``rtol * |want| + rtol * max(max |want|, scale_floor)`` of
    `want`: relative error, measured against the leaf's own magnitude for the
    elements that happen to be near zero (cancellation makes an elementwise
    relative error meaningless there).
    """
    got_leaves, got_def = jax.tree.flatten(got)
    want_leaves, want_def = jax.tree.flatten(want)
    assert got_def == want_def, f"{what}: tree structures differ:\n  got:  {got_def}\n  want: {want_def}"
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        g, w = to64(g), to64(w)
        assert g.shape == w.shape, f"{what} leaf {i}: shape {g.shape} != {w.shape}"
        scale = max(float(np.max(np.abs(w), initial=0.0)), scale_floor)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale, err_msg=f"{what} leaf {i}")
