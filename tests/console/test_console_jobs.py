"""The console's sign-in, session and CSRF rules, and the steward's job pages, through a TestClient.

The browser tests (tests/browser/) show the same flows in Chromium; these pin the rules cheaply and on
both stores: who may open which page, what a form needs, and that decisions are the API's own.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo
from jobworld import pack

from sandbox.auth.tokens import Role, issue_token
from sandbox.instance import Instance

CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')


def browser(api: TestClient, *, scheme: str = "http") -> TestClient:
    """Another client of the same app, with its own cookies, as another person's browser."""
    return TestClient(api.app, base_url=f"{scheme}://testserver", raise_server_exceptions=False)


def sign_in(client: TestClient, token: str) -> str:
    """Sign in as the login page does; the CSRF value of this sign-in."""
    page = client.get("/console/login")
    nonce = re.search(r'name="nonce" value="([^"]+)"', page.text)
    assert nonce, page.text
    signed = client.post("/console/login", data={"token": token, "nonce": nonce.group(1), "next": "/console/"},
                         follow_redirects=False)
    assert signed.status_code == 303, signed.text
    home = client.get("/console/")
    assert home.status_code == 200, home.text
    found = CSRF.search(home.text)
    assert found
    return found.group(1)


def strict_contract(api: TestClient, steward: str, org: str = "acme") -> str:
    answer = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": org, "datasets": ["carotid-stenting"], "tier": "trusted", "kinds": ["analysis"],
        "purpose": "console", "valid_until": "2099-01-01", "epsilon": 1.0, "policy": "strict"})
    assert answer.status_code == 201, answer.text
    contract: str = answer.json()["id"]
    return contract


def submit(api: TestClient, buyer: str, contract: str, code: dict[str, str]) -> str:
    spec = {"contract": contract, "dataset": "carotid-stenting", "image": "analysis", "command": ["python3", "main.py"],
            "resources": {"cpus": 1, "memory_mb": 256, "timeout_s": 60}}
    answer = api.post("/v1/jobs", headers=auth(buyer), data={"spec": json.dumps(spec)},
                      files={"code": ("code.tar.gz", pack(code), "application/gzip")})
    assert answer.status_code == 201, answer.text
    job: str = answer.json()["id"]
    return job


def expired_token(instance: Instance) -> str:
    """A steward token of this instance that expired two hours ago (past any leeway)."""
    s = instance.settings
    return issue_token(key=instance.signing_key, issuer=s.token_issuer, audience=s.token_audience, sub="late",
                       org="hospital", role=Role.STEWARD, ttl_s=3600,
                       now=datetime.now(UTC) - timedelta(hours=3)).token


