"""The documentation site in docs/: its API reference names every public object.

The site itself is built with warnings as errors by ``.ci/run``
(``sphinx-build -W -b html docs docs/_build/html``); these checks are the
parts a build would not catch.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
MODULES = [
    "rmsprop_jax",
    "rmsprop_jax.presets",
    "rmsprop_jax.interop",
    "rmsprop_jax.sharding",
    "rmsprop_jax.diagnostics",
    "rmsprop_jax.flat",
    "rmsprop_jax.lowmem",
    "rmsprop_jax.formats",
    "rmsprop_jax.multihost",
]


def _documented() -> dict[str, set[str]]:
    """Module -> names listed in the autosummary tables of docs/api.md."""
    documented: dict[str, set[str]] = {}
    module = None
    in_table = False
    for line in (DOCS / "api.md").read_text(encoding="utf-8").splitlines():
        if match := re.match(r"\.\. currentmodule:: (\S+)", line):
            module = match.group(1)
            documented.setdefault(module, set())
        elif line.startswith(".. autosummary::"):
            in_table = True
        elif in_table and line.startswith("   ") and not line.strip().startswith(":"):
            assert module is not None
            documented[module].add(line.strip())
        elif in_table and line.startswith("```"):
            in_table = False
    return documented


@pytest.mark.parametrize("module_name", MODULES)
def test_api_reference_lists_every_public_name(module_name):
    module = importlib.import_module(module_name)
    public = {name for name in module.__all__ if not isinstance(getattr(module, name), type(importlib))}
    public.discard("__version__")  # a string, described in prose
    documented = _documented().get(module_name, set())
    assert public - documented == set(), f"add these to docs/api.md under {module_name}"
    assert documented - public == set(), f"docs/api.md lists names that {module_name}.__all__ does not export"


def test_every_module_with_a_public_api_is_documented():
    package = Path(importlib.import_module("rmsprop_jax").__file__).parent
    with_all = {
        f"rmsprop_jax.{path.stem}"
        for path in package.glob("*.py")
        if not path.stem.startswith("_") and "__all__" in path.read_text(encoding="utf-8")
    }
    assert with_all <= set(MODULES), f"document these modules in docs/api.md: {sorted(with_all - set(MODULES))}"


def test_the_parity_table_is_included_not_copied():
    porting = (DOCS / "porting.md").read_text(encoding="utf-8")
    assert "```{include} parity.md" in porting
    first_row = next(line for line in (DOCS / "parity.md").read_text(encoding="utf-8").splitlines() if line[:2] == "| ")
    assert first_row not in porting
