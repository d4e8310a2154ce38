"""Policies: YAML files validated by a JSON schema, stored as immutable, approved versions."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sandbox.audit import SystemActor
from sandbox.auth.tokens import Principal, Role
from sandbox.context import Context
from sandbox.errors import Conflict, Forbidden, Invalid, NotFound
from sandbox.store.models import Contract, ContractParty, Job, Policy
from sandbox.store.parties import job_orgs

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

SCHEMA_FILE = "policy.schema.json"
PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"


@cache
def _validator(policies_dir: Path) -> Draft202012Validator:
    # Imported when a policy is first checked: jsonschema's format checkers cost a second at import, which
    # every CLI call and process start would otherwise pay.
    from jsonschema import Draft202012Validator

    schema = json.loads((policies_dir / SCHEMA_FILE).read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def policy_errors(body: Any, policies_dir: Path) -> list[str]:
    """Every way `body` breaks the schema, as `path: message` lines a steward can act on."""
    errors = []
    for error in sorted(_validator(policies_dir).iter_errors(body), key=lambda e: list(e.absolute_path)):
        path = "/".join(str(part) for part in error.absolute_path) or "(top)"
        errors.append(f"{path}: {error.message}")
    return errors


def parse_policy_text(text: str) -> Any:
    """YAML (a superset of JSON) to a document, with a readable error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise Invalid(f"policy is not valid YAML: {exc}") from exc


def load_shipped_policies(policies_dir: Path) -> dict[str, dict[str, Any]]:
    """The policies in `policies/`, validated; a broken shipped file is an error at start-up."""
    shipped: dict[str, dict[str, Any]] = {}
    for path in sorted(policies_dir.glob("*.yaml")):
        body = parse_policy_text(path.read_text())
        errors = policy_errors(body, policies_dir)
        if errors:
            raise Invalid(f"shipped policy {path.name} is invalid", errors)
        if body["name"] != path.stem:
            raise Invalid(f"shipped policy {path.name} names itself {body['name']!r}")
        shipped[body["name"]] = body
    return shipped


def digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _versions(session: Session, name: str) -> list[Policy]:
    return list(session.execute(select(Policy).where(Policy.name == name).order_by(Policy.version)).scalars())


def _usable_by(org: str | None) -> Any:
    """Versions an org's contracts may pin: the shipped (global) ones and the org's own."""
    return Policy.owner_org.is_(None) if org is None else (Policy.owner_org.is_(None) | (Policy.owner_org == org))


def _add_version(ctx: Context, body: dict[str, Any], status: str) -> Policy:
    latest = ctx.session.execute(select(func.max(Policy.version)).where(Policy.name == body["name"])).scalar()
    now = datetime.now(UTC)
    system = isinstance(ctx.actor, SystemActor)
    policy = Policy(
        name=body["name"],
        version=(latest or 0) + 1,
        body=body,
        sha256=digest(body),
        status=status,
        # A steward's version belongs to their org; the service's own (shipped files) is global.
        owner_org=None if system else ctx.actor.org,
        created_by=ctx.actor.sub,
        created_at=now,
        decided_by=ctx.actor.sub if system and status == APPROVED else None,
        decided_at=now if system and status == APPROVED else None,
    )
    ctx.session.add(policy)
    ctx.session.flush()
    return policy


def sync_shipped_policies(ctx: Context) -> list[Policy]:
    """Store each shipped policy: the first version is approved as the bootstrap, a changed
    file becomes a pending version that a steward must approve. Returns what was added."""
    added = []
    for name, body in load_shipped_policies(ctx.settings.policies_dir).items():
        # The shipped (global) line only: an org's own version with this content is no global one.
        versions = [v for v in _versions(ctx.session, name) if v.owner_org is None]
        if any(v.sha256 == digest(body) for v in versions):
            continue
        status = PENDING if versions else APPROVED
        policy = _add_version(ctx, body, status)
        ctx.record(
            "policy.bootstrap" if status == APPROVED else "policy.propose", "policy",
            f"{policy.name}@{policy.version}", sha256=policy.sha256, status=status, source="policies/",
        )
        added.append(policy)
    return added


