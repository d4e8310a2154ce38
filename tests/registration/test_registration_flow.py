"""Registration as a hospital steward does it, over HTTP on both stores: draft a card from an Excel export,
see the version blocked by its de-identification report, remediate it, and publish it signed, with its
licence, to buyers who never see the blocked versions."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth

from sandbox.catalog.signing import verify_version_signature

NAME = "stent-registry"
SITES = ("north", "south", "east", "west")
SURNAMES = ("王", "李", "张", "刘", "陈", "杨")
GIVEN = ("伟", "芳", "娜", "敏", "静", "强", "磊", "洋")
LATIN = ("John Smith", "Mary Johnson", "Robert Brown", "Linda Davis")


def prc_id(rng: random.Random) -> str:
    """An 18-digit resident identity number with a valid ISO 7064 MOD 11-2 check digit."""
    body = f"{rng.choice(['110105', '310104', '440305'])}{rng.randint(1940, 1975)}" \
           f"{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(0, 999):03d}"
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    check = "10X98765432"[sum(int(d) * w for d, w in zip(body, weights, strict=True)) % 11]
    return body + check


def export(path: Path, *, seed: int = 7, with_identifiers: bool = True) -> Path:
    """The hospital's Excel export: per site, each age from 50 to 79 twice (so age x site has k=2, and
    10-year bands k=20), plus the leftover name and ID-number columns a careless export carries."""
    rng = random.Random(seed)
    rows = []
    for site in SITES:
        for age in range(50, 80):
            for _ in range(2):
                rows.append({"patient_id": f"P{len(rows):05d}", "age": age, "site": site,
                             "sex": rng.choice(["F", "M"]), "restenosis": rng.random() < 0.1,
                             "stenosis_pct": round(rng.uniform(50, 99), 1)})
    frame = pd.DataFrame(rows)
    if with_identifiers:
        frame.insert(1, "name", [rng.choice(SURNAMES) + rng.choice(GIVEN) + (rng.choice(GIVEN) if i % 2 else "")
                                 if i % 5 else rng.choice(LATIN) for i in range(len(frame))])
        frame.insert(2, "id_number", [prc_id(rng) for _ in range(len(frame))])
    frame.to_excel(path, index=False)
    return path


def draft(api: TestClient, steward: str, path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        response = api.post("/v1/datasets/drafts", files={"file": (path.name, handle)}, data={"name": NAME},
                            headers=auth(steward))
    assert response.status_code == 200, response.text
    return dict(response.json())


def upload(api: TestClient, steward: str, path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        response = api.post(f"/v1/datasets/{NAME}/versions", files={"file": (path.name, handle)},
                            headers=auth(steward))
    assert response.status_code == 201, response.text
    return dict(response.json())


def registered(api: TestClient, tokens: Tokens, tmp_path: Path, **card: Any) -> dict[str, Any]:
    """The drafted card, with the steward's choices, created; returns the first upload's version."""
    steward = tokens.steward()
    path = export(tmp_path / "export.xlsx")
    drafted = draft(api, steward, path)["card"]
    drafted.update({"quasi_identifiers": ["age", "site"], "licence": {
        "name": "Hospital research licence 2026", "permitted_uses": ["analysis", "query", "dp_training"],
        "training_allowed": True, "attribution": "Cite the North Hospital carotid registry",
        "derived_model_retention_days": 365}, **card})
    for column in drafted.get("drop_columns", []):
        drafted["columns"].pop(column, None)
    created = api.post("/v1/datasets", json=drafted, headers=auth(steward))
    assert created.status_code == 201, created.text
    return upload(api, steward, path)


def test_an_export_with_identifiers_is_blocked_then_remediated_signed_and_published(
        api: TestClient, tokens: Tokens, tmp_path: Path) -> None:
    steward, buyer = tokens.steward(), tokens.buyer()
    first = registered(api, tokens, tmp_path)
    assert first["status"] == "blocked"
    report = api.get(f"/v1/datasets/{NAME}/versions/1/deid", headers=auth(steward)).json()
    assert report["blocked"] is True
    kinds = {(found["column"], found["kind"]) for found in report["identifiers"]}
    assert ("name", "person_name") in kinds and ("id_number", "national_id") in kinds, kinds
    counts = {found["column"]: found["count"] for found in report["identifiers"]}
    assert counts["id_number"] == 240
    for found in report["identifiers"]:
        for example in found["examples"]:  # masked: no whole identifier in the report
            assert "*" in example
    # Buyers see nothing of a blocked version, and no report.
    catalog = api.get(f"/v1/datasets/{NAME}", headers=auth(buyer)).json()
    assert catalog["versions"] == []
    assert api.get(f"/v1/datasets/{NAME}/versions/1/deid", headers=auth(buyer)).status_code == 403

    # Dropping the two columns: checked again as version 2, where age x site shows k=2.
    second = api.post(f"/v1/datasets/{NAME}/versions/1/remediate", json={"drop": ["name", "id_number"]},
                      headers=auth(steward))
    assert second.status_code == 201, second.text
    assert second.json()["version"] == 2 and second.json()["status"] == "blocked"
    report = api.get(f"/v1/datasets/{NAME}/versions/2/deid", headers=auth(steward)).json()
    assert report["identifiers"] == []
    assert report["k_anonymity"]["k"] == 2
    assert report["k_anonymity"]["quasi_identifiers"] == ["age", "site"]
    bands = [s for s in report["k_anonymity"]["suggestions"]
             if set(s["generalise"]) == {"age"} and "band" in s["generalise"]["age"] and s["k"] >= 5]
    assert bands, report["k_anonymity"]["suggestions"]

    # Accepting the suggested age bands: version 3 is registered, signed and visible to buyers.
    third = api.post(f"/v1/datasets/{NAME}/versions/2/remediate", json={"accept": [bands[0]["id"]]},
                     headers=auth(steward))
    assert third.status_code == 201, third.text
    assert third.json()["version"] == 3 and third.json()["status"] == "active"
    assert third.json()["deid"]["k"] >= 5
    statuses = {v["version"]: v["status"] for v in
                api.get(f"/v1/datasets/{NAME}", headers=auth(steward)).json()["versions"]}
    assert statuses == {1: "superseded", 2: "superseded", 3: "active"}

    seen = api.get(f"/v1/datasets/{NAME}", headers=auth(buyer)).json()
    assert [v["version"] for v in seen["versions"]] == [3]
    assert seen["licence"]["name"] == "Hospital research licence 2026"
    assert seen["licence"]["training_allowed"] is True
    assert seen["deid"]["k"] >= 5 and seen["deid"]["quasi_identifiers"] == ["age", "site"]
    assert "name" not in seen["columns"] and "id_number" not in seen["columns"]
    signature = seen["versions"][0]["signature"]
    keys = api.get("/v1/orgs/hospital/keys", headers=auth(buyer)).json()
    statement = verify_version_signature(signature, keys[0]["public_key_pem"].encode())
    assert statement["dataset"] == NAME and statement["version"] == 3 and statement["org"] == "hospital"
    text = str(seen)
    stored = api.get(f"/v1/datasets/{NAME}", headers=auth(steward)).json()["versions"][-1]
    assert stored["sha256"] not in text  # the buyer's view commits to the data without its digest

    # The stored data holds the bands, and the card generalises every later weekly version the same way.
    card = api.get(f"/v1/datasets/{NAME}", headers=auth(steward)).json()
    assert "age" in card["columns"]


# The store is not these tests' subject (the acceptance flow above runs on both): SQLite only, for the suite's time.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_next_week_shows_its_difference_to_stewards_only(api: TestClient, tokens: Tokens,
                                                              tmp_path: Path) -> None:
    steward, buyer = tokens.steward(), tokens.buyer()
    registered(api, tokens, tmp_path, drop_columns=["name", "id_number"])
    # drop_columns in the card from the start: the identifiers are discarded on reading; k=2 still blocks.
    fixed = api.post(f"/v1/datasets/{NAME}/versions/1/remediate",
                     json={"generalise": {"age": {"band": 10}}}, headers=auth(steward))
    assert fixed.status_code == 201 and fixed.json()["status"] == "active", fixed.text
    week2 = export(tmp_path / "week2.xlsx", seed=8)
    frame = pd.read_excel(week2)
    frame = pd.concat([frame, frame.tail(20).assign(patient_id=[f"Q{i:05d}" for i in range(20)])])
    frame.to_excel(week2, index=False)
    created = upload(api, steward, week2)
    assert created["status"] == "active", created
    diff = api.get(f"/v1/datasets/{NAME}/versions/{created['version']}/diff", headers=auth(steward))
    assert diff.status_code == 200, diff.text
    rows = diff.json()["rows"]
    assert rows["after"] - rows["before"] == 20
    assert rows["added"] >= 20
    assert api.get(f"/v1/datasets/{NAME}/versions/{created['version']}/diff",
                   headers=auth(buyer)).status_code == 403
    other = tokens.steward(sub="steward-9", org="other-hospital")
    assert api.get(f"/v1/datasets/{NAME}/versions/{created['version']}/diff",
                   headers=auth(other)).status_code == 404


# The store is not these tests' subject (the acceptance flow above runs on both): SQLite only, for the suite's time.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_override_is_signed_and_audited_where_the_policy_allows_it(api: TestClient, tokens: Tokens,
                                                                       tmp_path: Path) -> None:
    steward = tokens.steward()
    registered(api, tokens, tmp_path, drop_columns=["name", "id_number"])
    short = api.post(f"/v1/datasets/{NAME}/versions/1/override", json={"reason": "ok"}, headers=auth(steward))
    assert short.status_code == 422
    overridden = api.post(f"/v1/datasets/{NAME}/versions/1/override",
                          json={"reason": "age and site are released only through DP queries"},
                          headers=auth(steward))
    assert overridden.status_code == 200, overridden.text
    assert overridden.json()["status"] == "active" and overridden.json()["deid"]["overridden"] is True
    report = api.get(f"/v1/datasets/{NAME}/versions/1/deid", headers=auth(steward)).json()
    assert report["override"]["by"] == "steward-1" and report["override"]["signed"]["signature"]
    again = api.post(f"/v1/datasets/{NAME}/versions/1/override",
                     json={"reason": "age and site are released only through DP queries"}, headers=auth(steward))
    assert again.status_code == 409
    actions = [e["action"] for e in api.get("/v1/audit", headers=auth(steward)).json()]
    assert "dataset.version.override" in actions


# The store is not these tests' subject (the acceptance flow above runs on both): SQLite only, for the suite's time.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_strict_policy_allows_no_override(api: TestClient, tokens: Tokens, tmp_path: Path) -> None:
    steward = tokens.steward()
    registered(api, tokens, tmp_path, registration_policy="strict")
    refused = api.post(f"/v1/datasets/{NAME}/versions/1/override",
                       json={"reason": "we promise the names are fine"}, headers=auth(steward))
    assert refused.status_code == 409
    assert "no override" in refused.json()["detail"]
    # Still blocked, and nothing can use it: a job or query names no usable version.
    statuses = [v["status"] for v in api.get(f"/v1/datasets/{NAME}", headers=auth(steward)).json()["versions"]]
    assert statuses == ["blocked"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("body", [{"drop": ["patient_id"]}, {"drop": ["nope"]}, {"accept": ["age:band:999"]},
                                  {}, {"generalise": {"site": {"band": 5}}}])
def test_a_bad_remediation_is_refused_and_changes_nothing(api: TestClient, tokens: Tokens, tmp_path: Path,
                                                          body: dict[str, Any]) -> None:
    steward = tokens.steward()
    registered(api, tokens, tmp_path)
    before = api.get(f"/v1/datasets/{NAME}", headers=auth(steward)).json()
    refused = api.post(f"/v1/datasets/{NAME}/versions/1/remediate", json=body, headers=auth(steward))
    assert refused.status_code == 422, refused.text
    assert api.get(f"/v1/datasets/{NAME}", headers=auth(steward)).json() == before


# The store is not these tests' subject (the acceptance flow above runs on both): SQLite only, for the suite's time.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_licence_without_training_refuses_a_training_contract(api: TestClient, tokens: Tokens,
                                                                tmp_path: Path) -> None:
    steward = tokens.steward()
    registered(api, tokens, tmp_path, licence={"name": "No training", "training_allowed": False})
    refused = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": "acme", "datasets": [NAME], "tier": "dp_only", "kinds": ["dp_training"],
        "purpose": "stroke risk", "valid_until": "2027-12-31", "epsilon": 1.0})
    assert refused.status_code == 422, refused.text
    assert NAME in refused.text

