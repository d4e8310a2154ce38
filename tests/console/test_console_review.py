"""The review page through a TestClient, with a real job's outputs: safe previews and the two-person rule."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from console.test_console_jobs import browser, sign_in, strict_contract
from helpers import Tokens, auth
from jobworld import JobWorld, analysis_image, job_world

__all__ = ["analysis_image", "job_world"]

pytestmark = pytest.mark.docker


@pytest.fixture
def database_url() -> Iterator[None]:
    """SQLite only: the pages' rules are tested on both stores without Docker (test_console_jobs.py)."""
    yield None


def test_review_page_previews_files_safely_and_decisions_follow_the_two_person_rule(
        job_world: JobWorld, tokens: Tokens) -> None:
    w = job_world
    contract = strict_contract(w.api, w.steward)
    code = ("open('/output/summary.csv', 'w').write('group,n\\n<b>a</b>,15\\nb,20\\n')\n"
            "open('/output/page.html', 'w').write('<script>alert(1)</script>')\n"
            "print('<img src=x onerror=alert(2)>')\n")
    job = w.submit({"main.py": code}, ["python3", "main.py"], contract=contract)["id"]
    w.api.post(f"/v1/jobs/{job}/approve", headers=auth(w.steward))
    w.run_until(job, {"in_review"})
    first = browser(w.api)
    csrf = sign_in(first, tokens.steward(sub="ana"))
    page = first.get(f"/console/reviews/{job}")
    assert page.status_code == 200
    # The table is a table of escaped cells; the log's markup is text.
    assert "<td>&lt;b&gt;a&lt;/b&gt;</td>" in page.text
    assert "&lt;img src=x onerror=alert(2)&gt;" in page.text and "<img src=x" not in page.text
    # The raw bytes come only under a policy that runs nothing, never as a page of the console's origin.
    raw = first.get(f"/console/reviews/{job}/files/page.html", params={"render_as": "html"})
    assert raw.headers["content-type"].startswith("text/html")
    assert "sandbox" in raw.headers["content-security-policy"].split(";")[3]
    assert "script-src" not in raw.headers["content-security-policy"] and raw.headers["x-content-type-options"] == \
        "nosniff"
    assert first.get(f"/console/reviews/{job}/files/page.html").headers["content-type"].startswith("text/plain")
    inspected = w.api.get("/v1/audit", headers=auth(w.steward), params={"action": "job.output.inspect"}).json()
    assert {e["details"]["path"] for e in inspected if e["object_id"] == job} >= {"summary.csv", "page.html"}

    released = first.post(f"/console/reviews/{job}/decision", data={
        "csrf": csrf, "path": "summary.csv", "decision": "release", "comment": "counts"}, follow_redirects=True)
    assert "Released by 1 of 2 stewards needed: ana" in released.text
    again = first.post(f"/console/reviews/{job}/decision", data={"csrf": csrf, "path": "summary.csv",
                                                                  "decision": "release"})
    assert again.status_code == 409 and "different steward" in again.text
    second = browser(w.api)
    csrf_2 = sign_in(second, tokens.steward(sub="ben"))
    second.post(f"/console/reviews/{job}/decision", data={"csrf": csrf_2, "path": "summary.csv",
                                                          "decision": "release"})
    report = w.api.get(f"/v1/jobs/{job}/report", headers=auth(w.buyer)).json()
    assert [e["path"] for e in report["released"]] == ["summary.csv"]
    # A steward of the buyer's own org may not decide, on the page as through the API.
    mole = browser(w.api)
    sign_in(mole, tokens.steward(sub="mole", org="acme"))
    assert mole.get(f"/console/reviews/{job}").status_code == 403
