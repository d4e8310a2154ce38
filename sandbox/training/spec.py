"""What a training job asks for, checked against the card, and how the platform encodes rows for it. Pure.

The encoding uses only what the card publishes for a column (its bounds or categories), so the buyer
can apply the same encoding to their own rows and the encoding itself reveals nothing of the data:
a number becomes `(value - low) / (high - low)` clipped to [0, 1]; a category becomes one column per
category (one-hot); the label is a class index (categories) or a scaled number (regression).

On a file collection (a card of `kind: files`) the only feature is `image`: each file's pixels, decoded in the
worker and resized to the card's `collection.image` shape (channels, height, width), values in [0, 1]. The
label is then a public categorical column of the collection's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sandbox.errors import Invalid

NUMERIC_TYPES = frozenset({"integer", "float", "number", "double", "decimal"})
MAX_ENCODED_FEATURES = 4096
IMAGE_FEATURE = "image"  # the reserved feature of a file collection: the pixels of each file
DEFAULT_IMAGE_SHAPE = (1, 64, 64)
MAX_IMAGE_SIDE = 1024
# The platform's trainer, the only code that runs once the training rows are in a dp_training container.
TRAINER_COMMAND = ["python", "-I", "-m", "sandbox_trainer.run"]
GATE_COMMAND = ["python", "-I", "-m", "sandbox_trainer.gate"]
TRAINING_IMAGE = "training"


class TrainingSpec(BaseModel):
    """The `training` part of a job spec.

    For `dp_training` every field applies and `epsilon` is required; for free-form `training`, only
    `label` and `features` are read (they tell the membership-inference gate what the model predicts).
    """

    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1, max_length=64)
    features: list[str] = Field(min_length=1, max_length=512)
    model: str = Field(default="model.py", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}\.py$")
    epochs: int = Field(default=5, ge=1, le=1000)
    batch_size: int = Field(default=256, ge=1, le=1_000_000)
    learning_rate: float = Field(default=0.05, gt=0, le=100)
    max_grad_norm: float = Field(default=1.0, gt=0, le=1000)
    epsilon: float | None = Field(default=None, gt=0, le=100)
    delta: float | None = Field(default=None, gt=0, lt=1e-3)


@dataclass(frozen=True)
class Encoded:
    """One card column as the trainer sees it."""

    column: str
    kind: Literal["number", "onehot"]
    bounds: tuple[float, float] | None = None
    categories: tuple[Any, ...] = ()

    @property
    def names(self) -> list[str]:
        if self.kind == "number":
            return [self.column]
        return [f"{self.column}={category}" for category in self.categories]

    def as_dict(self) -> dict[str, Any]:
        return {"column": self.column, "kind": self.kind,
                **({"bounds": list(self.bounds)} if self.bounds else {}),
                **({"categories": list(self.categories)} if self.categories else {})}


@dataclass(frozen=True)
class TrainingPlan:
    """The encoding of features and label, fixed from the card before any row is read."""

    unit: str
    features: list[Encoded]
    label: Encoded
    task: Literal["classification", "regression"]
    # (channels, height, width) of each row's image on a file collection (features is then empty); None for tables.
    image: tuple[int, int, int] | None = None

    @property
    def feature_names(self) -> list[str]:
        if self.image is not None:
            return [IMAGE_FEATURE]
        return [name for encoded in self.features for name in encoded.names]

    @property
    def n_features(self) -> int:
        if self.image is not None:
            return self.image[0] * self.image[1] * self.image[2]
        return len(self.feature_names)

    @property
    def n_outputs(self) -> int:
        return len(self.label.categories) if self.task == "classification" else 1

    def as_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "task": self.task, "features": [f.as_dict() for f in self.features],
                "label": self.label.as_dict(), "feature_names": self.feature_names,
                "n_features": self.n_features, "n_outputs": self.n_outputs,
                **({"image": list(self.image)} if self.image is not None else {})}


def _encoding(card: dict[str, Any], column: str, *, as_label: bool, problems: list[str]) -> Encoded | None:
    spec = card["columns"].get(column)
    what = "label" if as_label else "feature"
    if spec is None:
        problems.append(f"{what} {column!r} is not a column of {card['name']}")
        return None
    if column == card["privacy_unit"]:
        problems.append(f"{what} {column!r} is the privacy unit; a model never learns from it")
        return None
    if not spec.get("public"):
        problems.append(f"{what} {column!r} is not a public column of the card: its encoding would reveal "
                        "bounds or categories the card keeps private")
        return None
    categories = spec.get("categories")
    if categories:
        return Encoded(column, "onehot", categories=tuple(categories))
    bounds = spec.get("bounds")
    if str(spec.get("type")) in NUMERIC_TYPES and bounds and float(bounds[1]) > float(bounds[0]):
        return Encoded(column, "number", bounds=(float(bounds[0]), float(bounds[1])))
    problems.append(f"{what} {column!r} has neither categories nor numeric bounds on the card, so the platform "
                    "cannot encode it without reading the data")
    return None


def image_shape(card: dict[str, Any]) -> tuple[int, int, int]:
    """The (channels, height, width) a collection's images are resized to (`collection.image` on its card)."""
    image = (card.get("collection") or {}).get("image") or {}
    return (int(image.get("channels", DEFAULT_IMAGE_SHAPE[0])), int(image.get("height", DEFAULT_IMAGE_SHAPE[1])),
            int(image.get("width", DEFAULT_IMAGE_SHAPE[2])))


