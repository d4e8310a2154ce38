"""The DP engine's DuckDB adapter: run a plan's bounded aggregates on a version's Parquet, then add noise.

`execute` renders its own DuckDB SQL from the plan (nothing of the buyer's text reaches DuckDB), runs
it in a locked-down in-memory connection on the version's Parquet, and hands the exact aggregates to
`mechanisms.answer`, which adds the noise and spends exactly the query's `PrivacyCost`.

Per-unit bounding. When a unit may own many rows, each row of a version gets, once, its rank
among its unit's rows in a keyed-hash order; the ranked copy (without the unit column) is cached
next to nothing the buyer controls. A query then keeps rows with rank <= rows_per_unit *
groups_per_unit: a plain filter, so a bounded query runs at scan speed. One unit thus adds at most
that many rows in total, wherever they fall; `sensitivity.total_row_bound` turns that into norms.
The ranking costs one window over the version (seconds for 10M rows) and is paid once per version
and process; `prepare` lets a caller pay it when a version is registered.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from sandbox import duck
from sandbox.budgets.cost import PrivacyCost
from sandbox.dp import mechanisms
from sandbox.dp.mechanisms import Answer, Group
from sandbox.dp.plan import (
    DatasetPrivacy,
    Grid,
    QueryPlan,
    Statistic,
    public_bounds,
    statistic_grid,
)
from sandbox.dp.sql import AllOf, AnyOf, Between, Comparison, Condition, InList, IsNull, Negation
from sandbox.errors import Invalid

# The engine's own column lives in the reserved namespace (`cards.is_reserved_column`), which no card may
# declare; the ranked copy holds only the card's declared columns and this one, so the filter below is
# certain to read the rank and never a data column of the same name (review 11.2).
RANK_COLUMN = "__sandbox_unit_rank"
RANKING_MEMORY_LIMIT = "256MB"
MAX_OPEN_DATABASES = 8


def execute(plan: QueryPlan, parquet: Path, cost: PrivacyCost, *, cache_dir: Path | None = None) -> Answer:
    """Run the plan on the version's Parquet and add noise; spends exactly `cost` for the whole query."""
    dataset = plan.dataset
    plan.check_cost(cost)
    source = Path(parquet) if dataset.one_row_per_unit else prepare(parquet, dataset, cache_dir)
    with version_cursor(source) as cursor:
        aggregates = _Aggregates(plan, cursor, _ranges(source))
        return mechanisms.answer(plan, cost, dataset.contribution(plan.cells()), aggregates)


def prepare(parquet: Path, dataset: DatasetPrivacy, cache_dir: Path | None = None) -> Path:
    """The version's rows with each row's rank within its unit (unit column dropped); built once, cached."""
    source = Path(parquet).resolve()
    stat = source.stat()
    identity = json.dumps([str(source), stat.st_size, stat.st_mtime_ns, dataset.privacy_unit,
                           sorted(dataset.columns), RANK_COLUMN])
    key = hashlib.sha256(identity.encode()).hexdigest()[:32]
    with _RANK_LOCK:
        known = _RANKED.get(key)
        if known is not None and known.exists():
            return known
        directory = cache_dir or _private_cache_dir()
        target = directory / f"{key}.ranked.parquet"
        if cache_dir is None or not target.exists():
            _write_ranked(source, dataset, target)
        _RANKED[key] = target
        return target


