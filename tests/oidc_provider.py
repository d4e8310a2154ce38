"""A stand-in OpenID Connect provider on loopback: /authorize, /token and /jwks over real HTTP.

It behaves as a provider would for a user who has already consented: /authorize redirects straight
back with a code, /token checks the client secret, the code (once only), the redirect URI and the
PKCE verifier before it hands out an RS256 id_token. The knobs on `StandInProvider` make it misbehave
the ways a test needs (another signing key, other claims, a failing token endpoint).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from sandbox.config import Settings

CLIENT_ID = "sandbox-console"
CLIENT_SECRET = "s3cret-of-the-console"
ISSUER = "https://idp.hospital.test/"
KID = "standin-2024"


@dataclass
class Grant:
    """What /authorize promised, for the one /token request that may redeem it."""

    challenge: str
    nonce: str
    redirect_uri: str


@dataclass
class StandInProvider:
    key: rsa.RSAPrivateKey
    server: ThreadingHTTPServer
    grants: dict[str, Grant] = field(default_factory=dict)
    token_requests: int = 0
    # Knobs, put back by `reset()`.
    claim_overrides: dict[str, Any] = field(default_factory=dict)  # None removes a claim
    signing_key: Any = None  # sign id_tokens with this key instead, under the published kid
    id_token: str | None = None  # hand out this token instead of signing one
    token_status: int = 200
    authorize_error: str | None = None
    # Answer /authorize with a page whose link the user follows, as after signing in at a real provider:
    # the navigation back to the console then starts on the provider's site, not the console's.
    consent_page: bool = False

    def reset(self) -> None:
        self.claim_overrides = {}
        self.signing_key = None
        self.id_token = None
        self.token_status = 200
        self.authorize_error = None
        self.consent_page = False

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.server.server_address[1]}{path}"

    def configure(self, settings: Settings, *, browser_host: str = "127.0.0.1") -> Settings:
        """`settings` trusting this provider; the browser reaches /authorize at `browser_host`."""
        return settings.model_copy(update={
            "jwks_url": self.url("/jwks"), "jwks_issuer": ISSUER, "jwks_audience": CLIENT_ID,
            "oidc_name": "Hospital SSO", "oidc_authorize_url": self.url("/authorize", browser_host),
            "oidc_token_url": self.url("/token"), "oidc_client_id": CLIENT_ID,
            "oidc_client_secret": SecretStr(CLIENT_SECRET), "oidc_scopes": "openid profile"})

    def jwks(self) -> bytes:
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return json.dumps({"keys": [{**public, "kid": KID, "use": "sig", "alg": "RS256"}]}).encode()

    def authorize(self, query: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        required = ("client_id", "redirect_uri", "state", "nonce", "code_challenge")
        if (query.get("response_type") != "code" or query.get("client_id") != CLIENT_ID
                or query.get("code_challenge_method") != "S256" or not all(query.get(name) for name in required)):
            return 400, {}, b""
        if self.authorize_error:
            answer = {"error": self.authorize_error, "state": query["state"]}
        else:
            code = secrets.token_urlsafe(24)
            self.grants[code] = Grant(challenge=query["code_challenge"], nonce=query["nonce"],
                                      redirect_uri=query["redirect_uri"])
            answer = {"code": code, "state": query["state"]}
        back = f"{query['redirect_uri']}?{urlencode(answer)}"
        if self.consent_page:
            page = f'<!doctype html><title>Hospital SSO</title><a href="{html.escape(back)}">Continue</a>'
            return 200, {"Content-Type": "text/html; charset=utf-8"}, page.encode()
        return 302, {"Location": back}, b""

    def token(self, form: dict[str, str], authorization: str | None) -> tuple[int, dict[str, Any]]:
        self.token_requests += 1
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if authorization != expected:
            return 401, {"error": "invalid_client"}
        if self.token_status != 200:
            return self.token_status, {"error": "server_error"}
        grant = self.grants.pop(form.get("code", ""), None)  # a code is redeemed once, then gone
        if grant is None or form.get("grant_type") != "authorization_code":
            return 400, {"error": "invalid_grant"}
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if challenge != grant.challenge or form.get("redirect_uri") != grant.redirect_uri:
            return 400, {"error": "invalid_grant"}
        now = int(time.time())
        claims: dict[str, Any] = {"sub": "dr-jones", "org": "hospital", "role": "steward", "iat": now,
                                  "exp": now + 600, "aud": CLIENT_ID, "iss": ISSUER, "jti": uuid.uuid4().hex,
                                  "nonce": grant.nonce, "azp": CLIENT_ID}
        claims.update(self.claim_overrides)
        claims = {name: value for name, value in claims.items() if value is not None}
        id_token = self.id_token or jwt.encode(claims, self.signing_key or self.key, algorithm="RS256",
                                               headers={"kid": KID})
        return 200, {"access_token": secrets.token_urlsafe(16), "token_type": "Bearer", "expires_in": 600,
                     "id_token": id_token}


@contextmanager
def stand_in_provider() -> Iterator[StandInProvider]:
    """The provider, serving on 127.0.0.1 for the `with` block."""
    provider: StandInProvider

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path == "/jwks":
                self._answer(200, {"Content-Type": "application/json"}, provider.jwks())
            elif parts.path == "/authorize":
                query = {name: values[0] for name, values in parse_qs(parts.query).items()}
                self._answer(*provider.authorize(query))
            else:
                self._answer(404, {}, b"")

        def do_POST(self) -> None:
            if self.path != "/token":
                self._answer(404, {}, b"")
                return
            length = int(self.headers.get("Content-Length") or 0)
            form = {name: values[0] for name, values in parse_qs(self.rfile.read(length).decode()).items()}
            status, document = provider.token(form, self.headers.get("Authorization"))
            self._answer(status, {"Content-Type": "application/json"}, json.dumps(document).encode())

        def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    provider = StandInProvider(key=rsa.generate_private_key(public_exponent=65537, key_size=2048), server=server)
    thread = threading.Thread(target=server.serve_forever, name="oidc-stand-in", daemon=True)
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
