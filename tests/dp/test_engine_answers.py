"""Accepted DP queries on the demo registry: sensible answers, every public category, stable plan keys."""


from __future__ import annotations

import math
from pathlib import Path

import duckdb
import pytest

from sandbox.budgets.cost import PrivacyCost, zcdp_to_approx_dp
from sandbox.demo import CARD, SITES, write_registry
from sandbox.dp import duckdb_engine
from sandbox.dp.duckdb_engine import execute
from sandbox.dp.plan import DatasetPrivacy, plan_query
from sandbox.errors import Invalid

T = '"carotid-stenting"'


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_registry(tmp_path_factory.mktemp("dp") / "registry.parquet")


@pytest.fixture(scope="module")
def dataset() -> DatasetPrivacy:
    card = {**CARD, "dp": {"rows_per_unit": 2, "groups_per_unit": 1}}
    return DatasetPrivacy.from_card(card)


def truth(registry: Path, sql: str) -> list[tuple[object, ...]]:
    return duckdb.connect().execute(sql.replace("FROM t", f"FROM read_parquet('{registry}')")).fetchall()


def test_from_card_reads_bounds_and_privacy_unit(dataset: DatasetPrivacy) -> None:
    assert dataset.privacy_unit == "patient_id" and not dataset.one_row_per_unit
    assert (dataset.rows_per_unit, dataset.groups_per_unit) == (2, 1)
    assert DatasetPrivacy.from_card(CARD).rows_per_unit == 1


def test_grouped_count_and_avg_near_truth_with_every_site(registry: Path, dataset: DatasetPrivacy) -> None:
    plan = plan_query(f"SELECT site, COUNT(*) AS n, AVG(age) AS mean_age FROM {T} GROUP BY site", dataset)
    answer = execute(plan, registry, plan.cost(epsilon=30.0))
    assert answer.columns == ["site", "n", "mean_age"]
    assert [row[0] for row in answer.rows] == SITES, "every public site, in the card's order"
    rows = truth(registry, "SELECT site, count(*), avg(age) FROM t GROUP BY site")
    exact = {site: (n, mean) for site, n, mean in rows}
    for (site, n, mean_age), (_, count_hw, avg_hw) in zip(answer.rows, answer.accuracy, strict=True):
        assert abs(n - exact[site][0]) <= max(10, 0.02 * exact[site][0]), f"{site}: count {n} vs {exact[site][0]}"
        assert abs(mean_age - exact[site][1]) < 1.0, f"{site}: mean age {mean_age} vs {exact[site][1]}"
        assert count_hw is not None and avg_hw is not None and avg_hw > 0
    assert answer.epsilon_spent == 30.0 and answer.delta_spent == 0.0
    assert answer.mechanism == "discrete_laplace"
    assert any("budget split equally over 3" in note for note in answer.notes), answer.notes
    assert any("AVG" in note for note in answer.notes)


def test_empty_public_categories_still_appear(registry: Path, dataset: DatasetPrivacy) -> None:
    plan = plan_query(f"SELECT stent_type, COUNT(*) FROM {T} WHERE site = 'nowhere' GROUP BY stent_type", dataset)
    answer = execute(plan, registry, plan.cost(epsilon=5.0))
    assert [row[0] for row in answer.rows] == ["closed-cell", "open-cell", "dual-layer"]
    assert all(abs(row[1]) <= 10 for row in answer.rows), "no rows match, so counts are noise around zero"


def test_two_public_keys_list_the_full_cross_product(registry: Path, dataset: DatasetPrivacy) -> None:
    plan = plan_query(f"SELECT symptomatic, sex, count(*) FROM {T} GROUP BY sex, symptomatic", dataset)
    answer = execute(plan, registry, plan.cost(rho=2.0, delta=1e-6))
    assert sorted((row[0], row[1]) for row in answer.rows) == sorted(
        (s, x) for s in (False, True) for x in ("F", "M"))
    assert answer.mechanism == "discrete_gaussian" and answer.rho_spent == 2.0
    assert answer.epsilon_spent == pytest.approx(zcdp_to_approx_dp(2.0, 1e-6))


def test_ungrouped_statistics_with_where(registry: Path, dataset: DatasetPrivacy) -> None:
    sql = (f"SELECT COUNT(*), SUM(length_of_stay), VAR_SAMP(age), STDDEV(age), MEDIAN(age) FROM {T} "
           "WHERE age BETWEEN 60 AND 80 AND (sex = 'M' OR symptomatic) AND stent_type IN ('open-cell', 'closed-cell')")
    plan = plan_query(sql, dataset)
    answer = execute(plan, registry, plan.cost(epsilon=50.0))
    (count, stay, variance, stddev, median), = answer.rows
    (n, total, var, sd, med), = truth(registry, "SELECT count(*), sum(length_of_stay), var_samp(age), stddev(age), "
                                      "median(age) FROM t WHERE age BETWEEN 60 AND 80 AND (sex = 'M' OR symptomatic) "
                                      "AND stent_type IN ('open-cell', 'closed-cell')")
    assert abs(count - n) <= 0.03 * n
    assert abs(stay - total) <= 0.03 * total
    assert abs(variance - var) <= 0.15 * var and abs(stddev - sd) <= 0.1 * sd
    assert abs(median - med) <= 3
    assert answer.accuracy[0][4] is None, "quantiles carry no closed-form interval"