class _Aggregates:
    """The plan's exact aggregates (`mechanisms.ExactAggregates`), computed by DuckDB on one cursor."""

    def __init__(self, plan: QueryPlan, cursor: duckdb.DuckDBPyConnection,
                 ranges: dict[str, tuple[float, float]]) -> None:
        self.plan = plan
        self.dataset = plan.dataset
        self.cursor = cursor
        self.ranges = ranges

    def rows(self, measures: list[Statistic]) -> dict[Group, list[Any]]:
        keys = list(self.plan.group_by)
        if not keys and not measures:
            return {(): []}  # only quantiles, no GROUP BY: nothing to aggregate here (review 11.8)
        selects = [_quote(k) for k in keys] + [self.measure_sql(m) for m in measures]
        sql = f"SELECT {', '.join(selects)} FROM dataset{self.where_sql()}"  # noqa: S608 - rendered from the plan
        if keys:
            sql += " GROUP BY " + ", ".join(_quote(k) for k in keys)
        result: dict[Group, list[Any]] = {}
        for row in self.cursor.execute(sql).fetchall():
            result[tuple(row[: len(keys)])] = list(row[len(keys):])
        return result

    def histograms(self, statistic: Statistic, candidates: list[float]) -> dict[Group, list[int]]:
        _, column, _ = statistic
        assert column is not None
        low, high = public_bounds(self.dataset, column)
        step = candidates[1] - candidates[0] if len(candidates) > 1 else 1.0
        keys = [_quote(k) for k in self.plan.group_by]
        clamped = f"greatest(least({_quote(column)}::DOUBLE, {_float(high)}), {_float(low)})"
        bucket = f"least(greatest(round(({clamped} - {_float(candidates[0])}) / {_float(step)}), 0), " \
                 f"{len(candidates) - 1})::INTEGER"
        where = self.where_sql()
        where += (" AND " if where else " WHERE ") + f"{_quote(column)} IS NOT NULL"
        sql = (f"SELECT {', '.join([*keys, bucket, 'count(*)'])} FROM dataset{where} "  # noqa: S608 - from the plan
               f"GROUP BY {', '.join([*keys, bucket])}")
        histograms: dict[Group, list[int]] = {}
        for row in self.cursor.execute(sql).fetchall():
            histogram = histograms.setdefault(tuple(row[: len(keys)]), [0] * len(candidates))
            histogram[int(row[len(keys)])] += int(row[len(keys) + 1])
        return histograms

    def where_sql(self) -> str:
        parts = []
        if not self.dataset.one_row_per_unit:
            parts.append(f"{_quote(RANK_COLUMN)} <= {self.dataset.rows_per_unit * self.dataset.groups_per_unit:d}")
        if self.plan.query.where is not None:
            parts.append(_condition_sql(self.plan.query.where))
        return " WHERE " + " AND ".join(f"({p})" for p in parts) if parts else ""

    def measure_sql(self, statistic: Statistic) -> str:
        kind, column, _ = statistic
        if kind == "count_rows":
            return "count(*)"
        assert column is not None
        if kind == "count":
            return f"count({_quote(column)})"
        grid = statistic_grid(self.dataset, statistic)
        if kind == "sum":
            return f"coalesce(sum({_steps_sql(column, grid, self.dataset, self.ranges)}), 0)"
        steps = f"({_steps_sql(column, grid, self.dataset, self.ranges)} - {grid.middle:d})"
        if kind == "centred_squares":
            return f"coalesce(sum({steps} * {steps}), 0)"
        return f"coalesce(sum({steps}), 0)"


# --- rendering SQL from the plan -----------------------------------------------------------------------

def _steps_sql(column: str, grid: Grid, dataset: DatasetPrivacy,
               ranges: dict[str, tuple[float, float]] | None = None) -> str:
    """Clamp to the bounds, then to fixed-point steps, then clamp the steps (exact whatever the rounding).

    A clamp that the file's own statistics prove to be the identity (every value already within the
    bounds) is left out: the answer is the same and the scan a quarter faster.
    """
    low, high = public_bounds(dataset, column)
    found = (ranges or {}).get(column)
    within = found is not None and low <= found[0] and found[1] <= high
    if dataset.columns[column].get("type") == "integer" and grid.scale == 1:
        # Integers on a unit grid: clamp in integer arithmetic, no float round trip (twice as fast).
        if within and grid.low <= found[0] and found[1] <= grid.high:  # type: ignore[index]
            return f"{_quote(column)}::BIGINT"
        return f"greatest(least({_quote(column)}::BIGINT, {grid.high:d}), {grid.low:d})"
    clamped = (f"{_quote(column)}::DOUBLE" if within
               else f"greatest(least({_quote(column)}::DOUBLE, {_float(high)}), {_float(low)})")
    steps = f"round({clamped} * {_float(grid.scale)})::BIGINT"
    return f"greatest(least({steps}, {grid.high:d}), {grid.low:d})"


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _float(value: float) -> str:
    if not math.isfinite(value):
        raise Invalid("bounds must be finite")
    return f"{float(value)!r}::DOUBLE"


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return f"{value:d}"
    if isinstance(value, float):
        return _float(value)
    return "'" + str(value).replace("'", "''") + "'"


def _condition_sql(condition: Condition) -> str:
    if isinstance(condition, Comparison):
        return f"{_quote(condition.column)} {condition.op} {_literal(condition.value)}"
    if isinstance(condition, InList):
        values = ", ".join(_literal(v) for v in condition.values)
        return f"{_quote(condition.column)} {'NOT IN' if condition.negated else 'IN'} ({values})"
    if isinstance(condition, Between):
        word = "NOT BETWEEN" if condition.negated else "BETWEEN"
        return f"{_quote(condition.column)} {word} {_literal(condition.low)} AND {_literal(condition.high)}"
    if isinstance(condition, IsNull):
        return f"{_quote(condition.column)} IS {'NOT ' if condition.negated else ''}NULL"
    if isinstance(condition, AllOf):
        return " AND ".join(f"({_condition_sql(p)})" for p in condition.parts)
    if isinstance(condition, AnyOf):
        return " OR ".join(f"({_condition_sql(p)})" for p in condition.parts)
    assert isinstance(condition, Negation)
    return f"NOT ({_condition_sql(condition.part)})"


# --- DuckDB connections and the per-version ranking ------------------------------------------------------

