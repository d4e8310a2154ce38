"""Verified tables: the only buyer-requested content that leaves the `aggregate` tier without a person.

The in-container client (`sandbox_client.tables`) records a specification, never bytes: the
grouping columns, the aggregate, the value column and filters on public columns. The platform
validates that specification against the dataset card, recomputes every cell from the pinned
dataset version, runs the disclosure rules on what it recomputed, compares the table with what
the same buyer already received (differencing), and writes the released file itself.

What the buyer chooses is bounded on purpose, because buyer code that has read the rows chooses it:
- groups are columns whose categories the card publishes, and the table lists every public
  category (labels never come from the data, so a label cannot carry a value);
- filters compare public columns with public categories, or with whole numbers inside public bounds;
- the file name is derived from the specification, so a name carries nothing the spec does not.
"""

from __future__ import annotations

import hashlib
import html
import io
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from sqlalchemy import select
from sqlalchemy.orm import Session

from sandbox import duck
from sandbox.egress.tables import (
    EMPTY_CELL,
    CellStats,
    Filter,
    dominance_rule,
    min_cell_count_rule,
    normalise_label,
    p_ratio_rule,
    quote_identifier,
    recompute_cells,
    where_clause,
    zeros_rule,
)
from sandbox.egress.verdicts import SEVERITY, CheckResult, Verdict
from sandbox.release.status import Origin, OutputStatus
from sandbox.store.models import Contract, Dataset, DatasetVersion, Job, JobOutput

SPEC_MIME = "application/vnd.sandbox.table-spec+json"
SPEC_FOLDER = ".tables"  # where the in-job client drops specifications under /output
FORMATS = ("csv", "parquet", "xlsx")
AGGREGATES = ("count", "sum", "mean")
OPERATORS = ("==", "!=", "<", "<=", ">", ">=", "in")
MAX_GROUPS = 4
MAX_FILTERS = 8
MAX_CELLS = 10_000
SIGNIFICANT_DIGITS = 6
# Sizes of set differences between a new cell and an earlier one that are reported to the steward.
ISOLATIONS_NAMED = 5


class SpecError(ValueError):
    """A specification the platform will not compute; the message names only card columns and rules."""


@dataclass(frozen=True)
class TableSpec:
    """A validated, canonical table specification."""

    index: tuple[str, ...]
    columns: tuple[str, ...]
    values: str | None
    aggfunc: str
    filters: tuple[Filter, ...]

    @property
    def groups(self) -> tuple[str, ...]:
        return self.index + self.columns

    def canonical(self) -> dict[str, Any]:
        return {"index": list(self.index), "columns": list(self.columns), "values": self.values,
                "aggfunc": self.aggfunc,
                "filters": [{"column": f.column, "op": f.op, "value": list(f.value) if f.op == "in" else f.value}
                            for f in self.filters]}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.canonical(), sort_keys=True).encode()).hexdigest()

    def name(self, extension: str) -> str:
        """The file name, derived from the specification alone: `mean-length_of_stay-by-site-where-1a2b3c4d.csv`."""
        if extension not in FORMATS:
            raise SpecError(f"tables are written as {', '.join(FORMATS)}, not {extension!r}")
        parts = [self.aggfunc, *([self.values] if self.values else []), "by", "-".join(self.index)]
        if self.columns:
            parts += ["x", "-".join(self.columns)]
        if self.filters:
            parts += ["where", self.digest()[:8]]
        return "-".join(parts).lower() + f".{extension}"

    def describe(self) -> str:
        what = f"{self.aggfunc}{' of ' + self.values if self.values else ''} by {', '.join(self.groups)}"
        if self.filters:
            what += " where " + " and ".join(f"{f.column} {f.op} {f.value!r}" for f in self.filters)
        return what


def _columns(card: dict[str, Any]) -> dict[str, dict[str, Any]]:
    columns = card.get("columns")
    return columns if isinstance(columns, dict) else {}


def _names(raw: Any, what: str, *, least: int, most: int) -> tuple[str, ...]:
    if raw is None:
        raw = []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(name, str) for name in raw):
        raise SpecError(f"{what} must be a column name or a list of column names")
    if not least <= len(raw) <= most:
        raise SpecError(f"{what} takes {least} to {most} columns")
    if len(set(raw)) != len(raw):
        raise SpecError(f"{what} names a column twice")
    return tuple(raw)


def _public_categories(card: dict[str, Any], column: str) -> list[Any] | None:
    spec = _columns(card).get(column)
    if not spec or not spec.get("public") or spec.get("categories") is None:
        return None
    return list(spec["categories"])


