"""Dataset cards: the privacy-metadata rules a steward's card must obey, checked without I/O."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from helpers import demo_card
from pydantic import ValidationError

from sandbox.catalog.cards import DatasetCard, card_errors, public_schema


def card_with(**changes: Any) -> DatasetCard:
    """The demo card with top-level fields replaced."""
    return DatasetCard.model_validate({**demo_card(), **changes})


def card_with_column(name: str, spec: dict[str, Any]) -> DatasetCard:
    body = copy.deepcopy(demo_card())
    body["columns"][name] = spec
    return DatasetCard.model_validate(body)


def errors_about(errors: list[str], needle: str) -> list[str]:
    return [e for e in errors if needle in e]


def test_the_demo_card_is_valid() -> None:
    assert card_errors(card_with()) == []


def test_privacy_unit_must_be_a_declared_column() -> None:
    errors = card_errors(card_with(privacy_unit="household_id"))
    assert errors_about(errors, "'household_id'"), f"an undeclared privacy unit was accepted: {errors}"


def test_privacy_unit_column_cannot_be_public() -> None:
    errors = card_errors(card_with_column("patient_id", {"type": "string", "public": True}))
    assert errors_about(errors, "'patient_id'"), f"a public privacy-unit column was accepted: {errors}"


def test_privacy_unit_column_takes_no_categories() -> None:
    errors = card_errors(card_with_column("patient_id", {"type": "string", "categories": ["P1", "P2"]}))
    assert errors_about(errors, "'patient_id'"), f"categories on the privacy unit were accepted: {errors}"


@pytest.mark.parametrize("column_type", ["string", "boolean", "date", "timestamp"])
def test_bounds_only_on_numeric_columns(column_type: str) -> None:
    errors = card_errors(card_with_column("note", {"type": column_type, "bounds": [0, 10]}))
    assert errors_about(errors, "'note'"), f"bounds on a {column_type} column were accepted: {errors}"


@pytest.mark.parametrize("bounds", [[5, 5], [90, 18], [0.5, -0.5]])
def test_lower_bound_must_be_below_upper(bounds: list[float]) -> None:
    errors = card_errors(card_with_column("weight", {"type": "float", "bounds": bounds}))
    assert errors_about(errors, "'weight'"), f"bounds {bounds} were accepted: {errors}"


@pytest.mark.parametrize("bounds", [[float("-inf"), 10], [0, float("inf")], [float("nan"), 10]])
def test_bounds_must_be_finite(bounds: list[float]) -> None:
    # Infinite bounds make clamping a no-op and the DP sensitivity infinite.
    errors = card_errors(card_with_column("weight", {"type": "float", "bounds": bounds}))
    assert errors_about(errors, "'weight'"), f"non-finite bounds {bounds} were accepted: {errors}"


@pytest.mark.parametrize(("column_type", "categories"), [
    ("integer", ["one", "two"]),
    ("integer", [True, False]),
    ("string", [1, 2]),
    ("boolean", [0, 1]),
    ("boolean", ["yes", "no"]),
    ("float", ["low", "high"]),
    ("date", ["2024-01-01"]),
])
def test_categories_must_fit_the_column_type(column_type: str, categories: list[Any]) -> None:
    errors = card_errors(card_with_column("grade", {"type": column_type, "categories": categories}))
    assert errors_about(errors, "'grade'"), f"categories {categories} on a {column_type} column were accepted"


@pytest.mark.parametrize("categories", [["a", "b", "a"], [1, 2, 2], [True, True]])
def test_categories_must_be_unique(categories: list[Any]) -> None:
    column_type = {str: "string", int: "integer", bool: "boolean"}[type(categories[0])]
    errors = card_errors(card_with_column("grade", {"type": column_type, "categories": categories}))
    assert errors_about(errors, "unique"), f"duplicate categories {categories} were accepted: {errors}"


def test_categories_must_not_be_empty() -> None:
    errors = card_errors(card_with_column("grade", {"type": "string", "categories": []}))
    assert errors_about(errors, "'grade'"), f"an empty category list was accepted: {errors}"


def test_bounds_and_categories_together_are_refused() -> None:
    errors = card_errors(card_with_column("grade", {"type": "integer", "bounds": [0, 5], "categories": [1, 2]}))
    assert errors_about(errors, "not both"), f"bounds plus categories were accepted: {errors}"


@pytest.mark.parametrize("name", ["bad name", "1st", "drop;table", 'quo"te', "dash-ed", "", "x" * 64, "é"])
def test_column_names_are_plain_identifiers(name: str) -> None:
    # Column names end up quoted inside DuckDB SQL; anything but identifiers is refused up front.
    errors = card_errors(card_with_column(name, {"type": "integer"}))
    assert errors_about(errors, repr(name)), f"column name {name!r} was accepted: {errors}"


@pytest.mark.parametrize("pair", [["age", "blood_type"], ["ghost", "age"]])
def test_marginal_pairs_reference_declared_columns(pair: list[str]) -> None:
    unknown = next(c for c in pair if c in {"blood_type", "ghost"})
    errors = card_errors(card_with(marginal_pairs=[pair]))
    assert errors_about(errors, repr(unknown)), f"marginal pair {pair} with an unknown column was accepted"


def test_marginal_pair_of_a_column_with_itself_is_refused() -> None:
    errors = card_errors(card_with(marginal_pairs=[["age", "age"]]))
    assert errors_about(errors, "itself"), errors


def test_every_problem_is_reported_not_only_the_first() -> None:
    body = copy.deepcopy(demo_card())
    body["privacy_unit"] = "nobody"
    body["columns"]["sex"] = {"type": "string", "bounds": [0, 1]}
    body["columns"]["age"] = {"type": "integer", "bounds": [90, 18]}
    body["columns"]["site"] = {"type": "string", "categories": ["a", "a"]}
    body["columns"]["bad name"] = {"type": "integer"}
    body["marginal_pairs"] = [["age", "ghost"]]
    errors = card_errors(DatasetCard.model_validate(body))
    for needle in ("'nobody'", "'sex'", "'age'", "'site'", "'bad name'", "'ghost'"):
        assert errors_about(errors, needle), f"no error names {needle}: {errors}"


@pytest.mark.parametrize("changes", [
    {"name": "Upper"},
    {"name": "../etc"},
    {"privacy_unit": "bad unit"},
    {"title": ""},
    {"columns": {}},
    {"smuggled": True},
])
def test_card_schema_refuses_malformed_fields(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        card_with(**changes)


def test_column_spec_refuses_unknown_keys_and_types() -> None:
    with pytest.raises(ValidationError):
        card_with_column("age", {"type": "integer", "visible_to_buyers": True})
    with pytest.raises(ValidationError):
        card_with_column("age", {"type": "blob"})


def test_public_schema_hides_non_public_bounds_and_categories() -> None:
    card = card_with_column("diagnosis", {"type": "string", "categories": ["ZX-SECRET-1", "ZX-SECRET-2"]})
    body = card.model_dump()
    body["columns"]["income"] = {"type": "float", "bounds": [12345.5, 98765.25]}
    schema = public_schema(DatasetCard.model_validate(body))
    assert schema["diagnosis"] == {"type": "string", "public": False}, "non-public categories leaked"
    assert schema["income"] == {"type": "float", "public": False}, "non-public bounds leaked"
    assert schema["age"]["bounds"] == [18, 90] and schema["sex"]["categories"] == ["F", "M"]
    assert schema["patient_id"] == {"type": "string", "public": False, "description": "pseudonymous patient id"}
