"""The membership-inference gate: attacks every model a training job wrote, beside both data splits.

Run by the platform, never with the buyer's code, as `python -I -m sandbox_trainer.gate`. It reads
`/data/train.parquet` and `/data/holdout.parquet` (the rows the model was trained on, and rows held
out by privacy unit), `/code/gate.json` and the model files under `/code`, and writes
`/output/report.json`: per model, whether it loaded, what SACRO-ML's attacks achieved, how many
training records stand out, and whether any tensor reproduces training data. The report holds
counts and scores only, never a value or an identifier from the data; the host turns it into
verdicts under the policy's thresholds (`sandbox/egress/models.py`).

Attacks:
- `worst_case` (SACRO-ML's WorstCaseAttack) on every classifier that can be queried: an attack model
  learns membership from the target's sorted probabilities and whether its prediction was right,
  knowing which rows were members (hence "worst case"); AUC, TPR at low FPR and advantage are the
  mean over its repetitions.
- `lira` (SACRO-ML's LIRAAttack, offline) on scikit-learn classifiers, which it retrains as shadow
  models on a sample of the rows; its per-record scores give the per-record risk.
- `loss_threshold` on regressors (SACRO-ML's attacks are for classifiers): our own, documented
  equivalent, which ranks records by the model's error on them.
Where LiRA does not run, a record's risk is the share of held-out records the model fits worse
(`loss_rank`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from sacroml.attacks.model_sklearn import SklearnModel

from sandbox_trainer.models import LoadedModel, ModelFormat, ModelRefused, load_model, safe_text, sniff
from sandbox_trainer.weights import TrainingNeedles, check_tensors

DATA_DIR, CODE_DIR, OUTPUT_DIR = Path("/data"), Path("/code"), Path("/output")
ENV_DIRS = {"data": "SANDBOX_GATE_DATA", "code": "SANDBOX_GATE_CODE", "output": "SANDBOX_GATE_OUTPUT"}
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(/[A-Za-z0-9][A-Za-z0-9._-]{0,99}){0,7}$")
MAX_MODELS = 32
FPRS = (0.01, 0.001)
HIGH_RISK_QUANTILE = 0.99  # a record is at high risk when it stands out above 99% of held-out records
DIGITS = 3  # scores are reported to 3 decimals: a model cannot spell data out in their far digits

logger = logging.getLogger("sandbox_trainer.gate")


class GateError(Exception):
    """The gate cannot run at all (its inputs are missing or malformed); no model is judged."""


@dataclass(frozen=True)
class GateSpec:
    label: str
    features: list[str]
    task: str
    models: list[str]
    max_rows: int = 5000

    @classmethod
    def parse(cls, body: Any) -> GateSpec:
        if not isinstance(body, dict):
            raise GateError("gate.json must be a JSON object")
        label, features, task = body.get("label"), body.get("features"), body.get("task")
        models, max_rows = body.get("models"), body.get("max_rows", 5000)
        if not isinstance(label, str) or not label:
            raise GateError("gate.json: 'label' must name a column")
        if (not isinstance(features, list) or not features or not all(isinstance(f, str) and f for f in features)
                or len(set(features)) != len(features) or label in features):
            raise GateError("gate.json: 'features' must list distinct columns, without the label")
        if task not in ("classification", "regression"):
            raise GateError("gate.json: 'task' must be 'classification' or 'regression'")
        if (not isinstance(models, list) or not models or len(models) > MAX_MODELS
                or not all(isinstance(m, str) for m in models) or len(set(models)) != len(models)):
            raise GateError(f"gate.json: 'models' must list 1 to {MAX_MODELS} distinct model paths")
        # Fewer rows would make the attacks' scores too noisy to hold a model to a threshold.
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or not 500 <= max_rows <= 1_000_000:
            raise GateError("gate.json: 'max_rows' must be an integer from 500 to 1000000")
        return cls(label, list(features), task, list(models), max_rows)


@dataclass(frozen=True)
class AttackSettings:
    """How hard the gate attacks: sized so a run on a few thousand rows takes seconds on 2 CPUs."""

    worst_case_reps: int = 5
    lira_shadows: int = 20
    lira_rows: int = 1000  # per side: members and non-members each
    lira_budget_s: float = 30.0  # LiRA is skipped when its shadow models would take longer to train
    model_time_limit_s: int = 300
    seed: int = 5


@dataclass(frozen=True)
class AttackResult:
    name: str
    auc: float
    tpr_at_fpr: dict[str, float]
    advantage: float
    members: int
    non_members: int

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "auc": _score(self.auc),
                "tpr_at_fpr": {k: _score(v) for k, v in self.tpr_at_fpr.items()},
                "advantage": _score(self.advantage), "n_members": self.members, "n_non_members": self.non_members}


@dataclass(frozen=True)
class PerRecordRisk:
    records: int
    high_risk: int
    max: float
    method: str  # "lira" or "loss_rank"

    def as_dict(self) -> dict[str, Any]:
        return {"n_records": self.records, "high_risk": self.high_risk, "max": _score(self.max),
                "method": self.method}


@dataclass
class AttackOutcome:
    attacks: list[AttackResult] = field(default_factory=list)
    not_run: str | None = None
    skipped: list[str] = field(default_factory=list)  # attacks that did not fit this model, and why
    per_record: PerRecordRisk | None = None


def _score(value: float) -> float:
    return round(float(value), DIGITS)


# --- Data ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """One split's rows as the attacks use them: features, labels, and every numeric column."""

    features: np.ndarray | None  # None when a feature column is not numeric
    labels: np.ndarray
    numeric: np.ndarray  # all numeric columns, table order (the weights check's needles)
    numeric_names: list[str]


