"""Side-by-side runs of `rmsprop_jax.presets` against the frameworks they reproduce.

Each configuration ("case") feeds one sequence of float32 gradients to the real
framework's optimizer and to the preset, from the same float32 parameters, and
measures the largest deviation of the final parameters relative to the
parameter scale::

    max over parameter tensors of  max|x_preset - x_peer| / max|x_peer|

Graves (2013) and the Nature DQN code cannot run here; their presets are
compared with a float64 transcription of the published rule instead, and are
labelled "rule-checked, not run".

Run ``python -m rmsprop_jax.parity`` to print the parity table in Markdown, and
``python -m rmsprop_jax.parity --output docs/parity.md`` to regenerate the
file. The peers are optional: a framework that is not installed is reported
as such. The test suite imports the same functions (`cases`, `run_case`,
`model_parity`, `checkpoint_round_trip`), so the table and the tests measure
the same thing.

The peers are imported only when a comparison runs; importing this module
imports neither torch nor TensorFlow. Keras 3 is imported with its TensorFlow
backend; ``KERAS_BACKEND`` is set only for that import and then restored.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import itertools
import os
import platform
import sys
import time
import types
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmsprop_jax import _compat, interop, presets

#: Largest accepted deviation, relative to the parameter scale.
TOLERANCE = 1e-6
#: Steps per comparison.
STEPS = 200
#: Learning rate of every case (the peak of the schedule in scheduled cases).
LEARNING_RATE = 1e-2
#: The environment variable that turns a missing peer into a test failure.
REQUIRE_PEERS_ENV = "RMSPROP_JAX_REQUIRE_PEERS"

# Shapes of the parameter tensors of the synthetic problems: a vector and a
# matrix, so that per-tensor and global operations (clipping) are both seen.
_SHAPES: tuple[tuple[int, ...], ...] = ((1536,), (32, 16))


class PeerUnavailable(RuntimeError):
    """A reference framework cannot be imported here."""


# --------------------------------------------------------------------------- #
# Frameworks and cases
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Framework:
    """A framework whose RMSprop a preset reproduces.

    Attributes:
      key: the preset's name in `rmsprop_jax.presets`.
      title: the peer's name in the parity table.
      lr_name: the preset's learning-rate argument.
      tuned: the hyperparameters varied between cases of the same structure
        (the decay and epsilon); they are passed to the preset as traced
        arrays, so one compiled program serves all their values.
      peer: the peer library (see `load_peer`), or None when only the
        published rule can be checked.
    """

    key: str
    title: str
    lr_name: str
    tuned: tuple[str, str]
    peer: str | None

    @property
    def preset(self) -> Callable[..., optax.GradientTransformationExtraArgs]:
        preset: Callable[..., optax.GradientTransformationExtraArgs] = getattr(presets, self.key)
        return preset

    @property
    def run_or_rule(self) -> str:
        return "run" if self.peer else "rule-checked, not run"


FRAMEWORKS: dict[str, Framework] = {
    f.key: f
    for f in (
        Framework("pytorch", "PyTorch `torch.optim.RMSprop`", "lr", ("alpha", "eps"), "torch"),
        Framework("keras", "Keras 3 `keras.optimizers.RMSprop`", "learning_rate", ("rho", "epsilon"), "keras"),
        Framework(
            "tf_keras_legacy",
            "tf.keras optimizer_v2 `tf_keras.optimizers.legacy.RMSprop`",
            "learning_rate",
            ("rho", "epsilon"),
            "tf_keras",
        ),
        Framework(
            "tf1", "TF1 `tf.compat.v1.train.RMSPropOptimizer`", "learning_rate", ("decay", "epsilon"), "tensorflow"
        ),
        Framework("timm_tf", "timm `RMSpropTF`", "lr", ("alpha", "eps"), "timm"),
        Framework("sonnet", "Sonnet 2 `snt.optimizers.RMSProp`", "learning_rate", ("decay", "epsilon"), "sonnet"),
        Framework("graves", "Graves (2013), eqs. (38)-(41)", "learning_rate", ("decay", "eps"), None),
        Framework("dqn_nature", "Nature DQN (Lua `NeuralQLearner.lua`)", "learning_rate", ("decay", "eps"), None),
    )
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of one framework.

    Attributes:
      framework: a key of `FRAMEWORKS`.
      options: the preset's keyword arguments other than the learning rate,
        with the framework's own names and values.
      scheduled: use a warmup-cosine learning-rate schedule instead of a
        constant learning rate.
      complex_params: use complex64 parameters and gradients.
    """

    framework: str
    options: tuple[tuple[str, Any], ...]
    scheduled: bool = False
    complex_params: bool = False

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def spec(self) -> Framework:
        return FRAMEWORKS[self.framework]

    @property
    def name(self) -> str:
        parts = [self.framework, "complex" if self.complex_params else "", "sched" if self.scheduled else "const"]
        parts += [f"{k}={v}" for k, v in self.options]
        return "-".join(p for p in parts if p)

    def __str__(self) -> str:
        return self.name


#: Frameworks that round ``1 - decay`` once from the decay as given (a Python
#: float); their presets get the decay as a concrete number (one compiled
#: program per decay), since the core computes the complement of a traced decay
#: in float32, as the TF family does.
_EXACT_COMPLEMENT = ("pytorch", "keras", "timm_tf")