def _image_plan(card: dict[str, Any], spec: TrainingSpec) -> TrainingPlan:
    """The plan on a file collection: the pixels as the one feature, a public categorical manifest label."""
    problems: list[str] = []
    if spec.features != [IMAGE_FEATURE]:
        problems.append(f"a file collection's features must be [{IMAGE_FEATURE!r}] (the pixels); other manifest "
                        "columns are not mixed with images")
    try:
        shape = image_shape(card)
    except (TypeError, ValueError):
        shape = (0, 0, 0)
    if shape[0] not in (1, 3) or not all(1 <= side <= MAX_IMAGE_SIDE for side in shape[1:]):
        problems.append(f"the card's collection.image must have 1 or 3 channels and sides of 1 to {MAX_IMAGE_SIDE}")
    label = _encoding(card, spec.label, as_label=True, problems=problems)
    if label is not None and label.kind != "onehot":
        problems.append(f"the label {spec.label!r} must be a categorical column of the manifest")
    elif label is not None and len(label.categories) < 2:
        problems.append(f"the label {spec.label!r} has fewer than two categories")
    if problems or label is None:
        raise Invalid("the training spec does not fit the collection's card", problems)
    return TrainingPlan(unit=str(card["privacy_unit"]), features=[], label=label, task="classification",
                        image=shape)


def training_plan(card: dict[str, Any], spec: TrainingSpec) -> TrainingPlan:
    """The plan for `spec` on a dataset with `card`, or Invalid naming every problem."""
    if card.get("kind") == "files":
        return _image_plan(card, spec)
    problems: list[str] = []
    if len(set(spec.features)) != len(spec.features):
        problems.append("features name a column twice")
    if spec.label in spec.features:
        problems.append(f"the label {spec.label!r} is also a feature")
    features = [_encoding(card, column, as_label=False, problems=problems) for column in spec.features]
    label = _encoding(card, spec.label, as_label=True, problems=problems)
    if label is not None and label.kind == "onehot" and len(label.categories) < 2:
        problems.append(f"the label {spec.label!r} has fewer than two categories")
    plan = None
    if not problems and label is not None:
        plan = TrainingPlan(unit=str(card["privacy_unit"]), features=[f for f in features if f is not None],
                            label=label, task="classification" if label.kind == "onehot" else "regression")
        if plan.n_features > MAX_ENCODED_FEATURES:
            problems.append(f"the features encode to {plan.n_features} inputs, above {MAX_ENCODED_FEATURES}")
    if problems or plan is None:
        raise Invalid("the training spec does not fit the dataset's card", problems)
    return plan


def plan_from_dict(stored: dict[str, Any]) -> TrainingPlan:
    """The plan a job stored at submission (`TrainingPlan.as_dict`), as it was then."""

    def encoded(entry: dict[str, Any]) -> Encoded:
        bounds = entry.get("bounds")
        return Encoded(column=str(entry["column"]), kind=entry["kind"],
                       bounds=(float(bounds[0]), float(bounds[1])) if bounds else None,
                       categories=tuple(entry.get("categories") or ()))

    image = stored.get("image")
    return TrainingPlan(unit=str(stored["unit"]), features=[encoded(f) for f in stored["features"]],
                        label=encoded(stored["label"]), task=stored["task"],
                        image=(int(image[0]), int(image[1]), int(image[2])) if image else None)
