"""Runs the benchmark suite and writes a markdown report.

    python -m benchmarks.run            # full run, writes benchmarks/RESULTS.md
    python -m benchmarks.run --quick    # seconds-long smoke run, prints the report
    python -m benchmarks.run --only optimizers --out report.md

Sections: ``optimizers`` (rmsprop_jax vs optax.rmsprop vs torch.optim.RMSprop
on single leaves, a GPT-2-small-like tree, 2,000 small leaves and a DQN),
``lowmem`` (bfloat16/float16 and 8-bit state: bytes, quality, step time) and
``flat`` (flat state and flat-parameter training on many small leaves). Every
time is also expressed as a fraction of the machine's streaming bandwidth,
measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

import rmsprop_jax
from benchmarks import measure, optimizers, workloads

DEFAULT_OUT = Path(__file__).with_name("RESULTS.md")


class Config(NamedTuple):
    quick: bool
    rounds: int
    min_round_s: float
    stream_n: int


class Context(NamedTuple):
    config: Config
    torch: Any
    stream_gbps: float
    log: Callable[[str], None]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> str:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return f"{pages * size / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        return "?"


def environment(torch: Any) -> list[str]:
    device = jax.devices()[0]
    versions = [
        f"python {platform.python_version()}",
        f"jax {jax.__version__}",
        f"jaxlib {jax.lib.__version__ if hasattr(jax.lib, '__version__') else '?'}",
        f"optax {optax.__version__}",
        f"numpy {np.__version__}",
        f"rmsprop_jax {rmsprop_jax.__version__}",
        "torch " + (torch.__version__ if torch is not None else "absent"),
    ]
    return [
        f"- machine: {cpu_model()}, {os.cpu_count()} logical cores, {memory_gib()} RAM, {platform.system()}",
        f"- JAX backend: {device.platform} ({device.device_kind}); XLA uses {measure.jax_cores()} cores"
        + (f"; torch.set_num_threads({measure.jax_cores()})" if torch is not None else ""),
        "- versions: " + ", ".join(versions),
    ]


# --------------------------------------------------------------------------- sections


def optimizers_section(ctx: Context) -> str:
    cfg = ctx.config
    v = workloads.VARIANTS
    two = [v["plain"], v["centered+momentum"]]
    every = list(v.values())
    if cfg.quick:
        plan = [(workloads.single_leaf(10_000), two), (workloads.many_small(20, 256), two)]
    else:
        plan = [(workloads.single_leaf(n), two) for n in (10_000, 100_000, 1_000_000)]
        plan += [(workloads.single_leaf(10_000_000), every), (workloads.single_leaf(30_000_000), two)]
        plan += [(workloads.gpt2_small_tree(), every), (workloads.dqn(), two), (workloads.many_small(), two)]
    out = [
        "## Optimizer step: rmsprop_jax vs optax.rmsprop vs torch.optim.RMSprop",
        "",
        "Jitted `update` + `optax.apply_updates` with params and state donated (JAX), `optimizer.step()` with "
        "fixed `.grad` (PyTorch); float32; lr 1e-3, decay 0.9, eps 1e-8 outside the root for all three (optax "
        "with `eps_in_sqrt=False`). *x optax*: median time over optax.rmsprop's. *GB/s* counts the minimum "
        "traffic (read g, x, state; write x, state: 20 B/param plain, 36 centered + momentum); *of stream*: that "
        "over the streaming bandwidth above. *XLA B/param*: `cost_analysis()['bytes accessed']` per param. "
        "PyTorch has no Nesterov and no bias correction.",
        "",
    ]
    all_rows = []
    for workload, variants in plan:
        ctx.log(f"{workload.name}: {workload.n_params:,} params in {workload.n_leaves} leaves")
        rows = optimizers.bench(
            workload, variants, torch=ctx.torch, rounds=cfg.rounds, min_round_s=cfg.min_round_s, log=ctx.log
        )
        all_rows += rows
        leaves = "1 leaf" if workload.n_leaves == 1 else f"{workload.n_leaves:,} leaves"
        out += [f"### {workload.name} ({workload.n_params:,} params, {leaves})", ""]
        out += [optimizers.table(rows, ctx.stream_gbps), ""]
    out += targets_summary(all_rows)
    return "\n".join(out)


def targets_summary(rows: list[optimizers.Row]) -> list[str]:
    """rmsprop_jax over optax.rmsprop, for each workload and variant measured."""
    by_key = {(r.workload, r.variant, r.impl): r for r in rows}
    body = []
    for (workload, variant, impl), ours in by_key.items():
        if impl != "rmsprop_jax" or (workload, variant, "optax.rmsprop") not in by_key:
            continue
        theirs = by_key[(workload, variant, "optax.rmsprop")]
        t_ratio = ours.timing.median / theirs.timing.median
        body.append(
            [
                workload,
                variant,
                f"{t_ratio:.3f}",
                f"{ours.xla_bytes:.1f} / {theirs.xla_bytes:.1f}",
                f"{ours.fusions} / {theirs.fusions}",
                f"{ours.compile_s:.2f} / {theirs.compile_s:.2f}",
            ]
        )
    return [
        "### rmsprop_jax vs optax.rmsprop (same math)",
        "",
        "Time ratio < 1 means rmsprop_jax is faster; two implementations that compile to the same kernels differ "
        "only by noise (see the min-max spreads above).",
        "",
        measure.markdown_table(
            ["workload", "variant", "time ours/optax", "XLA B/param ours / optax", "fusions", "compile s"], body
        ),
        "",
    ]


SECTIONS: dict[str, Callable[[Context], str]] = {"optimizers": optimizers_section}


def register_optional_sections() -> None:
    """Sections that live in their own modules (imported lazily so a failure in one does not stop the rest)."""
    try:
        from benchmarks import lowmem_bench

        SECTIONS["lowmem"] = lowmem_bench.section
    except ImportError:
        pass
    try:
        from benchmarks import flat_bench

        SECTIONS["flat"] = flat_bench.section
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> str:
    register_optional_sections()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny workloads, few rounds: a smoke test (seconds)")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="sections to run (default: all)")
    parser.add_argument("--out", help=f"write the markdown report here (default for a full run: {DEFAULT_OUT.name})")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if it is installed")
    parser.add_argument("--rounds", type=int, help="timed rounds per measurement (default 7, quick 3)")
    args = parser.parse_args(argv)

    quick = args.quick
    config = Config(
        quick=quick,
        rounds=args.rounds or (3 if quick else 7),
        min_round_s=0.002 if quick else 0.2,
        stream_n=1_000_000 if quick else 30_000_000,
    )
    torch = None if args.no_torch else optimizers.load_torch()
    if torch is not None:
        torch.set_num_threads(measure.jax_cores())

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.time()
    load_before = os.getloadavg()
    gbps, stream_timing = measure.stream_bandwidth(
        config.stream_n, rounds=config.rounds, min_round_s=config.min_round_s
    )
    floor = measure.dispatch_floor(rounds=config.rounds, min_round_s=config.min_round_s)
    log(f"streaming bandwidth {gbps:.1f} GB/s; dispatch floor {measure.fmt_time(floor.median)}")
    ctx = Context(config, torch, gbps, log)
    names = args.only or list(SECTIONS)
    sections = [SECTIONS[name](ctx) for name in names]
    load_after = os.getloadavg()

    header = [
        "# Benchmark results" + (" (quick smoke run)" if quick else ""),
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"run took {time.time() - started:.0f} s; command: `python -m benchmarks.run"
        + (" --quick" if quick else "")
        + (f" --only {' '.join(names)}" if args.only else "")
        + "`",
        *environment(torch),
        f"- load average (1 min) before / after the run: {load_before[0]:.2f} / {load_after[0]:.2f}",
        f"- streaming bandwidth: jitted in-place `a + s*b` (a donated, {config.stream_n:,} float32, 12 B/element): "
        f"**{gbps:.1f} GB/s** (median of {stream_timing.rounds} rounds, spread {stream_timing.spread():.0%})",
        f"- per-call floor of a jitted step (donated scalar + 1): {measure.fmt_time(floor.median)}",
        *(
            [
                "- no GPU in this run: the GPU targets (20 / 36 B/param, >= 85 % of the device copy bandwidth) are not "
                "measured here"
            ]
            if jax.devices()[0].platform == "cpu"
            else []
        ),
        f"- timing: median of {config.rounds} rounds after 2 warm-up steps, each round ≥ {config.min_round_s} s "
        "of back-to-back steps; implementations take turns round by round",
        "",
    ]
    report = "\n".join(header + sections) + "\n"
    out = args.out or (None if quick else str(DEFAULT_OUT))
    if out:
        Path(out).write_text(report)
        log(f"wrote {out}")
    else:
        print(report)
    return report


if __name__ == "__main__":
    main()
