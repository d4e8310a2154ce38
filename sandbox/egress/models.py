"""Model outputs: beyond a safe file format, a model may memorise patients.

A training job's models meet the membership-inference gate (`images/training/sandbox_trainer/gate.py`),
which attacks each one beside the training and held-out rows and reports scores and counts per model.
`gate_checks` turns one model's entry of that report into verdicts under the policy's thresholds
(`egress.models.gate`): `membership-inference` for the attacks, `model-weights` for tensors that
reproduce training data, `model-file` for a file the gate would not or could not open. An entry that is
missing or malformed blocks the model: nothing leaves because a check failed to say no. Other checks
every model output meets plug in through `register_model_check`. Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sandbox.egress.verdicts import CheckResult, OutputFacts, Verdict

ModelCheck = Callable[[OutputFacts], CheckResult]
MODEL_CHECKS: list[ModelCheck] = []

MEMBERSHIP, WEIGHTS, FILE = "membership-inference", "model-weights", "model-file"
FORMATS = frozenset({"skops", "onnx", "safetensors", "pickle", "torch", "joblib", "unknown"})
ROUNDINGS = ("exact", "float32", "float16")
# How a rounding reads in a reason.
ROUNDING_WORDS = {"exact": "exactly", "float32": "after float32 rounding", "float16": "after float16 rounding"}


def register_model_check(check: ModelCheck) -> ModelCheck:
    """Add a check that every model output meets (usable as a decorator)."""
    MODEL_CHECKS.append(check)
    return check


def model_risk_checks(facts: OutputFacts) -> list[CheckResult]:
    """The registered checks' results; without any, a person must judge the model's risk."""
    if not MODEL_CHECKS:
        return [CheckResult(MEMBERSHIP, Verdict.REVIEW,
                            "no membership-inference check has run on this model; a steward judges its risk")]
    return [check(facts) for check in MODEL_CHECKS]


@dataclass(frozen=True)
class GateThresholds:
    """The policy's limits on what the gate's attacks may achieve against a model that leaves."""

    max_auc: float = 0.65
    max_tpr_at_fpr: float = 0.1  # true-positive rate at a false-positive rate of 0.01
    max_high_risk_fraction: float = 0.05  # share of training records whose per-record risk is high
    unattacked: Verdict = Verdict.REVIEW  # a model no attack could run on: REVIEW or BLOCK

    @classmethod
    def from_policy(cls, gate: Mapping[str, Any] | None) -> GateThresholds:
        """The policy's `egress.models.gate` object; what it leaves out takes the defaults above."""
        if gate is None:
            return cls()
        if not isinstance(gate, Mapping):
            raise ValueError("egress.models.gate is not an object")
        defaults = cls()
        values = {}
        for key in ("max_auc", "max_tpr_at_fpr", "max_high_risk_fraction"):
            value = gate.get(key, getattr(defaults, key))
            if not _is_fraction(value):
                raise ValueError(f"egress.models.gate.{key} is not a number from 0 to 1")
            values[key] = float(value)
        unattacked = gate.get("unattacked", defaults.unattacked.value)
        if unattacked not in (Verdict.REVIEW.value, Verdict.BLOCK.value):
            raise ValueError("egress.models.gate.unattacked is neither 'review' nor 'block'")
        return cls(values["max_auc"], values["max_tpr_at_fpr"], values["max_high_risk_fraction"], Verdict(unattacked))


# --- The gate's report entry, read strictly --------------------------------------------------------

class MalformedEntry(ValueError):
    """The gate's entry for a model does not have the shape the gate writes."""


@dataclass(frozen=True)
class AttackScore:
    name: str
    auc: float
    tpr_at_fpr: float  # at a false-positive rate of 0.01


@dataclass(frozen=True)
class Reproduced:
    what: str  # "row" or "column"
    rounding: str


