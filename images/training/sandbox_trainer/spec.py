"""The training spec a `dp_training` job's container receives (env `SANDBOX_TRAINING`, JSON), validated."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,100}\.py")
MAX_FEATURES = 100_000
MAX_OUTPUTS = 100_000
MAX_EPOCHS = 10_000
MAX_STEPS = 10_000_000
MAX_IMAGE_SIDE = 4096
IMAGE_FEATURE = "image"  # the one feature of an image dataset: the pixels, (channels, height, width) per row


class SpecError(ValueError):
    """The spec is malformed; the message says which field and why."""


@dataclass(frozen=True)
class TrainingSpec:
    dataset: str
    version: int
    model_module: str
    features: tuple[str, ...]
    label: str
    task: str                  # "classification" | "regression"
    n_features: int
    n_outputs: int
    epochs: int
    batch_size: int
    learning_rate: float
    max_grad_norm: float
    epsilon: float
    delta: float
    n_units: int
    max_rows_per_unit: int
    # One row's shape: (n_features,) for a table; (channels, height, width) for images (features ["image"]).
    input_shape: tuple[int, ...] = ()

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.input_shape or (self.n_features,)

    @property
    def is_image(self) -> bool:
        return len(self.row_shape) > 1

    @property
    def sample_rate(self) -> float:
        """Each step samples every unit independently with this probability (Poisson sampling)."""
        return self.batch_size / self.n_units

    @property
    def steps(self) -> int:
        """epochs x steps per epoch, where an epoch is n_units / batch_size expected batches."""
        return self.epochs * max(1, round(self.n_units / self.batch_size))

    def record_fields(self) -> dict[str, Any]:
        """The spec's part of the training record."""
        return {"dataset": self.dataset, "version": self.version, "delta": self.delta,
                "max_grad_norm": self.max_grad_norm, "epochs": self.epochs, "batch_size": self.batch_size,
                "learning_rate": self.learning_rate, "n_units": self.n_units,
                "max_rows_per_unit": self.max_rows_per_unit, "features": list(self.features), "label": self.label,
                "n_features": self.n_features, "n_outputs": self.n_outputs, "task": self.task,
                **({"input_shape": list(self.input_shape)} if self.is_image else {})}


def parse_spec(text: str) -> TrainingSpec:
    """The spec in `text` (JSON), or SpecError naming the first field that is wrong."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise SpecError(f"the training spec is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError("the training spec must be a JSON object")
    if raw.get("kind") != "dp_training":
        raise SpecError("the training spec's kind must be 'dp_training'")
    input_shape = _input_shape(raw)
    n_features = _integer(raw, "n_features", 1, math.prod(input_shape) if input_shape else MAX_FEATURES)
    task = raw.get("task")
    if task not in ("classification", "regression"):
        raise SpecError("task must be 'classification' or 'regression'")
    n_outputs = _integer(raw, "n_outputs", 2 if task == "classification" else 1, MAX_OUTPUTS)
    features = raw.get("features")
    if not (isinstance(features, list) and all(isinstance(name, str) and name for name in features)):
        raise SpecError("features must be a list of column names")
    if input_shape:
        if features != [IMAGE_FEATURE]:
            raise SpecError(f"an image dataset's features must be [{IMAGE_FEATURE!r}]")
        if math.prod(input_shape) != n_features:
            raise SpecError("n_features must be channels x height x width of input_shape")
    elif len(features) != n_features:
        raise SpecError(f"features names {len(features)} columns but n_features is {n_features}")
    n_units = _integer(raw, "n_units", 1, 10**12)
    batch_size = _integer(raw, "batch_size", 1, n_units)
    epochs = _integer(raw, "epochs", 1, MAX_EPOCHS)
    model_module = raw.get("model_module", "model.py")
    if not (isinstance(model_module, str) and MODULE_NAME.fullmatch(model_module)):
        raise SpecError("model_module must be a file name like 'model.py' (letters, digits, '_', no folders)")
    spec = TrainingSpec(
        dataset=_text(raw, "dataset"), version=_integer(raw, "version", 1, 10**12), model_module=model_module,
        features=tuple(features), label=_text(raw, "label"), task=task, n_features=n_features,
        n_outputs=n_outputs, epochs=epochs, batch_size=batch_size,
        learning_rate=_number(raw, "learning_rate", low=0.0, high=1e6),
        max_grad_norm=_number(raw, "max_grad_norm", low=0.0, high=1e6),
        epsilon=_number(raw, "epsilon", low=0.0, high=1e3), delta=_number(raw, "delta", low=0.0, high=1.0),
        n_units=n_units, max_rows_per_unit=_integer(raw, "max_rows_per_unit", 1, 1_000_000), input_shape=input_shape)
    if spec.steps > MAX_STEPS:
        raise SpecError(f"epochs x n_units / batch_size gives {spec.steps} steps; at most {MAX_STEPS}")
    return spec


def _input_shape(raw: dict[str, Any]) -> tuple[int, ...]:
    """`input_shape`: absent for a table, [channels, height, width] for images."""
    value = raw.get("input_shape")
    if value is None:
        return ()
    if not (isinstance(value, list) and len(value) == 3
            and all(isinstance(size, int) and not isinstance(size, bool) for size in value)
            and value[0] in (1, 3) and all(1 <= size <= MAX_IMAGE_SIDE for size in value[1:])):
        raise SpecError(f"input_shape must be [channels (1 or 3), height, width], sides at most {MAX_IMAGE_SIDE}")
    return tuple(value)


def _integer(raw: dict[str, Any], name: str, low: int, high: int) -> int:
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpecError(f"{name} must be an integer in [{low}, {high}]")
    return value


def _number(raw: dict[str, Any], name: str, *, low: float, high: float) -> float:
    """A finite number strictly between `low` and `high`."""
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low < value < high:
        raise SpecError(f"{name} must be a number in ({low:g}, {high:g})")
    return float(value)


def _text(raw: dict[str, Any], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise SpecError(f"{name} must be a non-empty string")
    return value
