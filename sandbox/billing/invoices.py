"""Invoices: each visible contract's price list applied to its audited usage in one month (UTC).

A steward sees the invoices of the contracts its org granted, a buyer those of its own org's contracts
(as the usage report, which no other role reads). Quantities come from the audit chain only
(`sandbox.billing.meters`), and each line names the events it came from. Every invoice has the same
five lines in the same order, priced or not: an unpriced item shows its quantity at price 0, so an
invoice is also the contract's usage statement for the month.
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
from sandbox.store.models import AuditEvent, Contract, Job

CSV_COLUMNS = ("contract", "period", "currency", "item", "quantity", "unit", "unit_price", "amount", "events")


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
        query = query.where(Contract.owner_org == principal.org)
    contracts = list(ctx.session.execute(query).scalars())
    if not contracts:
        return []
    ids = {contract.id for contract in contracts}
    events = _metered_events(ctx, ids, month)
    created = dict(ctx.session.execute(select(AuditEvent.object_id, AuditEvent.seq).where(
        AuditEvent.action == "contract.create", AuditEvent.object_id.in_(ids))).all())
    found = []
    for contract in contracts:
        metered = meter(events.get(contract.id, []), month)
        valid = valid_during(contract, month)
        if not valid and not metered:
            continue
        prices = PriceList.from_stored(contract.prices)
        lines = _lines(prices, metered, flat=valid, created=created.get(contract.id))
        found.append({"contract": contract.id, "buyer_org": contract.buyer_org, "owner_org": contract.owner_org,
                      "period": month.label, "currency": prices.currency,
                      "lines": [line.as_dict() for line in lines], "total": format(total(lines), "f")})
    return found


def _metered_events(ctx: Context, contract_ids: set[str], month: Period) -> dict[str, list[MeterEvent]]:
    """The metered events of these contracts up to the month's end, by contract, in `seq` order."""
    job_contract = dict(ctx.session.execute(select(Job.id, Job.contract_id).where(
        Job.contract_id.in_(contract_ids))).all())
    by_contract: dict[str, list[MeterEvent]] = defaultdict(list)
    rows = ctx.session.execute(select(AuditEvent).where(
        AuditEvent.action.in_(METERED_ACTIONS), AuditEvent.at < month.end).order_by(AuditEvent.seq)).scalars()
    for event in rows:
        details = event.details or {}
        if event.object_type == "job":
            job: str | None = event.object_id
            contract = job_contract.get(event.object_id)
        else:
            job, contract = None, details.get("contract")
        if isinstance(contract, str) and contract in contract_ids:
            by_contract[contract].append(MeterEvent(seq=event.seq, at=event.at, action=event.action, job=job,
                                                    details=details))
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
                             " ".join(str(seq) for seq in line["events"])])
    return buffer.getvalue()
