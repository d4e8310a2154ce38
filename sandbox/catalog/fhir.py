"""FHIR R4 NDJSON (Patient, Encounter, Procedure, Observation) flattened to one table by a mapping the
steward reviews, and the draft of such a mapping from the resources a file holds.

A mapping names the resource each output row comes from (`row`) and, per output column, a resource type
and a path into it. How the other resources join a row:
- Patient: the row resource's `subject` (or the row itself when `row` is Patient);
- Encounter: the row resource's `encounter` (or the row itself when `row` is Encounter);
- Observation with a `code`: among the subject's Observations carrying that code in any `code.coding`,
  those of the row's encounter when both name one, the one nearest in time to the row's own time
  (Procedure `performed[x]`, Encounter `period.start`, Observation `effective[x]`); without times on
  both sides, the first in file order. An Observation column without a code is the row itself (row
  Observation only).

Paths are dotted element names with optional `[n]` indexes (`code.coding[0].code`); a list met without
an index yields its first element. The file is read line by line once, keeping only the mapped values.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import re
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, cast

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sandbox.errors import Invalid

ResourceType = Literal["Patient", "Encounter", "Procedure", "Observation"]
RESOURCE_TYPES: tuple[str, ...] = ("Patient", "Encounter", "Procedure", "Observation")
ValueType = Literal["string", "integer", "float", "boolean", "date", "timestamp"]
PATH_PATTERN = r"^[A-Za-z][A-Za-z0-9_]*(\[\d{1,4}\])?(\.[A-Za-z][A-Za-z0-9_]*(\[\d{1,4}\])?){0,15}$"
# The same rule as a card's column names (cards.py imports this module, so it is not imported here).
OUTPUT_COLUMN_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
_STEP = re.compile(r"([A-Za-z][A-Za-z0-9_]*)(?:\[(\d+)\])?")
_BATCH_ROWS = 50_000

_COMMON = {"id", "meta", "implicitRules", "language", "text", "contained", "extension", "modifierExtension",
           "identifier"}
# The top-level elements of each resource in FHIR R4: a path's first step must be one of them.
ELEMENTS: dict[str, frozenset[str]] = {
    "Patient": frozenset(_COMMON | {
        "active", "name", "telecom", "gender", "birthDate", "deceasedBoolean", "deceasedDateTime", "address",
        "maritalStatus", "multipleBirthBoolean", "multipleBirthInteger", "photo", "contact", "communication",
        "generalPractitioner", "managingOrganization", "link"}),
    "Encounter": frozenset(_COMMON | {
        "status", "statusHistory", "class", "classHistory", "type", "serviceType", "priority", "subject",
        "episodeOfCare", "basedOn", "participant", "appointment", "period", "length", "reasonCode",
        "reasonReference", "diagnosis", "account", "hospitalization", "location", "serviceProvider", "partOf"}),
    "Procedure": frozenset(_COMMON | {
        "instantiatesCanonical", "instantiatesUri", "basedOn", "partOf", "status", "statusReason", "category",
        "code", "subject", "encounter", "performedDateTime", "performedPeriod", "performedString",
        "performedAge", "performedRange", "recorder", "asserter", "performer", "location", "reasonCode",
        "reasonReference", "bodySite", "outcome", "report", "complication", "complicationDetail", "followUp",
        "note", "focalDevice", "usedReference", "usedCode"}),
    "Observation": frozenset(_COMMON | {
        "basedOn", "partOf", "status", "category", "code", "subject", "focus", "encounter", "effectiveDateTime",
        "effectivePeriod", "effectiveTiming", "effectiveInstant", "issued", "performer", "valueQuantity",
        "valueCodeableConcept", "valueString", "valueBoolean", "valueInteger", "valueRange", "valueRatio",
        "valueSampledData", "valueTime", "valueDateTime", "valuePeriod", "dataAbsentReason", "interpretation",
        "note", "bodySite", "method", "specimen", "device", "referenceRange", "hasMember", "derivedFrom",
        "component"}),
}
# Which resources can be joined to a row of each type (see the module docstring).
_JOINABLE: dict[str, frozenset[str]] = {
    "Patient": frozenset({"Patient", "Observation"}),
    "Encounter": frozenset({"Patient", "Encounter", "Observation"}),
    "Procedure": frozenset({"Patient", "Encounter", "Procedure", "Observation"}),
    "Observation": frozenset({"Patient", "Encounter", "Observation"}),
}
_ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(), "integer": pa.int64(), "float": pa.float64(), "boolean": pa.bool_(),
    "date": pa.date32(), "timestamp": pa.timestamp("us"),
}


class FhirColumn(BaseModel):
    """One output column: the resource it comes from, the path to its value, and the value's type."""

    model_config = ConfigDict(extra="forbid")

    resource: ResourceType
    path: str = Field(pattern=PATH_PATTERN, max_length=300)
    type: ValueType = "string"
    # Observations only: the code (in any of `code.coding`) that selects which Observation.
    code: str | None = Field(default=None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _known_element(self) -> FhirColumn:
        first = self.path.split(".", 1)[0].split("[", 1)[0]
        if first not in ELEMENTS[self.resource]:
            raise ValueError(f"path {self.path!r}: {first!r} is not an element of a FHIR R4 {self.resource}")
        if self.code is not None and self.resource != "Observation":
            raise ValueError(f"code {self.code!r} selects Observations; a {self.resource} column takes none")
        return self


class FhirMapping(BaseModel):
    """How FHIR resources become one table: one output row per `row` resource."""

    model_config = ConfigDict(extra="forbid")

    row: ResourceType
    columns: dict[str, FhirColumn] = Field(min_length=1, max_length=500)

    @model_validator(mode="after")
    def _joinable(self) -> FhirMapping:
        problems = []
        for name, column in self.columns.items():
            if not re.fullmatch(OUTPUT_COLUMN_PATTERN, name):
                problems.append(f"column {name!r}: names must be letters, digits and _, up to 63 long")
            if column.resource not in _JOINABLE[self.row]:
                problems.append(f"column {name!r}: a {column.resource} cannot be joined to a {self.row} row")
            elif column.resource == "Observation" and column.code is None and self.row != "Observation":
                problems.append(f"column {name!r}: an Observation column needs a code to pick the Observation")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# --- paths and values ----------------------------------------------------------------------------------

Steps = tuple[tuple[str, int | None], ...]


def parse_path(path: str) -> Steps:
    """The steps of a path in the mapping's path language; ValueError if it is not one."""
    if not re.fullmatch(PATH_PATTERN, path):
        raise ValueError(f"path {path!r} is not dotted names with optional [n] indexes")
    steps = []
    for part in path.split("."):
        found = _STEP.fullmatch(part)
        assert found is not None  # the pattern above admits only such parts
        steps.append((found.group(1), int(found.group(2)) if found.group(2) is not None else None))
    return tuple(steps)


def resolve(resource: Any, steps: Steps) -> Any:
    """The value at `steps` in `resource`, or None where any step is missing."""
    current = resource
    for name, index in steps:
        if isinstance(current, list):
            current = current[0] if current else None
        if not isinstance(current, dict):
            return None
        current = current.get(name)
        if index is not None:
            current = current[index] if isinstance(current, list) and index < len(current) else None
    if isinstance(current, list):
        current = current[0] if current else None
    return current


def _reference_id(reference: Any) -> str | None:
    """`Patient/abc` and `urn:uuid:abc` both name `abc`."""
    if not isinstance(reference, dict) or not isinstance(reference.get("reference"), str):
        return None
    text: str = reference["reference"]
    if text.startswith("urn:uuid:"):
        return text[len("urn:uuid:"):]
    return text.rsplit("/", 1)[-1]


def _parse_instant(value: str) -> dt.datetime:
    """A FHIR date or dateTime as naive UTC; partial dates (`2020`, `2020-03`) are their first instant."""
    if re.fullmatch(r"\d{4}", value):
        return dt.datetime(int(value), 1, 1)
    if re.fullmatch(r"\d{4}-\d{2}", value):
        return dt.datetime(int(value[:4]), int(value[5:7]), 1)
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    return parsed


def convert(value: Any, value_type: str) -> Any:
    """`value` from JSON as `value_type`; ValueError if it is not one."""
    if value is None:
        return None
    if isinstance(value, dict | list):
        raise ValueError("the path leads to an object, not a value; extend the path")
    if value_type == "string":
        return value if isinstance(value, str) else json.dumps(value)
    if value_type == "boolean":
        if isinstance(value, bool):
            return value
        raise ValueError(f"{value!r} is not a boolean")
    if value_type == "integer":
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"{value!r} is not an integer")
        number = float(value)
        if not number.is_integer():
            raise ValueError(f"{value!r} is not an integer")
        return int(number)
    if value_type == "float":
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a FHIR date")
    instant = _parse_instant(value)
    return instant.date() if value_type == "date" else instant


