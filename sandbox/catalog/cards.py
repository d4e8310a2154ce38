"""Dataset cards and privacy metadata: pure validation, no I/O."""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandbox.catalog.fhir import FhirMapping

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


UseKind = Literal["analysis", "training", "dp_training", "notebook", "query"]
USE_KINDS: tuple[UseKind, ...] = ("analysis", "training", "dp_training", "notebook", "query")


class LicenceTerms(BaseModel):
    """The terms under which the publishing org licenses the data; contracts may grant no more."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=500)
    url: str = Field(default="", max_length=1000)
    permitted_uses: list[UseKind] = Field(default_factory=lambda: list(USE_KINDS))
    training_allowed: bool = True
    attribution: str = Field(default="", max_length=2000)
    # How long a buyer may keep a model derived from the data; None: no limit stated.
    derived_model_retention_days: int | None = Field(default=None, ge=0, le=36_500)

    def allows(self, kind: str) -> bool:
        """Whether a contract may grant `kind` of use under these terms."""
        if kind in ("training", "dp_training") and not self.training_allowed:
            return False
        return kind in self.permitted_uses


class Generalisation(BaseModel):
    """How the platform coarsens a quasi-identifier at ingest, before anything is stored: numbers
    to the lower edge of a band (`band: 10` stores 63 as 60), dates and timestamps to the first day
    of their month or year."""

    model_config = ConfigDict(extra="forbid")

    band: float | None = Field(default=None, gt=0)
    to: Literal["month", "year"] | None = None


CollectionFormat = Literal["dicom", "png", "jpeg", "nifti"]
DEFAULT_FORMATS: tuple[CollectionFormat, ...] = ("dicom",)
# The columns every collection manifest carries (sandbox.catalog.collections); a card of a files dataset
# declares those of them it describes, its privacy unit and its label columns.
MANIFEST_COLUMNS = ("path", "sha256", "size_bytes", "mtime_ns", "format", "modality", "body_part", "study_year",
                    "pixel_rows", "pixel_columns")
# Manifest columns a card may declare (and so a DP query may read): not the path, digest or mtime.
DECLARABLE_MANIFEST_COLUMNS = frozenset({"size_bytes", "format", "modality", "body_part", "study_year",
                                         "pixel_rows", "pixel_columns"})


class CollectionLabels(BaseModel):
    """Label columns joined into a collection's manifest from a tabular dataset of the same org."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(pattern=NAME_PATTERN)
    on: str = Field(pattern=COLUMN_PATTERN)  # the tabular dataset's patient column
    columns: list[str] = Field(min_length=1, max_length=50)


class ImageShape(BaseModel):
    """The size the platform trainer resizes a collection's pixels to."""

    model_config = ConfigDict(extra="forbid")

    channels: int = Field(default=1, ge=1, le=4)
    height: int = Field(default=64, ge=4, le=4096)
    width: int = Field(default=64, ge=4, le=4096)


class CollectionSpec(BaseModel):
    """A files dataset's collection: which formats it holds, who each file belongs to, and what a
    de-identified header may still carry (`sandbox.catalog.dicom_deid`)."""

    model_config = ConfigDict(extra="forbid")

    formats: list[CollectionFormat] = Field(default_factory=lambda: list(DEFAULT_FORMATS), min_length=1, max_length=4)
    # `PatientID` (the DICOM header) or `path:<n>`: the n-th folder of the file's path, from 0.
    unit_from: str = Field(default="PatientID", pattern=r"^(PatientID|path:[0-9]{1,2})$")
    labels: CollectionLabels | None = None
    image: ImageShape = Field(default_factory=ImageShape)
    pseudonym_pattern: str | None = Field(default=None, max_length=500)
    uid_root: str = Field(default="2.25", pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)
    # How the files keep dates: only the year (month and day 01-01), shifted per patient, or removed.
    dates: Literal["year", "shifted", "removed"] = "year"


