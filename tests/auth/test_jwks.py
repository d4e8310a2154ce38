"""An external identity provider: its JWKS served over real HTTP on loopback, its tokens checked here."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from auth_support import (
    STORES,
    RoleTokens,
    assert_problem,
    bearer,
    claims_for,
    forge_hs256,
    forge_unsigned,
    module_settings,
    opened_instance,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from sandbox.api.app import create_app
from sandbox.config import Settings
from sandbox.instance import Instance

IDP_ISSUER = "https://idp.hospital.test/"
IDP_AUDIENCE = "sandbox-via-idp"
IDP_KID = "idp-signing-2024"
JWKS_PATH = "/.well-known/jwks.json"


@dataclass
class IdentityProvider:
    """An RSA key and the HTTP server publishing its public half as a JWKS."""

    key: rsa.RSAPrivateKey
    server: ThreadingHTTPServer
    requests: list[str] = field(default_factory=list)

    @property
    def jwks_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}{JWKS_PATH}"

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)

    def claims(self, **overrides: Any) -> dict[str, Any]:
        return idp_claims(**overrides)

    def sign(self, claims: dict[str, Any], *, kid: str | None = IDP_KID, key: Any = None,
             algorithm: str = "RS256") -> str:
        headers = {"kid": kid} if kid is not None else None
        return jwt.encode(claims, key or self.key, algorithm=algorithm, headers=headers)


def idp_claims(**overrides: Any) -> dict[str, Any]:
    """Claims the IdP would put in a steward's token, changed by `overrides`."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "dr-jones", "org": "hospital", "role": "steward", "iat": now, "exp": now + 600,
        "aud": IDP_AUDIENCE, "iss": IDP_ISSUER, "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    return claims


def _jwks_document(key: rsa.RSAPrivateKey) -> bytes:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return json.dumps({"keys": [{**jwk, "kid": IDP_KID, "use": "sig", "alg": "RS256"}]}).encode()


@pytest.fixture(scope="module")
def idp() -> Iterator[IdentityProvider]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    document = _jwks_document(key)
    seen: list[str] = []

    class JwksHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            if self.path != JWKS_PATH:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(document)))
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), JwksHandler)
    thread = threading.Thread(target=server.serve_forever, name="jwks-server", daemon=True)
    thread.start()
    try:
        yield IdentityProvider(key=key, server=server, requests=seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class Federated:
    instance: Instance
    api: TestClient
    idp: IdentityProvider


@pytest.fixture(scope="module", params=STORES)
def federated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
              idp: IdentityProvider) -> Iterator[Federated]:
    """One instance per store that trusts the IdP; the tests only read, or revoke their own jti."""
    with module_settings(request, tmp_path_factory, "federated") as settings:
        configured = settings.model_copy(update={"jwks_url": idp.jwks_url, "jwks_issuer": IDP_ISSUER,
                                                 "jwks_audience": IDP_AUDIENCE})
        with opened_instance(configured) as instance, \
                TestClient(create_app(instance), raise_server_exceptions=False) as client:
            yield Federated(instance=instance, api=client, idp=idp)


def _whoami(federated: Federated, token: str) -> Any:
    return federated.api.get("/v1/whoami", headers=bearer(token))


def test_idp_token_is_accepted_with_its_claims(federated: Federated) -> None:
    response = _whoami(federated, federated.idp.sign(federated.idp.claims(sub="dr-jones", role="steward")))
    assert response.status_code == 200, f"a valid IdP token was refused: {response.text}"
    who = response.json()
    assert (who["sub"], who["org"], who["role"]) == ("dr-jones", "hospital", "steward"), who
    assert JWKS_PATH in federated.idp.requests, "the key did not come from the JWKS server"
    catalog = federated.api.get("/v1/datasets", headers=bearer(federated.idp.sign(federated.idp.claims())))
    assert catalog.status_code == 200, f"an IdP steward could not read the catalog: {catalog.text}"


def test_local_tokens_still_work_beside_the_idp(federated: Federated) -> None:
    token = RoleTokens(federated.instance).buyer()
    assert _whoami(federated, token).status_code == 200, "configuring an IdP broke the instance's own tokens"


def test_kid_not_in_jwks_is_refused(federated: Federated) -> None:
    token = federated.idp.sign(federated.idp.claims(), kid="not-published")
    assert_problem(_whoami(federated, token), 401, "IdP token with a kid missing from the JWKS")


def test_idp_token_without_kid_is_refused(federated: Federated) -> None:
    token = federated.idp.sign(federated.idp.claims(), kid=None)
    assert_problem(_whoami(federated, token), 401, "IdP token without a kid")


def test_other_rsa_key_under_the_published_kid_is_refused(federated: Federated) -> None:
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = federated.idp.sign(federated.idp.claims(role="admin"), key=impostor)
    assert_problem(_whoami(federated, token), 401, "token signed by another RSA key under the IdP's kid")


