"""The job lifecycle as a transition table, and the one function that applies it. Pure."""

from __future__ import annotations

from enum import StrEnum

from sandbox.transitions import apply_transition


class JobState(StrEnum):
    PENDING_APPROVAL = "pending_approval"
    QUEUED = "queued"
    RUNNING = "running"
    CHECKING = "checking"
    IN_REVIEW = "in_review"
    DONE = "done"
    REJECTED = "rejected"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = JobState

# A job that exits non-zero still passes through checking: its logs are outputs, and the buyer
# may only see them once they pass egress. `failed` straight from queued/running means the
# platform could not run it (image gone, container vanished).
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.PENDING_APPROVAL: frozenset({S.QUEUED, S.REJECTED, S.CANCELLED}),
    S.QUEUED: frozenset({S.RUNNING, S.FAILED, S.CANCELLED}),
    # Back to queued only when the platform lost the run (its node went down) and the policy allows a rerun.
    S.RUNNING: frozenset({S.QUEUED, S.CHECKING, S.FAILED, S.CANCELLED}),
    S.CHECKING: frozenset({S.IN_REVIEW, S.DONE, S.FAILED, S.CANCELLED}),
    S.IN_REVIEW: frozenset({S.DONE, S.FAILED, S.CANCELLED}),
    S.DONE: frozenset(),
    S.REJECTED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}

TERMINAL = frozenset(state for state, targets in TRANSITIONS.items() if not targets)
ACTIVE = frozenset({S.RUNNING, S.CHECKING})  # hold resources or a container


def next_state(current: JobState | str, target: JobState | str) -> JobState:
    """`target`, if the table allows it from `current`; otherwise a Conflict naming both."""
    return apply_transition(TRANSITIONS, JobState(current), JobState(target), noun="job")
