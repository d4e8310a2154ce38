"""Statistical disclosure control for table outputs: cell counts, zeros, rounding, dominance, p%, residual df.

Thresholds come from the policy's `egress.sdc`; the defaults mirror ACRO's (minimum cell count 10,
(n, k) dominance with n=2 and k=0.9, p-ratio 0.1, residual degrees of freedom 10), rounding follows
OpenSAFELY (small counts redacted, the rest rounded to a base), and the plausibility check borrows
DataSHIELD's idea of refusing what cannot be an aggregate of this dataset.

Verify rather than trust: the in-image helper `sandbox_client.tables` writes each table with a
sidecar `<path>.sdc.json` saying how it was made (grouping columns, value column, aggregate,
filters). That sidecar is a claim. The checker recomputes every cell from the pinned dataset
version with DuckDB, blocks a table whose numbers differ from the recomputation, and applies the
rules to the recomputed counts and contributions, never to the buyer's. Where a card names a
privacy unit (a patient with several procedures), counts and contributions are per unit.
A table without a usable sidecar is treated conservatively: integer-looking cells are checked as
counts, anything else goes to a steward.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from sandbox import duck
from sandbox.egress.baseline import CheckResult, Verdict

SIDECAR_SUFFIX = ".sdc.json"
AGGREGATES = ("count", "sum", "mean")
FILTER_OPERATORS = {"==": "=", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">=", "in": "IN"}
# Published cells holding one of these are suppressed: they disclose nothing to recompute.
SUPPRESSION_MARKER = re.compile(r"^\s*(|na|n/a|nan|null|none|-|\*+|\[?redacted\]?|suppressed|c|<\s*\d+)\s*$",
                                re.IGNORECASE)
# Columns a frequency table may carry as row labels even when they are numeric.
INDEX_COLUMN_NAMES = {"", "index", "unnamed: 0"}
# Counts from one dataset: a 2-D crosstab with both margins and a grand total sums to 4N at most.
PLAUSIBLE_COUNT_FACTOR = 4
CELLS_NAMED_IN_REASON = 5


@dataclass(frozen=True)
class TableFacts:
    """One table output as the checks see it."""

    path: str
    frame: pa.Table  # parsed content
    provenance: dict[str, Any] | None  # the sidecar the in-image helper wrote: a claim to verify


@dataclass(frozen=True)
class Filter:
    column: str
    op: str
    value: Any


@dataclass(frozen=True)
class TableProvenance:
    """How a table says it was made."""

    index: tuple[str, ...]
    columns: tuple[str, ...]
    values: str | None
    aggfunc: str
    filters: tuple[Filter, ...]
    layout: str  # "wide": index columns, then one column per column-variable combination; "long": one value column
    value_column: str | None
    separator: str


@dataclass(frozen=True)
class RegressionProvenance:
    """What a regression summary says about the fit behind it."""

    df_resid: float
    nobs: float
    params: tuple[str, ...]
    data_columns: tuple[str, ...]  # rows with a null in any of these were dropped before fitting
    filters: tuple[Filter, ...]


@dataclass(frozen=True)
class Cell:
    """One published cell: its labels, normalised for matching, and the number printed in it."""

    key: tuple[str, ...]
    label: str
    value: float | None  # None: suppressed or blank


@dataclass(frozen=True)
class CellStats:
    """One cell recomputed from the dataset."""

    rows: int
    contributors: int  # distinct privacy units (or rows, without one) in the cell
    value_rows: int  # rows with a non-null value
    value_contributors: int  # units with a non-null value
    total: float | None
    top: tuple[float, ...]  # the largest per-unit contributions, descending
    negatives: int

    def published(self, aggfunc: str) -> float | None:
        if aggfunc == "count":
            return float(self.rows)
        if aggfunc == "sum":
            return self.total
        return None if self.total is None or self.value_rows == 0 else self.total / self.value_rows


EMPTY_CELL = CellStats(rows=0, contributors=0, value_rows=0, value_contributors=0, total=None, top=(), negatives=0)


class ProvenanceError(ValueError):
    """The sidecar is not something the checker can act on."""


# -- parsing ---------------------------------------------------------------------------------------------------------


def parse_table(path: str, data: bytes) -> pa.Table | None:
    """The table in a CSV, TSV, Parquet, JSON (records, columns or split) or XLSX file; None if it holds none."""
    suffix = PurePosixPath(path).suffix.lower()
    try:
        if suffix == ".csv":
            return pa_csv.read_csv(io.BytesIO(data))
        if suffix == ".tsv":
            return pa_csv.read_csv(io.BytesIO(data), parse_options=pa_csv.ParseOptions(delimiter="\t"))
        if suffix == ".parquet":
            return pq.read_table(io.BytesIO(data))
        if suffix == ".json":
            return _table_from_json(json.loads(data))
        if suffix == ".xlsx":
            return _table_from_xlsx(data)
    except (pa.ArrowException, ValueError, TypeError, KeyError, OSError):
        return None
    return None


def _table_from_json(document: Any) -> pa.Table | None:
    if isinstance(document, list) and document and all(isinstance(row, dict) for row in document):
        return pa.Table.from_pylist(document)
    if isinstance(document, dict) and document:
        if set(document) >= {"columns", "data"} and isinstance(document["data"], list):  # pandas orient="split"
            columns = [str(name) for name in document["columns"]]
            rows = document["data"]
            if "index" in document and "index" not in columns:
                columns = ["index", *columns]
                rows = [[label, *row] for label, row in zip(document["index"], rows, strict=True)]
            return pa.Table.from_pylist([dict(zip(columns, row, strict=True)) for row in rows])
        if all(isinstance(column, list) for column in document.values()):
            return pa.Table.from_pydict(document)
        if all(isinstance(column, dict) for column in document.values()):  # pandas orient="columns"
            labels = list(next(iter(document.values())))
            table = {"index": labels}
            for name, column in document.items():
                table[name] = [column.get(label) for label in labels]
            return pa.Table.from_pydict(table)
    return None


def _table_from_xlsx(data: bytes) -> pa.Table | None:
    import openpyxl  # type: ignore[import-untyped]

    workbook = openpyxl.load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    try:
        sheets = [list(sheet.iter_rows(values_only=True)) for sheet in workbook.worksheets]
    finally:
        workbook.close()
    filled = [rows for rows in sheets if any(value is not None for row in rows for value in row)]
    # A second sheet is a second table the checks would not see.
    if len(filled) != 1:
        return None
    header, *rows = filled[0]
    if header is None or any(name is None for name in header):
        return None
    names = [str(name) for name in header]
    if len(set(names)) != len(names):
        return None
    return pa.Table.from_pylist([dict(zip(names, row, strict=False)) for row in rows])


# -- provenance ------------------------------------------------------------------------------------------------------


def _names(raw: Any, what: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        return (raw,)
    if isinstance(raw, list) and all(isinstance(name, str) for name in raw):
        return tuple(raw)
    raise ProvenanceError(f"{what} must be a column name or a list of them")


def _filters(raw: Any) -> tuple[Filter, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ProvenanceError("filters must be a list")
    filters = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("column"), str) or "value" not in item:
            raise ProvenanceError("each filter needs a column, an op and a value")
        op = item.get("op", "==")
        if op not in FILTER_OPERATORS:
            raise ProvenanceError(f"filter op {op!r} is not one of {', '.join(FILTER_OPERATORS)}")
        value = item["value"]
        scalar = (str, int, float, bool)
        if (op == "in" and not (isinstance(value, list) and value and all(isinstance(v, scalar) for v in value))) or (
                op != "in" and not isinstance(value, scalar)):
            raise ProvenanceError(f"filter on {item['column']!r} has an unusable value")
        filters.append(Filter(item["column"], op, value))
    return tuple(filters)


def read_table_provenance(raw: dict[str, Any]) -> TableProvenance:
    """The table sidecar's claims, or ProvenanceError."""
    aggfunc = raw.get("aggfunc", "count")
    if aggfunc not in AGGREGATES:
        raise ProvenanceError(f"aggregate {aggfunc!r} is not one of {', '.join(AGGREGATES)}")
    values = raw.get("values")
    if aggfunc == "count" and values is not None:
        raise ProvenanceError("a count table names no value column")
    if aggfunc != "count" and not isinstance(values, str):
        raise ProvenanceError(f"a {aggfunc} table needs the column it aggregates")
    layout = raw.get("layout", "wide")
    if layout not in ("wide", "long"):
        raise ProvenanceError(f"layout {layout!r} is neither 'wide' nor 'long'")
    value_column = raw.get("value_column")
    if value_column is not None and not isinstance(value_column, str):
        raise ProvenanceError("value_column must be a column name")
    separator = raw.get("separator", "|")
    if not isinstance(separator, str) or not separator:
        raise ProvenanceError("separator must be a non-empty string")
    index = _names(raw.get("index"), "index")
    if not index:
        raise ProvenanceError("a table needs at least one index (row) column")
    return TableProvenance(index=index, columns=_names(raw.get("columns"), "columns"), values=values, aggfunc=aggfunc,
                           filters=_filters(raw.get("filters")), layout=layout, value_column=value_column,
                           separator=separator)


