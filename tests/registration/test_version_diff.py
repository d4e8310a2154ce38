"""Weekly version diffs: row changes, schema drift and distribution shift against plain Python and numpy."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sandbox import duck
from sandbox.catalog.cards import DatasetCard, card_errors
from sandbox.catalog.diff import DECILES, PSI_EPSILON, PSI_SHIFTED, version_diff

COLUMNS = {"pid": "VARCHAR", "age": "BIGINT", "sex": "VARCHAR", "weight": "DOUBLE", "admitted": "DATE",
           "ward": "BIGINT", "note": "VARCHAR"}
CARD_TYPES = {"VARCHAR": "string", "BIGINT": "integer", "DOUBLE": "float", "DATE": "date"}
PUBLIC = {"age", "sex", "weight", "admitted", "ward"}
Row = dict[str, Any]


def write_parquet(path: Path, rows: list[Row], columns: dict[str, str]) -> Path:
    connection = duck.connect(threads=1)
    connection.execute("CREATE TABLE t (" + ", ".join(f'"{c}" {t}' for c, t in columns.items()) + ")")
    connection.executemany(f"INSERT INTO t VALUES ({', '.join('?' for _ in columns)})",
                           [[row.get(c) for c in columns] for row in rows])
    connection.execute(f"COPY t TO '{path}' (FORMAT parquet)")
    connection.close()
    return path


def make_card(columns: dict[str, str], *, rows_per_unit: str, public: set[str] = PUBLIC) -> DatasetCard:
    specs: dict[str, Any] = {c: {"type": CARD_TYPES[t], "public": c in public} for c, t in columns.items()}
    if "ward" in specs:
        specs["ward"]["categories"] = [1, 2, 3, 4]
    card = DatasetCard.model_validate({"name": "wards", "title": "Ward stays", "privacy_unit": "pid",
                                       "privacy_unit_rows": rows_per_unit, "columns": specs})
    assert not card_errors(card), card_errors(card)
    return card


def random_rows(rng: random.Random, n: int, *, unique: bool, shift: float = 0.0) -> list[Row]:
    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.05 else value

    return [{
        "pid": f"p{i}" if unique else f"p{rng.randrange(n // 2)}",
        "age": maybe(rng.randint(18, 90) + int(shift)),
        "sex": maybe(rng.choice("FMX") if shift else rng.choice("FM")),
        "weight": maybe(round(rng.gauss(75 + shift, 12), 2)),
        "admitted": maybe(date(2024, 1, 1) + timedelta(days=rng.randrange(300) + int(shift))),
        "ward": maybe(rng.choice([1, 2, 3, 4] if shift else [1, 2, 3])),
        "note": maybe(rng.choice(["ok", "review", "late"])),
    } for i in range(n)]


def next_week(rng: random.Random, rows: list[Row]) -> list[Row]:
    """Drop some rows, edit some, add some: a week's churn."""
    after = []
    for row in rows:
        roll = rng.random()
        if roll < 0.1:
            continue
        if roll < 0.25:
            row = {**row, "weight": None if row["weight"] is None else row["weight"] + 1, "note": "edited"}
        elif roll < 0.3:  # only a missing value appears or disappears: NULL <> 50 would miss it
            row = {**row, "age": 50 if row["age"] is None else None}
        after.append(dict(row))
    extra = random_rows(rng, 37, unique=True)
    for index, row in enumerate(extra):
        row["pid"] = f"new{index}"
    return after + extra


