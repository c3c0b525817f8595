"""Sphinx configuration of the rmsprop_jax documentation.

Build it with ``pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html``.
The notebooks are rendered with the outputs saved in ``notebooks/`` (they are
executed by the test suite, not here); two pages are executed at build time:
"Getting started", whose outputs are its examples' real results, and
"Benchmarks", which plots ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import rmsprop_jax

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

project = "rmsprop_jax"
author = "The rmsprop_jax authors"
copyright = "2026, The rmsprop_jax authors"
release = rmsprop_jax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# Sphinx reads sources only below docs/, so the notebooks are copied in on every
# build from notebooks/, where they are executed and tested.
NOTEBOOK_COPY = DOCS / "notebooks"
shutil.rmtree(NOTEBOOK_COPY, ignore_errors=True)
NOTEBOOK_COPY.mkdir()
for notebook in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
    shutil.copy2(notebook, NOTEBOOK_COPY / notebook.name)

exclude_patterns = ["_build", "parity.md", "**.ipynb_checkpoints", "jupyter_execute"]
templates_path = ["_templates"]

html_theme = "furo"
html_title = f"rmsprop_jax {release}"
html_static_path: list[str] = []

# Single backticks in the docstrings name Python objects and become links where they resolve.
default_role = "py:obj"
autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
add_module_names = True

myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the notebooks keep the outputs that the test suite checks
nb_execution_raise_on_error = True
nb_execution_timeout = 120

# The state classes describe their fields in an "Attributes:" section; autodoc would list
# the NamedTuple fields a second time ("Alias for field number 0").
napoleon_use_ivar = True


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return skip


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
