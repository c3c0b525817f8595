"""Multi-process (multi-controller) training with ``jax.distributed``, run on one machine.

``python -m rmsprop_jax.multihost --processes 2 --devices 4`` starts two JAX
processes on this machine, each with four simulated CPU devices, and trains
the digits MLP of `rmsprop_jax.demo` data-parallel over all eight devices:
the params are replicated, every step's batch is split over a 1-D ``data``
mesh axis that spans the processes, and the optimizer is
``zero1(rmsprop(lr, momentum=0.9), params)``, so each process holds only its
own slice of the optimizer state (it prints how many bytes). Checkpoints are
written with orbax every ``--checkpoint-every`` steps and a run restarts from
the latest one. With ``--kill-at STEP`` process 1 kills itself (SIGKILL) at
that step; the other processes then abort by themselves after the
``jax.distributed`` heartbeat / shutdown timeout, and the command starts the
job once more, which resumes from the last complete checkpoint.

Besides the example, the module has two parts:

* `launch` (the launcher) starts N worker processes with the environment
  ``jax.distributed`` needs on a CPU machine, bounds the whole launch by a
  wall-clock limit, kills the process groups it started (and only those),
  and returns each process's exit status and output;
* `initialize` (worker side) calls ``jax.distributed.initialize`` from the
  environment that `launch` sets, with short timeouts so that a dead peer
  surfaces in seconds rather than minutes.

Any script can be a worker: call `initialize` before any JAX computation and
launch it with ``launch(["path/to/script.py", ...], processes, devices, timeout)``.

The example needs scikit-learn and orbax-checkpoint (the ``multihost``
extra); they are imported only when it runs, so importing this module needs
neither.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import IO, Any, NamedTuple

from rmsprop_jax import _cli

__all__ = [
    "INSTALL_HINT",
    "Result",
    "free_port",
    "initialize",
    "launch",
    "main",
    "run_worker",
    "state_bytes",
    "worker_env",
]

INSTALL_HINT = 'The multihost example needs scikit-learn and orbax-checkpoint: pip install "rmsprop-jax[multihost]"'

# Environment variables that `launch` sets for each worker and `initialize` reads.
COORDINATOR_ENV = "RMSPROP_JAX_COORDINATOR"
NUM_PROCESSES_ENV = "RMSPROP_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "RMSPROP_JAX_PROCESS_ID"
PEER_TIMEOUT_ENV = "RMSPROP_JAX_PEER_TIMEOUT"

# Seconds: how long the processes wait for each other to start, and after how
# long without a heartbeat (or at shutdown, without the others) a process
# gives up on a peer. jax's own defaults are 100-300 s.
INITIALIZATION_TIMEOUT = 30
DEFAULT_PEER_TIMEOUT = 30

DEFAULT_STEPS = 200
DEFAULT_CHECKPOINT_EVERY = 50
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 1e-3
DEFAULT_HIDDEN = 64
DEFAULT_SEED = 0
DEFAULT_TIMEOUT = 300.0

_FORCE_DEVICES_FLAG = "--xla_force_host_platform_device_count"
_POLL_S = 0.05


class Result(NamedTuple):
    """How one worker process of a `launch` ended.

    Attributes:
      process_id: the ``jax.process_index()`` it was given.
      returncode: its exit status; negative means killed by that signal
        (``-9``: SIGKILL, ``-6``: SIGABRT, as when ``jax.distributed`` gives
        up on a dead peer).
      stdout: everything it wrote to standard output.
      stderr: everything it wrote to standard error.
      seconds: when it exited, in seconds after the launch started.
      timed_out: True when the launcher killed it at the wall-clock limit;
        False when it exited by itself.
    """

    process_id: int
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool


# --------------------------------------------------------------------------- launcher


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it for a socket bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _xla_flags(existing: str, devices: int) -> str:
    kept = [flag for flag in existing.split() if not flag.startswith(_FORCE_DEVICES_FLAG)]
    return " ".join([*kept, f"{_FORCE_DEVICES_FLAG}={devices}"])


def worker_env(
    base: Mapping[str, str],
    *,
    process_id: int,
    processes: int,
    devices: int,
    coordinator: str | None,
    peer_timeout: int = DEFAULT_PEER_TIMEOUT,
) -> dict[str, str]:
    """The environment of one worker: `base` on the CPU platform with `devices` devices, no proxies.

    Every ``*_proxy`` / ``*_PROXY`` variable is removed (a proxy can hang the
    connection to the coordinator), any ``--xla_force_host_platform_device_count``
    in ``XLA_FLAGS`` is replaced, and ``JAX_NUM_CPU_DEVICES`` is dropped so
    that it cannot disagree. With a `coordinator` (``"host:port"``) the
    variables that `initialize` reads are set.

    Example:
      >>> env = worker_env({"https_proxy": "x", "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --a"},
      ...                  process_id=1, processes=2, devices=4, coordinator="127.0.0.1:1234")
      >>> "https_proxy" in env, env["XLA_FLAGS"], env["JAX_PLATFORMS"], env["RMSPROP_JAX_PROCESS_ID"]
      (False, '--a --xla_force_host_platform_device_count=4', 'cpu', '1')
    """
    env = {key: value for key, value in base.items() if not key.lower().endswith("_proxy")}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    for key in (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV, PEER_TIMEOUT_ENV):
        env.pop(key, None)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = _xla_flags(env.get("XLA_FLAGS", ""), devices)
    if coordinator is not None:
        env[COORDINATOR_ENV] = coordinator
        env[NUM_PROCESSES_ENV] = str(processes)
        env[PROCESS_ID_ENV] = str(process_id)
        env[PEER_TIMEOUT_ENV] = str(peer_timeout)
    return env


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(pgid, signal.SIGKILL)


def _has_exited(child: subprocess.Popen[bytes]) -> bool:
    """Whether `child` has exited, if possible without reaping it (so that its pid, the id of its
    process group, stays reserved until the group is killed)."""
    if hasattr(os, "waitid") and hasattr(os, "WNOWAIT"):
        return os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    return child.poll() is not None


def launch(
    python_args: Sequence[str],
    processes: int,
    devices: int,
    timeout: float,
    *,
    peer_timeout: int = DEFAULT_PEER_TIMEOUT,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> list[Result]:
    """Runs `processes` JAX processes of ``python <python_args>`` on this machine, as one cluster.

    Each worker runs ``sys.executable`` with `python_args` (e.g.
    ``["-m", "rmsprop_jax.multihost", "--worker"]`` or ``["script.py", "--flag"]``)
    in its own session (so in its own process group), with the environment of
    `worker_env`: the CPU platform with `devices` devices, no proxies, and,
    when `processes` > 1, the coordinator address (a free port on
    127.0.0.1), the process count and its process id for `initialize`. A
    single process gets no coordinator, so it runs without ``jax.distributed``.

    The launch returns when every worker has exited, or at `timeout` seconds
    after it started, when the remaining ones are killed. Whenever a worker
    exits, and for every one at the end, its whole process group is killed
    (SIGKILL), so nothing it started outlives the launch; no other process is
    signalled. Output is captured in temporary files, so a chatty worker
    cannot block on a full pipe. POSIX only (process groups).

    Args:
      python_args: the arguments of the Python interpreter for every worker.
      processes: how many processes (>= 1).
      devices: CPU devices per process (>= 1).
      timeout: wall-clock limit of the whole launch, in seconds.
      peer_timeout: the heartbeat and shutdown timeout, in seconds, that
        `initialize` passes to ``jax.distributed.initialize`` (at most 30 is
        sensible: after a peer dies the others abort about this long later).
      env: the environment to start from; None means ``os.environ``.
      cwd: the workers' working directory; None means the current one.

    Returns:
      One `Result` per process, in process-id order.
    """
    if processes < 1 or devices < 1:
        raise ValueError(f"processes and devices must be >= 1, got {processes} and {devices}.")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout}.")

    base = os.environ if env is None else env
    coordinator = f"127.0.0.1:{free_port()}" if processes > 1 else None
    start = time.monotonic()
    deadline = start + timeout
    children: list[subprocess.Popen[bytes]] = []
    outputs: list[tuple[IO[bytes], IO[bytes]]] = []
    ended: dict[int, tuple[float, bool]] = {}
    with contextlib.ExitStack() as files:
        try:
            for i in range(processes):
                out = files.enter_context(tempfile.TemporaryFile())
                err = files.enter_context(tempfile.TemporaryFile())
                outputs.append((out, err))
                children.append(
                    subprocess.Popen(
                        [sys.executable, *python_args],
                        env=worker_env(
                            base,
                            process_id=i,
                            processes=processes,
                            devices=devices,
                            coordinator=coordinator,
                            peer_timeout=peer_timeout,
                        ),
                        cwd=cwd,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                        start_new_session=True,
                    )
                )
            while len(ended) < len(children):
                now = time.monotonic()
                for i, child in enumerate(children):
                    if i in ended:
                        continue
                    timed_out = now >= deadline
                    if not timed_out and not _has_exited(child):
                        continue
                    # A session leader's process group id is its pid.
                    _kill_group(child.pid)
                    child.wait()
                    ended[i] = (time.monotonic() - start, timed_out)
                if len(ended) < len(children):
                    time.sleep(_POLL_S)
        finally:
            for child in children:
                if child.returncode is None:
                    _kill_group(child.pid)
                    child.wait()
        results = []
        for i, (child, handles) in enumerate(zip(children, outputs, strict=True)):
            texts = []
            for handle in handles:
                handle.seek(0)
                texts.append(handle.read().decode(errors="replace"))
            seconds, timed_out = ended[i]
            assert child.returncode is not None
            results.append(Result(i, child.returncode, texts[0], texts[1], seconds, timed_out))
    return results


# --------------------------------------------------------------------------- worker side


def initialize(environ: Mapping[str, str] | None = None) -> bool:
    """Joins the cluster that `launch` set up; call it first in a worker, before any JAX computation.

    Reads the coordinator address, process count, process id and peer
    timeout from the environment and calls ``jax.distributed.initialize``
    with the coordinator bound to that address only (127.0.0.1 for `launch`,
    not every interface), an initialization timeout of
    `INITIALIZATION_TIMEOUT` seconds and heartbeat and shutdown timeouts of
    the peer timeout (jax < 0.7 takes no such timeouts and keeps its own,
    minutes long). Without a coordinator in the environment (a single
    process) it does nothing.

    Returns:
      True when ``jax.distributed`` was initialized.
    """
    environ = os.environ if environ is None else environ
    coordinator = environ.get(COORDINATOR_ENV)
    if not coordinator:
        return False
    import jax

    from rmsprop_jax import _compat

    peer_timeout = int(environ.get(PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT))
    timeouts: dict[str, Any] = (
        {"heartbeat_timeout_seconds": peer_timeout, "shutdown_timeout_seconds": peer_timeout}
        if _compat.DISTRIBUTED_TIMEOUTS
        else {}
    )
    jax.distributed.initialize(
        coordinator_address=coordinator,
        coordinator_bind_address=coordinator,
        num_processes=int(environ[NUM_PROCESSES_ENV]),
        process_id=int(environ[PROCESS_ID_ENV]),
        initialization_timeout=INITIALIZATION_TIMEOUT,
        **timeouts,
    )
    return True


# --------------------------------------------------------------------------- the example


def _import_extras() -> tuple[ModuleType, ModuleType]:
    """scikit-learn's datasets and orbax.checkpoint, or an ImportError saying how to get them."""
    try:
        import orbax.checkpoint as ocp
        import sklearn.datasets
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} (missing: {error.name}).") from error
    return sklearn.datasets, ocp


