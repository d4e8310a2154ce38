"""DP queries and budgets."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from sandbox.api.deps import Buyer, InstanceDep, PrincipalDep, Steward
from sandbox.auth.tokens import Principal, Role
from sandbox.catalog.service import owned_dataset
from sandbox.dp import mock_publication, queries
from sandbox.instance import Instance
from sandbox.store.models import Contract

router = APIRouter(prefix="/v1", tags=["dp"])


class MockRequest(BaseModel):
    epsilon: float = Field(gt=0, le=100, allow_inf_nan=False)


class CapRequest(BaseModel):
    epsilon_cap: float | None = Field(default=None, gt=0, le=1000, allow_inf_nan=False)


@router.post("/queries")
async def query(body: queries.QueryRequest, instance: InstanceDep, buyer: Buyer) -> dict[str, Any]:
    return await run_in_threadpool(queries.run_query, instance, buyer, body)


def _require_owner(instance: Instance, steward: Principal, name: str) -> None:
    """Another org's dataset is 'not found' to a steward, as a missing one is (review 11.10)."""
    with instance.read_session() as session:
        owned_dataset(session, name, steward)


@router.get("/budgets")
def budgets(instance: InstanceDep, principal: PrincipalDep) -> list[dict[str, object]]:
    views = queries.budgets(instance, principal)
    if principal.role is not Role.STEWARD:
        return views
    # A steward sees the ledgers of contracts their own org granted, never another holder's.
    with instance.read_session() as session:
        own = set(session.execute(select(Contract.id).where(Contract.owner_org == principal.org)).scalars())
    return [view for view in views if view.get("contract") in own]


@router.post("/datasets/{name}/budget-cap")
def set_cap(name: str, body: CapRequest, instance: InstanceDep, steward: Steward) -> dict[str, Any]:
    _require_owner(instance, steward, name)
    return queries.set_dataset_cap(instance, steward, name, body.epsilon_cap)


@router.post("/datasets/{name}/versions/{version}/mock", status_code=201)
async def publish_mock(name: str, version: int, body: MockRequest, instance: InstanceDep,
                       steward: Steward) -> dict[str, object]:
    """Build the version's DP mock from noisy marginals, paid from the dataset's budget."""
    await run_in_threadpool(_require_owner, instance, steward, name)
    return await run_in_threadpool(mock_publication.publish_mock, instance, steward, dataset=name, version=version,
                                   epsilon=body.epsilon)


@router.get("/datasets/{name}/versions/{version}/mock")
def download_mock(name: str, version: int, instance: InstanceDep, principal: PrincipalDep) -> FileResponse:
    """The DP mock, to develop code against before it runs on the real rows."""
    if principal.role is Role.STEWARD:
        _require_owner(instance, principal, name)
    with instance.context(principal) as ctx:
        mock, path = mock_publication.mock_file(ctx, name, version)
        return FileResponse(path, media_type="application/vnd.apache.parquet",
                            filename=f"{name}-v{version}-mock.parquet", headers={"X-Content-SHA256": mock.sha256})