def propose_policy(ctx: Context, body: Any) -> Policy:
    """A steward's new version of a policy, owned by their org: it is pending until another steward
    of that org approves it, and only that org's contracts can pin it."""
    steward = ctx.require_role(Role.STEWARD)
    errors = policy_errors(body, ctx.settings.policies_dir)
    if errors:
        raise Invalid("policy does not match the schema", errors)
    versions = list(ctx.session.execute(select(Policy).where(
        Policy.name == body["name"], _usable_by(steward.org)).order_by(Policy.version)).scalars())
    for existing in versions:
        if existing.sha256 == digest(body) and existing.status != REJECTED:
            raise Conflict(f"policy {existing.name}@{existing.version} already has this content")
    policy = _add_version(ctx, body, PENDING)
    ctx.record("policy.propose", "policy", f"{policy.name}@{policy.version}", sha256=policy.sha256)
    return policy


def decide_policy(ctx: Context, *, name: str, version: int, approve: bool, comment: str = "") -> Policy:
    """Approve or reject a pending version; the steward who wrote it may not decide it.

    A steward decides only their own org's versions (another org's are 404), so the two people are
    two stewards of the owning org. A shipped file's change (global, proposed by the service when the
    operator edited `policies/`) is decided by any steward: its author is the operator.
    """
    steward = ctx.require_role(Role.STEWARD)
    policy = get_policy_version(ctx.session, name, version)
    if policy.owner_org is not None and policy.owner_org != steward.org:
        raise NotFound(f"policy {name}@{version} does not exist")
    if policy.status != PENDING:
        raise Conflict(f"policy {name}@{version} is already {policy.status}")
    if policy.created_by == steward.sub:
        raise Forbidden("a policy change needs a different steward's approval than its author's")
    policy.status = APPROVED if approve else REJECTED
    policy.decided_by = steward.sub
    policy.decided_at = datetime.now(UTC)
    policy.comment = comment
    ctx.record(
        "policy.approve" if approve else "policy.reject", "policy", f"{name}@{version}",
        sha256=policy.sha256, comment=comment,
    )
    return policy


def get_policy_version(session: Session, name: str, version: int) -> Policy:
    policy = session.execute(
        select(Policy).where(Policy.name == name, Policy.version == version)
    ).scalar_one_or_none()
    if policy is None:
        raise NotFound(f"policy {name}@{version} does not exist")
    return policy


def resolve_policy(session: Session, reference: str, *, org: str | None = None) -> Policy:
    """`name` means its newest approved version; `name@N` must be approved. Only versions that `org`
    may pin count: the shipped ones and its own (None: the shipped ones only)."""
    name, _, version_text = reference.partition("@")
    if version_text:
        if not version_text.isdigit():
            raise Invalid(f"policy reference {reference!r} must look like name or name@version")
        try:
            policy = get_policy_version(session, name, int(version_text))
            if policy.owner_org is not None and policy.owner_org != org:
                raise NotFound(f"policy {name}@{version_text} does not exist")
        except NotFound as exc:
            # A reference inside a request body is a malformed body (422), not a missing resource.
            raise Invalid(exc.detail) from exc
        if policy.status != APPROVED:
            raise Invalid(f"policy {reference} is {policy.status}, not approved")
        return policy
    candidates = session.execute(select(Policy).where(Policy.name == name, _usable_by(org))
                                 .order_by(Policy.version)).scalars()
    approved = [p for p in candidates if p.status == APPROVED]
    if not approved:
        raise Invalid(f"policy {name!r} has no approved version")
    return approved[-1]


def list_policies(session: Session, principal: Principal) -> list[Policy]:
    """The versions `principal` may see (`visible_to`)."""
    everything = session.execute(select(Policy).order_by(Policy.name, Policy.version)).scalars()
    pinned = _pinned_by_buyer(session, principal)
    return [p for p in everything if visible_to(principal, p, pinned)]


def get_visible_version(session: Session, principal: Principal, name: str, version: int) -> Policy:
    """A version `principal` may see; another org's is 404, as a missing one is."""
    policy = get_policy_version(session, name, version)
    if not visible_to(principal, policy, _pinned_by_buyer(session, principal)):
        raise NotFound(f"policy {name}@{version} does not exist")
    return policy


