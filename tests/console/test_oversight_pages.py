"""The console's oversight and buyer pages show each caller what the API shows it, and refuse whom it refuses.

A real instance (SQLite and PostgreSQL), the demo dataset registered through the worker's socket, real
contracts and a real DP query, so the budget, usage, invoice and audit pages have true figures to show.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo
from sqlalchemy import select, update

from sandbox.api.console.oversight import BAR_WIDTH, CHART_HEIGHT
from sandbox.audit import SystemActor
from sandbox.instance import Instance
from sandbox.notebooks import sessions
from sandbox.store.models import AuditEvent, ImageRecord

DATASET = "carotid-stenting"
PURPOSE = "<script>alert(1)</script> stroke outcomes"
SQL = f'SELECT sex, COUNT(*) AS n FROM "{DATASET}" GROUP BY sex'
PAGES = ["/console/datasets", f"/console/datasets/{DATASET}", "/console/contracts", "/console/budgets",
         "/console/usage", "/console/audit", "/console/invoices", "/console/jobs", "/console/notebooks"]


@dataclass
class World:
    api: TestClient
    instance: Instance
    tokens: dict[str, str]
    contract: str
    other_contract: str

    def browser(self, who: str | None) -> TestClient:
        """A console client of its own (its own cookies), signed in as `who` (None: nobody)."""
        client = TestClient(self.api.app, base_url="http://127.0.0.1", raise_server_exceptions=False)
        if who is not None:
            login = client.get("/console/login")
            nonce = re.search(r'name="nonce" value="([^"]+)"', login.text)
            assert nonce, "the sign-in page has no nonce"
            signed = client.post("/console/login", data={"token": self.tokens[who], "nonce": nonce.group(1),
                                                         "next": "/console/"}, follow_redirects=False)
            assert signed.status_code == 303, f"{who} could not sign in: {signed.text[:300]}"
        return client


@pytest.fixture
def world(api: TestClient, instance: Instance, tokens: Tokens, tmp_path: Path) -> Iterator[World]:
    steward = tokens.steward()
    register_demo(api, steward, tmp_path, procedures=300)
    contract = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": "acme", "datasets": [DATASET], "tier": "aggregate", "kinds": ["query", "notebook"],
        "purpose": PURPOSE, "valid_until": "2099-01-01", "epsilon": 2.0, "policy": "default",
        "prices": {"currency": "EUR", "epsilon": "10", "cpu_hour": "1.5"}})
    assert contract.status_code == 201, contract.text
    other = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": "rival", "datasets": [DATASET], "tier": "dp_only", "kinds": ["query"],
        "purpose": "rival's study", "valid_until": "2099-01-01", "epsilon": 1.0, "policy": "dp-only"})
    assert other.status_code == 201, other.text
    cap = api.post(f"/v1/datasets/{DATASET}/budget-cap", headers=auth(steward), json={"epsilon_cap": 1.5})
    assert cap.status_code == 200, cap.text
    buyer = tokens.buyer(org="acme")
    answer = api.post("/v1/queries", headers=auth(buyer), json={
        "contract": contract.json()["id"], "dataset": DATASET, "sql": SQL, "epsilon": 0.5})
    assert answer.status_code == 200, answer.text
    yield World(api=api, instance=instance, contract=contract.json()["id"], other_contract=other.json()["id"],
                tokens={"steward": steward, "buyer": buyer, "rival": tokens.buyer(org="rival"),
                        "other_steward": tokens.steward(sub="steward-b", org="clinic"),
                        "auditor": tokens.auditor(), "admin": tokens.admin()})


def rect_width(html: str, kind: str, scope: str) -> float:
    """The width of the first `<rect class="kind">` inside the element carrying `scope`."""
    start = html.index(scope)
    found = re.search(rf'<rect class="{kind}"[^>]*\swidth="([0-9.]+)"', html[start:])
    assert found, f"no {kind} rect after {scope}"
    return float(found.group(1))


def section(html: str, marker: str) -> str:
    """The `<section ...>` element whose opening tag carries `marker`."""
    start = html.index(marker)
    start = html.rindex("<section", 0, start)
    return html[start:html.index("</section>", start)]


def test_a_signed_out_browser_is_sent_to_sign_in_from_every_page(world: World) -> None:
    anonymous = world.browser(None)
    for page in PAGES:
        response = anonymous.get(page, follow_redirects=False)
        assert response.status_code == 303, f"{page} answered {response.status_code} to nobody"
        assert response.headers["location"].startswith("/console/login"), page


REFUSED = {
    "auditor": ["/console/budgets", "/console/usage", "/console/invoices", "/console/jobs", "/console/notebooks"],
    "buyer": ["/console/audit"],
    "steward": [],
    "admin": ["/console/contracts", "/console/budgets", "/console/usage", "/console/invoices", "/console/audit",
              "/console/jobs", "/console/notebooks"],
}


def test_each_role_gets_the_pages_the_api_gives_it_and_no_other(world: World) -> None:
    for who, refused in REFUSED.items():
        browser = world.browser(who)
        for page in PAGES:
            response = browser.get(page)
            expected = 403 if page in refused else 200
            assert response.status_code == expected, f"{who} got {response.status_code} for {page}"
            assert "script-src 'self'" in response.headers["content-security-policy"], page
            assert "<script>alert(1)</script>" not in response.text, f"the contract's purpose ran as markup on {page}"


def test_budget_bars_are_proportional_and_private_to_their_contract(world: World) -> None:
    for who in ("buyer", "steward"):
        html = world.browser(who).get("/console/budgets").text
        ledger = section(html, f'data-contract="{world.contract}"')
        total = rect_width(ledger, "track", "<svg")
        assert total == BAR_WIDTH
        assert rect_width(ledger, "spent", "<svg") / total == pytest.approx(0.5 / 2.0, abs=0.01), f"{who}: spent"
        assert rect_width(ledger, "reserved", "<svg") == pytest.approx(0.0, abs=0.01), f"{who}: reserved"
        assert rect_width(ledger, "left", "<svg") / total == pytest.approx(1.5 / 2.0, abs=0.01), f"{who}: left"
        cap = re.search(r'<rect class="cap" x="([0-9.]+)"', ledger)
        assert cap and float(cap.group(1)) / total == pytest.approx(1.5 / 2.0, abs=0.01), f"{who}: the cap mark"
        assert re.search(r'<dd class="spent">0\.5</dd>', ledger), f"{who}: the spent figure is not in text"
        assert re.search(r'<dd class="left">1\.5</dd>', ledger), f"{who}: the left figure is not in text"
        assert ("dataset-bar" in ledger) is (who == "steward"), f"{who}: the dataset-wide bar (stewards only)"
    buyer_html = world.browser("buyer").get("/console/budgets").text
    assert world.other_contract not in buyer_html, "a buyer sees another org's ledger"
    for outsider in ("rival", "other_steward"):
        html = world.browser(outsider).get("/console/budgets").text
        assert world.contract not in html, f"{outsider} sees acme's ledger"
    assert "No privacy budgets" in world.browser("other_steward").get("/console/budgets").text


def test_contracts_show_validity_quotas_prices_and_escape_the_purpose(world: World) -> None:
    html = world.browser("buyer").get("/console/contracts").text
    contract = section(html, f'id="contract-{world.contract}"')
    assert "&lt;script&gt;alert(1)&lt;/script&gt; stroke outcomes" in contract, "the purpose is not shown as text"
    assert "active" in contract and "2099-01-01" in contract
    assert "ε = 2.0" in contract and "cpu hours: 100.0" in contract
    assert "epsilon: 10" in contract and "EUR" in contract, "the price list is missing"
    assert world.other_contract not in html, "a buyer sees another org's contract"
    steward = world.browser("steward").get("/console/contracts").text
    assert world.contract in steward and world.other_contract in steward
    assert "nothing is priced" in section(steward, f'id="contract-{world.other_contract}"')
    assert world.contract not in world.browser("other_steward").get("/console/contracts").text
    assert world.contract not in world.browser("rival").get("/console/contracts").text


def test_dataset_pages_show_versions_and_the_card_to_each_as_the_catalog_does(world: World) -> None:
    own = world.browser("steward")
    listing = own.get("/console/datasets").text
    assert "Your organisation's datasets" in listing and f"/console/datasets/{DATASET}" in listing
    detail = own.get(f"/console/datasets/{DATASET}").text
    version = world.api.get(f"/v1/datasets/{DATASET}", headers=auth(world.tokens["steward"])).json()["versions"][0]
    assert version["sha256"] in detail and f"<td>{version['rows']}</td>" in detail, "the steward's version facts"
    assert "<code>age</code>" in detail and "18.0 … 90.0" in detail and "patient_id" in detail
    for outsider in ("buyer", "other_steward"):
        page = world.browser(outsider).get(f"/console/datasets/{DATASET}").text
        assert version["sha256"] not in page, f"{outsider} sees the stored version's digest"
        assert "v1" in page and "18.0 … 90.0" in page, f"{outsider} misses the public card"
    assert world.browser("buyer").get("/console/datasets/no-such-set").status_code == 404


def test_audit_search_finds_events_by_action_object_and_text_and_shows_the_chain(world: World) -> None:
    steward = world.browser("steward")
    page = steward.get("/console/audit", params={"action": "dp.query"}).text
    assert 'data-chain="intact"' in page
    rows = re.findall(r'<tr id="event-(\d+)"', page)
    assert len(rows) == 1 and "<code>dp.query</code>" in page, "the search by action did not find the query"
    query_seq = int(rows[0])
    by_object = steward.get("/console/audit", params={"object_id": world.contract}).text
    assert "<code>contract.create</code>" in by_object, "the search by object id did not find the contract"
    by_text = steward.get("/console/audit", params={"q": "GROUP BY SEX"}).text
    assert f'id="event-{query_seq}"' in by_text, "the free-text search did not look into the details"
    by_seq = steward.get("/console/audit", params={"seq": f"{query_seq}"}).text
    assert re.findall(r'<tr id="event-(\d+)"', by_seq) == [str(query_seq)]
    assert steward.get("/console/audit", params={"seq": "1,x"}).status_code == 422
    # Another org's steward reads nothing of this org's business; an auditor reads it all.
    outsider = world.browser("other_steward").get("/console/audit", params={"action": "dp.query"}).text
    assert "No events match" in outsider, "a steward of another org reads this org's DP queries"
    auditor = world.browser("auditor").get("/console/audit", params={"object_id": world.contract}).text
    assert "<code>contract.create</code>" in auditor
    # Pages: the newest first, and an older page below it.
    first = steward.get("/console/audit", params={"limit": 5}).text
    newest = [int(seq) for seq in re.findall(r'<tr id="event-(\d+)"', first)]
    assert newest == sorted(newest, reverse=True) and len(newest) == 5, newest
    link = re.search(r'<a rel="next" href="([^"]+)"', first)
    assert link, "no link to older events"
    older = steward.get(link.group(1).replace("&amp;", "&")).text
    assert int(re.findall(r'<tr id="event-(\d+)"', older)[0]) < newest[-1], "the older page is not older"
    with world.instance.sessions() as session, session.begin():
        session.execute(update(AuditEvent).where(AuditEvent.seq == query_seq).values(details={"sql": "edited"}))
    broken = world.browser("auditor").get("/console/audit").text
    assert 'data-chain="broken"' in broken and f"at event {query_seq}" in broken, "a rewritten event went unseen"


def _query_time(world: World) -> datetime:
    """When the world's DP query was audited: the day and month its charge belongs to (a test that read the
    clock instead would fail when it ran across midnight)."""
    with world.instance.read_session() as session:
        at = session.scalars(select(AuditEvent.at).where(AuditEvent.action == "dp.query")).one()
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def test_usage_charts_the_days_epsilon_from_the_audited_query(world: World) -> None:
    html = world.browser("buyer").get("/console/usage").text
    chart = section(html, f'class="card usage-chart" data-contract="{world.contract}"')
    day = _query_time(world).date().isoformat()
    assert f"<td>{day}</td><td>0.0</td><td>0.5</td>" in chart, "the query's day and epsilon are not in the table"
    figure = chart[chart.index("ε per day"):]
    heights = [float(h) for h in re.findall(r'<rect class="column"[^>]*height="([0-9.]+)"', figure)]
    assert len(heights) == 30 and max(heights) == pytest.approx(CHART_HEIGHT) == sum(heights), heights
    assert heights.index(max(heights)) >= 28, "the query's column is not today's (or yesterday's, past midnight)"
    assert world.other_contract not in html, "a buyer sees another org's usage"
    assert world.contract not in world.browser("other_steward").get("/console/usage").text


def test_invoices_trace_each_line_to_its_audited_events_and_export_csv(world: World) -> None:
    steward = world.browser("steward")
    html = steward.get("/console/invoices").text
    invoice = section(html, f'class="card invoice" data-contract="{world.contract}"')
    line = invoice[invoice.index('data-item="epsilon"'):]
    line = line[:line.index("</tr>")]
    assert "0.500000" in line and "5.00" in line, f"the epsilon line is wrong: {line}"
    seqs = re.findall(r'href="/console/audit\?seq=(\d+)"', line)
    assert len(seqs) == 1, "the epsilon line does not link its event"
    traced = steward.get(f"/console/audit?seq={seqs[0]}").text
    assert "<code>dp.query</code>" in traced and world.contract in traced
    period = _query_time(world).strftime("%Y-%m")
    csv = steward.get(f"/console/invoices.csv?period={period}")
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert f"{world.contract},{period},EUR,epsilon,0.500000,epsilon,10,5.00,{seqs[0]}" in csv.text
    api = world.api.get("/v1/invoices", params={"period": period}, headers=auth(world.tokens["steward"])).json()
    assert {i["contract"] for i in api} == set(re.findall(r'class="card invoice" data-contract="([^"]+)"', html))
    buyer = world.browser("buyer").get(f"/console/invoices?period={period}").text
    assert world.contract in buyer and world.other_contract not in buyer
    assert "/console/audit?seq=" not in buyer, "a buyer is sent to the audit log it may not read"
    assert world.contract not in world.browser("other_steward").get("/console/invoices").text
    assert steward.get("/console/invoices?period=2024-13").status_code == 422


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "the page has no CSRF field"
    return found.group(1)


def test_open_in_jupyterlab_starts_or_reuses_the_session_as_the_api_does(world: World) -> None:
    with world.instance.sessions() as session, session.begin():
        session.add(ImageRecord(name=sessions.KERNEL_IMAGE_BUILD, image_id="sha256:" + "0" * 64,
                                seen_at=datetime.now(UTC)))
    buyer = world.browser("buyer")
    page = buyer.get("/console/notebooks").text
    assert "Open in JupyterLab" in page and f'name="contract" value="{world.contract}"' in page
    form = {"contract": world.contract, "dataset": DATASET}
    assert buyer.post("/console/notebooks", data=form, follow_redirects=False).status_code == 403, "no CSRF"
    assert buyer.post("/console/notebooks", data={**form, "csrf": "0" * 64},
                      follow_redirects=False).status_code == 403, "a wrong CSRF value"
    opened = buyer.post("/console/notebooks", data={**form, "csrf": csrf_of(page)}, follow_redirects=False)
    assert opened.status_code == 303, opened.text[:300]
    target = re.fullmatch(r"/notebooks/(j-[0-9a-f]+)/lab\?token=([A-Za-z0-9_-]+)", opened.headers["location"])
    assert target, opened.headers["location"]
    with world.instance.read_context(SystemActor()) as ctx:
        job = sessions.session_access(ctx, target.group(1), token=target.group(2), principal=None)
        assert job.contract_id == world.contract, "the redirect's token does not open the session"
    again = world.api.post("/v1/notebooks", headers=auth(world.tokens["buyer"]), json=form)
    assert again.status_code == 201 and again.json()["id"] == target.group(1), "the API started a second session"
    listed = buyer.get("/console/notebooks").text
    assert f'data-session="{target.group(1)}"' in listed
    assert f'data-job="{target.group(1)}"' in buyer.get("/console/jobs").text
    assert f'data-job="{target.group(1)}"' in buyer.get("/console/jobs?state=running").text
    assert f'data-job="{target.group(1)}"' not in buyer.get("/console/jobs?state=done").text
    # Whom the API refuses: a steward, and a buyer of another org (the contract is not theirs to see).
    steward = world.browser("steward")
    steward_page = steward.get("/console/notebooks").text
    assert "Open in JupyterLab" not in steward_page and f'data-session="{target.group(1)}"' in steward_page
    assert steward.post("/console/notebooks", data={**form, "csrf": csrf_of(steward_page)},
                        follow_redirects=False).status_code == 403
    rival = world.browser("rival")
    rival_page = rival.get("/console/notebooks").text
    assert target.group(1) not in rival_page and "Open in JupyterLab" not in rival_page
    assert rival.post("/console/notebooks", data={**form, "csrf": csrf_of(rival_page)},
                      follow_redirects=False).status_code == 404
    with world.instance.read_session() as session:
        starts = session.execute(select(AuditEvent).where(AuditEvent.action == "notebook.start")).scalars().all()
        assert len(starts) == 1, "the session was started more than once"
