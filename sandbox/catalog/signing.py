"""Each publishing org's Ed25519 key, and the signed statement of every dataset version it publishes.

Custodial: the instance generates and holds each org's private key (under `keys/orgs/`, 0600), and
signs a version's statement when the org's steward registers it. The platform operator can therefore
sign in an org's name; the threat model says so. Keys an org holds itself, with versions signed
client-side, are not built yet: uploads would need to carry the org's signature.

What buyers see must not give away what the catalog hides from them (`version_view`): the stored
Parquet's digest (a buyer could test a guessed table against it), the upload's digest, the row count
(compared across weekly versions, counts give cohort sizes away) and the de-identification report's
digest (a small, structured report can be guessed too). The statement therefore carries a hiding
*commitment* to those values under a 32-byte random nonce that only the owning org's stewards see:
they recompute it with `verify_commitment`; buyers verify the signature over everything else.

    data_commitment = SHA-256( COMMITMENT_TAG
                               || nonce                       32 bytes
                               || sha256                      32 bytes (the stored Parquet's digest)
                               || upload_sha256               32 bytes (the uploaded file's digest)
                               || rows                         8 bytes, unsigned big-endian
                               || deid flag                    1 byte: 0x00 no report, 0x01 a report
                               || deid_sha256                 32 bytes, present only when the flag is 0x01 )

Every field has a fixed length (the flag says whether the last is there), so no two openings share
an encoding; the tag keeps the hash apart from any other SHA-256 the platform computes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandbox.auth.keys import canonical, key_id, load_private_key
from sandbox.auth.orgs import is_org_name
from sandbox.catalog.cards import LicenceTerms
from sandbox.errors import Invalid, NotFound

ALGORITHM = "Ed25519"
STATEMENT_TYPE = "sandbox.dataset-version/v1"
COMMITMENT_TAG = b"sandbox.dataset-version.commitment/v1\x00"
NONCE_BYTES = 32
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# The fields of a signed version, all public: nothing else is ever shown to buyers.
_SIGNED_FIELDS = ("algorithm", "org", "key_id", "statement", "statement_sha256", "signature")


class SignatureMismatch(Invalid):
    """A signed version statement, or a commitment opening, does not verify."""

    title = "Signature does not verify"
    slug = "signature-mismatch"


@dataclass(frozen=True)
class OrgKey:
    """One public key an org's versions are signed with."""

    key_id: str
    algorithm: str
    public_key_pem: str
    created_at: datetime
    custodial: bool  # True: the instance holds the private key (always, until orgs can register their own)


# Keys ---------------------------------------------------------------------------------------------

def org_key_paths(keys_dir: Path, org: str) -> tuple[Path, Path]:
    """The private and public key files of `org`; the name is checked first, so no path escapes."""
    if not is_org_name(org):
        raise Invalid(f"{org!r} is not an organisation name")
    folder = keys_dir / "orgs"
    return folder / f"{org}.pem", folder / f"{org}.pub.pem"


def ensure_org_key(keys_dir: Path, org: str) -> bool:
    """Create `org`'s custodial key pair unless it exists. True when this call created it.

    Several processes share one home: each writes a complete file under a name of its own and links it
    into place, which never replaces an existing file. Exactly one link wins; the others use its key,
    and nobody ever reads a half-written key.
    """
    private_path, public_path = org_key_paths(keys_dir, org)
    created = False
    if not private_path.exists():
        _make_private_folder(private_path.parent)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        created = _link_new(private_path, pem)
    if not public_path.exists():
        _link_new(public_path, _public_pem(load_private_key(private_path).public_key()))
    return created