def read_regression_provenance(raw: dict[str, Any]) -> RegressionProvenance:
    """The regression sidecar's claims, or ProvenanceError."""
    try:
        df_resid, nobs = float(raw["df_resid"]), float(raw["nobs"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProvenanceError("a regression sidecar needs numeric df_resid and nobs") from exc
    params = _names(raw.get("params"), "params")
    if not params:
        raise ProvenanceError("a regression sidecar needs the names of its parameters")
    return RegressionProvenance(df_resid=df_resid, nobs=nobs, params=params,
                                data_columns=_names(raw.get("data_columns"), "data_columns"),
                                filters=_filters(raw.get("filters")))


# -- recomputation (the DuckDB adapter) ------------------------------------------------------------------------------


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def dataset_columns(dataset_parquet: Path) -> list[str]:
    return list(pq.read_schema(dataset_parquet).names)


def where_clause(filters: Sequence[Filter], not_null: Iterable[str]) -> tuple[str, list[Any]]:
    clauses = [f"{quote_identifier(column)} IS NOT NULL" for column in not_null]
    parameters: list[Any] = []
    for item in filters:
        if item.op == "in":
            clauses.append(f"{quote_identifier(item.column)} IN ({', '.join('?' for _ in item.value)})")
            parameters.extend(item.value)
        else:
            clauses.append(f"{quote_identifier(item.column)} {FILTER_OPERATORS[item.op]} ?")
            parameters.append(item.value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", parameters


def recompute_cells(dataset_parquet: Path, *, groups: Sequence[str], value: str | None, filters: Sequence[Filter],
                    privacy_unit: str | None, top_n: int) -> dict[tuple[str, ...], CellStats]:
    """Counts, sums and the largest per-unit contributions for every group, straight from the dataset version."""
    group_names = [f"g{i}" for i in range(len(groups))]
    selected = [f"{quote_identifier(column)} AS {name}" for column, name in zip(groups, group_names, strict=True)]
    value_expression = f"CAST({quote_identifier(value)} AS DOUBLE)" if value else "CAST(NULL AS DOUBLE)"
    unit_expression = quote_identifier(privacy_unit) if privacy_unit else "file_row_number"
    where, parameters = where_clause(filters, groups)
    unit_grouping = ", ".join([*group_names, "u"])
    outer_grouping = f" GROUP BY {', '.join(group_names)}" if group_names else ""
    # Every name was checked against the dataset's schema and is quoted; values travel as parameters.
    sql = (
        f"WITH base AS (SELECT {', '.join([*selected, f'{value_expression} AS v', f'{unit_expression} AS u'])} "  # noqa: S608
        f"FROM read_parquet(?, file_row_number = true){where}), "
        f"per_unit AS (SELECT {unit_grouping}, count(*) AS n_rows, count(v) AS n_values, sum(v) AS contribution, "
        f"count_if(v < 0) AS negatives FROM base GROUP BY {unit_grouping}) "
        f"SELECT {', '.join([*group_names, ''])}sum(n_rows), count(*), sum(n_values), count(contribution), "
        f"sum(contribution), max(contribution, {int(top_n)}), sum(negatives) FROM per_unit{outer_grouping}"
    )
    with duck.connect() as connection:
        rows = connection.execute(sql, [str(dataset_parquet), *parameters]).fetchall()
    cells: dict[tuple[str, ...], CellStats] = {}
    width = len(group_names)
    for row in rows:
        if row[width] is None:  # no group at all: an aggregate over an empty selection
            continue
        key = tuple(normalise_label(label) for label in row[:width])
        total = None if row[width + 4] is None else float(row[width + 4])
        top = tuple(float(x) for x in (row[width + 5] or ()) if x is not None)
        cells[key] = CellStats(rows=int(row[width]), contributors=int(row[width + 1]),
                               value_rows=int(row[width + 2]), value_contributors=int(row[width + 3]),
                               total=total, top=top, negatives=int(row[width + 6] or 0))
    return cells


def recompute_rows(dataset_parquet: Path, *, filters: Sequence[Filter], not_null: Sequence[str]) -> int:
    """Rows of the dataset version a regression could have used."""
    where, parameters = where_clause(filters, not_null)
    with duck.connect() as connection:
        rows = connection.execute(f"SELECT count(*) FROM read_parquet(?){where}",  # noqa: S608 (names are quoted)
                                  [str(dataset_parquet), *parameters]).fetchall()
    return int(rows[0][0])


def dataset_rows(dataset_parquet: Path) -> int:
    # Versions are immutable files: the footer is read once per file (notebooks ask for every output).
    info = dataset_parquet.stat()
    return _parquet_rows(str(dataset_parquet), info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=64)
def _parquet_rows(path: str, mtime_ns: int, size: int) -> int:
    return int(pq.read_metadata(path).num_rows)


# -- reading the published cells -------------------------------------------------------------------------------------


def normalise_label(value: Any) -> str:
    """A label as text, so that a CSV's `True` or `3.0` matches the dataset's true or 3."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    if text.lower() in ("true", "false"):
        return text.lower()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() and re.fullmatch(r"-?\d+(\.0*)?", text) else text


class CellError(ValueError):
    """A published cell that is neither a number nor a suppression marker."""


def _cell_value(value: Any, label: str) -> float | None:
    if value is None or isinstance(value, bool):
        return None if value is None else float(value)
    if isinstance(value, int | float):
        return None if isinstance(value, float) and math.isnan(value) else float(value)
    text = str(value)
    try:
        number = float(text.replace(",", ""))
    except ValueError:
        if SUPPRESSION_MARKER.match(text):
            return None
        raise CellError(f"cell {label} holds text ({text[:40]!r}), not a number") from None
    return None if math.isnan(number) else number


def _describe(names: Sequence[str], labels: Sequence[str]) -> str:
    return ", ".join(f"{name}={label}" for name, label in zip(names, labels, strict=True)) or "(total)"


def cells_from_frame(frame: pa.Table, provenance: TableProvenance) -> list[Cell]:
    """The published cells, keyed like the recomputation; CellError when the layout is not the one claimed."""
    names = frame.column_names
    label_columns = list(provenance.index) if provenance.layout == "wide" else [*provenance.index, *provenance.columns]
    missing = [name for name in label_columns if name not in names]
    if missing:
        raise CellError(f"the table has no column {missing[0]!r}, which its sidecar names")
    if len(set(names)) != len(names):
        raise CellError("the table repeats a column name")
    dimension_names = [*provenance.index, *provenance.columns]
    labels = {name: [normalise_label(v) for v in frame.column(name).to_pylist()] for name in label_columns}
    value_names = [name for name in names if name not in label_columns]
    cells: list[Cell] = []
    if provenance.layout == "long":
        expected = provenance.value_column or provenance.aggfunc
        if value_names != [expected]:
            raise CellError(f"besides its label columns the table should hold one column, {expected!r}; "
                            f"it holds {value_names}")
        column_splits: dict[str, tuple[str, ...]] = {expected: ()}
    elif provenance.columns:
        column_splits = {}
        for name in value_names:
            parts = tuple(normalise_label(part) for part in name.split(provenance.separator))
            if len(parts) != len(provenance.columns):
                raise CellError(f"column {name!r} does not name one value of {', '.join(provenance.columns)}")
            column_splits[name] = parts
    else:
        if len(value_names) != 1:
            raise CellError(f"a table without column variables should hold one value column; it holds {value_names}")
        column_splits = {value_names[0]: ()}
    seen: set[tuple[str, ...]] = set()
    for name, column_labels in column_splits.items():
        values = frame.column(name).to_pylist()
        for row, raw in enumerate(values):
            key = tuple(labels[label_name][row] for label_name in provenance.index)
            key += tuple(labels[label_name][row] for label_name in provenance.columns) if provenance.layout == "long" \
                else column_labels
            if key in seen:
                raise CellError(f"cell {_describe(dimension_names, key)} appears twice")
            seen.add(key)
            label = _describe(dimension_names, key)
            cells.append(Cell(key, label, _cell_value(raw, label)))
    return cells


# -- the rules (pure) ------------------------------------------------------------------------------------------------


def small_cells(counts: Sequence[tuple[str, float]], minimum: int) -> set[str]:
    """Cells with a count above zero and under the minimum."""
    return {label for label, count in counts if 0 < count < minimum}


def zero_cells(counts: Sequence[tuple[str, float]]) -> set[str]:
    return {label for label, count in counts if count == 0}


def dominated_cells(cells: Sequence[tuple[str, CellStats]], n: int, k: float) -> set[str]:
    """Cells whose n largest contributions make up k or more of the total (ACRO's NK rule: >= k).

    A total of 0 from contributors who all gave 0 reveals each one's value, so it counts as dominated.
    """
    flagged = set()
    for label, stats in cells:
        if stats.value_contributors == 0:
            continue
        total = stats.total or 0.0
        if not total or sum(stats.top[:n]) / total >= k:
            flagged.add(label)
    return flagged


def _p_ratio(stats: CellStats) -> float:
    return ((stats.total or 0.0) - sum(stats.top[:2])) / stats.top[0]


def p_ratio_cells(cells: Sequence[tuple[str, CellStats]], p: float) -> set[str]:
    """Cells where all but the two largest contributions add up to less than p of the largest (ACRO's p-ratio)."""
    return {label for label, stats in cells
            if stats.value_contributors and stats.top and stats.top[0] != 0 and _p_ratio(stats) < p}


def _listing(items: Sequence[str]) -> str:
    shown = "; ".join(items[:CELLS_NAMED_IN_REASON])
    more = len(items) - CELLS_NAMED_IN_REASON
    return shown + (f"; and {more} more" if more > 0 else "")


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:.6g}"


def min_cell_count_rule(counts: Sequence[tuple[str, float]], *, minimum: int | None, unit: str,
                        source: str) -> CheckResult:
    """Every non-zero cell counts at least `minimum` (zeros are the zeros rule's)."""
    if minimum is None:
        return CheckResult("min-cell-count", Verdict.PASS, "the policy sets no minimum cell count")
    flagged = small_cells(counts, minimum)
    small = [f"{label}: {_fmt(count)}" for label, count in counts if label in flagged]
    if small:
        return CheckResult("min-cell-count", Verdict.BLOCK,
                           f"{len(small)} cell(s) count fewer than {minimum} {unit} (the policy's min_cell_count), "
                           f"{source}: {_listing(small)}")
    return CheckResult("min-cell-count", Verdict.PASS,
                       f"every non-zero cell counts at least {minimum} {unit} ({source}; {len(counts)} cells)")


def zeros_rule(counts: Sequence[tuple[str, float]], *, zeros: str) -> CheckResult:
    """Zero cells can reveal that nobody in a group has an attribute; policy allows, reviews or blocks them."""
    empty = sorted(zero_cells(counts))
    if not empty:
        return CheckResult("zeros", Verdict.PASS, "no cell is zero")
    if zeros == "allow":
        return CheckResult("zeros", Verdict.PASS, f"{len(empty)} zero cell(s); the policy allows zeros")
    verdict = Verdict.BLOCK if zeros == "block" else Verdict.REVIEW
    return CheckResult("zeros", verdict,
                       f"{len(empty)} cell(s) are zero, which can reveal that nobody in a group has an attribute "
                       f"(policy: zeros {zeros}): {_listing(empty)}")


def rounding_rule(published: Sequence[tuple[str, float]], *, base: int | None) -> CheckResult:
    """Every published count is a multiple of the policy's rounding base."""
    if not base:
        return CheckResult("rounding", Verdict.PASS, "the policy asks for no rounding")
    unrounded = [f"{label}: {_fmt(value)}" for label, value in published if value % base != 0]
    if unrounded:
        return CheckResult("rounding", Verdict.BLOCK,
                           f"{len(unrounded)} published count(s) are not multiples of {base} (the policy's rounding): "
                           f"{_listing(unrounded)}")
    return CheckResult("rounding", Verdict.PASS, f"every published count is a multiple of {base}")


def dominance_rule(cells: Sequence[tuple[str, CellStats]], *, n: int | None, k: float | None,
                   unit: str) -> CheckResult:
    """(n, k): in no cell do the n largest contributions make up k or more of the cell's total."""
    if not n or k is None:
        return CheckResult("dominance", Verdict.PASS, "the policy sets no (n, k) dominance rule")
    negative = [label for label, stats in cells if stats.negatives]
    if negative:
        return CheckResult("dominance", Verdict.REVIEW,
                           f"dominance is not defined where values are negative: {_listing(negative)}")
    dominated = []
    flagged = dominated_cells(cells, n, k)
    for label, stats in cells:
        if label in flagged:
            total = stats.total or 0.0
            what = f"the largest {n} {unit} make up {sum(stats.top[:n]) / total:.1%}" if total else \
                "every contribution is 0"
            dominated.append(f"{label}: {what}")
    if dominated:
        return CheckResult("dominance", Verdict.BLOCK,
                           f"{len(dominated)} cell(s) are dominated (the policy's n={n}, k={k}; recomputed from the "
                           f"dataset): {_listing(dominated)}")
    return CheckResult("dominance", Verdict.PASS, f"no cell's largest {n} {unit} reach {k:.0%} of its total")


def p_ratio_rule(cells: Sequence[tuple[str, CellStats]], *, p: float | None) -> CheckResult:
    """p%: what remains after the two largest contributions is at least p of the largest one."""
    if p is None:
        return CheckResult("p-ratio", Verdict.PASS, "the policy sets no p-ratio rule")
    negative = [label for label, stats in cells if stats.negatives]
    if negative:
        return CheckResult("p-ratio", Verdict.REVIEW,
                           f"the p-ratio is not defined where values are negative: {_listing(negative)}")
    flagged = p_ratio_cells(cells, p)
    exposed = [f"{label}: the rest is {_p_ratio(stats):.1%} of the largest contribution" for label, stats in cells
               if label in flagged]
    if exposed:
        return CheckResult("p-ratio", Verdict.BLOCK,
                           f"{len(exposed)} cell(s) let the second-largest contributor estimate the largest within "
                           f"{p:.0%} (the policy's p_ratio; recomputed from the dataset): {_listing(exposed)}")
    return CheckResult("p-ratio", Verdict.PASS, f"in every cell the others make up at least {p:.0%} of the largest")


def residual_df_rule(df_resid: float, *, minimum: int | None, source: str) -> CheckResult:
    """A model's residual degrees of freedom reach the policy's minimum."""
    if minimum is None:
        return CheckResult("residual-df", Verdict.PASS, "the policy sets no minimum residual degrees of freedom")
    if df_resid < minimum:
        return CheckResult("residual-df", Verdict.BLOCK,
                           f"{_fmt(df_resid)} residual degrees of freedom, under the policy's {minimum} ({source}): "
                           "so few spare observations let the fit reveal individual records")
    return CheckResult("residual-df", Verdict.PASS, f"{_fmt(df_resid)} residual degrees of freedom ({source})")


def _count_matches(published: float, actual: float, rounding: int | None) -> bool:
    return abs(published - actual) <= rounding / 2 if rounding else published == actual


def _magnitude_matches(published: float, actual: float) -> bool:
    # A buyer may print a sum or mean to a few decimals; that discloses less, so it still matches.
    if math.isclose(published, actual, rel_tol=1e-9, abs_tol=1e-9):
        return True
    return any(math.isclose(published, round(actual, digits), rel_tol=1e-12, abs_tol=1e-12) for digits in range(7))


# -- check_table -----------------------------------------------------------------------------------------------------


def check_table(facts: TableFacts, *, sdc: dict[str, Any], dataset_parquet: Path | None,
                card: dict[str, Any] | None) -> list[CheckResult]:
    """Disclosure checks for one table output; the caller folds the verdicts."""
    provenance = facts.provenance
    kind = provenance.get("kind", "table") if isinstance(provenance, dict) else None
    if kind in ("dp_result", "dp"):
        return [CheckResult("dp-result", Verdict.REVIEW,
                            "declared a differentially private result; the table rules do not cover DP outputs, "
                            "so a steward checks it against the DP query log")]
    if provenance is None:
        return _check_unverified(facts.frame, sdc=sdc, dataset_parquet=dataset_parquet, card=card,
                                 note=CheckResult("provenance", Verdict.PASS,
                                                  "no sidecar: integer cells are checked as the published counts"))
    try:
        if kind == "regression":
            return _check_regression(facts.frame, read_regression_provenance(provenance), sdc=sdc,
                                     dataset_parquet=dataset_parquet)
        if kind != "table":
            raise ProvenanceError(f"unknown kind {kind!r}")
        table_provenance = read_table_provenance(provenance)
    except ProvenanceError as exc:
        return _check_unverified(facts.frame, sdc=sdc, dataset_parquet=dataset_parquet, card=card,
                                 note=CheckResult("provenance", Verdict.REVIEW,
                                                  f"the sidecar cannot be used ({exc}); cells checked as published"))
    return _check_with_provenance(facts.frame, table_provenance, sdc=sdc, dataset_parquet=dataset_parquet, card=card)


def _privacy_unit(card: dict[str, Any] | None, columns: Sequence[str]) -> str | None:
    unit = (card or {}).get("privacy_unit")
    return unit if isinstance(unit, str) and unit in columns else None


def _check_with_provenance(frame: pa.Table, provenance: TableProvenance, *, sdc: dict[str, Any],
                           dataset_parquet: Path | None, card: dict[str, Any] | None) -> list[CheckResult]:
    if dataset_parquet is None:
        return _check_unverified(frame, sdc=sdc, dataset_parquet=None, card=card, note=CheckResult(
            "provenance", Verdict.REVIEW, "no dataset version to recompute the sidecar's claims from"))
    available = dataset_columns(dataset_parquet)
    named = [*provenance.index, *provenance.columns, *([provenance.values] if provenance.values else []),
             *(item.column for item in provenance.filters)]
    unknown = sorted({name for name in named if name not in available})
    if unknown:
        # Derived columns (age bands, say) cannot be recomputed from the dataset: fall back, and say so.
        return _check_unverified(frame, sdc=sdc, dataset_parquet=dataset_parquet, card=card, note=CheckResult(
            "provenance", Verdict.REVIEW,
            f"the sidecar names column(s) the dataset lacks ({', '.join(unknown)}), so the table cannot be "
            "recomputed; cells checked as published"))
    try:
        cells = cells_from_frame(frame, provenance)
    except CellError as exc:
        return [CheckResult("provenance-match", Verdict.BLOCK, f"the table does not match its sidecar: {exc}")]
    privacy_unit = _privacy_unit(card, available)
    unit = f"distinct {privacy_unit}" if privacy_unit else "records"
    top_n = max(int(sdc.get("dominance_n") or 0), 2)
    try:
        recomputed = recompute_cells(dataset_parquet, groups=[*provenance.index, *provenance.columns],
                                     value=provenance.values, filters=provenance.filters, privacy_unit=privacy_unit,
                                     top_n=top_n)
    except duckdb.Error as exc:
        return _check_unverified(frame, sdc=sdc, dataset_parquet=dataset_parquet, card=card, note=CheckResult(
            "provenance", Verdict.REVIEW, f"the sidecar's table could not be recomputed ({exc}); cells checked as "
            "published"))
    rounding = sdc.get("rounding")
    rounding = int(rounding) if rounding else None
    paired = [(cell, recomputed.get(cell.key, EMPTY_CELL)) for cell in cells]
    disclosed = [(cell, stats) for cell, stats in paired if cell.value is not None]
    results = [CheckResult("provenance", Verdict.PASS,
                           f"{provenance.aggfunc} table by {', '.join(provenance.index + provenance.columns)}"
                           f"{' of ' + provenance.values if provenance.values else ''}"
                           f"{' with ' + str(len(provenance.filters)) + ' filter(s)' if provenance.filters else ''}, "
                           f"recomputed from the dataset version")]
    mismatched = []
    for cell, stats in disclosed:
        assert cell.value is not None
        actual = stats.published(provenance.aggfunc)
        if provenance.aggfunc == "count":
            ok = actual is not None and _count_matches(cell.value, actual, rounding)
        else:
            ok = actual is not None and _magnitude_matches(cell.value, actual)
        if not ok:
            mismatched.append(f"{cell.label}: published {_fmt(cell.value)}, recomputed "
                              f"{'nothing (no such group)' if actual is None else _fmt(actual)}")
    if mismatched:
        results.append(CheckResult(
            "provenance-match", Verdict.BLOCK,
            f"{len(mismatched)} cell(s) differ from what the sidecar's grouping, aggregate and filters give on the "
            f"dataset version: {_listing(mismatched)}"))
    else:
        results.append(CheckResult("provenance-match", Verdict.PASS,
                                   f"all {len(disclosed)} published cells match the recomputation"))
    source = "recomputed from the dataset"
    # An empty group shows as 0 in a count table and as a blank in a mean table: either way it says nobody
    # in that group exists, so the zeros rule looks at every cell, suppressed or not.
    zeros = zeros_rule([(cell.label, float(stats.contributors)) for cell, stats in paired],
                       zeros=str(sdc.get("zeros", "review")))
    if provenance.aggfunc == "count":
        counts = [(cell.label, float(stats.contributors)) for cell, stats in disclosed]
        results.append(min_cell_count_rule(counts, minimum=sdc.get("min_cell_count"), unit=unit, source=source))
        results.append(zeros)
        results.append(rounding_rule([(cell.label, cell.value) for cell, _ in disclosed if cell.value is not None],
                                     base=rounding))
    else:
        contributors = [(cell.label, float(stats.value_contributors)) for cell, stats in disclosed
                        if stats.value_contributors > 0]
        results.append(min_cell_count_rule(contributors, minimum=sdc.get("min_cell_count"), unit=unit,
                                           source=f"contributors to each {provenance.aggfunc}, {source}"))
        results.append(zeros)
        labelled = [(cell.label, stats) for cell, stats in disclosed]
        n, k, p = sdc.get("dominance_n"), sdc.get("dominance_k"), sdc.get("p_ratio")
        results.append(dominance_rule(labelled, n=int(n) if n else None, k=float(k) if k is not None else None,
                                      unit=unit))
        results.append(p_ratio_rule(labelled, p=float(p) if p is not None else None))
    return results


def _numeric(column: pa.ChunkedArray) -> bool:
    return bool(pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
                or pa.types.is_decimal(column.type))


def _check_unverified(frame: pa.Table, *, sdc: dict[str, Any], dataset_parquet: Path | None,
                      card: dict[str, Any] | None, note: CheckResult) -> list[CheckResult]:
    """Conservative checks on the published numbers: integers as counts, anything else to a steward."""
    grouping_names = set((card or {}).get("columns", {})) | INDEX_COLUMN_NAMES
    label_names = [name for name in frame.column_names
                   if not _numeric(frame.column(name)) or name.strip().lower() in grouping_names]
    value_names = [name for name in frame.column_names if name not in label_names]
    results = [note]
    if not value_names:
        results.append(CheckResult("table-cells", Verdict.REVIEW,
                                   "no numeric cells to check: a table of text or labels only goes to a steward"))
        return results
    label_rows = [[normalise_label(v) for v in frame.column(name).to_pylist()] for name in label_names]
    counts: list[tuple[str, float]] = []
    magnitudes: list[str] = []
    for name in value_names:
        for row, raw in enumerate(frame.column(name).to_pylist()):
            if raw is None or (isinstance(raw, float) and math.isnan(raw)):
                continue
            labels = ", ".join(f"{label_name}={column[row]}" for label_name, column in zip(label_names, label_rows,
                                                                                             strict=True))
            label = f"row {row + 1}{' (' + labels + ')' if labels else ''}, column {name}"
            value = float(raw)
            if value.is_integer():
                counts.append((label, value))
            else:
                magnitudes.append(f"{label}: {_fmt(value)}")
    source = "as published, unverified"
    results.append(min_cell_count_rule(counts, minimum=sdc.get("min_cell_count"), unit="records", source=source)
                   if counts else CheckResult("min-cell-count", Verdict.PASS, "no integer cells"))
    results.append(zeros_rule(counts, zeros=str(sdc.get("zeros", "review"))))
    rounding = sdc.get("rounding")
    results.append(rounding_rule(counts, base=int(rounding) if rounding else None))
    if magnitudes:
        results.append(CheckResult(
            "magnitude-unverified", Verdict.REVIEW,
            f"{len(magnitudes)} non-integer cell(s) (sums, means, rates?) without a sidecar to recompute them from, "
            f"so no contributor count or dominance check is possible: {_listing(magnitudes)}"))
    if counts and dataset_parquet is not None:
        total, limit = sum(value for _, value in counts), PLAUSIBLE_COUNT_FACTOR * dataset_rows(dataset_parquet)
        if total > limit:
            results.append(CheckResult(
                "count-plausibility", Verdict.REVIEW,
                f"the integer cells add up to {_fmt(total)}, more than counts from this dataset's rows could "
                f"({limit}): they may be record-level values rather than counts"))
    return results


def _check_regression(frame: pa.Table, provenance: RegressionProvenance, *, sdc: dict[str, Any],
                      dataset_parquet: Path | None) -> list[CheckResult]:
    minimum = sdc.get("min_residual_df")
    minimum = int(minimum) if minimum is not None else None
    params = len(provenance.params)
    results: list[CheckResult] = []
    if frame.num_rows != params:
        results.append(CheckResult("provenance-match", Verdict.BLOCK,
                                   f"the sidecar names {params} parameter(s) but the table has {frame.num_rows} rows"))
    verifiable = dataset_parquet is not None and bool(provenance.data_columns)
    if verifiable:
        assert dataset_parquet is not None
        available = dataset_columns(dataset_parquet)
        named = [*provenance.data_columns, *(item.column for item in provenance.filters)]
        verifiable = all(name in available for name in named)
    if not verifiable:
        claimed = residual_df_rule(provenance.df_resid, minimum=minimum, source="as claimed by the sidecar")
        if claimed.verdict is Verdict.PASS:
            claimed = CheckResult("residual-df", Verdict.REVIEW,
                                  f"{_fmt(provenance.df_resid)} residual degrees of freedom claimed, but the sidecar "
                                  "names no dataset columns to recount the observations from")
        return [*results, claimed]
    assert dataset_parquet is not None
    nobs = recompute_rows(dataset_parquet, filters=provenance.filters, not_null=provenance.data_columns)
    # statsmodels reports nobs - rank; rank <= parameters, so nobs - parameters is the verified floor
    # and the rule uses it. A claim below that floor, or above nobs, cannot come from this fit.
    df_resid = nobs - params
    if nobs != provenance.nobs or not df_resid <= provenance.df_resid < nobs:
        results.append(CheckResult(
            "provenance-match", Verdict.BLOCK,
            f"the sidecar claims {_fmt(provenance.nobs)} observations and {_fmt(provenance.df_resid)} residual "
            f"degrees of freedom; the dataset gives {nobs} observations, so {df_resid} for {params} parameters"))
    elif not results:
        results.append(CheckResult("provenance-match", Verdict.PASS,
                                   f"{nobs} observations and {params} parameters recounted from the dataset"))
    results.append(residual_df_rule(df_resid, minimum=minimum, source="recounted from the dataset"))
    return results
