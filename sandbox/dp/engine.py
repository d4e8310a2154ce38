"""The DP SQL engine: DuckDB computes bounded aggregates, OpenDP's samplers add noise scaled in closed form.

Flow: `plan_query` validates a buyer's SQL against the dataset's privacy metadata (see `sql.py`);
`execute` renders its own DuckDB SQL from the plan, runs it on the version's Parquet in a locked-down
in-memory connection, adds noise per statistic (`noise.py`) and derives AVG/VARIANCE/STDDEV from
the noisy sums and counts.

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
import itertools
import json
import math
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import duckdb

from sandbox import duck
from sandbox.catalog.cards import is_reserved_column
from sandbox.dp import noise, sensitivity
from sandbox.dp.noise import Loss
from sandbox.dp.sensitivity import Contribution
from sandbox.dp.sql import (
    Aggregate,
    AllOf,
    AnyOf,
    Between,
    Comparison,
    Condition,
    InList,
    IsNull,
    Negation,
    OutputColumn,
    ParsedQuery,
    Schema,
    parse_query,
)
from sandbox.errors import Invalid

MAX_PUBLIC_GROUPS = 10_000
SUM_GRID_BITS = 20        # fixed-point sums: |value| <= 2^20 grid steps per row
CENTRED_GRID_BITS = 15    # centred values for AVG/VARIANCE: squares stay below 2^30 per row
QUANTILE_CANDIDATES = 1024
# The engine's own column lives in the reserved namespace (`cards.is_reserved_column`), which no card may
# declare; the ranked copy holds only the card's declared columns and this one, so the filter below is
# certain to read the rank and never a data column of the same name (review 11.2).
RANK_COLUMN = "__sandbox_unit_rank"
RANKING_MEMORY_LIMIT = "256MB"


@dataclass(frozen=True)
class DatasetPrivacy:
    """A dataset's privacy metadata as the engine needs it."""

    name: str
    privacy_unit: str
    one_row_per_unit: bool
    columns: dict[str, dict[str, Any]]
    rows_per_unit: int = 1
    groups_per_unit: int = 1

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> DatasetPrivacy:
        """From a stored card dict (`DatasetCard.model_dump(mode="json")` or the demo CARD)."""
        settings = card.get("dp") or {}
        return cls(name=str(card["name"]), privacy_unit=str(card["privacy_unit"]),
                   one_row_per_unit=card.get("privacy_unit_rows", "many") == "one",
                   columns={name: dict(spec) for name, spec in card["columns"].items()},
                   rows_per_unit=int(settings.get("rows_per_unit", 1)),
                   groups_per_unit=int(settings.get("groups_per_unit", 1)))

    def schema(self) -> Schema:
        return Schema(name=self.name, privacy_unit=self.privacy_unit, columns=self.columns)

    def contribution(self, cells: int | None) -> Contribution:
        """What one unit can add after bounding, over `cells` output cells (None: keys not known in advance)."""
        if self.one_row_per_unit:
            return sensitivity.row_level()
        rows = self.rows_per_unit * self.groups_per_unit
        return sensitivity.total_row_bound(rows, cells if cells is not None else rows)


