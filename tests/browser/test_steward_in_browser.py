"""A steward approves a job and decides on its outputs in the console, in headless Chromium; the buyer sees the result.

The job writes a safe table beside hostile files: HTML and SVG that try to run script, and names that
carry markup. No script may run in a steward's browser, on any page or frame that shows them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cli.server import Server, register_registry

pytestmark = [pytest.mark.browser, pytest.mark.docker]

# The job reads the data, writes one aggregate table and three hostile files.
JOB = r'''
import pandas as pd
df = pd.read_parquet('/data/carotid-stenting.parquet')
df.groupby('embolic_protection')['length_of_stay'].mean().rename('mean_stay').to_csv('/output/summary.csv')
open('/output/evil.html', 'w').write(
    "<h1 id=x>report</h1><script>parent.document.title='pwned-html';alert('html')</script>"
    "<img src=x onerror=\"alert('img')\">")
open('/output/evil.svg', 'w').write(
    '<svg xmlns="http://www.w3.org/2000/svg" onload="alert(\'svg-onload\')" width="10" height="10">'
    "<script>alert('svg-script')</script><rect width='10' height='10'/></svg>")
open("/output/notes-<img src=x onerror=alert('name')>.txt", 'w').write("<script>alert('text')</script>")
'''
MARKUP_COMMENT = "<b>looks fine</b><script>alert('comment')</script>"


def wait_for_state(server: Server, token: str, job_id: str, state: str, timeout_s: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = httpx.get(f"{server.url}/v1/jobs/{job_id}", params={"wait_s": 5, "since": view.get("state", "")},
                         headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
        if view["state"] == state:
            return view
        if view["state"] in ("failed", "rejected", "cancelled"):
            break
    raise AssertionError(f"job {job_id} did not reach {state}: {view}")


def submit(server: Server, tmp_path: Path, buyer: str, contract: str) -> str:
    code = tmp_path / "code"
    code.mkdir()
    (code / "main.py").write_text(JOB)
    for _ in range(90):  # the worker publishes its images shortly after the server starts
        submitted = server.cli("job", "submit", "--contract", contract, "--dataset", "carotid-stenting@1",
                               "--code", str(code), "--json", "--", "python3", "main.py", token=buyer, check=False)
        if "not available on the workers" not in submitted.stderr:
            break
        time.sleep(1)
    assert submitted.returncode == 0, submitted.stderr
    job_id: str = json.loads(submitted.stdout)["id"]
    return job_id


def watch_for_script(page: Any) -> list[str]:
    """Every dialog and every CSP report on the page: a dialog means a hostile script ran."""
    ran: list[str] = []

    def dialog(d: Any) -> None:
        ran.append(f"dialog: {d.message}")
        d.dismiss()

    page.on("dialog", dialog)
    return ran


def test_steward_approves_and_decides_in_the_browser_and_the_buyer_sees_the_result(
        console_server: Server, new_page: Any, sign_in: Any, tmp_path: Path, analysis_image: str) -> None:
    server = console_server
    first = server.token("steward", "hospital", "dr-li")
    second = server.token("steward", "hospital", "dr-wu")
    buyer = server.token("buyer", "acme-ai", "alice")
    register_registry(server, first, tmp_path, procedures=120)
    # The strict policy asks for approval before a job runs and for two stewards before a file leaves.
    contract = json.loads(server.cli(
        "contract", "create", "--buyer-org", "acme-ai", "--dataset", "carotid-stenting", "--tier", "trusted",
        "--kinds", "analysis", "--epsilon", "1", "--valid-until", "2099-12-31", "--policy", "strict", "--json",
        token=first).stdout)["id"]
    job_id = submit(server, tmp_path, buyer, contract)

    page = new_page()
    ran = watch_for_script(page)
    sign_in(page, server.url, first)
    assert "1 job awaiting approval" in " ".join(page.inner_text("main").split())
    page.click("text=Approvals")
    page.click(f"a:has-text('{job_id}')")
    # The whole code listing (this buyer has no approved job to diff against) and the spec.
    assert "to_csv('/output/summary.csv')" in page.inner_text("main")
    assert "no earlier approved job" in page.inner_text("main")
    page.fill("#comment", "aggregates and a report")
    page.click("button[value=approve]")
    assert "approved and queued" in page.inner_text(".notice")
    wait_for_state(server, first, job_id, "in_review")

    page.goto(f"{server.url}/console/reviews")
    page.click(f"a:has-text('{job_id}')")
    summary = page.locator("section.output[data-path='summary.csv']")
    assert "mean_stay" in summary.locator("table.data").inner_text()
    summary.locator("textarea").fill(MARKUP_COMMENT)
    summary.locator("button[value=release]").click()
    summary = page.locator("section.output[data-path='summary.csv']")
    # Two stewards are needed: the first release is shown, and the file still waits.
    assert "Released by 1 of 2 stewards needed: dr-li" in summary.inner_text()
    assert "another steward must release it" in summary.inner_text()
    # The checks blocked the hostile files already; a steward rejects the empty error log.
    for blocked in ("evil.html", "evil.svg"):
        assert "block" in page.locator(f"section.output[data-path='{blocked}'] .verdicts").inner_text()
    stderr = page.locator("section.output[data-path='logs/stderr.txt']")
    stderr.locator("textarea").fill(MARKUP_COMMENT)
    stderr.locator("button[value=reject]").click()
    stderr = page.locator("section.output[data-path='logs/stderr.txt']")
    assert "blocked" in stderr.locator(".verdicts").inner_text()
    # The comment is shown as text, not markup.
    assert MARKUP_COMMENT in stderr.inner_text()
    assert page.locator("main b:has-text('looks fine')").count() == 0
    # The file whose name carried markup is listed under a neutral name, and nothing of it became an element.
    assert page.locator("main img[src='x']").count() == 0
    assert page.locator("section.output[data-path^='withheld/']").count() == 1
    # Hostile content: the review page with its frames and images, and each raw file opened directly.
    page.reload()
    page.wait_for_timeout(500)
    raw = f"{server.url}/console/reviews/{job_id}/files"
    for target in ("evil.html?render_as=html", "evil.svg?render_as=image", "evil.html", "evil.svg"):
        page.goto(f"{raw}/{target}")
        page.wait_for_timeout(200)
    assert ran == [], f"a hostile output ran script in the steward's browser: {ran}"
    page.goto(f"{server.url}/console/reviews/{job_id}")
    assert "pwned" not in page.title()

    other = new_page()
    sign_in(other, server.url, second)
    other.goto(f"{server.url}/console/reviews/{job_id}")
    summary = other.locator("section.output[data-path='summary.csv']")
    summary.locator("button[value=release]").click()
    assert "released" in other.locator("section.output[data-path='summary.csv'] .verdicts").inner_text()

    customer = new_page()
    sign_in(customer, server.url, buyer)
    customer.goto(f"{server.url}/console/jobs/{job_id}")
    report = customer.inner_text("#report")
    assert "summary.csv" in report and "Download" in report
    assert "evil" not in report and "notes-" not in report, "the buyer saw the name of a file it did not get"
    with customer.expect_download() as download:
        customer.click("a:has-text('Download')")
    assert "mean_stay" in Path(download.value.path()).read_text()


def test_a_buyers_cookie_does_not_reach_steward_pages_and_forged_forms_are_refused(
        console_server: Server, new_page: Any, sign_in: Any) -> None:
    server = console_server
    buyer = server.token("buyer", "acme-ai", "bob")
    steward = server.token("steward", "hospital", "dr-chen")
    page = new_page()
    sign_in(page, server.url, buyer)
    for path in ("/console/approvals", "/console/reviews", "/console/reviews/j-0000000000000000"):
        answer = page.goto(f"{server.url}{path}")
        assert answer is not None and answer.status == 403, f"a buyer reached {path}"
        assert "for steward" in page.inner_text("main")

    steward_page = new_page()
    sign_in(steward_page, server.url, steward)
    cookies = {c["name"]: c for c in steward_page.context.cookies()}
    session = cookies["sandbox_console"]
    assert session["httpOnly"] and session["sameSite"] == "Strict" and session["path"] == "/console"
    # A form without this sign-in's CSRF token is refused, as is one posted from another site.
    forged = steward_page.request.post(f"{server.url}/console/logout", form={"csrf": "0" * 64})
    assert forged.status == 403 and "CSRF" in forged.text()
    steward_page.goto(f"{server.url}/console/")
    csrf = steward_page.locator("input[name=csrf]").first.get_attribute("value")
    cross_site = steward_page.request.post(f"{server.url}/console/logout", form={"csrf": csrf},
                                           headers={"Origin": "http://evil.example"})
    assert cross_site.status == 403 and "another site" in cross_site.text()
    # Another site's page, in the steward's own browser, cannot make it send the cookie (SameSite=Strict):
    # its form lands on the sign-in page, and the steward stays signed in.
    attacker = steward_page.context.new_page()
    attacker.set_content(f"<form id=f method=post action='{server.url}/console/logout'>"
                         f"<input name=csrf value='{csrf}'></form>")
    with attacker.expect_navigation():
        attacker.evaluate("document.getElementById('f').submit()")
    assert "/console/login" in attacker.url, f"the cross-site form reached {attacker.url}"
    steward_page.goto(f"{server.url}/console/")
    assert "Sign out" in steward_page.inner_text("header"), "a cross-site form signed the steward out"
