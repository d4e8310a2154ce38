"""The transition table: every legal move is allowed, every other one is refused."""

from __future__ import annotations

import itertools

import pytest

from sandbox.errors import Conflict
from sandbox.jobs.lifecycle import TERMINAL, TRANSITIONS, JobState, next_state

LEGAL = {
    ("pending_approval", "queued"), ("pending_approval", "rejected"), ("pending_approval", "cancelled"),
    ("queued", "running"), ("queued", "failed"), ("queued", "cancelled"),
    ("running", "checking"), ("running", "failed"), ("running", "cancelled"), ("running", "queued"),
    ("checking", "in_review"), ("checking", "done"), ("checking", "failed"), ("checking", "cancelled"),
    ("in_review", "done"), ("in_review", "failed"), ("in_review", "cancelled"),
}


@pytest.mark.parametrize(("current", "target"), list(itertools.product(JobState, JobState)))
def test_every_pair(current: JobState, target: JobState) -> None:
    if (current.value, target.value) in LEGAL:
        assert next_state(current, target) is target
    else:
        with pytest.raises(Conflict):
            next_state(current, target)


def test_final_states_have_no_way_out() -> None:
    assert {s.value for s in TERMINAL} == {"done", "rejected", "failed", "cancelled"}
    assert all(not TRANSITIONS[s] for s in TERMINAL)


def test_cancel_is_possible_from_every_live_state() -> None:
    for state in JobState:
        if state not in TERMINAL:
            assert JobState.CANCELLED in TRANSITIONS[state], f"{state} cannot be cancelled"


def test_refusal_names_both_states() -> None:
    with pytest.raises(Conflict, match="a done job cannot become running"):
        next_state("done", "running")
