"""DP mock data: same schema, only declared values, fresh ids, bounded contributions, epsilon accounted."""

from __future__ import annotations

import copy
import datetime as dt
import math
import re
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sandbox import demo
from sandbox.catalog.cards import ColumnType
from sandbox.dp.mock import (
    PLACEHOLDER_PREFIX,
    TOTAL_ROWS,
    ColumnDomain,
    exact_histograms,
    laplace_histogram,
    laplace_scale,
    one_row_per_unit_sql,
    split_epsilon,
    synthesize_mock,
)
from sandbox.errors import Invalid

MOCK_ID = re.compile(r"^M\d{6,}$")


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.write_registry(tmp_path_factory.mktemp("real") / "registry.parquet", procedures=2550)


@pytest.fixture(scope="module")
def real_table(real: Path) -> pa.Table:
    return pq.read_table(real)


def _describe(path: Path) -> list[tuple[str, str]]:
    with duckdb.connect() as connection:
        rows = connection.execute("DESCRIBE SELECT * FROM read_parquet($p)", {"p": str(path)}).fetchall()
    return [(str(row[0]), str(row[1])) for row in rows]


def _mock(real: Path, tmp_path: Path, card: dict[str, Any] | None = None, **options: Any) -> tuple[Any, pa.Table]:
    destination = tmp_path / "mock.parquet"
    report = synthesize_mock(real, card or demo.CARD, destination=destination, **{"epsilon": 1.0, "seed": 7, **options})
    return report, pq.read_table(destination)


def _distribution(values: list[Any], domain: list[Any]) -> np.ndarray[Any, Any]:
    counts = np.array([sum(1 for value in values if value == item) for item in domain], dtype=float)
    return np.asarray(counts / max(1.0, counts.sum()))


def _total_variation(first: np.ndarray[Any, Any], second: np.ndarray[Any, Any]) -> float:
    return float(np.abs(first - second).sum() / 2)


