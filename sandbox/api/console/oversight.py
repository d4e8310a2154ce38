"""Oversight pages: datasets and their cards, contracts, DP budgets as bars, usage over time, invoices, and
the audit log with the chain's verification.

Each page calls the service function its API route calls, with the signed-in caller's context, so it
shows what `GET /v1/...` answers that caller and refuses whom that route refuses. Charts and bars are SVG
whose geometry is computed here and written into attributes (the pages allow no inline style).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from sqlalchemy import select

from sandbox import contracts
from sandbox.api.console.pages import page_headers, render
from sandbox.api.console.session import ConsoleUser, require_role
from sandbox.audit import read_events, verify_stored_chain
from sandbox.auth.tokens import Principal, Role
from sandbox.billing import invoices as billing
from sandbox.billing import meters
from sandbox.billing.prices import parse_period
from sandbox.catalog import registration, signing
from sandbox.catalog import service as catalog
from sandbox.context import Context
from sandbox.dp import queries
from sandbox.errors import Invalid, NotFound
from sandbox.instance import Instance
from sandbox.jobs import service as jobs
from sandbox.store.models import AuditEvent, Dataset, Job

router = APIRouter(prefix="/console", tags=["console"], include_in_schema=False)

BAR_WIDTH = 320  # px of a budget bar at the contract's total epsilon
CHART_DAYS = 30
CHART_HEIGHT = 80
COLUMN_WIDTH = 12
AUDIT_PAGE = 50
MAX_SEQS = 500  # events one audit link may name (an invoice line's)
# The audited events that charge epsilon to a contract, and the detail that holds the amount: the invoices' own.
EPSILON_EVENTS = {action: detail for action, pairs in meters.ADDED.items()
                  for quantity, detail in pairs if quantity == meters.EPSILON}


def _instance(request: Request) -> Instance:
    instance: Instance = request.app.state.instance
    return instance


# --- datasets ------------------------------------------------------------------------------------------

@router.get("/datasets", response_class=HTMLResponse)
async def datasets(request: Request, principal: ConsoleUser) -> Response:
    """The catalog as `GET /v1/datasets` shows the caller; a steward's own org's datasets first."""
    listing = await run_in_threadpool(_datasets, _instance(request), principal)
    own = [d for d in listing if d["own"]]
    others = [d for d in listing if not d["own"]]
    return render(request, "oversight_datasets.html", principal=principal, own=own, others=others)


def _datasets(instance: Instance, principal: Principal) -> list[dict[str, Any]]:
    steward_of = principal.org if principal.role is Role.STEWARD else None
    with instance.read_session() as session:
        body, _ = catalog.catalog_listing(session, steward_of=steward_of)
        owned = set(session.execute(select(Dataset.name).where(Dataset.owner_org == steward_of)).scalars()
                    ) if steward_of else set()
    listing: list[dict[str, Any]] = json.loads(body)
    return [{**view, "own": view["name"] in owned} for view in listing]


@router.get("/datasets/{name}", response_class=HTMLResponse)
async def dataset(request: Request, name: str, principal: ConsoleUser) -> Response:
    """One dataset's versions and card, as `GET /v1/datasets/{name}` shows the caller."""
    view, steward = await run_in_threadpool(_dataset, _instance(request), principal, name)
    return render(request, "oversight_dataset.html", principal=principal, dataset=view, steward_view=steward)


def _dataset(instance: Instance, principal: Principal, name: str) -> tuple[dict[str, Any], bool]:
    with instance.read_session() as session:
        found = catalog.get_dataset(session, name)
        steward = catalog.steward_view_for(principal, found)
        return catalog.dataset_view(found, steward=steward), steward


@router.get("/datasets/{name}/versions/{number}", response_class=HTMLResponse)
async def dataset_version(request: Request, name: str, number: int, principal: ConsoleUser) -> Response:
    """One version's de-identification report, difference, signature and provenance, for the owning org's
    stewards as `GET /v1/datasets/{name}/versions/{number}/deid` and `.../diff` give them; refused as they are."""
    require_role(principal, Role.STEWARD)
    page = await run_in_threadpool(_dataset_version, _instance(request), principal, name, number)
    return render(request, "oversight_version.html", principal=principal, **page)


