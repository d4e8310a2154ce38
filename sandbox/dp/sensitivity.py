"""Sensitivity rules for bounded aggregates: plain functions from contribution bounds to norms, no I/O.

A privacy unit (a patient, say) is added to or removed from the data. After bounding, the unit
touches at most `groups` output cells, at most `rows_per_group` rows in any one cell and at most
`rows_total` rows in all. Every aggregate's sensitivity follows from those three numbers and the
per-row bound of the value it adds up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Contribution:
    """How much one privacy unit can contribute after bounding."""

    groups: int          # L0: output cells one unit can touch
    rows_per_group: int  # rows one unit can put into one cell
    rows_total: int      # rows one unit can put into all cells together

    def __post_init__(self) -> None:
        if min(self.groups, self.rows_per_group, self.rows_total) < 1:
            raise ValueError("contribution bounds must be positive integers")


@dataclass(frozen=True)
class Sensitivity:
    """How far one unit can move the vector of per-cell values, in each norm."""

    l0: int
    l1: float
    l2: float
    linf: float


def row_level() -> Contribution:
    """One row per privacy unit: the unit is the row."""
    return Contribution(groups=1, rows_per_group=1, rows_total=1)


def per_group_bounds(rows_per_unit: int, groups_per_unit: int) -> Contribution:
    """At most `rows_per_unit` rows in each of at most `groups_per_unit` cells."""
    return Contribution(groups=groups_per_unit, rows_per_group=rows_per_unit,
                        rows_total=rows_per_unit * groups_per_unit)


def total_row_bound(rows_total: int, cells: int) -> Contribution:
    """At most `rows_total` rows per unit wherever they fall, over `cells` possible output cells."""
    return Contribution(groups=max(1, min(rows_total, cells)), rows_per_group=rows_total, rows_total=rows_total)


def count_rows(bound: Contribution) -> Sensitivity:
    """A vector of per-cell row counts."""
    return sum_of_bounded(bound, 1)


def sum_of_bounded(bound: Contribution, magnitude: float) -> Sensitivity:
    """A vector of per-cell sums of values with |value| <= magnitude (a count is magnitude 1)."""
    if magnitude < 0 or not math.isfinite(magnitude):
        raise ValueError("the per-row magnitude must be finite and non-negative")
    linf_rows = min(bound.rows_per_group, bound.rows_total)
    l1_rows = min(bound.rows_total, bound.groups * linf_rows)
    # sum of c_i^2 with sum c_i <= total and c_i <= linf is at most linf * total.
    l2_rows = min(math.sqrt(bound.groups) * linf_rows, math.sqrt(linf_rows * l1_rows))
    return Sensitivity(l0=bound.groups, l1=l1_rows * magnitude, l2=l2_rows * magnitude, linf=linf_rows * magnitude)


def sum_magnitude(lower: float, upper: float) -> float:
    """The largest |value| a value clamped to [lower, upper] can have."""
    if not lower <= upper:
        raise ValueError("lower bound must not exceed upper bound")
    return max(abs(lower), abs(upper))


def centred_magnitude(lower: float, upper: float) -> float:
    """The largest |value - midpoint| for a value clamped to [lower, upper]."""
    if not lower <= upper:
        raise ValueError("lower bound must not exceed upper bound")
    return (upper - lower) / 2


def quantile_score(bound: Contribution, alpha_numerator: int, alpha_denominator: int) -> Sensitivity:
    """Per-cell quantile scores |(d - n) * #below - n * #above|: each row moves a score by max(n, d - n)."""
    if not 0 <= alpha_numerator <= alpha_denominator or alpha_denominator < 1:
        raise ValueError("alpha must be a fraction in [0, 1]")
    return sum_of_bounded(bound, max(alpha_numerator, alpha_denominator - alpha_numerator))
