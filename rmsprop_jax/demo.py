"""Demo: RMSprop against SGD on scikit-learn's handwritten digits.

``python -m rmsprop_jax demo`` trains the same small MLP, from the same
initialisation and on the same mini-batches, with three optimizers:
``rmsprop_jax.rmsprop``, ``optax.rmsprop`` and plain SGD (``optax.sgd``). Each
optimizer's learning rate is the best of its own small grid, judged by the
training loss over the whole run (the test set plays no part in that choice).
The demo prints the final training loss, the test accuracy and the number of
steps each needed to reach a target test accuracy, and saves a plot of the
curves.

The data set (1,797 8x8 images) ships inside scikit-learn, so nothing is
downloaded. scikit-learn, matplotlib and tqdm are the ``demo`` extra; they are
imported only when the demo runs, so ``import rmsprop_jax`` never needs them.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rmsprop_jax
from rmsprop_jax import _cli

INSTALL_HINT = 'The demo needs scikit-learn, matplotlib and tqdm: pip install "rmsprop-jax[demo]"'

# Learning rates tried when none is given. Both grids have five points half a
# decade apart, centred on the range where each method is usually run, so SGD
# gets exactly as much tuning as RMSprop. Each grid reaches a value that is
# too large (SGD at 3 diverges), so the best value lies inside it.
RMSPROP_LR_GRID: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SGD_LR_GRID: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)

DEFAULT_STEPS = 500
DEFAULT_BATCH_SIZE = 32
DEFAULT_TARGET = 0.95
DEFAULT_SEED = 0
DEFAULT_HIDDEN = 64
DEFAULT_OUT = "rmsprop_demo.png"
TEST_FRACTION = 0.2

# Floor of the training loss when learning rates are compared. A float32
# cross-entropy cannot resolve much below this (it rounds to exactly 0), so
# runs that get there tie, and reaching it sooner is what separates them.
LOSS_FLOOR = 1e-8

# Steps run per jitted call. Between calls the progress bar moves; within a
# call `lax.scan` keeps the loop inside XLA, where a step costs microseconds.
CHUNK = 100

Params = dict[str, jax.Array]
TxFactory = Callable[[jax.Array], optax.GradientTransformation]
Carry = tuple[Params, optax.OptState]


class Data(NamedTuple):
    """Standardised train/test split of the digits data."""

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array


class RunResult(NamedTuple):
    """What one optimizer achieved at one learning rate.

    Attributes:
      name: label of the optimizer.
      learning_rate: the step size it used.
      losses: full training-set loss after each step, shape ``(steps,)``.
      test_accuracies: test accuracy after each step, shape ``(steps,)``.
      final_loss: ``losses[-1]``.
      test_accuracy: ``test_accuracies[-1]``.
      steps_to_target: first step (1-based) after which the test accuracy was
        at least the target, or None if it never was.
    """

    name: str
    learning_rate: float
    losses: np.ndarray
    test_accuracies: np.ndarray
    final_loss: float
    test_accuracy: float
    steps_to_target: int | None


class DemoResult(NamedTuple):
    """Everything the demo computed.

    Attributes:
      runs: the selected run of each optimizer, keyed ``"rmsprop_jax"``,
        ``"optax.rmsprop"`` and ``"sgd"``.
      grids: for each optimizer, the `selection_score` at every learning
        rate tried (a single entry when the learning rate was given).
      target: the test accuracy that defines steps-to-target.
      out: path of the saved PNG.
      seconds: wall time of the training and plotting.
    """

    runs: dict[str, RunResult]
    grids: dict[str, dict[float, float]]
    target: float
    out: str
    seconds: float


def _rmsprop_jax(lr: jax.Array) -> optax.GradientTransformation:
    """rmsprop_jax.rmsprop with its defaults: decay 0.9, eps 1e-8 outside the root, v0 = 0."""
    return rmsprop_jax.rmsprop(lr)


def _optax_rmsprop(lr: jax.Array) -> optax.GradientTransformation:
    """optax.rmsprop with its defaults: decay 0.9, eps 1e-8 inside the root, v0 = 0."""
    return optax.rmsprop(lr)


def _sgd(lr: jax.Array) -> optax.GradientTransformation:
    """Plain SGD, no momentum."""
    return optax.sgd(lr)


OPTIMIZERS: dict[str, TxFactory] = {"rmsprop_jax": _rmsprop_jax, "optax.rmsprop": _optax_rmsprop, "sgd": _sgd}


def _import_extras() -> tuple[ModuleType, ModuleType, Any]:
    """Imports the demo-only dependencies, or raises ImportError saying how to get them."""
    try:
        import sklearn.datasets
        from matplotlib.backends import backend_agg
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} (missing: {error.name}).") from error
    return sklearn.datasets, backend_agg, tqdm


def load_data(datasets: ModuleType, seed: int) -> Data:
    """Loads the digits, splits them stratified by class with `seed`, and standardises them.

    The mean and standard deviation come from the training part only, so the
    test set stays unseen. Pixels that are constant in the training set (parts
    of the image border) get a scale of 1 instead of a division by zero.
    """
    digits = datasets.load_digits()
    x = np.asarray(digits.data, np.float32)
    y = np.asarray(digits.target, np.int32)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(y.size, bool)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        is_test[members[: round(TEST_FRACTION * members.size)]] = True
    x_train, y_train, x_test, y_test = x[~is_test], y[~is_test], x[is_test], y[is_test]
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0).astype(np.float32)
    return Data(
        jnp.asarray((x_train - mean) / std),
        jnp.asarray(y_train),
        jnp.asarray((x_test - mean) / std),
        jnp.asarray(y_test),
    )


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> Params:
    """He-initialised weights and zero biases for an MLP with layer widths `sizes`."""
    params: Params = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        key, sub = jax.random.split(key)
        params[f"w{i}"] = jax.random.normal(sub, (n_in, n_out), jnp.float32) * math.sqrt(2.0 / n_in)
        params[f"b{i}"] = jnp.zeros((n_out,), jnp.float32)
    return params


def mlp(params: Params, x: jax.Array) -> jax.Array:
    """Logits of the MLP: ReLU hidden layers, linear output."""
    n_layers = len(params) // 2
    for i in range(n_layers):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < n_layers - 1:
            x = jax.nn.relu(x)
    return x


def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(mlp(params, x), y).mean()


def accuracy(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of examples whose largest logit is the true class."""
    return jnp.mean(jnp.argmax(mlp(params, x), axis=-1) == y)


