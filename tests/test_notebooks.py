"""The notebooks in notebooks/: they run top to bottom, and their saved outputs are complete and clean.

Executing them takes a while, so those tests are marked ``notebooks``:
``pytest -m "not notebooks"`` skips them. The checks of the saved files are fast
and always run. To refresh the saved outputs after a change, run
``python notebooks/execute.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from types import ModuleType

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(path.name for path in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
PORTING = "03_porting_from_other_frameworks.ipynb"

# Absolute paths of a particular machine have no place in a saved output.
MACHINE_PATH = re.compile(r"(/work/|/tmp/|/home/|/root/|/Users/|/private/|site-packages|[A-Za-z]:\\\\)")


def _executor() -> ModuleType:
    """notebooks/execute.py, loaded as a module (it is a script, not part of the package)."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    spec = importlib.util.spec_from_file_location("notebook_executor", NOTEBOOK_DIR / "execute.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text(value: str | list[str]) -> str:
    """Text as saved in a notebook file: a string or a list of lines."""
    return value if isinstance(value, str) else "".join(value)


def _stream_text(nb) -> str:
    return "".join(_text(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"])


def test_there_are_notebooks():
    assert "01_rmsprop_explained.ipynb" in NOTEBOOKS
    assert "02_training_a_network.ipynb" in NOTEBOOKS


@pytest.mark.notebooks
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    execute = _executor().execute
    if name.startswith("05_"):
        pytest.importorskip("gymnasium")  # the reinforcement-learning notebook's environment (the test extra)
    env = dict(os.environ, RMSPROP_JAX_FIGURE_DIR=str(tmp_path))
    nb = execute(NOTEBOOK_DIR / name, env=env)  # raises CellExecutionError on any failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plot was drawn"
    if name.startswith("01_"):
        figure = tmp_path / "adaptive_step_sizes.png"
        assert figure.read_bytes().startswith(b"\x89PNG"), "notebook 01 did not write the README figure"
    if name == PORTING and os.environ.get("RMSPROP_JAX_REQUIRE_PEERS") == "1":
        assert "Skipped:" not in _stream_text(nb), "a framework comparison was skipped although peers are required"


@pytest.mark.notebooks
@pytest.mark.skipif(PORTING not in NOTEBOOKS, reason="no porting notebook")
def test_porting_notebook_explains_and_skips_without_torch_and_keras(tmp_path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for name in ("torch", "keras"):
        (hidden / f"{name}.py").write_text(f'raise ImportError("No module named {name} (hidden by the test)")\n')
    path = os.pathsep.join(p for p in (str(hidden), os.environ.get("PYTHONPATH", "")) if p)
    nb = _executor().execute(NOTEBOOK_DIR / PORTING, env=dict(os.environ, PYTHONPATH=path))
    text = _stream_text(nb)
    assert "Skipped: PyTorch is not installed" in text
    assert "Skipped: Keras 3 is not installed" in text


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_outputs_are_complete_and_clean(name):
    nb = json.loads((NOTEBOOK_DIR / name).read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    # Run once, top to bottom, in one kernel: execution counts 1, 2, 3, ...
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1))
    outputs = [o for c in code for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert not [o for o in outputs if o.get("name") == "stderr"], "warnings or errors were printed"
    assert any("image/png" in o.get("data", {}) for o in outputs)
    texts = [_stream_text(nb)] + [_text(o.get("data", {}).get("text/plain", "")) for o in outputs]
    found = sorted({m.group(0) for text in texts for m in MACHINE_PATH.finditer(text)})
    assert not found, f"machine-specific paths in the outputs: {found}"