class DatasetCard(BaseModel):
    """What a steward declares about a dataset; everything but bounds and categories is public."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    title: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=20_000)
    provenance: str = Field(default="", max_length=5000)
    deidentification: str = Field(default="", max_length=5000)
    # A plain string is the licence's name, with every use permitted (the cards written before terms).
    licence: LicenceTerms = Field(default_factory=LicenceTerms)
    update_cadence: str = Field(default="", max_length=100)
    privacy_unit: str = Field(pattern=COLUMN_PATTERN)
    privacy_unit_rows: Literal["one", "many"] = "many"
    columns: dict[str, ColumnSpec] = Field(min_length=1, max_length=2000)
    marginal_pairs: list[tuple[str, str]] = Field(default_factory=list, max_length=200)
    dp: DpSettings | None = None
    # Registration (issue 16): columns whose combination could single a patient out, and the sensitive
    # columns whose diversity within each such combination is measured.
    quasi_identifiers: list[str] = Field(default_factory=list, max_length=20)
    sensitive_columns: list[str] = Field(default_factory=list, max_length=50)
    # File columns read under another name: an export's own headers (Chinese ones, say) to the card's
    # column names, which are ASCII. Applied first, so every other field names columns as the card does.
    rename: dict[str, str] = Field(default_factory=dict, max_length=2000)
    # Columns an export carries that are discarded on reading, before any check or storage.
    drop_columns: list[str] = Field(default_factory=list, max_length=2000)
    generalise: dict[str, Generalisation] = Field(default_factory=dict, max_length=50)
    # The policy whose `registration` section decides on each version's de-identification report.
    registration_policy: str = Field(default="default", max_length=100)
    # How FHIR R4 NDJSON is flattened to this table (sandbox.catalog.fhir); None for tabular files.
    fhir_mapping: FhirMapping | None = None
    # "table": versions are uploaded tables; "files": versions are collections of files registered in place.
    kind: Literal["table", "files"] = "table"
    collection: CollectionSpec | None = None

    @field_validator("licence", mode="before")
    @classmethod
    def _licence_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


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
    errors.extend(_registration_errors(card))
    errors.extend(_collection_errors(card))
    return errors


def _collection_errors(card: DatasetCard) -> list[str]:
    if card.kind == "table":
        return ["collection: only a files dataset (kind: files) has a collection section"] \
            if card.collection is not None else []
    collection = card.collection
    if collection is None:
        return ["kind: files needs a collection section (formats, unit_from, pseudonym_pattern, ...)"]
    errors = []
    if card.fhir_mapping is not None:
        errors.append("fhir_mapping: a files dataset is not read from FHIR")
    if len(set(collection.formats)) != len(collection.formats):
        errors.append("collection.formats: each format once")
    headerless = sorted(set(collection.formats) - {"dicom", "nifti"})
    if collection.unit_from == "PatientID" and headerless:
        errors.append(f"collection.unit_from: PatientID comes from DICOM headers (a DICOM file's, or a NIfTI "
                      f"file's DICOM extension), which {' and '.join(headerless)} files lack; use path:<n>")
    if collection.unit_from == "PatientID" and not collection.pseudonym_pattern:
        errors.append("collection.pseudonym_pattern: the privacy unit comes from PatientID, so the card must "
                      "say what a de-identified PatientID looks like (a regular expression)")
    if collection.pseudonym_pattern:
        try:
            re.compile(collection.pseudonym_pattern)
        except re.error as exc:
            errors.append(f"collection.pseudonym_pattern: not a regular expression ({exc})")
    labels = collection.labels.columns if collection.labels else []
    if collection.labels is not None:
        if collection.labels.dataset == card.name:
            errors.append("collection.labels.dataset: labels come from another (tabular) dataset")
        for column in labels:
            if not _valid_column_name(column) or column in MANIFEST_COLUMNS or column == card.privacy_unit:
                errors.append(f"collection.labels.columns: {column!r} is not a usable label column name")
    allowed = DECLARABLE_MANIFEST_COLUMNS | set(labels) | {card.privacy_unit}
    for column in card.columns:
        if column not in allowed:
            errors.append(f"column {column!r}: a files dataset declares only its manifest's columns "
                          f"({', '.join(sorted(DECLARABLE_MANIFEST_COLUMNS))}), its privacy unit and its labels")
    if card.rename or card.drop_columns or card.generalise:
        errors.append("rename, drop_columns and generalise apply to uploaded tables, not to a files dataset")
    return errors


def _registration_errors(card: DatasetCard) -> list[str]:
    errors = []
    for field in ("quasi_identifiers", "sensitive_columns"):
        for column in getattr(card, field):
            if column not in card.columns:
                errors.append(f"{field}: {column!r} is not a declared column")
            elif column == card.privacy_unit:
                errors.append(f"{field}: {column!r} is the privacy unit, which identifies nobody outside the platform")
    for column in set(card.quasi_identifiers) & set(card.sensitive_columns):
        errors.append(f"column {column!r} is both a quasi-identifier and a sensitive column")
    targets = list(card.rename.values())
    for source, target in card.rename.items():
        if not source or len(source) > 200:
            errors.append(f"rename: {source!r} must be a file column name of 1 to 200 characters")
        if target not in card.columns and target not in card.drop_columns:
            errors.append(f"rename: {source!r} -> {target!r}, which is neither a declared nor a dropped column")
        if targets.count(target) > 1:
            errors.append(f"rename: several file columns are renamed to {target!r}")
        if source in card.columns and source != target:
            errors.append(f"rename: {source!r} is also a declared column")
    for column in card.drop_columns:
        if column in card.columns:
            errors.append(f"drop_columns: {column!r} is also declared as a column")
    for column, rule in card.generalise.items():
        spec = card.columns.get(column)
        if spec is None:
            errors.append(f"generalise: {column!r} is not a declared column")
        elif (rule.band is None) == (rule.to is None):
            errors.append(f"generalise: {column!r} takes one of band (numbers) or to (dates)")
        elif rule.band is not None and spec.type not in NUMERIC:
            errors.append(f"generalise: {column!r} is {spec.type.value}; band applies to integer and float columns")
        elif rule.band is not None and spec.type is ColumnType.INTEGER and rule.band != int(rule.band):
            errors.append(f"generalise: {column!r} is an integer column; its band must be a whole number")
        elif rule.to is not None and spec.type not in (ColumnType.DATE, ColumnType.TIMESTAMP):
            errors.append(f"generalise: {column!r} is {spec.type.value}; to: month|year applies to dates")
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
