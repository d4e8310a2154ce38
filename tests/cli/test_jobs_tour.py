"""The jobs tour from the README: submit --wait, review, download with the signature verified."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from cli.server import Server, register_registry

pytestmark = pytest.mark.docker

ANALYSIS = """
import pandas as pd
df = pd.read_parquet('/data/carotid-stenting.parquet')
df.groupby('embolic_protection')['length_of_stay'].mean().rename('mean_stay').to_csv('/output/by_protection.csv')
print('analysed', len(df), 'procedures')
"""


# Jobs on PostgreSQL run through the API and worker tests and tests/scale/test_leader.py; this is the CLI's
# tour: SQLite only, to keep the suite's time.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_submit_wait_review_and_verified_download(server: Server, tmp_path: Path, analysis_image: str) -> None:
    steward = server.token("steward", "xuanwu", "dr-li")
    buyer = server.token("buyer", "acme-ai", "alice")
    register_registry(server, steward, tmp_path, procedures=250)
    contract = json.loads(server.cli(
        "contract", "create", "--buyer-org", "acme-ai", "--dataset", "carotid-stenting", "--tier", "aggregate",
        "--kinds", "analysis", "--epsilon", "1", "--valid-until", "2099-12-31", "--json", token=steward).stdout)

    code = tmp_path / "code"
    code.mkdir()
    (code / "main.py").write_text(ANALYSIS)
    submitted = None
    for _ in range(60):  # the worker publishes its images shortly after the server starts
        submitted = server.cli("job", "submit", "--contract", contract["id"], "--dataset", "carotid-stenting@1",
                               "--code", str(code), "--wait", "--json", "--", "python3", "main.py",
                               token=buyer, check=False)
        if "not available on the workers" not in submitted.stderr:
            break
        httpx.get(f"{server.url}/healthz")
    assert submitted is not None and submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["state"] == "in_review"
    # In the aggregate tier the job's own table and its printed log wait for a steward.
    assert "withheld" in server.cli("job", "logs", job["id"], token=buyer).stdout

    queue = json.loads(server.cli("review", "list", "--json", token=steward).stdout)
    [waiting] = [j for j in queue if j["id"] == job["id"]]
    assert "by_protection.csv" in {o["path"] for o in waiting["outputs"] if o["status"] == "in_review"}
    assert "by_protection.csv" in server.cli("review", "list", token=steward).stdout
    decided = server.cli("review", "decide", job["id"], "--release", "by_protection.csv", "--release",
                         "logs/stdout.txt", "--comment", "aggregates only", token=steward)
    assert "done" in decided.stdout
    assert "analysed 250 procedures" in server.cli("job", "logs", job["id"], token=buyer).stdout

    key = tmp_path / "instance.pub.pem"
    key.write_bytes((server.home / "keys" / "signing-ed25519.pub.pem").read_bytes())
    out = tmp_path / "released"
    downloaded = server.cli("job", "download", job["id"], "--to", str(out), "--verify-key", str(key), token=buyer)
    assert "by_protection.csv" in downloaded.stdout and "verified" in downloaded.stdout
    assert (out / "by_protection.csv").read_text().startswith("embolic_protection,mean_stay")

    wrong_key = tmp_path / "wrong.pub.pem"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    wrong_key.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    refused = server.cli("job", "download", job["id"], "--to", str(tmp_path / "x"), "--verify-key",
                         str(wrong_key), token=buyer, check=False)
    assert refused.returncode == 1 and "does not verify" in refused.stderr
    assert not (tmp_path / "x" / "by_protection.csv").exists()

    usage = json.loads(server.cli("usage", "--json", token=buyer).stdout)
    assert usage[0]["jobs"] == 1 and usage[0]["bytes_released"] > 0
