"""The README's tour, run as a user would: the real CLI against a real server over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pyarrow.csv
import pyarrow.parquet
import pytest
import yaml
from cli.server import Server, base_env, free_port, stop, wait_healthy
from helpers import ids_in, patient_ids

from sandbox.demo import CARD, write_registry


# The store is not this tour's subject (the API, worker and budget tests run on both stores): SQLite only,
# to keep the suite's time.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_tour_register_contract_and_audit(server: Server, tmp_path: Path) -> None:
    steward = server.token("steward", "xuanwu", "dr-li")
    second_steward = server.token("steward", "xuanwu", "dr-zhang")
    buyer = server.token("buyer", "acme-ai", "alice")
    auditor = server.token("auditor", "xuanwu", "audit-wang")

    card = tmp_path / "card.yaml"
    card.write_text(yaml.safe_dump({k: v for k, v in CARD.items() if k != "name"}))
    server.cli("dataset", "create", "carotid-stenting", "--card", str(card), token=steward)

    parquet = write_registry(tmp_path / "registry.parquet", procedures=400)
    week2 = write_registry(tmp_path / "registry-week2.parquet", procedures=450)
    csv = tmp_path / "registry-week2.csv"
    pyarrow.csv.write_csv(pyarrow.parquet.read_table(week2), csv)
    first = server.cli("dataset", "add-version", "carotid-stenting", str(parquet), token=steward)
    assert "version 1: 400 rows" in first.stdout
    second = server.cli("dataset", "add-version", "carotid-stenting", str(csv), "--json", token=steward)
    assert json.loads(second.stdout)["version"] == 2
    same = server.cli("dataset", "add-version", "carotid-stenting", str(csv), token=steward, check=False)
    assert same.returncode == 1 and "identical to carotid-stenting version 2" in same.stderr

    catalog = json.loads(server.cli("dataset", "list", "--json", token=buyer).stdout)
    assert [d["name"] for d in catalog] == ["carotid-stenting"]
    assert not ids_in(json.dumps(catalog), patient_ids(parquet, week2)), "a patient id reached the catalog"
    shown = server.cli("dataset", "show", "carotid-stenting", token=buyer).stdout
    assert "stenosis_pct" in shown

    created = server.cli("contract", "create", "--buyer-org", "acme-ai", "--dataset", "carotid-stenting",
                         "--tier", "dp_only", "--kinds", "query,notebook", "--epsilon", "2",
                         "--valid-until", "2099-12-31", "--policy", "dp-only", "--json", token=steward)
    contract = json.loads(created.stdout)
    assert contract["policy"] == "dp-only@1" and contract["state"] == "active"
    listed = json.loads(server.cli("contract", "list", "--json", token=buyer).stdout)
    assert [c["id"] for c in listed] == [contract["id"]]

    refused = server.cli("contract", "create", "--buyer-org", "acme-ai", "--dataset", "nope", "--tier", "dp_only",
                         "--kinds", "query", "--epsilon", "1", "--valid-until", "2001-01-01", token=steward,
                         check=False)
    assert refused.returncode == 1
    assert "dataset 'nope' does not exist" in refused.stderr and "in the past" in refused.stderr

    policy = tmp_path / "default.yaml"
    body = yaml.safe_load((Path(__file__).parents[2] / "policies" / "default.yaml").read_text())
    body["egress"]["sdc"]["min_cell_count"] = 15
    policy.write_text(yaml.safe_dump(body))
    assert "default@2" in server.cli("policy", "propose", str(policy), token=steward).stdout
    own = server.cli("policy", "approve", "default@2", token=steward, check=False)
    assert own.returncode == 1 and "different steward" in own.stderr
    assert "approved" in server.cli("policy", "approve", "default@2", token=second_steward).stdout

    server.cli("contract", "revoke", contract["id"], "--reason", "end of study", token=steward)
    log = json.loads(server.cli("audit", "log", "--json", "--limit", "200", token=auditor).stdout)
    actions = {e["action"] for e in log}
    assert {"dataset.version.add", "contract.create", "contract.revoke", "policy.approve"} <= actions
    assert server.cli("audit", "verify").returncode == 0

    forbidden = server.cli("audit", "log", token=buyer, check=False)
    assert forbidden.returncode == 1 and "403" in forbidden.stderr


# The store is not this tour's subject (the API, worker and budget tests run on both stores): SQLite only,
# to keep the suite's time.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_server_logs_are_json_with_request_ids(server: Server) -> None:
    buyer = server.token("buyer", "acme-ai", "alice")
    response = httpx.get(f"{server.url}/v1/datasets", headers={"Authorization": f"Bearer {buyer}",
                                                               "X-Request-ID": "tour-req-1"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "tour-req-1"
    stderr = stop(server.process)
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    matching = [line for line in lines if line.get("request_id") == "tour-req-1"]
    assert matching and matching[0]["event"] == "request" and matching[0]["status"] == 200
    assert matching[0]["route"] == "/v1/datasets"


# The demo runs on its embedded SQLite store.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_demo_command_brings_up_a_working_service(tmp_path: Path, database_url: str | None) -> None:
    env = base_env(tmp_path / "demo-home", database_url)
    port = free_port()
    # No tour: its job would race the server's stop and could leave a container behind (the tour is
    # tests/cli/test_demo.py's).
    process = subprocess.Popen([sys.executable, "-m", "sandbox.cli", "demo", "--port", str(port), "--no-tour"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process, timeout=120)
        tokens = dict(line.removeprefix("export ").split("=", 1)
                      for line in (tmp_path / "demo-home" / "demo.env").read_text().splitlines())
        assert tokens["SANDBOX_URL"] == url
        headers = {"Authorization": f"Bearer {tokens['BUYER_TOKEN']}"}
        [dataset] = httpx.get(f"{url}/v1/datasets", headers=headers).json()
        assert dataset["name"] == "carotid-stenting" and "rows_approx" not in dataset["versions"][0]
        contracts = httpx.get(f"{url}/v1/contracts", headers=headers).json()
        assert contracts and contracts[0]["buyer_org"] == "acme-ai"
    finally:
        stop(process)
