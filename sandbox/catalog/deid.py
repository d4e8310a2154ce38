"""The direct-identifier scan of a stored version: names, identity numbers, phones, emails, addresses, record
numbers and dates of birth, per column, with masked examples.

Each column is read by DuckDB first: one pass counts the rows that RE2 prefilters flag as candidates for each
kind, and only the distinct candidate values (at most CANDIDATE_LIMIT per column and kind) reach Python, where the
presidio recognizers of `sandbox.catalog.recognizers` confirm them (checksums, dictionaries, context). Where a
column has more distinct candidates than that, a fixed hash-ordered sample is confirmed and the counts are
scaled from it. The findings go to the steward who owns the data: examples are masked, never a whole value.

DuckDB compiles a constant pattern once per expression, and the name patterns are large (about 4 ms each to
compile): a small upload's scan was mostly compilation, repeated for every column. A table of up to
SMALL_TABLE_ROWS rows is therefore flagged in one query over all its text columns at once: each distinct
(column, value) is matched against every pattern, each compiled once. A larger table is scanned column by
column, where reading the rows costs more than compiling, and one union pattern discards most of them first
(on bench/registration.py's table the one query takes half the time at 200,000 rows, and longer at 500,000).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import cache, cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox import duck
from sandbox.catalog import identifier_patterns
from sandbox.catalog.cards import DatasetCard

if TYPE_CHECKING:
    import duckdb
    from presidio_analyzer import EntityRecognizer

CANDIDATE_LIMIT = 20_000  # distinct candidate values per column confirmed in Python
INTEGER_TYPES = ("BIGINT", "HUGEINT", "UBIGINT", "UHUGEINT")  # 32 bits hold no phone or identity number
LOW_CARDINALITY = 10  # a column with at most 1/10 as many distinct values as rows is scanned value by value
EXAMPLES = 3
# A column whose distinct values are this often bare names is a name column (30%); a column named like one
# needs less (10%), but still its content.
NAME_SHARE = 0.3
NAME_SHARE_WHEN_NAMED = 0.1
# An integer column holding mobile-number-shaped values counts as phones when this share of its distinct values
# look like PRC mobiles (or when it is named like a phone column).
INTEGER_PHONE_SHARE = 0.3
SMALL_TABLE_ROWS = 250_000  # up to this many rows, all text columns are flagged in one query


class IdentifierKind(StrEnum):
    PERSON_NAME = "person_name"
    NATIONAL_ID = "national_id"
    PHONE = "phone"
    EMAIL = "email"
    ADDRESS = "address"
    MEDICAL_RECORD_NUMBER = "medical_record_number"
    DATE_OF_BIRTH = "date_of_birth"


@dataclass(frozen=True)
class IdentifierFinding:
    """Rows of one column holding at least one identifier of one kind, with up to three masked examples."""

    column: str
    kind: IdentifierKind
    count: int
    examples: tuple[str, ...]
    # True when the kind had more distinct candidates than CANDIDATE_LIMIT: the count is scaled from a sample
    # (the column is flagged all the same).
    estimated: bool = False


# Column names that say what a column holds. They lower the content threshold, never replace it.
COLUMN_HINTS: dict[IdentifierKind, re.Pattern[str]] = {
    IdentifierKind.PERSON_NAME: re.compile(
        r"(^|_)(names?|first_?name|last_?name|surname|given_?name|full_?name|patient_?name|family_?name|forename|"
        r"doctor|physician|contact_?person|next_?of_?kin)($|_)|姓名|名字"),
    IdentifierKind.NATIONAL_ID: re.compile(
        r"id_?(number|no|card)|national_?id|resident_?id|identity|ssn|nric|身份证|证件号"),
    IdentifierKind.PHONE: re.compile(r"phone|mobile|(^|_)tel($|_|ephone)|(^|_)cell($|_)|电话|手机|联系方式"),
    IdentifierKind.EMAIL: re.compile(r"e_?mail|邮箱"),
    IdentifierKind.ADDRESS: re.compile(r"address|(^|_)addr($|_)|street|postcode|zip_?code|住址|地址"),
    IdentifierKind.MEDICAL_RECORD_NUMBER: re.compile(
        r"(^|_)mrn($|_)|medical_?record|record_?(number|no)|hospital_?(number|no)|case_?(number|no)|"
        r"病历号|住院号|门诊号|病案号|就诊号"),
    IdentifierKind.DATE_OF_BIRTH: re.compile(r"(^|_)dob($|_)|birth|(^|_)born($|_)|出生|生日"),
}


def hinted_kinds(column: str) -> set[IdentifierKind]:
    """The kinds a column's name suggests."""
    lowered = column.lower()
    return {kind for kind, pattern in COLUMN_HINTS.items() if pattern.search(lowered)}


