"""k-anonymity, l-diversity and generalisation suggestions, checked against a brute-force count in Python."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sandbox import duck
from sandbox.catalog.cards import DatasetCard, Generalisation, card_errors
from sandbox.catalog.kanon import band_widths, json_value, k_anonymity, k_for

COLUMNS = {"pid": "VARCHAR", "age": "BIGINT", "sex": "VARCHAR", "site": "VARCHAR", "bmi": "DOUBLE",
           "admitted": "DATE", "seen": "TIMESTAMP", "dx": "VARCHAR", "drug": "VARCHAR"}
CARD_TYPES = {"VARCHAR": "string", "BIGINT": "integer", "DOUBLE": "float", "DATE": "date", "TIMESTAMP": "timestamp"}
Row = dict[str, Any]


def write_parquet(path: Path, rows: list[Row], columns: dict[str, str] = COLUMNS) -> Path:
    connection = duck.connect(threads=1)
    connection.execute("CREATE TABLE t (" + ", ".join(f'"{c}" {t}' for c, t in columns.items()) + ")")
    connection.executemany(f"INSERT INTO t VALUES ({', '.join('?' for _ in columns)})",
                           [[row[c] for c in columns] for row in rows])
    connection.execute(f"COPY t TO '{path}' (FORMAT parquet)")
    connection.close()
    return path


def make_card(qis: list[str], sensitive: list[str], *, rows_per_unit: str = "many",
              generalise: dict[str, Any] | None = None, columns: dict[str, str] = COLUMNS) -> DatasetCard:
    card = DatasetCard.model_validate({
        "name": "wards", "title": "Ward stays", "privacy_unit": "pid", "privacy_unit_rows": rows_per_unit,
        "columns": {c: {"type": CARD_TYPES[t]} for c, t in columns.items()},
        "quasi_identifiers": qis, "sensitive_columns": sensitive, "generalise": generalise or {},
    })
    assert not card_errors(card), card_errors(card)
    return card


def random_rows(seed: int, n: int = 240, units: int = 150) -> list[Row]:
    """Rows with NULLs in every column but the unit, units repeated across rows, dates and timestamps."""
    rng = random.Random(seed)

    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.08 else value

    start = date(2023, 1, 1)
    return [{
        "pid": f"p{rng.randrange(units)}",
        "age": maybe(rng.randint(18, 95)),
        "sex": maybe(rng.choice("FM")),
        "site": maybe(rng.choice(["north", "south", "east", "west", "rural"])),
        "bmi": maybe(round(rng.uniform(16, 42), 1)),
        "admitted": maybe(start + timedelta(days=rng.randrange(700))),
        "seen": maybe(datetime(2023, 1, 1) + timedelta(minutes=rng.randrange(900_000))),
        "dx": maybe(rng.choice(["I10", "E11", "J45", "C50"])),
        "drug": maybe(rng.choice(["a", "b"])),
    } for _ in range(n)]


def coarsen(value: Any, rule: dict[str, Any] | None) -> Any:
    if value is None or rule is None:
        return value
    if "band" in rule:
        return math.floor(value / rule["band"]) * rule["band"]
    if rule["to"] == "month":
        return datetime(value.year, value.month, 1)
    return datetime(value.year, 1, 1)


def brute_force(rows: list[Row], card: DatasetCard, min_k: int,
                rules: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Equivalence classes counted the slow, obvious way: sets of units (and of sensitive values) per class."""
    rules = rules or {}
    units: dict[tuple[Any, ...], set[str]] = defaultdict(set)
    values: dict[tuple[Any, ...], dict[str, set[Any]]] = defaultdict(lambda: defaultdict(set))
    for row in rows:
        key = tuple(coarsen(row[q], rules.get(q)) for q in card.quasi_identifiers)
        units[key].add(row["pid"])
        for column in card.sensitive_columns:
            values[key][column].add(row[column])
    sizes = {key: len(members) for key, members in units.items()}
    rare = {key: size for key, size in sizes.items() if size < min_k}
    return {
        "k": min(sizes.values()), "classes": len(sizes), "rare_classes": len(rare),
        "rare_units": len(set().union(*(units[key] for key in rare))) if rare else 0,
        "rare": rare, "units": len({row["pid"] for row in rows}),
        "l": {c: min(len(values[key][c]) for key in units) for c in card.sensitive_columns},
    }


CASES = [
    (0, ["age", "sex"], ["dx"]),
    (1, ["sex", "site", "admitted"], ["dx", "drug"]),
    (2, ["bmi", "sex"], ["dx"]),
    (3, ["age", "seen"], ["drug"]),
    (4, ["sex", "site"], ["dx"]),
    (5, ["sex"], ["dx", "drug"]),  # few, large classes: l above 1
    (6, ["drug"], ["site", "dx"]),
]


