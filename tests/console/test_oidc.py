"""Console sign-in through an OpenID Connect provider: the code flow with PKCE against a real stand-in on loopback.

The TestClient plays the browser and follows each redirect by hand: the console's to the provider
(over real HTTP), the provider's back to the console's callback.
"""

from __future__ import annotations

import html
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from oidc_provider import CLIENT_ID, StandInProvider, stand_in_provider

from sandbox.api.app import create_app
from sandbox.api.console.oidc import FLOW_COOKIE
from sandbox.api.console.session import SESSION_COOKIE
from sandbox.auth.tokens import Role
from sandbox.config import Settings
from sandbox.instance import Instance, init_instance
from sandbox.security_log import SecurityLog

CALLBACK = "/console/oidc/callback"


@pytest.fixture(scope="module")
def provider() -> Iterator[StandInProvider]:
    with stand_in_provider() as running:
        yield running


@pytest.fixture(autouse=True)
def _provider_behaves(provider: StandInProvider) -> None:
    provider.reset()


@pytest.fixture(scope="module")
def oidc_settings(tmp_path_factory: pytest.TempPathFactory, provider: StandInProvider) -> Settings:
    settings = provider.configure(Settings(home=tmp_path_factory.mktemp("oidc") / "home", log_json=True))
    init_instance(settings)
    return settings


@pytest.fixture(scope="module")
def oidc_instance(oidc_settings: Settings) -> Iterator[Instance]:
    instance = Instance(oidc_settings)
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def app(oidc_instance: Instance) -> FastAPI:
    return create_app(oidc_instance)


@pytest.fixture
def browser(app: FastAPI) -> Iterator[TestClient]:
    """A browser of its own (its own cookie jar) on plain HTTP; a fresh security log (it is rate-limited per client)."""
    app.state.security_log = SecurityLog()
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


@pytest.fixture
def other_app(oidc_settings: Settings) -> Iterator[Callable[..., TestClient]]:
    """A browser on an instance of the same home with some settings changed."""
    opened: list[tuple[Instance, TestClient]] = []

    def make(**changes: Any) -> TestClient:
        instance = Instance(oidc_settings.model_copy(update=changes))
        client = TestClient(create_app(instance), base_url="http://127.0.0.1")
        opened.append((instance, client))
        return client

    yield make
    for instance, client in opened:
        client.close()
        instance.close()


def cookie_headers(response: httpx.Response, name: str) -> list[str]:
    return [value for value in response.headers.get_list("set-cookie") if value.startswith(f"{name}=")]


def session_set(response: httpx.Response) -> bool:
    """Whether the response sets a session cookie with a value (a deletion does not count)."""
    return any(not re.match(rf'{SESSION_COOKIE}=("")?;', value) and "max-age=0" not in value.lower()
               for value in cookie_headers(response, SESSION_COOKIE))


def attributes(set_cookie: str) -> dict[str, str]:
    parts = [part.strip() for part in set_cookie.split(";")[1:]]
    return {part.split("=", 1)[0].lower(): part.split("=", 1)[1] if "=" in part else "" for part in parts}


def start(browser: TestClient, next_page: str | None = None) -> httpx.Response:
    query = f"?{urlencode({'next': next_page})}" if next_page else ""
    answer = browser.get(f"/console/oidc/start{query}", follow_redirects=False)
    assert answer.status_code == 302, f"the flow did not start: {answer.status_code} {answer.text[:300]}"
    return answer


def at_provider(authorize_url: str) -> str:
    """The provider's redirect back to the console, as a consenting user's browser would follow it."""
    answer = httpx.get(authorize_url, follow_redirects=False, timeout=10)
    assert answer.status_code == 302, f"the stand-in provider refused the authorize request: {answer.status_code}"
    return answer.headers["location"]


