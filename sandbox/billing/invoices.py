"""Invoices: each visible contract's price list applied to its audited usage in one month (UTC).

A steward sees the invoices of the contracts naming its org's data, a buyer those of its own org's
contracts (as the usage report, which no other role reads). A contract naming data of several orgs
(issue 17) has each org's five lines: a job's compute and released bytes split equally among the orgs
whose data it read, each epsilon to the org of the dataset that paid it, the flat fee to the contract's
owner; a steward sees its own org's lines only, the buyer all of them, each naming its `org`.
Quantities come from the audit chain only (`sandbox.billing.meters`), and each line names the events
it came from. Every invoice has the same five lines (per org) in the same order, priced or not: an
unpriced item shows its quantity at price 0, so an invoice is also the contract's usage statement for
the month.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from sandbox.auth.tokens import Role
from sandbox.billing.meters import (
    BYTES_RELEASED,
    CPU_SECONDS,
    EPSILON,
    GPU_SECONDS,
    METERED_ACTIONS,
    Metered,
    MeterEvent,
    meter,
    split_by_org,
)
from sandbox.billing.prices import (
    Item,
    Line,
    Period,
    PriceList,
    billed_hours,
    gigabytes,
    parse_period,
    priced_line,
    total,
)
from sandbox.context import Context
from sandbox.store.models import AuditEvent, Contract, ContractParty, Dataset, Job
from sandbox.store.parties import datasets_orgs, party_contracts

CSV_COLUMNS = ("contract", "period", "currency", "item", "quantity", "unit", "unit_price", "amount", "events", "org")


def valid_during(contract: Contract, period: Period) -> bool:
    """Whether the contract was valid at any moment of the period (from valid_from until valid_until, or
    until its revocation): the months its flat fee is charged for, and no others."""
    ends = contract.valid_until if contract.revoked_at is None else min(contract.valid_until, contract.revoked_at)
    return contract.valid_from < period.end and ends >= period.start


def invoices(ctx: Context, *, period: str | None) -> list[dict[str, Any]]:
    """The caller's invoices for `period` (YYYY-MM; None is the current UTC month).

    A contract is invoiced for a month it was valid in (its flat fee is charged for each such month, for
    any overlap, and never for a month outside its validity) or in which it has metered usage.
    """
    principal = ctx.require_role(Role.STEWARD, Role.BUYER)
    month = parse_period(period, now=datetime.now(UTC))
    query = select(Contract).order_by(Contract.created_at, Contract.id)
    if ctx.is_buyer:
        query = query.where(Contract.buyer_org == principal.org)
    else:
        query = query.where(Contract.id.in_(party_contracts(principal.org)))
    contracts = list(ctx.session.execute(query).scalars())
    if not contracts:
        return []
    ids = {contract.id for contract in contracts}
    events = _metered_events(ctx, ids, month)
    job_orgs = _job_orgs(ctx, ids)
    parties: dict[str, list[str]] = {}
    for contract_id, org in ctx.session.execute(select(ContractParty.contract_id, ContractParty.org).where(
            ContractParty.contract_id.in_(ids)).order_by(ContractParty.org)).all():
        parties.setdefault(contract_id, []).append(org)
    created = dict(ctx.session.execute(select(AuditEvent.object_id, AuditEvent.seq).where(
        AuditEvent.action == "contract.create", AuditEvent.object_id.in_(ids))).all())
    found = []
    for contract in contracts:
        shares = split_by_org(events.get(contract.id, []), job_orgs=job_orgs, owner=contract.owner_org)
        orgs = parties.get(contract.id) or [contract.owner_org]
        metered = {org: meter(shares.get(org, []), month) for org in orgs}
        valid = valid_during(contract, month)
        if not valid and not any(metered.values()):
            continue
        prices = PriceList.from_stored(contract.prices)
        lines: list[Line] = []
        shown: list[dict[str, Any]] = []
        for org in orgs:
            if not ctx.is_buyer and org != principal.org:
                continue  # another hospital's share is between it and the buyer
            own = _lines(prices, metered[org], flat=valid and org == contract.owner_org,
                         created=created.get(contract.id))
            lines.extend(own)
            shown.extend({**line.as_dict(), "org": org} for line in own)
        found.append({"contract": contract.id, "buyer_org": contract.buyer_org, "owner_org": contract.owner_org,
                      "period": month.label, "currency": prices.currency,
                      "lines": shown, "total": format(total(lines), "f")})
    return found


def _job_orgs(ctx: Context, contract_ids: set[str]) -> dict[str, list[str]]:
    """The data-holder orgs of each job of these contracts that names them (`Job.datasets`)."""
    found: dict[str, list[str]] = {}
    for job, datasets in ctx.session.execute(select(Job.id, Job.datasets).where(Job.contract_id.in_(contract_ids))):
        orgs = datasets_orgs(datasets)
        if orgs:
            found[job] = orgs
    return found


def _metered_events(ctx: Context, contract_ids: set[str], month: Period) -> dict[str, list[MeterEvent]]:
    """The metered events of these contracts up to the month's end, by contract, in `seq` order."""
    job_contract = dict(ctx.session.execute(select(Job.id, Job.contract_id).where(
        Job.contract_id.in_(contract_ids))).all())
    by_contract: dict[str, list[MeterEvent]] = defaultdict(list)
    holders = dict(ctx.session.execute(select(Dataset.name, Dataset.owner_org)).all())
    rows = ctx.session.execute(select(AuditEvent).where(
        AuditEvent.action.in_(METERED_ACTIONS), AuditEvent.at < month.end).order_by(AuditEvent.seq)).scalars()
    for event in rows:
        details = event.details or {}
        org: str | None = None
        if event.object_type == "job":
            job: str | None = event.object_id
            contract = job_contract.get(event.object_id)
            # A training run over several datasets settles each ledger in its own event.
            org = str(details["dataset_org"]) if details.get("dataset_org") else None
        else:
            job, contract = None, details.get("contract")
            if event.object_type in ("dataset", "dataset_version"):
                # A DP query names "dataset@version": its epsilon is that dataset's holder's.
                org = holders.get(event.object_id.rpartition("@")[0] or event.object_id)
        if isinstance(contract, str) and contract in contract_ids:
            by_contract[contract].append(MeterEvent(seq=event.seq, at=event.at, action=event.action, job=job,
                                                    details=details, org=org))
    return by_contract