def _public_bounds(card: dict[str, Any], column: str) -> tuple[float, float] | None:
    spec = _columns(card).get(column)
    if not spec or not spec.get("public") or spec.get("bounds") is None:
        return None
    low, high = spec["bounds"]
    return float(low), float(high)


def _filter_value(card: dict[str, Any], column: str, value: Any) -> Any:
    """`value`, as the dataset holds it, if it is a public category or a whole number inside public bounds."""
    categories = _public_categories(card, column)
    if categories is not None:
        by_label = {normalise_label(category): category for category in categories}
        label = normalise_label(value)
        if isinstance(value, (list, dict)) or label not in by_label:
            raise SpecError(f"filters on {column} compare with one of its public categories")
        return by_label[label]
    bounds = _public_bounds(card, column)
    if bounds is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not float(value).is_integer() or not bounds[0] <= value <= bounds[1]:
            raise SpecError(f"filters on {column} compare with a whole number inside its public bounds")
        return int(value)
    raise SpecError(f"{column} cannot be filtered on: filters need a column whose categories or bounds the card "
                    "publishes")


def parse_spec(raw: Any, card: dict[str, Any]) -> TableSpec:
    """The canonical specification for `raw` (what the client recorded), checked against the card."""
    if not isinstance(raw, dict):
        raise SpecError("a table specification is a JSON object")
    known = {"kind", "version", "index", "columns", "values", "aggfunc", "filters", "format", "dataset",
             "dataset_version", "layout", "value_column", "separator", "source"}
    # Messages name card columns and rules only: anything the spec itself carries could be a row.
    if any(key not in known for key in raw):
        raise SpecError("the table specification has unknown fields")
    if raw.get("kind", "table") != "table":
        raise SpecError("only tables (kind 'table') are recomputed by the platform")
    index = _names(raw.get("index"), "index", least=1, most=MAX_GROUPS)
    columns = _names(raw.get("columns"), "columns", least=0, most=MAX_GROUPS)
    if len(index) + len(columns) > MAX_GROUPS or set(index) & set(columns):
        raise SpecError(f"a table groups by at most {MAX_GROUPS} distinct columns")
    available = _columns(card)
    for column in index + columns:
        if column not in available:
            raise SpecError(f"{'index' if column in index else 'columns'} names a column the dataset does not have")
        if _public_categories(card, column) is None:
            raise SpecError(f"{column} cannot be grouped by: grouping needs a column whose categories the card "
                            "publishes")
    aggfunc = raw.get("aggfunc", "count")
    if aggfunc not in AGGREGATES:
        raise SpecError(f"aggfunc must be one of {', '.join(AGGREGATES)}")
    values = raw.get("values")
    if (aggfunc == "count") != (values is None):
        raise SpecError("count tables take no values; sum and mean tables need one")
    if values is not None:
        if not isinstance(values, str) or values not in available:
            raise SpecError("values names a column of the dataset")
        if available[values].get("type") not in ("integer", "float"):
            raise SpecError(f"{values} is not numeric, so it cannot be summed or averaged")
    filters = _parse_filters(raw.get("filters"), card)
    cells = math.prod(len(_public_categories(card, column) or []) for column in index + columns)
    if cells > MAX_CELLS:
        raise SpecError(f"the table would have {cells} cells, over the platform's {MAX_CELLS}")
    return TableSpec(index=index, columns=columns, values=values, aggfunc=aggfunc, filters=filters)


