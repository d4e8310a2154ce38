"""The runner exception hierarchy: every Docker or OS failure in a backend surfaces as one of these.

Kept apart from any backend so the scheduler can catch them without importing Docker.
"""

from __future__ import annotations


class RunnerError(Exception):
    """A runner step failed; the message says what, for which job, and why."""


class JobNotPreparedError(RunnerError):
    """The step needs what `prepare()` creates (container, output quota), and it is not there."""
