"""An identity provider's signing keys (JWKS), fetched rarely and never on an attacker's schedule.

PyJWKClient fetched the key set again for every token whose `kid` it did not know, on the request
thread, with a 5 s timeout: junk tokens with made-up kids made the service hammer the IdP and hold a
worker thread each (review 11.14). Here:
- one fetch at a time (single flight); a request never waits for one, except while the service
  has no keys at all yet, and then no longer than the fetch's short timeout;
- fetches happen at most once per `min_refresh_s`, whatever the tokens say;
- an unknown kid is remembered (negative cache, `negative_ttl_s`) and refused without a fetch;
- known keys are refreshed in the background after `max_age_s`; a failed refresh keeps them.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import httpx
import jwt

from sandbox.errors import Unauthorized
from sandbox.logs import get_logger

MAX_JWKS_BYTES = 1024 * 1024
MAX_NEGATIVE = 10_000
log = get_logger("sandbox.auth")


def fetch_jwks(url: str, timeout_s: float) -> dict[str, Any]:
    """GET the key set document (bounded size and time, no redirects)."""
    if not url.startswith(("https://", "http://")):
        raise ValueError("the JWKS URL must be http(s)")
    body = bytearray()
    deadline = time.monotonic() + timeout_s  # httpx times each read; a slow drip must not outlast this
    with httpx.stream("GET", url, timeout=timeout_s, headers={"Accept": "application/json"}) as answer:
        answer.raise_for_status()
        for chunk in answer.iter_bytes():
            body.extend(chunk)
            if len(body) > MAX_JWKS_BYTES:
                raise ValueError(f"the key set is larger than {MAX_JWKS_BYTES} bytes")
            if time.monotonic() > deadline:
                raise TimeoutError("the key set took longer than the timeout")
    document = json.loads(bytes(body))
    if not isinstance(document, dict):
        raise ValueError("the key set is not a JSON object")
    return document


class JwksCache:
    """Signing keys by kid, with the rules in the module docstring."""

    def __init__(self, url: str, *, timeout_s: float = 2.0, min_refresh_s: float = 30.0,
                 negative_ttl_s: float = 300.0, max_age_s: float = 300.0,
                 fetch: Callable[[str, float], dict[str, Any]] = fetch_jwks,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.min_refresh_s = min_refresh_s
        self.negative_ttl_s = negative_ttl_s
        self.max_age_s = max_age_s
        self._fetch = fetch
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._loaded_at: float | None = None
        self._attempted_at: float | None = None
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._state = threading.Lock()
        self._in_flight = threading.Lock()  # held by the one thread that fetches
        self._first_load = threading.Event()
        self.fetches = 0

    def prefetch(self) -> None:
        """Load the keys in the background, so the first request rarely waits."""
        self._refresh_in_background()

    def signing_key(self, kid: str | None) -> jwt.PyJWK:
        if not kid:
            raise Unauthorized("token has no key id (kid)")
        now = self._clock()
        with self._state:
            key = self._keys.get(kid)
            stale = self._loaded_at is None or now - self._loaded_at >= self.max_age_s
            refused_at = self._unknown.get(kid)
            recently_refused = refused_at is not None and now - refused_at < self.negative_ttl_s
        if key is not None:
            if stale:
                self._refresh_in_background()
            return key
        if recently_refused:
            raise Unauthorized("token signing key not found at the identity provider")
        fetched = False
        if self._loaded_at is None:
            # No keys at all yet: wait, boundedly, for the one fetch (ours or another thread's).
            fetched = self._refresh_now(wait_s=self.timeout_s)
        elif self._may_fetch(now):
            # An unknown kid may mean a rotation: one fetch now, on this thread, bounded by the timeout;
            # any other thread meanwhile is refused rather than held.
            fetched = self._refresh_now(wait_s=0.0)
        with self._state:
            key = self._keys.get(kid)
            if key is None and fetched:
                # Known to be unknown: refused without a fetch until negative_ttl_s passes. A kid refused
                # only because a fetch was too recent stays a candidate (it may be a rotation).
                self._remember_unknown(kid, self._clock())
        if key is None:
            raise Unauthorized("token signing key not found at the identity provider")
        return key

    def _may_fetch(self, now: float) -> bool:
        with self._state:
            return self._attempted_at is None or now - self._attempted_at >= self.min_refresh_s

    def _remember_unknown(self, kid: str, now: float) -> None:
        self._unknown[kid[:200]] = now
        self._unknown.move_to_end(kid[:200])
        while len(self._unknown) > MAX_NEGATIVE:
            self._unknown.popitem(last=False)

    def _refresh_in_background(self) -> None:
        if not self._may_fetch(self._clock()) or self._in_flight.locked():
            return
        threading.Thread(target=self._refresh_now, kwargs={"wait_s": 0.0}, name="jwks-refresh",
                         daemon=True).start()

    def _refresh_now(self, *, wait_s: float) -> bool:
        """Fetch unless another thread is fetching (then wait up to `wait_s` for it) or one did so lately;
        True when this call fetched a key set."""
        if not self._in_flight.acquire(blocking=False):
            if wait_s > 0:
                self._first_load.wait(wait_s)
            return False
        try:
            if not self._may_fetch(self._clock()):
                return False
            with self._state:
                self._attempted_at = self._clock()
                self.fetches += 1
            try:
                document = self._fetch(self.url, self.timeout_s)
                keys = {key.key_id: key for key in jwt.PyJWKSet.from_dict(document).keys
                        if key.key_id and key.public_key_use in (None, "sig")}
            except Exception as exc:  # an unreachable or broken IdP: keep what we have
                log.warning("jwks_fetch_failed", url=self.url, error_type=type(exc).__name__)
                return False
            with self._state:
                self._keys = keys
                self._loaded_at = self._clock()
                # A kid refused earlier may have been published since.
                for kid in keys:
                    self._unknown.pop(kid, None)
            return True
        finally:
            self._first_load.set()
            self._in_flight.release()
