"""Invoices through the API: metered by the real worker, DP queries and reviews, traced to audit events."""

from __future__ import annotations

import csv
import io
import math
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from fastapi.testclient import TestClient
from helpers import Tokens, auth
from jobworld import JobWorld

PRICES = {"currency": "EUR", "flat_per_period": 500, "cpu_hour": "0.40", "gpu_hour": 2.5, "epsilon": 100,
          "released_gb": 10}
SQL = 'SELECT sex, COUNT(*) AS n FROM "carotid-stenting" GROUP BY sex'
BUSY = "total = sum(i * i for i in range(10_000_000))\nopen('/output/note.txt', 'w').write('done')\nprint('ok')\n"


def priced_contract(api: TestClient, steward: str) -> str:
    created = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["analysis", "query"],
        "purpose": "billing", "valid_until": "2099-01-01", "epsilon": 2.0, "prices": PRICES,
        "quotas": {"concurrent_jobs": 4, "cpu_hours": 10}})
    assert created.status_code == 201, created.text
    assert created.json()["prices"] == {"currency": "EUR", "flat_per_period": "500", "cpu_hour": "0.40",
                                        "gpu_hour": "2.5", "epsilon": "100", "released_gb": "10"}
    return str(created.json()["id"])


def invoice_of(api: TestClient, token: str, contract: str, period: str) -> dict[str, Any]:
    answer = api.get("/v1/invoices", params={"period": period}, headers=auth(token))
    assert answer.status_code == 200, answer.text
    found = [i for i in answer.json() if i["contract"] == contract]
    assert len(found) == 1, f"no single invoice for {contract}: {answer.json()}"
    return found[0]


