"""Bearer tokens against the API: every forgery and stale token meets a 401 problem, a real one passes.

The attacks share one instance per store (they only read), so the whole list stays fast.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from auth_support import (
    REQUIRED_CLAIMS,
    STORES,
    RoleTokens,
    assert_problem,
    b64url_decode,
    b64url_json,
    bearer,
    claims_for,
    forge_hs256,
    forge_unsigned,
    instance_key,
    module_settings,
    opened_instance,
    sign_eddsa,
)
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from sandbox.api.app import create_app
from sandbox.auth.keys import key_id
from sandbox.config import Settings
from sandbox.instance import Instance

PROBES = ("/v1/whoami", "/v1/datasets")


@dataclass
class Service:
    instance: Instance
    api: TestClient
    tokens: RoleTokens

    @property
    def settings(self) -> Settings:
        return self.instance.settings


@pytest.fixture(scope="module", params=STORES)
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with module_settings(request, tmp_path_factory, "tokens") as settings, opened_instance(settings) as instance, \
            TestClient(create_app(instance), raise_server_exceptions=False) as client:
        yield Service(instance=instance, api=client, tokens=RoleTokens(instance))


def _beyond_leeway(settings: Settings) -> int:
    return settings.token_leeway_s + 120


def _signed(service: Service, **overrides: object) -> dict[str, str]:
    """A token signed with the instance's own key, with claims changed by `overrides`."""
    claims = claims_for(service.settings, **overrides)
    return bearer(sign_eddsa(claims, instance_key(service.settings), kid=key_id(service.instance.public_key)))


def _tampered(service: Service, **changes: str) -> dict[str, str]:
    """A real buyer token whose payload is edited while header and signature are kept."""
    header, payload, signature = service.tokens.buyer(org="acme").split(".")
    claims = json.loads(b64url_decode(payload))
    claims.update(changes)
    return bearer(f"{header}.{b64url_json(claims)}.{signature}")


def _other_key_token(service: Service, spoof_kid: bool) -> dict[str, str]:
    stranger = Ed25519PrivateKey.generate()
    kid = key_id(service.instance.public_key) if spoof_kid else key_id(stranger.public_key())
    return bearer(sign_eddsa(claims_for(service.settings, role="steward"), stranger, kid=kid))


def _alg_none_keeping_signature(service: Service) -> dict[str, str]:
    _header, payload, signature = service.tokens.buyer().split(".")
    return bearer(f"{b64url_json({'alg': 'none', 'typ': 'JWT'})}.{payload}.{signature}")


