"""Bad input never makes a 500: every route, fed the classes of input that once did (review 11.16), answers
with a 4xx problem+json.

The classes: integers past 2^63 (paths, query strings, JSON bodies, a job spec), dates whose UTC form
overflows (`9999-12-31T23:59:59-23:59`), nesting deep enough to exhaust a recursive parser (JSON bodies,
a job spec 200,000 deep, DP SQL 2,400 deep), and Parquet uploads with uint64 values past 2^63 or corrupt
pages. Routes are enumerated from the app, so a new one is fuzzed without being listed here.
"""

from __future__ import annotations

import copy
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from helpers import Tokens, auth, demo_card, register_demo
from jobworld import pack

from sandbox.auth.tokens import Role
from sandbox.instance import Instance
from sandbox.store.models import ImageRecord

HUGE_INTEGERS = [2**63, 2**64, -(2**63) - 1]
OVERFLOWING_DATES = ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"]
HOSTILE_TEXT = [str(n) for n in HUGE_INTEGERS] + OVERFLOWING_DATES + ["1e999"]
# A steward and a buyer between them reach every route's handler; the other roles stop at the role check.
ROLES = ("steward", "buyer")
DATASET = "carotid-stenting"


@dataclass
class World:
    api: TestClient
    tokens: dict[str, str]
    real: dict[str, str]  # a real value for each path parameter, so that only the hostile one is wrong
    contract: str


@pytest.fixture
def world(api: TestClient, instance: Instance, tokens: Tokens, tmp_path: Path) -> World:
    steward = tokens.steward()
    register_demo(api, steward, tmp_path)
    contract = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": "acme", "datasets": [DATASET], "tier": "aggregate", "kinds": ["analysis", "query", "notebook"],
        "purpose": "fuzz", "valid_until": "2099-01-01", "epsilon": 5.0, "quotas": {"cpu_hours": 1}})
    assert contract.status_code == 201, contract.text
    with instance.sessions() as session:
        session.add(ImageRecord(name="analysis", image_id="sha256:" + "0" * 64, seen_at=datetime.now(UTC)))
        session.commit()
    buyer = tokens.buyer()
    job = _submit(api, buyer, {"contract": contract.json()["id"], "dataset": DATASET, "command": ["true"]})
    assert job.status_code == 201, job.text
    issued = instance.issue_token(sub="fuzzed", org="acme", role=Role.BUYER, ttl_s=60)
    real = {"name": DATASET, "version": "1", "contract_id": contract.json()["id"], "job_id": job.json()["id"],
            "identifier": job.json()["id"], "jti": issued.jti, "path": "logs/stdout.txt", "policy": "default",
            "kernel_id": "0" * 8}
    return World(api=api, tokens={"steward": steward, "buyer": buyer, "auditor": tokens.auditor(),
                                  "admin": tokens.admin()}, real=real, contract=contract.json()["id"])


def _submit(api: TestClient, token: str, spec: Any, raw_spec: str | None = None) -> Any:
    text = raw_spec if raw_spec is not None else json.dumps(spec)
    return api.post("/v1/jobs", headers=auth(token), data={"spec": text},
                    files={"code": ("code.tar.gz", pack({"main.py": b"print(1)\n"}), "application/gzip")})


def all_routes(app: Any) -> list[tuple[str, str, APIRoute]]:
    """(method, path template, route) for every API route the app serves, nested routers included."""
    assert isinstance(app, FastAPI)
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # pragma: no cover - older FastAPI keeps a flat list
        pairs = [(route, route) for route in app.routes]
    else:
        pairs = [(context.original_route, context) for context in iter_route_contexts(app.routes)]
    found = []
    for original, context in pairs:
        if not isinstance(original, APIRoute):
            continue
        path = str(getattr(context, "path", None) or original.path)
        for method in sorted(original.methods or ()):
            if method != "HEAD":
                found.append((method, path, original))
    assert len(found) > 40, f"the route walk found only {len(found)} routes"
    return found