@dataclass(frozen=True)
class Rule:
    """One way a kind shows in a column: a SQL prefilter over the raw column, and a Python check returning the
    identifiers it confirms in a candidate value. A `bare` rule matches whole values (a name column), and
    counts only where enough of the column's distinct values pass it."""

    kind: IdentifierKind
    sql: str
    check: Callable[[str], list[str]]
    bare: bool = False
    share: float = NAME_SHARE
    pattern: str | None = None  # the RE2 pattern `sql` searches for, where it is one


@dataclass
class _Tally:
    candidate_rows: int = 0
    sampled_candidate_rows: int = 0
    examples: list[str] = field(default_factory=list)


def scan_identifiers(parquet: Path, card: DatasetCard, *, threads: int = 2) -> list[IdentifierFinding]:
    """The direct identifiers in every column of a stored version, privacy unit included.

    Every column of the file is scanned, whatever `card` (the version's card) says of it: a column's stored
    type and name decide which rules apply. Findings come in the file's column order.
    """
    detectors = _detectors()
    findings: list[IdentifierFinding] = []
    with duck.connect(threads=threads) as connection:
        source = f"read_parquet({_literal(str(parquet))})"
        described = connection.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()  # noqa: S608
        scanned = [str(row[0]) for row in described if str(row[1]).upper() in ("VARCHAR", *INTEGER_TYPES)]
        integer_rules = {str(row[0]): detectors.integer_rules(str(row[0])) for row in described
                         if str(row[1]).upper() in INTEGER_TYPES}
        distinct, integer_candidates = _distinct_values(
            connection, source, scanned,
            {column: " OR ".join(f"({rule.sql})" for rule in rules) for column, rules in integer_rules.items()})
        flagged: dict[str, tuple[str, list[Rule]]] | None = None
        if distinct["_rows"] <= SMALL_TABLE_ROWS:
            text = [str(row[0]) for row in described if str(row[1]).upper() == "VARCHAR"]
            flagged = _flag_text_columns(connection, source, text, detectors)
        for row in described:
            column, sql_type = str(row[0]), str(row[1]).upper()
            if sql_type == "VARCHAR" and flagged is not None and _flaggable(column):
                if column in flagged:  # else no value of the column passed any prefilter
                    flag_source, flag_rules = flagged[column]
                    findings.extend(_scan_rules(connection, flag_source, column, flag_rules, distinct[column],
                                                value_sql=_quote(column), weight="_rows"))
            elif sql_type == "VARCHAR":
                rules = detectors.string_rules(column)
                if distinct[column] * LOW_CARDINALITY <= distinct["_rows"]:
                    # Few distinct values (a site, a diagnosis): run the patterns once per value, not per row.
                    grouped = f"(SELECT {_quote(column)}, count(*) AS _rows FROM {source} GROUP BY 1)"  # noqa: S608
                    findings.extend(_scan_rules(connection, grouped, column, rules, distinct[column],
                                                value_sql=_quote(column), weight="_rows"))
                else:
                    findings.extend(_scan_rules(connection, source, column, rules, distinct[column],
                                                value_sql=_quote(column)))
            elif sql_type in INTEGER_TYPES:
                if integer_candidates[column]:  # else no rule has a row to count
                    findings.extend(_scan_rules(connection, source, column, integer_rules[column], distinct[column],
                                                value_sql=f"CAST({_quote(column)} AS VARCHAR)"))
            elif sql_type in ("DATE", "TIMESTAMP", "TIMESTAMP WITH TIME ZONE", "TIMESTAMP_NS", "TIMESTAMP_MS",
                              "TIMESTAMP_S") and IdentifierKind.DATE_OF_BIRTH in hinted_kinds(column):
                findings.extend(_scan_birth_dates(connection, source, column))
    return findings


