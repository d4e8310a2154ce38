"""Org keys and signed version statements: what verifies, what a changed byte breaks, what buyers see."""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import re
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo

from sandbox.catalog import signing
from sandbox.catalog.cards import LicenceTerms
from sandbox.errors import Invalid

SHA = hashlib.sha256(b"the stored parquet").hexdigest()
UPLOAD_SHA = hashlib.sha256(b"the uploaded excel").hexdigest()
DEID_SHA = hashlib.sha256(b"the de-identification report").hexdigest()
ROWS = 48_713
NONCE = bytes(range(32))
LICENCE = LicenceTerms(name="CC BY-NC 4.0", permitted_uses=["analysis", "query"], training_allowed=False,
                       attribution="Hospital A registry", derived_model_retention_days=365)


def statement(**changes: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "dataset": "carotid-stenting", "version": 3, "org": "hospital", "sha256": SHA, "upload_sha256": UPLOAD_SHA,
        "rows": ROWS, "licence": LICENCE, "deid_sha256": DEID_SHA,
        "created_at": datetime(2026, 12, 6, 9, 30, tzinfo=UTC), "nonce": NONCE, **changes}
    return signing.version_statement(**arguments)


def public_pem(keys_dir: Path, org: str = "hospital") -> bytes:
    return signing.org_public_keys(keys_dir, org)[0].public_key_pem.encode()


def test_signed_statement_round_trips_and_names_version_and_licence(tmp_path: Path) -> None:
    signed = signing.sign_version(tmp_path, "hospital", statement())
    assert signed["algorithm"] == "Ed25519" and signed["org"] == "hospital"
    assert signed["statement_sha256"] == hashlib.sha256(signing.canonical(signed["statement"])).hexdigest()
    verified = signing.verify_version_signature(signed, public_pem(tmp_path))
    assert verified["dataset"] == "carotid-stenting" and verified["version"] == 3
    assert verified["licence"]["training_allowed"] is False
    assert verified["licence"]["permitted_uses"] == ["analysis", "query"]
    assert verified["licence_sha256"] == hashlib.sha256(signing.canonical(LICENCE.model_dump(mode="json"))).hexdigest()
    # A verifier needs nothing but the org's public key, read from the files as anyone would get it.
    assert signing.verify_with_org_key(tmp_path, json.loads(json.dumps(signed))) == verified


def test_a_changed_byte_anywhere_fails_verification(tmp_path: Path) -> None:
    signed = signing.sign_version(tmp_path, "hospital", statement())
    pem = public_pem(tmp_path)
    raw = bytearray(base64.b64decode(signed["signature"]))
    raw[10] ^= 0x01
    tampered_cases: dict[str, dict[str, Any]] = {
        "version number": {**signed, "statement": {**signed["statement"], "version": 4}},
        "licence term": {**signed, "statement": {**signed["statement"], "licence": {
            **signed["statement"]["licence"], "training_allowed": True}}},
        "commitment": {**signed, "statement": {**signed["statement"], "data_commitment": "0" * 64}},
        "signature byte": {**signed, "signature": base64.b64encode(bytes(raw)).decode()},
        "signature not base64": {**signed, "signature": "!!" + signed["signature"][2:]},
        "statement digest": {**signed, "statement_sha256": "f" * 64},
        "org": {**signed, "org": "other-hospital"},
        "algorithm": {**signed, "algorithm": "RS256"},
        "no statement": {k: v for k, v in signed.items() if k != "statement"},
    }
    for case, tampered in tampered_cases.items():
        with pytest.raises(signing.SignatureMismatch):
            signing.verify_version_signature(tampered, pem)
            pytest.fail(f"{case}: a tampered signed version verified")
    # Changing one byte of the statement while keeping its digest consistent still fails on the signature.
    forged = {**signed["statement"], "dataset": "carotid-stentinh"}
    with pytest.raises(signing.SignatureMismatch, match="does not verify"):
        signing.verify_version_signature(
            {**signed, "statement": forged,
             "statement_sha256": hashlib.sha256(signing.canonical(forged)).hexdigest()}, pem)
    # Another org's key does not verify this org's statement.
    other = signing.sign_version(tmp_path, "clinic", statement(org="clinic"))
    with pytest.raises(signing.SignatureMismatch, match="key"):
        signing.verify_version_signature(signed, public_pem(tmp_path, "clinic"))
    assert signing.verify_version_signature(other, public_pem(tmp_path, "clinic"))["org"] == "clinic"


