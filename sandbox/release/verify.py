"""Client-side release checks: pack a code folder, verify a signed manifest and downloaded files."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sandbox.auth.keys import canonical

SKIP_DIRS = {".git", "__pycache__", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


class ReleaseError(Exception):
    """A manifest or a file did not verify; nothing unverified is kept."""


def pack_code(folder: Path) -> bytes:
    """A tar.gz of `folder` with relative names; symlinks are stored as links (the server checks them)."""
    if not folder.is_dir():
        raise ReleaseError(f"{folder} is not a folder")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if set(relative.parts) & SKIP_DIRS:
                continue
            tar.add(path, arcname=relative.as_posix(), recursive=False)
    return buffer.getvalue()


def verify_manifest(signed: dict[str, Any], public_key_pem: bytes) -> dict[str, Any]:
    """The manifest, if its Ed25519 signature verifies under `public_key_pem`."""
    return verify_signed(signed, public_key_pem, body="manifest", what="release manifest")


def verify_signed(signed: dict[str, Any], public_key_pem: bytes, *, body: str, what: str) -> dict[str, Any]:
    """`signed[body]`, if `signed["signature"]` (Ed25519 over its canonical JSON) verifies under the key.

    The platform signs release manifests and training records this way."""
    key = serialization.load_pem_public_key(public_key_pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ReleaseError("the signing key is not an Ed25519 key")
    document, signature = signed.get(body), signed.get("signature")
    if not isinstance(document, dict) or not isinstance(signature, str):
        raise ReleaseError(f"the {what} is malformed")
    try:
        key.verify(bytes.fromhex(signature), canonical(document))
    except (InvalidSignature, ValueError) as exc:
        raise ReleaseError(f"the {what}'s signature does not verify") from exc
    return document


def key_fingerprint(public_key_pem: bytes) -> str:
    return hashlib.sha256(public_key_pem.strip()).hexdigest()[:16]


def safe_destination(root: Path, relative: str) -> Path:
    """`root/relative`, refusing anything that would land outside `root`."""
    target = (root / relative).resolve()
    if root.resolve() not in target.parents:
        raise ReleaseError(f"refusing to write {relative!r} outside {root}")
    return target


def check_file(content: bytes, expected_sha256: str, path: str) -> None:
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected_sha256:
        raise ReleaseError(f"{path}: sha256 {actual[:16]}… does not match the signed manifest")