def org_public_keys(keys_dir: Path, org: str) -> list[OrgKey]:
    """The org's public keys (one today; a list, so a rotated key can stay listed). Empty if none."""
    private_path, public_path = org_key_paths(keys_dir, org)
    custodial = private_path.exists()
    if custodial:
        # Derived from the private key: between the two links another process may not yet have written
        # the public file.
        public_key = load_private_key(private_path).public_key()
        created = private_path.stat().st_mtime
    elif public_path.exists():
        loaded = serialization.load_pem_public_key(public_path.read_bytes())
        if not isinstance(loaded, Ed25519PublicKey):
            raise ValueError(f"{public_path} is not an Ed25519 public key")
        public_key, created = loaded, public_path.stat().st_mtime
    else:
        return []
    return [OrgKey(key_id=key_id(public_key), algorithm=ALGORITHM, public_key_pem=_public_pem(public_key).decode(),
                   created_at=datetime.fromtimestamp(created, UTC), custodial=custodial)]


def _make_private_folder(folder: Path) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)


def _link_new(path: Path, content: bytes) -> bool:
    """Write `content` to `path` (0600) unless `path` exists; True if this call's file is the one there."""
    staged = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(staged, path)  # atomic, and unlike rename it never replaces a file already there
        except FileExistsError:
            return False
        return True
    finally:
        staged.unlink(missing_ok=True)


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# Statements ---------------------------------------------------------------------------------------

def new_nonce() -> bytes:
    """A fresh commitment nonce; keep it where only the owning org's stewards read it."""
    return secrets.token_bytes(NONCE_BYTES)


def data_commitment(*, nonce: bytes, sha256: str, upload_sha256: str, rows: int, deid_sha256: str | None) -> str:
    """The hex SHA-256 commitment defined in this module's docstring."""
    if len(nonce) != NONCE_BYTES:
        raise Invalid(f"the commitment nonce must be {NONCE_BYTES} bytes")
    for name, digest in (("sha256", sha256), ("upload_sha256", upload_sha256), ("deid_sha256", deid_sha256)):
        if digest is not None and not _HEX64.fullmatch(digest):
            raise Invalid(f"{name} must be 64 lowercase hex digits")
    if isinstance(rows, bool) or not 0 <= rows < 2**63:
        raise Invalid("rows must be a whole number from 0 to 2**63 - 1")
    opening = COMMITMENT_TAG + nonce + bytes.fromhex(sha256) + bytes.fromhex(upload_sha256) + rows.to_bytes(8, "big")
    opening += b"\x00" if deid_sha256 is None else b"\x01" + bytes.fromhex(deid_sha256)
    return hashlib.sha256(opening).hexdigest()


def licence_terms(licence: LicenceTerms) -> dict[str, Any]:
    """The licence as it is signed: every term, in its JSON form."""
    return licence.model_dump(mode="json")


def version_statement(*, dataset: str, version: int, org: str, sha256: str, upload_sha256: str, rows: int,
                      licence: LicenceTerms, deid_sha256: str | None, created_at: datetime,
                      nonce: bytes) -> dict[str, Any]:
    """What the publishing org signs for one version: public facts and a commitment to the hidden ones."""
    if not is_org_name(org):
        raise Invalid(f"{org!r} is not an organisation name")
    if created_at.tzinfo is None:
        raise Invalid("created_at must carry a time zone")
    terms = licence_terms(licence)
    return {
        "type": STATEMENT_TYPE,
        "dataset": dataset,
        "version": version,
        "org": org,
        "licence": terms,
        "licence_sha256": hashlib.sha256(canonical(terms)).hexdigest(),
        "deid_report": deid_sha256 is not None,
        "created_at": created_at.astimezone(UTC).isoformat(),
        "data_commitment": data_commitment(nonce=nonce, sha256=sha256, upload_sha256=upload_sha256, rows=rows,
                                           deid_sha256=deid_sha256),
    }


def sign_version(keys_dir: Path, org: str, statement: dict[str, Any]) -> dict[str, Any]:
    """Sign `statement` with `org`'s custodial key (created on first use)."""
    if statement.get("org") != org:
        raise Invalid(f"the statement names org {statement.get('org')!r}, not {org!r}")
    ensure_org_key(keys_dir, org)
    key = load_private_key(org_key_paths(keys_dir, org)[0])
    body = canonical(statement)
    return {
        "algorithm": ALGORITHM,
        "org": org,
        "key_id": key_id(key.public_key()),
        "statement": statement,
        "statement_sha256": hashlib.sha256(body).hexdigest(),
        "signature": base64.b64encode(key.sign(body)).decode(),
    }