def _numeric(column: Any) -> np.ndarray | None:
    import pyarrow as pa

    kind = column.type
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return np.asarray(column.cast(pa.float64()).fill_null(float("nan")).to_numpy(zero_copy_only=False),
                          dtype=np.float64)
    return None


def read_split(path: Path, spec: GateSpec) -> Split:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise GateError(f"{path.name} cannot be read as Parquet ({type(exc).__name__})") from exc
    missing = [c for c in [spec.label, *spec.features] if c not in table.column_names]
    if missing:
        raise GateError(f"{path.name} lacks the columns gate.json names ({len(missing)} of them)")
    numeric_names, numeric_columns = [], []
    for name in table.column_names:
        values = _numeric(table.column(name))
        if values is not None:
            numeric_names.append(name)
            numeric_columns.append(values)
    numeric = np.column_stack(numeric_columns) if numeric_columns else np.empty((table.num_rows, 0))
    features = None
    if all(f in numeric_names for f in spec.features):
        features = numeric[:, [numeric_names.index(f) for f in spec.features]]
    labels = np.asarray(table.column(spec.label).to_numpy(zero_copy_only=False))
    if spec.task == "regression":
        label_values = _numeric(table.column(spec.label))
        if label_values is None:
            raise GateError("a regression's label must be numeric")
        labels = label_values
    return Split(features, labels, numeric, numeric_names)


def _usable(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Rows with every feature and the label present: the rows the attacks query."""
    assert split.features is not None
    keep = np.isfinite(split.features).all(axis=1)
    if split.labels.dtype.kind == "f":
        keep &= np.isfinite(split.labels)
    else:
        keep &= np.asarray([label is not None for label in split.labels], dtype=bool)
    return split.features[keep], split.labels[keep]


def _sample(rows: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(rows, size=limit, replace=False)) if rows > limit else np.arange(rows)


# --- Attack metrics --------------------------------------------------------------------------------

def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, at: float) -> float:
    """The ROC curve's true-positive rate at a false-positive rate, interpolated."""
    return float(np.interp(at, np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)))


