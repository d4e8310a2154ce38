"""Internal column names are a reserved namespace no card may declare (review 11.2)."""

from __future__ import annotations

import copy

import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, demo_card

from sandbox.catalog.cards import DatasetCard, card_errors, is_reserved_column
from sandbox.dp import duckdb_engine

COLLIDING = ["_dp_unit_rank", duckdb_engine.RANK_COLUMN, duckdb_engine.RANK_COLUMN.upper(), "_rank", "__x",
             "file_row_number", "FILE_ROW_NUMBER", "filename", "file_index", "rowid", "_"]


@pytest.mark.parametrize("name", COLLIDING)
def test_a_card_declaring_a_reserved_name_is_refused(name: str) -> None:
    body = copy.deepcopy(demo_card())
    body["columns"][name] = {"type": "integer", "bounds": [0, 10], "public": True}
    errors = card_errors(DatasetCard.model_validate(body))
    assert any(repr(name) in e and "reserved" in e for e in errors), f"{name!r} was accepted: {errors}"


def test_the_engine_rank_column_is_in_the_reserved_namespace() -> None:
    assert is_reserved_column(duckdb_engine.RANK_COLUMN)
    assert not is_reserved_column("age") and not is_reserved_column("rank") and not is_reserved_column("file_rows")


def test_names_differing_only_in_case_are_refused() -> None:
    body = copy.deepcopy(demo_card())
    body["columns"]["AGE"] = {"type": "integer", "bounds": [0, 10], "public": True}
    errors = card_errors(DatasetCard.model_validate(body))
    assert any("'age'" in e and "case" in e for e in errors), errors


@pytest.mark.parametrize("name", ["_dp_unit_rank", duckdb_engine.RANK_COLUMN, "File_Row_Number"])
def test_the_api_refuses_a_reserved_column_with_422(api: TestClient, tokens: Tokens, name: str) -> None:
    body = copy.deepcopy(demo_card())
    body["columns"][name] = {"type": "integer"}
    response = api.post("/v1/datasets", json=body, headers=auth(tokens.steward()))
    assert response.status_code == 422, response.text
    assert name in response.text and "reserved" in response.text, response.text
