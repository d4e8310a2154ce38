"""Every failure leaves as problem+json with a request id, never a trace; health and metrics answer."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
from fastapi.testclient import TestClient
from helpers import Tokens, auth

from sandbox.api.app import create_app
from sandbox.instance import Instance

PROBLEM_JSON = "application/problem+json"
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def assert_problem(response: httpx.Response, status: int, case: str = "") -> None:
    label = case or f"{response.request.method} {response.request.url.path}"
    assert response.status_code == status, f"{label}: {response.status_code} {response.text}"
    assert response.headers["content-type"] == PROBLEM_JSON, f"{label}: {response.headers['content-type']}"
    body = response.json()
    assert {"type", "title", "status", "detail"} <= set(body), f"{label}: {body}"
    assert body["status"] == status and isinstance(body["detail"], str)
    assert REQUEST_ID.match(response.headers.get("x-request-id", "")), f"{label}: no x-request-id header"
    assert "Traceback" not in response.text and 'File "' not in response.text, f"{label}: stack trace leaked"


def test_unknown_route_and_wrong_method(api: TestClient, tokens: Tokens) -> None:
    assert_problem(api.get("/v1/nothing-here"), 404)
    assert_problem(api.get("/v1/nothing-here", headers=auth(tokens.steward())), 404)
    assert_problem(api.get("/favicon.ico"), 404)
    wrong = api.delete("/v1/datasets", headers=auth(tokens.steward()))
    assert_problem(wrong, 405)
    assert "GET" in wrong.headers.get("allow", "") or "POST" in wrong.headers.get("allow", "")
    assert_problem(api.put("/healthz"), 405)


def test_auth_and_conflict_errors_are_problems(api: TestClient, tokens: Tokens) -> None:
    assert_problem(api.get("/v1/datasets"), 401)
    assert_problem(api.get("/v1/datasets", headers={"Authorization": "Bearer not-a-jwt"}), 401)
    assert_problem(api.post("/v1/datasets", json={}, headers=auth(tokens.buyer())), 403)
    assert_problem(api.get("/v1/datasets/absent", headers=auth(tokens.buyer())), 404)
    assert_problem(api.post("/v1/contracts/c-absent/revoke", headers=auth(tokens.steward())), 404)


def test_malformed_json_is_422(api: TestClient, tokens: Tokens) -> None:
    headers = {**auth(tokens.steward()), "content-type": "application/json"}
    for case, body in {"truncated": b'{"buyer_org": "acme", ', "not json": b"buyer_org=acme",
                       "invalid utf-8": b'{"purpose": "\xff\xfe"}', "empty": b"",
                       "a list": b"[1, 2, 3]"}.items():
        assert_problem(api.post("/v1/contracts", content=body, headers=headers), 422, case)


def test_validation_errors_do_not_echo_input(api: TestClient, tokens: Tokens) -> None:
    secret = "sk-live-9f8e7d6c5b4a-DO-NOT-ECHO"
    headers = auth(tokens.steward())
    bodies = {
        "wrongly typed epsilon": {"buyer_org": "acme", "datasets": ["x"], "tier": "aggregate", "kinds": ["query"],
                                  "purpose": "p", "valid_until": "2099-01-01", "epsilon": secret},
        "pattern mismatch": {"buyer_org": secret, "datasets": ["x"], "tier": "aggregate", "kinds": ["query"],
                             "purpose": "p", "valid_until": "2099-01-01", "epsilon": 1},
        "bad enum": {"buyer_org": "acme", "datasets": ["x"], "tier": secret, "kinds": [secret],
                     "purpose": "p", "valid_until": secret, "epsilon": 1},
        "nested": {"buyer_org": "acme", "datasets": ["x"], "tier": "aggregate", "kinds": ["query"],
                   "purpose": "p", "valid_until": "2099-01-01", "epsilon": 1, "quotas": {"cpu_hours": secret}},
    }
    for case, body in bodies.items():
        response = api.post("/v1/contracts", json=body, headers=headers)
        assert_problem(response, 422, case)
        assert secret not in response.text, f"{case}: the submitted value was echoed back"
        assert response.json()["errors"], f"{case}: no error locations given"
    broken = ('{"purpose": "' + secret + '", "epsilon": ').encode()
    response = api.post("/v1/contracts", content=broken, headers={**headers, "content-type": "application/json"})
    assert_problem(response, 422, "malformed JSON")
    assert secret not in response.text, "a malformed body was echoed back"


def test_oversize_json_bodies_are_413(api: TestClient, tokens: Tokens, instance: Instance) -> None:
    limit = instance.settings.max_body_bytes
    body = b'{"purpose": "' + b"a" * (limit + 1) + b'"}'
    headers = {**auth(tokens.steward()), "content-type": "application/json"}
    assert_problem(api.post("/v1/contracts", content=body, headers=headers), 413, "with Content-Length")

    def chunked() -> Iterator[bytes]:
        yield body

    response = api.post("/v1/contracts", content=chunked(), headers=headers)
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "chunked")
    assert_problem(api.post("/v1/policies", content=chunked(), headers=headers), 413, "chunked policy")
    lying = {**headers, "content-length": "not-a-number"}
    assert api.post("/v1/contracts", content=b"{}", headers=lying).status_code in (400, 422)
    assert api.get("/v1/contracts", headers=auth(tokens.steward())).json() == []


def test_internal_errors_are_500_without_a_trace(instance: Instance) -> None:
    app = create_app(instance)

    def boom() -> None:
        raise RuntimeError("db password is hunter2 at /srv/secret/config.toml")

    app.add_api_route("/boom", boom)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom", headers={"x-request-id": "trace-me-500"})
    assert_problem(response, 500)
    for leak in ("hunter2", "RuntimeError", "/srv/secret", "boom()"):
        assert leak not in response.text, f"the 500 answer leaked {leak!r}"
    assert response.headers["x-request-id"] == "trace-me-500"


def test_request_ids(api: TestClient) -> None:
    echoed = api.get("/healthz", headers={"X-Request-ID": "req-123.abc_DEF"})
    assert echoed.headers["x-request-id"] == "req-123.abc_DEF"
    on_error = api.get("/v1/datasets", headers={"X-Request-ID": "req-401"})
    assert on_error.status_code == 401 and on_error.headers["x-request-id"] == "req-401"
    for hostile in ("a b", "x" * 65, "id;rm -rf", "<script>", "\u00e9t\u00e9"):
        response = api.get("/healthz", headers={"X-Request-ID": hostile.encode()})
        returned = response.headers["x-request-id"]
        assert returned != hostile and REQUEST_ID.match(returned), f"hostile request id {hostile!r} echoed"
    first, second = api.get("/healthz"), api.get("/healthz")
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


def test_healthz(api: TestClient) -> None:
    response = api.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_metrics_label_routes_by_template(api: TestClient, tokens: Tokens) -> None:
    buyer = auth(tokens.buyer())
    assert api.get("/v1/datasets/patient-p123456", headers=buyer).status_code == 404
    assert api.get("/v1/unrouted-p654321").status_code == 404
    response = api.get("/metrics", headers=auth(tokens.auditor()))  # a token: review 11.17
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE sandbox_http_requests_total counter" in text
    assert re.search(r'sandbox_http_requests_total\{method="GET",route="/v1/datasets/\{name\}",status="404"\} 1\.0',
                     text), text
    assert "p123456" not in text and "p654321" not in text, "raw paths became metric labels"
    assert 'route="unmatched"' in text
    assert "sandbox_http_request_seconds_bucket" in text