def _product(
    framework: str, axes: Mapping[str, Sequence[Any]], pairs: Sequence[tuple[Any, Any]], **fixed: Any
) -> list[Case]:
    """Cases for every combination of `axes` (a ``schedule`` axis included) and (decay, eps) pairs."""
    tuned = FRAMEWORKS[framework].tuned
    names = list(axes)
    out = []
    for values in itertools.product(*(axes[n] for n in names)):
        chosen = dict(zip(names, values, strict=True))
        # A combined axis expands into several options.
        for key in [k for k, v in chosen.items() if isinstance(v, dict)]:
            chosen.update(chosen.pop(key))
        scheduled = bool(chosen.pop("schedule", False))
        complex_params = bool(chosen.pop("complex", False))
        for decay, eps in pairs:
            options = {**fixed, **chosen, tuned[0]: decay, tuned[1]: eps}
            out.append(Case(framework, tuple(options.items()), scheduled, complex_params))
    return out


_BOOLS = (False, True)
_MOMENTA = (0.0, 0.9)
_WEIGHT_DECAY = 0.05


def _grid() -> dict[str, list[Case]]:
    lr_axis = {"schedule": _BOOLS}
    torch_pairs = [(0.99, 1e-8), (0.9, 1e-3), (0.999, 1e-6)]
    keras_pairs = [(0.9, 1e-7), (0.95, 1e-3), (0.99, 1e-5)]
    tf_pairs = [(0.9, 1e-10), (0.95, 1e-3), (0.99, 1e-6)]
    timm_pairs = [(0.9, 1e-10), (0.99, 1e-3), (0.95, 1e-6)]
    grid: dict[str, list[Case]] = {}
    grid["pytorch"] = (
        _product(
            "pytorch",
            {"centered": _BOOLS, "momentum": _MOMENTA, "weight_decay": (0.0, _WEIGHT_DECAY), **lr_axis},
            torch_pairs,
        )
        + _product(
            "pytorch",
            {"mode": ({"weight_decay": _WEIGHT_DECAY, "momentum": 0.9}, {"centered": True}), "schedule": (True,)},
            torch_pairs[:1],
            maximize=True,
        )
        + _product(
            "pytorch",
            {
                "complex": (True,),
                "centered": _BOOLS,
                "momentum": _MOMENTA,
                "mode": ({"weight_decay": _WEIGHT_DECAY, "schedule": False}, {"weight_decay": 0.0, "schedule": True}),
            },
            torch_pairs[:1],
        )
    )
    grid["keras"] = _product(
        "keras",
        {"centered": _BOOLS, "momentum": _MOMENTA, "weight_decay": (None, _WEIGHT_DECAY), **lr_axis},
        keras_pairs,
    ) + _product(
        "keras",
        {
            "clip": ({"clipnorm": 1.0}, {"clipvalue": 0.5}, {"global_clipnorm": 5.0}),
            "weight_decay": (None, _WEIGHT_DECAY),
            "schedule": (True,),
        },
        keras_pairs[:1],
        # Not centered: clipvalue makes large gradients constant, and v - m^2 of a
        # constant is pure rounding noise in any implementation.
        centered=False,
        momentum=0.9,
    )
    for key in ("tf_keras_legacy", "tf1", "sonnet"):
        grid[key] = _product(key, {"centered": _BOOLS, "momentum": _MOMENTA, **lr_axis}, tf_pairs)
    grid["timm_tf"] = _product(
        "timm_tf",
        {
            "centered": _BOOLS,
            "momentum_mode": (
                {"momentum": 0.0},
                {"momentum": 0.9, "lr_in_momentum": True},
                {"momentum": 0.9, "lr_in_momentum": False},
            ),
            "decay_mode": (
                {"weight_decay": 0.0},
                {"weight_decay": _WEIGHT_DECAY, "decoupled_decay": False},
                {"weight_decay": _WEIGHT_DECAY, "decoupled_decay": True},
            ),
            **lr_axis,
        },
        timm_pairs,
    )
    grid["graves"] = [
        c
        for momentum, pairs in ((0.9, [(0.95, 1e-4), (0.9, 1e-3)]), (0.0, [(0.99, 1e-6)]))
        for c in _product("graves", {"momentum": (momentum,), **lr_axis}, pairs)
    ]
    grid["dqn_nature"] = _product("dqn_nature", lr_axis, [(0.95, 0.01), (0.9, 1e-3), (0.99, 1e-5)])
    return grid


def cases(framework: str | None = None) -> list[Case]:
    """The parity grid: every case, or those of one framework."""
    grid = _grid()
    if framework is not None:
        if framework not in grid:
            raise KeyError(f"Unknown framework {framework!r}; expected one of {sorted(grid)}.")
        return grid[framework]
    return [c for group in grid.values() for c in group]


def describe_grid(framework: str) -> str:
    """A one-line description of the configurations covered for a framework."""
    return _GRID_DESCRIPTIONS[framework]


