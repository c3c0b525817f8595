"""Sharding tests: the ZeRO-1 rule in process, the multi-device checks in a subprocess.

The multi-device checks (``multidevice_checks.py``) need 8 devices, which on
the CPU means ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before
jax starts; that cannot be changed inside this process without affecting the
other tests, so each group of checks runs once in its own subprocess and
every check is reported here as one test.

Two groups:

* "default": XLA's default code generation. Init layouts, collectives in the
  compiled step, ZeRO-1 memory, and bitwise parity of data-parallel,
  model-parallel and ZeRO-1 runs with the single-device run.
* "nofma": the same parity checks for ``skip_nonfinite=True``, in a process
  where XLA's CPU backend may not use fused multiply-add instructions
  (``--xla_cpu_max_isa=AVX``). XLA contracts ``a*b + c`` into an FMA inside
  a fusion when the hardware has one, and how it fuses depends on the whole
  program: the guard's global decision makes it duplicate the state update
  into several fusions, which differ between the sharded program (split by
  the all-reduce) and the single-device one, so the last bit of a result can
  differ. Without contraction every program rounds each operation once and
  the parity is exact, which is what the optimizer itself guarantees.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from jax.sharding import PartitionSpec as P

from rmsprop_jax.sharding import zero1_spec

HERE = Path(__file__).parent
SCRIPT = HERE / "multidevice_checks.py"
TIMEOUT_S = 600
X86 = platform.machine().lower() in {"x86_64", "amd64"}

_spec = importlib.util.spec_from_file_location("multidevice_checks", SCRIPT)
assert _spec is not None and _spec.loader is not None
checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(checks)

GROUP_FLAGS = {
    "default": "",
    "nofma": "--xla_cpu_max_isa=AVX",
}


def _run_group(group: str) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f and "max_isa" not in f]
    flags += ["--xla_force_host_platform_device_count=8", GROUP_FLAGS[group]]
    env["XLA_FLAGS"] = " ".join(f for f in flags if f)
    env["JAX_PLATFORMS"] = "cpu"
    failures = []
    # A crash of the script (no results at all, as opposed to a failed check) is
    # retried once and reported as a warning, so that it stays visible.
    for _ in range(2):
        command = [sys.executable, str(SCRIPT), group]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
        for line in done.stdout.splitlines():
            if line.startswith(checks.RESULT_MARKER):
                for failure in failures:
                    warnings.warn(f"the multi-device script crashed once and was rerun: {failure}", stacklevel=2)
                return json.loads(line[len(checks.RESULT_MARKER) :])
        failures.append(f"exit {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    raise AssertionError("the multi-device script failed twice:\n" + "\n".join(failures))


_results: dict[str, dict[str, str]] = {}


def group_results(group: str) -> dict[str, str]:
    if group not in _results:
        _results[group] = _run_group(group)
    return _results[group]


def _params() -> list[Any]:
    out = []
    for name in checks.CHECKS:
        group = checks.group_of(name)
        marks: list[Any] = []
        if group == "nofma" and not X86:
            marks.append(pytest.mark.skip(reason="--xla_cpu_max_isa=AVX is an x86 setting"))
        out.append(pytest.param(name, group, id=name, marks=marks))
    return out


@pytest.mark.parametrize(("name", "group"), _params())
def test_multidevice(name: str, group: str) -> None:
    results = group_results(group)
    assert name in results, f"{name} did not run; ran: {sorted(results)}"
    assert results[name] == "ok", results[name]


def test_every_check_has_a_known_group() -> None:
    assert {checks.group_of(name) for name in checks.CHECKS} <= set(GROUP_FLAGS)


# --------------------------------------------------------------------------- the ZeRO-1 rule, in process


@pytest.mark.parametrize(
    ("shape", "spec", "axis_size", "want"),
    [
        ((1024, 512), P(), 8, P("data", None)),  # largest dim first
        ((512, 1024), P(), 8, P(None, "data")),
        ((64, 64), P(), 8, P("data", None)),  # ties: the first dim
        ((1024, 512), P("model"), 8, P("model", "data")),  # dim 0 is taken
        ((1024, 512), P(None, "model"), 8, P("data", "model")),
        ((1000, 12), P(), 8, P("data", None)),  # 1000 = 8 * 125
        ((10, 12), P(), 8, P(None, None)),  # nothing divisible: like the param
        ((4, 6), P(), 8, P(None, None)),  # smaller than the axis
        ((0, 16), P(), 8, P(None, "data")),  # zero-size dims are never split
        ((), P(), 8, P()),  # scalars stay replicated
        ((64, 32), P("data"), 8, P("data", None)),  # already uses the axis
        ((64, 32), P(("data", "model")), 8, P(("data", "model"), None)),
        ((16, 24), P(), 1, P(None, "data")),  # size-1 axis: same rule
    ],
)
def test_zero1_spec_rule(shape: tuple[int, ...], spec: P, axis_size: int, want: P) -> None:
    assert zero1_spec(shape, spec, "data", axis_size) == want


def test_zero1_spec_with_a_tuple_of_axes() -> None:
    got = zero1_spec((48, 16), P(), ("data", "fsdp"), 6)
    assert got == P(("data", "fsdp"), None)
    assert zero1_spec((48, 16), P(None, "fsdp"), ("data", "fsdp"), 6) == P(None, "fsdp")


def test_zero1_state_shardings_needs_a_mesh_for_bare_leaves() -> None:
    import jax
    import numpy as np

    from rmsprop_jax.sharding import zero1_state_shardings

    with pytest.raises(ValueError, match="mesh="):
        zero1_state_shardings({"w": jax.ShapeDtypeStruct((8, 4), np.float32)})
    mesh = jax.make_mesh((1,), ("data",))
    with pytest.raises(ValueError, match="not an axis"):
        zero1_state_shardings({"w": np.zeros((8, 4), np.float32)}, mesh, axis="batch")
    got = zero1_state_shardings({"w": np.zeros((8, 4), np.float32), "n": None}, mesh)
    assert got["w"].spec == P("data", None) and got["n"] is None