def _dataset_version(instance: Instance, principal: Principal, name: str, number: int) -> dict[str, Any]:
    with instance.read_session() as session:
        # Another org's steward, like a missing name or number, gets 'not found' (`owned_dataset`).
        dataset = catalog.owned_dataset(session, name, principal)
        version = catalog.steward_version(dataset, number)
        signature: dict[str, Any] | None = None
        nonce = version.provenance.get("nonce")
        if version.signature is not None:
            signature = signing.buyer_view(version.signature)
            if isinstance(nonce, str):  # the owner's stewards open the commitment to the stored data
                signature = signing.steward_view(
                    version.signature, nonce=bytes.fromhex(nonce), sha256=version.sha256,
                    upload_sha256=str(version.schema.get("upload_sha256")), rows=version.rows,
                    deid_sha256=registration.report_sha256(version.deid) if version.deid else None)
            try:
                signing.verify_with_org_key(instance.settings.keys_dir, version.signature)
                signature["verified"] = True
            except (signing.SignatureMismatch, NotFound):
                signature["verified"] = False
        report = version.deid
        return {
            "dataset": {"name": dataset.name, "title": dataset.title},
            "dataset_version": catalog.version_view(version, steward=True),
            "report": report,
            "suggestions": [{**s, "rules": describe_generalisation(s.get("generalise") or {})}
                            for s in ((report or {}).get("k_anonymity") or {}).get("suggestions", [])],
            "diff": version.diff,
            "signature": signature,
            # The nonce opens the signature's commitment: it is checked above, not shown.
            "provenance": {key: describe_generalisation(value) if key == "generalised" and isinstance(value, dict)
                           else value for key, value in version.provenance.items() if key != "nonce"},
        }


def describe_generalisation(rules: dict[str, Any]) -> list[str]:
    """`{"age": {"band": 5}}` as `age in bands of 5`, one phrase per column. Pure."""
    phrases = []
    for column, rule in sorted(rules.items()):
        if rule.get("band") is not None:
            band = float(rule["band"])
            phrases.append(f"{column} in bands of {int(band) if band.is_integer() else band}")
        elif rule.get("to") is not None:
            phrases.append(f"{column} to its {rule['to']}")
        else:
            phrases.append(f"{column} as stored")
    return phrases


# --- contracts -----------------------------------------------------------------------------------------

@router.get("/contracts", response_class=HTMLResponse)
async def contract_list(request: Request, principal: ConsoleUser) -> Response:
    """Contracts as `GET /v1/contracts` lists them: validity, quotas, budget and prices."""
    views = await run_in_threadpool(_contracts, _instance(request), principal)
    return render(request, "oversight_contracts.html", principal=principal, contracts=views)


def _contracts(instance: Instance, principal: Principal) -> list[dict[str, Any]]:
    with instance.read_context(principal) as ctx:
        return [contracts.contract_view(c) for c in contracts.list_contracts(ctx)]


# --- budgets -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bar:
    """A ledger's bar in pixels: spent, reserved and left side by side, at the contract's total."""

    spent: float
    reserved: float
    left: float
    cap_x: float | None  # where the dataset's cap falls on this bar, when it is below the total
    cap_used: float | None  # the dataset-wide spent part of a `BAR_WIDTH` cap bar (stewards only)


def budget_bar(view: dict[str, Any], width: int = BAR_WIDTH) -> Bar:
    """The geometry of one ledger's bar, proportional to epsilon. Pure."""
    total = float(view["epsilon_total"])
    scale = width / total if total > 0 else 0.0

    def px(value: Any) -> float:
        return round(min(max(float(value or 0.0), 0.0) * scale, width), 2)

    spent = px(view["epsilon_spent"])
    reserved = min(px(view["epsilon_reserved"]), width - spent)
    left = min(px(view["epsilon_remaining"]), width - spent - reserved)
    cap = view.get("dataset_epsilon_cap")
    cap_x = px(cap) if cap is not None and float(cap) < total else None
    cap_used = None
    if cap is not None and float(cap) > 0 and view.get("dataset_epsilon_spent") is not None:
        cap_used = round(min(float(view["dataset_epsilon_spent"]) / float(cap), 1.0) * width, 2)
    return Bar(spent=spent, reserved=reserved, left=left, cap_x=cap_x, cap_used=cap_used)


