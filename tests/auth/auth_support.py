"""Builders for hand-made tokens and the checks every refusal must pass.

PyJWT refuses to build some of the forgeries on purpose (a PEM as an HMAC secret, `alg: none`
with a key), so those are assembled here byte by byte, the way an attacker would.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import Tokens
from pgdb import cloned_database

from sandbox.auth.keys import load_private_key
from sandbox.config import Settings
from sandbox.instance import Instance, init_instance

REQUIRED_CLAIMS = ("sub", "org", "role", "exp", "aud", "iss", "jti", "iat")

# Real tokens issued and recorded by an instance, one helper per role.
RoleTokens = Tokens


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def claims_for(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Claims the instance would accept (a buyer of org acme), changed by `overrides`.

    An override of None removes the claim.
    """
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "mallory", "org": "acme", "role": "buyer", "iat": now, "nbf": now, "exp": now + 600,
        "aud": settings.token_audience, "iss": settings.token_issuer, "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def instance_key(settings: Settings) -> Ed25519PrivateKey:
    """The instance's own signing key, read from its home like any local admin could."""
    return load_private_key(settings.signing_key_path)


def sign_eddsa(claims: dict[str, Any], key: Ed25519PrivateKey, **headers: Any) -> str:
    return jwt.encode(claims, key, algorithm="EdDSA", headers=headers or None)


def forge_hs256(claims: dict[str, Any], secret: bytes, **headers: Any) -> str:
    """An HS256 token with `secret` as the HMAC key, built by hand (PyJWT refuses PEM secrets)."""
    signing_input = f"{b64url_json({'alg': 'HS256', 'typ': 'JWT', **headers})}.{b64url_json(claims)}"
    signature = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def forge_unsigned(claims: dict[str, Any], alg: str = "none") -> str:
    return f"{b64url_json({'alg': alg, 'typ': 'JWT'})}.{b64url_json(claims)}."


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_problem(response: httpx.Response, status: int, what: str) -> dict[str, Any]:
    """`response` is an RFC 9457 refusal with `status`; `what` names the attempt in failures."""
    assert response.status_code == status, (
        f"{what}: got through with {response.status_code} instead of {status}: {response.text[:300]}"
    )
    content_type = response.headers.get("content-type", "")
    assert content_type.startswith("application/problem+json"), (
        f"{what}: refusal is {content_type!r}, not application/problem+json"
    )
    body: dict[str, Any] = response.json()
    missing = {"type", "title", "status", "detail"} - body.keys()
    assert not missing, f"{what}: problem body lacks {sorted(missing)}: {body}"
    assert body["status"] == status, f"{what}: problem body says status {body['status']}, response {status}"
    assert "Traceback" not in response.text and 'File "' not in response.text, (
        f"{what}: a stack trace leaked into the response: {response.text[:500]}"
    )
    return body


@contextmanager
def store_url(kind: str, postgres_template: str | None) -> Iterator[str | None]:
    """None for SQLite; otherwise a fresh PostgreSQL database cloned from the migrated template."""
    if kind == "sqlite" or postgres_template is None:
        yield None
        return
    with cloned_database(postgres_template) as url:
        yield url


STORES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@contextmanager
def module_settings(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                    label: str) -> Iterator[Settings]:
    """Settings for an instance shared by a module's tests; `request.param` names the store."""
    template = request.getfixturevalue("postgres_template") if request.param == "postgres" else None
    with store_url(request.param, template) as database_url:
        yield Settings(home=tmp_path_factory.mktemp(label) / "home", database_url=database_url, log_json=True)


@contextmanager
def opened_instance(settings: Settings) -> Iterator[Instance]:
    init_instance(settings)
    instance = Instance(settings)
    try:
        yield instance
    finally:
        instance.close()