def sign_in(browser: TestClient, next_page: str | None = None) -> httpx.Response:
    """The whole flow, up to the callback's answer."""
    back = at_provider(start(browser, next_page).headers["location"])
    return browser.get(back, follow_redirects=False)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_code_flow_signs_in_with_a_strict_session_cookie(app: FastAPI, provider: StandInProvider,
                                                         scheme: str) -> None:
    with TestClient(app, base_url=f"{scheme}://127.0.0.1") as browser:
        login = browser.get("/console/login")
        assert 'href="/console/oidc/start"' in login.text and "Sign in with Hospital SSO" in login.text, (
            "the sign-in page does not offer the configured provider")

        started = start(browser)
        authorize = urlsplit(started.headers["location"])
        query = {name: values[0] for name, values in parse_qs(authorize.query).items()}
        assert authorize.path == "/authorize" and query["client_id"] == CLIENT_ID
        assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43, query
        assert query["redirect_uri"] == f"{scheme}://127.0.0.1{CALLBACK}", query["redirect_uri"]
        assert query["scope"] == "openid profile" and query["state"] and query["nonce"], query
        flow = attributes(cookie_headers(started, FLOW_COOKIE)[0])
        assert "httponly" in flow and flow["samesite"].lower() == "lax" and flow["path"] == "/console/oidc", flow
        assert ("secure" in flow) == (scheme == "https"), f"flow cookie over {scheme}: {flow}"

        answer = browser.get(at_provider(started.headers["location"]), follow_redirects=False)
        assert answer.status_code == 200, f"the callback refused a good sign-in: {answer.text[:500]}"
        assert '<meta http-equiv="refresh" content="0;url=/console/">' in answer.text, answer.text[:500]
        assert '<a class="button" href="/console/">' in answer.text
        cookies = cookie_headers(answer, SESSION_COOKIE)
        assert len(cookies) == 1 and session_set(answer), f"no session cookie: {answer.headers.get_list('set-cookie')}"
        session = attributes(cookies[0])
        assert "httponly" in session, f"the session cookie is readable by script: {cookies[0]}"
        assert session["samesite"].lower() == "strict", f"the session cookie is not SameSite=Strict: {cookies[0]}"
        assert session["path"] == "/console", cookies[0]
        assert ("secure" in session) == (scheme == "https"), f"session cookie over {scheme}: {cookies[0]}"
        assert 0 < int(session["max-age"]) <= 600, "the session outlives the id_token"
        assert any("max-age=0" in value.lower() for value in cookie_headers(answer, FLOW_COOKIE)), (
            "the flow cookie was not spent")

        home = browser.get("/console/", follow_redirects=False)
        assert home.status_code == 200 and "Welcome, dr-jones" in home.text, (
            f"the session cookie did not sign the browser in: {home.status_code} {home.text[:300]}")
        assert provider.token_requests > 0


def test_next_page_is_kept_and_never_leaves_the_console(browser: TestClient) -> None:
    kept = sign_in(browser, "/console/audit")
    assert 'content="0;url=/console/audit"' in kept.text, kept.text[:500]
    elsewhere = sign_in(browser, "//evil.example/console/")
    assert 'content="0;url=/console/"' in elsewhere.text, f"an open redirect: {elsewhere.text[:500]}"


def _expect_refused(browser: TestClient, app: FastAPI, answer: httpx.Response, status: int, reason: str,
                    what: str) -> None:
    assert answer.status_code == status, f"{what}: answered {answer.status_code}, not {status}: {answer.text[:500]}"
    assert answer.headers["content-type"].startswith("text/html"), f"{what}: not an HTML error page"
    assert reason in html.unescape(answer.text), f"{what}: the page does not say why ({reason!r}): {answer.text[:800]}"
    assert not session_set(answer), f"{what}: a session cookie was set: {answer.headers.get_list('set-cookie')}"
    home = browser.get("/console/", follow_redirects=False)
    assert home.status_code == 303, f"{what}: the browser is signed in after a refused sign-in"
    if status == 401:
        logged = [line for line in app.state.security_log.recent
                  if line["path"] == CALLBACK and reason in line["reason"]]
        assert logged, f"{what}: the refusal is not in the security log"


def _other_key(provider: StandInProvider, instance: Instance) -> None:
    provider.signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _claims(**overrides: Any) -> Callable[[StandInProvider, Instance], None]:
    def apply(provider: StandInProvider, instance: Instance) -> None:
        provider.claim_overrides = overrides
    return apply


def _instance_token(provider: StandInProvider, instance: Instance) -> None:
    provider.id_token = instance.issue_token(sub="dr-jones", org="hospital", role=Role.STEWARD, ttl_s=600).token


def _token_endpoint_fails(provider: StandInProvider, instance: Instance) -> None:
    provider.token_status = 500


def _provider_refuses(provider: StandInProvider, instance: Instance) -> None:
    provider.authorize_error = "access_denied"


