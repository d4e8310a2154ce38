"""Who may call what: every /v1 route wants a token, refuses the wrong roles, and hides other orgs' objects.

`ROLE_TABLE` is the authorization contract of the API. A route missing from it fails
`test_role_table_covers_every_v1_route`, so a new endpoint cannot ship without a decision here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from auth_support import assert_problem, bearer
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from helpers import demo_card, register_demo

from sandbox.auth.tokens import Role

if TYPE_CHECKING:  # only for annotations: `conftest` at run time may be another folder's
    from helpers import Tokens

ANY_ROLE = frozenset(Role)
STEWARD = frozenset({Role.STEWARD})
ADMIN = frozenset({Role.ADMIN})
STEWARD_OR_AUDITOR = frozenset({Role.STEWARD, Role.AUDITOR})
CONTRACT_READERS = frozenset({Role.STEWARD, Role.BUYER, Role.AUDITOR})
BUYER = frozenset({Role.BUYER})
JOB_READERS = frozenset({Role.BUYER, Role.STEWARD})

ROLE_TABLE: dict[tuple[str, str], frozenset[Role]] = {
    ("GET", "/v1/whoami"): ANY_ROLE,
    ("POST", "/v1/tokens"): ADMIN,
    ("POST", "/v1/tokens/{jti}/revoke"): ADMIN,
    ("GET", "/v1/datasets"): ANY_ROLE,
    ("POST", "/v1/datasets"): STEWARD,
    ("GET", "/v1/datasets/{name}"): ANY_ROLE,
    ("POST", "/v1/datasets/{name}/versions"): STEWARD,
    ("POST", "/v1/datasets/drafts"): STEWARD,
    ("GET", "/v1/datasets/{name}/versions/{version}/deid"): STEWARD,
    ("GET", "/v1/datasets/{name}/versions/{version}/diff"): STEWARD,
    ("POST", "/v1/datasets/{name}/versions/{version}/remediate"): STEWARD,
    ("POST", "/v1/datasets/{name}/versions/{version}/override"): STEWARD,
    ("GET", "/v1/orgs/{org}/keys"): ANY_ROLE,
    ("GET", "/v1/contracts"): CONTRACT_READERS,
    ("POST", "/v1/contracts"): STEWARD,
    ("GET", "/v1/contracts/{contract_id}"): CONTRACT_READERS,
    ("POST", "/v1/contracts/{contract_id}/revoke"): STEWARD,
    ("POST", "/v1/contracts/{contract_id}/consent"): STEWARD,
    ("GET", "/v1/policies"): ANY_ROLE,
    ("POST", "/v1/policies"): STEWARD,
    ("GET", "/v1/policies/{name}/versions/{version}"): ANY_ROLE,
    ("POST", "/v1/policies/{name}/versions/{version}/approve"): STEWARD,
    ("POST", "/v1/policies/{name}/versions/{version}/reject"): STEWARD,
    ("GET", "/v1/audit"): STEWARD_OR_AUDITOR,
    ("GET", "/v1/audit/verify"): STEWARD_OR_AUDITOR,
    ("POST", "/v1/jobs"): BUYER,
    ("GET", "/v1/jobs"): JOB_READERS,
    ("GET", "/v1/jobs/{job_id}"): JOB_READERS,
    ("GET", "/v1/jobs/{job_id}/logs"): JOB_READERS,
    ("GET", "/v1/jobs/{job_id}/outputs"): JOB_READERS,
    ("GET", "/v1/jobs/{job_id}/outputs/{path}"): JOB_READERS,
    ("GET", "/v1/jobs/{job_id}/manifest"): JOB_READERS,
    ("GET", "/v1/jobs/{job_id}/report"): JOB_READERS,
    ("POST", "/v1/jobs/{job_id}/cancel"): JOB_READERS,
    ("POST", "/v1/jobs/{job_id}/approve"): STEWARD,
    ("POST", "/v1/jobs/{job_id}/reject"): STEWARD,
    ("GET", "/v1/reviews"): STEWARD,
    ("GET", "/v1/reviews/{job_id}/files/{path}"): STEWARD,
    ("POST", "/v1/reviews/{job_id}/decisions"): STEWARD,
    ("GET", "/v1/usage"): JOB_READERS,
    ("GET", "/v1/invoices"): JOB_READERS,
    ("GET", "/v1/signing-key"): ANY_ROLE,
    ("POST", "/v1/queries"): BUYER,
    ("GET", "/v1/budgets"): JOB_READERS,
    ("POST", "/v1/datasets/{name}/budget-cap"): STEWARD,
    ("POST", "/v1/datasets/{name}/versions/{version}/mock"): STEWARD,
    ("GET", "/v1/datasets/{name}/versions/{version}/mock"): JOB_READERS,
    ("POST", "/v1/notebooks"): BUYER,
    ("GET", "/v1/notebooks"): JOB_READERS,
    ("GET", "/v1/notebooks/{identifier}"): JOB_READERS,
    ("DELETE", "/v1/notebooks/{identifier}"): BUYER,
    ("POST", "/v1/notebooks/{identifier}/exports"): BUYER,
}

PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")


def v1_routes(app: object) -> dict[tuple[str, str], APIRoute]:
    """Every (method, path template) the app serves under /v1."""
    assert isinstance(app, FastAPI), f"expected the FastAPI app, got {type(app).__name__}"
    candidates: list[tuple[object, object]]
    try:  # FastAPI >= 0.16x nests included routers; this walks them.
        from fastapi.routing import iter_route_contexts
    except ImportError:  # pragma: no cover - older FastAPI keeps a flat list
        candidates = [(route, route) for route in app.routes]
    else:
        candidates = [(context.original_route, context) for context in iter_route_contexts(app.routes)]
    found: dict[tuple[str, str], APIRoute] = {}
    for original, context in candidates:
        if not isinstance(original, APIRoute):
            continue
        # `{path:path}` in the route is `{path}` in the schema and in ROLE_TABLE.
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", str(getattr(context, "path", None) or original.path))
        if not path.startswith("/v1/") and path != "/v1":
            continue
        for method in sorted(original.methods or ()):
            if method != "HEAD":
                found[(method, path)] = original
    # The schema is a second, independent listing: a walk that misses routes must not pass quietly.
    for path, operations in app.openapi()["paths"].items():
        if path.startswith("/v1"):
            for method in operations:
                assert (method.upper(), path) in found, f"route walk missed {method.upper()} {path}"
    return found


def fill(path: str, values: dict[str, str]) -> str:
    return PARAM.sub(lambda match: values.get(match.group(1), f"unknown-{match.group(1)}"), path)


def call(api: TestClient, method: str, path: str, token: str | None) -> httpx.Response:
    headers = bearer(token) if token else {}
    if method in {"POST", "PUT", "PATCH"}:
        return api.request(method, path, headers=headers, json={})
    return api.request(method, path, headers=headers)


@dataclass
class World:
    """Real objects for the path parameters, and a token per role (buyer of org acme)."""

    api: TestClient
    tokens: Tokens
    dataset: str
    contract_id: str
    spare_jti: str
    by_role: dict[Role, str]

    def path(self, template: str) -> str:
        name = "default" if template.startswith("/v1/policies/") else self.dataset
        return fill(template, {"name": name, "version": "1", "contract_id": self.contract_id,
                               "jti": self.spare_jti, "job_id": "j-0000000000000000", "path": "result.csv"})


@pytest.fixture
def world(api: TestClient, tokens: Tokens) -> Iterator[World]:
    steward = tokens.steward()
    created = api.post("/v1/datasets", json=demo_card("carotid-stenting"), headers=bearer(steward))
    assert created.status_code == 201, created.text
    contract = api.post("/v1/contracts", headers=bearer(steward), json={
        "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["analysis"],
        "purpose": "role checks", "valid_until": "2099-01-01", "epsilon": 1.0})
    assert contract.status_code == 201, contract.text
    spare = tokens.instance.issue_token(sub="spare", org="acme", role=Role.BUYER, ttl_s=600)
    yield World(api=api, tokens=tokens, dataset="carotid-stenting", contract_id=contract.json()["id"],
                spare_jti=spare.jti, by_role={
                    Role.STEWARD: steward, Role.BUYER: tokens.buyer(org="acme"),
                    Role.AUDITOR: tokens.auditor(), Role.ADMIN: tokens.admin()})


def test_every_v1_route_needs_a_token(api: TestClient) -> None:
    routes = v1_routes(api.app)
    assert len(routes) >= len(ROLE_TABLE) // 2, f"found suspiciously few /v1 routes: {sorted(routes)}"
    failures = []
    for method, template in sorted(routes):
        path = fill(template, {"version": "1"}).replace("unknown-", "dummy-")
        for token in (None, "not-a-token"):
            try:
                assert_problem(call(api, method, path, token), 401,
                               f"{method} {path} with {'no token' if token is None else 'a garbage token'}")
            except AssertionError as failure:
                failures.append(str(failure).splitlines()[0])
    assert not failures, "unauthenticated calls got through:\n" + "\n".join(failures)


def test_role_table_covers_every_v1_route(api: TestClient) -> None:
    served = set(v1_routes(api.app))
    unlisted = sorted(served - ROLE_TABLE.keys())
    stale = sorted(ROLE_TABLE.keys() - served)
    assert not unlisted, f"routes without an entry in ROLE_TABLE (decide who may call them): {unlisted}"
    assert not stale, f"ROLE_TABLE lists routes the app no longer serves: {stale}"


def test_disallowed_roles_get_403(world: World) -> None:
    failures = []
    for (method, template), allowed in sorted(ROLE_TABLE.items()):
        for role in sorted(set(Role) - allowed):
            response = call(world.api, method, world.path(template), world.by_role[role])
            try:
                assert_problem(response, 403, f"a token of role {role.value} on {method} {template}")
            except AssertionError as failure:
                failures.append(str(failure).splitlines()[0])
    assert not failures, "roles got past the role checks:\n" + "\n".join(failures)


def test_allowed_roles_are_not_refused(world: World) -> None:
    """Each allowed role passes the role check: no 401/403 and no 5xx, whatever the body makes of it."""
    failures = []
    # Reads first, so the writes (revoking the contract and the spare token) come last.
    ordered = sorted(ROLE_TABLE.items(), key=lambda item: (item[0][0] != "GET", item[0][1]))
    for (method, template), allowed in ordered:
        for role in sorted(allowed):
            response = call(world.api, method, world.path(template), world.by_role[role])
            if response.status_code in (401, 403) or response.status_code >= 500:
                failures.append(f"a token of role {role.value} on {method} {template}: "
                                f"{response.status_code} {response.text[:200]}")
    assert not failures, "allowed roles were refused or broke the service:\n" + "\n".join(failures)


def test_contracts_are_scoped_to_the_buyer_org(api: TestClient, tokens: Tokens, tmp_path: Path) -> None:
    steward = tokens.steward()
    register_demo(api, steward, tmp_path)
    created = api.post("/v1/contracts", headers=bearer(steward), json={
        "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate",
        "kinds": ["analysis", "query"], "purpose": "org scoping", "valid_until": "2099-01-01", "epsilon": 1.0})
    assert created.status_code == 201, created.text
    contract_id = created.json()["id"]
    acme = tokens.buyer(org="acme", sub="alice")
    other = tokens.buyer(org="other", sub="eve")

    own = api.get(f"/v1/contracts/{contract_id}", headers=bearer(acme))
    assert own.status_code == 200, f"the acme buyer cannot read its own contract: {own.text}"
    assert contract_id in [c["id"] for c in api.get("/v1/contracts", headers=bearer(acme)).json()], (
        "the acme buyer does not see its own contract in the list"
    )

    foreign = assert_problem(api.get(f"/v1/contracts/{contract_id}", headers=bearer(other)), 404,
                             "org 'other' reading acme's contract")
    missing = assert_problem(api.get("/v1/contracts/c-000000000000", headers=bearer(other)), 404,
                             "org 'other' reading a contract that does not exist")
    assert {k: v for k, v in foreign.items() if k != "detail"} == \
        {k: v for k, v in missing.items() if k != "detail"}, (
        f"another org's contract and a missing one answer differently: {foreign} vs {missing}"
    )
    assert foreign["detail"].replace(contract_id, "X") == missing["detail"].replace("c-000000000000", "X"), (
        f"the 404 detail tells another org's contract from a missing one: {foreign['detail']!r}"
    )
    listed = api.get("/v1/contracts", headers=bearer(other))
    assert listed.status_code == 200, listed.text
    assert contract_id not in listed.text, f"acme's contract leaked into org 'other''s list: {listed.json()}"

    for who, token in (("acme buyer", acme), ("other buyer", other)):
        assert_problem(api.post(f"/v1/contracts/{contract_id}/revoke", headers=bearer(token), json={}), 403,
                       f"the {who} revoking acme's contract")
    after = api.get(f"/v1/contracts/{contract_id}", headers=bearer(steward)).json()
    assert after["revoked_at"] is None and after["state"] == "active", (
        f"a refused revocation still revoked the contract: {after}"
    )
