"""The console shows registration as the API does: the licence terms and k on the dataset page to everyone,
version statuses and the version page (report, difference, signature, provenance) to the owner's stewards
only, and hospital data on those pages as text, never as markup.

Both stores; the blocked-then-remediated flow of `registration/test_registration_flow.py`, over HTTP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth
from markupsafe import escape

# tests/ is on pythonpath and has no __init__.py: the flow's module is reached as a namespace package, which
# works whether or not pytest has collected tests/registration (it collects tests/console first).
from registration.test_registration_flow import NAME, draft, export, registered, upload

# A site value and a column description as a careless (or hostile) export could carry them.
SITE = "<script>alert('site')</script>"
DESCRIPTION = "Treating site <img src=x onerror=alert(1)>"
LICENCE = "Hospital research licence 2026"
REASON = "<script>alert('override')</script> age and site reach buyers through DP queries only"
DATASET_PAGE = f"/console/datasets/{NAME}"


def version_page(number: int) -> str:
    return f"{DATASET_PAGE}/versions/{number}"


def signed_in(api: TestClient, token: str) -> TestClient:
    """A console client with its own cookies, signed in with `token` as the sign-in form does it."""
    client = TestClient(api.app, base_url="http://127.0.0.1", raise_server_exceptions=False)
    login = client.get("/console/login")
    nonce = re.search(r'name="nonce" value="([^"]+)"', login.text)
    assert nonce, "the sign-in page has no nonce"
    signed = client.post("/console/login", data={"token": token, "nonce": nonce.group(1), "next": "/console/"},
                         follow_redirects=False)
    assert signed.status_code == 303, f"could not sign in: {signed.text[:300]}"
    return client


def section(html: str, marker: str) -> str:
    """The element whose opening tag carries `marker`, up to its closing tag (the pages nest none in itself)."""
    start = html.rindex("<", 0, html.index(marker))
    found = re.match(r"<(\w+)", html[start:])
    assert found, f"no element carries {marker}"
    return html[start:html.index(f"</{found.group(1)}>", start)]


@dataclass
class Registered:
    """Version 1 blocked (identifiers), 2 blocked (k=2), 3 active with age bands, 4 the next week's, active;
    and who looks at them."""

    api: TestClient
    tokens: dict[str, str]
    identifiers: list[str]  # every name and ID number of the export
    suggestion: dict[str, Any]  # the one accepted on version 2

    def browser(self, who: str) -> TestClient:
        return signed_in(self.api, self.tokens[who])


def hostile_export(path: Path, seed: int = 7) -> Path:
    """The flow's Excel export, with one site's name in markup."""
    frame = pd.read_excel(export(path, seed=seed))
    frame["site"] = frame["site"].replace("west", SITE)
    frame.to_excel(path, index=False)
    return path


@pytest.fixture
def registered_flow(api: TestClient, tokens: Tokens, tmp_path: Path) -> Registered:
    steward = tokens.steward()
    path = hostile_export(tmp_path / "export.xlsx")
    frame = pd.read_excel(path)
    card = draft(api, steward, path)["card"]
    card["columns"]["site"]["description"] = DESCRIPTION
    for column in ("site", "sex", "stenosis_pct"):  # public: their distributions are compared week to week
        card["columns"][column]["public"] = True
    card.update(quasi_identifiers=["age", "site"], licence={
        "name": LICENCE, "url": "javascript:alert(document.cookie)", "permitted_uses": ["query", "dp_training"],
        "training_allowed": True, "attribution": "Cite the North Hospital registry",
        "derived_model_retention_days": 365})
    created = api.post("/v1/datasets", json=card, headers=auth(steward))
    assert created.status_code == 201, created.text
    assert upload(api, steward, path)["status"] == "blocked"
    dropped = api.post(f"/v1/datasets/{NAME}/versions/1/remediate", json={"drop": ["name", "id_number"]},
                       headers=auth(steward))
    assert dropped.status_code == 201 and dropped.json()["status"] == "blocked", dropped.text
    report = api.get(f"/v1/datasets/{NAME}/versions/2/deid", headers=auth(steward)).json()
    accepted = next(s for s in report["k_anonymity"]["suggestions"] if s["reaches_min_k"])
    banded = api.post(f"/v1/datasets/{NAME}/versions/2/remediate", json={"accept": [accepted["id"]]},
                      headers=auth(steward))
    assert banded.status_code == 201 and banded.json()["status"] == "active", banded.text
    # The next week: 20 more patients, and every stenosis measured 20 points higher (capped at 99).
    week2 = hostile_export(tmp_path / "week2.xlsx", seed=8)
    later = pd.read_excel(week2)
    later = pd.concat([later, later.tail(20).assign(patient_id=[f"Q{i:05d}" for i in range(20)])])
    later["stenosis_pct"] = (later["stenosis_pct"] + 20).clip(upper=99.0)
    later.to_excel(week2, index=False)
    assert upload(api, steward, week2)["status"] == "active"
    return Registered(api=api, suggestion=accepted,
                      identifiers=[str(v) for v in [*frame["name"], *frame["id_number"]]],
                      tokens={"steward": steward, "buyer": tokens.buyer(), "auditor": tokens.auditor(),
                              "other_steward": tokens.steward(sub="steward-b", org="clinic")})


def test_the_dataset_page_shows_licence_terms_and_k_to_all_and_statuses_to_the_owner_only(
        registered_flow: Registered) -> None:
    world = registered_flow
    catalog = world.api.get(f"/v1/datasets/{NAME}", headers=auth(world.tokens["steward"])).json()
    key_id = catalog["versions"][-1]["signature"]["key_id"]
    k = catalog["deid"]["k"]
    assert k is not None and k >= 5

    steward = world.browser("steward").get(DATASET_PAGE)
    assert steward.status_code == 200, steward.text[:500]
    licence = section(steward.text, 'id="licence"')
    assert LICENCE in licence and "365 days at most" in licence and "dp training" in licence
    assert "Cite the North Hospital registry" in licence
    assert "href=\"javascript:" not in steward.text, "the licence's javascript: url became a link"
    assert f"k = {k} over age, site" in steward.text
    versions = section(steward.text, 'id="versions"')
    for number, status in ((1, "superseded"), (2, "superseded"), (3, "active"), (4, "active")):
        row = versions[versions.index(f'id="version-{number}"'):]
        row = row[:row.index("</tr>")]
        assert f">{status}</span>" in row, f"version {number}'s status is not {status}: {row}"
        assert f'href="{version_page(number)}"' in row, f"no link to version {number}'s page"
    assert key_id[:8] in versions

    for outsider in ("buyer", "other_steward"):
        page = world.browser(outsider).get(DATASET_PAGE)
        assert page.status_code == 200
        assert LICENCE in page.text and f"k = {k} over age, site" in page.text, f"{outsider} misses the card's terms"
        assert key_id[:8] in page.text, f"{outsider} misses the version's signature"
        for hidden in ("superseded", "status-", "/versions/", "blocked"):
            assert hidden not in page.text, f"{outsider} sees {hidden!r} on the dataset page"
        assert 'id="version-1"' not in page.text and 'id="version-4"' in page.text


def test_the_version_page_shows_the_report_to_the_owners_stewards_and_the_data_as_text(
        registered_flow: Registered) -> None:
    world = registered_flow
    steward = world.browser("steward")
    first = steward.get(version_page(1))
    assert first.status_code == 200, first.text[:500]
    identifiers = section(first.text, 'id="identifiers"')
    assert "person name" in identifiers and "national id" in identifiers
    assert "<code>name</code>" in identifiers and "<code>id_number</code>" in identifiers
    report = world.api.get(f"/v1/datasets/{NAME}/versions/1/deid", headers=auth(world.tokens["steward"])).json()
    for found in report["identifiers"]:
        for example in found["examples"]:
            assert str(escape(example)) in identifiers, f"the masked example {example!r} is missing"
    leaked = [value for value in world.identifiers if value in first.text]
    assert not leaked, f"the page shows whole identifiers: {leaked[:3]}"
    assert "superseded" in first.text and 'href="' + version_page(2) + '"' in first.text  # superseded_by links on

    second = steward.get(version_page(2)).text
    suggestions = section(second, 'id="suggestions"')
    assert world.suggestion["id"] in suggestions
    assert f'<td class="number">{world.suggestion["k"]}' in suggestions, "the k the suggestion reaches"
    assert "age in bands of" in suggestions
    assert re.search(r"<dt>k</dt><dd>2\b", second), "version 2's k over age x site"
    rare = section(second, 'id="rare"')
    assert str(escape(SITE)) in rare, "the markup site is not shown, escaped, among the rare combinations"

    third = steward.get(version_page(3)).text
    catalog = world.api.get(f"/v1/datasets/{NAME}", headers=auth(world.tokens["steward"])).json()
    signed = catalog["versions"][2]["signature"]
    signature = section(third, 'id="signature"')
    assert signed["key_id"] in signature and signed["statement_sha256"] in signature
    assert "verifies under the org's key" in signature and "opens to this version" in signature
    provenance = section(third, 'id="provenance"')
    assert "bands of" in provenance and 'href="' + version_page(2) + '"' in provenance  # generalised, derived_from
    assert catalog["versions"][2]["provenance"]["nonce"] not in third, "the commitment's nonce is on the page"
    assert "No previous usable version" in section(third, 'id="diff"')

    diff = world.api.get(f"/v1/datasets/{NAME}/versions/4/diff", headers=auth(world.tokens["steward"])).json()
    fourth = section(steward.get(version_page(4)).text, 'id="diff"')
    assert 'href="' + version_page(3) + '"' in fourth and "<code>patient_id</code>" in fourth
    assert re.search(r'<td class="number">240</td><td class="number">260</td><td class="number">20</td>', fourth)
    shifts = section(fourth, 'id="shifts"')
    for column, shift in diff["columns"].items():
        row = shifts[shifts.index(f"<code>{escape(column)}</code>"):]
        row = row[:row.index("</tr>")]
        for measure in ("ks", "psi", "tvd"):
            if shift.get(measure) is not None:
                assert f"{shift[measure]:.4f}" in row, f"{column}'s {measure} is not on the page: {row}"
        assert ("<strong>yes</strong>" in row) is shift["shifted"], f"{column}'s shifted flag: {row}"
    assert diff["columns"]["stenosis_pct"]["shifted"] is True and diff["columns"]["sex"]["shifted"] is False
    assert {"stenosis_pct", "sex", "site"} <= set(diff["columns"])

    for who, expected in (("buyer", 403), ("auditor", 403), ("other_steward", 404)):
        page = world.browser(who).get(version_page(1))
        api = world.api.get(f"/v1/datasets/{NAME}/versions/1/deid", headers=auth(world.tokens[who]))
        assert page.status_code == api.status_code == expected, f"{who}: page {page.status_code}, API {api.status_code}"
        assert "national id" not in page.text and "person name" not in page.text
    assert steward.get(version_page(9)).status_code == 404
    assert steward.get("/console/datasets/no-such-set/versions/1").status_code == 404

    # Hospital data (a site named in markup, a column description) is text on every page, the buyer's too.
    pages = {page: steward.get(page).text for page in (DATASET_PAGE, *(version_page(n) for n in range(1, 5)))}
    pages["buyer's dataset page"] = world.browser("buyer").get(DATASET_PAGE).text
    for page, html in pages.items():
        assert SITE not in html and DESCRIPTION not in html, f"{page} renders the data as markup"
    for page in (DATASET_PAGE, "buyer's dataset page"):  # the public site column's categories and description
        assert str(escape(SITE)) in pages[page] and str(escape(DESCRIPTION)) in pages[page], page
    assert str(escape(SITE)) in pages[version_page(2)]  # among the rare combinations


def test_an_override_shows_who_when_and_why_escaped(api: TestClient, tokens: Tokens, tmp_path: Path) -> None:
    steward = tokens.steward()
    registered(api, tokens, tmp_path, drop_columns=["name", "id_number"])
    blocked = signed_in(api, steward).get(version_page(1)).text
    assert "is blocked" in blocked and "allowed, with a signed reason" in section(blocked, 'id="reasons"')
    overridden = api.post(f"/v1/datasets/{NAME}/versions/1/override", json={"reason": REASON}, headers=auth(steward))
    assert overridden.status_code == 200, overridden.text
    page = signed_in(api, steward).get(version_page(1)).text
    override = section(page, 'id="override"')
    assert "steward-1" in override and str(escape(REASON)) in override
    assert REASON not in page, "the override's reason ran as markup"
    report = api.get(f"/v1/datasets/{NAME}/versions/1/deid", headers=auth(steward)).json()
    assert report["override"]["at"] in override and report["override"]["signed"]["key_id"] in override
