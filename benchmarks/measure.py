"""Timing and compiled-program statistics shared by the benchmark sections."""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

FUSION = re.compile(r"\bfusion\(")
TRIVIAL = ("parameter(", "tuple(", "get-tuple-element(", "constant(", "bitcast(")


def jax_cores() -> int:
    """The number of cores the XLA CPU backend spreads work over (its thread pool follows the affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def entry_ops(hlo: str) -> list[str]:
    """The instructions of the ENTRY computation of an optimized HLO module."""
    lines = hlo.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    body = []
    for line in lines[start + 1 :]:
        if line.startswith("}"):
            break
        body.append(line.strip())
    return body


class Compiled(NamedTuple):
    """A compiled step and what XLA says about it."""

    fn: Any
    compile_s: float
    bytes_accessed: float
    fusions: int
    kernels: int  # non-trivial top-level instructions (fusions and unfused ops)
    temp_bytes: int


def compile_jax(fn: Callable, args: Sequence[Any], donate: Sequence[int] = (0, 1)) -> Compiled:
    """Lowers and compiles `fn` for `args` with the given arguments donated, timing the compilation."""
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=tuple(donate)).lower(*args).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax returned one dict per program
        cost = cost[0]
    ops = entry_ops(compiled.as_text())
    fusions = sum(1 for op in ops if FUSION.search(op))
    kernels = sum(1 for op in ops if not any(t in op for t in TRIVIAL))
    temp = compiled.memory_analysis().temp_size_in_bytes
    return Compiled(compiled, compile_s, float(cost.get("bytes accessed", float("nan"))), fusions, kernels, temp)


class Runner:
    """Something that can take one step (advancing its own buffers) and wait for it to finish."""

    def step(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        pass


class JaxRunner(Runner):
    """Calls a compiled ``(params, state, grads) -> (params, state)`` with params and state donated."""

    def __init__(self, compiled: Any, params: Any, state: Any, grads: Any):
        self.compiled, self.params, self.state, self.grads = compiled, params, state, grads

    def step(self) -> None:
        self.params, self.state = self.compiled(self.params, self.state, self.grads)

    def sync(self) -> None:
        jax.block_until_ready((self.params, self.state))


class CallRunner(Runner):
    """Wraps a plain callable (e.g. a PyTorch optimizer's ``step``)."""

    def __init__(self, step: Callable[[], Any], sync: Callable[[], Any] | None = None):
        self._step, self._sync = step, sync

    def step(self) -> None:
        self._step()

    def sync(self) -> None:
        if self._sync is not None:
            self._sync()


class Timing(NamedTuple):
    """Seconds per step: the median over rounds and the fastest and slowest round."""

    median: float
    low: float
    high: float
    rounds: int
    steps_per_round: int

    def spread(self) -> float:
        """(slowest − fastest) / median."""
        return (self.high - self.low) / self.median


def _round(runner: Runner, steps: int) -> float:
    runner.sync()
    start = time.perf_counter()
    for _ in range(steps):
        runner.step()
    runner.sync()
    return (time.perf_counter() - start) / steps


def time_interleaved(
    runners: dict[str, Runner], *, rounds: int, min_round_s: float, warmup: int = 2, max_steps: int = 10_000
) -> dict[str, Timing]:
    """Median step time of each runner; the runners take turns round by round so drifts in load hit them alike."""
    steps: dict[str, int] = {}
    for name, runner in runners.items():
        for _ in range(warmup):
            runner.step()
        one = _round(runner, 1)
        steps[name] = max(1, min(max_steps, int(min_round_s / max(one, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            samples[name].append(_round(runner, steps[name]))
    return {name: Timing(statistics.median(s), min(s), max(s), rounds, steps[name]) for name, s in samples.items()}


def stream_bandwidth(n: int, *, rounds: int, min_round_s: float) -> tuple[float, Timing]:
    """GB/s of a jitted in-place ``a + s * b`` on float32 vectors of `n` elements, `a` donated (12 bytes/element)."""
    a = jnp.ones((n,), jnp.float32)
    b = jnp.full((n,), 0.5, jnp.float32)
    s = jnp.float32(1e-3)

    compiled = compile_jax(lambda a, s, b: (a + s * b, s), (a, s, b), donate=(0,))
    runner = JaxRunner(compiled.fn, a, s, b)
    timing = time_interleaved({"stream": runner}, rounds=rounds, min_round_s=min_round_s)["stream"]
    return 12 * n / timing.median / 1e9, timing


def dispatch_floor(*, rounds: int, min_round_s: float) -> Timing:
    """Seconds per call of a jitted step that does almost nothing (a donated scalar + 1): the per-call overhead."""
    x = jnp.zeros((), jnp.float32)
    compiled = compile_jax(lambda x, y, z: (x + 1, y), (x, x + 0, x + 0), donate=(0,))
    runner = JaxRunner(compiled.fn, x, x + 0, x + 0)
    return time_interleaved({"floor": runner}, rounds=rounds, min_round_s=min_round_s)["floor"]


def optax_step(tx: optax.GradientTransformation) -> Callable:
    """``(params, state, grads) -> (params, state)``: update then ``optax.apply_updates``."""

    def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_timing(timing: Timing) -> str:
    """The median with the range of the rounds, e.g. ``5.52 ms [5.06 ms-7.41 ms]``."""
    return f"{fmt_time(timing.median)} [{fmt_time(timing.low)}-{fmt_time(timing.high)}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