def _row_time(resource: dict[str, Any]) -> dt.datetime | None:
    for key in ("performedDateTime", "effectiveDateTime", "effectiveInstant", "issued"):
        if isinstance(resource.get(key), str):
            return _safe_instant(resource[key])
    for key in ("performedPeriod", "effectivePeriod", "period"):
        period = resource.get(key)
        if isinstance(period, dict) and isinstance(period.get("start"), str):
            return _safe_instant(period["start"])
    return None


def _safe_instant(value: str) -> dt.datetime | None:
    try:
        return _parse_instant(value)
    except ValueError:
        return None


def _codes(resource: dict[str, Any]) -> set[str]:
    code = resource.get("code")
    codings = code.get("coding") if isinstance(code, dict) else None
    if not isinstance(codings, list):
        return set()
    return {str(coding["code"]) for coding in codings if isinstance(coding, dict) and "code" in coding}


# --- reading NDJSON -----------------------------------------------------------------------------------

def read_resources(paths: Sequence[Path], *, filename: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """Each resource of the NDJSON files with its line number; Invalid names a broken line or a resource
    type outside the four."""
    for path in paths:
        label = filename or path.name
        number = 0
        try:
            with _open_binary(path) as handle:
                for number, raw in enumerate(handle, start=1):
                    try:
                        line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                    except UnicodeDecodeError as exc:
                        raise Invalid(f"{label!r} line {number} is not UTF-8 text, which NDJSON must be") from exc
                    if line.strip():
                        yield number, _parse_line(line, number, label)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise Invalid(f"{label!r} is a damaged gzip file (after line {number})") from exc


def _parse_line(line: str, number: int, label: str) -> dict[str, Any]:
    try:
        resource = json.loads(line)
    except json.JSONDecodeError as exc:
        raise Invalid(f"{label!r} line {number} is not JSON: {str(exc)[:120]}") from exc
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise Invalid(f"{label!r} line {number} is not a FHIR resource (no resourceType)")
    if resource["resourceType"] not in RESOURCE_TYPES:
        raise Invalid(f"{label!r} line {number} is a {str(resource['resourceType'])[:60]!r}; "
                      f"the platform reads {', '.join(RESOURCE_TYPES)}")
    return resource


def _open_binary(path: Path) -> BinaryIO:
    with path.open("rb") as probe:
        compressed = probe.read(2) == b"\x1f\x8b"
    if compressed:
        return cast(BinaryIO, gzip.GzipFile(path, "rb"))
    return path.open("rb")


# --- flattening -----------------------------------------------------------------------------------------

@dataclass
class _Row:
    subject: str | None
    encounter: str | None
    time: dt.datetime | None
    values: dict[str, Any]


@dataclass
class _Flattening:
    mapping: FhirMapping
    steps: dict[str, Steps] = field(default_factory=dict)
    patients: dict[str, dict[str, Any]] = field(default_factory=dict)
    encounters: dict[str, dict[str, Any]] = field(default_factory=dict)
    # column -> subject -> [(encounter, time, value)] in file order
    observations: dict[str, dict[str, list[tuple[str | None, dt.datetime | None, Any]]]] = field(
        default_factory=dict)
    rows: list[_Row] = field(default_factory=list)
    # column -> (resources that could hold it, resources where the path held a value)
    coverage: dict[str, list[int]] = field(default_factory=dict)

    def own_columns(self, resource_type: str, *, coded: bool) -> list[str]:
        return [name for name, column in self.mapping.columns.items()
                if column.resource == resource_type and (column.code is not None) == coded]

    def extract(self, resource: dict[str, Any], columns: list[str], line: int) -> dict[str, Any]:
        values = {}
        for name in columns:
            column = self.mapping.columns[name]
            raw = resolve(resource, self.steps[name])
            try:
                values[name] = convert(raw, column.type)
            except ValueError as exc:
                raise Invalid(f"line {line}: {resource['resourceType']}/{resource.get('id', '?')} column "
                              f"{name!r} ({column.path}): {exc}") from exc
            self.coverage[name][0] += 1
            self.coverage[name][1] += values[name] is not None
        return values


def flatten_to_parquet(paths: Sequence[Path], mapping: FhirMapping, target: Path, *, filename: str = "") -> int:
    """Flatten the NDJSON files by `mapping` into a Parquet file at `target`; the number of rows."""
    state = _Flattening(mapping)
    state.steps = {name: parse_path(column.path) for name, column in mapping.columns.items()}
    state.coverage = {name: [0, 0] for name in mapping.columns}
    coded = {name: column.code for name, column in mapping.columns.items() if column.code is not None}
    state.observations = {name: {} for name in coded}
    seen: Counter[str] = Counter()
    for line, resource in read_resources(paths, filename=filename):
        kind = resource["resourceType"]
        seen[kind] += 1
        resource_id = str(resource.get("id", ""))
        if kind == "Patient" and mapping.row != "Patient":
            state.patients[resource_id] = state.extract(resource, state.own_columns("Patient", coded=False), line)
        elif kind == "Encounter" and mapping.row != "Encounter":
            state.encounters[resource_id] = state.extract(
                resource, state.own_columns("Encounter", coded=False), line)
        if kind == "Observation" and coded:
            codes = _codes(resource)
            subject = _reference_id(resource.get("subject"))
            for name, code in coded.items():
                if code in codes and subject is not None:
                    value = state.extract(resource, [name], line)[name]
                    state.observations[name].setdefault(subject, []).append(
                        (_reference_id(resource.get("encounter")), _row_time(resource), value))
        if kind == mapping.row:
            values = state.extract(resource, state.own_columns(kind, coded=False), line)
            subject = resource_id if kind == "Patient" else _reference_id(resource.get("subject"))
            encounter = resource_id if kind == "Encounter" else _reference_id(resource.get("encounter"))
            state.rows.append(_Row(subject, encounter, _row_time(resource), values))
    _check_coverage(state, seen, filename or (paths[0].name if paths else ""))
    return _write_rows(state, target)


def _check_coverage(state: _Flattening, seen: Counter[str], label: str) -> None:
    mapping = state.mapping
    if not seen[mapping.row]:
        raise Invalid(f"{label!r} holds no {mapping.row} resources, which the mapping makes the rows "
                      f"(it holds: {', '.join(f'{n} {k}' for k, n in sorted(seen.items())) or 'nothing'})")
    problems = []
    for name, (candidates, found) in state.coverage.items():
        column = mapping.columns[name]
        if candidates and not found:
            which = f"Observation with code {column.code}" if column.code else column.resource
            problems.append(f"column {name!r}: path {column.path!r} is in no {which} of the file")
    if problems:
        raise Invalid("the FHIR mapping names paths the file does not have", problems)


def _pick_observation(candidates: list[tuple[str | None, dt.datetime | None, Any]], row: _Row) -> Any:
    matching = [c for c in candidates if not (c[0] and row.encounter and c[0] != row.encounter)]
    if not matching:
        return None

    def distance(candidate: tuple[str | None, dt.datetime | None, Any]) -> tuple[int, float]:
        if candidate[1] is None or row.time is None:
            return (1, 0.0)
        return (0, abs((candidate[1] - row.time).total_seconds()))

    return min(matching, key=distance)[2]  # min keeps the first of equals: file order breaks ties


def _write_rows(state: _Flattening, target: Path) -> int:
    mapping = state.mapping
    schema = pa.schema([(name, _ARROW_TYPES[column.type]) for name, column in mapping.columns.items()])
    with pq.ParquetWriter(target, schema, compression="zstd") as writer:
        for start in range(0, len(state.rows), _BATCH_ROWS):
            batch = state.rows[start:start + _BATCH_ROWS]
            columns: dict[str, list[Any]] = {name: [] for name in mapping.columns}
            for row in batch:
                patient = state.patients.get(row.subject or "", {})
                encounter = state.encounters.get(row.encounter or "", {})
                for name, column in mapping.columns.items():
                    if name in row.values:
                        value = row.values[name]
                    elif column.resource == "Patient":
                        value = patient.get(name)
                    elif column.resource == "Encounter":
                        value = encounter.get(name)
                    else:
                        value = _pick_observation(state.observations[name].get(row.subject or "", []), row)
                    columns[name].append(value)
            writer.write_table(pa.table(columns, schema=schema))
    return len(state.rows)


# --- drafting a mapping ------------------------------------------------------------------------------

_CANDIDATES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "Patient": (("patient_id", "id", "string"), ("sex", "gender", "string"), ("birth_date", "birthDate", "date"),
                ("postcode", "address[0].postalCode", "string")),
    "Encounter": (("encounter_id", "id", "string"), ("encounter_class", "class.code", "string"),
                  ("admission", "period.start", "timestamp"), ("discharge", "period.end", "timestamp"),
                  ("site", "serviceProvider.reference", "string")),
    "Procedure": (("procedure_id", "id", "string"), ("procedure_code", "code.coding[0].code", "string"),
                  ("procedure_status", "status", "string"), ("performed", "performedDateTime", "timestamp"),
                  ("performed_start", "performedPeriod.start", "timestamp")),
    "Observation": (("observation_id", "id", "string"), ("observation_code", "code.coding[0].code", "string"),
                    ("value", "valueQuantity.value", "float"), ("unit", "valueQuantity.unit", "string"),
                    ("effective", "effectiveDateTime", "timestamp")),
}
_MAX_OBSERVATION_COLUMNS = 20