def test_sign_in_sets_a_strict_http_only_cookie_and_refuses_bad_tokens(api: TestClient, tokens: Tokens,
                                                                        instance: Instance) -> None:
    client = browser(api)
    assert client.get("/console/", follow_redirects=False).headers["location"] == "/console/login?next=/console/"
    page = client.get("/console/login")
    nonce = re.search(r'name="nonce" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    for bad, why in ((expired_token(instance), "expired"),
                     ("not-a-token", "")):
        refused = client.post("/console/login", data={"token": bad, "nonce": nonce})
        assert refused.status_code == 401 and "Not signed in" in refused.text and why in refused.text
        assert "sandbox_console=" not in refused.headers.get("set-cookie", "")
        nonce = re.search(r'name="nonce" value="([^"]+)"', refused.text).group(1)  # type: ignore[union-attr]
    # A login form posted without this browser's nonce (another site's form) is refused.
    other = browser(api)
    forged = other.post("/console/login", data={"token": tokens.steward(), "nonce": nonce})
    assert forged.status_code == 403

    steward = tokens.steward()
    signed = client.post("/console/login", data={"token": steward, "nonce": nonce, "next": "//evil.example/x"},
                         follow_redirects=False)
    assert signed.headers["location"] == "/console/", "the sign-in redirected off the console"
    cookie = next(c for c in signed.headers.get_list("set-cookie") if c.startswith("sandbox_console="))
    flags = {part.strip().lower() for part in cookie.split(";")}
    assert {"httponly", "samesite=strict", "path=/console"} <= flags and "secure" not in flags
    # Over TLS the cookie is Secure too.
    tls = browser(api, scheme="https")
    page = tls.get("/console/login")
    nonce = re.search(r'name="nonce" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    signed = tls.post("/console/login", data={"token": steward, "nonce": nonce}, follow_redirects=False)
    assert "secure" in signed.headers["set-cookie"].lower()

    # A revoked token's session ends at the next page.
    jti = instance.verifier.verify(steward).jti
    instance.revoke_token(jti)
    assert client.get("/console/", follow_redirects=False).status_code == 303


def test_forms_need_this_sign_ins_csrf_token_and_the_consoles_own_origin(api: TestClient, tokens: Tokens) -> None:
    client = browser(api)
    csrf = sign_in(client, tokens.steward())
    other_csrf = sign_in(browser(api), tokens.steward(sub="steward-2"))
    assert csrf != other_csrf, "two sign-ins share a CSRF token"
    for data, headers in (({}, {}), ({"csrf": other_csrf}, {}), ({"csrf": csrf}, {"Origin": "http://evil.example"}),
                          ({"csrf": csrf}, {"Origin": "null"}),
                          ({"csrf": csrf}, {"Referer": "http://evil.example/page"})):
        refused = client.post("/console/logout", data=data, headers=headers)
        assert refused.status_code == 403, (data, headers)
        assert refused.headers["content-type"].startswith("text/html")
    assert client.get("/console/").status_code == 200, "a refused form signed the user out"
    done = client.post("/console/logout", data={"csrf": csrf}, headers={"Origin": "http://testserver"},
                       follow_redirects=False)
    assert done.status_code == 303
    assert client.get("/console/", follow_redirects=False).status_code == 303


def test_pages_refuse_the_roles_and_orgs_the_api_refuses(api: TestClient, tokens: Tokens, tmp_path: Path) -> None:
    steward = tokens.steward()
    register_demo(api, steward, tmp_path, procedures=60)
    contract = strict_contract(api, steward)
    job = submit(api, tokens.buyer(), contract, {"main.py": "print('hi')\n"})
    buyer = browser(api)
    sign_in(buyer, tokens.buyer())
    for path in ("/console/approvals", "/console/reviews", f"/console/reviews/{job}"):
        refused = buyer.get(path)
        assert refused.status_code == 403 and "for steward" in refused.text, path
    # The buyer sees its own job, without the steward's diff or decision form.
    own = buyer.get(f"/console/jobs/{job}")
    assert own.status_code == 200 and "print(&#39;hi&#39;)" in own.text and 'value="approve"' not in own.text
    # Another org's buyer and steward: 404, as through the API.
    for token in (tokens.buyer(org="rival"), tokens.steward(org="other-hospital")):
        client = browser(api)
        sign_in(client, token)
        assert client.get(f"/console/jobs/{job}").status_code == 404
    auditor = browser(api)
    sign_in(auditor, tokens.auditor())
    assert auditor.get("/console/approvals").status_code == 403
    assert auditor.get(f"/console/jobs/{job}").status_code == 403


def test_a_steward_approves_with_a_comment_and_sees_the_diff_against_the_last_approved_job(
        api: TestClient, tokens: Tokens, tmp_path: Path) -> None:
    steward = tokens.steward()
    register_demo(api, steward, tmp_path, procedures=60)
    contract = strict_contract(api, steward)
    buyer = tokens.buyer()
    first = submit(api, buyer, contract, {"main.py": "print('one')\n", "util.py": "X = 1\n"})
    client = browser(api)
    csrf = sign_in(client, steward)
    queue = client.get("/console/approvals")
    assert first in queue.text
    page = client.get(f"/console/jobs/{first}")
    assert "no earlier approved job" in page.text and "X = 1" in page.text
    approved = client.post(f"/console/jobs/{first}/decision", data={
        "csrf": csrf, "decision": "approve", "comment": "<script>alert(1)</script> fine"}, follow_redirects=False)
    assert approved.status_code == 303 and approved.headers["location"].endswith("notice=approved")
    assert api.get(f"/v1/jobs/{first}", headers=auth(steward)).json()["state"] == "queued"
    events = api.get("/v1/audit", headers=auth(steward), params={"action": "job.queued"}).json()
    assert any(e["object_id"] == first and e["details"].get("approved_by") == "steward-1" for e in events)

    second = submit(api, buyer, contract, {"main.py": "print('two')\nopen('/output/x', 'w')\n", "new.py": "Y = 2\n"})
    page = client.get(f"/console/jobs/{second}")
    assert f"Compared with <a href=\"/console/jobs/{first}\">" in page.text
    assert '<span class="del">-print(&#39;one&#39;)</span>' in page.text
    assert '<span class="add">+open(&#39;/output/x&#39;, &#39;w&#39;)</span>' in page.text
    assert "util.py</code> <span class=\"muted\">removed" in page.text
    assert "new.py</code> <span class=\"muted\">added" in page.text
    # Deciding twice is the API's conflict, shown as a page.
    again = client.post(f"/console/jobs/{first}/decision", data={"csrf": csrf, "decision": "reject"})
    assert again.status_code == 409 and "not pending approval" in again.text
    # Every console page carries the restrictive policy.
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy.split("style-src")[0]
    assert page.headers["x-frame-options"] == "DENY"
