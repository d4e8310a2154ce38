"""Statistical privacy checks through the engine's entry point (`duckdb_engine.execute`), not the noise primitive.

Review 11.20: the neighbouring-dataset and calibration tests drew noise from `noise.add_noise` directly,
so a mistake between planning and noise (bounding, sensitivity, budget split, key threshold) went unseen.
Here every draw is a full `execute` on a Parquet file. Each check compares with a tolerance from
Hoeffding's inequality at 1e-6 per estimate, so the whole module fails by chance with probability
below 1e-4, and each has a mutation (no bounding, no threshold) that it must catch.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sandbox.dp.duckdb_engine import RANK_COLUMN, execute
from sandbox.dp.plan import DatasetPrivacy, plan_query

DRAWS = 2000
EPSILON = 1.0
# Hoeffding: |p_hat - p| <= sqrt(ln(2 / 1e-6) / (2 n)) with probability at least 1 - 1e-6.
TOLERANCE = math.sqrt(math.log(2 / 1e-6) / (2 * DRAWS))

pytestmark = pytest.mark.slow

DATASET = DatasetPrivacy(
    name="toy", privacy_unit="patient_id", one_row_per_unit=False, rows_per_unit=2,
    columns={"patient_id": {"type": "string"}, "ward": {"type": "string"},
             "site": {"type": "string", "categories": ["a"], "public": True}},
)


def _write(path: Path, victim_rows: int, victim_ward: str = "common") -> Path:
    units = [f"U{i:04d}" for i in range(300) for _ in range(1 + i % 3)]
    wards = ["common"] * len(units)
    units += ["VICTIM"] * victim_rows
    wards += [victim_ward] * victim_rows
    pq.write_table(pa.table({"patient_id": units, "ward": wards, "site": ["a"] * len(units)}), path)
    return path


def _counts(dataset: DatasetPrivacy, parquet: Path, cache: Path) -> list[int]:
    plan = plan_query('SELECT COUNT(*) FROM "toy"', dataset)
    return [int(execute(plan, parquet, plan.cost(epsilon=EPSILON), cache_dir=cache).rows[0][0]) for _ in range(DRAWS)]


def _worst_excess(first: list[int], second: list[int]) -> float:
    """The largest P1[S] - e^eps (P2[S] + tol) - tol over tail events S = {x >= t} and {x <= t}, both ways."""
    worst = -1.0
    for a, b in ((first, second), (second, first)):
        for t in sorted(set(a) | set(b)):
            for event in (lambda x, t=t: x >= t, lambda x, t=t: x <= t):
                p = sum(map(event, a)) / len(a)
                q = sum(map(event, b)) / len(b)
                worst = max(worst, (p - TOLERANCE) - math.exp(EPSILON) * (q + TOLERANCE))
    return worst


def test_neighbouring_datasets_stay_within_e_to_the_epsilon_through_the_engine(tmp_path: Path) -> None:
    without = _write(tmp_path / "d.parquet", 0)
    with_victim = _write(tmp_path / "d_prime.parquet", 50)
    excess = _worst_excess(_counts(DATASET, without, tmp_path), _counts(DATASET, with_victim, tmp_path))
    assert excess <= 0, f"adding one unit moved an event's probability beyond e^epsilon (by {excess:.3f})"


def test_the_check_catches_an_engine_that_skips_bounding(tmp_path: Path) -> None:
    unbounded = dataclasses.replace(DATASET, one_row_per_unit=True)  # the mutation: no per-unit bounding
    without = _write(tmp_path / "d.parquet", 0)
    with_victim = _write(tmp_path / "d_prime.parquet", 50)
    excess = _worst_excess(_counts(unbounded, without, tmp_path), _counts(unbounded, with_victim, tmp_path))
    assert excess > 0, "the test did not notice a 50-row unit left unbounded"


DELTA = 0.02


def _rare_released(parquet: Path, cache: Path, *, threshold_delta: float | None = None) -> int:
    plan = plan_query('SELECT ward, COUNT(*) AS n FROM "toy" GROUP BY ward', DATASET)
    released = 0
    for _ in range(DRAWS):
        answer = execute(plan, parquet, plan.cost(epsilon=EPSILON, delta=threshold_delta or DELTA), cache_dir=cache)
        released += any(row[0] == "rare" for row in answer.rows)
    return released


def test_a_key_held_by_one_unit_is_released_with_probability_at_most_delta(tmp_path: Path) -> None:
    parquet = _write(tmp_path / "rare.parquet", 3, victim_ward="rare")  # bounded to 2 rows
    released = _rare_released(parquet, tmp_path)
    assert released / DRAWS <= DELTA + TOLERANCE, (
        f"a single unit's key was released in {released} of {DRAWS} answers (delta {DELTA})")


def test_the_key_check_catches_a_threshold_far_too_low(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.dp import noise

    # The mutation: a threshold far too low, with OpenDP's own map check (which would refuse it) switched off.
    monkeypatch.setattr(noise, "laplace_threshold", lambda l0, linf, scale, delta: 2)
    monkeypatch.setattr(noise, "_check", lambda reported, allowed, what: None)
    parquet = _write(tmp_path / "rare.parquet", 3, victim_ward="rare")
    released = _rare_released(parquet, tmp_path)
    assert released / DRAWS > DELTA + TOLERANCE, "the test did not notice keys released almost always"


def test_stated_accuracy_covers_about_95_percent_through_the_engine(tmp_path: Path) -> None:
    parquet = _write(tmp_path / "d.parquet", 0)
    plan = plan_query('SELECT COUNT(*) FROM "toy"', DATASET)
    exact = int(execute(plan, parquet, plan.cost(epsilon=1e9), cache_dir=tmp_path).rows[0][0])
    covered = 0
    for _ in range(DRAWS):
        answer = execute(plan, parquet, plan.cost(epsilon=EPSILON), cache_dir=tmp_path)
        half_width = answer.accuracy[0][0]
        assert half_width is not None
        covered += abs(answer.rows[0][0] - exact) <= half_width
    assert covered / DRAWS >= 0.95 - TOLERANCE, f"the 95% half-width covered {covered / DRAWS:.3f} of answers"
    assert RANK_COLUMN  # the bounded path (ranked copy) was the one measured
