"""A buyer sees its budget as a bar and a steward searches the audit log, in headless Chromium, against a real
`sandbox serve`; the pages log no error and break no Content-Security-Policy rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from cli.server import Server, register_registry

pytestmark = pytest.mark.browser

DATASET = "carotid-stenting"


def complaints(page: Any) -> list[str]:
    """Every console error (a CSP violation is one), uncaught script error and failed load on the page; the
    browser's own favicon request aside (the console has none)."""
    found: list[str] = []

    def console(message: Any) -> None:
        if message.type == "error" and "favicon.ico" not in (message.location or {}).get("url", ""):
            found.append(f"{message.text} ({(message.location or {}).get('url')})")

    page.on("console", console)
    page.on("pageerror", lambda error: found.append(str(error)))
    page.on("response", lambda response: found.append(f"{response.status} {response.url}")
            if response.status >= 400 and not response.url.endswith("/favicon.ico") else None)
    return found


def test_buyer_sees_a_budget_bar_and_steward_searches_the_audit_log(
        console_server: Server, new_page: Any, sign_in: Any, tmp_path: Path) -> None:
    server = console_server
    steward = server.token("steward", "hospital", "dr-oversight")
    buyer = server.token("buyer", "acme", "analyst-oversight")
    register_registry(server, steward, tmp_path, procedures=300)
    contract = httpx.post(f"{server.url}/v1/contracts", headers={"Authorization": f"Bearer {steward}"}, json={
        "buyer_org": "acme", "datasets": [DATASET], "tier": "aggregate", "kinds": ["query"],
        "purpose": "<img src=x onerror=alert(1)> budgets", "valid_until": "2099-01-01", "epsilon": 2.0},
        timeout=30)
    assert contract.status_code == 201, contract.text
    contract_id = contract.json()["id"]
    answer = httpx.post(f"{server.url}/v1/queries", headers={"Authorization": f"Bearer {buyer}"}, json={
        "contract": contract_id, "dataset": DATASET, "epsilon": 0.5,
        "sql": f'SELECT sex, COUNT(*) AS n FROM "{DATASET}" GROUP BY sex'}, timeout=60)
    assert answer.status_code == 200, answer.text

    page = new_page()
    problems = complaints(page)
    sign_in(page, server.url, buyer)
    page.goto(f"{server.url}/console/budgets")
    ledger = page.locator(f'section.ledger[data-contract="{contract_id}"]')
    spent = ledger.locator("svg.bar rect.spent")
    assert spent.count() == 1, "the buyer's budget has no bar"
    track = float(ledger.locator("svg.bar rect.track").get_attribute("width") or 0)
    assert float(spent.get_attribute("width") or 0) / track == pytest.approx(0.25, abs=0.01)
    assert spent.bounding_box()["width"] > 0, "the spent part of the bar is not drawn"
    assert ledger.locator("dd.spent").inner_text() == "0.5"
    page.goto(f"{server.url}/console/contracts")  # the purpose carries markup; it must stay text
    assert "<img src=x onerror=alert(1)> budgets" in page.locator(f"#contract-{contract_id} .purpose").inner_text()
    assert problems == [], f"the buyer's pages complained: {problems}"

    page = new_page()
    problems = complaints(page)
    sign_in(page, server.url, steward)
    page.goto(f"{server.url}/console/audit")
    assert page.locator("[data-chain=intact]").count() == 1, "the chain's status is not shown as intact"
    page.fill("#f-action", "dp.query")
    page.click("form.search button[type=submit]")
    page.wait_for_url("**/console/audit?action=dp.query*")
    rows = page.locator("#events tbody tr[data-seq]")
    assert rows.count() == 1 and "dp.query" in rows.first.inner_text(), "the search did not find the DP query"
    page.fill("#f-action", "")
    page.fill("#f-object", contract_id)
    page.click("form.search button[type=submit]")
    page.wait_for_url(f"**object_id={contract_id}*")
    assert "contract.create" in page.locator("#events").inner_text()
    page.goto(f"{server.url}/console/usage")
    assert page.locator(f'section.usage-chart[data-contract="{contract_id}"] svg.chart').count() == 2
    assert problems == [], f"the steward's pages complained: {problems}"