_GRID_DESCRIPTIONS = {
    "pytorch": "centered x momentum {0, 0.9} x weight_decay {0, 0.05} x lr {constant, schedule} x "
    "(alpha, eps) {(0.99, 1e-8), (0.9, 1e-3), (0.999, 1e-6)}; maximize; complex64 params "
    "(centered x momentum x {weight decay, schedule})",
    "keras": "centered x momentum {0, 0.9} x weight_decay {None, 0.05} x lr {constant, schedule} x "
    "(rho, epsilon) {(0.9, 1e-7), (0.95, 1e-3), (0.99, 1e-5)}; clipnorm, clipvalue, global_clipnorm x "
    "weight_decay {None, 0.05} (momentum 0.9, schedule)",
    "tf_keras_legacy": "centered x momentum {0, 0.9} x lr {constant, schedule} x "
    "(rho, epsilon) {(0.9, 1e-10), (0.95, 1e-3), (0.99, 1e-6)}",
    "tf1": "centered x momentum {0, 0.9} x lr {constant, schedule} x "
    "(decay, epsilon) {(0.9, 1e-10), (0.95, 1e-3), (0.99, 1e-6)}",
    "sonnet": "centered x momentum {0, 0.9} x lr {constant, schedule} x "
    "(decay, epsilon) {(0.9, 1e-10), (0.95, 1e-3), (0.99, 1e-6)}",
    "timm_tf": "centered x momentum {0, 0.9 lr inside, 0.9 lr outside} x weight decay {0, 0.05 coupled, "
    "0.05 decoupled} x lr {constant, schedule} x (alpha, eps) {(0.9, 1e-10), (0.99, 1e-3), (0.95, 1e-6)}",
    "graves": "lr {constant, schedule} x (decay, eps, momentum) {(0.95, 1e-4, 0.9), (0.9, 1e-3, 0.9), (0.99, 1e-6, 0)}",
    "dqn_nature": "lr {constant, schedule} x (decay, eps) {(0.95, 0.01), (0.9, 1e-3), (0.99, 1e-5)}",
}


# --------------------------------------------------------------------------- #
# Problems: the parameters and gradients fed to both sides
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Problem:
    """Initial parameters, per-step gradients and learning rates of one case.

    Attributes:
      x0: the initial parameter tensors.
      grads: one array per tensor, shaped ``(steps, *shape)``.
      lrs: the float32 learning rate of each step (constant or scheduled).
    """

    x0: tuple[np.ndarray, ...]
    grads: tuple[np.ndarray, ...]
    lrs: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.lrs)


def schedule_values(peak: float, steps: int) -> np.ndarray:
    """The float32 learning rates of the scheduled cases: warmup, then cosine decay."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.1 * peak,
        peak_value=peak,
        warmup_steps=max(steps // 10, 1),
        decay_steps=steps,
        end_value=0.05 * peak,
    )
    return np.asarray(jax.vmap(schedule)(jnp.arange(steps)), np.float32)


def make_problem(case: Case, steps: int = STEPS) -> Problem:
    """Random float32 (or complex64) parameters and gradients, seeded by the case's name.

    Gradient elements have scales from 1e-4 to 10 (so epsilon matters for
    some and not for others) and a non-zero mean (so the centered variants
    differ from the plain ones).
    """
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        if case.complex_params:
            return rng.normal(size=shape) + 1j * rng.normal(size=shape)
        return rng.normal(size=shape)

    dtype = np.complex64 if case.complex_params else np.float32
    x0: list[np.ndarray] = []
    grads: list[np.ndarray] = []
    for shape in _SHAPES:
        x0.append((0.5 * draw(shape)).astype(dtype))
        scale = np.exp(rng.uniform(np.log(1e-4), np.log(10.0), size=shape))
        bias = 0.5 * draw(shape)
        grads.append((scale * (draw((steps, *shape)) + bias)).astype(dtype))
    lrs = schedule_values(LEARNING_RATE, steps) if case.scheduled else np.full(steps, LEARNING_RATE, np.float32)
    return Problem(tuple(x0), tuple(grads), lrs)


def relative_deviation(ours: Sequence[Any], reference: Sequence[Any]) -> float:
    """Max over tensors of max|ours - reference| / max|reference|."""
    if len(ours) != len(reference):
        raise ValueError(f"{len(ours)} tensors against {len(reference)}.")
    worst = 0.0
    for a, b in zip(ours, reference, strict=True):
        a = np.asarray(a).astype(np.complex128)
        b = np.asarray(b).astype(np.complex128)
        if a.shape != b.shape:
            raise ValueError(f"Shapes differ: {a.shape} against {b.shape}.")
        scale = float(np.max(np.abs(b)))
        worst = max(worst, float(np.max(np.abs(a - b))) / (scale if scale > 0 else 1.0))
    return worst


# --------------------------------------------------------------------------- #
# Our side: the preset, compiled once per structure
# --------------------------------------------------------------------------- #


@functools.cache
def _compiled_preset_run(
    framework: str, static: tuple[tuple[str, Any], ...], scheduled: bool, constant_lr: float
) -> Callable[..., Any]:
    spec = FRAMEWORKS[framework]

    def run(tuned: dict[str, jax.Array], lrs: jax.Array, x0: list[jax.Array], grads: list[jax.Array]) -> Any:
        kwargs = {**dict(static), **tuned}
        kwargs[spec.lr_name] = (lambda count: lrs[count]) if scheduled else constant_lr
        tx = spec.preset(**kwargs)

        def body(carry: Any, g: Any) -> Any:
            x, state = carry
            updates, state = tx.update(g, state, x)
            return (optax.apply_updates(x, updates), state), None

        (x, _), _ = jax.lax.scan(body, (x0, tx.init(x0)), grads)
        return x

    return jax.jit(run)


def run_preset(case: Case, problem: Problem, steps: int | None = None) -> list[np.ndarray]:
    """Final parameters after feeding `problem` to the case's preset."""
    spec = case.spec
    traced = spec.tuned[1:] if case.framework in _EXACT_COMPLEMENT else spec.tuned
    static = tuple((k, v) for k, v in case.options if k not in traced)
    real = np.finfo(problem.x0[0].dtype).dtype
    tuned = {k: np.asarray(v, real) for k, v in case.options if k in traced}
    n = problem.steps if steps is None else steps
    fn = _compiled_preset_run(case.framework, static, case.scheduled, float(problem.lrs[0]))
    x = fn(
        tuned,
        jnp.asarray(problem.lrs),
        [jnp.asarray(x) for x in problem.x0],
        [jnp.asarray(g[:n]) for g in problem.grads],
    )
    return [np.asarray(leaf) for leaf in x]


