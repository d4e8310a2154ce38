"""A card drafted from each format passes `card_errors`, and the same file then ingests with it; the
proposals are private, the privacy unit and quasi-identifiers are guessed, a data dictionary fills in."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pyreadstat
import pytest
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.procedure import Procedure

from sandbox.catalog.cards import DatasetCard, card_errors
from sandbox.catalog.drafting import draft_card, nice_bounds
from sandbox.catalog.ingest import ingest_version
from sandbox.errors import Invalid

ROWS = 60


def table() -> pd.DataFrame:
    return pd.DataFrame({
        "patient_id": [f"P{i:04d}" for i in range(ROWS)],
        "age": [18 + (i * 37) % 77 for i in range(ROWS)],
        "sex": ["F" if i % 2 else "M" for i in range(ROWS)],
        "site": [("north", "south", "east")[i % 3] for i in range(ROWS)],
        "stage": [1 + i % 4 for i in range(ROWS)],
        "weight": [50.25 + (i * 7) % 40 for i in range(ROWS)],
        "admission_date": [dt.date(2024, 1, 1) + dt.timedelta(days=i) for i in range(ROWS)],
        "note": [f"free text {i}" for i in range(ROWS)],
    })


def draft(tmp_path: Path, upload: Path, **options: Any) -> dict[str, Any]:
    drafted = draft_card(upload, upload.name, name="draft-test", workdir=tmp_path, **options)
    leftovers = [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]
    assert not leftovers, f"drafting left temporary files: {leftovers}"
    return drafted


def assert_ingests(tmp_path: Path, upload: Path, drafted: dict[str, Any]) -> pq.Table:
    card = DatasetCard.model_validate(drafted["card"])
    assert card_errors(card) == []
    destination = tmp_path / "stored.parquet"
    ingest_version(card, upload, upload.name, destination)
    return pq.read_table(destination)


def test_a_csv_draft_proposes_types_bounds_categories_unit_and_quasi_identifiers(tmp_path: Path) -> None:
    upload = tmp_path / "export.csv"
    table().to_csv(upload, index=False)
    drafted = draft(tmp_path, upload)
    card = drafted["card"]
    columns = card["columns"]
    assert {name: spec["type"] for name, spec in columns.items()} == {
        "patient_id": "string", "age": "integer", "sex": "string", "site": "string", "stage": "integer",
        "weight": "float", "admission_date": "date", "note": "string"}
    assert card["privacy_unit"] == "patient_id" and card["privacy_unit_rows"] == "one"
    assert columns["age"]["bounds"] == [10.0, 100.0]
    assert columns["weight"]["bounds"] == [50.0, 90.0]
    assert columns["sex"]["categories"] == ["F", "M"]
    assert columns["site"]["categories"] == ["east", "north", "south"]
    assert columns["stage"]["categories"] == [1, 2, 3, 4]
    assert "categories" not in columns["note"] and "bounds" not in columns["patient_id"]
    assert all(spec["public"] is False for spec in columns.values()), "a proposal was made public"
    assert set(card["quasi_identifiers"]) == {"age", "sex", "site", "admission_date"}
    assert any("public: false" in note for note in drafted["notes"])
    assert drafted["fhir_mapping"] is None
    assert assert_ingests(tmp_path, upload, drafted).num_rows == ROWS


@pytest.mark.parametrize("dictionary_format", ["csv", "xlsx"])
def test_a_data_dictionary_fills_labels_units_and_domains(tmp_path: Path, dictionary_format: str) -> None:
    upload = tmp_path / "export.csv"
    table().to_csv(upload, index=False)
    entries = pd.DataFrame({
        "Column": ["age", "sex", "stage", "weight", "not_in_file"],
        "Label": ["Age at procedure", "Sex", "Tumour stage", "Body weight", "Ghost"],
        "Unit": ["years", "", "", "kg", ""],
        "Allowed Values": ["0-120", "F=female; M=male; U=unknown", "1|2|3|4|5", "20..250", ""],
    })
    dictionary = tmp_path / f"dictionary.{dictionary_format}"
    if dictionary_format == "csv":
        entries.to_csv(dictionary, index=False)
    else:
        entries.to_excel(dictionary, index=False)
    drafted = draft(tmp_path, upload, dictionary=dictionary, dictionary_filename=dictionary.name)
    columns = drafted["card"]["columns"]
    assert columns["age"]["description"] == "Age at procedure (years)" and columns["age"]["bounds"] == [0.0, 120.0]
    assert columns["weight"]["bounds"] == [20.0, 250.0] and columns["weight"]["description"] == "Body weight (kg)"
    assert columns["sex"]["categories"] == ["F", "M", "U"]
    assert "F=female" in columns["sex"]["description"]
    assert columns["stage"]["categories"] == [1, 2, 3, 4, 5]
    assert any("'not_in_file'" in note for note in drafted["notes"]), drafted["notes"]
    assert_ingests(tmp_path, upload, drafted)


def test_values_outside_the_dictionary_are_a_note(tmp_path: Path) -> None:
    upload = tmp_path / "export.csv"
    table().to_csv(upload, index=False)
    dictionary = tmp_path / "dictionary.csv"
    pd.DataFrame({"column": ["sex"], "allowed values": ["F"]}).to_csv(dictionary, index=False)
    drafted = draft(tmp_path, upload, dictionary=dictionary)
    assert any("'sex'" in note and "'M' (30 rows)" in note for note in drafted["notes"]), drafted["notes"]


def test_a_dictionary_without_a_column_header_is_invalid(tmp_path: Path) -> None:
    upload = tmp_path / "export.csv"
    table().to_csv(upload, index=False)
    dictionary = tmp_path / "dictionary.csv"
    pd.DataFrame({"variable_x": ["sex"], "label": ["Sex"]}).to_csv(dictionary, index=False)
    with pytest.raises(Invalid, match="needs a 'column' header"):
        draft(tmp_path, upload, dictionary=dictionary)


def test_spss_value_labels_become_integer_categories_and_descriptions(tmp_path: Path) -> None:
    data = table()[["patient_id", "age"]].assign(sex=[1 + i % 2 for i in range(ROWS)])
    upload = tmp_path / "export.sav"
    pyreadstat.write_sav(data, str(upload), column_labels={"age": "Age at procedure"},
                         variable_value_labels={"sex": {1: "male", 2: "female", 9: "not stated"}})
    drafted = draft(tmp_path, upload)
    columns = drafted["card"]["columns"]
    assert columns["age"]["type"] == "integer" and columns["age"]["description"] == "Age at procedure"
    assert columns["sex"]["type"] == "integer" and columns["sex"]["categories"] == [1, 2, 9]
    assert "1=male" in columns["sex"]["description"]
    assert list(assert_ingests(tmp_path, upload, drafted).to_pydict()["sex"][:2]) == [1, 2]


def _write(frame: pd.DataFrame, path: Path) -> None:
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False, encoding="gb18030")
    elif suffix == ".xlsx":
        frame.to_excel(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        writer = {".sav": pyreadstat.write_sav, ".dta": pyreadstat.write_dta, ".xpt": pyreadstat.write_xport}[suffix]
        short = frame.rename(columns={"patient_id": "pid", "admission_date": "admitted"})
        writer(short, str(path))


@pytest.mark.parametrize("name", ["export.csv", "export.xlsx", "export.parquet", "export.sav", "export.dta",
                                  "export.xpt"])
def test_every_format_drafts_a_valid_card_that_ingests(tmp_path: Path, name: str) -> None:
    upload = tmp_path / name
    _write(table(), upload)
    drafted = draft(tmp_path, upload)
    stored = assert_ingests(tmp_path, upload, drafted)
    assert stored.num_rows == ROWS
    assert drafted["card"]["columns"]["age"]["type"] == "integer"


def test_chinese_column_names_are_renamed_with_a_note(tmp_path: Path) -> None:
    frame = pd.DataFrame({"pid": [f"ZY{i}" for i in range(ROWS)], "年龄": [30 + i % 40 for i in range(ROWS)],
                          "性别": ["男" if i % 2 else "女" for i in range(ROWS)]})
    upload = tmp_path / "export.csv"
    frame.to_csv(upload, index=False, encoding="gbk")
    drafted = draft(tmp_path, upload)
    assert drafted["card"]["drop_columns"] == []
    assert drafted["card"]["rename"] == {"年龄": "nian_ling", "性别": "xing_bie"}
    assert any("'年龄'" in note and "rename" in note for note in drafted["notes"])
    stored = assert_ingests(tmp_path, upload, drafted)
    assert stored.column_names == ["pid", "nian_ling", "xing_bie"]
    assert set(stored.column("xing_bie").to_pylist()) == {"男", "女"}


def test_without_an_id_name_the_first_unique_column_is_the_unit(tmp_path: Path) -> None:
    frame = table().drop(columns=["patient_id", "note"]).assign(record=[f"R{i}" for i in range(ROWS)])
    upload = tmp_path / "export.parquet"
    frame.to_parquet(upload, index=False)
    drafted = draft(tmp_path, upload)
    # age and admission_date are unique per row in this file too, but they are quasi-identifiers, not ids.
    assert drafted["card"]["privacy_unit"] == "record"
    assert any("first column unique per row" in note for note in drafted["notes"])


def _fhir_bundle(path: Path) -> Path:
    items: list[Any] = []
    for i in range(4):
        items.append(Patient(id=f"p{i}", gender="female" if i % 2 else "male", birthDate=f"19{50 + i}-01-0{i + 1}"))
        for j in range(2):
            items.append(Procedure(id=f"pr{i}{j}", status="completed", subject={"reference": f"Patient/p{i}"},
                                   code={"coding": [{"system": "http://snomed.info/sct", "code": "80146002"}]},
                                   performedDateTime=f"2024-0{j + 1}-1{i}T10:00:00Z"))
            items.append(Observation(id=f"o{i}{j}", status="final", subject={"reference": f"Patient/p{i}"},
                                     code={"coding": [{"system": "http://loinc.org", "code": "29463-7",
                                                       "display": "Body weight"}]},
                                     effectiveDateTime=f"2024-0{j + 1}-1{i}T08:00:00Z",
                                     valueQuantity={"value": 60.5 + i + j, "unit": "kg"}))
    path.write_text("".join(item.model_dump_json() + "\n" for item in items))
    return path


def test_a_fhir_file_drafts_with_a_proposed_mapping(tmp_path: Path) -> None:
    upload = _fhir_bundle(tmp_path / "bundle.ndjson")
    drafted = draft(tmp_path, upload)
    assert drafted["fhir_mapping"]["row"] == "Procedure"
    assert drafted["fhir_mapping"]["columns"]["body_weight"]["code"] == "29463-7"
    card = drafted["card"]
    assert card["privacy_unit"] == "patient_id" and card["privacy_unit_rows"] == "many"
    assert "sex" in card["quasi_identifiers"] and "birth_date" in card["quasi_identifiers"]
    assert any("FHIR mapping was proposed" in note for note in drafted["notes"])
    stored = assert_ingests(tmp_path, upload, drafted)
    assert stored.num_rows == 8
    assert sorted(stored.to_pydict()["body_weight"]) == pytest.approx(sorted(60.5 + i + j for i in range(4)
                                                                             for j in range(2)))


def test_bad_names_and_empty_files_are_invalid(tmp_path: Path) -> None:
    upload = tmp_path / "export.csv"
    table().to_csv(upload, index=False)
    with pytest.raises(Invalid, match="dataset name"):
        draft_card(upload, upload.name, name="Bad Name", workdir=tmp_path)
    header_only = tmp_path / "header.xlsx"
    table().head(0).to_excel(header_only, index=False)
    with pytest.raises(Invalid, match="no rows"):
        draft(tmp_path, header_only)


@pytest.mark.parametrize(("low", "high", "expected"), [
    (18, 94, (10.0, 100.0)), (0.12, 0.87, (0.1, 0.9)), (5, 5, (5.0, 6.0)), (-3.5, 12, (-10.0, 20.0)),
    (1000, 1000, (1000.0, 2000.0)),
])
def test_bounds_are_rounded_outward(low: float, high: float, expected: tuple[float, float]) -> None:
    lower, upper = nice_bounds(low, high)
    assert lower <= low and upper >= high
    assert (lower, upper) == pytest.approx(expected)
