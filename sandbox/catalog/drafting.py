"""Draft a dataset card from an uploaded file (and an optional data dictionary) for the steward to review.

The draft is only returned: types come from the data, bounds and categories are proposed from it and are
all private (`public: false`), the privacy unit and quasi-identifiers are guessed from names and
uniqueness. Column statistics are computed in DuckDB; Python touches only the few low-cardinality values.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import duckdb
from pydantic import ValidationError

from sandbox import duck
from sandbox.catalog.cards import NAME_PATTERN, ColumnType, DatasetCard, card_errors, is_reserved_column
from sandbox.catalog.fhir import FhirMapping, propose_mapping
from sandbox.catalog.formats import DOUBLE_NUMERIC_FORMATS, ReadableTable, SourceFormat, detect_format, readable_table
from sandbox.catalog.ingest import quote_identifier, renamed
from sandbox.errors import Invalid

MAX_CATEGORIES = 30
# A category seen fewer times than this is itself a rare value, so the column is not offered as categorical.
MIN_CATEGORY_COUNT = 5
CARD_COLUMN_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
MAX_QUASI_IDENTIFIERS = 20

_UNIT_NAMES = re.compile(
    r"^(?:(?:patient|subject|person|participant|pat|case)_?(?:id|no|number|key)|pid|mrn)$"
    r"|^(?:患者|病人|病例|受试者)(?:id|编号|号)$|^(?:病案号|住院号)$",
    re.IGNORECASE,
)
_QUASI_TOKENS = frozenset({"age", "sex", "gender", "site", "hospital", "centre", "center", "zip", "zipcode",
                           "postcode", "postal", "ethnicity", "ethnic", "race", "dob", "birthdate", "ward",
                           "region", "district", "county"})
_QUASI_DATE_TOKENS = frozenset({"admission", "admitted", "admit", "procedure", "birth", "surgery", "operation",
                                "discharge", "performed", "visit", "death"})
_QUASI_CHINESE = ("年龄", "性别", "医院", "出生", "民族", "邮编", "科室", "入院", "手术")
# Integer columns named like measurements get bounds even when they have few distinct values.
_MEASURE_TOKENS = frozenset({"age", "year", "years", "weight", "height", "days", "bmi", "score", "dose", "count"})

_DUCK_TYPES: tuple[tuple[tuple[str, ...], ColumnType], ...] = (
    (("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"),
     ColumnType.INTEGER),
    (("FLOAT", "DOUBLE", "DECIMAL", "REAL"), ColumnType.FLOAT),
    (("BOOLEAN",), ColumnType.BOOLEAN),
    (("VARCHAR",), ColumnType.STRING),
    (("DATE",), ColumnType.DATE),
    (("TIMESTAMP",), ColumnType.TIMESTAMP),
)
_DICTIONARY_HEADERS = {
    "column": ("column", "column name", "variable", "variable name", "field", "name"),
    "label": ("label", "description", "variable label"),
    "unit": ("unit", "units"),
    "allowed": ("allowed values", "allowed", "values", "domain", "range", "codes"),
}
_RANGE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(?:\.\.|-|\u2013|~|to)\s*(-?\d+(?:\.\d+)?)\s*$")


@dataclass
class _Profile:
    """What DuckDB found about one column."""

    duck_type: str
    column_type: ColumnType | None
    non_null: int = 0
    approx_distinct: int = 0
    minimum: Any = None
    maximum: Any = None
    whole: bool = False
    counts: dict[Any, int] | None = None  # exact value counts, for low-cardinality columns only


@dataclass
class _Draft:
    rows: int
    profiles: dict[str, _Profile]
    columns: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rename: dict[str, str] = field(default_factory=dict)  # the file's header -> the card's column name


def draft_card(upload: Path, filename: str, *, name: str, dictionary: Path | None = None,
               dictionary_filename: str = "", fhir_mapping: dict[str, Any] | None = None,
               workdir: Path) -> dict[str, Any]:
    """`{"card", "fhir_mapping", "notes"}`: a card drafted from the file that passes `card_errors`, the
    FHIR mapping used or proposed (None for tables), and what the steward should check."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise Invalid(f"dataset name {name!r}: lowercase letters, digits, - and _, starting with a letter")
    mapping = _fhir_mapping(upload, filename, fhir_mapping)
    connection = duck.connect(threads=2)
    try:
        with readable_table(upload, filename, workdir=workdir, fhir_mapping=mapping) as table:
            draft = _profile(connection, table, workdir)
            if draft.rows == 0:
                raise Invalid(f"{filename!r} has no rows to draft a card from")
            card = _card(connection, table, draft, name=name, filename=filename)
            if dictionary is not None:
                entries = read_dictionary(connection, dictionary, dictionary_filename or dictionary.name,
                                          workdir=workdir)
                _apply_dictionary(connection, table, draft, card, entries)
    finally:
        connection.close()
    if mapping is not None:
        card["fhir_mapping"] = mapping.model_dump(mode="json", exclude_none=True)
        if fhir_mapping is None:
            draft.notes.append("The FHIR mapping was proposed from the resources in the file: review which "
                               "resource and path feed each column before accepting it.")
    draft.notes.append("Every proposed bound and category is private (public: false): they are shown to the "
                       "steward only, and become public metadata only if the steward marks them public.")
    errors = card_errors(DatasetCard.model_validate(card))
    if errors:  # a bug in the drafting rules, not the steward's doing; say what it is rather than hand it over
        raise Invalid("the drafted card is not valid", errors)
    return {"card": card, "fhir_mapping": card.get("fhir_mapping"), "notes": draft.notes}


