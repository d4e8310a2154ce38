"""The catalog over HTTP: stewards register cards; buyers see the public card and nothing of the data."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, demo_card, register_demo

from sandbox.demo import write_registry

PROBLEM_JSON = "application/problem+json"


def test_steward_creates_a_dataset(api: TestClient, tokens: Tokens) -> None:
    response = api.post("/v1/datasets", json=demo_card("registry-a"), headers=auth(tokens.steward()))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "registry-a" and body["privacy_unit"] == "patient_id" and body["versions"] == []

    again = api.post("/v1/datasets", json=demo_card("registry-a"), headers=auth(tokens.steward()))
    assert again.status_code == 409, again.text
    assert again.headers["content-type"] == PROBLEM_JSON


def test_only_stewards_create_datasets(api: TestClient, tokens: Tokens) -> None:
    for token in (tokens.buyer(), tokens.auditor(), tokens.admin()):
        response = api.post("/v1/datasets", json=demo_card("sneaky"), headers=auth(token))
        assert response.status_code == 403, response.text
    assert api.post("/v1/datasets", json=demo_card("sneaky")).status_code == 401
    listing = api.get("/v1/datasets", headers=auth(tokens.steward())).json()
    assert listing == [], "a non-steward registered a dataset"


def test_invalid_card_is_refused_with_every_problem_named(api: TestClient, tokens: Tokens) -> None:
    card = copy.deepcopy(demo_card("broken"))
    card["privacy_unit"] = "nobody"
    card["columns"]["sex"] = {"type": "string", "bounds": [0, 1]}
    card["columns"]["age"] = {"type": "integer", "bounds": [90, 18]}
    card["columns"]["site"] = {"type": "string", "categories": ["a", "a"]}
    card["columns"]["stent_type"] = {"type": "string", "categories": []}
    card["columns"]["symptomatic"] = {"type": "boolean", "categories": ["yes", "no"]}
    card["columns"]["length_of_stay"] = {"type": "integer", "bounds": [1, 60], "categories": [1, 2]}
    card["columns"]['x"; DROP TABLE datasets; --'] = {"type": "integer"}
    card["marginal_pairs"] = [["age", "ghost"]]
    response = api.post("/v1/datasets", json=card, headers=auth(tokens.steward()))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    errors = response.json()["errors"]
    assert isinstance(errors, list) and all(isinstance(e, str) for e in errors)
    for needle in ("'nobody'", "'sex'", "'age'", "'site'", "'stent_type'", "'symptomatic'", "'length_of_stay'",
                   "DROP TABLE", "'ghost'"):
        assert any(needle in e for e in errors), f"no error names {needle}: {errors}"
    assert api.get("/v1/datasets/broken", headers=auth(tokens.steward())).status_code == 404


def test_malformed_card_fields_are_422(api: TestClient, tokens: Tokens) -> None:
    steward = auth(tokens.steward())
    cases: dict[str, dict[str, Any]] = {
        "uppercase name": {**demo_card(), "name": "Registry"},
        "path in name": {**demo_card(), "name": "../../etc"},
        "unknown field": {**demo_card("extra"), "owner_email": "x@y"},
        "no columns": {**demo_card("nocols"), "columns": {}},
        "unknown type": {**demo_card("badtype"), "columns": {"patient_id": {"type": "blob"}}},
    }
    for case, card in cases.items():
        response = api.post("/v1/datasets", json=card, headers=steward)
        assert response.status_code == 422, f"{case}: {response.status_code} {response.text}"
        assert response.headers["content-type"] == PROBLEM_JSON, case
    assert api.get("/v1/datasets", headers=steward).json() == []


def _private_card(name: str) -> dict[str, Any]:
    """The demo card with one non-public categorical and one non-public bounded column."""
    card = copy.deepcopy(demo_card(name))
    card["columns"]["site"] = {"type": "string", "categories": card["columns"]["site"]["categories"]}
    card["columns"]["stenosis_pct"] = {"type": "integer", "bounds": [47.25, 103.75]}
    return card


def test_buyer_catalog_hides_private_metadata_rows_and_data(api: TestClient, tokens: Tokens,
                                                            tmp_path: Path) -> None:
    steward, buyer = tokens.steward(), tokens.buyer()
    card = _private_card("private-registry")
    assert api.post("/v1/datasets", json=card, headers=auth(steward)).status_code == 201
    path = write_registry(tmp_path / "registry.parquet", procedures=1234)
    table = pq.read_table(path)
    with path.open("rb") as handle:
        uploaded = api.post("/v1/datasets/private-registry/versions", files={"file": (path.name, handle)},
                            headers=auth(steward))
    assert uploaded.status_code == 201, uploaded.text
    rows = uploaded.json()["rows"]
    assert rows == table.num_rows == 1234

    listing = api.get("/v1/datasets", headers=auth(buyer))
    single = api.get("/v1/datasets/private-registry", headers=auth(buyer))
    assert listing.status_code == 200 and single.status_code == 200
    [entry] = listing.json()
    assert single.json() == entry
    for response in (listing, single):
        text = response.text
        for site in card["columns"]["site"]["categories"]:
            assert site not in text, f"non-public category {site!r} shown to a buyer"
        numbers = set(_numbers(response.json()))
        assert not numbers & {47.25, 103.75}, "non-public bounds shown to a buyer"
        for column in ("site", "stenosis_pct"):
            assert set(entry["columns"][column]) == {"type", "public"}, f"{column} metadata leaked: {entry}"
        # As a number of its own: signatures and digests are random letters and digits that may hold "1234".
        assert not re.search(r"(?<![0-9A-Za-z+/])1234(?![0-9A-Za-z+/])", text), \
            "the exact row count was shown to a buyer"
        patient_ids = set(table.column("patient_id").to_pylist()[:50])
        leaked = [p for p in patient_ids if p in text]
        assert not leaked, f"patient ids leaked into the catalog: {leaked[:3]}"
    [version] = entry["versions"]
    assert "rows" not in version and "size_bytes" not in version, f"exact sizes leaked: {version}"
    assert set(version) == {"version", "created_at", "signature", "deid"}, \
        f"a buyer sees more than the version's number, date, signature and report summary: {version}"
    # The org's signature commits to the data without its digest or size (sandbox.catalog.signing).
    assert uploaded.json()["sha256"] not in text and "rows" not in version["signature"]["statement"]
    # Public metadata stays visible: this is a catalog, not a blank page.
    assert entry["columns"]["age"]["bounds"] == [18, 90] and entry["columns"]["sex"]["categories"] == ["F", "M"]
    assert entry["columns"]["patient_id"] == {"type": "string", "public": False,
                                              "description": "pseudonymous patient id"}

    as_steward = api.get("/v1/datasets/private-registry", headers=auth(steward)).json()
    assert as_steward["versions"][0]["rows"] == 1234
    assert as_steward["columns"]["stenosis_pct"]["bounds"] == [47.25, 103.75]
    assert as_steward["columns"]["site"]["categories"] == card["columns"]["site"]["categories"]


def _numbers(document: Any) -> list[float]:
    """Every number anywhere in a JSON document."""
    if isinstance(document, dict):
        return [n for value in document.values() for n in _numbers(value)]
    if isinstance(document, list):
        return [n for value in document for n in _numbers(value)]
    if isinstance(document, int | float) and not isinstance(document, bool):
        return [float(document)]
    return []


@pytest.mark.parametrize("procedures", [57, 1234, 1250])
def test_buyers_get_no_row_count_and_no_content_digest(api: TestClient, tokens: Tokens, tmp_path: Path,
                                                       procedures: int) -> None:
    # Review 11.1: the stored Parquet's sha256 lets a buyer test a guessed table, and a deterministically
    # rounded count tracked over weekly versions gives cohort sizes away. Neither reaches a buyer.
    steward = tokens.steward()
    uploaded = register_demo(api, steward, tmp_path, name="tiny", procedures=procedures)
    buyer = auth(tokens.buyer())
    for response in (api.get("/v1/datasets/tiny", headers=buyer), api.get("/v1/datasets", headers=buyer)):
        assert response.status_code == 200, response.text
        assert uploaded["sha256"] not in response.text, "the stored file's digest was shown to a buyer"
        entry = response.json() if isinstance(response.json(), dict) else response.json()[0]
        [version] = entry["versions"]
        assert not {"sha256", "rows", "rows_approx", "size_bytes", "upload_sha256"} & set(version), version
    [as_steward] = api.get("/v1/datasets/tiny", headers=auth(steward)).json()["versions"]
    assert as_steward["sha256"] == uploaded["sha256"] and as_steward["rows"] == uploaded["rows"]


def test_unknown_dataset_is_404(api: TestClient, tokens: Tokens) -> None:
    response = api.get("/v1/datasets/nope", headers=auth(tokens.buyer()))
    assert response.status_code == 404 and response.headers["content-type"] == PROBLEM_JSON
    assert api.get("/v1/datasets").status_code == 401, "the catalog answered without a token"
