"""Model outputs: beyond a safe file format, a model may memorise patients. Membership-inference
checks (SACRO-ML's attacks, run where the training data is) plug in here; training jobs add them.
"""

from __future__ import annotations

from collections.abc import Callable

from sandbox.egress.verdicts import CheckResult, OutputFacts, Verdict

ModelCheck = Callable[[OutputFacts], CheckResult]
MODEL_CHECKS: list[ModelCheck] = []


def register_model_check(check: ModelCheck) -> ModelCheck:
    """Add a check that every model output meets (usable as a decorator)."""
    MODEL_CHECKS.append(check)
    return check


def model_risk_checks(facts: OutputFacts) -> list[CheckResult]:
    """The registered checks' results; without any, a person must judge the model's risk."""
    if not MODEL_CHECKS:
        return [CheckResult("membership-inference", Verdict.REVIEW,
                            "no membership-inference check has run on this model; a steward judges its risk")]
    return [check(facts) for check in MODEL_CHECKS]
