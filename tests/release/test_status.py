"""Output status moves only as the table allows: released and blocked are final."""

from __future__ import annotations

import pytest

from sandbox.errors import Conflict
from sandbox.release.status import OutputStatus, next_status


@pytest.mark.parametrize("target", ["released", "blocked"])
def test_review_decides(target: str) -> None:
    assert next_status("in_review", target) is OutputStatus(target)


@pytest.mark.parametrize(("current", "target"), [("released", "in_review"), ("released", "blocked"),
                                                 ("blocked", "released"), ("blocked", "in_review"),
                                                 ("in_review", "in_review")])
def test_final_states_stay_final(current: str, target: str) -> None:
    with pytest.raises(Conflict, match=f"a {current} output cannot become {target}"):
        next_status(current, target)