def visible_to(principal: Principal, policy: Policy, pinned: set[tuple[str, int]]) -> bool:
    """Shipped versions are public; an org's own versions are its own, and its buyers read those
    their contracts pin (`pinned`); auditors and admins read all."""
    if policy.owner_org is None or policy.owner_org == principal.org:
        return True
    if principal.role in (Role.AUDITOR, Role.ADMIN):
        return True
    return (policy.name, policy.version) in pinned


def _pinned_by_buyer(session: Session, principal: Principal) -> set[tuple[str, int]]:
    if principal.role is not Role.BUYER:
        return set()
    rows = session.execute(select(Contract.policy_name, Contract.policy_version)
                           .where(Contract.buyer_org == principal.org).distinct()).all()
    return {(str(name), int(version)) for name, version in rows}


def policy_view(policy: Policy) -> dict[str, Any]:
    return {
        "name": policy.name,
        "version": policy.version,
        "ref": f"{policy.name}@{policy.version}",
        "status": policy.status,
        "owner_org": policy.owner_org,
        "sha256": policy.sha256,
        "created_by": policy.created_by,
        "created_at": policy.created_at.isoformat(),
        "decided_by": policy.decided_by,
        "decided_at": policy.decided_at.isoformat() if policy.decided_at else None,
        "comment": policy.comment,
        "body": policy.body,
    }


# --- the strictest of several policies (issue 17) -------------------------------------------------------
# A job that reads data of several hospitals runs under every party's policy at once: each rule takes its
# strictest value. One row per rule of policy.schema.json (tests/parties/test_strictest.py walks the schema
# and fails on a rule missing here). A rule's default is what the code assumes when a policy leaves it out,
# so a policy silent on a rule still counts with the value it gets.
#   min / max: the lower / higher number; all: true only if every policy says true; any: true if one does;
#   same: the values every policy allows (order of the first); lcm: rounding bases (null = none) combined
#   so every published count is a multiple of each; a list: the values from least to most strict.
_NOTEBOOK_DEFAULTS: dict[str, Any] = {"allow_comms": False, "max_output_kb": 256, "max_kernels_per_contract": 2,
                                      "idle_timeout_s": 1800, "kernel_cpus": 1.0, "kernel_memory_mb": 2048,
                                      "max_kernel_hours": 12, "workspace_mb": 200, "max_messages_per_s": 200}
_ABSENT = object()
STRICTEST_RULES: tuple[tuple[tuple[str, ...], Any, Any], ...] = (
    (("runtime", "allowed_images"), "same", _ABSENT),
    (("runtime", "max_cpus"), "min", _ABSENT),
    (("runtime", "max_memory_mb"), "min", _ABSENT),
    (("runtime", "max_timeout_s"), "min", _ABSENT),
    (("runtime", "max_gpus"), "min", _ABSENT),
    (("runtime", "on_node_loss"), ("rerun_once", "fail"), "fail"),
    (("egress", "allowed_kinds"), "same", _ABSENT),
    (("egress", "max_file_mb"), "min", _ABSENT),
    (("egress", "max_total_mb"), "min", _ABSENT),
    (("egress", "sdc", "min_cell_count"), "max", _ABSENT),
    (("egress", "sdc", "zeros"), ("allow", "review", "block"), _ABSENT),
    (("egress", "sdc", "rounding"), "lcm", None),
    # A cell fails dominance when its n largest contributors hold more than k of it: more of them (n up)
    # and a lower share (k down) fail more cells.
    (("egress", "sdc", "dominance_n"), "max", _ABSENT),
    (("egress", "sdc", "dominance_k"), "min", _ABSENT),
    (("egress", "sdc", "p_ratio"), "max", _ABSENT),
    (("egress", "sdc", "min_residual_df"), "max", _ABSENT),
    (("egress", "leak_scan", "block_rows"), "min", _ABSENT),
    (("egress", "leak_scan", "block_ids"), "min", _ABSENT),
    (("egress", "models", "formats"), "same", _ABSENT),
    (("egress", "models", "release"), ("review", "block"), _ABSENT),
    (("egress", "models", "gate", "max_auc"), "min", 0.65),
    (("egress", "models", "gate", "max_tpr_at_fpr"), "min", 0.1),
    (("egress", "models", "gate", "max_high_risk_fraction"), "min", 0.05),
    (("egress", "models", "gate", "unattacked"), ("review", "block"), "review"),
    (("egress", "figures", "release"), ("review", "block"), _ABSENT),
    (("egress", "logs", "release"), ("if_clean", "review"), "review"),
    (("egress", "verified_tables", "max_per_job"), "min", 50),
    (("notebooks", "allow_comms"), "all", _NOTEBOOK_DEFAULTS["allow_comms"]),
    *((("notebooks", key), "min", value) for key, value in _NOTEBOOK_DEFAULTS.items() if key != "allow_comms"),
    (("review", "auto_release"), "all", _ABSENT),
    (("review", "reviewers"), "max", _ABSENT),
    (("review", "approve_jobs"), "any", False),
    (("registration", "identifiers"), ("override", "block"), _ABSENT),
    (("registration", "low_k"), ("override", "block"), _ABSENT),
    (("registration", "dicom"), ("override", "block"), _ABSENT),
    (("registration", "min_k"), "max", _ABSENT),
    (("registration", "min_l"), "max", _ABSENT),
)


