"""The state diagrams in docs/ are the transition tables: a change to one without the other fails here."""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path

import pytest

from sandbox.jobs.lifecycle import TRANSITIONS as JOB_TRANSITIONS
from sandbox.notebooks.sessions import SESSION_START, SESSION_TRANSITIONS
from sandbox.release.status import TRANSITIONS as OUTPUT_TRANSITIONS

DOC = Path(__file__).resolve().parents[2] / "docs" / "state-diagrams.md"


def arrows(section: str) -> set[tuple[str, str]]:
    text = DOC.read_text().split(f"## {section}", 1)[1].split("```mermaid", 1)[1].split("```", 1)[0]
    return set(re.findall(r"^\s*(\w+|\[\*\]) --> (\w+)\s*$", text, re.M))


def drawn(section: str) -> set[tuple[str, str]]:
    return {(a, b) for a, b in arrows(section) if a != "[*]"}


def pairs(table: Mapping[StrEnum, frozenset[StrEnum]]) -> set[tuple[str, str]]:
    return {(source.value, target.value) for source, targets in table.items() for target in targets}


@pytest.mark.parametrize(("section", "table"), [("Jobs", JOB_TRANSITIONS), ("Outputs", OUTPUT_TRANSITIONS),
                                                ("Notebook sessions", SESSION_TRANSITIONS)])
def test_each_diagram_draws_exactly_its_transition_table(section: str,
                                                         table: Mapping[StrEnum, frozenset[StrEnum]]) -> None:
    assert drawn(section) == pairs(table)


def test_a_session_starts_running_and_moves_only_as_a_job_may() -> None:
    assert {b for a, b in arrows("Notebook sessions") if a == "[*]"} == {SESSION_START.value}
    assert pairs(SESSION_TRANSITIONS) <= pairs(JOB_TRANSITIONS), "a session is a job: its moves are job moves"
