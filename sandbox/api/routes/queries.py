"""DP queries and budgets."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from sandbox.api import schemas
from sandbox.api.deps import Buyer, InstanceDep, PrincipalDep, Steward
from sandbox.auth.tokens import Principal, Role
from sandbox.catalog.service import owned_dataset
from sandbox.dp import mock_publication, queries
from sandbox.instance import Instance
from sandbox.worker_socket import LONG_TIMEOUT_S, QUERY_TIMEOUT_S, ask_worker, principal_body

router = APIRouter(prefix="/v1", tags=["dp"])


class MockRequest(BaseModel):
    epsilon: float = Field(gt=0, le=100, allow_inf_nan=False)


class CapRequest(BaseModel):
    epsilon_cap: float | None = Field(default=None, gt=0, le=1000, allow_inf_nan=False)


@router.post("/queries", response_model=schemas.DpAnswer, response_model_exclude_unset=True)
async def query(body: queries.QueryRequest, instance: InstanceDep, buyer: Buyer) -> dict[str, Any]:
    """Check the query against the store and the card, then let the worker answer it beside the data."""
    return await run_in_threadpool(_forward_query, instance, buyer, body)


def _forward_query(instance: Instance, buyer: Principal, body: queries.QueryRequest) -> dict[str, Any]:
    queries.check_query(instance, buyer, body)
    return ask_worker(instance, "/dp/query",
                      {"principal": principal_body(buyer), "query": body.model_dump(mode="json"), "via": "api"},
                      timeout_s=QUERY_TIMEOUT_S, what="a DP query")


def _require_owner(instance: Instance, steward: Principal, name: str) -> None:
    """Another org's dataset is 'not found' to a steward, as a missing one is (review 11.10)."""
    with instance.read_session() as session:
        owned_dataset(session, name, steward)


@router.get("/budgets", response_model=list[schemas.BudgetView], response_model_exclude_unset=True)
def budgets(instance: InstanceDep, principal: PrincipalDep) -> list[dict[str, object]]:
    return queries.budgets(instance, principal)


@router.post("/datasets/{name}/budget-cap", response_model=schemas.DatasetBudgetCap, response_model_exclude_unset=True)
def set_cap(name: str, body: CapRequest, instance: InstanceDep, steward: Steward) -> dict[str, Any]:
    _require_owner(instance, steward, name)
    return queries.set_dataset_cap(instance, steward, name, body.epsilon_cap)


@router.post("/datasets/{name}/versions/{version}/mock", status_code=201, response_model=schemas.DpMockView,
             response_model_exclude_unset=True)
async def publish_mock(name: str, version: int, body: MockRequest, instance: InstanceDep,
                       steward: Steward) -> dict[str, object]:
    """Build the version's DP mock from noisy marginals, paid from the dataset's budget."""
    await run_in_threadpool(_require_owner, instance, steward, name)
    return await run_in_threadpool(
        ask_worker, instance, "/dp/mock",
        {"principal": principal_body(steward), "dataset": name, "version": version, "epsilon": body.epsilon},
        timeout_s=LONG_TIMEOUT_S, what="publishing a DP mock")


@router.get("/datasets/{name}/versions/{version}/mock", response_class=FileResponse,
            responses=schemas.file_answer("application/vnd.apache.parquet", "the DP mock as Parquet"))
def download_mock(name: str, version: int, instance: InstanceDep, principal: PrincipalDep) -> FileResponse:
    """The DP mock, to develop code against before it runs on the real rows."""
    if principal.role is Role.STEWARD:
        _require_owner(instance, principal, name)
    with instance.context(principal) as ctx:
        mock, path = mock_publication.mock_file(ctx, name, version)
        return FileResponse(path, media_type="application/vnd.apache.parquet",
                            filename=f"{name}-v{version}-mock.parquet", headers={"X-Content-SHA256": mock.sha256})
