"""Fixtures for tests that run jobs on the real Docker engine."""

from jobworld import analysis_image, job_world

__all__ = ["analysis_image", "job_world"]

import pytest


@pytest.fixture
def database_url() -> None:
    """Containment does not depend on the store: the hostile suite runs on SQLite only."""
    return None
