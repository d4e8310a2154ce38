"""The query plan: a buyer's SQL checked against the dataset's privacy metadata, as bounded aggregates. No I/O.

`plan_query` validates the SQL (see `sql.py`) and the plan lists the primitive statistics the answer
needs (counts, fixed-point sums, quantile histograms), the fixed-point grid each clamped column is
summed on, and, with the request's budget, the query's `PrivacyCost` (`QueryPlan.cost`): computed here
once, then reserved, spent by the engine and reported as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sandbox.budgets.cost import PrivacyCost
from sandbox.catalog.cards import is_reserved_column
from sandbox.dp import sensitivity
from sandbox.dp.sensitivity import Contribution
from sandbox.dp.sql import OutputColumn, ParsedQuery, Schema, parse_query
from sandbox.errors import Invalid

MAX_PUBLIC_GROUPS = 10_000
SUM_GRID_BITS = 20        # fixed-point sums: |value| <= 2^20 grid steps per row
CENTRED_GRID_BITS = 15    # centred values for AVG/VARIANCE: squares stay below 2^30 per row
QUANTILE_CANDIDATES = 1024

# One primitive statistic: (kind, column, quantile level). Kinds: count_rows, count, sum, centred_sum (for
# AVG), centred_sum_var and centred_squares (for VARIANCE/STDDEV), quantile.
Statistic = tuple[str, str | None, float | None]
COUNT_ROWS: Statistic = ("count_rows", None, None)


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

    @property
    def statistics(self) -> list[Statistic]:
        """The distinct primitive statistics the query needs, in a stable order; each gets an equal budget share."""
        needed: list[Statistic] = []
        if not self.public_keys:
            needed.append(COUNT_ROWS)  # the threshold count, reused for COUNT(*)
        for output in self.outputs:
            aggregate = output.aggregate
            if aggregate is None:
                continue
            column = aggregate.column
            parts: list[Statistic]
            if aggregate.kind == "count_rows":
                parts = [COUNT_ROWS]
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

    def cells(self) -> int | None:
        """How many output cells the answer has: the public groups, or None when keys are not public."""
        return group_count(self.dataset, self.group_by) if self.public_keys else None

    def cost(self, *, epsilon: float | None = None, rho: float | None = None, delta: float = 0.0) -> PrivacyCost:
        """What this query costs under a budget of epsilon (pure DP) or rho (zCDP), plus delta."""
        return PrivacyCost.requested(epsilon=epsilon, rho=rho, delta=delta, private_keys=not self.public_keys)

    def check_cost(self, cost: PrivacyCost) -> None:
        """Refuse a cost this plan cannot be answered under (group keys without public categories need delta)."""
        if cost.private_keys == self.public_keys:
            raise ValueError("the cost was computed for another plan")
        if not self.public_keys and cost.delta_units <= 0:
            columns = [c for c in self.group_by if public_categories(self.dataset, c) is None]
            raise Invalid(f"GROUP BY {', '.join(columns)}: keys without public categories need delta > 0",
                          errors=[f"column {c!r} has no public categories" for c in columns])


def plan_query(sql: str, dataset: DatasetPrivacy) -> QueryPlan:
    """Validate `sql` against the dataset's privacy metadata; Invalid names every unsupported part."""
    reserved = sorted(c for c in dataset.columns if is_reserved_column(c))
    if reserved:
        # A card stored before the namespace was reserved: its column could pose as the engine's own.
        raise Invalid(f"dataset {dataset.name!r} declares columns in the reserved namespace "
                      f"({', '.join(reserved)}); a steward must register it again under other names",
                      errors=[f"column {c!r} is reserved" for c in reserved])
    query = parse_query(sql, dataset.schema())
    public = all(public_categories(dataset, column) is not None for column in query.group_by)
    if public and group_count(dataset, query.group_by) > MAX_PUBLIC_GROUPS:
        raise Invalid(f"GROUP BY would produce more than {MAX_PUBLIC_GROUPS} groups", errors=["too many groups"])
    return QueryPlan(key=query.digest(dataset.name), dataset=dataset, query=query, public_keys=public)


@dataclass(frozen=True)
class Grid:
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


def grid(dataset: DatasetPrivacy, column: str, bits: int, centred: bool) -> Grid:
    low, high = public_bounds(dataset, column)
    reach = (high - low) / 2 if centred else max(abs(low), abs(high))
    scale = 2.0 ** (bits - math.ceil(math.log2(reach))) if reach > 0 else 1.0
    if dataset.columns[column].get("type") == "integer":
        scale = min(scale, 1.0)
    return Grid(scale=scale, low=math.ceil(low * scale), high=math.floor(high * scale))


def statistic_grid(dataset: DatasetPrivacy, statistic: Statistic) -> Grid:
    """The grid a summed statistic adds its column's values on."""
    kind, column, _ = statistic
    assert column is not None
    if kind == "sum":
        return grid(dataset, column, SUM_GRID_BITS, centred=False)
    # AVG's centred sum has no square to keep small, so it gets a finer grid than VARIANCE's.
    bits = CENTRED_GRID_BITS + 5 if kind == "centred_sum" else CENTRED_GRID_BITS
    return grid(dataset, column, bits, centred=True)


def magnitude(dataset: DatasetPrivacy, statistic: Statistic) -> int:
    """The most one row can add to the statistic, in grid steps (1 for counts)."""
    kind = statistic[0]
    if kind in {"count_rows", "count"}:
        return 1
    if kind == "sum":
        return statistic_grid(dataset, statistic).magnitude
    centred = statistic_grid(dataset, statistic).centred_magnitude
    return centred * centred if kind == "centred_squares" else centred


def quantile_candidates(dataset: DatasetPrivacy, column: str) -> list[float]:
    """The values a quantile may take: every integer in the bounds, or QUANTILE_CANDIDATES evenly spaced."""
    low, high = public_bounds(dataset, column)
    integer = dataset.columns[column].get("type") == "integer"
    if integer and high - low < QUANTILE_CANDIDATES:
        return [float(v) for v in range(math.ceil(low), math.floor(high) + 1)]
    step = (high - low) / (QUANTILE_CANDIDATES - 1)
    return [low + i * step for i in range(QUANTILE_CANDIDATES)]


def statistic_name(statistic: Statistic) -> str:
    kind, column, level = statistic
    names = {"count_rows": "COUNT(*)", "count": f"COUNT({column})", "sum": f"SUM({column})",
             "centred_sum": f"centred SUM({column})", "centred_sum_var": f"centred SUM({column}) for variance",
             "centred_squares": f"centred SUM({column}^2)", "quantile": f"QUANTILE({column}, {level:g})"
             if level is not None else ""}
    return names[kind]


def public_bounds(dataset: DatasetPrivacy, column: str) -> tuple[float, float]:
    """A column's bounds, only if public: a hidden bound must never shape a released number."""
    spec = dataset.columns.get(column, {})
    if not spec.get("public") or spec.get("bounds") is None:
        raise Invalid(f"column {column!r} needs public bounds for this query",
                      errors=[f"column {column!r} needs public bounds"])
    low, high = (float(b) for b in spec["bounds"])
    return low, high


def public_categories(dataset: DatasetPrivacy, column: str) -> list[Any] | None:
    spec = dataset.columns.get(column, {})
    categories = spec.get("categories")
    return list(categories) if categories is not None and spec.get("public") else None


def group_count(dataset: DatasetPrivacy, columns: tuple[str, ...]) -> int:
    return math.prod(len(public_categories(dataset, c) or []) for c in columns)
