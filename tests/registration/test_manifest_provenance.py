"""Release manifests trace what leaves to the exact data version, its org's signature and its licence."""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, demo_card

from sandbox.auth.tokens import Principal, Role
from sandbox.catalog import signing
from sandbox.catalog.cards import DatasetCard
from sandbox.catalog.service import create_dataset
from sandbox.contracts import ContractRequest, create_contract
from sandbox.instance import Instance
from sandbox.release.review import sign_manifest
from sandbox.release.verify import ReleaseError, verify_manifest
from sandbox.store.models import DatasetVersion, Job, JobOutput

STEWARD = Principal(sub="steward-1", org="hospital", role=Role.STEWARD, jti=uuid.uuid4().hex, issuer="sandbox",
                    expires_at=datetime.now(UTC) + timedelta(hours=1))
LICENCE = {"name": "Registry NC 1.0", "permitted_uses": ["analysis", "query"], "training_allowed": False,
           "attribution": "Hospital A carotid registry", "derived_model_retention_days": 365}
RELEASED = b"symptomatic,mean_stay\n0,3.1\n1,4.2\n"


def setup_job(instance: Instance, *, signed_version: bool) -> tuple[str, dict[str, Any] | None]:
    """A dataset with one version (signed by its org or not), a contract and a job with one released file."""
    now = datetime.now(UTC)
    with instance.context(STEWARD) as ctx:
        dataset = create_dataset(ctx, DatasetCard.model_validate({**demo_card(), "licence": LICENCE}))
        version = DatasetVersion(
            dataset_id=dataset.id, version=1, sha256=hashlib.sha256(b"parquet").hexdigest(), rows=300,
            size_bytes=1000, schema={"columns": {}, "upload_sha256": hashlib.sha256(b"upload").hexdigest()},
            path="datasets/carotid-stenting/v1.parquet", source_format="parquet", created_by=STEWARD.sub,
            created_at=now, provenance={"nonce": secrets.token_hex(32)})
        signed = None
        if signed_version:
            statement = signing.version_statement(
                dataset=dataset.name, version=1, org=dataset.owner_org, sha256=version.sha256,
                upload_sha256=version.schema["upload_sha256"], rows=version.rows,
                licence=DatasetCard.model_validate(dataset.card).licence, deid_sha256=None, created_at=now,
                nonce=bytes.fromhex(version.provenance["nonce"]))
            signed = version.signature = signing.sign_version(ctx.settings.keys_dir, dataset.owner_org, statement)
        ctx.session.add(version)
        contract = create_contract(ctx, ContractRequest.model_validate({
            "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["analysis"],
            "purpose": "test", "valid_until": "2099-01-01", "epsilon": 1.0}))
        job = Job(id=f"j-{uuid.uuid4().hex[:12]}", contract_id=contract.id, buyer_org="acme", submitted_by="analyst-1",
                  dataset="carotid-stenting", dataset_version=1, kind="analysis", tier="aggregate",
                  policy="default@1", image="analysis", image_id="sha256:" + "0" * 64, command=["python3", "main.py"],
                  resources={}, code_sha256=hashlib.sha256(b"code").hexdigest(), code_bytes=4, state="done",
                  created_at=now, updated_at=now)
        ctx.session.add(job)
        ctx.session.flush()
        ctx.session.add(JobOutput(job_id=job.id, path="summary.csv", size=len(RELEASED),
                                  sha256=hashlib.sha256(RELEASED).hexdigest(), kind="table", verdict="pass",
                                  checks=[], status="released", origin="buyer"))
        ctx.session.flush()
        ctx.session.refresh(job)
        sign_manifest(job, instance.signing_key)
        return job.id, signed


def test_manifest_names_the_signed_version_and_its_licence(api: TestClient, tokens: Tokens,
                                                           instance: Instance) -> None:
    job_id, signed = setup_job(instance, signed_version=True)
    assert signed is not None
    response = api.get(f"/v1/jobs/{job_id}/manifest", headers=auth(tokens.buyer()))
    assert response.status_code == 200, response.text
    manifest = verify_manifest(response.json(), instance.settings.verify_key_path.read_bytes())
    assert manifest["files"][0]["sha256"] == hashlib.sha256(RELEASED).hexdigest()
    data = manifest["data"]
    assert data == {
        "dataset": "carotid-stenting", "version": 1, "org": "hospital",
        "signature": {"key_id": signed["key_id"], "statement_sha256": signed["statement_sha256"],
                      "signature": signed["signature"]},
        "licence": {"name": "Registry NC 1.0", "attribution": "Hospital A carotid registry",
                    "derived_model_retention_days": 365, "training_allowed": False},
    }, data
    # A buyer holding the manifest and the version's public signature (from the catalog) traces the file
    # to that exact statement, and checks the statement with the org's published key.
    keys = api.get("/v1/orgs/hospital/keys", headers=auth(tokens.buyer())).json()
    assert [k["key_id"] for k in keys] == [data["signature"]["key_id"]]
    statement = signing.verify_version_signature({**signing.buyer_view(signed)}, keys[0]["public_key_pem"].encode())
    assert hashlib.sha256(signing.canonical(statement)).hexdigest() == data["signature"]["statement_sha256"]
    # The manifest is still the platform's: change the data entry and it no longer verifies.
    tampered = {**response.json(), "manifest": {**response.json()["manifest"],
                                                "data": {**data, "licence": {**data["licence"],
                                                                             "training_allowed": True}}}}
    with pytest.raises(ReleaseError, match="does not verify"):
        verify_manifest(tampered, instance.settings.verify_key_path.read_bytes())
    # As a number of its own: digests and signatures are random letters and digits that may hold "300".
    assert not re.search(r"(?<![0-9A-Za-z+/])300(?![0-9A-Za-z+/])", str(data)), "the manifest shows the row count"
    assert hashlib.sha256(b"parquet").hexdigest() not in str(manifest), "the manifest shows the version's digest"


def test_an_unsigned_version_is_named_with_a_null_signature_and_the_cards_licence(instance: Instance) -> None:
    job_id, _ = setup_job(instance, signed_version=False)
    with instance.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.manifest is not None and job.manifest_signature is not None
        signed_manifest = {"manifest": job.manifest, "signature": job.manifest_signature}
    manifest = verify_manifest(signed_manifest, instance.settings.verify_key_path.read_bytes())
    assert manifest["data"]["signature"] is None
    assert manifest["data"]["licence"]["name"] == "Registry NC 1.0"
    assert manifest["data"]["licence"]["training_allowed"] is False