def batch_indices(n_train: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Mini-batch indices for every step, shape ``(steps, batch_size)``.

    Each epoch is a fresh permutation drawn from `seed`, so every optimizer
    sees exactly the same batches in the same order. A batch size of 0 (or one
    at least the training-set size) means full-batch gradient descent.
    """
    if batch_size <= 0 or batch_size >= n_train:
        return np.broadcast_to(np.arange(n_train, dtype=np.int32), (steps, n_train))
    rng = np.random.default_rng(seed + 1)
    per_epoch = n_train // batch_size  # drop the ragged tail so every batch has one shape
    epochs = -(-steps // per_epoch)
    perms = [rng.permutation(n_train)[: per_epoch * batch_size] for _ in range(epochs)]
    return np.concatenate(perms).reshape(-1, batch_size)[:steps].astype(np.int32)


class Trainer(NamedTuple):
    """Jitted functions that train with one optimizer (see `make_trainer`)."""

    init: Callable[[Params, jax.Array], optax.OptState]
    chunk: Callable[[Carry, jax.Array, jax.Array], tuple[Carry, jax.Array, jax.Array]]


def make_trainer(factory: TxFactory, data: Data) -> Trainer:
    """Jitted `init` and `chunk` functions for the optimizer built by `factory`.

    The learning rate is a traced argument, so a whole grid of learning rates
    compiles once per optimizer rather than once per value.
    ``chunk(carry, lr, idx)`` runs ``len(idx)`` steps with `lax.scan` and
    returns the new ``(params, opt_state)`` plus the full training loss and
    the test accuracy after every step.
    """

    @jax.jit
    def init(params: Params, lr: jax.Array) -> optax.OptState:
        return factory(lr).init(params)

    @jax.jit
    def chunk(carry: Carry, lr: jax.Array, idx: jax.Array) -> tuple[Carry, jax.Array, jax.Array]:
        tx = factory(lr)

        def step(carry: Carry, batch: jax.Array) -> tuple[Carry, tuple[jax.Array, jax.Array]]:
            params, opt_state = carry
            grads = jax.grad(loss_fn)(params, data.x_train[batch], data.y_train[batch])
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            # Both sets are small enough to evaluate after every step, which
            # keeps the loss curve free of mini-batch noise and makes
            # steps-to-target exact rather than rounded to an eval interval.
            metrics = (loss_fn(params, data.x_train, data.y_train), accuracy(params, data.x_test, data.y_test))
            return (params, opt_state), metrics

        carry, (losses, accs) = jax.lax.scan(step, carry, idx)
        return carry, losses, accs

    return Trainer(init, chunk)


def _percent(fraction: float) -> str:
    """0.95 -> '95%', 0.975 -> '97.5%' (no rounding that would misstate the target)."""
    return f"{round(fraction * 100, 6):g}%"


def first_reached(accuracies: np.ndarray, target: float) -> int | None:
    """1-based index of the first accuracy >= `target`, or None."""
    hits = np.flatnonzero(accuracies >= target)
    return int(hits[0]) + 1 if hits.size else None


def train(
    name: str, trainer: Trainer, params: Params, lr: float, idx: np.ndarray, target: float, progress: Any
) -> RunResult:
    """Trains from `params` with one optimizer and learning rate; returns its curves."""
    lr_arr = jnp.asarray(lr, jnp.float32)
    carry: Carry = (params, trainer.init(params, lr_arr))
    losses, accs = [], []
    progress.set_postfix_str(f"{name} lr={lr:g}")
    for begin in range(0, len(idx), CHUNK):
        carry, chunk_losses, chunk_accs = trainer.chunk(carry, lr_arr, jnp.asarray(idx[begin : begin + CHUNK]))
        losses.append(np.asarray(chunk_losses))
        accs.append(np.asarray(chunk_accs))
        progress.update(len(losses[-1]))
    loss_curve = np.concatenate(losses)
    acc_curve = np.concatenate(accs)
    return RunResult(
        name=name,
        learning_rate=lr,
        losses=loss_curve,
        test_accuracies=acc_curve,
        final_loss=float(loss_curve[-1]),
        test_accuracy=float(acc_curve[-1]),
        steps_to_target=first_reached(acc_curve, target),
    )


def selection_score(result: RunResult) -> float:
    """Geometric mean of the training loss over all steps (lower is better).

    This is the area under the log-scale loss curve, so it rewards a low loss
    reached early and kept, not a lucky last step. Losses are floored at
    `LOSS_FLOOR`; a run that diverged (NaN/inf anywhere) scores inf.
    """
    if not np.all(np.isfinite(result.losses)):
        return math.inf
    return float(10.0 ** np.mean(np.log10(np.maximum(result.losses, LOSS_FLOOR))))


def plot(runs: dict[str, RunResult], backend_agg: ModuleType, out: str, title: str, target: float) -> None:
    """Saves training loss (log scale) and test accuracy against step for every run to `out`."""
    from matplotlib.figure import Figure

    # A bare Figure on the Agg canvas renders to a file without a display and
    # without pyplot, so the caller's matplotlib backend and state are untouched.
    fig = Figure(figsize=(11, 4.2), dpi=110)
    backend_agg.FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    # optax.rmsprop is dashed because it lies on top of rmsprop_jax.
    styles = {"rmsprop_jax": ("C0", "-", 2.0), "optax.rmsprop": ("C1", "--", 1.5), "sgd": ("C2", "-", 1.5)}
    for key, run in runs.items():
        color, line, width = styles.get(key, (None, "-", 1.5))
        steps = np.arange(1, run.losses.size + 1)
        reached = f"{run.steps_to_target} steps" if run.steps_to_target is not None else "not reached"
        label = f"{run.name}, lr={run.learning_rate:g} ({reached})"
        # Clip exact zeros (float32 underflow) so the log axis can show them.
        ax_loss.plot(steps, np.maximum(run.losses, 1e-12), line, color=color, lw=width, label=label)
        ax_acc.plot(steps, run.test_accuracies, line, color=color, lw=width, label=label)
        if run.steps_to_target is not None:
            ax_acc.plot(
                run.steps_to_target, run.test_accuracies[run.steps_to_target - 1], "o", color=color, mec="black", ms=6
            )
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (cross-entropy, whole train set)")
    ax_loss.grid(True, which="both", alpha=0.3)
    ax_loss.legend(fontsize=8, title=f"steps to {_percent(target)} test accuracy", title_fontsize=8)
    ax_acc.axhline(target, color="grey", lw=1, ls=":", label=f"target {_percent(target)}")
    ax_acc.set_ylim(max(0.0, target - 0.25), 1.0)
    # A log step axis spreads out the first hundred steps, where the target is reached.
    ax_acc.set_xscale("log")
    ax_acc.set_xlabel("step (log scale; dots: target reached)")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.grid(True, alpha=0.3)
    ax_acc.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out)


def run_demo(
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float | None = None,
    sgd_lr: float | None = None,
    target: float = DEFAULT_TARGET,
    seed: int = DEFAULT_SEED,
    hidden: int = DEFAULT_HIDDEN,
    out: str = DEFAULT_OUT,
    progress: bool = True,
    stream: TextIO | None = None,
) -> DemoResult:
    """Runs the comparison, prints a summary to `stream` and saves the plot to `out`.

    Args:
      steps: optimizer steps per run.
      batch_size: examples per step; 0 means full batch.
      lr: learning rate of both RMSprop implementations; None picks, for each,
        the value of `RMSPROP_LR_GRID` with the lowest `selection_score`.
      sgd_lr: learning rate of SGD; None picks the best of `SGD_LR_GRID` the
        same way.
      target: test accuracy that defines steps-to-target, in (0, 1].
      seed: seed of the split, the initialisation and the batch order.
      hidden: width of the hidden layer.
      out: path of the PNG to write.
      progress: show a tqdm progress bar (on stderr).
      stream: where the summary is printed; None means ``sys.stdout``.

    Returns:
      A `DemoResult`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}.")
    if hidden < 1:
        raise ValueError(f"hidden must be >= 1, got {hidden}.")
    for flag, value in (("lr", lr), ("sgd_lr", sgd_lr)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}.")
    stream = sys.stdout if stream is None else stream
    datasets, backend_agg, tqdm = _import_extras()
    start = time.perf_counter()

    data = load_data(datasets, seed)
    n_train = int(data.x_train.shape[0])
    params = init_mlp(jax.random.key(seed), (64, hidden, 10))
    idx = batch_indices(n_train, steps, batch_size, seed)
    rms_lrs = RMSPROP_LR_GRID if lr is None else (lr,)
    lr_lists = {"rmsprop_jax": rms_lrs, "optax.rmsprop": rms_lrs, "sgd": SGD_LR_GRID if sgd_lr is None else (sgd_lr,)}

    runs: dict[str, RunResult] = {}
    grids: dict[str, dict[float, float]] = {}
    total = steps * sum(len(lrs) for lrs in lr_lists.values())
    with tqdm(total=total, disable=not progress, unit="step", desc="training", file=sys.stderr) as bar:
        for name, factory in OPTIMIZERS.items():
            trainer = make_trainer(factory, data)
            tried = [train(name, trainer, params, a, idx, target, bar) for a in lr_lists[name]]
            grids[name] = {run.learning_rate: selection_score(run) for run in tried}
            runs[name] = min(tried, key=selection_score)

    batch_text = "full batch" if idx.shape[1] == n_train else f"batch size {idx.shape[1]}"
    title = f"Digits, MLP 64-{hidden}-10, {batch_text}, seed {seed}: each optimizer at its best learning rate"
    plot(runs, backend_agg, out, title, target)
    seconds = time.perf_counter() - start
    _report(runs, grids, data, hidden, batch_text, steps, target, out, stream)
    return DemoResult(runs=runs, grids=grids, target=target, out=out, seconds=seconds)