REFUSALS = [
    pytest.param(_other_key, 401, "token invalid", id="forged-signature"),
    pytest.param(_claims(nonce="not-this-flow"), 401, "nonce does not belong", id="wrong-nonce"),
    pytest.param(_claims(nonce=None), 401, "nonce does not belong", id="no-nonce"),
    pytest.param(_claims(role=None), 401, "lacks the 'role' claim", id="missing-role"),
    pytest.param(_claims(org=None), 401, "lacks the 'org' claim", id="missing-org"),
    pytest.param(_claims(role="superuser"), 401, "unknown role", id="unknown-role"),
    pytest.param(_claims(aud="another-service"), 401, "audience is not this service", id="wrong-audience"),
    pytest.param(_claims(iss="https://idp.elsewhere.test/"), 401, "token invalid", id="wrong-issuer"),
    pytest.param(_claims(exp=int(time.time()) - 3600, iat=int(time.time()) - 4000), 401, "token expired",
                 id="expired"),
    pytest.param(_claims(azp="another-client"), 401, "another client", id="other-client"),
    pytest.param(_instance_token, 401, "not issued by the identity provider", id="instance-token"),
    pytest.param(_provider_refuses, 401, "did not sign you in (access_denied)", id="provider-error"),
    pytest.param(_token_endpoint_fails, 502, "answered HTTP 500", id="token-endpoint-500"),
]


@pytest.mark.parametrize(("misbehave", "status", "reason"), REFUSALS)
def test_a_bad_answer_from_the_provider_signs_nobody_in(
        browser: TestClient, app: FastAPI, provider: StandInProvider, oidc_instance: Instance,
        misbehave: Callable[[StandInProvider, Instance], None], status: int, reason: str) -> None:
    misbehave(provider, oidc_instance)
    answer = sign_in(browser)
    _expect_refused(browser, app, answer, status, reason, f"provider misbehaving ({reason})")
    assert any("max-age=0" in value.lower() for value in cookie_headers(answer, FLOW_COOKIE)), (
        "a refused flow's cookie was not spent")


def test_state_of_another_flow_is_refused(browser: TestClient, app: FastAPI) -> None:
    back = urlsplit(at_provider(start(browser).headers["location"]))
    query = {name: values[0] for name, values in parse_qs(back.query).items()}
    forged = f"{CALLBACK}?{urlencode({**query, 'state': query['state'][::-1]})}"
    _expect_refused(browser, app, browser.get(forged, follow_redirects=False), 401, "state does not match",
                    "callback with another state")


def test_callback_without_a_flow_in_this_browser_is_refused(browser: TestClient, app: FastAPI,
                                                            other_app: Callable[..., TestClient]) -> None:
    """Login CSRF: a code and state from the attacker's own flow, delivered to a victim's browser."""
    attacker = other_app()
    back = at_provider(start(attacker).headers["location"])
    _expect_refused(browser, app, browser.get(back, follow_redirects=False), 401, "expired or was started in another",
                    "callback in a browser that started no flow")


def test_a_redeemed_code_is_refused(browser: TestClient, app: FastAPI,
                                    other_app: Callable[..., TestClient]) -> None:
    started = start(browser)
    flow_cookie = cookie_headers(started, FLOW_COOKIE)[0].split(";")[0]
    back = at_provider(started.headers["location"])
    assert browser.get(back, follow_redirects=False).status_code == 200, "the first redemption failed"
    browser.cookies.clear()
    _expect_refused(browser, app, browser.get(back, follow_redirects=False), 401, "expired or was started in another",
                    "the callback replayed in the same browser")
    # Even with the flow cookie itself (stolen with the URL), the provider redeems a code once.
    replayed = browser.get(back, headers={"Cookie": flow_cookie}, follow_redirects=False)
    _expect_refused(browser, app, replayed, 401, "refused the sign-in code (invalid_grant)",
                    "a replayed code with its flow cookie")


def test_token_endpoint_down_is_a_502_page(other_app: Callable[..., TestClient]) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    browser = other_app(oidc_token_url=f"http://127.0.0.1:{closed_port}/token")
    answer = browser.get(at_provider(start(browser).headers["location"]), follow_redirects=False)
    assert answer.status_code == 502 and "could not be reached" in answer.text, answer.text[:500]
    assert not session_set(answer), "a session cookie was set with the token endpoint down"


def test_no_provider_configured_offers_none(other_app: Callable[..., TestClient]) -> None:
    browser = other_app(oidc_authorize_url=None)
    assert "/console/oidc/start" not in browser.get("/console/login").text, "an unconfigured provider is offered"
    refused = browser.get("/console/oidc/start", follow_redirects=False)
    assert refused.status_code == 404 and refused.headers["content-type"].startswith("text/html"), refused.text[:300]
