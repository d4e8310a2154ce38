"""Output release status as a transition table, and the one function that applies it. Pure."""

from __future__ import annotations

from enum import StrEnum

from sandbox.transitions import apply_transition


class OutputStatus(StrEnum):
    IN_REVIEW = "in_review"
    RELEASED = "released"
    BLOCKED = "blocked"


S = OutputStatus

# Checks place each file in one of the three; only review moves it on, and release and block are final:
# a released file's bytes are already out, and a blocked one never leaves.
TRANSITIONS: dict[OutputStatus, frozenset[OutputStatus]] = {
    S.IN_REVIEW: frozenset({S.RELEASED, S.BLOCKED}),
    S.RELEASED: frozenset(),
    S.BLOCKED: frozenset(),
}


def next_status(current: OutputStatus | str, target: OutputStatus | str) -> OutputStatus:
    """`target`, if the table allows it from `current`; otherwise a Conflict naming both."""
    return apply_transition(TRANSITIONS, OutputStatus(current), OutputStatus(target), noun="output")


class Origin(StrEnum):
    """Who wrote an output's bytes."""

    PLATFORM = "platform"  # recomputed and written by the platform: a verified table or a DP result
    BUYER = "buyer"  # anything the buyer's code wrote
    LOG = "log"  # the job's stdout and stderr