@pytest.mark.parametrize(("seed", "qis", "sensitive"), CASES)
def test_k_rare_classes_and_l_match_a_brute_force_count(tmp_path: Path, seed: int, qis: list[str],
                                                        sensitive: list[str]) -> None:
    rows = random_rows(seed)
    card = make_card(qis, sensitive)
    report = k_anonymity(write_parquet(tmp_path / "v.parquet", rows), card, min_k=5)
    expected = brute_force(rows, card, 5)
    for field in ("k", "classes", "rare_classes", "rare_units", "units"):
        assert report[field] == expected[field], f"{field}: report {report[field]}, brute force {expected[field]}"
    assert report["l_diversity"] == expected["l"]
    shown = [(tuple(entry["values"][q] for q in qis), entry["units"]) for entry in report["rare"]]
    assert len(shown) == min(20, expected["rare_classes"])
    rare_json = {tuple(json_value(v) for v in key): size for key, size in expected["rare"].items()}
    for values, size in shown:
        assert rare_json.get(values) == size, f"rare class {values}: {size} units, brute force {rare_json.get(values)}"
    assert [size for _, size in shown] == sorted(expected["rare"].values())[:20], "not the smallest classes first"
    json.dumps(report, allow_nan=False)  # stored as JSON with the version


@pytest.mark.parametrize(("seed", "qis", "sensitive"), CASES[:4])
def test_each_suggestion_reaches_the_k_it_promises(tmp_path: Path, seed: int, qis: list[str],
                                                   sensitive: list[str]) -> None:
    rows = random_rows(seed, n=600, units=400)
    card = make_card(qis, sensitive)
    parquet = write_parquet(tmp_path / "v.parquet", rows)
    report = k_anonymity(parquet, card, min_k=3)
    assert report["k"] < 3 and report["suggestions"], "the random table should need generalising"
    for suggestion in report["suggestions"]:
        expected = brute_force(rows, card, 3, suggestion["generalise"])
        assert (suggestion["k"], suggestion["rare_classes"], suggestion["classes"]) == (
            expected["k"], expected["rare_classes"], expected["classes"]), suggestion["id"]
        rules = {c: Generalisation.model_validate(r) for c, r in suggestion["generalise"].items()}
        assert k_for(parquet, card, rules, min_k=3).k == expected["k"]
        merged = card.model_copy(update={"generalise": {**card.generalise, **rules}})
        assert not card_errors(merged), f"{suggestion['id']} does not merge into a valid card: {card_errors(merged)}"
    reaching = [s for s in report["suggestions"] if s["reaches_min_k"]]
    assert report["suggestions"][: len(reaching)] == reaching, "suggestions reaching min_k come first"
    assert [s["classes"] for s in reaching] == sorted((s["classes"] for s in reaching), reverse=True)


def test_the_greedy_combination_coarsens_two_columns_when_one_is_not_enough(tmp_path: Path) -> None:
    rng = random.Random(7)
    rows = [{**row, "age": rng.randint(20, 79), "admitted": date(2024, 1, 1) + timedelta(days=rng.randrange(700))}
            for row in random_rows(7, n=400, units=400)]
    for index, row in enumerate(rows):
        row["pid"] = f"p{index}"
    card = make_card(["age", "admitted"], [], rows_per_unit="one")
    report = k_anonymity(write_parquet(tmp_path / "v.parquet", rows), card, min_k=5)
    combined = [s for s in report["suggestions"] if "+" in s["id"]]
    assert combined, f"no combined suggestion among {[s['id'] for s in report['suggestions']]}"
    assert set(combined[0]["generalise"]) == {"age", "admitted"}
    expected = brute_force(rows, card, 5, combined[0]["generalise"])
    assert combined[0]["k"] == expected["k"] >= 5
    singles = [s for s in report["suggestions"] if "+" not in s["id"]]
    assert all(s["k"] < 5 for s in singles), "a single step reached min_k: the combination was not needed"


def test_k_counts_patients_not_rows(tmp_path: Path) -> None:
    base = {"sex": "F", "site": "north", "bmi": 20.0, "admitted": None, "seen": None, "dx": "I10", "drug": "a"}
    # Five rows of one patient aged 40, and five patients aged 50: by rows both classes hold five.
    rows = [{**base, "pid": "lonely", "age": 40} for _ in range(5)]
    rows += [{**base, "pid": f"p{i}", "age": 50, "dx": ["I10", "E11"][i % 2]} for i in range(5)]
    report = k_anonymity(write_parquet(tmp_path / "v.parquet", rows), make_card(["age"], ["dx"]), min_k=5)
    assert report["k"] == 1, "five rows of one patient were counted as five people"
    assert (report["rare_classes"], report["rare_units"], report["units"]) == (1, 1, 6)
    assert report["rare"] == [{"values": {"age": 40}, "units": 1}]
    assert report["l_diversity"] == {"dx": 1}


