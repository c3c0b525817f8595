"""Runs the notebooks top to bottom and saves them with their fresh outputs.

    python notebooks/execute.py                        # every notebook
    python notebooks/execute.py 01_rmsprop_explained   # just one (the .ipynb is optional)

Each notebook runs in its own kernel, started with the Python that runs this
script (so it sees the same installed packages), in the notebooks folder as
its working directory. Any error stops with a non-zero exit and leaves the
notebook file untouched. Notebook 01 also writes the README's figure,
``docs/adaptive_step_sizes.png``; set ``RMSPROP_JAX_FIGURE_DIR`` to write it
elsewhere.

Needs nbclient, nbformat and ipykernel (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent
KERNEL_NAME = "rmsprop-jax-notebooks"
CELL_TIMEOUT_S = 600


def notebooks() -> list[Path]:
    """The notebooks, in order."""
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def execute(
    path: Path, *, env: Mapping[str, str] | None = None, timeout: int = CELL_TIMEOUT_S
) -> nbformat.NotebookNode:
    """Executes the notebook at `path` in a fresh kernel and returns it with its outputs.

    Raises ``nbclient.exceptions.CellExecutionError`` when a cell fails and
    ``nbclient.exceptions.CellTimeoutError`` when one runs longer than
    `timeout` seconds. `env` is the kernel's whole environment (default: this
    process's).
    """
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        # A kernel spec pinned to this interpreter: the default "python3" spec
        # may start whichever `python` comes first on PATH.
        spec_dir = Path(tmp, "kernels", KERNEL_NAME)
        spec_dir.mkdir(parents=True)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)",
            "language": "python",
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        specs = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)])
        manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
        client = NotebookClient(
            nb,
            km=manager,
            timeout=timeout,
            record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        kernel_env: dict[str, Any] = dict(os.environ if env is None else env)
        # Plots must come out as images in the notebook, whatever backend the caller uses.
        kernel_env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
        client.execute(env=kernel_env)
    # Keep the standard kernel name in the file, not the private one used here.
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    return nb


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all), with or without .ipynb")
    args = parser.parse_args(argv)
    paths = [NOTEBOOK_DIR / (n if n.endswith(".ipynb") else f"{n}.ipynb") for n in args.names] or notebooks()
    for path in paths:
        start = time.perf_counter()
        nb = execute(path)
        nbformat.write(nb, path)
        print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
