"""The one way a transition table is applied: jobs and outputs each keep their own table. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

from sandbox.errors import Conflict

State = TypeVar("State", bound=StrEnum)


def apply_transition(table: Mapping[State, frozenset[State]], current: State, target: State, *, noun: str) -> State:
    """`target`, if `table` allows it from `current`; otherwise a Conflict naming both and what is allowed."""
    if target not in table[current]:
        allowed = ", ".join(sorted(table[current])) or "nothing (it is final)"
        raise Conflict(f"a {current.value} {noun} cannot become {target.value}; it may become {allowed}")
    return target