def _fill(template: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: values.get(m.group(1), "x"), template)


class Failures:
    """Every request that answered 5xx, or a 4xx that is not problem+json (an HTML page for the console), listed
    at the end."""

    def __init__(self) -> None:
        self.found: list[str] = []
        self.requests = 0

    def check(self, what: str, response: Any) -> None:
        self.requests += 1
        status = response.status_code
        kind = response.headers.get("content-type", "")
        if status >= 500:
            self.found.append(f"{what} -> {status}: {response.text[:160]}")
        elif status >= 400 and not kind.startswith(self.error_type(what)) and not what.startswith("WS"):
            self.found.append(f"{what} -> {status} as {kind or 'no content type'}")

    @staticmethod
    def error_type(what: str) -> str:
        """The console's pages answer errors as HTML pages; everything else as problem+json."""
        path = what.split(" ", 2)[1] if " " in what else ""
        return "text/html" if path.startswith("/console/") else "application/problem+json"

    def assert_none(self) -> None:
        assert self.requests > 0
        assert not self.found, f"{len(self.found)} of {self.requests} requests failed:\n" + "\n".join(self.found[:60])


def _send(api: TestClient, method: str, url: str, token: str, **kwargs: Any) -> Any:
    return api.request(method, url, headers={**auth(token), **kwargs.pop("headers", {})}, **kwargs)


def test_huge_integers_and_overflowing_dates_in_paths(world: World) -> None:
    failures = Failures()
    for method, template, _route in all_routes(world.api.app):
        names = re.findall(r"\{(\w+)(?::\w+)?\}", template)
        for name in names:
            for value in HOSTILE_TEXT:
                url = _fill(template, {**world.real, name: value})
                for role in ROLES:
                    failures.check(f"{method} {url} as {role}", _send(world.api, method, url, world.tokens[role]))
    failures.assert_none()


def test_huge_integers_and_overflowing_dates_in_query_strings(world: World) -> None:
    failures = Failures()
    for method, template, route in all_routes(world.api.app):
        url = _fill(template, world.real)
        for param in route.dependant.query_params:
            for value in HOSTILE_TEXT:
                for role in ROLES:
                    failures.check(f"{method} {url}?{param.alias}={value} as {role}",
                                   _send(world.api, method, url, world.tokens[role], params={param.alias: value}))
        # Parameters a route does not declare, and the long-poll's own, on every route.
        for value in HOSTILE_TEXT[:2]:
            failures.check(f"{method} {url}?wait_s={value}&since=queued&limit={value}",
                           _send(world.api, method, url, world.tokens["buyer"],
                                 params={"wait_s": value, "since": "queued", "limit": value, "before": value}))
    failures.assert_none()


def _seeds(world: World) -> dict[tuple[str, str], dict[str, Any]]:
    """A valid body for each JSON route that takes one, so that a single hostile leaf gets deep."""
    return {
        ("POST", "/v1/datasets"): {**demo_card("fuzzed-set")},
        ("POST", "/v1/contracts"): {"buyer_org": "acme", "datasets": [DATASET], "tier": "dp_only", "kinds": ["query"],
                                    "purpose": "p", "valid_until": "2099-01-01", "epsilon": 1.0, "delta": 0.0,
                                    "quotas": {"cpu_hours": 1, "concurrent_jobs": 1, "output_mb": 5}},
        ("POST", "/v1/queries"): {"contract": world.contract, "dataset": DATASET, "epsilon": 0.1,
                                  "sql": f'SELECT COUNT(*) FROM "{DATASET}" WHERE age > 40'},
        ("POST", "/v1/tokens"): {"sub": "someone", "org": "acme", "role": "buyer", "ttl_s": 60},
        ("POST", "/v1/notebooks"): {"contract": world.contract, "dataset": DATASET},
        ("POST", "/v1/datasets/{name}/budget-cap"): {"epsilon": 10.0},
        ("POST", "/v1/datasets/{name}/versions/{version}/mock"): {"epsilon": 1.0},
        ("POST", "/v1/reviews/{job_id}/decisions"): {"release": ["a"], "reject": [], "comment": "c"},
        ("POST", "/v1/jobs/{job_id}/approve"): {"comment": "c"},
    }


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    else:
        yield path