def _hs256_with_public_key(service: Service, encoding: str) -> dict[str, str]:
    public = service.instance.public_key
    secret = (service.settings.verify_key_path.read_bytes() if encoding == "pem"
              else public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    claims = claims_for(service.settings, role="steward", org="hospital")
    return bearer(forge_hs256(claims, secret, kid=key_id(public)))


def _basic_carrying_real_token(service: Service) -> dict[str, str]:
    return {"Authorization": f"Basic {service.tokens.steward()}"}


Attack = Callable[[Service], dict[str, str]]

ATTACKS: dict[str, Attack] = {
    "no Authorization header": lambda s: {},
    "Basic credentials": lambda s: {"Authorization": "Basic " + base64.b64encode(b"steward:hunter2").decode()},
    "Basic scheme carrying a real token": _basic_carrying_real_token,
    "Bearer with no token": lambda s: {"Authorization": "Bearer "},
    "garbage bearer token": lambda s: bearer("not-a-jwt"),
    "three garbage segments": lambda s: bearer("aaaa.bbbb.cccc"),
    "alg none, empty signature": lambda s: bearer(forge_unsigned(claims_for(s.settings, role="steward"))),
    "alg None (capitalised)": lambda s: bearer(forge_unsigned(claims_for(s.settings, role="steward"), alg="None")),
    "alg none keeping a real signature": _alg_none_keeping_signature,
    "HS256 keyed with the instance's public PEM": lambda s: _hs256_with_public_key(s, "pem"),
    "HS256 keyed with the instance's raw public key": lambda s: _hs256_with_public_key(s, "raw"),
    "signature stripped": lambda s: bearer(".".join(s.tokens.buyer().split(".")[:2]) + "."),
    "signature of another token": lambda s: bearer(
        ".".join(s.tokens.steward().split(".")[:2]) + "." + s.tokens.buyer().split(".")[2]),
    "expired beyond leeway": lambda s: _signed(s, iat=int(time.time()) - 7200, nbf=int(time.time()) - 7200,
                                               exp=int(time.time()) - _beyond_leeway(s.settings)),
    "nbf in the future beyond leeway": lambda s: _signed(s, nbf=int(time.time()) + _beyond_leeway(s.settings)),
    "iat in the future beyond leeway": lambda s: _signed(s, nbf=None,
                                                         iat=int(time.time()) + _beyond_leeway(s.settings)),
    "wrong audience": lambda s: _signed(s, aud="some-other-service"),
    "audience list without this service": lambda s: _signed(s, aud=["some-other-service", "billing"]),
    "wrong issuer": lambda s: _signed(s, iss="https://evil.example"),
    "payload tampered to role steward": lambda s: _tampered(s, role="steward"),
    "payload tampered to another org": lambda s: _tampered(s, org="hospital"),
    "unknown role superuser": lambda s: _signed(s, role="superuser"),
    "role in the wrong case": lambda s: _signed(s, role="STEWARD"),
    "empty sub": lambda s: _signed(s, sub=""),
    "empty org": lambda s: _signed(s, org=""),
    "non-string sub": lambda s: _signed(s, sub=12345),
    "non-string org": lambda s: _signed(s, org=["acme", "hospital"]),
    "non-integer exp": lambda s: _signed(s, exp="tomorrow"),
    "signed by a different Ed25519 key": lambda s: _other_key_token(s, spoof_kid=False),
    "different Ed25519 key claiming the instance's kid": lambda s: _other_key_token(s, spoof_kid=True),
    **{f"missing {claim} claim": (lambda s, c=claim: _signed(s, **{c: None})) for claim in REQUIRED_CLAIMS},
}


def test_valid_instance_token_is_accepted(service: Service) -> None:
    token = service.tokens.buyer(org="acme", sub="alice")
    for path in PROBES:
        response = service.api.get(path, headers=bearer(token))
        assert response.status_code == 200, f"a valid buyer token was refused on {path}: {response.text}"
    who = service.api.get("/v1/whoami", headers=bearer(token)).json()
    assert (who["sub"], who["org"], who["role"]) == ("alice", "acme", "buyer"), f"whoami misreads the token: {who}"


def test_hand_signed_token_with_valid_claims_is_accepted(service: Service) -> None:
    """The forging helpers themselves make acceptable tokens; each attack differs in one thing."""
    response = service.api.get("/v1/whoami", headers=_signed(service, role="auditor", org="hospital"))
    assert response.status_code == 200, f"the control token built like the attacks was refused: {response.text}"
    assert response.json()["role"] == "auditor"


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_is_refused_with_401_problem(service: Service, attack: str) -> None:
    headers = ATTACKS[attack](service)
    for path in PROBES:
        response = service.api.get(path, headers=headers)
        body = assert_problem(response, 401, f"{attack} on GET {path}")
        assert response.headers.get("www-authenticate", "").lower().startswith("bearer"), (
            f"{attack}: the 401 does not name the Bearer scheme"
        )
        token = headers.get("Authorization", "").partition(" ")[2]
        if len(token) > 20:
            assert token not in response.text, f"{attack}: the presented token was echoed back: {body}"


def test_token_revoked_through_instance_is_refused(service: Service) -> None:
    token = service.tokens.buyer(org="acme")
    jti = service.instance.verifier.verify(token).jti
    assert service.api.get("/v1/whoami", headers=bearer(token)).status_code == 200, "fresh token refused"

    service.instance.revoke_token(jti)

    for path in PROBES:
        assert_problem(service.api.get(path, headers=bearer(token)), 401,
                       f"token revoked by instance.revoke_token on GET {path}")


def test_token_revoked_by_admin_over_http_is_refused(service: Service) -> None:
    victim = service.tokens.steward()
    jti = service.instance.verifier.verify(victim).jti
    assert service.api.get("/v1/datasets", headers=bearer(victim)).status_code == 200, "fresh token refused"

    response = service.api.post(f"/v1/tokens/{jti}/revoke", headers=bearer(service.tokens.admin()))
    assert response.status_code == 200, f"admin could not revoke: {response.text}"
    assert response.json() == {"jti": jti, "status": "revoked"}

    for path in PROBES:
        assert_problem(service.api.get(path, headers=bearer(victim)), 401,
                       f"token revoked over POST /v1/tokens/{{jti}}/revoke on GET {path}")


def test_hand_signed_token_whose_jti_is_revoked_is_refused(service: Service) -> None:
    """Revocation goes by jti, so a re-signed copy of a revoked token's claims stays refused."""
    claims = claims_for(service.settings)
    token = sign_eddsa(claims, instance_key(service.settings))
    assert service.api.get("/v1/whoami", headers=bearer(token)).status_code == 200, "control token refused"
    service.instance.revoke_token(claims["jti"])
    resigned = sign_eddsa({**claims, "exp": claims["exp"] + 60}, instance_key(service.settings))
    assert_problem(service.api.get("/v1/whoami", headers=bearer(resigned)), 401, "re-signed token of a revoked jti")


def test_only_admins_revoke_tokens(service: Service) -> None:
    victim = service.tokens.auditor()
    jti = service.instance.verifier.verify(victim).jti
    for role_token in (service.tokens.buyer(), service.tokens.steward(), service.tokens.auditor()):
        role = service.instance.verifier.verify(role_token).role.value
        assert_problem(service.api.post(f"/v1/tokens/{jti}/revoke", headers=bearer(role_token)), 403,
                       f"role {role} revoking another's token")
    assert service.api.get("/v1/whoami", headers=bearer(victim)).status_code == 200, (
        "a refused revocation still revoked the token"
    )