def _distinct_values(connection: duckdb.DuckDBPyConnection, source: str, columns: list[str],
                     candidates: dict[str, str]) -> tuple[dict[str, int], dict[str, int]]:
    """Approximate distinct values of each column, and the table's rows under the key "_rows"; and the rows
    meeting each condition of `candidates` (column: SQL condition); in one pass."""
    selects = [f"approx_count_distinct({_quote(column)})" for column in columns] + ["count(*)"]
    selects += [f"count(*) FILTER (WHERE {condition})" for condition in candidates.values()]
    row = connection.execute(f"SELECT {', '.join(selects)} FROM {source}").fetchone()  # noqa: S608
    assert row is not None
    distinct = {**{column: int(row[i] or 0) for i, column in enumerate(columns)}, "_rows": int(row[len(columns)] or 0)}
    return distinct, {column: int(row[len(columns) + 1 + i] or 0) for i, column in enumerate(candidates)}


def _flaggable(column: str) -> bool:
    """Whether a text column can go through the one-query prefilter, whose own columns it must not shadow."""
    return column not in ("_rows", "_value", "_column") and not column.startswith("_flag_")


def _flag_text_columns(connection: duckdb.DuckDBPyConnection, source: str, columns: list[str],
                       detectors: _Detectors) -> dict[str, tuple[str, list[Rule]]]:
    """Flag every text column of a small table in one query: each column's distinct values, with their rows
    and one flag per pattern, in the temporary table `_flags`.

    Returns, per column with a flagged value, a source to give `_scan_rules` (the column's flagged values, one
    row per distinct value, its rows in `_rows`) and its rules rewritten to read the flags. A value's flags are
    its rules' own patterns, so the counts, candidates and findings are those of the column-by-column scan.
    """
    columns = [column for column in columns if _flaggable(column)]
    if not columns:
        return {}
    rules_by_column = {column: detectors.string_rules(column) for column in columns}
    patterns: dict[str, str] = {}  # pattern: its flag column
    for rules in rules_by_column.values():
        for rule in rules:
            assert rule.pattern is not None  # every text rule is one pattern
            patterns.setdefault(rule.pattern, f"_flag_{len(patterns)}")
    flags = ", ".join(f"regexp_matches(_value, {_literal(pattern)}) AS {flag}" for pattern, flag in patterns.items())
    listed = ", ".join(_quote(column) for column in columns)
    # No union prefilter here: on one row per distinct value, compiling it costs more than it saves, and a union
    # of every column's patterns outgrows RE2's DFA budget and crawls.
    connection.execute(
        f"CREATE TEMP TABLE _flags AS SELECT _column, _value, _rows, {flags} FROM (SELECT _column, _value, "  # noqa: S608
        f"count(*) AS _rows FROM (UNPIVOT (SELECT {listed} FROM {source}) ON {listed} INTO NAME _column "
        f"VALUE _value) GROUP BY _column, _value)")
    present = {str(row[0]) for row in connection.execute(
        f"SELECT DISTINCT _column FROM _flags WHERE {' OR '.join(patterns.values())}").fetchall()}  # noqa: S608
    flag_list = ", ".join(patterns.values())
    return {
        column: (f"(SELECT _value AS {_quote(column)}, _rows, {flag_list} FROM _flags "  # noqa: S608
                 f"WHERE _column = {_literal(column)})",
                 [replace(rule, sql=patterns[rule.pattern or ""], pattern=None) for rule in rules])
        for column, rules in rules_by_column.items() if column in present
    }