def _replaced(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    changed = copy.deepcopy(body)
    target = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return changed


BODY_VALUES: list[Any] = [2**63, -(2**63) - 1, 10**400, OVERFLOWING_DATES[0], 1e308]


def test_huge_integers_and_overflowing_dates_in_bodies(world: World) -> None:
    failures = Failures()
    seeds = _seeds(world)
    role_for = {"/v1/queries": "buyer", "/v1/notebooks": "buyer"}
    for method, template, route in all_routes(world.api.app):
        if method not in ("POST", "PUT", "PATCH") or route.body_field is None:
            continue
        url = _fill(template, world.real)
        token = world.tokens[role_for.get(template, "admin" if template == "/v1/tokens" else "steward")]
        seed = seeds.get((method, template), {})
        for leaf in list(_leaves(seed)) if seed else []:
            if not leaf:
                continue
            for value in BODY_VALUES:
                body = _replaced(seed, leaf, value)
                failures.check(f"{method} {url} {'.'.join(map(str, leaf))}={value!r}",
                               _send(world.api, method, url, token, content=json.dumps(body),
                                     headers={"content-type": "application/json"}))
        for value in BODY_VALUES:  # a route without a seed still gets each value in every field it names
            failures.check(f"{method} {url} scalar {value!r}", _send(
                world.api, method, url, token, content=json.dumps(value), headers={"content-type": "application/json"}))
    failures.assert_none()


def test_deeply_nested_json_bodies(world: World) -> None:
    failures = Failures()
    deep_list = "[" * 100_000 + "]" * 100_000
    deep_object = '{"a":' * 50_000 + "1" + "}" * 50_000
    for method, template, _route in all_routes(world.api.app):
        if method not in ("POST", "PUT", "PATCH", "DELETE"):
            continue
        url = _fill(template, world.real)
        for name, body in (("list", deep_list), ("object", deep_object)):
            for role in ("steward", "buyer"):
                failures.check(f"{method} {url} nested {name} as {role}", _send(
                    world.api, method, url, world.tokens[role], content=body,
                    headers={"content-type": "application/json"}))
    failures.assert_none()


def test_job_specs_nested_deep_or_with_huge_integers(world: World) -> None:
    failures = Failures()
    spec = {"contract": world.contract, "dataset": DATASET, "command": ["true"],
            "resources": {"cpus": 1, "memory_mb": 256, "timeout_s": 60, "gpus": 0}}
    for leaf in [("resources", "cpus"), ("resources", "memory_mb"), ("resources", "timeout_s"), ("resources", "gpus"),
                 ("version",), ("command", 0)]:
        for value in BODY_VALUES:
            target = _replaced(spec, leaf, value) if leaf != ("version",) else {**spec, "version": value}
            failures.check(f"POST /v1/jobs spec {'.'.join(map(str, leaf))}={value!r}",
                           _submit(world.api, world.tokens["buyer"], target))
    for depth in (1_000, 200_000):
        failures.check(f"POST /v1/jobs spec nested {depth} deep",
                       _submit(world.api, world.tokens["buyer"], None, raw_spec="[" * depth + "]" * depth))
        failures.check(f"POST /v1/jobs spec with command nested {depth} deep", _submit(
            world.api, world.tokens["buyer"], None,
            raw_spec=json.dumps(spec).replace('["true"]', "[" * depth + '"x"' + "]" * depth)))
    failures.assert_none()


@pytest.mark.parametrize("sql_shape", ["parentheses", "not", "negation", "arithmetic", "case", "subquery",
                                       "function", "in_list"])
def test_dp_sql_nested_thousands_deep(world: World, sql_shape: str) -> None:
    table = f'"{DATASET}"'
    shapes = {
        "parentheses": lambda n: "(" * n + "age > 40" + ")" * n,
        "not": lambda n: "NOT " * n + "age > 40",
        "negation": lambda n: "age > " + "-" * n + "40",
        "arithmetic": lambda n: "age > " + "(1 + " * n + "1" + ")" * n,
        "case": lambda n: "age > " + "CASE WHEN age > 1 THEN " * n + "1" + " END" * n,
        "subquery": lambda n: "age IN " + "(SELECT age FROM " * n + table + ")" * n,
        "function": lambda n: "age > " + "abs(" * n + "1" + ")" * n,
        "in_list": lambda n: "age IN (" + ", ".join(str(2**63 + k) for k in range(n)) + ")",
    }
    # 2,400 deep where the query fits the 10,000-character limit on `sql`, else as deep as fits.
    depth = 2_400
    while len(shapes[sql_shape](depth)) > 9_800:
        depth -= 100
    where = shapes[sql_shape](depth)
    response = world.api.post("/v1/queries", headers=auth(world.tokens["buyer"]), json={
        "contract": world.contract, "dataset": DATASET, "epsilon": 0.1,
        "sql": f"SELECT COUNT(*) FROM {table} WHERE {where}"})
    failures = Failures()
    failures.check(f"POST /v1/queries {sql_shape} x{depth}", response)
    failures.assert_none()
    if sql_shape not in ("negation", "in_list"):  # flat in the parse tree: may be answered; others refused, saying why
        assert response.status_code == 422, response.text
        assert "nested more than" in response.json()["detail"], response.json()["detail"]


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="none")
    return buffer.getvalue()


