"""Multi-process training with ``jax.distributed``: several JAX processes on this machine, over gloo.

Each launch (``rmsprop_jax.multihost.launch``) costs 10-25 s on 2 cores, so
the checks share three launches of ``multiprocess_worker.py``, run once per
module:

* ``save`` (2 processes x 4 devices): data-parallel training with zero1
  state and an orbax checkpoint, a restore of that checkpoint onto a
  (4, 2) ``("data", "model")`` mesh, and a run in which process 1 SIGKILLs
  itself;
* ``four`` (4 x 2): data-parallel training, a restore of the 2-process
  checkpoint, and a resume from the killed run's latest checkpoint;
* ``single`` (1 x 8, no ``jax.distributed``): a restore of the 2-process
  checkpoint.

The worker's problem has exact-sum gradients, so every result must equal
the single-device run of this process bitwise. The launcher itself and the
example (``python -m rmsprop_jax.multihost``) are tested too.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rmsprop_jax import _compat, multihost

pytestmark = pytest.mark.multiprocess
# Every launch of the worker includes a run in which a process kills itself; its peers must then exit after
# PEER_TIMEOUT, which jax.distributed takes only from jax 0.7 (older jax waits minutes, past the launch limit).
needs_peer_timeouts = pytest.mark.skipif(
    not _compat.DISTRIBUTED_TIMEOUTS, reason="needs jax.distributed.initialize(heartbeat_timeout_seconds=) (jax >= 0.7)"
)

HERE = Path(__file__).parent
ROOT = HERE.parent
SCRIPT = HERE / "multiprocess_worker.py"

_spec = importlib.util.spec_from_file_location("multiprocess_worker", SCRIPT)
assert _spec is not None and _spec.loader is not None
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

STEPS = 6
SAVE_AT = 3  # the checkpoint that other topologies restore
EVERY = 2  # the killed run's checkpoint interval
KILL_AT = 5  # process 1 kills itself before this step
LAUNCH_TIMEOUT = 90.0
PEER_TIMEOUT = 10  # heartbeat / shutdown timeout of jax.distributed in the workers
EXIT_BOUND = 3 * PEER_TIMEOUT  # the survivors must be gone this soon after the kill (measured: 7-9 s)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def tails(results: list[multihost.Result], lines: int = 25) -> str:
    """The exit status and the ends of every worker's output, for failure messages."""
    parts = []
    for r in results:
        err = [line for line in r.stderr.splitlines() if not line.lstrip().startswith("@")][-lines:]
        out = [line for line in r.stdout.splitlines() if "peer ranks" not in line][-5:]
        parts.append(
            f"--- process {r.process_id}: status {r.returncode}, {r.seconds:.1f} s, timed out: {r.timed_out}\n"
            + "stdout ends:\n  "
            + "\n  ".join(out)
            + "\nstderr ends:\n  "
            + "\n  ".join(err)
        )
    return "\n".join(parts)


class Launch:
    """One launch of the worker, with its results and its output folder."""

    def __init__(self, out: Path, scenario: str, processes: int, devices: int) -> None:
        argv = [str(SCRIPT), scenario, "--out", str(out), "--steps", str(STEPS), "--save-at", str(SAVE_AT)]
        argv += ["--every", str(EVERY), "--kill-at", str(KILL_AT)]
        self.out = out
        self.results = multihost.launch(
            argv, processes, devices, LAUNCH_TIMEOUT, peer_timeout=PEER_TIMEOUT, env=_env(), cwd=ROOT
        )

    def npz(self, name: str) -> dict[str, np.ndarray]:
        path = self.out / f"{name}.npz"
        assert path.is_file(), f"the workers wrote no {path.name}\n{tails(self.results)}"
        with np.load(path) as data:
            return dict(data)

    def json(self, name: str) -> Any:
        path = self.out / f"{name}.json"
        assert path.is_file(), f"the workers wrote no {path.name}\n{tails(self.results)}"
        return json.loads(path.read_text())

    def assert_all_succeeded(self) -> None:
        assert all(r.returncode == 0 for r in self.results), tails(self.results)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("multiprocess")


@pytest.fixture(scope="module")
def save_run(out_dir: Path) -> Launch:
    return Launch(out_dir, "save", processes=2, devices=4)


