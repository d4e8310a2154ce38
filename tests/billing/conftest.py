"""Fixtures for billing tests: jobs on the real Docker engine, and a real `sandbox serve`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cli.server import Server, serving
from jobworld import analysis_image, job_world

__all__ = ["analysis_image", "job_world", "serve"]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Server]:
    """A real `sandbox serve` (API and embedded worker) on a loopback port, on SQLite: the command line is
    the same on either store, which the API tests cover."""
    with serving(tmp_path / "home") as running:
        yield running