def _registry_with(column: str, values: pa.Array) -> pa.Table:
    from sandbox.demo import generate_registry

    table = generate_registry(20, seed=7).slice(0, len(values))
    return table.set_column(table.schema.get_field_index(column), column, values)


def _corrupt_pages(data: bytes) -> bytes:
    """The same file with bytes in the middle (column pages) overwritten; footer and magic intact."""
    middle = bytearray(data)
    for offset in range(64, len(data) // 2, 7):
        middle[offset] = 0xFF
    return bytes(middle)


@pytest.mark.parametrize("upload", ["uint64 past 2^63", "uint64 at 2^64-1", "corrupt pages", "truncated footer",
                                    "footer length huge", "csv with huge integer"])
def test_bad_parquet_and_csv_uploads(world: World, upload: str) -> None:
    steward = world.tokens["steward"]
    created = world.api.post("/v1/datasets", headers=auth(steward), json=demo_card("uploads"))
    assert created.status_code == 201, created.text
    good = _parquet(_registry_with("age", pa.array([40] * 20, pa.int64())))
    name = "upload.parquet"
    data = {
        "uint64 past 2^63": _parquet(_registry_with("age", pa.array([2**63 + 5] * 20, pa.uint64()))),
        "uint64 at 2^64-1": _parquet(_registry_with("length_of_stay", pa.array([2**64 - 1] * 20, pa.uint64()))),
        "corrupt pages": _corrupt_pages(good),
        "truncated footer": good[:-12] + good[-4:],
        "footer length huge": good[:-8] + (2**31 - 1).to_bytes(4, "little") + b"PAR1",
    }.get(upload)
    if data is None:
        name = "upload.csv"
        data = b"patient_id,age\np1,18446744073709551616\n"
    response = world.api.post("/v1/datasets/uploads/versions", headers=auth(steward), files={"file": (name, data)})
    failures = Failures()
    failures.check(f"upload {upload}", response)
    failures.assert_none()
    assert 400 <= response.status_code < 500, response.text