def _scan_rules(connection: duckdb.DuckDBPyConnection, source: str, column: str, rules: Sequence[Rule],
                distinct_values: int, *, value_sql: str, weight: str = "1") -> list[IdentifierFinding]:
    """Prefilter in SQL, confirm the distinct candidates in Python, and tally rows per kind.

    `source` holds the column, one row per table row (`weight` 1) or one per distinct value with its rows in
    the `weight` column. `distinct_values` is the column's number of distinct values.
    """
    if not rules:
        return []
    kinds = list(dict.fromkeys(rule.kind for rule in rules))
    kind_sql = {kind: " OR ".join(f"({rule.sql})" for rule in rules if rule.kind is kind) for kind in kinds}
    quoted = _quote(column)
    if all(rule.pattern for rule in rules):
        # One RE2 automaton for every pattern discards most rows several times faster than each pattern would.
        union = "|".join(f"(?:{rule.pattern})" for rule in rules)
        source = f"(SELECT * FROM {source} WHERE regexp_matches({quoted}, {_literal(union)}))"  # noqa: S608
    # One pass over what is left: candidate rows per kind, and distinct candidates per bare rule.
    selects = [f"sum({weight}) FILTER (WHERE {kind_sql[kind]})" for kind in kinds]
    selects += [f"approx_count_distinct({quoted}) FILTER (WHERE {rule.sql})" for rule in rules if rule.bare]
    first = connection.execute(f"SELECT {', '.join(selects)} FROM {source}").fetchone()  # noqa: S608
    assert first is not None
    tallies = {kind: _Tally(candidate_rows=int(first[i] or 0)) for i, kind in enumerate(kinds)}
    bare_rules = [rule for rule in rules if rule.bare]
    bare_distinct = {id(rule): int(first[len(kinds) + i] or 0) for i, rule in enumerate(bare_rules)}
    distinct_values = max(distinct_values, 1)
    findings = []
    for kind in kinds:
        # Each kind confirms its own candidates up to the limit: a column full of name-like notes must not
        # crowd out the one identity number beside them.
        live = [rule for rule in rules if rule.kind is kind and tallies[kind].candidate_rows]
        if live:
            found = _confirm(connection, source, column, kind, live, tallies[kind], bare_distinct, distinct_values,
                             value_sql=value_sql, weight=weight)
            if found is not None:
                findings.append(found)
    return findings


def _confirm(connection: duckdb.DuckDBPyConnection, source: str, column: str, kind: IdentifierKind,
             live: list[Rule], tally: _Tally, bare_distinct: dict[int, int], distinct_values: int, *,
             value_sql: str, weight: str) -> IdentifierFinding | None:
    """Confirm one kind's distinct candidates in Python (all of them up to CANDIDATE_LIMIT, else a sample)."""
    quoted = _quote(column)
    any_candidate = " OR ".join(f"({rule.sql})" for rule in live)
    if weight == "1":  # one row per table row: flag each distinct candidate once, after grouping
        carried, flags = "", ", ".join(f"({rule.sql}) AS flag_{i}" for i, rule in enumerate(live))
    else:
        # One row per distinct value already, whose rules may read columns beside it (the one-query prefilter's
        # flags): flag it before grouping.
        carried = "".join(f", bool_or({rule.sql}) AS flag_{i}" for i, rule in enumerate(live))
        flags = ", ".join(f"flag_{i}" for i in range(len(live)))
    # The values holding most rows first (a note template repeated 100,000 times is one Python call), then a
    # fixed hash order: past the limit, the last stratum (rows per value) is a uniform sample of its values.
    candidates = connection.execute(
        f"WITH candidates AS (SELECT {quoted}, sum({weight}) AS _rows{carried} FROM {source} "  # noqa: S608
        f"WHERE {any_candidate} GROUP BY 1) SELECT {value_sql} AS _value, _rows, {flags} FROM candidates "
        f"ORDER BY _rows DESC, hash({quoted}), _value "
        f"LIMIT {CANDIDATE_LIMIT + 1}").fetchall()
    truncated = len(candidates) > CANDIDATE_LIMIT
    candidates = candidates[:CANDIDATE_LIMIT]
    last_stratum = candidates[-1][1] if truncated else 0
    # Confirm each candidate once per rule it was flagged for; bare rules wait for their column-level share.
    bare_rules = [rule for rule in live if rule.bare]
    bare_hits: dict[int, list[tuple[str, int, list[str]]]] = {id(rule): [] for rule in bare_rules}
    bare_sampled: dict[int, int] = {id(rule): 0 for rule in bare_rules}
    hit_rows: dict[str, int] = {}
    above_rows = 0  # candidate rows in fully fetched strata
    for value, rows, *flagged in candidates:
        if rows > last_stratum:
            above_rows += rows
        else:
            tally.sampled_candidate_rows += rows
        for rule, flag in zip(live, flagged, strict=True):
            if not flag:
                continue
            hits = rule.check(value)
            if rule.bare:
                bare_sampled[id(rule)] += 1
                if hits:
                    bare_hits[id(rule)].append((value, rows, hits))
            elif hits:
                _record(kind, tally, hit_rows, value, rows, hits)
    for rule in bare_rules:
        confirmed = bare_hits[id(rule)]
        sampled = max(bare_sampled[id(rule)], 1)
        estimated_names = len(confirmed) * max(bare_distinct[id(rule)], sampled) / sampled
        if confirmed and estimated_names / max(distinct_values, 1) >= rule.share:
            for value, rows, hits in confirmed:
                _record(kind, tally, hit_rows, value, rows, hits)
    if not hit_rows:
        return None
    count = float(sum(hit_rows.values()))
    if truncated:
        # Exact above the last stratum; within and below it, the sampled stratum's hit rate.
        exact = sum(rows for rows in hit_rows.values() if rows > last_stratum)
        rest = tally.candidate_rows - above_rows
        count = exact + (count - exact) * rest / max(tally.sampled_candidate_rows, 1)
    return IdentifierFinding(column=column, kind=kind, count=round(count), examples=tuple(tally.examples),
                             estimated=truncated)