def _lines(prices: PriceList, metered: dict[str, Metered], *, flat: bool, created: int | None) -> list[Line]:
    def used(quantity: str) -> Metered:
        return metered.get(quantity, Metered())

    cpu, gpu, epsilon, released = used(CPU_SECONDS), used(GPU_SECONDS), used(EPSILON), used(BYTES_RELEASED)
    flat_events = (created,) if flat and created is not None else ()
    return [
        priced_line(Item.FLAT_FEE, Decimal(1 if flat else 0), prices, flat_events),
        priced_line(Item.CPU_HOURS, billed_hours(cpu.quantity), prices, tuple(cpu.events)),
        priced_line(Item.GPU_HOURS, billed_hours(gpu.quantity), prices, tuple(gpu.events)),
        priced_line(Item.EPSILON, epsilon.quantity, prices, tuple(epsilon.events)),
        priced_line(Item.RELEASED_GB, gigabytes(released.quantity), prices, tuple(released.events)),
    ]


def invoices_csv(found: list[dict[str, Any]]) -> str:
    """One row per invoice line; `events` are the audit seqs, space-separated."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for invoice in found:
        for line in invoice["lines"]:
            writer.writerow([invoice["contract"], invoice["period"], invoice["currency"], line["item"],
                             line["quantity"], line["unit"], line["unit_price"], line["amount"],
                             " ".join(str(seq) for seq in line["events"]), line.get("org", "")])
    return buffer.getvalue()
