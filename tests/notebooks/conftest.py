"""Fixtures for the notebook tests."""

from __future__ import annotations

from nbworld import nb_world  # noqa: F401 - the live service fixture, shared with the notebook tests