@contextmanager
def version_cursor(parquet: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A cursor on an in-memory DuckDB that can read one Parquet file and nothing else, settings locked.

    The database per file is kept (a few at most): opening one and binding the view costs ~20 ms,
    a third of a 10M-row query. Each query gets its own cursor, so threads never share one.
    """
    path = str(Path(parquet).resolve())
    with _DATABASE_LOCK:
        database = _DATABASES.pop(path, None) or _open_database(path)
        _DATABASES[path] = database  # most recently used last
        while len(_DATABASES) > MAX_OPEN_DATABASES:
            _DATABASES.pop(next(iter(_DATABASES))).close()
        cursor = database.cursor()
    try:
        yield cursor
    finally:
        cursor.close()


_DATABASE_LOCK = threading.Lock()
_DATABASES: dict[str, duckdb.DuckDBPyConnection] = {}


def _open_database(parquet: str) -> duckdb.DuckDBPyConnection:
    connection = duck.connect()
    path = parquet.replace("'", "''")
    connection.execute(f"CREATE VIEW dataset AS SELECT * FROM read_parquet('{path}')")  # noqa: S608 - our path
    connection.execute(f"SET allowed_paths=['{path}']")
    connection.execute("SET enable_external_access=false")
    connection.execute("SET lock_configuration=true")
    return connection


_RANGES: dict[str, dict[str, tuple[float, float]]] = {}


def _ranges(source: Path) -> dict[str, tuple[float, float]]:
    """Min and max of each numeric column from the Parquet footer (read once per file and process).

    Only columns whose every row group carries statistics are listed; anything unreadable is left
    out, which just keeps the clamp in the SQL.
    """
    key = str(Path(source).resolve())
    with _DATABASE_LOCK:
        known = _RANGES.get(key)
    if known is not None:
        return known
    connection = duck.connect()
    try:
        rows = connection.execute(
            "SELECT path_in_schema, count(*), count(stats_min_value), count(stats_max_value), "
            "list(stats_min_value), list(stats_max_value) FROM parquet_metadata($path) GROUP BY 1",
            {"path": key}).fetchall()
    except duckdb.Error:
        rows = []
    finally:
        connection.close()
    ranges: dict[str, tuple[float, float]] = {}
    for column, groups, with_min, with_max, minimums, maximums in rows:
        if groups != with_min or groups != with_max:
            continue
        try:
            ranges[str(column)] = (min(float(v) for v in minimums), max(float(v) for v in maximums))
        except (TypeError, ValueError):
            continue  # not numeric
    with _DATABASE_LOCK:
        _RANGES[key] = ranges
    return ranges


_RANK_LOCK = threading.Lock()
_RANKED: dict[str, Path] = {}
_CACHE_DIR: list[Path] = []


def _private_cache_dir() -> Path:
    if not _CACHE_DIR:
        _CACHE_DIR.append(Path(tempfile.mkdtemp(prefix="sandbox-dp-")))  # mode 0700, this process only
        # Ranked copies hold real rows: they must not outlive the process in /tmp.
        atexit.register(shutil.rmtree, _CACHE_DIR[0], True)
    return _CACHE_DIR[0]


def _write_ranked(source: Path, dataset: DatasetPrivacy, target: Path) -> None:
    """Rank each row within its unit in a secret keyed-hash order; drop the unit column."""
    salt = secrets.randbits(62)
    unit = _quote(dataset.privacy_unit)
    # Only the declared columns, named one by one: nothing of the file (an undeclared column, a reader's
    # virtual column such as file_row_number) can take the rank column's place. Ties in the keyed hash
    # (identical rows) are harmless: row_number() still gives each row of a unit its own rank.
    kept = [_quote(c) for c in dataset.columns if c != dataset.privacy_unit]
    order = f"hash({', '.join([*kept, unit])}, {salt:d})"
    path = str(source).replace("'", "''")
    partial = target.with_name(target.name + f".{os.getpid()}.partial")
    connection = duck.connect()
    try:
        # The window spills rather than holding the version in memory: queries' peak stays near DuckDB's own.
        connection.execute("SET preserve_insertion_order=false")
        connection.execute(f"SET memory_limit='{RANKING_MEMORY_LIMIT}'")
        connection.execute(f"SET temp_directory='{str(target.parent).replace(chr(39), chr(39) * 2)}'")
        connection.execute(
            f"COPY (SELECT {''.join(k + ', ' for k in kept)}"  # noqa: S608 - identifiers from the card
            f"row_number() OVER (PARTITION BY {unit} ORDER BY {order})::UINTEGER "
            f"AS {_quote(RANK_COLUMN)} FROM read_parquet('{path}')) "
            f"TO '{str(partial).replace(chr(39), chr(39) * 2)}' (FORMAT parquet)")
    finally:
        connection.close()
    os.replace(partial, target)