def _lookup(body: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = body
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return _ABSENT
        node = node[key]
    return node


def _strictest_value(rule: Any, values: list[Any]) -> Any:
    if rule == "min":
        return min(values)
    if rule == "max":
        return max(values)
    if rule == "all":
        return all(bool(v) for v in values)
    if rule == "any":
        return any(bool(v) for v in values)
    if rule == "same":
        return [item for item in values[0] if all(item in other for other in values[1:])]
    if rule == "lcm":
        bases = [int(v) for v in values if v]
        return math.lcm(*bases) if bases else None
    order: tuple[str, ...] = rule
    return max(values, key=lambda v: order.index(v) if v in order else len(order))


def strictest_policy(bodies: list[dict[str, Any]], *, refs: list[str] | None = None) -> dict[str, Any]:
    """One policy body holding, for each rule, the strictest value among `bodies` (`STRICTEST_RULES`).
    A single body comes back as it is. Pure."""
    if not bodies:
        raise ValueError("the strictest of no policy is undefined")
    if len(bodies) == 1:
        return bodies[0]
    merged: dict[str, Any] = copy.deepcopy(bodies[0])
    merged["name"] = "strictest"
    merged["description"] = "the strictest rule of each of " + ", ".join(refs or [b["name"] for b in bodies])
    for path, rule, default in STRICTEST_RULES:
        found = [_lookup(body, path) for body in bodies]
        if all(value is _ABSENT for value in found):
            continue
        values = [default if value is _ABSENT else value for value in found]
        values = [value for value in values if value is not _ABSENT]
        node = merged
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _strictest_value(rule, values)
    return merged


def party_policy_body(session: Session, contract_id: str, orgs: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The strictest of the policies that the party orgs `orgs` of a contract consented under, and their refs."""
    parties = list(session.execute(select(ContractParty).where(
        ContractParty.contract_id == contract_id, ContractParty.org.in_(orgs)).order_by(ContractParty.org)).scalars())
    if {p.org for p in parties} != set(orgs):
        raise NotFound(f"contract {contract_id} has no party {sorted(set(orgs) - {p.org for p in parties})}")
    refs = [f"{p.policy_name}@{p.policy_version}" for p in parties]
    bodies = [get_policy_version(session, p.policy_name, p.policy_version).body for p in parties]
    return strictest_policy(bodies, refs=refs), refs


def job_policy_body(session: Session, job: Job) -> dict[str, Any]:
    """The policy body a job's run, outputs and review follow: for a job reading data of several orgs the
    strictest of their policies, otherwise the policy it names (`job.policy`)."""
    orgs = job_orgs(job)
    if len(orgs) > 1:
        return party_policy_body(session, job.contract_id, orgs)[0]
    name, _, version = job.policy.partition("@")
    return get_policy_version(session, name, int(version)).body