@dataclass(frozen=True)
class GateEntry:
    """One model's entry in the gate's report, typed; counts and scores only."""

    format: str
    loaded: bool
    problem: str | None
    attacks: list[AttackScore]
    attacks_not_run: str | None
    records: int  # training records with a per-record risk (0 when none was computed)
    high_risk: int
    checked_tensors: int
    skipped_tensors: int
    reproduces: list[Reproduced]


def _is_fraction(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and 0.0 <= float(value) <= 1.0)


def _fraction(value: Any, where: str) -> float:
    if not _is_fraction(value):
        raise MalformedEntry(f"{where} is not a number from 0 to 1")
    return float(value)


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedEntry(f"{where} is not a count")
    return value


def _text(value: Any, where: str, *, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise MalformedEntry(f"{where} is not text")
    return value


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MalformedEntry(f"{where} is not an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise MalformedEntry(f"{where} is not a list")
    return value


def _attack(value: Any, where: str) -> AttackScore:
    attack = _object(value, where)
    name = attack.get("name")
    if not isinstance(name, str) or not name.replace("_", "").isalpha() or len(name) > 32:
        raise MalformedEntry(f"{where}.name is not an attack's name")
    tpr = _object(attack.get("tpr_at_fpr"), f"{where}.tpr_at_fpr").get("0.01")
    return AttackScore(name, _fraction(attack.get("auc"), f"{where}.auc"), _fraction(tpr, f"{where}.tpr_at_fpr.0.01"))


def parse_gate_entry(entry: Any) -> GateEntry:
    """The entry as a GateEntry, or MalformedEntry naming the first field out of shape."""
    body = _object(entry, "the entry")
    model_format = body.get("format")
    if model_format not in FORMATS:
        raise MalformedEntry("format is not one the gate knows")
    loaded = body.get("loaded")
    if not isinstance(loaded, bool):
        raise MalformedEntry("loaded is not true or false")
    problem = _text(body.get("problem"), "problem")
    attacks = [_attack(a, f"attacks[{i}]") for i, a in enumerate(_list(body.get("attacks"), "attacks"))]
    not_run = _text(body.get("attacks_not_run"), "attacks_not_run")
    if not attacks and not_run is None:
        raise MalformedEntry("no attack ran and attacks_not_run does not say why")
    records = high_risk = 0
    if body.get("per_record_risk") is not None:
        risk = _object(body["per_record_risk"], "per_record_risk")
        records = _count(risk.get("n_records"), "per_record_risk.n_records")
        high_risk = _count(risk.get("high_risk"), "per_record_risk.high_risk")
        if high_risk > records:
            raise MalformedEntry("per_record_risk counts more high-risk records than records")
    checked = skipped = 0
    reproduces: list[Reproduced] = []
    if loaded:
        if problem is not None:
            raise MalformedEntry("a loaded model has a problem")
        weights = _object(body.get("weights"), "weights")
        checked = _count(weights.get("checked_tensors"), "weights.checked_tensors")
        skipped = _count(weights.get("skipped_tensors", 0), "weights.skipped_tensors")
        for i, item in enumerate(_list(weights.get("reproduces"), "weights.reproduces")):
            found = _object(item, f"weights.reproduces[{i}]")
            if found.get("what") not in ("row", "column") or found.get("rounding") not in ROUNDINGS:
                raise MalformedEntry(f"weights.reproduces[{i}] is not a row or column at a known rounding")
            reproduces.append(Reproduced(found["what"], found["rounding"]))
    elif problem is None:
        raise MalformedEntry("a model that did not load has no problem named")
    return GateEntry(model_format, loaded, problem, attacks, not_run, records, high_risk, checked, skipped,
                     reproduces)


# --- Verdicts --------------------------------------------------------------------------------------

def gate_checks(entry: Mapping[str, Any] | None, thresholds: Mapping[str, Any] | None) -> list[CheckResult]:
    """One model's verdicts from its entry in the gate's report, under the policy's `egress.models.gate`.

    A missing or malformed entry, or malformed thresholds, block the model.
    """
    try:
        limits = GateThresholds.from_policy(thresholds)
    except ValueError as exc:
        return [CheckResult(MEMBERSHIP, Verdict.BLOCK, f"the policy's gate thresholds cannot be read ({exc})")]
    if entry is None:
        return [CheckResult(MEMBERSHIP, Verdict.BLOCK,
                            "the membership-inference gate reported nothing for this model; it cannot leave "
                            "unchecked")]
    try:
        parsed = parse_gate_entry(entry)
    except MalformedEntry as exc:
        return [CheckResult(MEMBERSHIP, Verdict.BLOCK,
                            f"the membership-inference gate's report on this model is malformed ({exc}); it "
                            "cannot be judged")]
    if not parsed.loaded:
        return [CheckResult(FILE, Verdict.BLOCK, f"the gate did not open the {parsed.format} file: {parsed.problem}"),
                _unattacked(parsed, limits)]
    return [CheckResult(FILE, Verdict.PASS, f"the gate opened the {parsed.format} file without running code in it"),
            _weights_check(parsed), _membership_check(parsed, limits)]


def _unattacked(entry: GateEntry, limits: GateThresholds) -> CheckResult:
    why = entry.attacks_not_run or "no attack ran"
    consequence = "the policy blocks such models" if limits.unattacked is Verdict.BLOCK else "a steward judges its risk"
    return CheckResult(MEMBERSHIP, limits.unattacked, f"no membership-inference attack ran ({why}); {consequence}")


def _weights_check(entry: GateEntry) -> CheckResult:
    """Tensors are named in the gate's report for the steward, not here: the buyer's code chose the names."""
    if entry.reproduces:
        found = []
        for what in ("row", "column"):
            hits = [r for r in entry.reproduces if r.what == what]
            if hits:
                finest = min((r.rounding for r in hits), key=ROUNDINGS.index)
                found.append(f"{len(hits)} tensor{'s' if len(hits) > 1 else ''} reproduce training {what}s "
                             f"({ROUNDING_WORDS[finest]})")
        return CheckResult(WEIGHTS, Verdict.BLOCK, "; ".join(found) + ": the model stores patients' data")
    if entry.skipped_tensors:
        return CheckResult(WEIGHTS, Verdict.REVIEW, f"{entry.skipped_tensors} tensors were too large to check for "
                                                    "training data; a steward judges them")
    return CheckResult(WEIGHTS, Verdict.PASS, f"none of the {entry.checked_tensors} tensors reproduces a training "
                                              "row or column")


def _membership_check(entry: GateEntry, limits: GateThresholds) -> CheckResult:
    if not entry.attacks:
        return _unattacked(entry, limits)
    over = []
    for attack in entry.attacks:
        if attack.auc > limits.max_auc:
            over.append(f"{attack.name} AUC {attack.auc:.3f} > {limits.max_auc:g}")
        if attack.tpr_at_fpr > limits.max_tpr_at_fpr:
            over.append(f"{attack.name} TPR {attack.tpr_at_fpr:.3f} at FPR 0.01 > {limits.max_tpr_at_fpr:g}")
    if entry.records:
        fraction = entry.high_risk / entry.records
        if fraction > limits.max_high_risk_fraction:
            over.append(f"{entry.high_risk} of {entry.records} training records at high risk "
                        f"({fraction:.3f} > {limits.max_high_risk_fraction:g})")
    if over:
        return CheckResult(MEMBERSHIP, Verdict.BLOCK, "membership inference succeeds: " + "; ".join(over))
    summary = ", ".join(f"{a.name} AUC {a.auc:.3f}, TPR {a.tpr_at_fpr:.3f} at FPR 0.01" for a in entry.attacks)
    if entry.records:
        summary += f"; per-record risk: {entry.high_risk} of {entry.records} training records at high risk"
    return CheckResult(MEMBERSHIP, Verdict.PASS, f"the attacks stay under the policy's thresholds ({summary})")