@router.get("/budgets", response_class=HTMLResponse)
async def budgets(request: Request, principal: ConsoleUser) -> Response:
    """One bar per ledger (contract x dataset), from the same figures as `GET /v1/budgets`."""
    views = await run_in_threadpool(queries.budgets, _instance(request), principal)
    ledgers = [{**view, "bar": budget_bar(view)} for view in views]
    return render(request, "oversight_budgets.html", principal=principal, ledgers=ledgers, width=BAR_WIDTH)


# --- usage ---------------------------------------------------------------------------------------------

@router.get("/usage", response_class=HTMLResponse)
async def usage(request: Request, principal: ConsoleUser) -> Response:
    """`GET /v1/usage` as a table, and each contract's CPU-hours and epsilon per day as charts."""
    report, daily = await run_in_threadpool(_usage, _instance(request), principal)
    charts = [{"contract": contract, "days": days,
               "cpu": column_chart([d["day"] for d in days], [d["cpu_hours"] for d in days]),
               "epsilon": column_chart([d["day"] for d in days], [d["epsilon"] for d in days])}
              for contract, days in daily.items()]
    return render(request, "oversight_usage.html", principal=principal, report=report, charts=charts,
                  days=CHART_DAYS, chart_width=CHART_DAYS * COLUMN_WIDTH, chart_height=CHART_HEIGHT)


def _usage(instance: Instance, principal: Principal) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    with instance.read_context(principal) as ctx:
        report = jobs.usage_report(ctx)
        return report, daily_usage(ctx, [row["contract"] for row in report], today=datetime.now(UTC).date())


def daily_usage(ctx: Context, contract_ids: list[str], *, today: date,
                days: int = CHART_DAYS) -> dict[str, list[dict[str, Any]]]:
    """Per contract, the last `days` days (UTC): CPU-hours of the jobs that finished that day (as the
    caller sees each job's usage: coarsened for buyers, `job_view`), and the epsilon its audited DP
    charges took that day (`EPSILON_EVENTS`). `contract_ids` are the caller's, from `usage_report`."""
    first = today - timedelta(days=days - 1)
    since = datetime.combine(first, time(), tzinfo=UTC)
    series = {contract: {first + timedelta(days=n): {"cpu_hours": 0.0, "epsilon": 0.0} for n in range(days)}
              for contract in contract_ids}
    steward = not ctx.is_buyer
    finished = ctx.session.execute(jobs.visible_jobs(ctx, select(Job).where(
        Job.contract_id.in_(contract_ids), Job.finished_at >= since))).scalars()
    for job in finished:
        if job.finished_at is None:
            continue
        shown = job.usage if steward else jobs.buyer_usage(job.usage or {})
        day = series[job.contract_id].get(job.finished_at.astimezone(UTC).date())
        if day is not None:
            day["cpu_hours"] += float((shown or {}).get("cpu_seconds", 0.0)) / 3600
    charges = list(ctx.session.execute(select(AuditEvent).where(
        AuditEvent.action.in_(list(EPSILON_EVENTS)), AuditEvent.at >= since)).scalars())
    trained = {e.object_id for e in charges if e.object_type == "job"}
    job_contract = {job.id: job.contract_id for job in ctx.session.execute(
        jobs.visible_jobs(ctx, select(Job).where(Job.id.in_(trained)))).scalars()}
    for event in charges:
        details = event.details or {}
        contract = job_contract.get(event.object_id) if event.object_type == "job" else details.get("contract")
        amount = details.get(EPSILON_EVENTS[event.action])
        if not isinstance(contract, str) or contract not in series or not isinstance(amount, int | float):
            continue
        day = series[contract].get(event.at.astimezone(UTC).date())
        if day is not None:
            day["epsilon"] += float(amount)
    return {contract: [{"day": day.isoformat(), "cpu_hours": round(values["cpu_hours"], 6),
                        "epsilon": round(values["epsilon"], 6)} for day, values in by_day.items()]
            for contract, by_day in series.items()}