def test_commitment_opens_only_to_the_exact_digests_rows_and_report(tmp_path: Path) -> None:
    signed = signing.sign_version(tmp_path, "hospital", statement())
    opening: dict[str, Any] = {"nonce": NONCE, "sha256": SHA, "upload_sha256": UPLOAD_SHA, "rows": ROWS,
                               "deid_sha256": DEID_SHA}
    signing.verify_commitment(signed["statement"], **opening)
    assert signing.steward_view(signed, **opening)["commitment"]["verified"] is True
    wrong = {
        "nonce": bytes(32), "sha256": hashlib.sha256(b"a guessed table").hexdigest(),
        "upload_sha256": SHA, "rows": ROWS + 1, "deid_sha256": None,
    }
    for field, value in wrong.items():
        with pytest.raises(signing.SignatureMismatch, match="commitment"):
            signing.verify_commitment(signed["statement"], **{**opening, field: value})
            pytest.fail(f"the commitment opened with a wrong {field}")
        assert signing.steward_view(signed, **{**opening, field: value})["commitment"]["verified"] is False
    # The commitment is the documented hash, so anyone with the opening can recompute it by hand.
    by_hand = hashlib.sha256(signing.COMMITMENT_TAG + NONCE + bytes.fromhex(SHA) + bytes.fromhex(UPLOAD_SHA)
                             + ROWS.to_bytes(8, "big") + b"\x01" + bytes.fromhex(DEID_SHA)).hexdigest()
    assert signed["statement"]["data_commitment"] == by_hand
    without_report = statement(deid_sha256=None)
    assert without_report["deid_report"] is False
    signing.verify_commitment(without_report, **{**opening, "deid_sha256": None})


def test_buyer_view_holds_no_digest_row_count_or_nonce(tmp_path: Path) -> None:
    signed = signing.sign_version(tmp_path, "hospital", statement())
    shown = json.dumps(signing.buyer_view(signed))
    for secret, what in ((SHA, "the stored Parquet's sha256"), (UPLOAD_SHA, "the upload's sha256"),
                         (DEID_SHA, "the de-identification report's sha256"), (NONCE.hex(), "the nonce"),
                         (base64.b64encode(bytes.fromhex(SHA)).decode(), "the sha256")):
        assert secret not in shown, f"the buyer's view of a signed version shows {what}"
    # The row count as a token of its own: the view's random key id and signature hold any five digits now and then.
    assert not re.search(rf"(?<![0-9A-Za-z+/]){ROWS}(?![0-9A-Za-z+/])", shown), "the buyer's view shows the row count"
    # ... and a fresh nonce makes the same data commit to a different value (no digest to test guesses on).
    assert statement(nonce=signing.new_nonce())["data_commitment"] != signed["statement"]["data_commitment"]
    assert signing.verify_version_signature(json.loads(shown), public_pem(tmp_path))["version"] == 3


def test_org_key_is_created_once_with_private_files(tmp_path: Path) -> None:
    assert signing.org_public_keys(tmp_path, "hospital") == []
    assert signing.ensure_org_key(tmp_path, "hospital") is True
    first = signing.org_public_keys(tmp_path, "hospital")
    assert signing.ensure_org_key(tmp_path, "hospital") is False
    assert signing.org_public_keys(tmp_path, "hospital") == first and first[0].custodial
    private_path, public_path = signing.org_key_paths(tmp_path, "hospital")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600, "the org's private key is readable by others"
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(private_path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in private_path.parent.iterdir()) == ["hospital.pem", "hospital.pub.pem"], \
        "a staging file was left behind"
    assert signing.sign_version(tmp_path, "hospital", statement())["key_id"] == first[0].key_id


