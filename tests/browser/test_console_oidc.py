"""Signing in to the console with the organisation's provider, in a real browser against a real server.

The provider is reached as `localhost` and the console as `127.0.0.1`: two sites. The user follows a
link on the provider's page back to the console, as after signing in there, so the way back starts on
another site, as in production, and the SameSite=Strict session cookie must still sign the browser in.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nbworld import LiveServer
from oidc_provider import StandInProvider, stand_in_provider

from sandbox.api.app import create_app
from sandbox.api.console.session import SESSION_COOKIE
from sandbox.config import Settings
from sandbox.instance import Instance, init_instance

pytestmark = pytest.mark.browser


@pytest.fixture
def provider() -> Iterator[StandInProvider]:
    with stand_in_provider() as running:
        yield running


@pytest.fixture
def console(tmp_path: Path, provider: StandInProvider) -> Iterator[str]:
    settings = provider.configure(Settings(home=tmp_path / "home", log_json=True), browser_host="localhost")
    init_instance(settings)
    instance = Instance(settings)
    try:
        with LiveServer(create_app(instance)) as base:
            yield base
    finally:
        instance.close()


def test_sign_in_with_the_provider_lands_on_the_console_home(new_page: Any, console: str,
                                                             provider: StandInProvider) -> None:
    page = new_page()
    page.goto(f"{console}/console/")
    assert page.url.startswith(f"{console}/console/login"), f"an anonymous browser was not sent to sign in: {page.url}"
    provider.consent_page = True
    page.get_by_role("link", name="Sign in with Hospital SSO").click()
    page.wait_for_url("http://localhost:*/authorize?*")
    page.get_by_role("link", name="Continue").click()
    # The home page, or the sign-in page if the session cookie did not come with the way back.
    page.wait_for_url(re.compile(r".*/console/(login\b.*)?$"))
    assert page.url == f"{console}/console/", f"the browser is not signed in after the provider: {page.url}"
    heading = page.get_by_role("heading", level=1).inner_text()
    assert heading == "Welcome, dr-jones", f"the browser did not land signed in on the home page: {heading!r}"
    assert provider.token_requests == 1, "the code was not exchanged at the provider's token endpoint"
    assert "steward" in page.locator("header .whoami").inner_text()
    session = [cookie for cookie in page.context.cookies() if cookie["name"] == SESSION_COOKIE]
    assert len(session) == 1, "no session cookie in the browser"
    assert session[0]["httpOnly"] and session[0]["sameSite"] == "Strict" and session[0]["path"] == "/console", (
        f"the session cookie's flags: {session[0]}")