def column_chart(labels: list[str], values: list[float], *, height: int = CHART_HEIGHT,
                 column: int = COLUMN_WIDTH) -> dict[str, Any]:
    """Columns for `values`, tallest at `height`: each one's x, y and height in pixels. Pure."""
    peak = max(values, default=0.0)
    columns = []
    for index, (label, value) in enumerate(zip(labels, values, strict=True)):
        tall = round(value / peak * height, 2) if peak > 0 else 0.0
        columns.append({"x": index * column + 1, "y": round(height - tall, 2), "height": tall,
                        "width": column - 2, "value": value, "day": label})
    return {"peak": peak, "columns": columns, "first": labels[0] if labels else "",
            "last": labels[-1] if labels else ""}


# --- audit ---------------------------------------------------------------------------------------------

@router.get("/audit", response_class=HTMLResponse)
async def audit(request: Request, principal: ConsoleUser,
                action: str | None = Query(default=None, max_length=64),
                actor: str | None = Query(default=None, max_length=200),
                object_id: str | None = Query(default=None, max_length=200),
                q: str | None = Query(default=None, max_length=200),
                seq: str | None = Query(default=None, max_length=8000),
                before: int | None = Query(default=None, ge=1),
                limit: int = Query(default=AUDIT_PAGE, ge=1, le=500)) -> Response:
    """The audit log as `GET /v1/audit` reads it, searchable and newest first, under the chain's status."""
    require_role(principal, Role.STEWARD, Role.AUDITOR)
    filters = {"action": (action or "").strip(), "actor": (actor or "").strip(),
               "object_id": (object_id or "").strip(), "q": (q or "").strip(), "seq": (seq or "").strip()}
    seqs = parse_seqs(filters["seq"])
    report, events = await run_in_threadpool(_audit, _instance(request), principal, filters, seqs, before, limit)
    older = events[-1]["seq"] if len(events) == limit else None
    for event in events:
        event["details_text"] = json.dumps(event["details"], sort_keys=True, ensure_ascii=False)
    return render(request, "oversight_audit.html", principal=principal, chain=report, events=events,
                  filters=filters, older=older, before=before, limit=limit)


def parse_seqs(text: str) -> list[int]:
    """`1,2 3` as event numbers; anything else is refused (422)."""
    parts = [part for part in text.replace(",", " ").split() if part]
    if len(parts) > MAX_SEQS or not all(part.isdigit() and len(part) < 19 for part in parts):
        raise Invalid("seq names audit events by number: up to 500 whole numbers, separated by commas")
    return [int(part) for part in parts]


def _audit(instance: Instance, principal: Principal, filters: dict[str, str], seqs: list[int],
           before: int | None, limit: int) -> tuple[Any, list[dict[str, Any]]]:
    with instance.read_session() as session:
        report = verify_stored_chain(session, instance.public_key, instance.settings.audit_checkpoint_path)
    with instance.context(principal) as ctx:
        events = read_events(ctx.session, principal, ctx.audit, limit=limit, before=before,
                             action=filters["action"] or None, actor=filters["actor"] or None,
                             object_id=filters["object_id"] or None, text=filters["q"] or None, seqs=seqs)
    return report, events


# --- invoices ------------------------------------------------------------------------------------------

@router.get("/invoices", response_class=HTMLResponse)
async def invoices(request: Request, principal: ConsoleUser,
                   period: str | None = Query(default=None, max_length=40)) -> Response:
    """The caller's invoices for a month, as `GET /v1/invoices?period=` gives them, each line's events linked."""
    label, found = await run_in_threadpool(_invoices, _instance(request), principal, period or None)
    return render(request, "oversight_invoices.html", principal=principal, period=label, invoices=found,
                  audit_links=principal.role is Role.STEWARD, max_seqs=MAX_SEQS)


@router.get("/invoices.csv")
async def invoices_csv(request: Request, principal: ConsoleUser,
                       period: str | None = Query(default=None, max_length=40)) -> Response:
    """The same invoices as CSV, one row per line (`sandbox.billing.invoices.invoices_csv`)."""
    label, found = await run_in_threadpool(_invoices, _instance(request), principal, period or None)
    headers = {**page_headers(), "Content-Disposition": f'attachment; filename="invoices-{label}.csv"'}
    return PlainTextResponse(billing.invoices_csv(found), media_type="text/csv", headers=headers)


def _invoices(instance: Instance, principal: Principal, period: str | None) -> tuple[str, list[dict[str, Any]]]:
    label = parse_period(period, now=datetime.now(UTC)).label
    with instance.read_context(principal) as ctx:
        return label, billing.invoices(ctx, period=label)
