"""Bounds and categories that are not public never shape a released number, and refusals do not tell
a hidden domain from no domain (review 11.3: AVG over an empty filter returned the hidden clamp bounds)."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox.dp.mock import design_mock
from sandbox.dp.plan import DatasetPrivacy, plan_query, public_bounds
from sandbox.errors import Invalid

CARD: dict[str, Any] = {
    "name": "ward", "privacy_unit": "pid", "privacy_unit_rows": "one",
    "columns": {
        "pid": {"type": "string"},
        "age": {"type": "integer", "bounds": [0, 100], "public": True},
        # the same shapes twice: once with a hidden domain, once with none
        "hidden_weight": {"type": "float", "bounds": [40.5, 120.25]},
        "plain_weight": {"type": "float"},
        "hidden_dose": {"type": "integer", "bounds": [3, 7]},
        "plain_dose": {"type": "integer"},
        "hidden_unit": {"type": "string", "categories": ["icu", "ward"]},
        "plain_unit": {"type": "string"},
    },
}
DATASET = DatasetPrivacy.from_card(CARD)
T = "ward"

SHAPES = [
    "SELECT SUM({c}) FROM ward", "SELECT AVG({c}) FROM ward", "SELECT MEDIAN({c}) FROM ward",
    "SELECT QUANTILE_CONT({c}, 0.9) FROM ward", "SELECT VARIANCE({c}) FROM ward", "SELECT STDDEV_POP({c}) FROM ward",
    "SELECT COUNT({c}) FROM ward", "SELECT COUNT(*) FROM ward WHERE {c} > 5",
    "SELECT COUNT(*) FROM ward WHERE {c} BETWEEN 1 AND 2", "SELECT COUNT(*) FROM ward WHERE {c} IS NULL",
    "SELECT AVG(age) FROM ward WHERE {c} > 1000",
]


def _refusal(sql: str) -> str:
    with pytest.raises(Invalid) as refused:
        plan_query(sql, DATASET)
    assert refused.value.status == 422
    return refused.value.detail + " | " + " | ".join(refused.value.errors)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("hidden", "plain"), [("hidden_weight", "plain_weight"), ("hidden_dose", "plain_dose")])
def test_a_hidden_bound_is_refused_exactly_like_no_bound(shape: str, hidden: str, plain: str) -> None:
    with_hidden = _refusal(shape.format(c=hidden))
    with_none = _refusal(shape.format(c=plain))
    assert hidden in with_hidden, f"the refusal does not name the column that needs a public bound: {with_hidden}"
    assert "public" in with_hidden.lower(), with_hidden
    assert with_hidden.replace(hidden, "X") == with_none.replace(plain, "X"), (
        f"the refusal tells a hidden domain from none:\n{with_hidden}\n{with_none}")


def test_hidden_categories_are_refused_in_where_exactly_like_none() -> None:
    with_hidden = _refusal("SELECT COUNT(*) FROM ward WHERE hidden_unit = 'icu'")
    with_none = _refusal("SELECT COUNT(*) FROM ward WHERE plain_unit = 'icu'")
    assert with_hidden.replace("hidden_unit", "X") == with_none.replace("plain_unit", "X")


def test_hidden_bounds_never_reach_the_engine() -> None:
    """Even a plan built by hand around the checker cannot clamp to, or report, a hidden bound."""
    with pytest.raises(Invalid, match="hidden_weight"):
        public_bounds(DATASET, "hidden_weight")
    assert public_bounds(DATASET, "age") == (0.0, 100.0)


def test_mock_notes_do_not_say_which_columns_have_hidden_domains() -> None:
    schema = [(name, spec["type"]) for name, spec in CARD["columns"].items()]
    notes = " ".join(design_mock(CARD, schema, bins=10).notes)
    assert "not marked public" not in notes and "not revealed" not in notes, notes
    for hidden, plain in (("hidden_weight", "plain_weight"), ("hidden_dose", "plain_dose"),
                          ("hidden_unit", "plain_unit")):
        assert notes.count(hidden) == notes.count(plain), f"the mock's notes single out {hidden}: {notes}"