def propose_mapping(paths: Sequence[Path], *, filename: str = "") -> FhirMapping:
    """A mapping drafted from the resources present: the common fields each type holds in the file, and
    one column per numeric Observation code when the rows are not Observations."""
    seen: Counter[str] = Counter()
    present: set[tuple[str, str]] = set()
    observation_codes: Counter[str] = Counter()
    displays: dict[str, str] = {}
    subject_refs = False
    parsed = {(kind, path): parse_path(path) for kind, items in _CANDIDATES.items() for _, path, _ in items}
    for _, resource in read_resources(paths, filename=filename):
        kind = resource["resourceType"]
        seen[kind] += 1
        for (candidate_kind, path), steps in parsed.items():
            if candidate_kind == kind and resolve(resource, steps) is not None:
                present.add((kind, path))
        subject_refs = subject_refs or _reference_id(resource.get("subject")) is not None
        if kind == "Observation" and isinstance(resolve(resource, parse_path("valueQuantity.value")), int | float):
            for coding in (resource.get("code") or {}).get("coding") or []:
                if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                    observation_codes[coding["code"]] += 1
                    if isinstance(coding.get("display"), str):
                        displays.setdefault(coding["code"], coding["display"])
                    break
    row = next((kind for kind in ("Procedure", "Encounter", "Observation", "Patient") if seen[kind]), None)
    if row is None:
        raise Invalid("the file holds no FHIR resources to draft a mapping from")
    columns: dict[str, dict[str, Any]] = {}
    for kind in ("Patient", "Encounter", row):
        if kind not in _JOINABLE[row] or not seen[kind]:
            continue
        for name, path, value_type in _CANDIDATES[kind]:
            if (kind, path) in present and name not in columns:
                columns[name] = {"resource": kind, "path": path, "type": value_type}
    if "patient_id" not in columns and row != "Patient" and subject_refs:
        columns["patient_id"] = {"resource": row, "path": "subject.reference", "type": "string"}
    if row != "Observation":
        for code, _ in observation_codes.most_common(_MAX_OBSERVATION_COLUMNS):
            name = _column_name(displays.get(code, ""), code, columns)
            columns[name] = {"resource": "Observation", "code": code, "path": "valueQuantity.value",
                             "type": "float"}
    return FhirMapping.model_validate({"row": row, "columns": columns})


def _column_name(display: str, code: str, taken: dict[str, Any]) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", display.lower()).strip("_")[:50]
    if not slug or not slug[0].isalpha():
        slug = "obs_" + re.sub(r"[^A-Za-z0-9]+", "_", code).strip("_")[:40]
    name, suffix = slug, 2
    while name in taken:
        name, suffix = f"{slug}_{suffix}", suffix + 1
    return name
