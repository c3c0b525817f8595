"""The optimizer step, side by side: rmsprop_jax.rmsprop, optax.rmsprop and torch.optim.RMSprop."""

from __future__ import annotations

import gc
import time
from typing import Any, NamedTuple

import jax
import optax

import rmsprop_jax
from benchmarks import measure, workloads
from benchmarks.workloads import DECAY, EPS, LR, Variant, Workload

IMPLS = ("rmsprop_jax", "optax.rmsprop", "torch foreach", "torch for-loop")


class Row(NamedTuple):
    workload: str
    n_params: int
    n_leaves: int
    variant: str
    impl: str
    timing: measure.Timing
    min_bytes: int  # per param
    xla_bytes: float | None  # per param, from cost_analysis
    fusions: int | None
    kernels: int | None
    temp_bytes: int | None
    compile_s: float | None


def load_torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def jax_tx(impl: str, variant: Variant) -> optax.GradientTransformation:
    if impl == "rmsprop_jax":
        return rmsprop_jax.rmsprop(LR, DECAY, EPS, **variant.ours)
    # optax's default puts eps inside the root; ours (and PyTorch's) outside.
    return optax.rmsprop(LR, DECAY, EPS, eps_in_sqrt=False, **variant.optax)


def torch_runner(torch: Any, params: dict, grads: dict, variant: Variant, foreach: bool) -> measure.Runner:
    tensors = []
    for key, value in params.items():
        p = torch.nn.Parameter(torch.from_numpy(value.copy()))
        p.grad = torch.from_numpy(grads[key].copy())
        tensors.append(p)
    opt = torch.optim.RMSprop(tensors, lr=LR, alpha=DECAY, eps=EPS, foreach=foreach, **(variant.torch or {}))
    return measure.CallRunner(opt.step)


def bench(
    workload: Workload,
    variants: list[Variant],
    *,
    torch: Any,
    rounds: int,
    min_round_s: float,
    log: Any = print,
) -> list[Row]:
    """Measures every implementation on one workload for each variant."""
    params_np, grads_np = workloads.arrays(workload)
    grads = jax.device_put(grads_np)
    rows = []
    for variant in variants:
        runners: dict[str, measure.Runner] = {}
        stats: dict[str, measure.Compiled] = {}
        for impl in IMPLS[:2]:
            tx = jax_tx(impl, variant)
            params = jax.device_put(params_np)
            state = tx.init(params)
            compiled = measure.compile_jax(measure.optax_step(tx), (params, state, grads))
            stats[impl] = compiled
            runners[impl] = measure.JaxRunner(compiled.fn, params, state, grads)
        # The two runtimes are timed apart: each keeps its worker threads spinning for a while after a
        # kernel, which would steal cores from the other if their rounds alternated.
        timings = measure.time_interleaved(runners, rounds=rounds, min_round_s=min_round_s)
        if torch is not None and variant.torch is not None:
            time.sleep(0.5)
            torch_runners: dict[str, measure.Runner] = {
                "torch foreach": torch_runner(torch, params_np, grads_np, variant, True),
                "torch for-loop": torch_runner(torch, params_np, grads_np, variant, False),
            }
            timings.update(measure.time_interleaved(torch_runners, rounds=rounds, min_round_s=min_round_s))
            del torch_runners
            time.sleep(0.5)
        n = workload.n_params
        for impl, timing in timings.items():
            c = stats.get(impl)
            rows.append(
                Row(
                    workload.name,
                    n,
                    workload.n_leaves,
                    variant.name,
                    impl,
                    timing,
                    workloads.min_bytes_per_param(variant),
                    None if c is None else c.bytes_accessed / n,
                    None if c is None else c.fusions,
                    None if c is None else c.kernels,
                    None if c is None else c.temp_bytes,
                    None if c is None else c.compile_s,
                )
            )
            log(
                f"  {workload.name:20s} {variant.name:18s} {impl:15s} {measure.fmt_time(timing.median):>10s}"
                + (
                    ""
                    if c is None
                    else f"  {c.bytes_accessed / n:5.1f} B/param  {c.fusions:5d} fusions  compile {c.compile_s:.2f} s"
                )
            )
        del runners, stats
        gc.collect()
    return rows


def table(rows: list[Row], stream_gbps: float) -> str:
    """One markdown table; times relative to optax.rmsprop of the same workload and variant."""
    optax_time = {(r.workload, r.variant): r.timing.median for r in rows if r.impl == "optax.rmsprop"}
    body = []
    for r in rows:
        gbps = r.min_bytes * r.n_params / r.timing.median / 1e9
        rel = r.timing.median / optax_time[(r.workload, r.variant)] if (r.workload, r.variant) in optax_time else None
        body.append(
            [
                r.variant,
                r.impl,
                measure.fmt_timing(r.timing),
                "—" if rel is None else f"{rel:.2f}",
                f"{gbps:.1f}",
                f"{gbps / stream_gbps:.0%}",
                "—" if r.xla_bytes is None else f"{r.xla_bytes:.1f} / {r.min_bytes}",
                "—" if r.fusions is None else str(r.fusions),
                "—" if r.temp_bytes is None else measure.fmt_bytes(r.temp_bytes),
                "—" if r.compile_s is None else f"{r.compile_s:.2f}",
            ]
        )
    header = [
        "variant",
        "implementation",
        "step: median [min-max]",
        "x optax",
        "GB/s (min bytes)",
        "of stream",
        "XLA B/param / min",
        "fusions",
        "temp",
        "compile s",
    ]
    return measure.markdown_table(header, body)