def _parse_filters(raw: Any, card: dict[str, Any]) -> tuple[Filter, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_FILTERS:
        raise SpecError(f"filters are a list of at most {MAX_FILTERS} {{column, op, value}} objects")
    parsed = []
    for item in raw:
        if not isinstance(item, dict) or set(item) != {"column", "op", "value"}:
            raise SpecError("each filter is an object with exactly column, op and value")
        column, op, value = item["column"], item["op"], item["value"]
        if not isinstance(column, str) or column not in _columns(card):
            raise SpecError("a filter names a column of the dataset")
        if op not in OPERATORS:
            raise SpecError(f"a filter's op is one of {', '.join(OPERATORS)}")
        if op == "in":
            if not isinstance(value, list) or not 1 <= len(value) <= 1000:
                raise SpecError("an 'in' filter takes a non-empty list")
            checked = sorted({_filter_value(card, column, v) for v in value}, key=normalise_label)
            parsed.append(Filter(column, op, tuple(checked)))
        else:
            parsed.append(Filter(column, op, _filter_value(card, column, value)))
    unique = {(f.column, f.op, normalise_label(f.value) if f.op != "in" else tuple(map(normalise_label, f.value))): f
              for f in parsed}
    return tuple(unique[key] for key in sorted(unique, key=repr))


@dataclass(frozen=True)
class EarlierRelease:
    """A platform-made table already released to the same buyer organisation on the same dataset."""

    spec: TableSpec
    dataset_parquet: Path
    where: str  # where it was released, for the steward: "job j-…: count-by-site.csv"


@dataclass(frozen=True)
class VerifiedTable:
    spec: TableSpec
    table: pa.Table
    checks: list[CheckResult]

    @property
    def verdict(self) -> Verdict:
        return max((c.verdict for c in self.checks), key=SEVERITY.__getitem__, default=Verdict.PASS)

    def to_bytes(self, fmt: str) -> bytes:
        buffer = io.BytesIO()
        if fmt == "csv":
            pa_csv.write_csv(self.table, buffer)
        elif fmt == "parquet":
            pq.write_table(self.table, buffer)
        elif fmt == "xlsx":
            return _xlsx(self.table)
        else:
            raise SpecError(f"tables are written as {', '.join(FORMATS)}, not {fmt!r}")
        return buffer.getvalue()

    def to_html(self) -> str:
        header = "".join(f"<th>{html.escape(name)}</th>" for name in self.table.column_names)
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(_text(value))}</td>" for value in row.values()) + "</tr>"
                       for row in self.table.to_pylist())
        return (f'<table class="sandbox-verified"><caption>{html.escape(self.spec.describe())} '
                f"(recomputed by the platform)</caption><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>")

    def to_text(self) -> str:
        rows = [self.table.column_names, *([_text(v) for v in row.values()] for row in self.table.to_pylist())]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
                         for row in rows)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.{SIGNIFICANT_DIGITS}g}"
    return str(value)


def _xlsx(table: pa.Table) -> bytes:
    from openpyxl import Workbook  # type: ignore[import-untyped]

    workbook = Workbook()
    sheet = workbook.active
    assert sheet is not None
    sheet.append(table.column_names)
    for row in table.to_pylist():
        sheet.append(list(row.values()))
    buffer = io.BytesIO()
    workbook.save(buffer)
    return buffer.getvalue()


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value) or value == 0:
        return value
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def verify_table(spec: TableSpec, *, dataset_parquet: Path, card: dict[str, Any], sdc: dict[str, Any],
                 earlier: Sequence[EarlierRelease] = ()) -> VerifiedTable:
    """The table recomputed from the dataset version, written from the platform's own cells, with its checks."""
    unit = card.get("privacy_unit") if isinstance(card.get("privacy_unit"), str) else None
    unit_words = f"distinct {unit}" if unit else "records"
    top_n = max(int(sdc.get("dominance_n") or 0), 2)
    try:
        recomputed = recompute_cells(dataset_parquet, groups=list(spec.groups), value=spec.values,
                                     filters=spec.filters, privacy_unit=unit, top_n=top_n)
    except duckdb.Error as exc:
        raise SpecError(f"the table could not be recomputed from the dataset version ({type(exc).__name__})") from exc
    categories = [_public_categories(card, column) or [] for column in spec.groups]
    rounding = int(sdc["rounding"]) if sdc.get("rounding") else None
    labelled: list[tuple[str, CellStats]] = []
    rows: list[list[Any]] = []
    for combination in itertools.product(*categories):
        key = tuple(normalise_label(value) for value in combination)
        stats = recomputed.get(key, EMPTY_CELL)
        labelled.append((" / ".join(key), stats))
        rows.append([*combination, _published(stats, spec.aggfunc, rounding)])
    value_name = spec.aggfunc if spec.values is None else f"{spec.aggfunc}_{spec.values}"
    table = _layout(spec, rows, value_name)
    source = "recomputed by the platform from the dataset version"
    checks = [CheckResult("verified-table", Verdict.PASS, f"{spec.describe()}: every cell {source}")]
    if spec.aggfunc == "count":
        counts = [(label, float(stats.contributors)) for label, stats in labelled]
        checks.append(min_cell_count_rule(counts, minimum=sdc.get("min_cell_count"), unit=unit_words, source=source))
    else:
        contributors = [(label, float(stats.value_contributors)) for label, stats in labelled
                        if stats.value_contributors > 0]
        checks.append(min_cell_count_rule(contributors, minimum=sdc.get("min_cell_count"), unit=unit_words,
                                          source=f"contributors to each {spec.aggfunc}, {source}"))
        n, k, p = sdc.get("dominance_n"), sdc.get("dominance_k"), sdc.get("p_ratio")
        with_values = [(label, stats) for label, stats in labelled if stats.value_contributors > 0]
        checks.append(dominance_rule(with_values, n=int(n) if n else None, k=float(k) if k is not None else None,
                                     unit=unit_words))
        checks.append(p_ratio_rule(with_values, p=float(p) if p is not None else None))
    checks.append(zeros_rule([(label, float(stats.contributors)) for label, stats in labelled],
                             zeros=str(sdc.get("zeros", "review"))))
    minimum = int(sdc.get("min_cell_count") or 0)
    checks.append(differencing_rule(spec, dataset_parquet=dataset_parquet, minimum=minimum,
                                    earlier=earlier))
    return VerifiedTable(spec=spec, table=table, checks=checks)


