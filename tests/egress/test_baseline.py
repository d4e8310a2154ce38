"""Baseline egress checks: kind by extension and content, sizes, special files, policy routing."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml

from sandbox.egress import OutputFacts, Verdict, detect_kind, sniff
from sandbox.release.routing import route_outputs

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def policy(name: str = "default") -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((POLICIES / f"{name}.yaml").read_text())
    return body


def facts(path: str, content: bytes, **extra: Any) -> OutputFacts:
    return OutputFacts(path=path, size=len(content), head=content[:65536], **extra)


def one(path: str, content: bytes, tier: str = "aggregate", name: str = "default", **extra: Any):  # type: ignore[no-untyped-def]
    [decision] = route_outputs([facts(path, content, **extra)], policy=policy(name), tier=tier)
    return decision


def safetensors_bytes() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0\0\0\0"


def test_a_plain_table_goes_to_review_until_content_checks_exist() -> None:
    decision = one("summary.csv", b"group,n\na,12\nb,15\n")
    assert decision.kind.value == "table" and decision.status == "in_review"
    assert "content-review" in [c.rule for c in decision.checks]


@pytest.mark.parametrize(("path", "content", "rule"), [
    ("model.pkl", pickle.dumps({"w": [1, 2]}), "safe-format"),
    ("model.joblib", b"\x80\x04\x95 joblib", "safe-format"),
    ("model.pt", b"PK\x03\x04....archive/data.pkl....", "safe-format"),
    ("innocent.csv", pickle.dumps([1, 2, 3]), "safe-format"),
    ("figure.png", b"GIF89a not a png", "kind"),
    ("report.pdf", b"plain text pretending", "kind"),
    ("table.parquet", b"a,b\n1,2\n", "kind"),
    ("rows.csv", b"\x00\x01\x02binary", "kind"),
    ("weights.safetensors", b"\xff" * 64, "kind"),
    ("program.exe", b"MZ\x90\x00", "kind"),
    ("noextension", b"data", "kind"),
])
def test_wrong_or_dangerous_content_is_blocked(path: str, content: bytes, rule: str) -> None:
    decision = one(path, content)
    assert decision.verdict is Verdict.BLOCK and decision.status == "blocked", f"{path} was not blocked"
    assert rule in [c.rule for c in decision.checks if c.verdict is Verdict.BLOCK]


def test_models_go_to_review_and_safetensors_is_recognised() -> None:
    decision = one("model.safetensors", safetensors_bytes(), tier="aggregate", name="default")
    assert decision.kind.value == "model" and decision.status == "in_review"
    assert "model-release" in [c.rule for c in decision.checks]


def test_dp_only_policy_lets_no_table_leave() -> None:
    decision = one("summary.csv", b"a,b\n1,2\n", tier="dp_only", name="dp-only")
    assert decision.status == "blocked" and "allowed-kinds" in [c.rule for c in decision.checks]


def test_size_caps_per_file_and_in_total() -> None:
    big = OutputFacts(path="big.csv", size=101 * 1024 * 1024, head=b"a,b\n")
    decision = route_outputs([big], policy=policy(), tier="aggregate")[0]
    assert decision.status == "blocked" and "size" in [c.rule for c in decision.checks]
    parts = [OutputFacts(path=f"part{n}.csv", size=90 * 1024 * 1024, head=b"a,b\n") for n in range(7)]
    statuses = [d.status for d in route_outputs(parts, policy=policy(), tier="aggregate")]
    assert statuses[:5] == ["in_review"] * 5 and statuses[5:] == ["blocked", "blocked"]


def test_files_the_runner_refused_are_blocked_with_the_reason() -> None:
    refused = OutputFacts(path="link-to-data", size=0, head=b"", refused_reason="symlink (not copied)")
    [decision] = route_outputs([refused], policy=policy(), tier="aggregate")
    assert decision.status == "blocked" and decision.checks[0].reason == "symlink (not copied)"


def test_a_false_manifest_claim_is_flagged() -> None:
    decision = one("result.json", b'{"mean": 1.5}', declared_kind="dp_result")
    assert "declared-kind" in [c.rule for c in decision.checks]


def test_logs_are_outputs_and_never_auto_release() -> None:
    decision = one("logs/stdout.txt", b"P000123,72,M\n", is_log=True)
    assert decision.kind.value == "log" and decision.status == "in_review"


def test_trusted_tier_reviews_everything() -> None:
    decision = one("summary.csv", b"a,b\n1,2\n", tier="trusted")
    assert decision.status == "in_review"


def test_sniff_recognises_common_magic() -> None:
    assert sniff(b"\x89PNG\r\n\x1a\n....") == "png"
    assert sniff(b"%PDF-1.7") == "pdf"
    assert sniff(b"PAR1....") == "parquet"
    assert sniff(pickle.dumps(1)) == "pickle"
    assert sniff(b"plain") is None


def test_detect_kind_accepts_utf8_cut_mid_character() -> None:
    text = ("é" * 40000).encode()
    kind, checks = detect_kind(OutputFacts(path="notes.txt", size=len(text), head=text[:65535]))
    assert kind.value == "text" and checks[0].verdict is Verdict.PASS


@pytest.mark.parametrize("tier", ["aggregate", "trusted", "dp_only"])
@pytest.mark.parametrize("path", ["P000123_F_73_stroke.txt", "logs/stderr.txt", "empty.csv"])
def test_empty_files_are_no_free_pass(path: str, tier: str) -> None:
    # 2,550 empty files, each named with a row, carried the registry out: emptiness says nothing of the name.
    assert one(path, b"", is_log=path.startswith("logs/"), tier=tier).status == "in_review"
    assert one(path, b"", is_log=path.startswith("logs/"), tier=tier, name="strict").status == "in_review"


CLEAN_SVG = b'<svg xmlns="http://www.w3.org/2000/svg"><defs><linearGradient id="g"/></defs>' \
            b'<rect fill="url(#g)" width="10" height="10"/><use href="#g"/></svg>'


@pytest.mark.parametrize(("svg", "what"), [
    (b'<svg xmlns="http://www.w3.org/2000/svg"><script>fetch("x")</script></svg>', "a script"),
    (b'<svg xmlns="http://www.w3.org/2000/svg"><rect onload="alert(1)"/></svg>', "an event handler"),
    (b'<svg xmlns="http://www.w3.org/2000/svg"><image href="https://evil.example/p.png"/></svg>',
     "an external reference"),
    (b'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink">'
     b'<image xlink:href="file:///etc/passwd"/></svg>', "an external reference"),
    (b'<svg xmlns="http://www.w3.org/2000/svg"><rect style="fill:url(https://evil.example/x)"/></svg>',
     "an external url()"),
    (b'<svg xmlns="http://www.w3.org/2000/svg"><foreignObject><div/></foreignObject></svg>', "a foreignObject"),
    (b'<!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]><svg>&x;</svg>', "an XML entity"),
])
def test_active_svg_is_refused(svg: bytes, what: str) -> None:
    decision = one("figure.svg", svg)
    assert decision.status == "blocked", f"an SVG with {what} was not refused"
    assert any(c.rule == "svg-active-content" and what in c.reason for c in decision.checks)


def test_a_plain_svg_goes_to_review() -> None:
    decision = one("figure.svg", CLEAN_SVG)
    assert decision.status == "in_review" and "figure-release" in [c.rule for c in decision.checks]


def test_skops_must_be_a_skops_archive() -> None:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("schema.json", "{}")
    assert one("model.skops", buffer.getvalue()).status == "in_review"
    assert one("model.skops", pickle.dumps({"w": 1})).status == "blocked"


def test_models_meet_the_membership_inference_hook() -> None:
    from sandbox.egress import models

    decision = one("model.safetensors", safetensors_bytes())
    assert "membership-inference" in [c.rule for c in decision.checks]

    @models.register_model_check
    def too_risky(facts: OutputFacts):  # type: ignore[no-untyped-def]
        from sandbox.egress.baseline import CheckResult
        return CheckResult("membership-inference", Verdict.BLOCK, f"attack AUC 0.9 on {facts.path}")

    try:
        assert one("model.safetensors", safetensors_bytes()).status == "blocked"
    finally:
        models.MODEL_CHECKS.remove(too_risky)


def test_a_file_whose_content_passed_its_checks_releases_by_policy_only_where_code_saw_no_rows() -> None:
    from sandbox.egress.verdicts import CheckResult

    table = facts("crosstab.csv", b"sex,n\nF,120\nM,480\n")
    passed = {"crosstab.csv": [CheckResult("leak-scan", Verdict.PASS, "no rows"),
                               CheckResult("min-cell-count", Verdict.PASS, "all cells >= 10")]}
    [decision] = route_outputs([table], policy=policy(), tier="dp_only", content=passed)
    assert decision.status == "released"
    [aggregate] = route_outputs([table], policy=policy(), tier="aggregate", content=passed)
    assert aggregate.status == "in_review", "the buyer's own bytes left the aggregate tier without a person"
    assert "unverified-content" in [c.rule for c in aggregate.checks]
    [strict] = route_outputs([table], policy=policy("strict"), tier="aggregate", content=passed)
    assert strict.status == "in_review", "the strict policy released without review"
    [trusted] = route_outputs([table], policy=policy(), tier="trusted", content=passed)
    assert trusted.status == "in_review", "the trusted tier released without review"


def test_a_leak_in_one_file_holds_the_whole_job() -> None:
    from sandbox.egress.verdicts import CheckResult

    files = [facts("summary.json", b'{"rows": []}'), facts("crosstab.csv", b"sex,n\nF,120\n"),
             facts("logs/stderr.txt", b"", is_log=True)]
    content = {"summary.json": [CheckResult("leak-scan", Verdict.BLOCK, "50 dataset rows")],
               "crosstab.csv": [CheckResult("leak-scan", Verdict.PASS, "no rows")]}
    # dp_only, where files whose checks pass release by themselves: the leak holds them all the same.
    decisions = {d.path: d for d in route_outputs(files, policy=policy(), tier="dp_only", content=content)}
    assert decisions["summary.json"].status == "blocked"
    assert decisions["crosstab.csv"].status == "in_review" and decisions["logs/stderr.txt"].status == "in_review"
    assert "leak-quarantine" in [c.rule for c in decisions["crosstab.csv"].checks]


def test_logs_in_the_aggregate_tier_follow_the_policy_file() -> None:
    from sandbox.egress.verdicts import CheckResult

    log = facts("logs/stdout.txt", b"fitted 3 models\n", is_log=True)
    clean = {"logs/stdout.txt": [CheckResult("leak-scan", Verdict.PASS, "no rows")]}
    [held] = route_outputs([log], policy=policy(), tier="aggregate", content=clean)
    assert held.status == "in_review" and "logs" in [c.rule for c in held.checks]
    lenient = policy()
    lenient["egress"]["logs"] = {"release": "if_clean"}
    [shown] = route_outputs([log], policy=lenient, tier="aggregate", content=clean)
    assert shown.status == "released"
    dirty = {"logs/stdout.txt": [CheckResult("leak-scan", Verdict.BLOCK, "3 rows")]}
    [caught] = route_outputs([log], policy=lenient, tier="aggregate", content=dirty)
    assert caught.status == "blocked"


@pytest.mark.parametrize("name", ["logs/stdout.txt", "tables/count-by-sex.csv", "dp/answer.json", ".tables/x.json",
                                  ".hidden", "a/../b.txt", "P 000123.txt", "naïve.txt", "x" * 101 + ".txt",
                                  "a\nb.txt", "-rf.txt"])
def test_names_that_cannot_stand_are_caught(name: str) -> None:
    from sandbox.release.routing import name_problem

    problem = name_problem(name)
    assert problem is not None and problem.verdict is Verdict.BLOCK, f"{name!r} passed as an output name"


@pytest.mark.parametrize("name", ["result.csv", "figures/fig-1.png", "a_b.C-d.txt"])
def test_plain_names_stand(name: str) -> None:
    from sandbox.release.routing import name_problem

    assert name_problem(name) is None


@pytest.mark.parametrize("name", ["default", "dp-only"])
@pytest.mark.parametrize("path", ["model.safetensors", "net.onnx", "model.skops"])
def test_a_dp_only_contract_never_releases_a_model_its_job_trained(name: str, path: str) -> None:
    """Only the model the platform trained with DP leaves a dp_only contract; it is stored by the platform and
    never routed here, so every model file a job wrote is blocked, whatever the policy says of models."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("schema.json", "{}")
    content = {"model.safetensors": safetensors_bytes(), "net.onnx": b"\x08\x07" + b"\0" * 64,
               "model.skops": buffer.getvalue()}[path]
    decision = one(path, content, tier="dp_only", name=name)
    assert decision.status == "blocked"
    assert "dp-only-model" in [c.rule for c in decision.checks if c.verdict == "block"]
    assert one(path, content, tier="aggregate").status != "released", "elsewhere a steward still decides"