def test_null_is_a_quasi_identifier_value_of_its_own(tmp_path: Path) -> None:
    base = {"sex": None, "site": "north", "bmi": 20.0, "admitted": None, "seen": None, "dx": None, "drug": "a"}
    rows = [{**base, "pid": f"p{i}", "age": None if i < 2 else 30} for i in range(8)]
    report = k_anonymity(write_parquet(tmp_path / "v.parquet", rows), make_card(["age", "sex"], ["dx"]), min_k=5)
    assert report["k"] == 2 and report["rare"] == [{"values": {"age": None, "sex": None}, "units": 2}]
    assert report["l_diversity"] == {"dx": 1}, "a column of missing values has one value, not zero"


def test_acceptance_age_by_site_k2_becomes_k5_with_ten_year_bands(tmp_path: Path) -> None:
    rows, serial = [], 0
    for site in ("north", "south", "east"):
        for decade in range(20, 80, 10):
            # Per site and decade: two patients aged d+1, three aged d+3, two aged d+6: k=2 by exact age,
            # seven per ten-year band; five-year bands leave the two of d+6 alone.
            for offset, count in ((1, 2), (3, 3), (6, 2)):
                for _ in range(count):
                    rows.append({"pid": f"p{serial}", "age": decade + offset, "site": site})
                    serial += 1
    columns = {"pid": "VARCHAR", "age": "BIGINT", "site": "VARCHAR"}
    card = make_card(["age", "site"], [], rows_per_unit="one", columns=columns)
    report = k_anonymity(write_parquet(tmp_path / "v.parquet", rows, columns), card, min_k=5)
    assert report["k"] == 2
    first = report["suggestions"][0]
    assert first["id"] == "age:band:10" and first["generalise"] == {"age": {"band": 10}}, report["suggestions"]
    assert first["k"] == 7 and first["rare_classes"] == 0
    assert {s["id"]: s["k"] for s in report["suggestions"]}.get("age:band:5") == 2
    assert report["notes"] == [], "every site holds enough patients: no merging advised"


def test_string_quasi_identifiers_with_rare_values_get_a_note(tmp_path: Path) -> None:
    columns = {"pid": "VARCHAR", "age": "BIGINT", "site": "VARCHAR"}
    rows = [{"pid": f"p{i}", "age": 30 + i % 3, "site": ["north", "south", "tiny", "small"][min(i // 10, 3)]}
            for i in range(33)]
    card = make_card(["age", "site"], [], rows_per_unit="one", columns=columns)
    report = k_anonymity(write_parquet(tmp_path / "v.parquet", rows, columns), card, min_k=5)
    assert "site: 1 of 4 values occur in fewer than 5 units: consider merging them in the export" in report["notes"]


def test_no_quasi_identifiers_means_no_k(tmp_path: Path) -> None:
    report = k_anonymity(write_parquet(tmp_path / "v.parquet", random_rows(0, n=20)), make_card([], []))
    assert report["k"] is None and report["suggestions"] == [] and report["rare"] == []


def test_an_already_banded_column_is_offered_only_coarser_multiples(tmp_path: Path) -> None:
    rows = random_rows(3, n=300, units=300)
    for index, row in enumerate(rows):
        row["pid"] = f"p{index}"
        row["age"] = None if row["age"] is None else row["age"] // 5 * 5  # stored as ingest generalised it
    card = make_card(["age", "sex", "site"], [], rows_per_unit="one", generalise={"age": {"band": 5}})
    report = k_anonymity(write_parquet(tmp_path / "v.parquet", rows), card, min_k=5)
    bands = {s["generalise"]["age"]["band"] for s in report["suggestions"] if "age" in s["generalise"]}
    assert bands and all(band % 5 == 0 and band > 5 for band in bands), bands


def test_band_widths_are_nice_numbers_over_the_range() -> None:
    assert band_widths(100, integer=True) == [2, 5, 10, 20]
    assert band_widths(100, integer=True, coarser_than=5) == [10, 20]
    assert band_widths(30, integer=False) == [1, 2, 5, 10]
    assert band_widths(3, integer=False) == [0.1, 0.2, 0.5, 1]
    assert band_widths(0, integer=True) == []
