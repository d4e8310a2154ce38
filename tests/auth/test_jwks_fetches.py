"""Junk tokens cannot make the service fetch an identity provider's keys (review 11.14): unknown key ids
are cached negatively, fetches are rate-limited and single-flight, and no request waits on a slow IdP.

A loopback IdP counts every fetch of its JWKS, as in test_jwks.py.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from auth_support import STORES, assert_problem, bearer, module_settings, opened_instance
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from sandbox.api.app import create_app
from sandbox.auth.jwks import JwksCache
from sandbox.errors import Unauthorized

ISSUER = "https://idp.fetches.test/"
AUDIENCE = "sandbox-fetches"
JWKS_PATH = "/jwks.json"


@dataclass
class CountingIdP:
    """Publishes RSA public keys under kids; counts fetches; can be made slow."""

    server: ThreadingHTTPServer
    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    fetches: int = 0
    delay_s: float = 0.0

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}{JWKS_PATH}"

    def document(self) -> bytes:
        entries = [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig",
                    "alg": "RS256"} for kid, key in self.keys.items()]
        return json.dumps({"keys": entries}).encode()

    def token(self, kid: str, key: rsa.RSAPrivateKey | None = None) -> str:
        now = int(time.time())
        claims = {"sub": "dr-who", "org": "hospital", "role": "steward", "iat": now, "exp": now + 600,
                  "aud": AUDIENCE, "iss": ISSUER, "jti": uuid.uuid4().hex}
        return jwt.encode(claims, key or next(iter(self.keys.values())), algorithm="RS256", headers={"kid": kid})


@pytest.fixture(scope="module")
def idp() -> Iterator[CountingIdP]:
    holder: list[CountingIdP] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            provider = holder[0]
            provider.fetches += 1
            time.sleep(provider.delay_s)
            body = provider.document()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    provider = CountingIdP(server=server, keys={"k1": rsa.generate_private_key(public_exponent=65537, key_size=2048)})
    holder.append(provider)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield provider
    server.shutdown()
    server.server_close()


@pytest.fixture(params=STORES)
def federated_api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  idp: CountingIdP) -> Iterator[TestClient]:
    with module_settings(request, tmp_path_factory, "fetches") as settings:
        configured = settings.model_copy(update={"jwks_url": idp.url, "jwks_issuer": ISSUER,
                                                 "jwks_audience": AUDIENCE})
        with opened_instance(configured) as instance, \
                TestClient(create_app(instance), raise_server_exceptions=False) as client:
            yield client


def test_junk_key_ids_make_no_fetches(federated_api: TestClient, idp: CountingIdP) -> None:
    idp.delay_s = 0.0
    genuine = federated_api.get("/v1/whoami", headers=bearer(idp.token("k1")))
    assert genuine.status_code == 200, genuine.text
    after_load = idp.fetches
    for _ in range(60):
        junk = idp.token(uuid.uuid4().hex)  # a real IdP signature under a made-up kid each time
        assert_problem(federated_api.get("/v1/whoami", headers=bearer(junk)), 401, "token with a made-up kid")
    for _ in range(20):
        assert_problem(federated_api.get("/v1/whoami", headers=bearer(idp.token("same-junk"))), 401, "repeated kid")
    assert idp.fetches == after_load, f"80 junk tokens made the service fetch the JWKS {idp.fetches - after_load} times"
    assert federated_api.get("/v1/whoami", headers=bearer(idp.token("k1"))).status_code == 200


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_unknown_kids_are_cached_negatively_and_rotation_still_works(idp: CountingIdP) -> None:
    idp.delay_s = 0.0
    clock = Clock()
    cache = JwksCache(idp.url, min_refresh_s=30, negative_ttl_s=300, max_age_s=3600, clock=clock)
    start = idp.fetches
    assert cache.signing_key("k1").key_id == "k1"
    assert idp.fetches == start + 1
    with pytest.raises(Unauthorized):
        cache.signing_key("rotated")  # within min_refresh_s of the last fetch: refused without one
    assert idp.fetches == start + 1
    clock.now += 31
    with pytest.raises(Unauthorized):
        cache.signing_key("junk")  # may fetch once: it could have been a rotation
    assert idp.fetches == start + 2
    clock.now += 31
    for _ in range(10):
        with pytest.raises(Unauthorized):
            cache.signing_key("junk")  # remembered as unknown for negative_ttl_s
    assert idp.fetches == start + 2, "a kid known to be unknown was fetched again"
    idp.keys["rotated"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    try:
        assert cache.signing_key("rotated").key_id == "rotated", "a rotated-in key was not picked up"
        assert idp.fetches == start + 3
    finally:
        del idp.keys["rotated"]


def test_a_slow_idp_holds_no_request_thread(idp: CountingIdP) -> None:
    idp.delay_s = 0.0
    # The cache's clock stands still during the burst, so a refresh may start once (min_refresh_s) however
    # the threads are scheduled; single flight is what keeps the threads that start together to that one.
    now = [0.0]
    cache = JwksCache(idp.url, timeout_s=0.5, min_refresh_s=10.0, negative_ttl_s=0.0, clock=lambda: now[0])
    cache.signing_key("k1")
    now[0] = 11.0
    idp.delay_s = 3.0
    start = idp.fetches

    def attempt(kid: str) -> float:
        began = time.monotonic()
        with pytest.raises(Unauthorized):
            cache.signing_key(kid)
        return time.monotonic() - began

    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            durations = list(pool.map(attempt, [uuid.uuid4().hex for _ in range(32)]))
    finally:
        idp.delay_s = 0.0
    assert max(durations) < 2.5, f"a request waited {max(durations):.1f} s on the IdP (timeout 0.5 s, delay 3 s)"
    assert sorted(durations)[len(durations) // 2] < 0.2, "requests queued behind the one fetch"
    assert idp.fetches - start == 1, f"{idp.fetches - start} concurrent fetches for 32 junk kids (single flight)"
    assert cache.signing_key("k1").key_id == "k1", "a failed refresh dropped the keys already known"