def _summary(name: str, runs: list[dict[str, Any]], members: int, non_members: int) -> AttackResult:
    """One attack's result: SACRO-ML's per-repetition metrics, averaged."""
    return AttackResult(
        name,
        auc=float(np.mean([r["AUC"] for r in runs])),
        tpr_at_fpr={f"{f:g}": float(np.mean([_tpr_at(r["fpr"], r["tpr"], f) for r in runs])) for f in FPRS},
        advantage=float(np.mean([r["Advantage"] for r in runs])),
        members=members, non_members=non_members)


def _high_risk(member_scores: np.ndarray, non_member_scores: np.ndarray, floor: float, method: str) -> PerRecordRisk:
    """Members whose score passes both `floor` and 99% of the non-members' scores."""
    threshold = max(floor, float(np.quantile(non_member_scores, HIGH_RISK_QUANTILE)))
    return PerRecordRisk(int(member_scores.shape[0]), int(np.count_nonzero(member_scores > threshold)),
                         float(member_scores.max()) if member_scores.shape[0] else 0.0, method)


def _loss_rank(member_fit: np.ndarray, non_member_fit: np.ndarray) -> PerRecordRisk:
    """Per record, the share of held-out records the model fits strictly worse (higher fit: better)."""
    ordered = np.sort(non_member_fit)
    member_rank = np.searchsorted(ordered, member_fit, side="left") / ordered.shape[0]
    non_member_rank = np.searchsorted(ordered, non_member_fit, side="left") / ordered.shape[0]
    return _high_risk(member_rank, non_member_rank, HIGH_RISK_QUANTILE, "loss_rank")


# --- Classifiers -----------------------------------------------------------------------------------