def test_keyed_rows_added_removed_changed_match_brute_force(tmp_path: Path) -> None:
    rng = random.Random(1)
    before = random_rows(rng, 173, unique=True)
    after = next_week(rng, before)
    card = make_card(COLUMNS, rows_per_unit="one")
    diff = version_diff(write_parquet(tmp_path / "b.parquet", before, COLUMNS),
                        write_parquet(tmp_path / "a.parquet", after, COLUMNS), card)
    old, new = {r["pid"]: r for r in before}, {r["pid"]: r for r in after}
    changed = sum(1 for pid in old.keys() & new.keys() if old[pid] != new[pid])
    assert diff["rows"] == {"before": 173, "after": len(after), "added": len(new.keys() - old.keys()),
                            "removed": len(old.keys() - new.keys()), "changed": changed, "keyed_by": "pid"}
    assert changed > 0 and diff["schema"] == {"added": [], "removed": [], "retyped": []}


def test_unkeyed_rows_are_multiset_differences(tmp_path: Path) -> None:
    rng = random.Random(2)
    before = random_rows(rng, 181, unique=False)
    after = [*next_week(rng, before), dict(before[0]), dict(before[0])]  # duplicates count as rows
    card = make_card(COLUMNS, rows_per_unit="many")
    diff = version_diff(write_parquet(tmp_path / "b.parquet", before, COLUMNS),
                        write_parquet(tmp_path / "a.parquet", after, COLUMNS), card)
    old = Counter(tuple(r[c] for c in COLUMNS) for r in before)
    new = Counter(tuple(r[c] for c in COLUMNS) for r in after)
    assert diff["rows"]["added"] == sum((new - old).values())
    assert diff["rows"]["removed"] == sum((old - new).values())
    assert diff["rows"]["changed"] is None and any("no key" in note for note in diff["notes"])


def test_schema_drift_and_rows_compared_over_common_columns(tmp_path: Path) -> None:
    rng = random.Random(3)
    before_columns = {"pid": "VARCHAR", "age": "BIGINT", "sex": "VARCHAR", "note": "VARCHAR", "ward": "VARCHAR",
                      "score": "VARCHAR"}
    after_columns = {"pid": "VARCHAR", "age": "DOUBLE", "sex": "VARCHAR", "weight": "DOUBLE", "ward": "BIGINT",
                     "score": "DOUBLE"}
    before = random_rows(rng, 97, unique=True)
    for row in before:
        row["ward"] = None if row["ward"] is None else str(row["ward"])
        row["score"] = str(round(rng.uniform(0, 10), 1))
    after = [dict(row) for row in before[5:]]
    for row in after[:7]:
        row["sex"] = "X"
    for row in after:
        row["ward"] = None if row["ward"] is None else int(row["ward"])
        row["age"] = None if row["age"] is None else float(row["age"])  # the same ages, now DOUBLE
        row["score"] = float(row["score"])
    card = make_card(after_columns, rows_per_unit="one", public=PUBLIC | {"score"})
    diff = version_diff(write_parquet(tmp_path / "b.parquet", before, before_columns),
                        write_parquet(tmp_path / "a.parquet", after, after_columns), card)
    assert diff["schema"] == {"added": ["weight"], "removed": ["note"],
                              "retyped": [{"column": "age", "before": "BIGINT", "after": "DOUBLE"},
                                          {"column": "ward", "before": "VARCHAR", "after": "BIGINT"},
                                          {"column": "score", "before": "VARCHAR", "after": "DOUBLE"}]}
    expected_changed = sum(1 for row in before[5:12] if row["sex"] != "X")
    assert diff["rows"] == {"before": 97, "after": 92, "added": 0, "removed": 5, "changed": expected_changed,
                            "keyed_by": "pid"}, "a retyped column with equal values was counted as changed"
    assert "score" not in diff["columns"], "text and numbers were compared as one distribution"
    assert any(note.startswith("score: VARCHAR before, DOUBLE after") for note in diff["notes"]), diff["notes"]
    old, new = Counter(r["ward"] for r in before), Counter(None if r["ward"] is None else str(r["ward"]) for r in after)
    tvd = 0.5 * sum(abs(old[k] / 97 - new[k] / 92) for k in old.keys() | new.keys())
    assert diff["columns"]["ward"]["kind"] == "categorical", "text codes and integer categories are both categories"
    assert diff["columns"]["ward"]["tvd"] == pytest.approx(tvd, abs=1e-12), "ward was not compared as text"
    ks = ks_statistic([r["age"] for r in before if r["age"] is not None],
                      [r["age"] for r in after if r["age"] is not None])
    assert diff["columns"]["age"]["ks"] == pytest.approx(ks, abs=1e-12) and "weight" not in diff["columns"]