def _integer_bins(values: list[int], low: int, high: int, bins: int) -> list[int]:
    count = high - low + 1
    return [(min(max(value, low), high) - low) * bins // count for value in values]


def test_mock_has_the_real_columns_in_order_with_the_same_duckdb_types(real: Path, tmp_path: Path) -> None:
    _mock(real, tmp_path)
    assert _describe(tmp_path / "mock.parquet") == _describe(real), "mock schema differs from the real version"


def test_row_count_is_the_noisy_unit_count(real: Path, real_table: pa.Table, tmp_path: Path) -> None:
    report, mock = _mock(real, tmp_path)
    units = len(set(real_table.column("patient_id").to_pylist()))
    assert mock.num_rows == report.rows
    # Share 0.1 gives Laplace scale 10; missing by 150 has probability e^-15.
    assert abs(report.rows - units) < 150, f"{report.rows} mock rows for {units} units"


def test_explicit_rows_are_public_and_cost_nothing(real: Path, tmp_path: Path) -> None:
    report, mock = _mock(real, tmp_path, rows=321)
    assert mock.num_rows == report.rows == 321
    assert TOTAL_ROWS not in report.marginals


@pytest.mark.parametrize("epsilon", [0.01, 1.0])
def test_every_value_is_a_declared_category_or_within_bounds(real: Path, tmp_path: Path, epsilon: float) -> None:
    _, mock = _mock(real, tmp_path, epsilon=epsilon, rows=3000)
    for name, spec in demo.CARD["columns"].items():
        values = [value for value in mock.column(name).to_pylist() if value is not None]
        if "categories" in spec:
            outside = {value for value in values if value not in spec["categories"]}
            assert not outside, f"{name}: undeclared values {outside}"
        if "bounds" in spec:
            low, high = spec["bounds"]
            assert all(low <= value <= high for value in values), f"{name}: values outside {spec['bounds']}"
            assert all(isinstance(value, int) for value in values), f"{name}: integer column holds non-integers"
    if epsilon == 1.0:
        # The null cell is a noisy count (scale 9 here) of about 0 among ~2,300 units: 10% of the rows would be
        # far beyond its noise, where 100 nulls were reached about once in 9,000 runs.
        assert mock.column("age").null_count < 0.1 * mock.num_rows, "the null cell should stay small at epsilon 1"


def test_no_real_patient_id_or_real_row_appears(real: Path, real_table: pa.Table, tmp_path: Path) -> None:
    _, mock = _mock(real, tmp_path)
    ids = mock.column("patient_id").to_pylist()
    assert all(MOCK_ID.match(value) for value in ids), "privacy-unit ids are not all synthetic"
    assert len(set(ids)) == len(ids)
    leaked = set(ids) & set(real_table.column("patient_id").to_pylist())
    assert not leaked, f"real patient ids leaked into the mock: {sorted(leaked)[:5]}"


def test_columns_whose_domain_is_not_public_reveal_nothing(real: Path, real_table: pa.Table, tmp_path: Path) -> None:
    card = copy.deepcopy(demo.CARD)
    card["columns"]["site"]["public"] = False
    card["columns"]["age"]["public"] = False
    card["marginal_pairs"] = [["site", "sex"], ["symptomatic", "stroke_death_30d"]]
    report, mock = _mock(real, tmp_path, card=card)
    sites = mock.column("site").to_pylist()
    assert all(value.startswith(PLACEHOLDER_PREFIX) for value in sites), "a non-public category was revealed"
    assert not set(sites) & set(real_table.column("site").to_pylist())
    assert mock.column("age").null_count == mock.num_rows, "non-public bounds were used for age"
    assert "site" not in report.marginals and "age" not in report.marginals
    assert not any(key.startswith("site x") for key in report.marginals)
    assert any("pair (site, sex) skipped" in note for note in report.notes)


def test_high_epsilon_marginals_and_a_declared_pair_track_the_real_data(
    real: Path, real_table: pa.Table, tmp_path: Path
) -> None:
    _, mock = _mock(real, tmp_path, epsilon=50.0, rows=20_000)
    columns = demo.CARD["columns"]
    for name, spec in columns.items():
        real_values, mock_values = real_table.column(name).to_pylist(), mock.column(name).to_pylist()
        if "categories" in spec:
            domain = spec["categories"]
        elif "bounds" in spec:
            low, high = (int(bound) for bound in spec["bounds"])
            real_values = _integer_bins(real_values, low, high, 20)
            mock_values = _integer_bins([value for value in mock_values if value is not None], low, high, 20)
            domain = list(range(20))
        else:
            continue
        distance = _total_variation(_distribution(real_values, domain), _distribution(mock_values, domain))
        assert distance < 0.05, f"{name}: total variation {distance:.3f} from the real marginal"
    for first, second in demo.CARD["marginal_pairs"]:
        domain = [(a, b) for a in columns[first]["categories"] for b in columns[second]["categories"]]
        real_pairs = list(zip(real_table.column(first).to_pylist(), real_table.column(second).to_pylist(), strict=True))
        mock_pairs = list(zip(mock.column(first).to_pylist(), mock.column(second).to_pylist(), strict=True))
        distance = _total_variation(_distribution(real_pairs, domain), _distribution(mock_pairs, domain))
        assert distance < 0.05, f"{first} x {second}: total variation {distance:.3f} from the real joint"


def test_the_pair_carries_the_dependence_that_independent_sampling_would_lose(real: Path, tmp_path: Path) -> None:
    _, mock = _mock(real, tmp_path, epsilon=50.0, rows=20_000)
    symptomatic = np.array(mock.column("symptomatic").to_pylist(), dtype=object)
    stroke = np.array(mock.column("stroke_death_30d").to_pylist(), dtype=object)
    rate_symptomatic = np.mean(stroke[symptomatic == True] == True)  # noqa: E712
    rate_asymptomatic = np.mean(stroke[symptomatic == False] == True)  # noqa: E712
    assert rate_symptomatic > rate_asymptomatic * 1.3, "the declared pair lost its association"


def test_report_spends_exactly_the_requested_epsilon_in_named_shares(real: Path, tmp_path: Path) -> None:
    report, _ = _mock(real, tmp_path, epsilon=0.7)
    assert report.epsilon == pytest.approx(0.7)
    assert report.epsilon <= 0.7
    assert math.fsum(report.marginals.values()) == pytest.approx(0.7)
    assert set(report.marginals) == {
        "symptomatic x stroke_death_30d", "embolic_protection x stroke_death_30d", "age", "sex", "site",
        "stenosis_pct", "stent_type", "restenosis_1y", "length_of_stay", TOTAL_ROWS,
    }
    assert any("conditionally" in note for note in report.notes)
    assert any("one row" in note for note in report.notes)


def test_split_epsilon_never_exceeds_the_total() -> None:
    for epsilon in (1.0, 0.7, 0.1, 3.3, 1e-6):
        for parts in range(1, 40):
            shares = split_epsilon(epsilon, [str(part) for part in range(parts)])
            assert math.fsum(shares.values()) <= epsilon
            assert math.fsum(shares.values()) == pytest.approx(epsilon)


def test_laplace_noise_has_the_closed_form_scale_and_keeps_the_shape() -> None:
    assert laplace_scale(0.1) == pytest.approx(10.0)
    counts = np.arange(12, dtype=np.int64).reshape(3, 4)
    noisy = laplace_histogram(counts, 1000.0)
    assert noisy.shape == (3, 4)
    assert np.abs(noisy - counts).max() <= 1, "epsilon 1000 should add almost no noise"


def test_the_bounding_sql_keeps_one_row_per_unit(real: Path, real_table: pa.Table) -> None:
    names = real_table.column_names
    with duckdb.connect() as connection:
        kept = connection.execute(
            f"SELECT count(*), count(DISTINCT patient_id), max(n) FROM (SELECT patient_id, count(*) OVER "
            f"(PARTITION BY patient_id) AS n FROM ({one_row_per_unit_sql('read_parquet($p)', 'patient_id', names)}))",
            {"p": str(real)},
        ).fetchall()[0]
    rows, units, most = kept
    assert rows == units == len(set(real_table.column("patient_id").to_pylist()))
    assert most == 1, "a unit kept more than one row"
    assert rows < real_table.num_rows, "the demo has repeat patients, so bounding must drop rows"


def test_one_unit_moves_each_histogram_by_at_most_one(real: Path, real_table: pa.Table, tmp_path: Path) -> None:
    before = exact_histograms(real, demo.CARD)
    ids = real_table.column("patient_id").to_pylist()
    repeat = next(value for value in ids if ids.count(value) > 1)
    without = real_table.filter(pa.compute.not_equal(real_table.column("patient_id"), repeat))
    pq.write_table(without, tmp_path / "without.parquet")
    extra = real_table.slice(0, 100).set_column(0, "patient_id", pa.array(["P999999X"] * 100))
    pq.write_table(pa.concat_tables([real_table, extra]), tmp_path / "with.parquet")
    for neighbour in ("without", "with"):
        after = exact_histograms(tmp_path / f"{neighbour}.parquet", demo.CARD)
        assert set(after) == set(before)
        for key, counts in before.items():
            distance = int(np.abs(after[key] - counts).sum())
            assert distance <= 1, f"{key}: one unit ({neighbour}) moved the histogram by {distance}"


def test_the_kept_row_does_not_depend_on_row_order(real: Path, real_table: pa.Table, tmp_path: Path) -> None:
    order = np.random.default_rng(3).permutation(real_table.num_rows)
    pq.write_table(real_table.take(pa.array(order)), tmp_path / "shuffled.parquet")
    before, after = exact_histograms(real, demo.CARD), exact_histograms(tmp_path / "shuffled.parquet", demo.CARD)
    for key in before:
        assert np.array_equal(before[key], after[key]), f"{key}: row order changed which rows were kept"


def test_columns_without_a_domain_get_placeholders(real_table: pa.Table, tmp_path: Path) -> None:
    rows = real_table.num_rows
    table = (
        real_table.append_column("note", pa.array([f"secret note {n}" for n in range(rows)]))
        .append_column("admitted", pa.array([dt.date(2020, 1, 1) + dt.timedelta(days=n % 900) for n in range(rows)]))
        .append_column("seen_at", pa.array([dt.datetime(2021, 5, 1, 8, n % 60) for n in range(rows)]))
        .append_column("weight", pa.array(np.linspace(40.0, 140.0, rows)))
        .append_column("score", pa.array(np.linspace(0.0, 1.0, rows)))
    )
    source = tmp_path / "wide.parquet"
    pq.write_table(table, source)
    card = copy.deepcopy(demo.CARD)
    card["columns"].update({
        "note": {"type": "string"},
        "admitted": {"type": "date"},
        "seen_at": {"type": "timestamp"},
        "weight": {"type": "float"},
        "score": {"type": "float", "bounds": [0, 1], "public": True},
    })
    report, mock = _mock(source, tmp_path, card=card)
    assert _describe(tmp_path / "mock.parquet") == _describe(source)
    notes = mock.column("note").to_pylist()
    assert all(value.startswith(PLACEHOLDER_PREFIX) for value in notes), "text placeholder is not synthetic"
    assert not set(notes) & set(table.column("note").to_pylist())
    for name in ("admitted", "seen_at", "weight"):
        assert mock.column(name).null_count == mock.num_rows, f"{name}: expected null placeholders"
        assert name not in report.marginals
    scores = [value for value in mock.column("score").to_pylist() if value is not None]
    assert scores and all(0.0 <= value <= 1.0 for value in scores)
    assert "score" in report.marginals
    assert any("placeholders" in note and "note" in note for note in report.notes)


def test_integer_bins_partition_the_bounds() -> None:
    domain = ColumnDomain("age", "integer_bins", ColumnType.INTEGER, low=18, high=90, bins=20)
    covered: list[int] = []
    for cell in range(20):
        first, last = domain.integer_bin_range(cell)
        covered.extend(range(first, last + 1))
    assert covered == list(range(18, 91)), "bins must cover every integer in the bounds exactly once"
    for cell in range(20):
        first, last = domain.integer_bin_range(cell)
        assert _integer_bins([first, last], 18, 90, 20) == [cell, cell]


@pytest.mark.parametrize("epsilon", [0.0, -1.0, math.nan, math.inf])
def test_epsilon_must_be_positive_and_finite(real: Path, tmp_path: Path, epsilon: float) -> None:
    with pytest.raises(Invalid):
        synthesize_mock(real, demo.CARD, epsilon=epsilon, destination=tmp_path / "mock.parquet")
    assert not (tmp_path / "mock.parquet").exists()