def lines(invoice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {line["item"]: line for line in invoice["lines"]}


def release_everything(w: JobWorld, job_id: str) -> None:
    waiting = [o["path"] for o in w.job(job_id)["outputs"] if o["status"] == "in_review"]
    if waiting:
        decided = w.api.post(f"/v1/reviews/{job_id}/decisions", headers=auth(w.steward),
                             json={"release": waiting, "reject": [], "comment": "fine"})
        assert decided.status_code == 200, decided.text


def latest_period(w: JobWorld) -> str:
    """The month of the newest audited event: the usage just made, even if the test crossed a month's end."""
    newest = w.api.get("/v1/audit", params={"limit": 1}, headers=auth(w.steward)).json()[0]
    month: str = newest["at"][:7]
    return month


def test_the_invoice_matches_the_metered_usage_and_each_line_traces_to_audit_events(
        job_world: JobWorld, tokens: Tokens) -> None:
    w = job_world
    contract = priced_contract(w.api, w.steward)
    auditor = tokens.auditor(org="hospital")

    # A DP query answered through the worker's socket, a job run by the real worker, its outputs released.
    query = w.api.post("/v1/queries", headers=auth(w.buyer), json={
        "contract": contract, "dataset": "carotid-stenting", "sql": SQL, "epsilon": 0.25})
    assert query.status_code == 200, query.text
    job = w.submit({"main.py": BUSY}, ["python3", "main.py"], contract=contract)
    w.run_until(job["id"], {"in_review", "done"})
    release_everything(w, job["id"])
    assert w.job(job["id"])["usage"]["bytes_released"] > 0, "the test job released nothing to bill"

    period = latest_period(w)
    invoice = invoice_of(w.api, w.steward, contract, period)
    assert (invoice["period"], invoice["currency"], invoice["buyer_org"], invoice["owner_org"]) == (
        period, "EUR", "acme", "hospital")
    by_item = lines(invoice)
    assert list(by_item) == ["flat_fee", "cpu_hours", "gpu_hours", "epsilon", "released_gb"]

    usage = next(u for u in w.api.get("/v1/usage", headers=auth(w.steward)).json() if u["contract"] == contract)
    budget = next(b for b in w.api.get("/v1/budgets", headers=auth(w.steward)).json() if b["contract"] == contract)
    cpu_hours = Decimal(by_item["cpu_hours"]["quantity"])
    # Billed per started second: at most one second above the exact figure.
    assert Decimal(str(usage["cpu_hours"])) - Decimal("0.000001") <= cpu_hours <= (
        Decimal(str(usage["cpu_hours"])) + Decimal(1) / 3600 + Decimal("0.000001")), (usage, by_item["cpu_hours"])
    assert Decimal(by_item["gpu_hours"]["quantity"]) == 0 and usage["gpu_hours"] == 0
    assert Decimal(by_item["epsilon"]["quantity"]) == Decimal("0.25") == Decimal(str(budget["epsilon_spent"]))
    assert Decimal(by_item["released_gb"]["quantity"]) == (
        Decimal(usage["bytes_released"]) / 10**9).quantize(Decimal("0.000001"), ROUND_HALF_UP)
    assert by_item["flat_fee"]["quantity"] == "1.000000" and by_item["flat_fee"]["amount"] == "500.00"

    # Every line's events are real audit events whose details add up to its quantity.
    events = {e["seq"]: e for e in w.api.get("/v1/audit", params={"limit": 1000}, headers=auth(auditor)).json()}
    cpu = by_item["cpu_hours"]["events"]  # none if the job ended before the worker read its CPU time
    assert all(events[seq]["action"] == "job.usage" and events[seq]["object_id"] == job["id"] for seq in cpu)
    seconds = sum(Decimal(str(events[seq]["details"]["cpu_seconds"])) for seq in cpu)
    assert abs(Decimal(math.ceil(seconds)) / 3600 - cpu_hours) < Decimal("0.000001"), (seconds, cpu_hours)
    epsilon = by_item["epsilon"]["events"]
    assert [events[seq]["action"] for seq in epsilon] == ["dp.query"]
    assert sum(Decimal(str(events[seq]["details"]["epsilon"])) for seq in epsilon) == Decimal("0.25")
    released = sum(Decimal(events[seq]["details"]["bytes_released"]) for seq in by_item["released_gb"]["events"])
    assert released == usage["bytes_released"], "the audited released bytes differ from the usage report"
    assert events[by_item["flat_fee"]["events"][0]]["action"] == "contract.create"

    # Amounts are the printed quantities times the prices, half-up to cents; the total is their sum.
    for line in invoice["lines"]:
        expected = (Decimal(line["quantity"]) * Decimal(line["unit_price"])).quantize(Decimal("0.01"), ROUND_HALF_UP)
        assert Decimal(line["amount"]) == expected, line
    assert Decimal(invoice["total"]) == sum(Decimal(line["amount"]) for line in invoice["lines"])

    # The buyer sees the same invoice; another org's steward and buyer see none of it; auditors none at all.
    assert invoice_of(w.api, w.buyer, contract, period) == invoice
    for stranger in (tokens.steward(sub="other-steward", org="clinic"), tokens.buyer(org="globex")):
        answer = w.api.get("/v1/invoices", params={"period": period}, headers=auth(stranger))
        assert answer.status_code == 200 and answer.json() == [], f"another org saw invoices: {answer.text}"
    assert w.api.get("/v1/invoices", headers=auth(auditor)).status_code == 403

    # The CSV export is the same lines.
    exported = w.api.get("/v1/invoices", params={"period": period}, headers={**auth(w.steward),
                                                                           "Accept": "text/csv"})
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    rows = [r for r in csv.DictReader(io.StringIO(exported.text)) if r["contract"] == contract]
    assert [(r["item"], r["quantity"], r["unit"], r["unit_price"], r["amount"], r["events"]) for r in rows] == [
        (line["item"], line["quantity"], line["unit"], line["unit_price"], line["amount"],
         " ".join(map(str, line["events"]))) for line in invoice["lines"]]
    assert {r["period"] for r in rows} == {period} and {r["currency"] for r in rows} == {"EUR"}

    # A month outside the contract's validity has no invoice for it.
    assert all(i["contract"] != contract for i in w.api.get(
        "/v1/invoices", params={"period": "2020-01"}, headers=auth(w.steward)).json())


def test_a_cancelled_job_is_billed_once_however_often_its_usage_is_recorded(job_world: JobWorld) -> None:
    w = job_world
    contract = priced_contract(w.api, w.steward)
    job = w.submit({"main.py": "import time\nsum(range(2_000_000))\ntime.sleep(120)\n"}, ["python3", "main.py"],
                   contract=contract)
    w.run_until(job["id"], {"running"})
    for _ in range(300):  # until the worker has written the running job's usage at least once
        w.worker.tick()
        if w.job(job["id"])["usage"].get("cpu_seconds"):
            break
    cancelled = w.api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(w.buyer))
    assert cancelled.status_code == 200, cancelled.text
    for _ in range(300):  # until the worker has stopped and removed its container
        w.worker.tick()
        if job["id"] not in w.runner.managed_jobs():
            break
    period = latest_period(w)
    before = lines(invoice_of(w.api, w.steward, contract, period))["cpu_hours"]
    usage = next(u for u in w.api.get("/v1/usage", headers=auth(w.steward)).json() if u["contract"] == contract)
    assert before["events"], "the cancelled job's usage was never audited"
    assert Decimal(before["quantity"]) >= Decimal(str(usage["cpu_hours"])) - Decimal("0.000001")

    # A restarted worker that meets the job again records the same total again: nothing is billed twice.
    w.worker._remove(job["id"], known=True)
    audited = [e for e in w.api.get("/v1/audit", params={"action": "job.usage"}, headers=auth(w.steward)).json()
               if e["object_id"] == job["id"]]
    assert len(audited) >= 2, "the second record did not happen, so the test proves nothing"
    after = lines(invoice_of(w.api, w.steward, contract, period))["cpu_hours"]
    assert (after["quantity"], after["amount"]) == (before["quantity"], before["amount"]), "usage billed twice"


def test_a_bad_period_is_a_problem(api: TestClient, tokens: Tokens) -> None:
    for period in ("2027-13", "2027-1", "last-month", "2027-01-01"):
        answer = api.get("/v1/invoices", params={"period": period}, headers=auth(tokens.steward()))
        assert answer.status_code == 422, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert "YYYY-MM" in answer.json()["detail"]


def test_a_contract_with_a_bad_price_list_is_refused(api: TestClient, tokens: Tokens) -> None:
    for prices in ({"cpu_hour": -1}, {"cpu_hour": "NaN"}, {"surprise": 1}):
        answer = api.post("/v1/contracts", headers=auth(tokens.steward()), json={
            "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["query"],
            "purpose": "p", "valid_until": "2099-01-01", "epsilon": 1.0, "prices": prices})
        assert answer.status_code == 422, answer.text
