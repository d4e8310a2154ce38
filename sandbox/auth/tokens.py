"""Issue and verify bearer tokens. Verification pins algorithms, audience and issuer."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandbox.auth.jwks import JwksCache
from sandbox.auth.keys import key_id
from sandbox.auth.orgs import is_org_name
from sandbox.errors import Invalid, Unauthorized

REQUIRED_CLAIMS = ["sub", "org", "role", "iat", "exp", "aud", "iss", "jti"]


class Role(StrEnum):
    STEWARD = "steward"
    BUYER = "buyer"
    AUDITOR = "auditor"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """The verified caller."""

    sub: str
    org: str
    role: Role
    jti: str
    issuer: str
    expires_at: datetime

    @property
    def actor(self) -> str:
        return f"{self.sub}@{self.org}"


@dataclass(frozen=True)
class IssuedToken:
    token: str
    jti: str
    issued_at: datetime
    expires_at: datetime


def issue_token(
    *,
    key: Ed25519PrivateKey,
    issuer: str,
    audience: str,
    sub: str,
    org: str,
    role: Role,
    ttl_s: int,
    now: datetime | None = None,
) -> IssuedToken:
    if not is_org_name(org):
        raise Invalid(f"org {org[:64]!r} is not an organisation name (lowercase letters, digits, '_.-')")
    issued_at = (now or datetime.now(UTC)).replace(microsecond=0)
    expires_at = issued_at + timedelta(seconds=ttl_s)
    jti = uuid.uuid4().hex
    claims = {
        "sub": sub,
        "org": org,
        "role": role.value,
        "iat": int(issued_at.timestamp()),
        "nbf": int(issued_at.timestamp()),
        "exp": int(expires_at.timestamp()),
        "aud": audience,
        "iss": issuer,
        "jti": jti,
    }
    token = jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": key_id(key.public_key())})
    return IssuedToken(token=token, jti=jti, issued_at=issued_at, expires_at=expires_at)


class TokenVerifier:
    """Checks signature, algorithm, time, audience, issuer and claims; revocation is the caller's."""

    def __init__(
        self,
        *,
        public_key: Ed25519PublicKey,
        issuer: str,
        audience: str,
        leeway_s: int = 30,
        jwks_url: str | None = None,
        jwks_issuer: str | None = None,
        jwks_audience: str | None = None,
        jwks_algorithms: list[str] | None = None,
        jwks: JwksCache | None = None,
    ) -> None:
        self._public_key = public_key
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_s
        self._jwks = jwks or (JwksCache(jwks_url) if jwks_url else None)
        if self._jwks is not None:
            self._jwks.prefetch()
        self._jwks_issuer = jwks_issuer
        self._jwks_audience = jwks_audience or audience
        # "none" and the HMAC family never verify here, whatever an IdP's list says: a public
        # key used as an HMAC secret is the classic algorithm-confusion forgery.
        allowed = {"RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"}
        self._jwks_algorithms = [a for a in (jwks_algorithms or ["RS256", "ES256", "EdDSA"]) if a in allowed]

    def verify(self, token: str) -> Principal:
        try:
            if self._jwks is not None and self._jwks_issuer and _unverified_issuer(token) == self._jwks_issuer:
                # The PyJWK itself, not its raw key: PyJWT then refuses a header `alg` other than
                # the key's own, where a raw RSA key met by `alg: ES256` or `EdDSA` raised a
                # TypeError or InvalidKeyError that surfaced as a 500.
                kid = jwt.get_unverified_header(token).get("kid")
                signing_key = self._jwks.signing_key(kid if isinstance(kid, str) else None)
                claims = jwt.decode(
                    token,
                    signing_key,
                    algorithms=self._jwks_algorithms,
                    audience=self._jwks_audience,
                    issuer=self._jwks_issuer,
                    leeway=self._leeway,
                    options={"require": REQUIRED_CLAIMS},
                )
            else:
                claims = jwt.decode(
                    token,
                    self._public_key,
                    algorithms=["EdDSA"],
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self._leeway,
                    options={"require": REQUIRED_CLAIMS},
                )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("token expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise Unauthorized("token not yet valid") from exc
        except jwt.InvalidAudienceError as exc:
            raise Unauthorized("token audience is not this service") from exc
        except jwt.InvalidIssuerError as exc:
            raise Unauthorized("token issuer is not trusted") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token lacks the {exc.claim!r} claim") from exc
        except jwt.PyJWTError as exc:
            # Not only InvalidTokenError: InvalidKeyError and PyJWKError are no token errors to
            # PyJWT, yet here they are still a caller's bad token, never a server fault.
            raise Unauthorized("token invalid") from exc
        return _principal(claims)


def _unverified_issuer(token: str) -> str | None:
    """Only to pick which key set to verify with; nothing unverified is trusted beyond that."""
    claims = jwt.decode(token, options={"verify_signature": False})
    issuer = claims.get("iss") if isinstance(claims, dict) else None
    return issuer if isinstance(issuer, str) else None


def _principal(claims: dict[str, Any]) -> Principal:
    try:
        role = Role(claims["role"])
    except ValueError as exc:
        raise Unauthorized(f"token carries an unknown role {str(claims['role'])[:32]!r}") from exc
    for name in ("sub", "org", "jti"):
        if not isinstance(claims[name], str) or not claims[name]:
            raise Unauthorized(f"token claim {name!r} must be a non-empty string")
    if not is_org_name(claims["org"]):
        # Ownership compares org names: one outside the pattern (an IdP's free text) could equal a
        # placeholder owner such as UNKNOWN_OWNER, so it is no org at all.
        raise Unauthorized("token claim 'org' is not a valid organisation name")
    return Principal(
        sub=claims["sub"],
        org=claims["org"],
        role=role,
        jti=claims["jti"],
        issuer=claims["iss"],
        expires_at=datetime.fromtimestamp(int(claims["exp"]), UTC),
    )