def _published(stats: CellStats, aggfunc: str, rounding: int | None) -> float | int | None:
    if aggfunc == "count":
        return int(rounding * round(stats.rows / rounding)) if rounding else stats.rows
    return _round(stats.published(aggfunc))


def _layout(spec: TableSpec, rows: list[list[Any]], value_name: str) -> pa.Table:
    """Long (one value column) without column variables; wide (a column per combination, joined by '|') with."""
    if not spec.columns:
        names = [*spec.index, value_name]
        return pa.table({name: [_cell(row[i]) for row in rows] for i, name in enumerate(names)})
    width = len(spec.index)
    wide: dict[tuple[Any, ...], dict[str, Any]] = {}
    headers: list[str] = []
    for row in rows:
        header = "|".join(normalise_label(v) for v in row[width:-1])
        if header not in headers:
            headers.append(header)
        wide.setdefault(tuple(row[:width]), {})[header] = row[-1]
    data: dict[str, list[Any]] = {name: [_cell(key[i]) for key in wide] for i, name in enumerate(spec.index)}
    for header in headers:
        data[header] = [cells.get(header) for cells in wide.values()]
    return pa.table(data)


def _cell(value: Any) -> Any:
    return value if isinstance(value, (str, int, float)) or value is None else normalise_label(value)


def differencing_rule(spec: TableSpec, *, dataset_parquet: Path, minimum: int,
                      earlier: Sequence[EarlierRelease]) -> CheckResult:
    """No cell of this table and a cell of an earlier release differ by fewer than `minimum` units.

    Subtracting one published cell from another that nests in it (a filter moved by one year, a group
    split by another column) counts the units in the difference; a small difference singles them out.
    Every pair of overlapping cells is compared, whether or not the filters look nested.
    """
    if not minimum or not earlier:
        return CheckResult("differencing", Verdict.PASS,
                           "no earlier table released to this buyer to compare with" if minimum else
                           "the policy sets no minimum cell count")
    found: list[str] = []
    for release in earlier:
        for new_key, old_key, difference in _isolations(spec, dataset_parquet, release, minimum):
            found.append(f"{' / '.join(new_key)} here and {' / '.join(old_key)} in {release.where} differ by "
                         f"{difference}")
        if len(found) >= ISOLATIONS_NAMED:
            break
    if found:
        return CheckResult("differencing", Verdict.REVIEW,
                           f"combined with tables this buyer already received, cells isolate fewer than {minimum} "
                           f"units: {'; '.join(found[:ISOLATIONS_NAMED])}")
    return CheckResult("differencing", Verdict.PASS,
                       f"no cell differs from a cell of the {len(earlier)} earlier release(s) by fewer than {minimum} "
                       "units")


def _cells_sql(spec: TableSpec) -> tuple[str, list[Any]]:
    # A record is known by the hash of all its values, so an unchanged record matches across weekly versions.
    keys = ", ".join(f"CAST({quote_identifier(column)} AS VARCHAR)" for column in spec.groups)
    where, parameters = where_clause(spec.filters, spec.groups)
    sql = (f"SELECT DISTINCT [{keys}] AS k, hash(t) AS r "  # noqa: S608 (names quoted, values bound)
           f"FROM read_parquet(?) AS t{where}")
    return sql, parameters


