"""The strictest of several hospitals' policies (issue 17): every rule of policy.schema.json is merged, each
to its strictest value, and the result is itself a valid policy. Pure: no store, no service."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from sandbox.config import REPO_ROOT
from sandbox.policies import STRICTEST_RULES, policy_errors, strictest_policy

POLICIES = REPO_ROOT / "policies"


def shipped(name: str) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((POLICIES / f"{name}.yaml").read_text())
    return body


def leaves(schema: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every rule the schema defines: an object's properties, down to the values that are not objects."""
    for key, sub in schema.get("properties", {}).items():
        if sub.get("type") == "object" and "properties" in sub:
            yield from leaves(sub, (*path, key))
        else:
            yield (*path, key)


def test_every_rule_of_the_schema_has_a_strictest_value() -> None:
    schema = json.loads((POLICIES / "policy.schema.json").read_text())
    covered = {path for path, _, _ in STRICTEST_RULES}
    missing = [".".join(path) for path in leaves(schema) if path not in covered and path not in (("name",),
                                                                                                ("description",))]
    assert not missing, f"rules the strictest merge does not know, so a weaker party's value could win: {missing}"
    unknown = [".".join(path) for path in covered if path not in set(leaves(schema))]
    assert not unknown, f"merge rules for paths the schema lacks: {unknown}"


def test_default_and_strict_merge_to_strict_where_it_is_stricter() -> None:
    default, strict = shipped("default"), shipped("strict")
    merged = strictest_policy([default, strict], refs=["default@1", "strict@1"])
    assert policy_errors(merged, POLICIES) == [], "the merged body is not a valid policy"
    assert merged["review"] == {"auto_release": False, "reviewers": 2, "approve_jobs": True}
    assert merged["egress"]["sdc"]["zeros"] == "block" and merged["egress"]["sdc"]["rounding"] == 5
    assert merged["egress"]["max_file_mb"] == 50 and merged["egress"]["max_total_mb"] == 200
    assert merged["notebooks"]["max_output_kb"] == 64
    assert merged["registration"]["identifiers"] == "block" and merged["registration"]["min_k"] == 10
    assert "default@1" in merged["description"] and "strict@1" in merged["description"]
    # Order does not matter.
    assert strictest_policy([strict, default], refs=["default@1", "strict@1"]) == merged


def loose() -> dict[str, Any]:
    return copy.deepcopy(shipped("default"))


@pytest.mark.parametrize(("change", "path", "expected"), [
    ({"runtime": {"max_cpus": 2}}, ("runtime", "max_cpus"), 2),
    ({"runtime": {"max_memory_mb": 1024}}, ("runtime", "max_memory_mb"), 1024),
    ({"runtime": {"max_timeout_s": 60}}, ("runtime", "max_timeout_s"), 60),
    ({"runtime": {"max_gpus": 0}}, ("runtime", "max_gpus"), 0),
    ({"runtime": {"allowed_images": ["analysis"]}}, ("runtime", "allowed_images"), ["analysis"]),
    ({"egress": {"allowed_kinds": ["table", "log"]}}, ("egress", "allowed_kinds"), ["table", "log"]),
    ({"egress": {"sdc": {"min_cell_count": 20}}}, ("egress", "sdc", "min_cell_count"), 20),
    ({"egress": {"sdc": {"dominance_n": 3}}}, ("egress", "sdc", "dominance_n"), 3),
    ({"egress": {"sdc": {"dominance_k": 0.5}}}, ("egress", "sdc", "dominance_k"), 0.5),
    ({"egress": {"sdc": {"p_ratio": 0.25}}}, ("egress", "sdc", "p_ratio"), 0.25),
    ({"egress": {"sdc": {"min_residual_df": 30}}}, ("egress", "sdc", "min_residual_df"), 30),
    ({"egress": {"leak_scan": {"block_rows": 1, "block_ids": 1}}}, ("egress", "leak_scan", "block_ids"), 1),
    ({"egress": {"models": {"release": "block"}}}, ("egress", "models", "release"), "block"),
    ({"egress": {"models": {"formats": ["onnx"]}}}, ("egress", "models", "formats"), ["onnx"]),
    ({"egress": {"models": {"gate": {"max_auc": 0.55}}}}, ("egress", "models", "gate", "max_auc"), 0.55),
    ({"egress": {"models": {"gate": {"unattacked": "block"}}}}, ("egress", "models", "gate", "unattacked"), "block"),
    ({"egress": {"figures": {"release": "block"}}}, ("egress", "figures", "release"), "block"),
    ({"egress": {"verified_tables": {"max_per_job": 3}}}, ("egress", "verified_tables", "max_per_job"), 3),
    ({"review": {"approve_jobs": True}}, ("review", "approve_jobs"), True),
    ({"review": {"auto_release": False}}, ("review", "auto_release"), False),
])
def test_one_stricter_rule_wins_whichever_policy_holds_it(change: dict[str, Any], path: tuple[str, ...],
                                                          expected: Any) -> None:
    strict = loose()
    node: Any = strict
    for key in path[:-1]:
        node = node.setdefault(key, {})
    source: Any = change
    for key in path:
        source = source[key]
    node[path[-1]] = source
    for order in ([loose(), strict], [strict, loose()]):
        merged = strictest_policy(order)
        found: Any = merged
        for key in path:
            found = found[key]
        assert found == expected, f"{'.'.join(path)}: the merge kept {found!r}, not the stricter {expected!r}"


def test_left_out_rules_count_with_their_defaults_and_roundings_combine() -> None:
    silent = loose()
    del silent["egress"]["logs"]
    del silent["egress"]["models"]["gate"]
    del silent["notebooks"]
    lenient = loose()
    lenient["egress"]["logs"] = {"release": "if_clean"}
    lenient["egress"]["models"]["gate"] = {"max_auc": 0.9}
    lenient["notebooks"] = {"max_kernels_per_contract": 8, "allow_comms": True}
    lenient["runtime"]["on_node_loss"] = "rerun_once"
    merged = strictest_policy([silent, lenient])
    # A policy silent on a rule holds the code's default, which is stricter here than the other's value.
    assert merged["egress"]["logs"]["release"] == "review"
    assert merged["egress"]["models"]["gate"]["max_auc"] == pytest.approx(0.65)
    assert merged["notebooks"]["max_kernels_per_contract"] == 2 and merged["notebooks"]["allow_comms"] is False
    assert merged["runtime"]["on_node_loss"] == "fail"
    five, three = loose(), loose()
    five["egress"]["sdc"]["rounding"], three["egress"]["sdc"]["rounding"] = 5, 3
    assert strictest_policy([five, three])["egress"]["sdc"]["rounding"] == 15, "counts must be multiples of both"
    assert strictest_policy([five, loose()])["egress"]["sdc"]["rounding"] == 5
    assert policy_errors(strictest_policy([silent, lenient]), POLICIES) == []


def test_one_policy_is_itself_and_none_is_an_error() -> None:
    body = shipped("strict")
    assert strictest_policy([body]) == body
    with pytest.raises(ValueError):
        strictest_policy([])