def _record(kind: IdentifierKind, tally: _Tally, rows_by_value: dict[str, int], value: str, rows: int,
            hits: list[str]) -> None:
    rows_by_value[value] = rows  # a value's rows count once per kind, whichever rules found it
    for hit in hits:
        masked = MASKS[kind](hit)
        if len(tally.examples) < EXAMPLES and masked not in tally.examples:
            tally.examples.append(masked)


def _scan_birth_dates(connection: duckdb.DuckDBPyConnection, source: str, column: str) -> list[IdentifierFinding]:
    """A date column named like a date of birth: every non-null row is one."""
    quoted = _quote(column)
    row = connection.execute(f"SELECT count({quoted}) FROM {source}").fetchone()  # noqa: S608
    count = int(row[0]) if row else 0
    if not count:
        return []
    years = connection.execute(
        f"SELECT DISTINCT year({quoted}) AS y FROM {source} WHERE {quoted} IS NOT NULL ORDER BY y LIMIT {EXAMPLES}"  # noqa: S608
    ).fetchall()
    examples = tuple(f"{int(y[0]):04d}-**-**" for y in years)
    return [IdentifierFinding(column=column, kind=IdentifierKind.DATE_OF_BIRTH, count=count, examples=examples)]


# --- masks: what a steward may see of a hit -----------------------------------------------------------------

def mask_name(hit: str) -> str:
    """The first character of each word ("张*", "J*** S****"); a Chinese name keeps its first character."""
    if hit and "\u4e00" <= hit[0] <= "\u9fff":
        return hit[0] + "*" * max(len(hit) - 1, 1)
    return re.sub(r"(?<=\w)\w", "*", hit)


def mask_national_id(hit: str) -> str:
    return hit[:4] + "*" * (len(hit) - 8) + hit[-4:]


def mask_phone(hit: str) -> str:
    """The first three and last two digits, separators kept."""
    digits = [i for i, c in enumerate(hit) if c.isdigit()]
    keep = set(digits[:3] + digits[-2:])
    return "".join(c if (i in keep or not c.isdigit()) else "*" for i, c in enumerate(hit))


def mask_email(hit: str) -> str:
    local, _, domain = hit.partition("@")
    return f"{local[:1]}***@{domain}"


def mask_address(hit: str) -> str:
    """Every digit goes; a Chinese address keeps its first three characters, an English one each word's first
    letter ("北京市*****", "** V****** R*")."""
    if hit and "\u4e00" <= hit[0] <= "\u9fff":
        return "".join(c if i < 3 and not c.isdigit() else "*" for i, c in enumerate(hit))
    return re.sub(r"\d|(?<=[A-Za-z])[A-Za-z]", "*", hit)


def mask_record_number(hit: str) -> str:
    return hit[:2] + "*" * max(len(hit) - 2, 1)


def mask_birth_date(hit: str) -> str:
    """The year (a run of four digits) stays; day and month digits go."""
    return re.sub(r"\d+", lambda m: m.group() if len(m.group()) == 4 else "*" * len(m.group()), hit)


MASKS: dict[IdentifierKind, Callable[[str], str]] = {
    IdentifierKind.PERSON_NAME: mask_name,
    IdentifierKind.NATIONAL_ID: mask_national_id,
    IdentifierKind.PHONE: mask_phone,
    IdentifierKind.EMAIL: mask_email,
    IdentifierKind.ADDRESS: mask_address,
    IdentifierKind.MEDICAL_RECORD_NUMBER: mask_record_number,
    IdentifierKind.DATE_OF_BIRTH: mask_birth_date,
}


