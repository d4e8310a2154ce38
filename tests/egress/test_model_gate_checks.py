"""Verdicts from the membership-inference gate's report: thresholds, defaults, and entries that block."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from sandbox.egress.models import GateThresholds, gate_checks, model_risk_checks
from sandbox.egress.verdicts import OutputFacts, Verdict

POLICIES = Path(__file__).resolve().parents[2] / "sandbox" / "_policies"


def entry(**changes: Any) -> dict[str, Any]:
    """A report entry as the gate writes it for a model that generalises."""
    body: dict[str, Any] = {
        "format": "skops", "loaded": True, "problem": None,
        "attacks": [
            {"name": "worst_case", "auc": 0.52, "tpr_at_fpr": {"0.01": 0.012, "0.001": 0.001}, "advantage": 0.03,
             "n_members": 1500, "n_non_members": 1500},
            {"name": "lira", "auc": 0.55, "tpr_at_fpr": {"0.01": 0.02, "0.001": 0.002}, "advantage": 0.06,
             "n_members": 1000, "n_non_members": 1000}],
        "attacks_not_run": None, "attacks_skipped": [],
        "per_record_risk": {"n_records": 1000, "high_risk": 12, "max": 1.0, "method": "lira"},
        "weights": {"checked_tensors": 4, "skipped_tensors": 0, "reproduces": []},
    }
    body.update(changes)
    return body


def verdicts(report_entry: Any, thresholds: Any = None) -> dict[str, Verdict]:
    return {c.rule: c.verdict for c in gate_checks(report_entry, thresholds)}


def test_a_model_under_every_threshold_passes_each_rule() -> None:
    checks = gate_checks(entry(), {})
    assert {c.rule: c.verdict for c in checks} == {"model-file": Verdict.PASS, "model-weights": Verdict.PASS,
                                                   "membership-inference": Verdict.PASS}
    assert "lira AUC 0.550" in next(c.reason for c in checks if c.rule == "membership-inference")


@pytest.mark.parametrize(("change", "named"), [
    ({"auc": 0.7}, "worst_case AUC 0.700 > 0.65"),
    ({"tpr_at_fpr": {"0.01": 0.25, "0.001": 0.1}}, "worst_case TPR 0.250 at FPR 0.01 > 0.1"),
])
def test_an_attack_past_a_threshold_blocks(change: dict[str, Any], named: str) -> None:
    attacks = entry()["attacks"]
    attacks[0].update(change)
    [membership] = [c for c in gate_checks(entry(attacks=attacks), {}) if c.rule == "membership-inference"]
    assert membership.verdict is Verdict.BLOCK and named in membership.reason


def test_too_many_high_risk_records_block() -> None:
    risky = entry(per_record_risk={"n_records": 1000, "high_risk": 80, "max": 1.0, "method": "lira"})
    [membership] = [c for c in gate_checks(risky, None) if c.rule == "membership-inference"]
    assert membership.verdict is Verdict.BLOCK and "80 of 1000 training records" in membership.reason


def test_the_policys_thresholds_replace_the_defaults() -> None:
    attacks = entry()["attacks"]
    attacks[1]["auc"] = 0.7
    model = entry(attacks=attacks)
    assert verdicts(model, {})["membership-inference"] is Verdict.BLOCK
    assert verdicts(model, {"max_auc": 0.75})["membership-inference"] is Verdict.PASS
    assert verdicts(entry(), {"max_auc": 0.54})["membership-inference"] is Verdict.BLOCK
    assert verdicts(entry(), {"max_high_risk_fraction": 0.01})["membership-inference"] is Verdict.BLOCK


def test_defaults_match_the_shipped_policies_and_missing_keys_fall_back_to_them() -> None:
    assert GateThresholds.from_policy(None) == GateThresholds.from_policy({}) == GateThresholds(
        0.65, 0.1, 0.05, Verdict.REVIEW)
    for name in ("default", "strict"):
        policy = yaml.safe_load((POLICIES / f"{name}.yaml").read_text())
        assert GateThresholds.from_policy(policy["egress"]["models"]["gate"]) == GateThresholds(), name
    assert GateThresholds.from_policy({"max_auc": 0.8}) == GateThresholds(max_auc=0.8)


def test_the_schema_accepts_the_gate_object_and_refuses_what_it_does_not_know() -> None:
    validator = Draft202012Validator(json.loads((POLICIES / "policy.schema.json").read_text()))
    policy = yaml.safe_load((POLICIES / "default.yaml").read_text())
    assert list(validator.iter_errors(policy)) == []
    without = copy.deepcopy(policy)
    del without["egress"]["models"]["gate"]
    assert list(validator.iter_errors(without)) == [], "the gate object must stay optional"
    for bad in ({"max_auc": 0.3}, {"max_auc": 1.5}, {"unattacked": "pass"}, {"max_tpr": 0.1}):
        broken = copy.deepcopy(policy)
        broken["egress"]["models"]["gate"] = bad
        assert list(validator.iter_errors(broken)), f"the schema accepted gate {bad}"


def test_stored_training_data_blocks_without_naming_the_buyers_tensors() -> None:
    found = entry(weights={"checked_tensors": 3, "skipped_tensors": 0, "reproduces": [
        {"tensor": "model._fit_X", "what": "row", "rounding": "exact", "matches": 1500},
        {"tensor": "secret_67_80", "what": "column", "rounding": "float16", "matches": 3}]})
    [weights] = [c for c in gate_checks(found, {}) if c.rule == "model-weights"]
    assert weights.verdict is Verdict.BLOCK
    assert "1 tensor reproduce training rows (exactly)" in weights.reason
    assert "columns (after float16 rounding)" in weights.reason
    assert "_fit_X" not in weights.reason and "secret" not in weights.reason, "a buyer-chosen name reached a reason"


def test_tensors_too_large_to_check_go_to_review() -> None:
    big = entry(weights={"checked_tensors": 3, "skipped_tensors": 2, "reproduces": []})
    assert verdicts(big)["model-weights"] is Verdict.REVIEW


def test_a_model_no_attack_could_run_on_follows_the_policy() -> None:
    bare = entry(format="safetensors", attacks=[], per_record_risk=None,
                 attacks_not_run="a bare safetensors file has no architecture to query; export ONNX or skops")
    assert verdicts(bare) == {"model-file": Verdict.PASS, "model-weights": Verdict.PASS,
                              "membership-inference": Verdict.REVIEW}
    assert verdicts(bare, {"unattacked": "block"})["membership-inference"] is Verdict.BLOCK


def test_a_file_the_gate_would_not_open_is_blocked_with_its_reason() -> None:
    refused = entry(format="pickle", loaded=False, attacks=[], per_record_risk=None, weights=None,
                    problem="a pickle runs code when it is loaded, so the gate does not open it",
                    attacks_not_run="the model was not loaded")
    checks = {c.rule: c for c in gate_checks(refused, {})}
    assert checks["model-file"].verdict is Verdict.BLOCK and "pickle runs code" in checks["model-file"].reason
    assert checks["membership-inference"].verdict is not Verdict.PASS


def malformed_entries() -> list[Any]:
    def without(key: str) -> dict[str, Any]:
        body = entry()
        del body[key]
        return body

    def attack(**changes: Any) -> dict[str, Any]:
        attacks = entry()["attacks"]
        attacks[0].update(changes)
        return entry(attacks=attacks)

    return [
        "not an object", [], {}, without("loaded"), without("attacks"), without("weights"), without("format"),
        entry(loaded="yes"), entry(format="exe"), entry(attacks="none"), entry(attacks=[], attacks_not_run=None),
        attack(auc=math.nan), attack(auc=math.inf), attack(auc="0.5"), attack(auc=True), attack(auc=-0.1),
        attack(auc=None), attack(tpr_at_fpr={"0.001": 0.0}), attack(tpr_at_fpr=0.01), attack(name=""),
        attack(name="worst case; 67,80,0"),
        entry(per_record_risk={"n_records": 10, "high_risk": 11, "max": 1.0}),
        entry(per_record_risk={"n_records": -1, "high_risk": 0}), entry(per_record_risk={"n_records": 1.5}),
        entry(weights=None), entry(weights={"checked_tensors": 1}),
        entry(weights={"checked_tensors": 1, "reproduces": [{"what": "cell", "rounding": "exact"}]}),
        entry(weights={"checked_tensors": 1, "reproduces": [{"what": "row", "rounding": "int8"}]}),
        entry(problem="a loaded model with a problem"), entry(loaded=False, problem=None, weights=None),
    ]


@pytest.mark.parametrize("report_entry", malformed_entries())
def test_a_malformed_entry_blocks_and_never_passes(report_entry: Any) -> None:
    checks = gate_checks(report_entry, {})
    assert [c.verdict for c in checks] == [Verdict.BLOCK], f"a malformed entry gave {checks}"
    assert "malformed" in checks[0].reason and checks[0].rule == "membership-inference"


def test_a_missing_entry_blocks() -> None:
    [check] = gate_checks(None, {})
    assert check.verdict is Verdict.BLOCK and "reported nothing" in check.reason


@pytest.mark.parametrize("thresholds", [{"max_auc": "high"}, {"max_auc": math.nan}, {"unattacked": "pass"}, "x"])
def test_unreadable_thresholds_block(thresholds: Any) -> None:
    assert [c.verdict for c in gate_checks(entry(), thresholds)] == [Verdict.BLOCK]


def test_model_risk_checks_still_send_models_to_review_without_a_registered_check() -> None:
    [check] = model_risk_checks(OutputFacts(path="model.onnx", size=10, head=b""))
    assert (check.rule, check.verdict) == ("membership-inference", Verdict.REVIEW)