def state_bytes(tree: Any) -> tuple[int, int]:
    """(bytes of `tree` held by this process's devices, bytes of the whole tree unsharded).

    The first counts every addressable shard, so a leaf replicated over this
    process's 4 devices counts 4 times; the second counts each leaf once.
    """
    import jax

    local = total = 0
    for leaf in jax.tree.leaves(tree):
        local += sum(shard.data.nbytes for shard in leaf.addressable_shards)
        total += leaf.nbytes
    return local, total


def run_worker(
    *,
    steps: int,
    checkpoint_every: int,
    directory: str,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    hidden: int = DEFAULT_HIDDEN,
    seed: int = DEFAULT_SEED,
    kill_at: int | None = None,
) -> float:
    """One process of the example: trains the digits MLP data-parallel, checkpointing to `directory`.

    Call it in every process of a cluster (after `initialize`) or in a
    single process. It resumes from the latest checkpoint in `directory`
    when there is one. Returns the final loss on the whole training set.
    """
    datasets, ocp = _import_extras()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import rmsprop_jax
    from rmsprop_jax import demo
    from rmsprop_jax.sharding import abstract_state, zero1

    me, n_devices = jax.process_index(), jax.device_count()
    if batch_size % n_devices:
        raise ValueError(f"batch size {batch_size} is not a multiple of the {n_devices} devices.")

    def say(text: str, everyone: bool = False) -> None:
        if everyone or me == 0:
            print(f"[process {me}] {text}", flush=True)

    data = demo.load_data(datasets, seed)
    x_train, y_train = np.asarray(data.x_train), np.asarray(data.y_train)
    idx = demo.batch_indices(x_train.shape[0], steps, batch_size, seed)

    mesh = jax.make_mesh((n_devices,), ("data",))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    host_params = jax.tree.map(np.asarray, demo.init_mlp(jax.random.key(seed), (64, hidden, 10)))
    param_structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), host_params)
    tx = zero1(rmsprop_jax.rmsprop(lr, momentum=0.9), param_structs, axis="data")

    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(os.path.abspath(directory), options=options) as manager:
        start = manager.latest_step()
        if start is None:
            start = 0
            params = jax.device_put(host_params, replicated)  # every process passes the same values
            opt_state = tx.init(host_params)
        else:
            target = {"params": param_structs, "opt_state": abstract_state(tx, param_structs)}
            restored = manager.restore(start, args=ocp.args.StandardRestore(target))
            params, opt_state = restored["params"], restored["opt_state"]
            say(f"resumed from the checkpoint at step {start}")

        local, total = state_bytes(opt_state)
        say(
            f"optimizer state on this process's {jax.local_device_count()} devices: {local} bytes "
            f"(unsharded: {total} bytes, {local / total:.3f} of it)",
            everyone=True,
        )

        @jax.jit
        def train_step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
            loss, grads = jax.value_and_grad(demo.loss_fn)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        def global_batch(step: int) -> tuple[jax.Array, jax.Array]:
            rows = idx[step]  # every process builds only the rows of its own devices
            x = jax.make_array_from_callback((batch_size, 64), split, lambda i: x_train[rows][i])
            y = jax.make_array_from_callback((batch_size,), split, lambda i: y_train[rows][i])
            return x, y

        log_every = max(1, steps // 10)
        for step in range(start, steps):
            if kill_at is not None and step == kill_at and me == 1:
                say(f"killing myself (SIGKILL) at step {step}", everyone=True)
                os.kill(os.getpid(), signal.SIGKILL)
            params, opt_state, loss = train_step(params, opt_state, *global_batch(step))
            done = step + 1
            if done % log_every == 0 or done == steps:
                say(f"step {done}: batch loss {float(loss.addressable_data(0)):.4f}")
            if done % checkpoint_every == 0 or done == steps:
                manager.save(done, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}), force=True)
                say(f"saved the checkpoint of step {done}")
        manager.wait_until_finished()

    local_params = jax.tree.map(lambda a: a.addressable_data(0), params)
    final = float(demo.loss_fn(local_params, jnp.asarray(x_train), jnp.asarray(y_train)))
    say(f"final loss on the whole training set after {steps} steps: {final:.6g}")
    return final


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m rmsprop_jax.multihost``."""
    parser = argparse.ArgumentParser(
        prog="python -m rmsprop_jax.multihost",
        description="Train the digits MLP data-parallel over several JAX processes on this machine, with "
        "rmsprop_jax's ZeRO-1 optimizer state and orbax checkpoints (needs the multihost extra).",
    )
    parser.add_argument("--processes", type=_cli.positive_int, default=2, help="JAX processes (default: %(default)s)")
    parser.add_argument(
        "--devices", type=_cli.positive_int, default=4, help="CPU devices per process (default: %(default)s)"
    )
    parser.add_argument(
        "--steps", type=_cli.positive_int, default=DEFAULT_STEPS, help="training steps (default: %(default)s)"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=_cli.positive_int,
        default=DEFAULT_CHECKPOINT_EVERY,
        help="save a checkpoint every this many steps (default: %(default)s)",
    )
    parser.add_argument(
        "--dir", default=None, help="checkpoint directory; a run resumes from its latest step (default: a temp dir)"
    )
    parser.add_argument(
        "--timeout",
        type=_cli.positive_float,
        default=DEFAULT_TIMEOUT,
        help="wall-clock limit of each launch in seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--kill-at",
        type=int,
        default=None,
        metavar="STEP",
        help="process 1 kills itself (SIGKILL) at this step; the job is then started once more and resumes",
    )
    parser.add_argument(
        "--batch-size",
        type=_cli.positive_int,
        default=DEFAULT_BATCH_SIZE,
        help="global batch size, a multiple of processes x devices (default: %(default)s)",
    )
    parser.add_argument(
        "--lr", type=_cli.positive_float, default=DEFAULT_LR, help="learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--peer-timeout",
        type=_cli.positive_int,
        default=DEFAULT_PEER_TIMEOUT,
        help="seconds after which the processes give up on a dead peer (default: %(default)s)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def _worker_args(args: argparse.Namespace, directory: str, kill_at: int | None) -> list[str]:
    argv = ["-m", "rmsprop_jax.multihost", "--worker", "--dir", directory]
    argv += ["--steps", str(args.steps), "--checkpoint-every", str(args.checkpoint_every)]
    argv += ["--batch-size", str(args.batch_size), "--lr", repr(args.lr)]
    if kill_at is not None:
        argv += ["--kill-at", str(kill_at)]
    return argv


def _why(stderr: str) -> str:
    """The line of a worker's stderr that says why it ended: a fatal log line, else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.lstrip().startswith("@")]
    fatal = [line for line in lines if line.startswith("F") and "Terminating process" in line]
    return (fatal or lines or ["(no stderr)"])[0 if fatal else -1]


