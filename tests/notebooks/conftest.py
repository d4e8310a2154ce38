"""Fixtures for the notebook tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from nbworld import nb_world  # noqa: F401 - the live service fixture, shared with the notebook tests

from sandbox.demo import CARD, write_registry
from sandbox.egress.leaks import FingerprintIndex

# -- a dataset version and its leak-scan index (egress filter tests) -------------------------------------------------


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo registry as a dataset version's parquet file."""
    return write_registry(tmp_path_factory.mktemp("notebook-dataset") / "registry.parquet")


@pytest.fixture(scope="session")
def fingerprints(registry: Path) -> FingerprintIndex:
    """The version's leak-scan index, built as registration builds it."""
    path = registry.with_name("registry.fingerprints")
    FingerprintIndex.build(registry, CARD, path)
    return FingerprintIndex.load(path)


# -- end of the egress filter fixtures -------------------------------------------------------------------------------