# --------------------------------------------------------------------------- #
# Peers
# --------------------------------------------------------------------------- #


def _import(name: str, hint: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except Exception as error:  # an ImportError, or a broken install
        raise PeerUnavailable(f"{name} cannot be imported ({type(error).__name__}: {error}); {hint}") from error


_INSTALL_HINT = "install the peers with .ci/install-peers"


def _import_keras() -> types.ModuleType:
    """Keras 3 with the TensorFlow backend, without leaving KERAS_BACKEND set."""
    if "keras" not in sys.modules:
        _import("tensorflow", _INSTALL_HINT)
        previous = os.environ.get("KERAS_BACKEND")
        os.environ["KERAS_BACKEND"] = "tensorflow"
        try:
            keras = _import("keras", _INSTALL_HINT)
        finally:
            if previous is None:
                del os.environ["KERAS_BACKEND"]
            else:
                os.environ["KERAS_BACKEND"] = previous
    else:
        keras = sys.modules["keras"]
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise PeerUnavailable(
            f"keras was already imported with the {backend!r} backend; the Keras comparison runs with the "
            "TensorFlow backend (import rmsprop_jax.parity's Keras check before keras, or set KERAS_BACKEND)."
        )
    if not keras.__version__.startswith("3."):
        raise PeerUnavailable(f"keras {keras.__version__} is installed; the comparison is with Keras 3.")
    return keras


def _import_timm_rmsprop_tf() -> types.ModuleType:
    """timm's ``rmsprop_tf`` module, without executing ``timm/__init__.py``.

    ``import timm`` needs torchvision (not installable everywhere); the
    optimizer module only needs torch. The parent packages are replaced by
    empty modules whose ``__path__`` points at the installed folders while the
    module and its helpers load, and removed again afterwards.
    """
    _import("torch", _INSTALL_HINT)
    if "timm.optim.rmsprop_tf" in sys.modules:
        return sys.modules["timm.optim.rmsprop_tf"]
    if "timm" in sys.modules:  # a real timm is already loaded
        return _import("timm.optim.rmsprop_tf", _INSTALL_HINT)
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise PeerUnavailable(f"timm is not installed; {_INSTALL_HINT} (pip install --no-deps timm).")
    root = next(iter(spec.submodule_search_locations))
    stubs = {"timm": root, "timm.optim": os.path.join(root, "optim")}
    before = set(sys.modules)
    for name, path in stubs.items():
        stub = types.ModuleType(name)
        stub.__path__ = [path]
        sys.modules[name] = stub
    try:
        module = _import("timm.optim.rmsprop_tf", _INSTALL_HINT)
    finally:
        for name in set(sys.modules) - before:
            if name == "timm" or name.startswith("timm."):
                del sys.modules[name]
    return module


@functools.cache
def load_peer(name: str) -> types.ModuleType:
    """The peer library `name`, imported on first use.

    Raises:
      PeerUnavailable: when it cannot be imported.
    """
    if name == "torch":
        return _import("torch", _INSTALL_HINT)
    if name == "tensorflow":
        return _import("tensorflow", _INSTALL_HINT)
    if name == "keras":
        return _import_keras()
    if name == "tf_keras":
        _import("tensorflow", _INSTALL_HINT)
        return _import("tf_keras", _INSTALL_HINT)
    if name == "sonnet":
        _import("tensorflow", _INSTALL_HINT)
        return _import("sonnet", _INSTALL_HINT)
    if name == "timm":
        return _import_timm_rmsprop_tf()
    raise KeyError(f"Unknown peer {name!r}.")


def peer_version(name: str) -> str:
    """The installed version of a peer, as shown in the parity table."""
    if name == "keras":
        keras = load_peer("keras")
        return f"keras {keras.__version__} (TensorFlow {load_peer('tensorflow').__version__} backend)"
    if name == "tf_keras":
        return f"tf-keras {importlib.metadata.version('tf-keras')} (TensorFlow {load_peer('tensorflow').__version__})"
    if name == "sonnet":
        return f"dm-sonnet {importlib.metadata.version('dm-sonnet')} (TensorFlow {load_peer('tensorflow').__version__})"
    if name == "timm":
        return f"timm {importlib.metadata.version('timm')} (torch {load_peer('torch').__version__})"
    if name == "tensorflow":
        return f"tensorflow {load_peer('tensorflow').__version__}"
    if name == "torch":
        return f"torch {load_peer('torch').__version__}"
    raise KeyError(f"Unknown peer {name!r}.")


def _run_torch_like(make_optimizer: Callable[[list[Any]], Any], problem: Problem) -> list[np.ndarray]:
    """Steps a torch optimizer over the problem's gradients; lr is set per step."""
    torch = load_peer("torch")
    params = [torch.nn.Parameter(torch.tensor(x)) for x in problem.x0]
    optimizer = make_optimizer(params)
    grads = [torch.from_numpy(g) for g in problem.grads]
    for t in range(problem.steps):
        for group in optimizer.param_groups:
            group["lr"] = float(problem.lrs[t])
        for p, g in zip(params, grads, strict=True):
            p.grad = g[t].clone()
        optimizer.step()
    return [p.detach().numpy().copy() for p in params]


def _run_pytorch(case: Case, problem: Problem) -> list[np.ndarray]:
    torch = load_peer("torch")
    return _run_torch_like(lambda params: torch.optim.RMSprop(params, lr=LEARNING_RATE, **case.kwargs), problem)


def _run_timm(case: Case, problem: Problem) -> list[np.ndarray]:
    module = load_peer("timm")
    return _run_torch_like(lambda params: module.RMSpropTF(params, lr=LEARNING_RATE, **case.kwargs), problem)


def _tf_loop(problem: Problem, step: Callable[[Any, list[Any]], None]) -> None:
    """Runs ``step(i, grads_i)`` for every step: the first eagerly (it creates
    the optimizer's slots), the others in one traced ``tf.while_loop``."""
    tf = load_peer("tensorflow")
    grads = [tf.constant(g) for g in problem.grads]
    step(tf.constant(0), [g[0] for g in grads])

    @tf.function
    def rest() -> None:
        def body(i: Any) -> Any:
            step(i, [g[i] for g in grads])
            return (i + 1,)

        tf.while_loop(lambda i: i < problem.steps, body, (tf.constant(1),))

    if problem.steps > 1:
        rest()


def _lr_variable(problem: Problem, scheduled: bool) -> tuple[Any, Callable[[Any], None]]:
    """A learning rate for TF optimizers that read it at every step, and its per-step update."""
    tf = load_peer("tensorflow")
    if not scheduled:
        return LEARNING_RATE, lambda i: None
    table = tf.constant(problem.lrs)
    variable = tf.Variable(problem.lrs[0], dtype=tf.float32)
    return variable, lambda i: variable.assign(table[i])


def _keras_table_schedule(keras_module: Any, tf: Any, problem: Problem) -> Any:
    """A Keras ``LearningRateSchedule`` (of Keras 3 or tf-keras) returning ``problem.lrs[step]``."""
    table = tf.constant(problem.lrs)

    class Table(keras_module.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step: Any) -> Any:
            return tf.gather(table, tf.cast(step, tf.int32))

        def get_config(self) -> dict[str, Any]:
            return {}

    return Table()


def _run_keras(case: Case, problem: Problem) -> list[np.ndarray]:
    keras = load_peer("keras")
    tf = load_peer("tensorflow")
    lr = _keras_table_schedule(keras, tf, problem) if case.scheduled else LEARNING_RATE
    optimizer = keras.optimizers.RMSprop(learning_rate=lr, **case.kwargs)
    variables = [keras.Variable(x) for x in problem.x0]
    _tf_loop(problem, lambda i, g: optimizer.apply_gradients(zip(g, variables, strict=True)))
    return [v.value.numpy() for v in variables]


def _run_tf_keras_legacy(case: Case, problem: Problem) -> list[np.ndarray]:
    tf_keras = load_peer("tf_keras")
    tf = load_peer("tensorflow")
    lr = _keras_table_schedule(tf_keras, tf, problem) if case.scheduled else LEARNING_RATE
    optimizer = tf_keras.optimizers.legacy.RMSprop(learning_rate=lr, **case.kwargs)
    variables = [tf.Variable(x) for x in problem.x0]
    _tf_loop(problem, lambda i, g: optimizer.apply_gradients(zip(g, variables, strict=True)))
    return [v.numpy() for v in variables]


def _run_tf1(case: Case, problem: Problem) -> list[np.ndarray]:
    tf = load_peer("tensorflow")
    lr, set_lr = _lr_variable(problem, case.scheduled)
    optimizer = tf.compat.v1.train.RMSPropOptimizer(learning_rate=lr, **case.kwargs)
    variables = [tf.Variable(x) for x in problem.x0]

    def step(i: Any, g: list[Any]) -> None:
        set_lr(i)
        optimizer.apply_gradients(list(zip(g, variables, strict=True)))

    _tf_loop(problem, step)
    return [v.numpy() for v in variables]


def _run_sonnet(case: Case, problem: Problem) -> list[np.ndarray]:
    snt = load_peer("sonnet")
    tf = load_peer("tensorflow")
    lr, set_lr = _lr_variable(problem, case.scheduled)
    optimizer = snt.optimizers.RMSProp(learning_rate=lr, **case.kwargs)
    variables = [tf.Variable(x) for x in problem.x0]

    def step(i: Any, g: list[Any]) -> None:
        set_lr(i)
        optimizer.apply(g, variables)

    _tf_loop(problem, step)
    return [v.numpy() for v in variables]


def _run_graves_rule(case: Case, problem: Problem) -> list[np.ndarray]:
    """Graves (2013), eqs. (38)-(41), in float64, from zero averages."""
    o = case.kwargs
    aleph, beth, k = o["decay"], o["momentum"], o["eps"]
    out = []
    for x0, grads in zip(problem.x0, problem.grads, strict=True):
        w = x0.astype(np.float64)
        n = np.zeros_like(w)
        g = np.zeros_like(w)
        delta = np.zeros_like(w)
        for t in range(problem.steps):
            e = grads[t].astype(np.float64)
            n = aleph * n + (1 - aleph) * e**2
            g = aleph * g + (1 - aleph) * e
            delta = beth * delta - float(problem.lrs[t]) * e / np.sqrt(n - g**2 + k)
            w = w + delta
        out.append(w)
    return out


def _run_dqn_rule(case: Case, problem: Problem) -> list[np.ndarray]:
    """``nql:qLearnMinibatch`` of the Nature DQN code, in float64.

    The Lua code holds ``dw = -dL/dw`` (``network:backward`` with the TD
    errors as output gradients) and adds the update to the weights.
    """
    o = case.kwargs
    rho, eps = o["decay"], o["eps"]
    out = []
    for x0, grads in zip(problem.x0, problem.grads, strict=True):
        w = x0.astype(np.float64)
        g = np.zeros_like(w)
        g2 = np.zeros_like(w)
        for t in range(problem.steps):
            dw = -grads[t].astype(np.float64)
            g = rho * g + (1 - rho) * dw
            g2 = rho * g2 + (1 - rho) * dw * dw
            tmp = np.sqrt(g2 - g * g + eps)
            w = w + float(problem.lrs[t]) * dw / tmp
        out.append(w)
    return out


_RUNNERS: dict[str, Callable[[Case, Problem], list[np.ndarray]]] = {
    "pytorch": _run_pytorch,
    "keras": _run_keras,
    "tf_keras_legacy": _run_tf_keras_legacy,
    "tf1": _run_tf1,
    "timm_tf": _run_timm,
    "sonnet": _run_sonnet,
    "graves": _run_graves_rule,
    "dqn_nature": _run_dqn_rule,
}


def run_reference(case: Case, problem: Problem) -> list[np.ndarray]:
    """Final parameters from the real framework (or the float64 rule)."""
    return _RUNNERS[case.framework](case, problem)


def _as_float64(problem: Problem) -> Problem:
    return Problem(
        tuple(x.astype(np.float64) for x in problem.x0),
        tuple(g.astype(np.float64) for g in problem.grads),
        problem.lrs.astype(np.float64),
    )


def run_case(case: Case, steps: int = STEPS, precision: str = "float32") -> float:
    """The relative deviation of the preset from its reference on one case.

    Args:
      case: the configuration.
      steps: number of steps.
      precision: ``"float32"``, or ``"float64"`` to run the preset on float64
        params (with x64 enabled for the duration) against a float64
        reference; only the rule-checked frameworks have one.

    Raises:
      PeerUnavailable: when the case's peer cannot be imported.
    """
    if case.spec.peer is not None:
        load_peer(case.spec.peer)
    problem = make_problem(case, steps)
    if precision == "float32":
        return relative_deviation(run_preset(case, problem), run_reference(case, problem))
    if precision != "float64" or case.spec.peer is not None:
        raise ValueError(f"precision {precision!r} is not available for {case.framework}.")
    problem = _as_float64(problem)
    with _compat.enable_x64(True):
        ours = run_preset(case, problem)
    return relative_deviation(ours, run_reference(case, problem))


# --------------------------------------------------------------------------- #
# End to end: a small torch model, and checkpoints
# --------------------------------------------------------------------------- #

#: The end-to-end run: PyTorch's defaults plus momentum and coupled weight decay.
MODEL_OPTIONS: dict[str, Any] = {"alpha": 0.99, "eps": 1e-8, "weight_decay": 0.01, "momentum": 0.9, "centered": False}
#: The checkpoint round trip: every state buffer (centered, momentum).
CHECKPOINT_OPTIONS: dict[str, Any] = {
    "alpha": 0.95,
    "eps": 1e-6,
    "weight_decay": 0.01,
    "momentum": 0.9,
    "centered": True,
}
_MODEL_SIZES = (8, 32, 1)
_MODEL_LR = 1e-3
_MODEL_BATCH = 32


@dataclasses.dataclass(frozen=True)
class _ModelData:
    """Minibatches of a noisy regression task and initial tanh-MLP weights (torch layout).

    ``x[t], y[t]`` is the minibatch of step ``t`` (0-based), so a run that
    resumes from a checkpoint continues with the right batches.
    """

    x: np.ndarray
    y: np.ndarray
    weights: tuple[np.ndarray, ...]
    lrs: np.ndarray


def _model_data(steps: int) -> _ModelData:
    rng = np.random.default_rng(20130813)
    n_in, n_hidden, n_out = _MODEL_SIZES
    x = rng.normal(size=(steps, _MODEL_BATCH, n_in))
    y = np.sin(x @ rng.normal(size=(n_in, n_out))) + 0.3 * rng.normal(size=(steps, _MODEL_BATCH, n_out))
    weights = (
        rng.normal(scale=n_in**-0.5, size=(n_hidden, n_in)),
        rng.normal(scale=0.1, size=(n_hidden,)),
        rng.normal(scale=n_hidden**-0.5, size=(n_out, n_hidden)),
        rng.normal(scale=0.1, size=(n_out,)),
    )
    return _ModelData(
        x.astype(np.float32),
        y.astype(np.float32),
        tuple(w.astype(np.float32) for w in weights),
        schedule_values(_MODEL_LR, steps),
    )


class _TorchModel:
    """``nn.Sequential(Linear, Tanh, Linear)`` with float32 parameters, trained
    with ``torch.optim.RMSprop``. The loss is evaluated in float64
    (``torch.func.functional_call`` on float64 copies of the parameters), so
    the float32 gradients are the correctly rounded ones, as on the JAX side."""

    def __init__(self, weights: Sequence[np.ndarray], options: dict[str, Any]) -> None:
        torch = load_peer("torch")
        n_in, n_hidden, n_out = _MODEL_SIZES
        self.torch = torch
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_in, n_hidden), torch.nn.Tanh(), torch.nn.Linear(n_hidden, n_out)
        )
        with torch.no_grad():
            for p, w in zip(self.net.parameters(), weights, strict=True):
                p.copy_(torch.from_numpy(np.array(w)))
        self.optimizer = torch.optim.RMSprop(self.net.parameters(), lr=_MODEL_LR, **options)

    def train(self, data: _ModelData, start: int, stop: int) -> None:
        """Steps ``start .. stop - 1``, each with its minibatch and learning rate."""
        torch = self.torch
        for t in range(start, stop):
            for group in self.optimizer.param_groups:
                group["lr"] = float(data.lrs[t])
            self.optimizer.zero_grad()
            params = {name: p.double() for name, p in self.net.named_parameters()}
            prediction = torch.func.functional_call(self.net, params, (torch.from_numpy(data.x[t]).double(),))
            loss = torch.mean((prediction - torch.from_numpy(data.y[t]).double()) ** 2)
            loss.backward()
            self.optimizer.step()

    def weights(self) -> list[np.ndarray]:
        return [p.detach().numpy().copy() for p in self.net.parameters()]


