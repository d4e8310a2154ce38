"""Invoices: a contract's price list applied to its audited usage, per month, as JSON or CSV."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse

from sandbox.api import schemas
from sandbox.api.deps import InstanceDep, PrincipalDep
from sandbox.billing import invoices as billing

router = APIRouter(prefix="/v1", tags=["invoices"])
CSV = "text/csv"


@router.get("/invoices", response_model=list[schemas.Invoice], response_model_exclude_unset=True,
            responses={200: {"content": {CSV: {"schema": {"type": "string"}}},
                             "description": f"the invoices; one row per line as CSV with `Accept: {CSV}`"}})
def list_invoices(request: Request, instance: InstanceDep, principal: PrincipalDep,
                  period: str | None = Query(default=None, max_length=40,
                                             description="YYYY-MM (UTC); the current month if absent"),
                  ) -> Any:
    """A steward sees its org's contracts' invoices, a buyer its own org's."""
    with instance.read_context(principal) as ctx:
        found = billing.invoices(ctx, period=period)
    if CSV in request.headers.get("accept", ""):
        return PlainTextResponse(billing.invoices_csv(found), media_type=CSV)
    return found