def _class_index(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Each label's column in predict_proba, or -1 for a label the model does not know."""
    lookup = {c.item() if isinstance(c, np.generic) else c: i for i, c in enumerate(classes.tolist())}
    return np.asarray([lookup.get(label.item() if isinstance(label, np.generic) else label, -1)
                       for label in labels], dtype=np.int64)


def _checked_probabilities(predict_proba: Callable[[np.ndarray], np.ndarray], features: np.ndarray,
                           classes: int) -> np.ndarray:
    proba = np.asarray(predict_proba(features), dtype=np.float64)
    if proba.shape != (features.shape[0], classes) or not np.isfinite(proba).all():
        raise _NotAttackable(f"the model gives {proba.shape[-1] if proba.ndim == 2 else 'no'} probability "
                             f"columns for {classes} classes")
    return proba


class _NotAttackable(Exception):
    """The model cannot be queried as the attacks need, for a reason without data in it."""


def attack_classifier(predict_proba: Callable[[np.ndarray], np.ndarray], train_x: np.ndarray, train_y: np.ndarray,
                      holdout_x: np.ndarray, holdout_y: np.ndarray, *, classes: np.ndarray | None = None,
                      estimator: Any = None, settings: AttackSettings | None = None) -> AttackOutcome:
    """SACRO-ML's attacks on a classifier, given its predict_proba (and, for LiRA, its scikit-learn estimator).

    `classes`: what predict_proba's columns stand for (default: the sorted labels, as a label encoder
    would have them).
    """
    settings = settings or AttackSettings()
    if classes is None:
        classes = np.unique(np.concatenate([np.asarray(train_y), np.asarray(holdout_y)]))
    classes = np.asarray(classes)
    outcome = AttackOutcome()
    try:
        train_proba = _checked_probabilities(predict_proba, train_x, len(classes))
        holdout_proba = _checked_probabilities(predict_proba, holdout_x, len(classes))
    except _NotAttackable as exc:
        return AttackOutcome(not_run=str(exc))
    train_index, holdout_index = _class_index(train_y, classes), _class_index(holdout_y, classes)
    train_correct = (train_proba.argmax(axis=1) == train_index).astype(int)
    holdout_correct = (holdout_proba.argmax(axis=1) == holdout_index).astype(int)
    outcome.attacks.append(_worst_case(train_proba, holdout_proba, train_correct, holdout_correct, settings))
    lira = _lira(estimator, train_x, train_y, holdout_x, holdout_y, settings) if estimator is not None else None
    if isinstance(lira, str):
        outcome.skipped.append(lira)
    elif lira is not None:
        result, risk = lira
        outcome.attacks.append(result)
        outcome.per_record = risk
    if outcome.per_record is None:
        def fit(proba: np.ndarray, index: np.ndarray) -> np.ndarray:
            return np.where(index >= 0, proba[np.arange(len(index)), np.maximum(index, 0)], 0.0)
        outcome.per_record = _loss_rank(fit(train_proba, train_index), fit(holdout_proba, holdout_index))
    return outcome


def _worst_case(train_proba: np.ndarray, holdout_proba: np.ndarray, train_correct: np.ndarray,
                holdout_correct: np.ndarray, settings: AttackSettings) -> AttackResult:
    from sacroml.attacks.worst_case_attack import WorstCaseAttack

    with tempfile.TemporaryDirectory(prefix="gate-wc-") as scratch:
        # SACRO-ML's default attack model, seeded so that a model gets the same scores each run.
        attack_model = {"min_samples_split": 20, "min_samples_leaf": 10, "max_depth": 5, "random_state": settings.seed}
        attack = WorstCaseAttack(output_dir=scratch, write_report=False, n_reps=settings.worst_case_reps,
                                 n_dummy_reps=0, reproduce_split=settings.seed, include_model_correct_feature=True,
                                 attack_model_params=attack_model)
        attack.attack_from_preds(train_proba, holdout_proba, train_correct=train_correct, test_correct=holdout_correct)
    return _summary("worst_case", list(attack.attack_metrics), len(train_proba), len(holdout_proba))


class ShadowableModel(SklearnModel):  # type: ignore[misc]
    """SACRO-ML's wrapper for a scikit-learn model, accepting the random_state LiRA gives each shadow model
    even where the estimator (a nearest-neighbour classifier, say) has none: it is deterministic anyway.
    (Module-level, since LiRA pickles its shadow models to its scratch folder.)"""

    def set_params(self, **kwargs: object) -> Any:
        accepted = self.model.get_params()
        return self.model.set_params(**{k: v for k, v in kwargs.items() if k in accepted})

    def clone(self) -> ShadowableModel:
        from sklearn.base import clone

        return ShadowableModel(clone(self.model))


def _lira(estimator: Any, train_x: np.ndarray, train_y: np.ndarray, holdout_x: np.ndarray, holdout_y: np.ndarray,
          settings: AttackSettings) -> tuple[AttackResult, PerRecordRisk] | str:
    """SACRO-ML's offline LiRA on a sample of the rows; or why it does not fit this model."""
    from sacroml.attacks.likelihood_attack import LIRAAttack
    from sacroml.attacks.target import Target
    from sklearn.base import BaseEstimator, clone, is_classifier

    if not isinstance(estimator, BaseEstimator) or not is_classifier(estimator):
        return "lira: needs a scikit-learn classifier to retrain as shadow models"
    rng = np.random.default_rng(settings.seed)
    size = min(settings.lira_rows, len(train_x), len(holdout_x))
    members, non_members = _sample(len(train_x), size, rng), _sample(len(holdout_x), size, rng)
    known = set(np.asarray(getattr(estimator, "classes_", [])).tolist())
    non_members = non_members[[label in known for label in np.asarray(holdout_y)[non_members].tolist()]]
    if len(set(np.asarray(train_y)[members].tolist())) < 2 or len(non_members) < 10:
        return "lira: too few rows of each class for shadow models"
    try:
        trial = clone(estimator)
        started = time.monotonic()
        trial.fit(train_x[members], np.asarray(train_y)[members])
        fit_seconds = time.monotonic() - started
    except Exception as exc:
        return f"lira: the estimator cannot be retrained ({type(exc).__name__})"
    if fit_seconds * settings.lira_shadows > settings.lira_budget_s:
        return f"lira: {settings.lira_shadows} shadow models would take over {settings.lira_budget_s:g} s to train"
    with tempfile.TemporaryDirectory(prefix="gate-lira-") as scratch:
        attack = LIRAAttack(output_dir=scratch, write_report=False, n_shadow_models=settings.lira_shadows,
                            mode="offline", report_individual=True)
        target = Target(model=ShadowableModel(estimator), X_train=train_x[members],
                        y_train=np.asarray(train_y)[members], X_test=holdout_x[non_members],
                        y_test=np.asarray(holdout_y)[non_members])
        np_state = np.random.get_state()  # LiRA seeds NumPy's global generator for each shadow model
        try:
            attack.attack(target)
        finally:
            np.random.set_state(np_state)
    if not attack.attack_metrics:
        return "lira: SACRO-ML found the model not attackable"
    scores = np.asarray(attack.result["member_prob"], dtype=np.float64)
    n_members = len(members)
    result = _summary("lira", list(attack.attack_metrics), n_members, len(scores) - n_members)
    return result, _high_risk(scores[:n_members], scores[n_members:], HIGH_RISK_QUANTILE, "lira")


# --- Regressors ------------------------------------------------------------------------------------

def attack_regressor(predict: Callable[[np.ndarray], np.ndarray], train_x: np.ndarray, train_y: np.ndarray,
                     holdout_x: np.ndarray, holdout_y: np.ndarray) -> AttackOutcome:
    """A loss-threshold attack on a regressor: members are guessed where the model's error is small.

    SACRO-ML's attacks take class probabilities, so regressors get this equivalent of our own; AUC, TPR at
    low FPR and advantage (the largest TPR - FPR) are read off the same ROC curve.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    train_pred = np.asarray(predict(train_x), dtype=np.float64).reshape(-1)
    holdout_pred = np.asarray(predict(holdout_x), dtype=np.float64).reshape(-1)
    if train_pred.shape != (len(train_x),) or holdout_pred.shape != (len(holdout_x),) \
            or not (np.isfinite(train_pred).all() and np.isfinite(holdout_pred).all()):
        return AttackOutcome(not_run="the model does not give one finite prediction per row")
    train_fit, holdout_fit = -np.abs(train_pred - train_y), -np.abs(holdout_pred - holdout_y)
    membership = np.concatenate([np.ones(len(train_fit)), np.zeros(len(holdout_fit))])
    scores = np.concatenate([train_fit, holdout_fit])
    fpr, tpr, _ = roc_curve(membership, scores)
    result = AttackResult("loss_threshold", float(roc_auc_score(membership, scores)),
                          {f"{f:g}": _tpr_at(fpr, tpr, f) for f in FPRS}, float(np.max(tpr - fpr)),
                          len(train_fit), len(holdout_fit))
    return AttackOutcome(attacks=[result], per_record=_loss_rank(train_fit, holdout_fit))


# --- One model, and the whole gate ---------------------------------------------------------------

@dataclass
class GateData:
    """Both splits, sampled for the attacks, and the training data's needles for the weights check."""

    spec: GateSpec
    train_x: np.ndarray | None
    train_y: np.ndarray
    holdout_x: np.ndarray | None
    holdout_y: np.ndarray
    needles: TrainingNeedles
    features_problem: str | None = None

    @classmethod
    def load(cls, data_dir: Path, spec: GateSpec, seed: int = 5) -> GateData:
        train, holdout = read_split(data_dir / "train.parquet", spec), read_split(data_dir / "holdout.parquet", spec)
        if train.numeric_names != holdout.numeric_names:
            raise GateError("train.parquet and holdout.parquet do not have the same numeric columns")
        orders = [list(range(len(train.numeric_names)))]
        if train.features is not None:
            orders.insert(0, [train.numeric_names.index(f) for f in spec.features])
        needles = TrainingNeedles(train.numeric, orders)
        if train.features is None or holdout.features is None:
            return cls(spec, None, train.labels, None, holdout.labels, needles,
                       "a feature column is not numeric; the gate queries models with numeric features only")
        rng = np.random.default_rng(seed)
        train_x, train_y = _usable(train)
        holdout_x, holdout_y = _usable(holdout)
        if len(train_x) < 20 or len(holdout_x) < 20:
            return cls(spec, None, train_y, None, holdout_y, needles,
                       "fewer than 20 complete rows in a split: too few to attack")
        keep_train = _sample(len(train_x), spec.max_rows, rng)
        keep_holdout = _sample(len(holdout_x), spec.max_rows, rng)
        return cls(spec, train_x[keep_train], train_y[keep_train], holdout_x[keep_holdout], holdout_y[keep_holdout],
                   needles)


def attack_model(model: LoadedModel, data: GateData, settings: AttackSettings) -> AttackOutcome:
    """The attacks that fit a loaded model; a bare file, or one the gate cannot query, gets none."""
    if model.not_runnable is not None:
        return AttackOutcome(not_run=model.not_runnable)
    if data.features_problem is not None or data.train_x is None or data.holdout_x is None:
        return AttackOutcome(not_run=data.features_problem or "no rows to attack with")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if data.spec.task == "classification" and model.predict_proba is not None:
                return attack_classifier(model.predict_proba, data.train_x, data.train_y, data.holdout_x,
                                         data.holdout_y, classes=model.classes, estimator=model.estimator,
                                         settings=settings)
            if data.spec.task == "regression" and model.predict is not None:
                return attack_regressor(model.predict, data.train_x, data.train_y, data.holdout_x, data.holdout_y)
    except Exception as exc:
        # The message could quote a label or a value; only the kind of failure is reported.
        logger.debug("attack failed", exc_info=True)
        return AttackOutcome(not_run=f"the model failed when queried ({type(exc).__name__})")
    return AttackOutcome(not_run=f"the model cannot be queried for {data.spec.task}")


def _format_by_name(name: str) -> ModelFormat:
    suffix = PurePosixPath(name).suffix.lower().lstrip(".")
    return ModelFormat(suffix) if suffix in ("skops", "onnx", "safetensors") else ModelFormat.UNKNOWN


def refused_entry(model_format: ModelFormat, problem: str, untrusted_types: list[str] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "format": model_format.value, "loaded": False, "problem": problem, "attacks": [],
        "attacks_not_run": "the model was not loaded", "attacks_skipped": [], "per_record_risk": None, "weights": None}
    if untrusted_types:
        entry["untrusted_types"] = untrusted_types
    return entry


def gate_model(data_bytes: bytes, name: str, data: GateData, settings: AttackSettings | None = None) -> dict[str, Any]:
    """One model's report entry: how it loaded, what its tensors hold, what the attacks achieved."""
    settings = settings or AttackSettings()
    try:
        model = load_model(data_bytes, name, task=data.spec.task)
    except ModelRefused as refused:
        return refused_entry(refused.format, refused.reason, refused.untrusted_types)
    weights = check_tensors(((safe_text(n), t) for n, t in model.tensors), data.needles)
    outcome = attack_model(model, data, settings)
    return {
        "format": model.format.value, "loaded": True, "problem": None,
        "attacks": [a.as_dict() for a in outcome.attacks],
        "attacks_not_run": None if outcome.attacks else (outcome.not_run or "no attack fits this model"),
        "attacks_skipped": outcome.skipped,
        "per_record_risk": outcome.per_record.as_dict() if outcome.per_record else None,
        "weights": weights.as_dict() | {"reproduces": [r.as_dict() for r in weights.reproduces[:20]]},
    }


class _ModelTimeout(BaseException):
    """One model's checks ran out of time (a BaseException, so that no `except Exception` swallows it)."""


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Stop one model's checks after `seconds` (on the main thread; elsewhere, no limit)."""
    import threading

    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _ModelTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read_model_bytes(code_dir: Path, name: str) -> bytes:
    """A model file under `code_dir`, by a plain relative name, never through a link."""
    if not MODEL_NAME.fullmatch(name) or ".." in PurePosixPath(name).parts:
        raise ModelRefused(ModelFormat.UNKNOWN, "model paths are plain relative names under /code")
    path = code_dir
    for part in PurePosixPath(name).parts:
        path = path / part
        if path.is_symlink():
            raise ModelRefused(ModelFormat.UNKNOWN, "the model path goes through a symbolic link")
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ModelRefused(ModelFormat.UNKNOWN, "the model file does not exist or cannot be opened") from exc
    with os.fdopen(descriptor, "rb") as handle:
        import stat

        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ModelRefused(ModelFormat.UNKNOWN, "the model path is not a regular file")
        from sandbox_trainer.models import MAX_MODEL_BYTES

        content = handle.read(MAX_MODEL_BYTES + 1)
    if len(content) > MAX_MODEL_BYTES:
        raise ModelRefused(sniff(content[:64], name), f"the file is over the gate's {MAX_MODEL_BYTES >> 20} MiB limit")
    return content


def _write_report(output_dir: Path, report: dict[str, Any]) -> None:
    """Atomically, so a gate that dies midway leaves the entries it finished (the host blocks the rest)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    partial = output_dir / ".report.json.partial"
    partial.write_text(json.dumps(report, indent=1, sort_keys=True, allow_nan=False))
    partial.replace(output_dir / "report.json")


def run_gate(*, data_dir: Path | None = None, code_dir: Path | None = None, output_dir: Path | None = None,
             settings: AttackSettings | None = None) -> dict[str, Any]:
    """Check every model gate.json names and write report.json; the roots default to the container's
    (or the SANDBOX_GATE_DATA, _CODE and _OUTPUT environment variables)."""
    data_dir = data_dir or Path(os.environ.get(ENV_DIRS["data"], DATA_DIR))
    code_dir = code_dir or Path(os.environ.get(ENV_DIRS["code"], CODE_DIR))
    output_dir = output_dir or Path(os.environ.get(ENV_DIRS["output"], OUTPUT_DIR))
    settings = settings or AttackSettings()
    report: dict[str, Any] = {"models": {}}
    try:
        try:
            spec = GateSpec.parse(json.loads((code_dir / "gate.json").read_text()))
        except (OSError, ValueError) as exc:
            raise GateError(f"gate.json cannot be read ({type(exc).__name__})") from exc
        data = GateData.load(data_dir, spec, settings.seed)
    except GateError as exc:
        report["problem"] = str(exc)
        _write_report(output_dir, report)
        raise
    _write_report(output_dir, report)
    for name in spec.models:
        started = time.monotonic()
        try:
            with _time_limit(settings.model_time_limit_s):
                entry = gate_model(read_model_bytes(code_dir, name), name, data, settings)
        except ModelRefused as refused:
            entry = refused_entry(refused.format, refused.reason, refused.untrusted_types)
        except _ModelTimeout:
            entry = refused_entry(_format_by_name(name),
                                  f"checking the model took over {settings.model_time_limit_s} s")
        except MemoryError:
            entry = refused_entry(_format_by_name(name), "checking the model ran out of memory")
        logger.info("gate: %s checked in %.1f s", name, time.monotonic() - started)
        report["models"][name] = entry
        _write_report(output_dir, report)
    return report


def _quiet_libraries() -> None:
    # SACRO-ML configures the root logger at INFO on import and logs every repetition.
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("sacroml", "acro"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.simplefilter("ignore")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -I -m sandbox_trainer.gate", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="folder with train.parquet and holdout.parquet")
    parser.add_argument("--code", type=Path, default=None, help="folder with gate.json and the model files")
    parser.add_argument("--output", type=Path, default=None, help="folder report.json is written to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s", force=True)
    _quiet_libraries()
    logger.setLevel(logging.INFO)
    try:
        report = run_gate(data_dir=args.data, code_dir=args.code, output_dir=args.output)
    except GateError as exc:
        print(f"gate: {exc}", file=sys.stderr)
        return 2
    blocked = sum(1 for entry in report["models"].values() if not entry["loaded"])
    print(f"gate: {len(report['models'])} models checked, {blocked} not loaded", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