# --- the rules, built once per process ----------------------------------------------------------------------

# The shapes of US and UK numbers handed to phonenumbers: a + country code, an area code in brackets, 3-3-4
# digits, a 0 trunk prefix and groups, or 10 digits (US) or 11 starting with 0 (UK) written together.
INTERNATIONAL_PHONE_SHAPE = re.compile(r"\+\s?\d|\(\d{3}\)|\d{3}[-.\s]\d{3}[-.\s]\d{4}|"
                                       r"0\d{2,4}[\s-]\d{3,4}[\s-]?\d{3,4}|(?<!\d)0?\d{10}(?!\d)")


class _Detectors:
    """The recognizers and their SQL prefilters. Building them imports presidio (seconds), hence once."""

    def __init__(self) -> None:
        r = identifier_patterns  # the prefilters need no presidio: a scan with no candidate never imports it
        self.r = r
        surname, first, last = r.surname_alternation(), r.first_name_alternation(), r.surname_latin_alternation()
        latin_word = r.LATIN_WORD
        # RE2 prefilters: looser than the recognizers (no lookaround in RE2), never stricter.
        self.prefilters: dict[IdentifierKind, str] = {
            IdentifierKind.NATIONAL_ID: r"[1-9][0-9]{14}",
            IdentifierKind.PHONE: r"1[3-9][0-9][\s-]?[0-9]{4}[\s-]?[0-9]{4}|0[0-9]{2,3}\)?[\s-]?[0-9]{7,8}|"
                                  r"\+[0-9]|[0-9]{3}\)?[\s.-]?[0-9]{3,4}[\s.-]?[0-9]{4}|0[0-9]{2,4}[\s)-]+[0-9]{3,8}",
            IdentifierKind.EMAIL: r"[A-Za-z0-9._%+-]@[A-Za-z0-9-]+\.",
            IdentifierKind.ADDRESS: r"(路|街|大道|巷|胡同|弄)[0-9]{1,5}(号|弄)|(小区|花园|公寓|新村|大厦)[0-9]|"
                                    rf"[0-9]{{1,5}}[A-Za-z]?\s+([A-Z][a-z]+\.?\s+){{1,3}}{r.STREET_TYPES}\b|"
                                    r"\b[A-Z]{1,2}[0-9][A-Z0-9]?\s+[0-9][A-Z]{2}\b|\b[A-Z]{2}\s+[0-9]{5}\b",
            IdentifierKind.MEDICAL_RECORD_NUMBER: r"(?i:mrn|m\.r\.n|medical record|hospital n|case n)|病历号|住院号|"
                                                  r"门诊号|病案号|就诊号",
            IdentifierKind.DATE_OF_BIRTH: r"(?i:dob|d\.o\.b|birth|born)|出生|生日|生于",
            IdentifierKind.PERSON_NAME: (
                rf"(?:{r.CN_CONTEXT})[{r.COLON}\s]{{0,3}}{surname}|{surname}\p{{Han}}{{0,2}}(?:{r.CN_TITLE})|"
                r"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof)\.?\s+[A-Z]|"
                rf"(?i:patient|name|contact|next of kin|nok|signed|guardian)\s*[{r.COLON}]?\s+[A-Z]|"
                rf"\b{first}\s+[A-Z]|\b{last},\s*[A-Z]"),
        }
        self.bare_name = (rf"\s*{surname}\p{{Han}}{{1,2}}\s*|\s*{first}\s+(?:[A-Z]\.\s+)?{latin_word}\s*|"
                          rf"\s*{last},\s*{first}\s*")
        self.bare_single_name = rf"\s*(?:{first}|{last})\s*"
        self.bare_date = rf"\s*{r.DATE}\s*"
        self.bare_record_number = rf"\s*{r.MRN_ID}\s*"

    @cached_property
    def by_kind(self) -> dict[IdentifierKind, list[EntityRecognizer]]:
        """The presidio recognizers, built (and presidio imported, with spaCy: seconds) on the first candidate."""
        from sandbox.catalog import recognizers as r

        return {
            IdentifierKind.PERSON_NAME: [r.ChineseNameRecognizer(), r.LatinNameRecognizer()],
            IdentifierKind.NATIONAL_ID: [r.PrcResidentIdRecognizer()],
            IdentifierKind.PHONE: [r.PrcPhoneRecognizer(), self.international_phone],
            IdentifierKind.EMAIL: [r.OfflineEmailRecognizer()],
            IdentifierKind.ADDRESS: [r.AddressRecognizer()],
            IdentifierKind.MEDICAL_RECORD_NUMBER: [r.MedicalRecordNumberRecognizer()],
            IdentifierKind.DATE_OF_BIRTH: [r.DateOfBirthRecognizer()],
        }

    @cached_property
    def international_phone(self) -> EntityRecognizer:
        from sandbox.catalog import recognizers as r

        return r.international_phone_recognizer()

    def finder(self, kind: IdentifierKind) -> Callable[[str], list[str]]:
        def find(value: str) -> list[str]:
            hits = []
            for recognizer in self.by_kind[kind]:
                if recognizer is self.international_phone and not INTERNATIONAL_PHONE_SHAPE.search(value):
                    continue  # phonenumbers costs about a millisecond a call: only where a number could be one
                # No NLP artifacts: these recognizers read the text alone (presidio types the argument as required).
                for result in recognizer.analyze(value, recognizer.supported_entities, None):  # type: ignore[arg-type]
                    hits.append(value[result.start:result.end])
            return hits
        return find

    def string_rules(self, column: str) -> list[Rule]:
        hints = hinted_kinds(column)
        rules = [self._search(column, kind, pattern, self.finder(kind)) for kind, pattern in self.prefilters.items()]
        named = IdentifierKind.PERSON_NAME in hints
        bare_name = self.bare_name + (f"|{self.bare_single_name}" if named else "")
        rules.append(self._search(column, IdentifierKind.PERSON_NAME, f"^(?:{bare_name})$",
                                  self._bare(lambda v: self.r.is_bare_name(v, single_word=named)), bare=True,
                                  share=NAME_SHARE_WHEN_NAMED if named else NAME_SHARE))
        if IdentifierKind.MEDICAL_RECORD_NUMBER in hints:
            rules.append(self._search(column, IdentifierKind.MEDICAL_RECORD_NUMBER, f"^(?:{self.bare_record_number})$",
                                      self._bare(self.r.is_bare_record_number), bare=True,
                                      share=NAME_SHARE_WHEN_NAMED))
        if IdentifierKind.DATE_OF_BIRTH in hints:
            rules.append(self._search(column, IdentifierKind.DATE_OF_BIRTH, f"^(?:{self.bare_date})$",
                                      self._bare(self.r.is_bare_date), bare=True, share=NAME_SHARE_WHEN_NAMED))
        return rules

    @staticmethod
    def _search(column: str, kind: IdentifierKind, pattern: str, check: Callable[[str], list[str]], *,
                bare: bool = False, share: float = NAME_SHARE) -> Rule:
        return Rule(kind, f"regexp_matches({_quote(column)}, {_literal(pattern)})", check, bare=bare, share=share,
                    pattern=pattern)

    def integer_rules(self, column: str) -> list[Rule]:
        quoted = _quote(column)
        named_phone = IdentifierKind.PHONE in hinted_kinds(column)
        rules = [Rule(IdentifierKind.PHONE, f"{quoted} BETWEEN 13000000000 AND 19999999999",
                      self.finder(IdentifierKind.PHONE), bare=True,
                      share=NAME_SHARE_WHEN_NAMED if named_phone else INTEGER_PHONE_SHARE),
                 Rule(IdentifierKind.NATIONAL_ID, f"{quoted} BETWEEN 100000000000000 AND 999999999999999999",
                      self.finder(IdentifierKind.NATIONAL_ID))]
        return rules

    @staticmethod
    def _bare(accept: Callable[[str], bool]) -> Callable[[str], list[str]]:
        return lambda value: [value.strip()] if accept(value) else []


@cache
def _detectors() -> _Detectors:
    return _Detectors()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def finding_json(finding: IdentifierFinding) -> dict[str, Any]:
    """A finding as the report stores it."""
    return {"column": finding.column, "kind": finding.kind.value, "count": finding.count,
            "examples": list(finding.examples), **({"estimated": True} if finding.estimated else {})}
