"""The state diagrams in docs/ are the transition tables: a change to one without the other fails here."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path

import pytest

from sandbox.jobs.lifecycle import TRANSITIONS as JOB_TRANSITIONS
from sandbox.release.status import TRANSITIONS as OUTPUT_TRANSITIONS

DOC = Path(__file__).resolve().parents[2] / "docs" / "state-diagrams.md"


def drawn(section: str) -> set[tuple[str, str]]:
    text = DOC.read_text().split(f"## {section}", 1)[1].split("```mermaid", 1)[1].split("```", 1)[0]
    return {(a, b) for a, b in re.findall(r"^\s*(\w+) --> (\w+)\s*$", text, re.M) if a != "[*]"}


@pytest.mark.parametrize(("section", "table"), [("Jobs", JOB_TRANSITIONS), ("Outputs", OUTPUT_TRANSITIONS)])
def test_each_diagram_draws_exactly_its_transition_table(section: str,
                                                         table: dict[StrEnum, frozenset[StrEnum]]) -> None:
    expected = {(source.value, target.value) for source, targets in table.items() for target in targets}
    assert drawn(section) == expected