@pytest.fixture(scope="module")
def four_run(out_dir: Path, save_run: Launch) -> Launch:
    return Launch(out_dir, "four", processes=4, devices=2)


@pytest.fixture(scope="module")
def single_run(out_dir: Path, save_run: Launch) -> Launch:
    return Launch(out_dir, "single", processes=1, devices=8)


def _reference(steps: int) -> dict[str, np.ndarray]:
    params, state = worker.reference(steps)
    return {**worker.flatten(params, "params"), **worker.flatten(state, "state")}


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    """The single-device run's params and state after STEPS steps."""
    return _reference(STEPS)


def assert_bitwise(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: other leaves than the single-device run"
    differ = [key for key in want if not np.array_equal(got[key], want[key])]
    assert not differ, f"{what}: not bitwise equal to the single-device run in {differ}"
    # the run must have moved away from the start, or equality would prove little
    assert not np.array_equal(got["params['w']"], worker.init_params()["w"])


# --------------------------------------------------------------------------- data parallelism and zero1


@needs_peer_timeouts
def test_data_parallel_across_processes_is_bitwise_the_single_device_run(
    save_run: Launch, four_run: Launch, expected: dict[str, np.ndarray]
) -> None:
    assert_bitwise(save_run.npz("dp_2x4"), expected, "2 processes x 4 devices")
    assert_bitwise(four_run.npz("dp_4x2"), expected, "4 processes x 2 devices")
    four_run.assert_all_succeeded()


@needs_peer_timeouts
@pytest.mark.parametrize(("name", "processes"), [("holdings_2x4", 2), ("holdings_4x2", 4), ("holdings_mesh42", 2)])
def test_zero1_each_process_holds_only_its_own_shards(
    save_run: Launch, four_run: Launch, name: str, processes: int
) -> None:
    run = four_run if name == "holdings_4x2" else save_run
    facts = [run.json(f"{name}_p{i}") for i in range(processes)]
    blocks: list[tuple[tuple[int, int], ...]] = []
    rows, cols = worker.FEATURES, worker.OUTPUTS
    for i, fact in enumerate(facts):
        assert (fact["process"], fact["processes"]) == (i, processes)
        total = fact["big_total_bytes"]
        assert total == rows * cols * 4
        assert fact["big_local_bytes"] * processes == total, fact
        # the params stay replicated along the data axis: a whole copy (or its model slice) on every device
        model = 2 if name == "holdings_mesh42" else 1
        assert fact["param_w_local_bytes"] == fact["local_devices"] * total // model
        local_state, total_state = fact["state_bytes"]
        assert local_state < total_state
        blocks += [tuple(tuple(dim) for dim in block) for block in fact["big_blocks"]]
    # the processes' blocks are disjoint and together cover the leaf
    assert len(blocks) == len(set(blocks))
    covered = np.zeros((rows, cols), int)
    for (r0, r1), (c0, c1) in blocks:
        covered[r0:r1, c0:c1] += 1
    assert np.all(covered == 1), name


# --------------------------------------------------------------------------- orbax across topologies


@needs_peer_timeouts
def test_checkpoint_of_2_processes_restores_on_4_processes(save_run: Launch, four_run: Launch) -> None:
    assert_bitwise(four_run.npz("restored_at_save_4x2"), _reference(SAVE_AT), "the checkpoint restored on 4 x 2")


@needs_peer_timeouts
@pytest.mark.parametrize(
    ("launch", "name"),
    [("four_run", "restore_4x2"), ("single_run", "restore_1x8"), ("save_run", "restore_2x4_mesh42")],
    ids=["4_processes", "1_process_8_devices", "2_processes_data_x_model_mesh"],
)
def test_checkpoint_of_2_processes_resumes_bitwise_on_other_topologies(
    request: pytest.FixtureRequest, launch: str, name: str, expected: dict[str, np.ndarray]
) -> None:
    run: Launch = request.getfixturevalue(launch)
    assert_bitwise(run.npz(name), expected, f"resumed from step {SAVE_AT} ({name})")
    if launch != "save_run":
        run.assert_all_succeeded()


# --------------------------------------------------------------------------- a process dies


@needs_peer_timeouts
def test_killed_process_peers_exit_by_themselves_and_a_fresh_launch_resumes(
    save_run: Launch, four_run: Launch, expected: dict[str, np.ndarray]
) -> None:
    first, killed = save_run.results
    assert killed.returncode == -signal.SIGKILL, tails(save_run.results)
    assert "SIGKILL at step" in killed.stdout
    assert "phases done" in first.stdout, tails(save_run.results)
    assert "killed run finished" not in first.stdout
    # the survivor aborts by itself (jax.distributed's heartbeat), long before the launcher's limit
    assert not first.timed_out, tails(save_run.results)
    assert first.returncode != 0
    assert first.seconds - killed.seconds < EXIT_BOUND, tails(save_run.results)
    assert four_run.json("fault_resumed_at") == KILL_AT // EVERY * EVERY
    assert_bitwise(four_run.npz("fault_resume_4x2"), expected, "resumed after the kill")


# --------------------------------------------------------------------------- the launcher


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def _gone(pid: int) -> bool:
    """The process has ended (it may linger as a zombie until its new parent reaps it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def _wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


GRANDCHILD = """
    import os, subprocess, sys, json
    child = subprocess.Popen(["sleep", "60"])
    print(json.dumps({{"grandchild": child.pid, "env": dict(os.environ)}}), flush=True)
    {rest}
"""


def test_launch_sets_the_worker_environment_and_kills_leftovers(tmp_path: Path) -> None:
    env = {
        **_env(),
        "HTTPS_PROXY": "http://proxy",
        "no_proxy": "x",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=9",
    }
    script = _script(tmp_path, GRANDCHILD.format(rest="sys.exit(3)"))
    start = time.monotonic()
    results = multihost.launch([script], processes=2, devices=3, timeout=30, peer_timeout=7, env=env)
    assert time.monotonic() - start < 20  # it did not wait for the grandchildren's sleep
    coordinators = set()
    for i, result in enumerate(results):
        assert (result.process_id, result.returncode, result.timed_out) == (i, 3, False), result.stderr
        seen = json.loads(result.stdout)
        child_env = seen["env"]
        assert not [key for key in child_env if key.lower().endswith("_proxy")]
        assert child_env["JAX_PLATFORMS"] == "cpu"
        assert child_env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"
        assert child_env[multihost.PROCESS_ID_ENV] == str(i)
        assert child_env[multihost.NUM_PROCESSES_ENV] == "2"
        assert child_env[multihost.PEER_TIMEOUT_ENV] == "7"
        coordinators.add(child_env[multihost.COORDINATOR_ENV])
        assert _wait_gone(seen["grandchild"]), "the worker's process group outlived the launch"
    assert len(coordinators) == 1
    assert coordinators.pop().startswith("127.0.0.1:")


def test_launch_kills_workers_at_the_time_limit(tmp_path: Path) -> None:
    script = _script(tmp_path, GRANDCHILD.format(rest="import time; time.sleep(60)"))
    start = time.monotonic()
    (result,) = multihost.launch([script], processes=1, devices=1, timeout=3, env=_env())
    assert time.monotonic() - start < 15
    assert result.timed_out
    assert result.returncode == -signal.SIGKILL
    seen = json.loads(result.stdout)
    assert multihost.COORDINATOR_ENV not in seen["env"]  # a single process runs without jax.distributed
    assert _wait_gone(seen["grandchild"])


# --------------------------------------------------------------------------- the example


@needs_peer_timeouts
def test_example_survives_a_killed_process_and_resumes() -> None:
    stream = io.StringIO()
    argv = ["--processes", "2", "--devices", "2", "--steps", "12", "--checkpoint-every", "4", "--kill-at", "6"]
    argv += ["--batch-size", "16", "--peer-timeout", str(PEER_TIMEOUT), "--timeout", str(LAUNCH_TIMEOUT)]
    status = multihost.main(argv, stream=stream)
    text = stream.getvalue()
    assert status == 0, text
    assert "process 1 was killed (status -9)" in text, text
    assert "process 0 exited by itself" in text, text
    assert "resumed from the checkpoint at step 4" in text, text
    assert text.count("optimizer state on this process's 2 devices") == 4, text  # 2 processes, 2 launches
    assert "final loss on the whole training set after 12 steps" in text, text