def _jax_loss(params: list[jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    """The MLP's mean squared error, evaluated in float64 (needs x64 enabled)."""
    w1, b1, w2, b2 = (p.astype(jnp.float64) for p in params)
    hidden = jnp.tanh(x @ w1.T + b1)
    return jnp.mean((hidden @ w2.T + b2 - y) ** 2)


def _jax_train(
    params: Sequence[Any], state: Any, data: _ModelData, steps: int, options: dict[str, Any]
) -> tuple[list[np.ndarray], Any]:
    """Continues training with `presets.pytorch` from (params, state) for
    `steps` steps. The minibatch and the scheduled learning rate are picked by
    the state's count. Parameters, gradients and the optimizer are float32;
    only the loss is evaluated in float64."""
    with _compat.enable_x64(True):
        table = jnp.asarray(data.lrs)
        tx = presets.pytorch(lr=lambda count: table[count], **options)
        x64, y64 = jnp.asarray(data.x, jnp.float64), jnp.asarray(data.y, jnp.float64)

        @jax.jit
        def train(params: list[jax.Array], state: Any) -> Any:
            def body(carry: Any, _: Any) -> Any:
                p, s = carry
                grads = jax.grad(_jax_loss)(p, x64[s.count], y64[s.count])
                updates, s = tx.update(grads, s, p)
                return (optax.apply_updates(p, updates), s), None

            return jax.lax.scan(body, (params, state), None, length=steps)[0]

        new_params, new_state = train([jnp.asarray(p) for p in params], state)
        return [np.asarray(p) for p in new_params], new_state


def _init_state(params: Sequence[np.ndarray], options: dict[str, Any]) -> Any:
    return presets.pytorch(lr=_MODEL_LR, **options).init([jnp.asarray(p) for p in params])


def model_parity(steps: int = STEPS) -> dict[str, float]:
    """Trains the same MLP in torch and with `presets.pytorch`, each framework
    computing its own gradients on the same minibatches.

    Training amplifies tiny differences, so the result is read against the
    sensitivity of torch itself: the deviation between two torch runs whose
    initial weights differ by one float32 ulp (towards +inf and towards -inf;
    the larger).

    Returns:
      ``{"deviation": preset against torch, "ulp_sensitivity": torch against
      torch with 1-ulp-perturbed initial weights}``.
    """
    data = _model_data(steps)
    model = _TorchModel(data.weights, MODEL_OPTIONS)
    model.train(data, 0, steps)
    params, _ = _jax_train(data.weights, _init_state(data.weights, MODEL_OPTIONS), data, steps, MODEL_OPTIONS)
    sensitivity = 0.0
    for direction in (np.inf, -np.inf):
        nudged = [np.nextafter(w, np.float32(direction)) for w in data.weights]
        other = _TorchModel(nudged, MODEL_OPTIONS)
        other.train(data, 0, steps)
        sensitivity = max(sensitivity, relative_deviation(other.weights(), model.weights()))
    return {"deviation": relative_deviation(params, model.weights()), "ulp_sensitivity": sensitivity}


def checkpoint_round_trip(steps: int = 50) -> dict[str, float]:
    """Checkpoint conversion in both directions, on the MLP.

    ``torch -> jax``: `steps` steps in torch, `interop.from_torch`, then
    `steps` more in JAX, against `steps` more in torch. ``jax -> torch``:
    `steps` steps in JAX, `interop.to_torch` into a fresh torch optimizer,
    then `steps` more in torch, against `steps` more in JAX. Returns the
    relative deviation of each direction.
    """
    data = _model_data(2 * steps)
    options = CHECKPOINT_OPTIONS
    result = {}

    model = _TorchModel(data.weights, options)
    model.train(data, 0, steps)
    midway = model.weights()
    state = interop.from_torch(model.optimizer.state_dict(), [jnp.asarray(w) for w in midway])
    params, _ = _jax_train(midway, state, data, steps, options)
    model.train(data, steps, 2 * steps)
    result["torch -> jax"] = relative_deviation(params, model.weights())

    midway, state = _jax_train(data.weights, _init_state(data.weights, options), data, steps, options)
    resumed = _TorchModel(midway, options)
    resumed.optimizer.load_state_dict(interop.to_torch(state, lr=float(data.lrs[steps]), **options))
    resumed.train(data, steps, 2 * steps)
    params, _ = _jax_train(midway, state, data, steps, options)
    result["jax -> torch"] = relative_deviation(params, resumed.weights())
    return result


# --------------------------------------------------------------------------- #
# The table
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Row:
    """One line of the parity table."""

    framework: str
    version: str
    configurations: str
    deviation: str
    checked: str


def _format_deviation(value: float) -> str:
    return f"{value:.1e}"


def _framework_row(key: str, steps: int, log: Callable[[str], None]) -> Row:
    spec = FRAMEWORKS[key]
    group = cases(key)
    configurations = f"{len(group)}: {describe_grid(key)}"
    try:
        version = peer_version(spec.peer) if spec.peer else "float64 transcription of the published rule"
    except PeerUnavailable as error:
        log(f"{key}: skipped ({error})")
        return Row(spec.title, "not installed", configurations, "—", "not run")
    start = time.perf_counter()
    deviations = [run_case(case, steps) for case in group]
    text = _format_deviation(max(deviations))
    if spec.peer is None:
        exact = max(run_case(case, steps, precision="float64") for case in group)
        text = f"{_format_deviation(exact)} (float64 params); {text} (float32 params)"
    log(f"{key}: {len(group)} cases, {text}, {time.perf_counter() - start:.1f} s")
    return Row(spec.title, version, configurations, text, spec.run_or_rule)


def table_rows(
    steps: int = STEPS, frameworks: Sequence[str] | None = None, log: Callable[[str], None] = print
) -> list[Row]:
    """Runs the comparisons and returns the rows of the parity table."""
    keys = list(FRAMEWORKS) if frameworks is None else list(frameworks)
    rows = [_framework_row(key, steps, log) for key in keys]
    if "pytorch" in keys:
        try:
            version = peer_version("torch")
        except PeerUnavailable:
            return rows
        model = model_parity(steps)
        trip = checkpoint_round_trip(steps // 4)
        log(f"pytorch model: {model}; checkpoints: {trip}")
        options = ", ".join(f"{k}={v}" for k, v in MODEL_OPTIONS.items())
        rows.append(
            Row(
                "PyTorch, end to end (MLP, each framework's own gradients)",
                version,
                f"1: tanh MLP, minibatches, {options}, lr schedule, {steps} steps",
                f"{_format_deviation(model['deviation'])} (torch against itself with initial weights 1 ulp apart: "
                f"{_format_deviation(model['ulp_sensitivity'])})",
                "run",
            )
        )
        options = ", ".join(f"{k}={v}" for k, v in CHECKPOINT_OPTIONS.items())
        rows.append(
            Row(
                "PyTorch checkpoint round trip (`rmsprop_jax.interop`)",
                version,
                f"2: {steps // 4} steps, convert, {steps // 4} more, torch → JAX and JAX → torch; MLP, {options}",
                " / ".join(_format_deviation(v) for v in trip.values()),
                "run",
            )
        )
    return rows


def render_markdown(rows: Sequence[Row], steps: int = STEPS) -> str:
    """The parity table and its notes, as Markdown."""
    lines = [
        "<!-- Generated by `python -m rmsprop_jax.parity --output docs/parity.md`; do not edit by hand. -->",
        "",
        "| Framework | Version tested | Configurations covered | Max relative deviation | Checked by |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r.framework} | {r.version} | {r.configurations} | {r.deviation} | {r.checked} |" for r in rows]
    lines += [
        "",
        f"Each configuration feeds the same float32 gradient sequence ({steps} steps, two parameter tensors of "
        f"{sum(int(np.prod(s)) for s in _SHAPES)} elements in all, gradient scales from 1e-4 to 10) to the framework's "
        "own optimizer and to the preset in `rmsprop_jax.presets`, from the same float32 parameters. The deviation is "
        "max over tensors of max|x_preset - x_framework| / max|x_framework| after the last step; the target is "
        f"{TOLERANCE:g}. Scheduled configurations use a warmup-cosine schedule, given to the framework the way it "
        "takes one (an LR scheduler setting the group's `lr`, a `LearningRateSchedule`, or a learning-rate variable). "
        "“Rule-checked, not run” means that no runnable implementation exists here (Graves' paper, the Lua DQN "
        "code), and the preset is compared with a float64 transcription of the published update rule; the "
        "float32 figure shows float32 rounding alone.",
        "",
        "The end-to-end run trains a tanh MLP on minibatches, each framework computing its own gradients "
        "(the loss in float64, so that both get the correctly rounded float32 gradients); training amplifies "
        "rounding differences, so its figure is shown next to what a 1-ulp change of the initial weights does "
        "to torch itself.",
        "",
        f"Measured on {platform.machine()} CPU with jax {jax.__version__} and optax {optax.__version__}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m rmsprop_jax.parity [--output PATH]``."""
    parser = argparse.ArgumentParser(prog="python -m rmsprop_jax.parity", description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="write the Markdown table to this file (e.g. docs/parity.md)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps per comparison (default {STEPS})")
    parser.add_argument("--framework", action="append", choices=sorted(FRAMEWORKS), help="only these frameworks")
    args = parser.parse_args(argv)
    rows = table_rows(args.steps, args.framework, log=lambda message: print(message, file=sys.stderr))
    markdown = render_markdown(rows, args.steps)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