def test_private_group_keys_need_delta_and_are_thresholded(registry: Path, dataset: DatasetPrivacy) -> None:
    plan = plan_query(f"SELECT age, COUNT(*) FROM {T} GROUP BY age", dataset)
    assert not plan.public_keys
    with pytest.raises(Invalid, match="delta"):
        execute(plan, registry, plan.cost(epsilon=1.0))
    answer = execute(plan, registry, plan.cost(epsilon=1.0, delta=1e-6))
    exact = dict(truth(registry, "SELECT age, count(*) FROM t GROUP BY age"))
    assert answer.rows, "common ages should clear the threshold"
    assert all(row[0] in exact for row in answer.rows), "a released key does not exist in the data"
    assert min(row[1] for row in answer.rows) >= 10, "a key below the threshold was released"
    assert answer.delta_spent == 1e-6


def test_row_level_dataset_needs_no_ranking(registry: Path) -> None:
    row_level = DatasetPrivacy.from_card({**CARD, "privacy_unit_rows": "one"})
    plan = plan_query(f"SELECT COUNT(*) FROM {T}", row_level)
    answer = execute(plan, registry, plan.cost(epsilon=50.0))
    assert abs(answer.rows[0][0] - 2550) <= 5


def test_bounding_keeps_at_most_rows_per_unit(registry: Path, dataset: DatasetPrivacy, tmp_path: Path) -> None:
    ranked = duckdb_engine.prepare(registry, dataset, cache_dir=tmp_path)
    connection = duckdb.connect()
    columns = [r[0] for r in connection.execute(f"DESCRIBE SELECT * FROM read_parquet('{ranked}')").fetchall()]
    assert "patient_id" not in columns and duckdb_engine.RANK_COLUMN in columns
    sql = f"SELECT count(*) FROM read_parquet('{ranked}') WHERE {duckdb_engine.RANK_COLUMN} <= 1"
    kept = connection.execute(sql).fetchall()
    patients = truth(registry, "SELECT count(DISTINCT patient_id) FROM t")
    assert kept == patients, "rank 1 keeps exactly one row per patient"


def test_the_query_connection_reads_nothing_but_the_version(registry: Path) -> None:
    with duckdb_engine.version_cursor(registry) as connection:
        for attack in ("SELECT * FROM read_csv('/etc/passwd')", "SET enable_external_access = true",
                       "INSTALL httpfs", f"SELECT * FROM read_parquet('{registry.parent}/*.parquet')"):
            with pytest.raises(duckdb.Error):
                connection.execute(attack).fetchall()
        assert connection.execute("SELECT count(*) FROM dataset").fetchall() == [(2550,)]


@pytest.mark.parametrize("variant", [
    f"select site, count(*) as n, avg(age) from {T} group by site",
    f"SELECT   site ,\n COUNT( * )  AS n,AVG(AGE)\tFROM {T}   GROUP   BY SITE",
    f'SELECT "site", Count(*) AS n, avg("age") FROM {T} GROUP BY site;',
])
def test_plan_key_ignores_spacing_and_case(dataset: DatasetPrivacy, variant: str) -> None:
    reference = plan_query(f"SELECT site, COUNT(*) AS n, AVG(age) FROM {T} GROUP BY site", dataset).key
    assert plan_query(variant, dataset).key == reference


def test_plan_key_changes_with_meaning(dataset: DatasetPrivacy) -> None:
    keys = {plan_query(sql, dataset).key for sql in (
        f"SELECT COUNT(*) FROM {T}", f"SELECT COUNT(*) FROM {T} WHERE age > 50",
        f"SELECT COUNT(*) FROM {T} WHERE age > 50.0", f"SELECT COUNT(age) FROM {T}",
        f"SELECT COUNT(*) AS n FROM {T}")}
    assert len(keys) == 5


def test_budget_must_be_one_kind() -> None:
    with pytest.raises(Invalid):
        PrivacyCost.requested(epsilon=1.0, rho=1.0)
    with pytest.raises(Invalid):
        PrivacyCost.requested()
    with pytest.raises(Invalid):
        PrivacyCost.requested(epsilon=math.inf)
    with pytest.raises(Invalid, match="delta > 0"):
        PrivacyCost.requested(rho=1.0)