def _report(
    runs: dict[str, RunResult],
    grids: dict[str, dict[float, float]],
    data: Data,
    hidden: int,
    batch_text: str,
    steps: int,
    target: float,
    out: str,
    stream: TextIO,
) -> None:
    """Prints the set-up, the learning-rate selection and the summary table."""

    def say(line: str = "") -> None:
        print(line, file=stream)

    say(
        f"Digits: {data.x_train.shape[0]} train / {data.x_test.shape[0]} test images (8x8, standardised). "
        f"MLP 64-{hidden}-10 (ReLU), {batch_text}, {steps} steps,"
    )
    say("same initialisation and batches for every optimizer. RMSprops use their library defaults (decay 0.9,")
    say("eps 1e-8: outside the root in rmsprop_jax, inside in optax); SGD is plain (no momentum).")
    say()
    say("Learning rate: the value with the lowest geometric-mean training loss over all steps (the area under")
    say("the log-scale loss curve; inf = diverged). The test set plays no part in the choice.")
    for name, grid in grids.items():
        tried = ", ".join(f"{a:g} -> {score:.2g}" for a, score in grid.items())
        say(f"  {name:<14} {tried}   => lr {runs[name].learning_rate:g}")
    say()
    goal = f"steps to {_percent(target)}"
    header = f"{'optimizer':<14} {'lr':>6} {'final train loss':>17} {'test acc':>9} {goal:>13}"
    say(header)
    say("-" * len(header))
    for run in runs.values():
        reached = str(run.steps_to_target) if run.steps_to_target is not None else "not reached"
        say(f"{run.name:<14} {run.learning_rate:>6g} {run.final_loss:>17.3g} {run.test_accuracy:>9.1%} {reached:>13}")
    say(f"({goal}: first step after which test accuracy >= {target:g}; accuracy is measured after every step.)")
    say()
    rms, sgd = runs["rmsprop_jax"], runs["sgd"]
    if rms.steps_to_target is not None and sgd.steps_to_target is None:
        say(
            f"rmsprop_jax reached {_percent(target)} test accuracy in {rms.steps_to_target} steps; "
            f"SGD did not within {steps}."
        )
    elif rms.steps_to_target is None and sgd.steps_to_target is not None:
        say(
            f"SGD reached {_percent(target)} test accuracy in {sgd.steps_to_target} steps; "
            f"rmsprop_jax did not within {steps}."
        )
    elif rms.steps_to_target is not None and sgd.steps_to_target is not None:
        faster = "fewer" if rms.steps_to_target < sgd.steps_to_target else "not fewer"
        say(
            f"rmsprop_jax needed {rms.steps_to_target} steps to reach {_percent(target)} test accuracy, SGD "
            f"{sgd.steps_to_target} ({faster})."
        )
    if math.isfinite(rms.final_loss) and math.isfinite(sgd.final_loss):
        relation = "lower" if rms.final_loss < sgd.final_loss else "not lower"
        say(
            f"After {steps} steps rmsprop_jax's training loss is {rms.final_loss:.3g}, "
            f"SGD's {sgd.final_loss:.3g} ({relation})."
        )
    say(f"Curves saved to {out}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the demo's flags to `parser` (shared by `main` and ``python -m rmsprop_jax demo``)."""
    rms_grid = ", ".join(f"{a:g}" for a in RMSPROP_LR_GRID)
    sgd_grid = ", ".join(f"{a:g}" for a in SGD_LR_GRID)
    parser.add_argument(
        "--steps", type=_cli.positive_int, default=DEFAULT_STEPS, help="optimizer steps per run (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size",
        type=_cli.non_negative_int,
        default=DEFAULT_BATCH_SIZE,
        help="training examples per step; 0 means full batch (default: %(default)s)",
    )
    parser.add_argument(
        "--lr",
        type=_cli.positive_float,
        default=None,
        help="learning rate of rmsprop_jax.rmsprop and optax.rmsprop (default: for each, the one of "
        f"{rms_grid} with the lowest geometric-mean training loss over the run)",
    )
    parser.add_argument(
        "--sgd-lr",
        type=_cli.positive_float,
        default=None,
        help=f"learning rate of SGD (default: the one of {sgd_grid} with the lowest geometric-mean training "
        "loss over the run)",
    )
    parser.add_argument(
        "--target",
        type=_cli.fraction,
        default=DEFAULT_TARGET,
        help="test accuracy in (0, 1] that defines steps-to-target: the first step after which a run's "
        "test accuracy is at least this (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="seed of the train/test split, the initialisation and the batch order (default: %(default)s)",
    )
    parser.add_argument(
        "--hidden",
        type=_cli.positive_int,
        default=DEFAULT_HIDDEN,
        help="width of the hidden layer (default: %(default)s)",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="where to save the PNG of the curves (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")


DESCRIPTION = (
    "Train a small MLP on scikit-learn's handwritten digits (1,797 8x8 images, bundled, nothing downloaded) "
    "with rmsprop_jax.rmsprop, optax.rmsprop and plain SGD, from the same initialisation on the same batches, "
    "each at its best learning rate from a small grid. Prints each one's final training loss, test accuracy "
    "and steps to a target test accuracy, and saves a plot of training loss and test accuracy per step."
)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The demo's argument parser, or `parser` (e.g. a subcommand's) with the demo's flags added."""
    if parser is None:
        parser = argparse.ArgumentParser(prog="python -m rmsprop_jax demo", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def run_from_args(args: argparse.Namespace) -> DemoResult:
    """Runs the demo with parsed flags; a missing extra exits with the install command."""
    try:
        return run_demo(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            sgd_lr=args.sgd_lr,
            target=args.target,
            seed=args.seed,
            hidden=args.hidden,
            out=args.out,
            progress=not args.no_progress,
        )
    except ImportError as error:
        if str(error).startswith(INSTALL_HINT):
            raise SystemExit(str(error)) from None
        raise


def main(argv: Sequence[str] | None = None) -> DemoResult:
    """Command-line entry point of the demo: parses `argv` (default ``sys.argv[1:]``) and runs it."""
    return run_from_args(build_parser().parse_args(argv))
