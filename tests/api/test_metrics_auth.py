"""`/metrics` answers only a token of an admin, auditor or steward (review 11.17): its route counters
say how many approvals, reviews and refusals happen, which is no outsider's business."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth


def test_metrics_refuse_callers_without_a_token(api: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic YWRtaW46YWRtaW4="}):
        response = api.get("/metrics", headers=headers)
        assert response.status_code == 401, f"/metrics answered {headers or 'no token'}: {response.status_code}"
        assert "sandbox_http_requests" not in response.text, "route counters leaked to an anonymous caller"


def test_metrics_refuse_buyers(api: TestClient, tokens: Tokens) -> None:
    response = api.get("/metrics", headers=auth(tokens.buyer()))
    assert response.status_code == 403 and "sandbox_http_requests" not in response.text, response.text[:200]


@pytest.mark.parametrize("role", ["admin", "auditor", "steward"])
def test_metrics_answer_operators(api: TestClient, tokens: Tokens, role: str) -> None:
    token = {"admin": tokens.admin, "auditor": tokens.auditor, "steward": tokens.steward}[role]()
    response = api.get("/metrics", headers=auth(token))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain"), response.text
    assert "sandbox_http_requests_total" in response.text
