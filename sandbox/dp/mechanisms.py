"""The DP answer from a plan's exact aggregates: budget split, noise, key threshold, quantiles, accuracy. No DuckDB.

The query's `PrivacyCost` is split equally over the plan's primitive statistics; each gets OpenDP's
noise (`noise.py`) on its exact per-group values, which a data source (`ExactAggregates`, the DuckDB
adapter in `duckdb_engine.py`) computes. AVG, VARIANCE and STDDEV are derived from the noisy sums and
counts, with delta-method accuracies. The answer carries the engine's own account of what it spent,
which the caller checks against the cost it reserved.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

from sandbox.budgets.cost import PrivacyCost, zcdp_to_approx_dp
from sandbox.dp import noise, sensitivity
from sandbox.dp.noise import Loss
from sandbox.dp.plan import (
    COUNT_ROWS,
    QueryPlan,
    Statistic,
    magnitude,
    public_bounds,
    public_categories,
    quantile_candidates,
    statistic_grid,
    statistic_name,
)
from sandbox.dp.sensitivity import Contribution
from sandbox.dp.sql import Aggregate

Group = tuple[Any, ...]
NoisyStatistic = tuple[dict[Group, int], float]  # noisy value per group, and its 95% half-width


class ExactAggregates(Protocol):
    """Where the exact, bounded aggregates come from (the version's rows, kept to each unit's bound)."""

    def rows(self, measures: list[Statistic]) -> dict[Group, list[Any]]:
        """Each group's (GROUP BY key values) exact value of each measure, in grid steps."""
        ...

    def histograms(self, statistic: Statistic, candidates: list[float]) -> dict[Group, list[int]]:
        """Each group's count of rows nearest to each quantile candidate."""
        ...


@dataclass(frozen=True)
class Answer:
    columns: list[str]
    rows: list[list[Any]]
    accuracy: list[list[float | None]]
    epsilon_spent: float   # the engine's own account of its spend, checked against the reserved cost
    rho_spent: float | None
    delta_spent: float
    mechanism: str
    notes: list[str]


def answer(plan: QueryPlan, cost: PrivacyCost, contribution: Contribution, data: ExactAggregates) -> Answer:
    """The noisy answer to `plan`, spending exactly `cost` (checked by `QueryPlan.check_cost`) over its statistics."""
    return _Mechanisms(plan, cost, contribution, data).answer()


class _Mechanisms:
    def __init__(self, plan: QueryPlan, cost: PrivacyCost, contribution: Contribution,
                 data: ExactAggregates) -> None:
        self.plan = plan
        self.dataset = plan.dataset
        self.cost = cost
        self.contribution = contribution
        self.data = data
        self.statistics = plan.statistics
        share = len(self.statistics)
        self.loss = Loss(epsilon=cost.epsilon / share if cost.is_pure else None,
                         rho=cost.rho / share if cost.rho is not None else None)
        self.notes: list[str] = []
        self.mechanisms: set[str] = set()
        self.threshold_delta = 0.0

    def answer(self) -> Answer:
        plan = self.plan
        measures = [s for s in self.statistics if s[0] != "quantile"]
        rows = self.data.rows(measures)
        noisy: dict[Statistic, NoisyStatistic] = {}
        if plan.public_keys:
            groups = self.public_groups()
        else:
            groups, counts = self.release_keys(rows, measures.index(COUNT_ROWS))
            noisy[COUNT_ROWS] = counts
        for index, statistic in enumerate(measures):
            if statistic in noisy:
                continue
            values = [int(rows.get(group, [0] * len(measures))[index] or 0) for group in groups]
            norms = sensitivity.sum_of_bounded(self.contribution, magnitude(self.dataset, statistic))
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
        """What the noise drawn spent, as (epsilon, rho, delta), from the losses handed to OpenDP."""
        cost = self.cost
        if cost.rho is None:
            return cost.epsilon, None, self.threshold_delta
        return zcdp_to_approx_dp(cost.rho, cost.delta - self.threshold_delta), cost.rho, cost.delta

    def split_note(self) -> str:
        names = ", ".join(statistic_name(s) for s in self.statistics)
        if self.cost.rho is None:
            share = f"epsilon {self.loss.epsilon:.6g} each (of {self.cost.epsilon:g})"
        else:
            share = f"rho {self.loss.rho:.6g} each (of {self.cost.rho:g})"
        return f"budget split equally over {len(self.statistics)} noisy statistics ({names}): {share}"

    # --- group keys -----------------------------------------------------------------------------------

    def public_groups(self) -> list[Group]:
        if not self.plan.group_by:
            return [()]
        lists = [public_categories(self.dataset, c) or [] for c in self.plan.group_by]
        self.notes.append("every combination of the public categories is listed, with or without rows")
        return list(itertools.product(*lists))

    def release_keys(self, rows: dict[Group, list[Any]], count_index: int) -> tuple[list[Group], NoisyStatistic]:
        by_text = {json.dumps(list(k), default=str): k for k in rows}
        counts = {text: int(rows[key][count_index]) for text, key in by_text.items()}
        norms = sensitivity.count_rows(self.contribution)
        delta = self.cost.threshold_delta
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

    def quantile(self, statistic: Statistic, groups: list[Group]) -> dict[Group, float]:
        _, column, level = statistic
        assert column is not None and level is not None
        candidates = quantile_candidates(self.dataset, column)
        histograms = self.data.histograms(statistic, candidates)
        fraction = Fraction(level).limit_denominator(1000)
        numerator, denominator = fraction.numerator, fraction.denominator
        norms = sensitivity.quantile_score(self.contribution, numerator, denominator)
        d_in = math.ceil(norms.l1 if self.loss.is_pure else norms.l2)
        self.mechanisms.add("noisy_max")
        self.notes.append(f"{statistic_name(statistic)}: report-noisy-max over {len(candidates)} candidates in the "
                          "bounds (values snapped to the grid); no closed-form interval, accuracy left empty")
        chosen: dict[Group, float] = {}
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

    def assemble(self, groups: list[Group], noisy: dict[Statistic, NoisyStatistic],
                 quantiles: dict[Statistic, dict[Group, float]]) -> tuple[list[list[Any]], list[list[float | None]]]:
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

    def cell(self, aggregate: Aggregate, group: Group, noisy: dict[Statistic, NoisyStatistic],
             quantiles: dict[Statistic, dict[Group, float]], noted: set[str]) -> tuple[Any, float | None]:
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
        low, high = public_bounds(self.dataset, column)
        if kind == "sum":
            grid = statistic_grid(self.dataset, ("sum", column, None))
            value, half_width = get("sum")
            result = value / grid.scale
            return (int(result) if grid.scale == 1 else result), half_width / grid.scale
        count = get("count")
        if kind == "avg":
            grid = statistic_grid(self.dataset, ("centred_sum", column, None))
            centred = get("centred_sum")
            if "avg" not in noted:
                noted.add("avg")
                self.notes.append("AVG = midpoint + noisy centred SUM / noisy COUNT (each its own share of the "
                                  "budget); accuracy by the delta method from the two 95% half-widths")

            def average(s: float, n: float) -> float:
                return min(high, max(low, (grid.middle + s / max(n, 1.0)) / grid.scale))

            return _with_accuracy(average, [centred, count])
        grid = statistic_grid(self.dataset, ("centred_sum_var", column, None))
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
