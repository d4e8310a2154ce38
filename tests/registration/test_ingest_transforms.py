"""The card's transforms at ingest: dropped columns never reach storage, generalisations are applied to
the stored values before any check."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from sandbox.catalog.cards import DatasetCard, card_errors
from sandbox.catalog.ingest import ingest_version
from sandbox.errors import Invalid

BIG = 2**62 + 3


def export() -> pd.DataFrame:
    return pd.DataFrame({
        "pid": ["a", "b", "c", "d"],
        "name": ["Zhang San", "Li Si", "Wang Wu", "Zhao Liu"],
        "national_id": ["11010519491231002X", "110105194912310029", "110105194912310037", "110105194912310045"],
        "age": [63, 70, 79, 18],
        "delta": [-7, 4, 0, 5],
        "counter": [13, 19, 20, 0],
        "weight": [61.3, 72.49, 80.0, 55.1],
        "visit_date": [dt.date(2024, 3, 17), dt.date(2024, 12, 31), dt.date(2023, 1, 1), dt.date(2024, 2, 29)],
        "visit_ts": [dt.datetime(2024, 3, 17, 10, 5), dt.datetime(2021, 7, 1), dt.datetime(2023, 12, 31, 23, 59),
                     dt.datetime(2024, 1, 1)],
    })


def card(**overrides: Any) -> DatasetCard:
    document: dict[str, Any] = {
        "name": "transforms", "title": "Transforms", "privacy_unit": "pid", "privacy_unit_rows": "one",
        "columns": {"pid": {"type": "string"}, "age": {"type": "integer", "categories": [10, 60, 70]},
                    "delta": {"type": "integer"}, "counter": {"type": "integer"}, "weight": {"type": "float"},
                    "visit_date": {"type": "date"}, "visit_ts": {"type": "timestamp"}},
        "drop_columns": ["name", "national_id", "not_in_this_export"],
        "generalise": {"age": {"band": 10}, "delta": {"band": 5}, "counter": {"band": 10}, "weight": {"band": 2.5},
                       "visit_date": {"to": "month"}, "visit_ts": {"to": "year"}},
    }
    document.update(overrides)
    the_card = DatasetCard.model_validate(document)
    assert card_errors(the_card) == []
    return the_card


@pytest.fixture(params=["csv", "parquet", "xlsx"])
def upload(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / f"export.{request.param}"
    if request.param == "csv":
        export().to_csv(path, index=False)
    elif request.param == "parquet":
        export().to_parquet(path, index=False)
    else:
        export().to_excel(path, index=False)
    return path


def test_drop_and_generalise_change_what_is_stored(tmp_path: Path, upload: Path) -> None:
    destination = tmp_path / "stored.parquet"
    ingested = ingest_version(card(), upload, upload.name, destination)
    stored = pq.read_table(destination)
    assert "name" not in stored.column_names and "national_id" not in stored.column_names
    assert ingested.dropped == ["name", "national_id"]
    assert ingested.generalised == {"age": {"band": 10.0}, "delta": {"band": 5.0}, "counter": {"band": 10.0},
                                    "weight": {"band": 2.5}, "visit_date": {"to": "month"},
                                    "visit_ts": {"to": "year"}}
    values = stored.to_pydict()
    assert values["age"] == [60, 70, 70, 10]
    assert values["delta"] == [-10, 0, 0, 5], "bands floor negative numbers"
    assert values["counter"] == [10, 10, 20, 0]
    assert values["weight"] == pytest.approx([60.0, 70.0, 80.0, 55.0])
    assert values["visit_date"] == [dt.date(2024, 3, 1), dt.date(2024, 12, 1), dt.date(2023, 1, 1),
                                    dt.date(2024, 2, 1)]
    assert values["visit_ts"] == [dt.datetime(2024, 1, 1), dt.datetime(2021, 1, 1), dt.datetime(2023, 1, 1),
                                  dt.datetime(2024, 1, 1)]
    types = {field.name: str(field.type) for field in stored.schema}
    assert types["age"] == "int64" and types["visit_date"] == "date32[day]"
    assert types["visit_ts"].startswith("timestamp")


def test_categories_are_checked_after_generalising(tmp_path: Path, upload: Path) -> None:
    # 63 and 79 are outside [10, 60, 70] until banded; without the band they are refused.
    with pytest.raises(Invalid) as caught:
        ingest_version(card(generalise={}), upload, upload.name, tmp_path / "stored.parquet")
    assert any("'age'" in error and "outside its declared categories" in error for error in caught.value.errors)


def test_a_column_neither_declared_nor_dropped_is_still_refused(tmp_path: Path, upload: Path) -> None:
    with pytest.raises(Invalid) as caught:
        ingest_version(card(drop_columns=["name"]), upload, upload.name, tmp_path / "stored.parquet")
    assert caught.value.errors == ["column 'national_id' (VARCHAR) is in the file but not declared"]


def test_an_ingest_without_transforms_records_none(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    export()[["pid", "age"]].to_csv(path, index=False)
    plain = DatasetCard.model_validate({"name": "plain", "title": "Plain", "privacy_unit": "pid",
                                        "columns": {"pid": {"type": "string"}, "age": {"type": "integer"}}})
    ingested = ingest_version(plain, path, path.name, tmp_path / "stored.parquet")
    assert ingested.dropped == [] and ingested.generalised == {} and ingested.encoding == "utf-8"
    assert pq.read_table(tmp_path / "stored.parquet").to_pydict()["age"] == [63, 70, 79, 18]


def test_integer_bands_are_exact_past_two_to_the_53(tmp_path: Path) -> None:
    path = tmp_path / "big.parquet"
    frame = export()
    frame["counter"] = [BIG, -BIG, 2**53 + 1, 9]
    frame.to_parquet(path, index=False)
    ingest_version(card(), path, path.name, tmp_path / "stored.parquet")
    stored = pq.read_table(tmp_path / "stored.parquet").to_pydict()["counter"]
    assert stored == [BIG - BIG % 10, -BIG - (-BIG) % 10, 2**53 + 1 - (2**53 + 1) % 10, 0], stored


@pytest.mark.parametrize("band", [float("inf"), 1e300])
def test_absurd_bands_are_invalid_not_a_crash(tmp_path: Path, band: float) -> None:
    path = tmp_path / "plain.parquet"
    export()[["pid", "age"]].to_parquet(path, index=False)
    banded = DatasetCard.model_validate({"name": "plain", "title": "Plain", "privacy_unit": "pid",
                                         "columns": {"pid": {"type": "string"}, "age": {"type": "integer"}},
                                         "generalise": {"age": {"band": band}}})
    try:
        ingested = ingest_version(banded, path, path.name, tmp_path / "stored.parquet")
    except Invalid as refused:
        assert "age" in refused.detail or refused.errors, refused.detail
    else:  # a band wider than any value floors every age to 0
        assert ingested.rows == 4
        assert pq.read_table(tmp_path / "stored.parquet").to_pydict()["age"] == [0, 0, 0, 0]
