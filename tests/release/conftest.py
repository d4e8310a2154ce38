"""Fixtures for release tests that run jobs on the real Docker engine."""

from jobworld import analysis_image, job_world

__all__ = ["analysis_image", "job_world"]