@dataclass(frozen=True)
class Budget:
    """Exactly one of epsilon (pure DP) or rho (zCDP); delta pays for releasing private group keys."""

    epsilon: float | None = None
    rho: float | None = None
    delta: float = 0.0

    def __post_init__(self) -> None:
        if (self.epsilon is None) == (self.rho is None):
            raise Invalid("give exactly one of epsilon (pure DP) or rho (zCDP)")
        for name, value in (("epsilon", self.epsilon), ("rho", self.rho)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise Invalid(f"{name} must be a positive finite number")
        if not (math.isfinite(self.delta) and 0 <= self.delta < 1):
            raise Invalid("delta must be in [0, 1)")


@dataclass(frozen=True)
class QueryPlan:
    """A validated query; `key` is stable across spacing and letter case, for answer caching."""

    key: str
    dataset: DatasetPrivacy = field(compare=False)
    query: ParsedQuery
    public_keys: bool  # every GROUP BY column has public categories (or there is no GROUP BY)

    @property
    def group_by(self) -> tuple[str, ...]:
        return self.query.group_by

    @property
    def outputs(self) -> tuple[OutputColumn, ...]:
        return self.query.outputs


@dataclass(frozen=True)
class Answer:
    columns: list[str]
    rows: list[list[Any]]
    accuracy: list[list[float | None]]
    epsilon_spent: float
    rho_spent: float | None
    delta_spent: float
    mechanism: str
    notes: list[str]


def plan_query(sql: str, dataset: DatasetPrivacy) -> QueryPlan:
    """Validate `sql` against the dataset's privacy metadata; Invalid names every unsupported part."""
    reserved = sorted(c for c in dataset.columns if is_reserved_column(c))
    if reserved:
        # A card stored before the namespace was reserved: its column could pose as the engine's own.
        raise Invalid(f"dataset {dataset.name!r} declares columns in the reserved namespace "
                      f"({', '.join(reserved)}); a steward must register it again under other names",
                      errors=[f"column {c!r} is reserved" for c in reserved])
    query = parse_query(sql, dataset.schema())
    public = all(_public_categories(dataset, column) is not None for column in query.group_by)
    if public and _group_count(dataset, query.group_by) > MAX_PUBLIC_GROUPS:
        raise Invalid(f"GROUP BY would produce more than {MAX_PUBLIC_GROUPS} groups", errors=["too many groups"])
    return QueryPlan(key=query.digest(dataset.name), dataset=dataset, query=query, public_keys=public)


def zcdp_to_approx_dp(rho: float, delta: float) -> float:
    """The epsilon of (epsilon, delta)-DP implied by rho-zCDP (Bun & Steinke 2016, Prop. 1.3)."""
    if rho < 0 or not 0 < delta < 1:
        raise ValueError("rho must be non-negative and delta in (0, 1)")
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


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


def execute(plan: QueryPlan, parquet: Path, budget: Budget, *, cache_dir: Path | None = None) -> Answer:
    """Run the plan on the version's Parquet and add noise; spends exactly `budget` for the whole query."""
    dataset = plan.dataset
    if not plan.public_keys and budget.delta <= 0:
        columns = [c for c in plan.group_by if _public_categories(dataset, c) is None]
        raise Invalid(f"GROUP BY {', '.join(columns)}: keys without public categories need delta > 0",
                      errors=[f"column {c!r} has no public categories" for c in columns])
    source = Path(parquet) if dataset.one_row_per_unit else prepare(parquet, dataset, cache_dir)
    statistics = _statistics(plan)
    cells = _group_count(dataset, plan.group_by) if plan.public_keys else None
    contribution = dataset.contribution(cells)
    with _connection(source) as connection:
        runner = _Runner(plan, connection, contribution, budget, statistics, _ranges(source))
        return runner.answer()


def _statistics(plan: QueryPlan) -> list[tuple[str, str | None, float | None]]:
    """The distinct primitive statistics the query needs, in a stable order."""
    needed: list[tuple[str, str | None, float | None]] = []
    if not plan.public_keys:
        needed.append(("count_rows", None, None))  # the threshold count, reused for COUNT(*)
    for output in plan.outputs:
        aggregate = output.aggregate
        if aggregate is None:
            continue
        column = aggregate.column
        parts: list[tuple[str, str | None, float | None]]
        if aggregate.kind == "count_rows":
            parts = [("count_rows", None, None)]
        elif aggregate.kind == "count":
            parts = [("count", column, None)]
        elif aggregate.kind == "sum":
            parts = [("sum", column, None)]
        elif aggregate.kind == "avg":
            parts = [("count", column, None), ("centred_sum", column, None)]
        elif aggregate.kind == "quantile":
            parts = [("quantile", column, aggregate.quantile)]
        else:
            parts = [("count", column, None), ("centred_sum_var", column, None), ("centred_squares", column, None)]
        for part in parts:
            if part not in needed:
                needed.append(part)
    return needed


@dataclass(frozen=True)
class _Grid:
    """Fixed-point representation of a clamped column: value ~ steps / scale, steps in [low, high]."""

    scale: float
    low: int
    high: int

    @property
    def middle(self) -> int:
        return (self.low + self.high) // 2

    @property
    def magnitude(self) -> int:
        return max(abs(self.low), abs(self.high))

    @property
    def centred_magnitude(self) -> int:
        return max(self.high - self.middle, self.middle - self.low)


def _grid(dataset: DatasetPrivacy, column: str, bits: int, centred: bool) -> _Grid:
    low, high = _public_bounds(dataset, column)
    reach = (high - low) / 2 if centred else max(abs(low), abs(high))
    scale = 2.0 ** (bits - math.ceil(math.log2(reach))) if reach > 0 else 1.0
    if dataset.columns[column].get("type") == "integer":
        scale = min(scale, 1.0)
    return _Grid(scale=scale, low=math.ceil(low * scale), high=math.floor(high * scale))


class _Runner:
    def __init__(self, plan: QueryPlan, connection: duckdb.DuckDBPyConnection, contribution: Contribution,
                 budget: Budget, statistics: list[tuple[str, str | None, float | None]],
                 ranges: dict[str, tuple[float, float]] | None = None) -> None:
        self.plan = plan
        self.ranges = ranges or {}
        self.dataset = plan.dataset
        self.connection = connection
        self.contribution = contribution
        self.budget = budget
        self.statistics = statistics
        share = len(statistics)
        self.loss = Loss(epsilon=budget.epsilon / share if budget.epsilon is not None else None,
                         rho=budget.rho / share if budget.rho is not None else None)
        self.notes: list[str] = []
        self.mechanisms: set[str] = set()
        self.threshold_delta = 0.0

    def answer(self) -> Answer:
        plan = self.plan
        keys = list(plan.group_by)
        measures = [s for s in self.statistics if s[0] != "quantile"]
        rows = self.aggregate_rows(keys, measures)
        noisy: dict[tuple[str, str | None, float | None], tuple[dict[tuple[Any, ...], int], float]] = {}
        if plan.public_keys:
            groups = self.public_groups()
        else:
            groups, counts = self.release_keys(rows, measures.index(("count_rows", None, None)))
            noisy[("count_rows", None, None)] = counts
        for index, statistic in enumerate(measures):
            if statistic in noisy:
                continue
            values = [int(rows.get(group, [0] * len(measures))[index] or 0) for group in groups]
            bound = self.magnitude(statistic)
            norms = sensitivity.sum_of_bounded(self.contribution, bound)
            released = noise.add_noise(values, l1=math.ceil(norms.l1), l2=norms.l2, loss=self.loss)
            self.mechanisms.add(released.mechanism)
            noisy[statistic] = (dict(zip(groups, released.values, strict=True)), released.accuracy)
        quantiles = {s: self.quantile(s, groups) for s in self.statistics if s[0] == "quantile"}
        table, accuracy = self.assemble(groups, noisy, quantiles)
        self.notes.insert(0, self.split_note())
        epsilon, rho, delta = self.spent()
        return Answer(columns=[o.name for o in plan.outputs], rows=table, accuracy=accuracy, epsilon_spent=epsilon,
                      rho_spent=rho, delta_spent=delta, mechanism="+".join(sorted(self.mechanisms)), notes=self.notes)

    def spent(self) -> tuple[float, float | None, float]:
        budget = self.budget
        if budget.epsilon is not None:
            return budget.epsilon, None, self.threshold_delta
        assert budget.rho is not None
        if budget.delta <= 0:
            self.notes.append("zCDP with delta = 0 has no finite (epsilon, delta) equivalent; epsilon_spent is inf")
            return math.inf, budget.rho, 0.0
        conversion_delta = budget.delta - self.threshold_delta
        return zcdp_to_approx_dp(budget.rho, conversion_delta), budget.rho, budget.delta

    def split_note(self) -> str:
        names = ", ".join(_statistic_name(s) for s in self.statistics)
        if self.budget.epsilon is not None:
            share = f"epsilon {self.loss.epsilon:.6g} each (of {self.budget.epsilon:g})"
        else:
            share = f"rho {self.loss.rho:.6g} each (of {self.budget.rho:g})"
        return f"budget split equally over {len(self.statistics)} noisy statistics ({names}): {share}"

    # --- DuckDB ---------------------------------------------------------------------------------------

    def aggregate_rows(self, keys: list[str], measures: list[tuple[str, str | None, float | None]]
                       ) -> dict[tuple[Any, ...], list[Any]]:
        if not keys and not measures:
            return {(): []}  # only quantiles, no GROUP BY: nothing to aggregate here (review 11.8)
        selects = [_quote(k) for k in keys] + [self.measure_sql(m) for m in measures]
        sql = f"SELECT {', '.join(selects)} FROM dataset{self.where_sql()}"  # noqa: S608 - rendered from the plan
        if keys:
            sql += " GROUP BY " + ", ".join(_quote(k) for k in keys)
        result: dict[tuple[Any, ...], list[Any]] = {}
        for row in self.connection.execute(sql).fetchall():
            result[tuple(row[: len(keys)])] = list(row[len(keys):])
        return result

    def where_sql(self) -> str:
        parts = []
        if not self.dataset.one_row_per_unit:
            parts.append(f"{_quote(RANK_COLUMN)} <= {self.dataset.rows_per_unit * self.dataset.groups_per_unit:d}")
        if self.plan.query.where is not None:
            parts.append(_condition_sql(self.plan.query.where))
        return " WHERE " + " AND ".join(f"({p})" for p in parts) if parts else ""

    def measure_sql(self, statistic: tuple[str, str | None, float | None]) -> str:
        kind, column, _ = statistic
        if kind == "count_rows":
            return "count(*)"
        assert column is not None
        if kind == "count":
            return f"count({_quote(column)})"
        if kind == "sum":
            grid = _grid(self.dataset, column, SUM_GRID_BITS, centred=False)
            return f"coalesce(sum({_steps_sql(column, grid, self.dataset, self.ranges)}), 0)"
        grid = _grid(self.dataset, column, _centred_bits(kind), centred=True)
        steps = f"({_steps_sql(column, grid, self.dataset, self.ranges)} - {grid.middle:d})"
        if kind == "centred_squares":
            return f"coalesce(sum({steps} * {steps}), 0)"
        return f"coalesce(sum({steps}), 0)"

    def magnitude(self, statistic: tuple[str, str | None, float | None]) -> int:
        kind, column, _ = statistic
        if kind in {"count_rows", "count"}:
            return 1
        assert column is not None
        if kind == "sum":
            return _grid(self.dataset, column, SUM_GRID_BITS, centred=False).magnitude
        centred = _grid(self.dataset, column, _centred_bits(kind), centred=True).centred_magnitude
        return centred * centred if kind == "centred_squares" else centred

    # --- group keys -----------------------------------------------------------------------------------

    def public_groups(self) -> list[tuple[Any, ...]]:
        if not self.plan.group_by:
            return [()]
        lists = [_public_categories(self.dataset, c) or [] for c in self.plan.group_by]
        self.notes.append("every combination of the public categories is listed, with or without rows")
        return list(itertools.product(*lists))

    def release_keys(self, rows: dict[tuple[Any, ...], list[Any]], count_index: int
                     ) -> tuple[list[tuple[Any, ...]], tuple[dict[tuple[Any, ...], int], float]]:
        by_text = {json.dumps(list(k), default=str): k for k in rows}
        counts = {text: int(rows[key][count_index]) for text, key in by_text.items()}
        norms = sensitivity.count_rows(self.contribution)
        delta = self.budget.delta if self.budget.epsilon is not None else self.budget.delta / 2
        loss = Loss(epsilon=self.loss.epsilon, rho=self.loss.rho, delta=delta)
        released = noise.threshold_counts(counts, l0=norms.l0, l1=math.ceil(norms.l1), l2=norms.l2,
                                          linf=math.ceil(norms.linf), loss=loss)
        self.threshold_delta = delta
        self.mechanisms.add(released.mechanism)
        self.notes.append(f"group keys are not public: only keys whose noisy row count reached {released.threshold} "
                          f"are shown (delta {delta:g}); the noisy COUNT(*) is that same count")
        groups = sorted((by_text[text] for text in released.counts), key=lambda k: json.dumps(list(k), default=str))
        values = {by_text[text]: value for text, value in released.counts.items()}
        return groups, (values, released.accuracy)

    # --- quantiles ------------------------------------------------------------------------------------

    def quantile(self, statistic: tuple[str, str | None, float | None], groups: list[tuple[Any, ...]]
                 ) -> dict[tuple[Any, ...], float]:
        _, column, level = statistic
        assert column is not None and level is not None
        low, high = _public_bounds(self.dataset, column)
        integer = self.dataset.columns[column].get("type") == "integer"
        if integer and high - low < QUANTILE_CANDIDATES:
            candidates = [float(v) for v in range(math.ceil(low), math.floor(high) + 1)]
        else:
            step = (high - low) / (QUANTILE_CANDIDATES - 1)
            candidates = [low + i * step for i in range(QUANTILE_CANDIDATES)]
        step = candidates[1] - candidates[0] if len(candidates) > 1 else 1.0
        keys = [_quote(k) for k in self.plan.group_by]
        clamped = f"greatest(least({_quote(column)}::DOUBLE, {_float(high)}), {_float(low)})"
        bucket = f"least(greatest(round(({clamped} - {_float(candidates[0])}) / {_float(step)}), 0), " \
                 f"{len(candidates) - 1})::INTEGER"
        where = self.where_sql()
        where += (" AND " if where else " WHERE ") + f"{_quote(column)} IS NOT NULL"
        sql = (f"SELECT {', '.join([*keys, bucket, 'count(*)'])} FROM dataset{where} "  # noqa: S608 - from the plan
               f"GROUP BY {', '.join([*keys, bucket])}")
        histograms: dict[tuple[Any, ...], list[int]] = {}
        for row in self.connection.execute(sql).fetchall():
            histogram = histograms.setdefault(tuple(row[: len(keys)]), [0] * len(candidates))
            histogram[int(row[len(keys)])] += int(row[len(keys) + 1])
        fraction = Fraction(level).limit_denominator(1000)
        numerator, denominator = fraction.numerator, fraction.denominator
        norms = sensitivity.quantile_score(self.contribution, numerator, denominator)
        d_in = math.ceil(norms.l1 if self.loss.is_pure else norms.l2)
        self.mechanisms.add("noisy_max")
        self.notes.append(f"{_statistic_name(statistic)}: report-noisy-max over {len(candidates)} candidates in the "
                          "bounds (values snapped to the grid); no closed-form interval, accuracy left empty")
        chosen: dict[tuple[Any, ...], float] = {}
        for group in groups:
            histogram = histograms.get(group, [0] * len(candidates))
            total, below, scores = sum(histogram), 0, []
            for count in histogram:
                above = total - below - count
                scores.append(abs((denominator - numerator) * below - numerator * above))
                below += count
            chosen[group] = candidates[noise.select_lowest(scores, d_in=d_in, loss=self.loss)]
        return chosen

    # --- the answer table -----------------------------------------------------------------------------

    def assemble(self, groups: list[tuple[Any, ...]],
                 noisy: dict[tuple[str, str | None, float | None], tuple[dict[tuple[Any, ...], int], float]],
                 quantiles: dict[tuple[str, str | None, float | None], dict[tuple[Any, ...], float]]
                 ) -> tuple[list[list[Any]], list[list[float | None]]]:
        table: list[list[Any]] = []
        accuracy: list[list[float | None]] = []
        noted: set[str] = set()
        for group in groups:
            row: list[Any] = []
            row_accuracy: list[float | None] = []
            for output in self.plan.outputs:
                if output.key is not None:
                    row.append(group[self.plan.group_by.index(output.key)])
                    row_accuracy.append(None)
                    continue
                assert output.aggregate is not None
                value, half_width = self.cell(output.aggregate, group, noisy, quantiles, noted)
                row.append(value)
                row_accuracy.append(half_width)
            table.append(row)
            accuracy.append(row_accuracy)
        return table, accuracy

    def cell(self, aggregate: Aggregate, group: tuple[Any, ...],
             noisy: dict[tuple[str, str | None, float | None], tuple[dict[tuple[Any, ...], int], float]],
             quantiles: dict[tuple[str, str | None, float | None], dict[tuple[Any, ...], float]],
             noted: set[str]) -> tuple[Any, float | None]:
        column, kind = aggregate.column, aggregate.kind

        def get(name: str) -> tuple[float, float]:
            values, half_width = noisy[(name, column if name != "count_rows" else None, None)]
            return float(values[group]), half_width

        if kind == "count_rows":
            value, half_width = get("count_rows")
            return int(value), half_width
        if kind == "count":
            value, half_width = get("count")
            return int(value), half_width
        if kind == "quantile":
            return quantiles[("quantile", column, aggregate.quantile)][group], None
        assert column is not None
        low, high = _public_bounds(self.dataset, column)
        if kind == "sum":
            grid = _grid(self.dataset, column, SUM_GRID_BITS, centred=False)
            value, half_width = get("sum")
            result = value / grid.scale
            return (int(result) if grid.scale == 1 else result), half_width / grid.scale
        count = get("count")
        if kind == "avg":
            grid = _grid(self.dataset, column, CENTRED_GRID_BITS + 5, centred=True)
            centred = get("centred_sum")
            if "avg" not in noted:
                noted.add("avg")
                self.notes.append("AVG = midpoint + noisy centred SUM / noisy COUNT (each its own share of the "
                                  "budget); accuracy by the delta method from the two 95% half-widths")

            def average(s: float, n: float) -> float:
                return min(high, max(low, (grid.middle + s / max(n, 1.0)) / grid.scale))

            return _with_accuracy(average, [centred, count])
        grid = _grid(self.dataset, column, CENTRED_GRID_BITS, centred=True)
        sums, squares = get("centred_sum_var"), get("centred_squares")
        population = kind in {"var_pop", "stddev_pop"}
        root = kind.startswith("stddev")
        if "var" not in noted:
            noted.add("var")
            self.notes.append("VARIANCE/STDDEV from noisy COUNT, centred SUM and SUM of squares (a share each), "
                              "clamped to [0, (hi - lo)^2 / 4]; accuracy by the delta method")
        ceiling = ((high - low) / 2) ** 2

        def variance(q: float, s: float, n: float) -> float:
            n = max(n, 2.0)
            spread = (q - s * s / n) / (n if population else n - 1) / (grid.scale * grid.scale)
            spread = min(ceiling, max(0.0, spread))
            return math.sqrt(spread) if root else spread

        return _with_accuracy(variance, [squares, sums, count])


def _centred_bits(kind: str) -> int:
    # AVG's centred sum has no square to keep small, so it gets a finer grid than VARIANCE's.
    return CENTRED_GRID_BITS + 5 if kind == "centred_sum" else CENTRED_GRID_BITS


def _with_accuracy(function: Callable[..., float], inputs: list[tuple[float, float]]) -> tuple[float, float]:
    """A derived value and a first-order (delta-method) 95% half-width from its inputs' half-widths."""
    values = [value for value, _ in inputs]
    result = function(*values)
    total = 0.0
    for index, (_, half_width) in enumerate(inputs):
        moved = list(values)
        moved[index] += half_width
        total += (function(*moved) - result) ** 2
    return result, math.sqrt(total)


def _statistic_name(statistic: tuple[str, str | None, float | None]) -> str:
    kind, column, level = statistic
    names = {"count_rows": "COUNT(*)", "count": f"COUNT({column})", "sum": f"SUM({column})",
             "centred_sum": f"centred SUM({column})", "centred_sum_var": f"centred SUM({column}) for variance",
             "centred_squares": f"centred SUM({column}^2)", "quantile": f"QUANTILE({column}, {level:g})"
             if level is not None else ""}
    return names[kind]


def _steps_sql(column: str, grid: _Grid, dataset: DatasetPrivacy,
               ranges: dict[str, tuple[float, float]] | None = None) -> str:
    """Clamp to the bounds, then to fixed-point steps, then clamp the steps (exact whatever the rounding).

    A clamp that the file's own statistics prove to be the identity (every value already within the
    bounds) is left out: the answer is the same and the scan a quarter faster.
    """
    low, high = _public_bounds(dataset, column)
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


def _public_bounds(dataset: DatasetPrivacy, column: str) -> tuple[float, float]:
    """A column's bounds, only if public: a hidden bound must never shape a released number."""
    spec = dataset.columns.get(column, {})
    if not spec.get("public") or spec.get("bounds") is None:
        raise Invalid(f"column {column!r} needs public bounds for this query",
                      errors=[f"column {column!r} needs public bounds"])
    low, high = (float(b) for b in spec["bounds"])
    return low, high


def _public_categories(dataset: DatasetPrivacy, column: str) -> list[Any] | None:
    spec = dataset.columns.get(column, {})
    categories = spec.get("categories")
    return list(categories) if categories is not None and spec.get("public") else None


def _group_count(dataset: DatasetPrivacy, columns: tuple[str, ...]) -> int:
    return math.prod(len(_public_categories(dataset, c) or []) for c in columns)


# --- rendering SQL from the plan -----------------------------------------------------------------------

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

class _connection:
    """A cursor on an in-memory DuckDB that can read one Parquet file and nothing else, settings locked.

    The database per file is kept (a few at most): opening one and binding the view costs ~20 ms,
    a third of a 10M-row query. Each query gets its own cursor, so threads never share one.
    """

    def __init__(self, parquet: Path) -> None:
        self.parquet = str(Path(parquet).resolve())

    def __enter__(self) -> duckdb.DuckDBPyConnection:
        with _DATABASE_LOCK:
            database = _DATABASES.pop(self.parquet, None) or _open_database(self.parquet)
            _DATABASES[self.parquet] = database  # most recently used last
            while len(_DATABASES) > MAX_OPEN_DATABASES:
                _DATABASES.pop(next(iter(_DATABASES))).close()
            self.cursor = database.cursor()
        return self.cursor

    def __exit__(self, *_: object) -> None:
        self.cursor.close()


MAX_OPEN_DATABASES = 8
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