def test_bad_org_names_are_refused_before_any_file_is_touched(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    for name in ("../escape", "a/b", "", "Hospital", ".hidden", "x" * 80, "hospital\n"):
        with pytest.raises(Invalid):
            signing.ensure_org_key(keys_dir, name)
            pytest.fail(f"org name {name!r} was accepted")
        with pytest.raises(Invalid):
            signing.org_public_keys(keys_dir, name)
    with pytest.raises(Invalid, match="org"):
        signing.sign_version(keys_dir, "hospital", statement(org="clinic"))
    assert not keys_dir.exists() and not (tmp_path / "escape.pem").exists()


def test_threads_racing_to_create_one_org_key_end_with_one_key(tmp_path: Path) -> None:
    start = threading.Barrier(8)
    results: list[bool] = []

    def create() -> None:
        start.wait()
        results.append(signing.ensure_org_key(tmp_path, "hospital"))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True], f"{results.count(True)} threads each created a key"
    assert len(signing.org_public_keys(tmp_path, "hospital")) == 1


def test_processes_racing_to_create_one_org_key_end_with_one_key(tmp_path: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        created = pool.starmap(signing.ensure_org_key, [(tmp_path, "hospital")] * 8)
    assert sorted(created) == [False] * 7 + [True], f"{created.count(True)} processes each created a key"
    public_path = signing.org_key_paths(tmp_path, "hospital")[1]
    key = signing.org_public_keys(tmp_path, "hospital")[0]
    assert public_path.read_text() == key.public_key_pem, "the public file is not the private key's half"


def test_keys_endpoint_lists_the_org_key(api: TestClient, tokens: Tokens) -> None:
    keys_dir = api.app.state.instance.settings.keys_dir  # type: ignore[attr-defined]
    buyer = auth(tokens.buyer())
    assert api.get("/v1/orgs/hospital/keys").status_code == 401
    assert api.get("/v1/orgs/hospital/keys", headers=buyer).status_code == 404
    assert api.get("/v1/orgs/..%2Fkeys/keys", headers=buyer).status_code in (404, 422)
    assert api.get("/v1/orgs/Bad.Name/keys", headers=buyer).status_code == 422
    signed = signing.sign_version(keys_dir, "hospital", statement())
    listed = api.get("/v1/orgs/hospital/keys", headers=buyer)
    assert listed.status_code == 200, listed.text
    [key] = listed.json()
    assert key["key_id"] == signed["key_id"] and key["algorithm"] == "Ed25519" and key["custodial"] is True
    assert "PRIVATE" not in listed.text
    assert signing.verify_version_signature(signed, key["public_key_pem"].encode())["org"] == "hospital"


def test_a_registered_versions_catalog_signature_verifies_and_hides_the_data(api: TestClient, tokens: Tokens,
                                                                           tmp_path: Path) -> None:
    registered = register_demo(api, tokens.steward(), tmp_path)
    buyer = auth(tokens.buyer())
    entry = api.get("/v1/datasets/carotid-stenting", headers=buyer)
    assert entry.status_code == 200, entry.text
    [version] = entry.json()["versions"]
    assert "signature" in version, f"the catalog shows no signature for the version: {version}"
    [key] = api.get("/v1/orgs/hospital/keys", headers=buyer).json()
    statement = signing.verify_version_signature(version["signature"], key["public_key_pem"].encode())
    assert (statement["dataset"], statement["version"], statement["org"]) == ("carotid-stenting", 1, "hospital")
    assert statement["licence"]["name"] == entry.json()["licence"]["name"]
    assert registered["sha256"] not in entry.text, "the buyer's catalog entry shows the version's digest"
    # The row count as a value anywhere in the entry (a bare "300" inside a timestamp or a signature is chance).
    assert registered["rows"] not in list(_numbers(entry.json())), "the buyer's catalog entry shows the row count"


def _numbers(value: Any) -> Iterator[Any]:
    """Every number in a JSON document, and every string that is a whole integer."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, bool):
        return
    elif isinstance(value, int | float):
        yield value
    elif isinstance(value, str) and value.isdigit():
        yield int(value)
