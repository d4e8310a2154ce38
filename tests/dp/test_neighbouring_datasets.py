"""Neighbouring datasets: adding one privacy unit's rows moves the output distribution by at most e^epsilon.

The engine bounds each unit's rows in DuckDB, then OpenDP adds noise scaled to that bound. The same
check run on a mutated plan that skips the bounding (it claims one row per unit) must fail: a unit
with 50 rows then moves the count far beyond what the noise hides.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sandbox.dp import duckdb_engine, noise, sensitivity
from sandbox.dp.plan import DatasetPrivacy, plan_query

EPSILON = 1.0
DRAWS = 20_000
MIN_MASS = 2000  # the buckets within one step of the centre: the ratio of two such counts varies by about 3%
SLACK = 1.3  # so sampling error stays far inside this: with MIN_MASS 400 it failed about 1 run in 120


def _write(path: Path, extra_unit_rows: int) -> Path:
    units = [f"U{i:04d}" for i in range(300) for _ in range(1 + i % 3)]
    units += ["VICTIM"] * extra_unit_rows
    pq.write_table(pa.table({"patient_id": units, "site": ["a"] * len(units)}), path)
    return path


DATASET = DatasetPrivacy(
    name="toy", privacy_unit="patient_id", one_row_per_unit=False,
    columns={"patient_id": {"type": "string"}, "site": {"type": "string", "categories": ["a"], "public": True}},
    rows_per_unit=2,
)


def _noisy_counts(dataset: DatasetPrivacy, parquet: Path) -> list[int]:
    """Many draws of the engine's noisy COUNT(*): the bounded count once, then OpenDP noise at its scale."""
    plan = plan_query('SELECT COUNT(*) FROM "toy"', dataset)
    exact = duckdb_engine.execute(plan, parquet, plan.cost(epsilon=1e9)).rows[0][0]  # noise far below 1
    bound = dataset.contribution(1)
    norms = sensitivity.count_rows(bound)
    return noise.add_noise([exact] * DRAWS, l1=int(norms.l1), l2=norms.l2, loss=noise.Loss(epsilon=EPSILON)).values


def _worst_ratio(first: list[int], second: list[int]) -> float:
    a, b = Counter(first), Counter(second)
    worst = 1.0
    for bucket in set(a) | set(b):
        if max(a[bucket], b[bucket]) < MIN_MASS:
            continue
        worst = max(worst, (a[bucket] + 1) / (b[bucket] + 1), (b[bucket] + 1) / (a[bucket] + 1))
    return worst


def test_bounded_counts_of_neighbours_stay_within_e_to_the_epsilon(tmp_path: Path) -> None:
    without = _write(tmp_path / "d.parquet", 0)
    with_victim = _write(tmp_path / "d_prime.parquet", 50)
    ratio = _worst_ratio(_noisy_counts(DATASET, without), _noisy_counts(DATASET, with_victim))
    assert ratio <= math.exp(EPSILON) * SLACK, f"one unit moved a bucket's probability by {ratio:.2f}x"


def test_the_same_check_fails_without_bounding(tmp_path: Path) -> None:
    unbounded = dataclasses.replace(DATASET, one_row_per_unit=True)  # the mutation: no per-unit bounding
    without = _write(tmp_path / "d.parquet", 0)
    with_victim = _write(tmp_path / "d_prime.parquet", 50)
    ratio = _worst_ratio(_noisy_counts(unbounded, without), _noisy_counts(unbounded, with_victim))
    assert ratio > math.exp(EPSILON) * SLACK, "the histogram test did not notice a 50-row unit left unbounded"
