"""Verified tables: the spec is checked against the card, every cell comes from the platform's own
recomputation, and differencing against earlier releases is caught."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from sandbox.demo import CARD, write_registry
from sandbox.egress.verdicts import Verdict
from sandbox.release.tables import EarlierRelease, SpecError, parse_spec, verify_table

SDC = {"min_cell_count": 10, "zeros": "review", "dominance_n": 2, "dominance_k": 0.9, "p_ratio": 0.1}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_registry(tmp_path_factory.mktemp("registry") / "registry.parquet", procedures=2550)


def rule(table: Any, name: str) -> Any:
    return next(c for c in table.checks if c.rule == name)


def test_a_count_table_holds_the_platforms_own_counts(registry: Path) -> None:
    spec = parse_spec({"index": ["sex"], "columns": ["symptomatic"], "aggfunc": "count"}, CARD)
    verified = verify_table(spec, dataset_parquet=registry, card=CARD, sdc=SDC)
    assert verified.verdict is Verdict.PASS, [c.as_dict() for c in verified.checks]
    expected = dict(((sex, str(symptomatic).lower()), n) for sex, symptomatic, n in duckdb.sql(
        f"SELECT sex, symptomatic, count(*) FROM '{registry}' GROUP BY ALL").fetchall())
    released = pa_csv.read_csv(io.BytesIO(verified.to_bytes("csv"))).to_pylist()
    assert {(row["sex"], name): row[name] for row in released for name in ("false", "true")} == expected
    assert spec.name("csv") == "count-by-sex-x-symptomatic.csv"


@pytest.mark.parametrize("fmt", ["csv", "parquet", "xlsx"])
def test_every_format_is_written_by_the_platform_and_reads_back(registry: Path, fmt: str) -> None:
    spec = parse_spec({"index": "site", "values": "length_of_stay", "aggfunc": "mean"}, CARD)
    verified = verify_table(spec, dataset_parquet=registry, card=CARD, sdc=SDC)
    data = verified.to_bytes(fmt)
    if fmt == "csv":
        rows = pa_csv.read_csv(io.BytesIO(data)).to_pylist()
    elif fmt == "parquet":
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    else:
        import openpyxl  # type: ignore[import-untyped]

        sheet = openpyxl.load_workbook(io.BytesIO(data)).active
        header, *body = list(sheet.values)
        rows = [dict(zip(header, values, strict=True)) for values in body]
    means = dict(duckdb.sql(f"SELECT site, avg(length_of_stay) FROM '{registry}' GROUP BY site").fetchall())
    assert len(rows) == len(CARD["columns"]["site"]["categories"])
    for row in rows:
        assert row["mean_length_of_stay"] == pytest.approx(means[row["site"]], rel=1e-5)


def test_labels_come_from_the_card_never_from_the_data(registry: Path, tmp_path: Path) -> None:
    # A category the card does not publish (here: a patient id smuggled into 'site') never shows.
    smuggled = tmp_path / "smuggled.parquet"
    duckdb.sql(f"COPY (SELECT * REPLACE (CASE WHEN row_number() OVER () <= 5 THEN patient_id ELSE site END AS site) "
               f"FROM '{registry}') TO '{smuggled}' (FORMAT parquet)")
    spec = parse_spec({"index": ["site"], "aggfunc": "count"}, CARD)
    verified = verify_table(spec, dataset_parquet=smuggled, card=CARD, sdc=SDC)
    patient_ids = {row[0] for row in duckdb.sql(f"SELECT patient_id FROM '{registry}'").fetchall()}
    text = verified.to_bytes("csv").decode() + verified.to_html() + verified.to_text()
    assert not [pid for pid in patient_ids if pid in text], "a value that is not a public category was released"


@pytest.mark.parametrize("raw, why", [
    ({"index": ["patient_id"]}, "grouped"),
    ({"index": ["age"]}, "grouped"),  # public bounds, but no categories: each label would be a value
    ({"index": ["Site"]}, "does not have"),
    ({"index": ["site"], "filters": [{"column": "age", "op": ">=", "value": 65.5}]}, "whole number"),
    ({"index": ["site"], "filters": [{"column": "age", "op": ">=", "value": 1_000_000}]}, "whole number"),
    ({"index": ["site"], "filters": [{"column": "age", "op": ">=", "value": "65"}]}, "whole number"),
    ({"index": ["site"], "filters": [{"column": "site", "op": "==", "value": "P000123"}]}, "public categories"),
    ({"index": ["site"], "filters": [{"column": "site", "op": "in", "value": []}]}, "non-empty"),
    ({"index": ["site"], "filters": [{"column": "patient_id", "op": "==", "value": "P000001"}]}, "filtered"),
    ({"index": ["site"], "filters": [{"column": "age", "op": "like", "value": 3}]}, "op"),
    ({"index": ["site"], "aggfunc": "median", "values": "age"}, "aggfunc"),
    ({"index": ["site"], "aggfunc": "sum", "values": "sex"}, "numeric"),
    ({"index": ["site"], "aggfunc": "count", "values": "age"}, "count tables"),
    ({"index": ["site"], "note": "P000001 F 73"}, "^the table specification has unknown fields$"),
    ({"index": ["site", "sex", "stent_type", "embolic_protection", "symptomatic"]}, "columns"),
    ("count by site", "JSON object"),
])
def test_a_spec_outside_what_the_card_publishes_is_refused(raw: Any, why: str) -> None:
    with pytest.raises(SpecError, match=why):
        parse_spec(raw, CARD)


def test_spellings_of_one_spec_are_one_canonical_spec() -> None:
    one = parse_spec({"index": "site", "filters": [{"column": "sex", "op": "==", "value": "F"},
                                                   {"column": "age", "op": ">=", "value": 65.0}]}, CARD)
    other = parse_spec({"index": ["site"], "aggfunc": "count",
                        "filters": [{"column": "age", "op": ">=", "value": 65},
                                    {"column": "sex", "op": "==", "value": "F"}]}, CARD)
    assert one == other and one.name("csv") == other.name("csv")


def test_small_cells_keep_a_table_from_leaving_alone(registry: Path) -> None:
    spec = parse_spec({"index": ["site", "stent_type", "embolic_protection"], "columns": ["sex"]}, CARD)
    verified = verify_table(spec, dataset_parquet=registry, card=CARD, sdc=SDC)
    assert verified.verdict is not Verdict.PASS
    assert rule(verified, "min-cell-count").verdict is Verdict.BLOCK


def _ages_with_few(registry: Path) -> int:
    # An age at which every site has fewer than 10 procedures, so that moving a filter by one year singles them out.
    rows = duckdb.sql(f"SELECT age, max(n) FROM (SELECT age, site, count(*) n FROM '{registry}' GROUP BY ALL) "
                      "WHERE age BETWEEN 19 AND 89 GROUP BY age HAVING max(n) < 10 AND min(n) > 0 "
                      "ORDER BY age DESC").fetchall()
    assert rows, "the registry has no age with few procedures per site"
    return int(rows[0][0])


@pytest.mark.parametrize("move", ["age", "nested-in", "split"])
def test_differencing_against_an_earlier_release_goes_to_review(registry: Path, move: str) -> None:
    age = _ages_with_few(registry)
    if move == "age":
        earlier = {"index": ["site"], "filters": [{"column": "age", "op": ">=", "value": age}]}
        later = {"index": ["site"], "filters": [{"column": "age", "op": ">=", "value": age + 1}]}
    elif move == "nested-in":
        earlier = {"index": ["sex"], "filters": [{"column": "age", "op": "<=", "value": age}]}
        later = {"index": ["sex"], "filters": [{"column": "age", "op": "<=", "value": age - 1}]}
    else:  # the same population, one cell split off by an 'in' list
        earlier = {"index": ["site"], "filters": [{"column": "age", "op": ">=", "value": age}]}
        later = {"index": ["site"], "filters": [{"column": "age", "op": ">=", "value": age},
                                                {"column": "stroke_death_30d", "op": "==", "value": False}]}
    first = verify_table(parse_spec(earlier, CARD), dataset_parquet=registry, card=CARD, sdc=SDC)
    second = verify_table(parse_spec(later, CARD), dataset_parquet=registry, card=CARD, sdc=SDC,
                          earlier=[EarlierRelease(first.spec, registry, "job j-1: earlier.csv")])
    assert rule(second, "differencing").verdict is Verdict.REVIEW, rule(second, "differencing").reason
    assert second.verdict is not Verdict.PASS
    alone = verify_table(parse_spec(later, CARD), dataset_parquet=registry, card=CARD, sdc=SDC)
    assert rule(alone, "differencing").verdict is Verdict.PASS


def test_an_unrelated_earlier_table_does_not_hold_a_new_one(registry: Path) -> None:
    first = verify_table(parse_spec({"index": ["sex"]}, CARD), dataset_parquet=registry, card=CARD, sdc=SDC)
    second = verify_table(parse_spec({"index": ["symptomatic"]}, CARD), dataset_parquet=registry, card=CARD, sdc=SDC,
                          earlier=[EarlierRelease(first.spec, registry, "job j-1: sex.csv")])
    assert rule(second, "differencing").verdict is Verdict.PASS
    assert second.verdict is Verdict.PASS


def test_differencing_across_weekly_versions_is_caught(registry: Path, tmp_path: Path) -> None:
    # Next week's version adds three procedures: the same table on both versions would single them out.
    newer = tmp_path / "v2.parquet"
    duckdb.sql(f"COPY (SELECT * FROM '{registry}' UNION ALL (SELECT * REPLACE (patient_id || 'x' AS patient_id) "
               f"FROM '{registry}' LIMIT 3)) TO '{newer}' (FORMAT parquet)")
    spec = parse_spec({"index": ["sex"]}, CARD)
    first = verify_table(spec, dataset_parquet=registry, card=CARD, sdc=SDC)
    second = verify_table(spec, dataset_parquet=newer, card=CARD, sdc=SDC,
                          earlier=[EarlierRelease(first.spec, registry, "job j-1 on version 1")])
    assert rule(second, "differencing").verdict is Verdict.REVIEW


def test_html_rendering_escapes_everything(registry: Path) -> None:
    sites = ["<script>alert(1)</script>", *CARD["columns"]["site"]["categories"]]
    card = {**CARD, "columns": {**CARD["columns"], "site": {**CARD["columns"]["site"], "categories": sites}}}
    verified = verify_table(parse_spec({"index": ["site"]}, card), dataset_parquet=registry, card=card, sdc=SDC)
    assert "<script>" not in verified.to_html() and "&lt;script&gt;" in verified.to_html()


@pytest.mark.parametrize("raw", [
    {"index": ["P000123 F 73"]}, {"index": ["site"], "P000123 F 73": 1}, {"index": ["site"], "values": "P000123 F 73",
                                                                          "aggfunc": "sum"},
    {"index": ["site"], "filters": [{"column": "P000123 F 73", "op": "==", "value": 1}]},
    {"index": ["site"], "filters": [{"column": "site", "op": "==", "value": "P000123 F 73"}]},
    {"index": ["site"], "filters": [{"column": "age", "op": "P000123 F 73", "value": 1}]},
])
def test_refusals_never_echo_what_the_spec_carries(raw: Any) -> None:
    # A refusal reason reaches the buyer: it must not carry text the job's code chose.
    with pytest.raises(SpecError) as refused:
        parse_spec(raw, CARD)
    assert "P000123" not in str(refused.value) and "73" not in str(refused.value)
