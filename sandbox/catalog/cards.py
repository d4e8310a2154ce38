"""Dataset cards and privacy metadata: pure validation, no I/O."""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[a-z][a-z0-9_-]{1,62}$"
COLUMN_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
# Names the platform keeps for itself: a leading underscore (the engines' own columns and aliases,
# such as the DP engine's per-unit rank) and the virtual columns DuckDB's file readers add. Compared
# without case, as DuckDB resolves names. A data column with such a name could pose as an internal
# one (review 11.2: a column named like the rank column switched off per-unit bounding).
RESERVED_COLUMN_PREFIX = "_"
READER_COLUMNS = frozenset({"file_row_number", "filename", "file_index", "rowid"})


def is_reserved_column(name: str) -> bool:
    """Whether `name` is in the platform's reserved namespace, which no dataset card may declare."""
    lowered = name.lower()
    return lowered.startswith(RESERVED_COLUMN_PREFIX) or lowered in READER_COLUMNS


class ColumnType(StrEnum):
    INTEGER = "integer"
    FLOAT = "float"
    BOOLEAN = "boolean"
    STRING = "string"
    DATE = "date"
    TIMESTAMP = "timestamp"


NUMERIC = {ColumnType.INTEGER, ColumnType.FLOAT}
CATEGORICAL = {ColumnType.INTEGER, ColumnType.STRING, ColumnType.BOOLEAN}


class ColumnSpec(BaseModel):
    """One column's privacy metadata. `public` says whether bounds/categories may be shown."""

    model_config = ConfigDict(extra="forbid")

    type: ColumnType
    bounds: tuple[float, float] | None = None
    categories: list[str | int | bool] | None = Field(default=None, max_length=10_000)
    public: bool = False
    description: str = Field(default="", max_length=2000)


class DpSettings(BaseModel):
    """Contribution bounds the DP query engine enforces per privacy unit before any aggregate."""

    model_config = ConfigDict(extra="forbid")

    rows_per_unit: int = Field(default=1, ge=1, le=1000)
    groups_per_unit: int = Field(default=1, ge=1, le=1000)


class DatasetCard(BaseModel):
    """What a steward declares about a dataset; everything but bounds and categories is public."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    title: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=20_000)
    provenance: str = Field(default="", max_length=5000)
    deidentification: str = Field(default="", max_length=5000)
    licence: str = Field(default="", max_length=500)
    update_cadence: str = Field(default="", max_length=100)
    privacy_unit: str = Field(pattern=COLUMN_PATTERN)
    privacy_unit_rows: Literal["one", "many"] = "many"
    columns: dict[str, ColumnSpec] = Field(min_length=1, max_length=2000)
    marginal_pairs: list[tuple[str, str]] = Field(default_factory=list, max_length=200)
    dp: DpSettings | None = None


def card_errors(card: DatasetCard) -> list[str]:
    """The rules a schema cannot express; each message names the column it is about."""
    errors = []
    for column, spec in card.columns.items():
        if not _valid_column_name(column):
            errors.append(f"column {column!r}: names must be letters, digits and _, up to 63 long")
        elif is_reserved_column(column):
            errors.append(f"column {column!r}: names starting with '_' and the names "
                          f"{', '.join(sorted(READER_COLUMNS))} are reserved for the platform's own columns")
        if spec.bounds is not None:
            if spec.type not in NUMERIC:
                errors.append(f"column {column!r}: bounds apply only to integer and float columns")
            elif not all(math.isfinite(bound) for bound in spec.bounds):
                # JSON parsers accept Infinity and NaN; clamping to them bounds nothing.
                errors.append(f"column {column!r}: bounds must be finite numbers")
            elif not spec.bounds[0] < spec.bounds[1]:
                errors.append(f"column {column!r}: lower bound must be below upper bound")
        if spec.categories is not None:
            if spec.type not in CATEGORICAL:
                errors.append(f"column {column!r}: categories apply to string, integer and boolean columns")
            elif not spec.categories:
                errors.append(f"column {column!r}: categories must not be empty")
            elif len({repr(c) for c in spec.categories}) != len(spec.categories):
                errors.append(f"column {column!r}: categories must be unique")
            elif not all(_category_fits(c, spec.type) for c in spec.categories):
                errors.append(f"column {column!r}: every category must be a {spec.type.value}")
        if spec.bounds is not None and spec.categories is not None:
            errors.append(f"column {column!r}: declare bounds or categories, not both")
    lowered = [column.lower() for column in card.columns]
    for name in sorted({n for n in lowered if lowered.count(n) > 1}):
        errors.append(f"column {name!r}: declared twice with different letter case (names are not case-sensitive)")
    unit = card.columns.get(card.privacy_unit)
    if unit is None:
        errors.append(f"privacy_unit {card.privacy_unit!r} is not one of the declared columns")
    else:
        if unit.public:
            errors.append(f"privacy_unit {card.privacy_unit!r}: the privacy-unit column cannot be public")
        if unit.categories is not None or unit.bounds is not None:
            errors.append(f"privacy_unit {card.privacy_unit!r}: the privacy-unit column takes no bounds or categories")
    for first, second in card.marginal_pairs:
        for column in (first, second):
            if column not in card.columns:
                errors.append(f"marginal_pairs: {column!r} is not a declared column")
        if first == second:
            errors.append(f"marginal_pairs: ({first!r}, {second!r}) pairs a column with itself")
    return errors


def _valid_column_name(name: str) -> bool:
    return re.fullmatch(COLUMN_PATTERN, name) is not None


def _category_fits(value: Any, column_type: ColumnType) -> bool:
    if column_type is ColumnType.BOOLEAN:
        return isinstance(value, bool)
    if column_type is ColumnType.INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)


def public_schema(columns: DatasetCard | dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The catalog's view of column specs: types always, bounds and categories only when public."""
    if isinstance(columns, DatasetCard):
        columns = {name: spec.model_dump(mode="json") for name, spec in columns.columns.items()}
    schema = {}
    for column, spec in columns.items():
        entry: dict[str, Any] = {"type": spec["type"], "public": bool(spec.get("public"))}
        if spec.get("description"):
            entry["description"] = spec["description"]
        if spec.get("public"):
            for key in ("bounds", "categories"):
                if spec.get(key) is not None:
                    entry[key] = list(spec[key])
        schema[column] = entry
    return schema