@pytest.mark.parametrize("secret_name", ["public PEM", "JWKS modulus"])
def test_hs256_claiming_the_idp_issuer_is_refused(federated: Federated, secret_name: str) -> None:
    """Algorithm confusion against the IdP: its public key, which anyone can fetch, as an HMAC secret."""
    if secret_name == "public PEM":
        secret = federated.idp.public_pem()
    else:
        secret = json.loads(_jwks_document(federated.idp.key))["keys"][0]["n"].encode()
    token = forge_hs256(federated.idp.claims(role="admin"), secret, kid=IDP_KID)
    assert_problem(_whoami(federated, token), 401, f"HS256 token keyed with the IdP's {secret_name}")


def test_hs256_stays_refused_when_configured_as_an_idp_algorithm(federated: Federated) -> None:
    """A misconfigured `jwks_algorithms` listing HS256 must not reopen the confusion attack."""
    settings = federated.instance.settings.model_copy(update={"jwks_algorithms": ["HS256", "none", "RS256"]})
    careless = Instance(settings)
    try:
        with TestClient(create_app(careless), raise_server_exceptions=False) as client:
            forged = forge_hs256(federated.idp.claims(role="admin"), federated.idp.public_pem(), kid=IDP_KID)
            assert_problem(client.get("/v1/whoami", headers=bearer(forged)), 401,
                           "HS256 IdP token with HS256 in jwks_algorithms")
            genuine = client.get("/v1/whoami", headers=bearer(federated.idp.sign(federated.idp.claims())))
            assert genuine.status_code == 200, f"RS256 stopped working beside the filtered list: {genuine.text}"
    finally:
        careless.close()


def test_alg_none_claiming_the_idp_issuer_is_refused(federated: Federated) -> None:
    token = forge_unsigned(federated.idp.claims(role="admin"))
    assert_problem(_whoami(federated, token), 401, "unsigned token claiming the IdP issuer")


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_allowed_algorithm_that_does_not_match_the_idp_key_is_refused(federated: Federated,
                                                                      algorithm: str) -> None:
    """The kid names an RSA key but the header says ES256 or EdDSA: a 401, never a 500."""
    key = ec.generate_private_key(ec.SECP256R1()) if algorithm == "ES256" else Ed25519PrivateKey.generate()
    token = federated.idp.sign(federated.idp.claims(role="admin"), key=key, algorithm=algorithm)
    assert_problem(_whoami(federated, token), 401, f"{algorithm} token under the IdP's RSA kid")


def test_idp_token_with_wrong_audience_is_refused(federated: Federated) -> None:
    for audience in ("some-other-app", federated.instance.settings.token_audience):
        token = federated.idp.sign(federated.idp.claims(aud=audience))
        assert_problem(_whoami(federated, token), 401, f"IdP token for audience {audience!r}")


def test_expired_idp_token_is_refused(federated: Federated) -> None:
    now = int(time.time())
    token = federated.idp.sign(federated.idp.claims(iat=now - 7200, exp=now - 3600))
    assert_problem(_whoami(federated, token), 401, "expired IdP token")


def test_idp_key_cannot_mint_tokens_for_the_local_issuer(federated: Federated) -> None:
    """The IdP's key is trusted for the IdP's issuer only, not for tokens claiming to be local."""
    claims = claims_for(federated.instance.settings, role="admin")
    token = federated.idp.sign(claims)
    assert_problem(_whoami(federated, token), 401, "IdP-signed token claiming the local issuer")


def test_idp_token_missing_a_required_claim_is_refused(federated: Federated) -> None:
    for claim in ("org", "role", "jti"):
        claims = federated.idp.claims()
        del claims[claim]
        assert_problem(_whoami(federated, federated.idp.sign(claims)), 401, f"IdP token without {claim}")


def test_revoked_idp_token_is_refused(federated: Federated) -> None:
    claims = federated.idp.claims()
    token = federated.idp.sign(claims)
    assert _whoami(federated, token).status_code == 200, "control IdP token refused"
    federated.instance.revoke_token(claims["jti"])
    assert_problem(_whoami(federated, token), 401, "IdP token whose jti was revoked")


def test_unreachable_jwks_refuses_with_401(settings: Settings, unused_port: int) -> None:
    configured = settings.model_copy(update={"jwks_url": f"http://127.0.0.1:{unused_port}{JWKS_PATH}",
                                             "jwks_issuer": IDP_ISSUER, "jwks_audience": IDP_AUDIENCE})
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(idp_claims(), key, algorithm="RS256", headers={"kid": IDP_KID})
    with opened_instance(configured) as instance, \
            TestClient(create_app(instance), raise_server_exceptions=False) as client:
        assert_problem(client.get("/v1/whoami", headers=bearer(token)), 401, "IdP token while the JWKS is down")


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
