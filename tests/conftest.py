"""Shared test settings: hypothesis profiles, and access to the optional reference frameworks ("peers").

Hypothesis profiles: ``ci`` (the default) is derandomized and small enough for
a 2-core machine; ``dev`` draws more, random examples. Pick one with
HYPOTHESIS_PROFILE=dev.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from jax.sharding import PartitionSpec

from rmsprop_jax import parity

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def require_peer_or_skip(name: str) -> types.ModuleType:
    """The peer library `name`; skips the test when it is missing, or fails it
    when the environment variable RMSPROP_JAX_REQUIRE_PEERS is 1 (as in CI)."""
    try:
        return parity.load_peer(name)
    except parity.PeerUnavailable as error:
        if os.environ.get(parity.REQUIRE_PEERS_ENV) == "1":
            pytest.fail(f"peer {name!r} is required ({parity.REQUIRE_PEERS_ENV}=1) but unavailable: {error}")
        pytest.skip(f"peer {name!r} is not available: {error}")


@pytest.fixture
def require_peer() -> Callable[[str], types.ModuleType]:
    """``require_peer("torch")`` returns the module, or skips/fails the test."""
    return require_peer_or_skip


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "notebooks: executes the notebooks in notebooks/ (slow; deselect with -m 'not notebooks')"
    )
    config.addinivalue_line("markers", "multiprocess: launches several JAX processes with jax.distributed (slow)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skips the docstring examples that show a PartitionSpec where jax prints it otherwise.

    They show it as current jax prints it, ``P('data', None)``; older jax
    (0.5.3, the oldest supported) prints ``PartitionSpec('data', None)``.
    """
    if repr(PartitionSpec()) == "P()":
        return
    skip = pytest.mark.skip(reason="the example shows a PartitionSpec as P(...), as newer jax prints it")
    for item in items:
        dtest = getattr(item, "dtest", None)  # the doctest of a docstring example
        if dtest is not None and any("P(" in example.want for example in dtest.examples):
            item.add_marker(skip)
