"""Publishing a version's DP mock: charged once, immutable, downloadable by covered buyers only."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo


@pytest.fixture
def steward(api: TestClient, tokens: Tokens, tmp_path: Path) -> str:
    token = tokens.steward()
    register_demo(api, token, tmp_path, procedures=800)
    return token


def test_publish_download_and_charge(api: TestClient, tokens: Tokens, steward: str) -> None:
    capped = api.post("/v1/datasets/carotid-stenting/budget-cap", headers=auth(steward), json={"epsilon_cap": 3.0})
    assert capped.status_code == 200
    published = api.post("/v1/datasets/carotid-stenting/versions/1/mock", headers=auth(steward),
                         json={"epsilon": 1.0})
    assert published.status_code == 201, published.text
    report = published.json()
    assert report["epsilon"] == pytest.approx(1.0) and report["rows"] > 0
    again = api.post("/v1/datasets/carotid-stenting/versions/1/mock", headers=auth(steward), json={"epsilon": 1.0})
    assert again.status_code == 409, "a version's mock was replaced"

    outsider = api.get("/v1/datasets/carotid-stenting/versions/1/mock", headers=auth(tokens.buyer(org="nobody")))
    assert outsider.status_code == 403, "a buyer without a contract downloaded the mock"
    contract = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "dp_only", "kinds": ["analysis", "query"],
        "purpose": "mock", "valid_until": "2099-01-01", "epsilon": 1.0, "policy": "dp-only"})
    assert contract.status_code == 201
    download = api.get("/v1/datasets/carotid-stenting/versions/1/mock", headers=auth(tokens.buyer(org="acme")))
    assert download.status_code == 200
    table = pq.read_table(io.BytesIO(download.content))
    real = pq.read_table(next(Path(api.app.state.instance.settings.artifacts_dir).glob(  # type: ignore[attr-defined]
        "datasets/carotid-stenting/v1.parquet")))
    assert table.schema.names == real.schema.names
    assert not set(table.column("patient_id").to_pylist()) & set(real.column("patient_id").to_pylist()), \
        "a real patient id is in the mock"

    budgets = api.get("/v1/budgets", headers=auth(steward)).json()
    assert budgets[0]["dataset_epsilon_spent"] == pytest.approx(1.0), "the mock's epsilon was not charged"
    too_much = api.post("/v1/datasets/carotid-stenting/budget-cap", headers=auth(steward),
                        json={"epsilon_cap": 0.5})
    assert too_much.status_code == 422


def test_mock_over_the_cap_is_refused_and_spends_nothing(api: TestClient, steward: str) -> None:
    api.post("/v1/datasets/carotid-stenting/budget-cap", headers=auth(steward), json={"epsilon_cap": 0.5})
    refused = api.post("/v1/datasets/carotid-stenting/versions/1/mock", headers=auth(steward),
                       json={"epsilon": 1.0})
    assert refused.status_code == 409 and "cap leaves 0.5" in refused.json()["detail"]
    assert api.get("/v1/datasets/carotid-stenting/versions/1/mock",
                   headers=auth(steward)).status_code == 404