def _fhir_mapping(upload: Path, filename: str, given: dict[str, Any] | None) -> FhirMapping | None:
    if detect_format(upload, filename) is not SourceFormat.FHIR:
        return None
    if given is None:
        return propose_mapping([upload], filename=filename)
    try:
        return FhirMapping.model_validate(given)
    except ValidationError as exc:
        raise Invalid("the FHIR mapping is not valid",
                      [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from exc


# --- profiling ----------------------------------------------------------------------------------------

def card_names(headers: list[str]) -> dict[str, str]:
    """Card column names for the headers a card cannot declare (Chinese ones become pinyin: 患者ID ->
    huan_zhe_id), unique and clear of the headers kept as they are."""
    from pypinyin import lazy_pinyin

    taken = {h.lower() for h in headers if CARD_COLUMN_PATTERN.fullmatch(h) and not is_reserved_column(h)}
    rename = {}
    for index, header in enumerate(headers, start=1):
        if CARD_COLUMN_PATTERN.fullmatch(header) and not is_reserved_column(header):
            continue
        words = re.sub(r"[^a-z0-9]+", "_", "_".join(lazy_pinyin(header)).lower()).strip("_")
        base = (words if words and not words[0].isdigit() else f"column_{index}_{words}".rstrip("_"))[:56]
        candidate, suffix = base, 2
        while candidate in taken:
            candidate, suffix = f"{base}_{suffix}", suffix + 1
        taken.add(candidate)
        rename[header] = candidate
    return rename


def _column_type(duck_type: str) -> ColumnType | None:
    upper = duck_type.upper()
    return next((column_type for prefixes, column_type in _DUCK_TYPES if upper.startswith(prefixes)), None)


def _profile(connection: duckdb.DuckDBPyConnection, table: ReadableTable, workdir: Path) -> _Draft:
    try:
        if table.source_format is SourceFormat.CSV:
            # Profiling reads the table several times: CSV is parsed once, into columnar Parquet, first.
            parquet = workdir / f".draft-{uuid.uuid4().hex}.parquet"
            connection.execute(f"COPY (SELECT * FROM {table.sql}) TO $target (FORMAT parquet)",  # noqa: S608
                               {**table.params, "target": str(parquet)})
            table.temporary.append(parquet)
            source = f"read_parquet({_literal(parquet)})"
        else:
            # A view cannot take parameters: the path (ours, never the uploader's name) goes in as a literal.
            source = table.sql.replace("$path", _literal(table.path))
        headers = [str(row[0]) for row in connection.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()]  # noqa: S608
        rename = card_names(headers)
        connection.execute(f"CREATE TEMP VIEW upload AS SELECT * FROM {renamed(source, rename) if rename else source}")  # noqa: S608
        described = connection.execute("DESCRIBE SELECT * FROM upload").fetchall()
    except duckdb.Error as exc:
        raise Invalid(f"could not read the file: {str(exc).strip().splitlines()[0][:300]}") from exc
    profiles = {str(row[0]): _Profile(str(row[1]), _column_type(str(row[1]))) for row in described}
    aggregates = ["count(*)"]
    for column, profile in profiles.items():
        quoted = _quote(column)
        aggregates += [f"count({quoted})", f"approx_count_distinct({quoted})"]
        if profile.column_type in (ColumnType.INTEGER, ColumnType.FLOAT):
            aggregates += [f"min({quoted})::DOUBLE", f"max({quoted})::DOUBLE"]
        if profile.column_type is ColumnType.FLOAT:
            aggregates.append(f"bool_and({quoted} = trunc({quoted}) AND abs({quoted}) < 9.0e15)")
    # One pass over the table for every column's statistics.
    values = connection.execute(f"SELECT {', '.join(aggregates)} FROM upload").fetchone() or ()  # noqa: S608
    position = 1
    for profile in profiles.values():
        profile.non_null, profile.approx_distinct = int(values[position]), int(values[position + 1])
        position += 2
        if profile.column_type in (ColumnType.INTEGER, ColumnType.FLOAT):
            profile.minimum, profile.maximum = values[position], values[position + 1]
            position += 2
        if profile.column_type is ColumnType.FLOAT:
            profile.whole = bool(values[position])
            position += 1
    # HyperLogLog errs by a few percent: exact counts are taken for every column near the limit, all in one
    # pass over the table (one grouping set per column).
    low = [column for column, profile in profiles.items()
           if profile.column_type is not None and 0 < profile.approx_distinct <= MAX_CATEGORIES * 2]
    if low:
        names = [_quote(column) for column in low]
        counted = connection.execute(
            f"SELECT {', '.join(names)}, {', '.join(f'grouping({q})' for q in names)}, count(*) "  # noqa: S608
            f"FROM upload GROUP BY GROUPING SETS ({', '.join(f'({q})' for q in names)})").fetchall()
        for column in low:
            profiles[column].counts = {}
        for row in counted:
            # grouping(column) is 0 for the set that groups by that column.
            index = next(i for i in range(len(low)) if row[len(low) + i] == 0)
            if row[index] is not None:
                counts = profiles[low[index]].counts
                assert counts is not None
                counts[row[index]] = int(row[-1])
    draft = _Draft(rows=int(values[0]) if values else 0, profiles=profiles, rename=rename)
    for header, column in rename.items():
        draft.notes.append(f"file column {header!r} is read as {column!r} (card column names are ASCII letters, "
                           "digits and _): see rename")
    return draft


def _literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


_quote = quote_identifier


# --- the card -------------------------------------------------------------------------------------------

def _card(connection: duckdb.DuckDBPyConnection, table: ReadableTable, draft: _Draft, *, name: str,
          filename: str) -> dict[str, Any]:
    drop: list[str] = []
    for column, profile in draft.profiles.items():
        if not CARD_COLUMN_PATTERN.fullmatch(column) or is_reserved_column(column):
            drop.append(column)
            draft.notes.append(f"column {column!r} cannot be declared (card column names are ASCII letters, digits "
                               "and _, not starting with _): it is listed in drop_columns; rename it in the "
                               "export to keep it")
        elif profile.column_type is None:
            drop.append(column)
            draft.notes.append(f"column {column!r} has type {profile.duck_type}, which a card cannot declare: it "
                               "is listed in drop_columns")
        else:
            draft.columns[column] = _column_spec(column, profile, table, draft)
    if not draft.columns:
        raise Invalid("no column of the file can be declared on a card", draft.notes)
    unit, unique = _privacy_unit(connection, draft)
    spec = draft.columns[unit]
    spec.pop("bounds", None)
    spec.pop("categories", None)
    quasi = [c for c in draft.columns if c != unit and _is_quasi_identifier(c, draft.profiles[c])]
    if len(quasi) > MAX_QUASI_IDENTIFIERS:
        draft.notes.append(f"{len(quasi)} columns look like quasi-identifiers; the first "
                           f"{MAX_QUASI_IDENTIFIERS} are proposed")
        quasi = quasi[:MAX_QUASI_IDENTIFIERS]
    if quasi:
        draft.notes.append(f"quasi-identifiers guessed from column names: {', '.join(quasi)}; add any other "
                           "column that could single a patient out together with these")
    card: dict[str, Any] = {
        "name": name,
        "title": f"Draft from {filename}"[:200] if filename else name,
        "privacy_unit": unit,
        "privacy_unit_rows": "one" if unique else "many",
        "columns": draft.columns,
        "quasi_identifiers": quasi,
        "drop_columns": drop,
    }
    if draft.rename:
        card["rename"] = dict(draft.rename)
        for header, column in draft.rename.items():
            if column in draft.columns and not draft.columns[column].get("description"):
                draft.columns[column]["description"] = header[:2000]
    return card


def _column_spec(column: str, profile: _Profile, table: ReadableTable, draft: _Draft) -> dict[str, Any]:
    assert profile.column_type is not None
    column_type = profile.column_type
    if column_type is ColumnType.FLOAT and profile.whole and table.source_format in DOUBLE_NUMERIC_FORMATS:
        # SPSS, Stata and SAS store integers as doubles; whole values are proposed as integers.
        column_type = ColumnType.INTEGER
    spec: dict[str, Any] = {"type": column_type.value, "public": False}
    description = table.column_labels.get(column, "")
    labels = table.value_labels.get(column)
    if labels:
        shown = ", ".join(f"{_plain(code)}={label}" for code, label in list(labels.items())[:50])
        description = f"{description}; codes: {shown}" if description else f"codes: {shown}"
    if description:
        spec["description"] = description[:2000]
    counts = profile.counts
    low_cardinality = (counts is not None and 0 < len(counts) <= MAX_CATEGORIES
                       and min(counts.values()) >= MIN_CATEGORY_COUNT)
    measured = bool(_tokens(column) & _MEASURE_TOKENS)
    if column_type is ColumnType.STRING and low_cardinality and counts is not None:
        spec["categories"] = sorted(str(value) for value in counts)
    elif column_type is ColumnType.INTEGER and counts is not None and (labels or (low_cardinality and not measured)):
        codes = {int(value) for value in counts} | ({int(code) for code in labels if _is_whole(code)} if labels
                                                     else set())
        spec["categories"] = sorted(codes)
    elif column_type in (ColumnType.INTEGER, ColumnType.FLOAT) and profile.minimum is not None:
        lower, upper = nice_bounds(float(profile.minimum), float(profile.maximum))
        spec["bounds"] = [lower, upper]
    return spec


def _plain(code: Any) -> str:
    return str(int(code)) if _is_whole(code) else str(code)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()


def nice_bounds(minimum: float, maximum: float) -> tuple[float, float]:
    """`minimum` and `maximum` rounded outward to a round step of the range's magnitude: 18..94 is 10..100."""
    spread = maximum - minimum
    reference = spread if spread > 0 else max(abs(minimum), abs(maximum), 1.0)
    step = 10.0 ** math.floor(math.log10(reference))
    lower = math.floor(minimum / step) * step
    upper = math.ceil(maximum / step) * step
    if upper <= lower:
        upper = lower + step
    return _tidy(lower), _tidy(upper)


def _tidy(value: float) -> float:
    return float(round(value, 12))


def _privacy_unit(connection: duckdb.DuckDBPyConnection, draft: _Draft) -> tuple[str, bool]:
    named = [c for c in draft.columns if _UNIT_NAMES.fullmatch(c)]
    if named:
        return named[0], _unique(connection, named[0], draft)
    # Identifiers are strings or integers, never a quasi-identifier that happens to be unique in a small file.
    candidates = [c for kind in (ColumnType.STRING, ColumnType.INTEGER) for c, p in draft.profiles.items()
                  if c in draft.columns and p.column_type is kind and not _is_quasi_identifier(c, p)]
    for column in candidates:
        profile = draft.profiles[column]
        # The sketch prefilters; only a column near one distinct value per row is counted exactly.
        near_unique = profile.non_null == draft.rows and profile.approx_distinct >= 0.9 * draft.rows
        if near_unique and _unique(connection, column, draft):
            draft.notes.append(f"privacy_unit: no column is named like a patient id; {column!r} is the first "
                               "column unique per row; check that it identifies a patient")
            return column, True
    first = next(iter(draft.columns))
    draft.notes.append(f"privacy_unit: no column is named like a patient id or unique per row; {first!r} is a "
                       "placeholder that the steward must replace with the column identifying a patient")
    return first, False


def _unique(connection: duckdb.DuckDBPyConnection, column: str, draft: _Draft) -> bool:
    quoted = _quote(column)
    row = connection.execute(
        f"SELECT count(DISTINCT {quoted}) = count(*) AND count({quoted}) = count(*) FROM upload"  # noqa: S608
    ).fetchone()
    return bool(row and row[0]) and draft.rows > 0


def _tokens(column: str) -> set[str]:
    return {token for token in re.split(r"[^a-z0-9]+|(?<=[a-z])(?=[0-9])", column.lower()) if token}


def _is_quasi_identifier(column: str, profile: _Profile) -> bool:
    tokens = _tokens(column)
    if tokens & _QUASI_TOKENS or any(word in column for word in _QUASI_CHINESE):
        return True
    is_date = profile.column_type in (ColumnType.DATE, ColumnType.TIMESTAMP)
    return is_date and bool(tokens & _QUASI_DATE_TOKENS)


# --- the data dictionary ------------------------------------------------------------------------------

@dataclass
class DictionaryEntry:
    column: str
    label: str = ""
    unit: str = ""
    allowed: str = ""


def read_dictionary(connection: duckdb.DuckDBPyConnection, path: Path, filename: str, *,
                    workdir: Path) -> list[DictionaryEntry]:
    """The rows of a data dictionary (CSV or Excel with columns column, label, unit, allowed values)."""
    with readable_table(path, filename, workdir=workdir) as table:
        if table.source_format not in (SourceFormat.CSV, SourceFormat.EXCEL, SourceFormat.PARQUET):
            raise Invalid(f"the data dictionary {filename!r} must be a CSV or Excel file")
        source = table.sql.replace("sample_size = -1", "sample_size = -1, all_varchar = true")
        try:
            described = connection.execute(f"DESCRIBE SELECT * FROM {source}", table.params).fetchall()  # noqa: S608
            headers = [str(row[0]) for row in described]
            select = ", ".join(f"CAST({_quote(h)} AS VARCHAR)" for h in headers)
            rows = connection.execute(f"SELECT {select} FROM {source}", table.params).fetchall()  # noqa: S608
        except duckdb.Error as exc:
            raise Invalid(f"could not read the data dictionary {filename!r}: {str(exc).splitlines()[0][:200]}") from exc
    positions: dict[str, int] = {}
    for index, header in enumerate(headers):
        normal = " ".join(re.sub(r"[^a-z]+", " ", header.lower()).split())
        for key, names in _DICTIONARY_HEADERS.items():
            if normal in names and key not in positions:
                positions[key] = index
    if "column" not in positions:
        raise Invalid(f"the data dictionary {filename!r} needs a 'column' header (found: {', '.join(headers)})")
    entries = []
    for row in rows:
        values = {key: (row[index] or "").strip() for key, index in positions.items()}
        if values["column"]:
            entries.append(DictionaryEntry(values["column"], values.get("label", ""), values.get("unit", ""),
                                           values.get("allowed", "")))
    return entries


def _apply_dictionary(connection: duckdb.DuckDBPyConnection, table: ReadableTable, draft: _Draft,
                      card: dict[str, Any], entries: list[DictionaryEntry]) -> None:
    columns: dict[str, dict[str, Any]] = card["columns"]
    for entry in entries:
        # A dictionary names columns by the export's headers; the card may read them under other names.
        entry = replace(entry, column=card.get("rename", {}).get(entry.column, entry.column))
        spec = columns.get(entry.column)
        if spec is None:
            where = "is dropped" if entry.column in card["drop_columns"] else "is not in the file"
            draft.notes.append(f"data dictionary: column {entry.column!r} {where}; its row was not used")
            continue
        description = entry.label + (f" ({entry.unit})" if entry.unit else "")
        if description:
            labels = spec.get("description", "")
            spec["description"] = (description + ("; " + labels if labels.startswith("codes:") else ""))[:2000]
        if entry.allowed:
            _apply_allowed(connection, draft, card, entry)


def _apply_allowed(connection: duckdb.DuckDBPyConnection, draft: _Draft, card: dict[str, Any],
                   entry: DictionaryEntry) -> None:
    column = entry.column
    spec: dict[str, Any] = card["columns"][column]
    column_type = ColumnType(spec["type"])
    if column == card["privacy_unit"]:
        draft.notes.append(f"data dictionary: {column!r} is the privacy unit, which takes no allowed values")
        return
    found = _RANGE.fullmatch(entry.allowed)
    if found and column_type in (ColumnType.INTEGER, ColumnType.FLOAT):
        lower, upper = float(found.group(1)), float(found.group(2))
        if lower < upper:
            spec.pop("categories", None)
            spec["bounds"] = [lower, upper]
        else:
            draft.notes.append(f"data dictionary: {column!r} range {entry.allowed!r} is empty; not used")
        return
    if column_type not in (ColumnType.INTEGER, ColumnType.STRING, ColumnType.BOOLEAN):
        draft.notes.append(f"data dictionary: {column!r} is {column_type.value}; its allowed values "
                           f"{entry.allowed!r} were not applied (ranges a-b apply to numbers)")
        return
    categories: list[Any] = []
    code_labels = []
    for item in re.split(r"[;|]", entry.allowed):
        text, _, label = item.strip().partition("=")
        text = text.strip()
        if not text:
            continue
        try:
            value = _typed(text, column_type)
        except ValueError:
            draft.notes.append(f"data dictionary: {column!r} allowed value {text!r} is not a "
                               f"{column_type.value}; not used")
            continue
        if value not in categories:
            categories.append(value)
        if label.strip():
            code_labels.append(f"{text}={label.strip()}")
    if not categories:
        return
    spec.pop("bounds", None)
    spec["categories"] = categories
    if code_labels:
        codes = "codes: " + ", ".join(code_labels)
        spec["description"] = (f"{spec['description']}; {codes}" if spec.get("description") else codes)[:2000]
    outside = connection.execute(
        f"SELECT {_quote(column)}::VARCHAR, count(*) FROM upload WHERE {_quote(column)} IS NOT NULL "  # noqa: S608
        f"AND NOT list_contains($cats, {_quote(column)}::VARCHAR) GROUP BY 1 ORDER BY 2 DESC LIMIT 5",
        {"cats": [str(c).lower() if isinstance(c, bool) else str(c) for c in categories]},
    ).fetchall()
    if outside:
        shown = ", ".join(f"{value!r} ({count} rows)" for value, count in outside)
        draft.notes.append(f"column {column!r} holds values outside the dictionary's allowed values: {shown}; "
                           "the ingest refuses the file until the card or the file is corrected")


def _typed(text: str, column_type: ColumnType) -> Any:
    if column_type is ColumnType.INTEGER:
        number = float(text)
        if not number.is_integer():
            raise ValueError(text)
        return int(number)
    if column_type is ColumnType.BOOLEAN:
        lowered = text.lower()
        if lowered in ("true", "yes", "1", "t", "y"):
            return True
        if lowered in ("false", "no", "0", "f", "n"):
            return False
        raise ValueError(text)
    return text