def ks_statistic(before: list[float], after: list[float]) -> float:
    b, a = np.sort(before), np.sort(after)
    points = np.concatenate([b, a])
    return float(np.max(np.abs(np.searchsorted(b, points, side="right") / len(b)
                               - np.searchsorted(a, points, side="right") / len(a))))


def psi(before: Counter[Any], after: Counter[Any]) -> float:
    nb, na = sum(before.values()), sum(after.values())
    total = 0.0
    for key in before.keys() | after.keys():
        pb, pa = max(before[key] / nb, PSI_EPSILON), max(after[key] / na, PSI_EPSILON)
        total += (pa - pb) * math.log(pa / pb)
    return total


def numeric_bins(before: list[float | None], after: list[float | None]) -> tuple[Counter[Any], Counter[Any]]:
    present = np.array([v for v in before if v is not None], dtype=float)
    edges = np.unique(np.quantile(present, DECILES, method="inverted_cdf"))

    def bins(values: list[float | None]) -> Counter[Any]:
        return Counter("null" if v is None else int(np.searchsorted(edges, v, side="left")) for v in values)

    return bins(before), bins(after)


def epoch_seconds(value: date | None) -> float | None:
    return None if value is None else float((value - date(1970, 1, 1)).days * 86400)


@pytest.mark.parametrize("seed", [4, 5])
def test_distribution_shift_matches_numpy(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    before = random_rows(rng, 173, unique=True)
    after = random_rows(rng, 211, unique=True, shift=6.0)
    card = make_card(COLUMNS, rows_per_unit="one")
    diff = version_diff(write_parquet(tmp_path / "b.parquet", before, COLUMNS),
                        write_parquet(tmp_path / "a.parquet", after, COLUMNS), card)
    assert set(diff["columns"]) == PUBLIC, "only public columns are compared, and all of them"
    for column, convert in (("age", float), ("weight", float), ("admitted", epoch_seconds)):
        old = [None if r[column] is None else convert(r[column]) for r in before]
        new = [None if r[column] is None else convert(r[column]) for r in after]
        shift = diff["columns"][column]
        ks = ks_statistic([v for v in old if v is not None], [v for v in new if v is not None])
        assert shift["ks"] == pytest.approx(ks, abs=1e-12), column
        assert shift["psi"] == pytest.approx(psi(*numeric_bins(old, new)), rel=1e-9, abs=1e-12), column
        present = [v for v in old if v is not None]
        assert shift["before"]["count"] == len(present) and shift["before"]["nulls"] == len(old) - len(present)
        if column != "admitted":
            assert shift["before"]["mean"] == pytest.approx(float(np.mean(present)), rel=1e-9)
            assert shift["before"]["std"] == pytest.approx(float(np.std(present, ddof=1)), rel=1e-9)
    assert diff["columns"]["admitted"]["after"]["min"] == min(r["admitted"] for r in after if r["admitted"]).isoformat()
    for column in ("sex", "ward"):
        old, new = Counter(r[column] for r in before), Counter(r[column] for r in after)
        shift = diff["columns"][column]
        assert shift["kind"] == "categorical", f"{column} has categories: it is compared as categorical"
        tvd = 0.5 * sum(abs(old[k] / len(before) - new[k] / len(after)) for k in old.keys() | new.keys())
        assert shift["tvd"] == pytest.approx(tvd, abs=1e-12)
        assert shift["psi"] == pytest.approx(psi(old, new), rel=1e-9)
        assert {c["value"]: (c["before"], c["after"]) for c in shift["categories"]} == {
            k: (old[k], new[k]) for k in old.keys() | new.keys()}
        assert shift["shifted"] == (shift["psi"] > PSI_SHIFTED)
    assert diff["columns"]["sex"]["shifted"], "a new category taking a third of rows is a shift"
    json.dumps(diff, allow_nan=False)  # stored as JSON with the version


def test_identical_versions_show_no_change_and_no_shift(tmp_path: Path) -> None:
    rows = random_rows(random.Random(6), 131, unique=True)
    card = make_card(COLUMNS, rows_per_unit="one")
    parquet = write_parquet(tmp_path / "v.parquet", rows, COLUMNS)
    diff = version_diff(parquet, write_parquet(tmp_path / "w.parquet", rows, COLUMNS), card)
    assert (diff["rows"]["added"], diff["rows"]["removed"], diff["rows"]["changed"]) == (0, 0, 0)
    for column, shift in diff["columns"].items():
        assert shift["psi"] == pytest.approx(0.0, abs=1e-12) and not shift["shifted"], column
        assert shift.get("ks", 0.0) == pytest.approx(0.0, abs=1e-12), column
        assert shift.get("tvd", 0.0) == pytest.approx(0.0, abs=1e-12), column


def test_a_large_shift_is_flagged(tmp_path: Path) -> None:
    rng = random.Random(8)
    before = random_rows(rng, 151, unique=True)
    after = [{**row, "weight": None if row["weight"] is None else row["weight"] + 200} for row in before]
    card = make_card(COLUMNS, rows_per_unit="one")
    diff = version_diff(write_parquet(tmp_path / "b.parquet", before, COLUMNS),
                        write_parquet(tmp_path / "a.parquet", after, COLUMNS), card)
    weight = diff["columns"]["weight"]
    assert weight["ks"] == pytest.approx(1.0) and weight["shifted"]
    assert not diff["columns"]["age"]["shifted"]
    assert diff["rows"]["changed"] == sum(1 for row in before if row["weight"] is not None)


@pytest.mark.parametrize("n", [60, 3000])
def test_ks_is_exact_with_ties_whether_values_are_few_or_many(tmp_path: Path, n: int) -> None:
    # 3000 rows of ages repeat each value often (counted per value first); 60 rows barely repeat any.
    rng = random.Random(n)
    before = [{"pid": f"p{i}", "age": rng.randint(20, 80)} for i in range(n)]
    after = [{"pid": f"p{i}", "age": rng.randint(25, 85)} for i in range(n + 7)]
    columns = {"pid": "VARCHAR", "age": "BIGINT"}
    diff = version_diff(write_parquet(tmp_path / "b.parquet", before, columns),
                        write_parquet(tmp_path / "a.parquet", after, columns), make_card(columns, rows_per_unit="one"))
    expected = ks_statistic([float(r["age"]) for r in before], [float(r["age"]) for r in after])
    assert diff["columns"]["age"]["ks"] == pytest.approx(expected, abs=1e-12)


def test_a_card_saying_one_row_per_unit_over_a_version_that_repeats_units_falls_back_to_whole_rows(
        tmp_path: Path) -> None:
    columns = {"pid": "VARCHAR", "age": "BIGINT"}
    before = [{"pid": "p1", "age": 30}, {"pid": "p1", "age": 31}, {"pid": "p2", "age": 40}]
    after = [{"pid": "p1", "age": 30}, {"pid": "p2", "age": 41}]
    diff = version_diff(write_parquet(tmp_path / "b.parquet", before, columns),
                        write_parquet(tmp_path / "a.parquet", after, columns), make_card(columns, rows_per_unit="one"))
    assert diff["rows"] == {"before": 3, "after": 2, "added": 1, "removed": 2, "changed": None, "keyed_by": None}
    assert any("before version repeats 'pid'" in note for note in diff["notes"]), diff["notes"]
