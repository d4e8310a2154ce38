"""The `server` fixture: a real `sandbox serve` process on a loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cli.server import Server, serving


@pytest.fixture
def server(tmp_path: Path, database_url: str | None) -> Iterator[Server]:
    with serving(tmp_path / "home", database_url) as running:
        yield running


from jobworld import analysis_image, training_image  # noqa: E402

__all__ = ["analysis_image", "server", "training_image"]