def verify_version_signature(signed: dict[str, Any], public_key_pem: bytes) -> dict[str, Any]:
    """The statement, if `signed` is a well-formed Ed25519 signature by the key; else SignatureMismatch."""
    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except ValueError as exc:
        raise SignatureMismatch("the public key is not a PEM key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureMismatch("the public key is not an Ed25519 key")
    statement, signature = signed.get("statement"), signed.get("signature")
    if signed.get("algorithm") != ALGORITHM:
        raise SignatureMismatch(f"algorithm {signed.get('algorithm')!r} is not {ALGORITHM}")
    if not isinstance(statement, dict) or not isinstance(signature, str):
        raise SignatureMismatch("the signed version has no statement or no signature")
    if signed.get("org") != statement.get("org"):
        raise SignatureMismatch(f"signed by org {signed.get('org')!r} for a statement of {statement.get('org')!r}")
    if signed.get("key_id") != key_id(key):
        raise SignatureMismatch(f"signed with key {signed.get('key_id')!r}, not the given key {key_id(key)!r}")
    body = canonical(statement)
    if signed.get("statement_sha256") != hashlib.sha256(body).hexdigest():
        raise SignatureMismatch("statement_sha256 is not the digest of the statement")
    try:
        key.verify(base64.b64decode(signature, validate=True), body)
    except (InvalidSignature, ValueError) as exc:
        raise SignatureMismatch("the signature does not verify under the org's key") from exc
    return statement


def verify_commitment(statement: dict[str, Any], *, nonce: bytes, sha256: str, upload_sha256: str, rows: int,
                      deid_sha256: str | None) -> None:
    """Raise SignatureMismatch unless the statement's commitment opens to exactly these values."""
    expected = data_commitment(nonce=nonce, sha256=sha256, upload_sha256=upload_sha256, rows=rows,
                               deid_sha256=deid_sha256)
    committed = statement.get("data_commitment")
    if not isinstance(committed, str) or not hmac.compare_digest(committed, expected):
        raise SignatureMismatch("the data commitment does not match this version's digests, rows and report")


def buyer_view(signed: dict[str, Any]) -> dict[str, Any]:
    """The signed statement as anyone may see it: verifiable with the org's public key, and holding
    nothing the catalog hides (only a commitment to the digests and row count)."""
    return {field: signed[field] for field in _SIGNED_FIELDS}


def steward_view(signed: dict[str, Any], *, nonce: bytes, sha256: str, upload_sha256: str, rows: int,
                 deid_sha256: str | None) -> dict[str, Any]:
    """The buyer's view plus the commitment's opening, checked, for the owning org's stewards."""
    try:
        verify_commitment(signed["statement"], nonce=nonce, sha256=sha256, upload_sha256=upload_sha256, rows=rows,
                          deid_sha256=deid_sha256)
        verified = True
    except SignatureMismatch:
        verified = False
    return {**buyer_view(signed), "commitment": {
        "nonce": nonce.hex(), "sha256": sha256, "upload_sha256": upload_sha256, "rows": rows,
        "deid_sha256": deid_sha256, "verified": verified}}


def verify_with_org_key(keys_dir: Path, signed: dict[str, Any]) -> dict[str, Any]:
    """The statement, if it verifies under one of the signing org's keys held here."""
    org = signed.get("org")
    if not isinstance(org, str):
        raise SignatureMismatch("the signed version names no org")
    keys = {key.key_id: key for key in org_public_keys(keys_dir, org)}
    if not keys:
        raise NotFound(f"organisation {org!r} has no signing key")
    key = keys.get(str(signed.get("key_id")))
    if key is None:
        raise SignatureMismatch(f"key {signed.get('key_id')!r} is not a key of organisation {org!r}")
    return verify_version_signature(signed, key.public_key_pem.encode())