def _show(results: list[Result], stream: IO[str]) -> None:
    for result in results:
        for line in result.stdout.splitlines():
            if "peer ranks" not in line:  # gloo's connection notices
                print(line, file=stream)
        if result.returncode != 0:
            print(f"  (process {result.process_id} ended with status {result.returncode})", file=stream)
            print("    " + _why(result.stderr), file=stream)


def _describe(results: list[Result], killed: int) -> str:
    dead = results[killed]
    lines = [f"process {killed} was killed (status {dead.returncode}) {dead.seconds:.1f} s into the launch"]
    for result in results:
        if result.process_id == killed:
            continue
        how = "was killed by the launcher at the time limit" if result.timed_out else "exited by itself"
        lines.append(
            f"process {result.process_id} {how} with status {result.returncode}, "
            f"{result.seconds - dead.seconds:.1f} s after process {killed} died"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, stream: IO[str] | None = None) -> int:
    """Runs the example from the command line `argv`; returns the exit status."""
    args = build_parser().parse_args(argv)
    stream = sys.stdout if stream is None else stream
    if args.worker:
        initialize()
        run_worker(
            steps=args.steps,
            checkpoint_every=args.checkpoint_every,
            directory=args.dir,
            batch_size=args.batch_size,
            lr=args.lr,
            kill_at=args.kill_at,
        )
        return 0
    try:
        _import_extras()  # fail here, once, rather than in every worker
    except ImportError as error:
        raise SystemExit(str(error)) from None
    if args.batch_size % (args.processes * args.devices):
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of {args.processes * args.devices} devices")
    if args.kill_at is not None and not (args.processes > 1 and 0 <= args.kill_at < args.steps):
        raise SystemExit("--kill-at needs at least 2 processes and a step in [0, --steps)")
    directory = args.dir if args.dir is not None else tempfile.mkdtemp(prefix="rmsprop_jax_multihost_")
    try:
        begin = time.monotonic()
        print(
            f"launching {args.processes} processes x {args.devices} CPU devices, checkpoints in {directory}",
            file=stream,
        )
        results = launch(
            _worker_args(args, directory, args.kill_at),
            args.processes,
            args.devices,
            args.timeout,
            peer_timeout=args.peer_timeout,
        )
        _show(results, stream)
        if args.kill_at is not None and results[1].returncode == -signal.SIGKILL:
            print(_describe(results, killed=1), file=stream)
            print("relaunching once to resume from the last complete checkpoint", file=stream)
            results = launch(
                _worker_args(args, directory, None),
                args.processes,
                args.devices,
                args.timeout,
                peer_timeout=args.peer_timeout,
            )
            _show(results, stream)
        status = 0 if all(r.returncode == 0 for r in results) else 1
        print(f"{'done' if status == 0 else 'failed'} in {time.monotonic() - begin:.1f} s", file=stream)
        return status
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