def _isolations(spec: TableSpec, dataset_parquet: Path, release: EarlierRelease,
                minimum: int) -> list[tuple[tuple[str, ...], tuple[str, ...], int]]:
    # Records, not units, are subtracted: a difference of fewer than `minimum` records holds fewer than
    # `minimum` units. (A difference of many records of one unit is not caught here; rows_per_unit bounds it.)
    new_sql, new_parameters = _cells_sql(spec)
    old_sql, old_parameters = _cells_sql(release.spec)
    sql = (f"WITH n AS ({new_sql}), o AS ({old_sql}), "  # noqa: S608 (built from _cells_sql)
           "nc AS (SELECT k, count(*) AS c FROM n GROUP BY k), oc AS (SELECT k, count(*) AS c FROM o GROUP BY k), "
           "shared AS (SELECT n.k AS kn, o.k AS ko, count(*) AS s FROM n JOIN o ON n.r = o.r GROUP BY ALL) "
           "SELECT kn, ko, nc.c - s, oc.c - s FROM shared JOIN nc ON nc.k = kn JOIN oc ON oc.k = ko "
           "WHERE (nc.c - s > 0 AND nc.c - s < ?) OR (oc.c - s > 0 AND oc.c - s < ?) LIMIT ?")
    # Parameters bind in textual order: each table's path, then its filter values.
    parameters = [str(dataset_parquet), *new_parameters, str(release.dataset_parquet), *old_parameters,
                  minimum, minimum, ISOLATIONS_NAMED]
    with duck.connect() as connection:
        rows = connection.execute(sql, parameters).fetchall()
    found = []
    for new_key, old_key, new_only, old_only in rows:
        difference = int(new_only) if 0 < new_only < minimum else int(old_only)
        found.append((tuple(new_key), tuple(old_key), difference))
    return found



# -- the store: what a buyer already received, and platform-made outputs -------------------------------------------


def platform_dir(artifacts: Path, job_id: str) -> Path:
    """Where the platform keeps the files it wrote for a job, apart from anything the job wrote."""
    return artifacts / "jobs" / job_id / "platform"


def earlier_releases(session: Session, *, contract_id: str, dataset: str, artifacts: Path) -> list[EarlierRelease]:
    """Platform-made tables already released to the contract's buyer organisation on `dataset`, any version."""
    contract = session.get(Contract, contract_id)
    if contract is None:
        return []
    rows = session.execute(
        select(JobOutput, Job.dataset_version)
        .join(Job, Job.id == JobOutput.job_id)
        .where(Job.buyer_org == contract.buyer_org, Job.dataset == dataset,
               JobOutput.origin == Origin.PLATFORM.value, JobOutput.status == OutputStatus.RELEASED.value,
               JobOutput.spec.is_not(None))
        .order_by(JobOutput.id)).all()
    paths = {v.version: artifacts / v.path for v in session.execute(
        select(DatasetVersion).join(Dataset).where(Dataset.name == dataset)).scalars()}
    releases = []
    for output, version in rows:
        spec = _stored_spec(output.spec)
        if spec is not None and version in paths:
            releases.append(EarlierRelease(spec=spec, dataset_parquet=paths[version],
                                           where=f"job {output.job_id}: {output.path}"))
    return releases


def _stored_spec(raw: dict[str, Any] | None) -> TableSpec | None:
    if not raw:
        return None
    filters = tuple(Filter(f["column"], f["op"], tuple(f["value"]) if f["op"] == "in" else f["value"])
                    for f in raw.get("filters", []))
    return TableSpec(index=tuple(raw["index"]), columns=tuple(raw["columns"]), values=raw.get("values"),
                     aggfunc=raw["aggfunc"], filters=filters)


def store_platform_output(session: Session, *, job: Job, verified: VerifiedTable, fmt: str,
                          artifacts: Path) -> JobOutput:
    """Write the platform's file for `verified` and record it as an output of `job`.

    A PASS verdict releases it; anything else waits for a steward, who sees the platform's file and its checks.
    The same specification asked twice in one job is one output.
    """
    path = f"tables/{verified.spec.name(fmt)}"
    for existing in job.outputs:
        if existing.path == path:
            return existing
    content = verified.to_bytes(fmt)
    target = platform_dir(artifacts, job.id) / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
    status = OutputStatus.RELEASED if verified.verdict is Verdict.PASS else (
        OutputStatus.BLOCKED if verified.verdict is Verdict.BLOCK else OutputStatus.IN_REVIEW)
    output = JobOutput(job_id=job.id, path=path, size=len(content), sha256=hashlib.sha256(content).hexdigest(),
                       kind="table", verdict=verified.verdict.value, checks=[c.as_dict() for c in verified.checks],
                       status=status.value, origin=Origin.PLATFORM.value, spec=verified.spec.canonical(),
                       stored_path=str(target.relative_to(artifacts)))
    session.add(output)
    session.flush()
    return output
