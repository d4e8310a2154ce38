"""FHIR R4 NDJSON written with the fhir.resources models is flattened to one table by the steward's
mapping: Patient through `subject`, Encounter through `encounter`, Observations by code, nearest in time."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from fhir.resources.R4B.encounter import Encounter
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.procedure import Procedure
from pydantic import ValidationError

from sandbox.catalog.cards import DatasetCard
from sandbox.catalog.fhir import FhirMapping, flatten_to_parquet, parse_path, propose_mapping, resolve
from sandbox.catalog.ingest import ingest_version
from sandbox.errors import Invalid

MAPPING: dict[str, Any] = {"row": "Procedure", "columns": {
    "patient_id": {"resource": "Patient", "path": "id"},
    "sex": {"resource": "Patient", "path": "gender"},
    "birth_date": {"resource": "Patient", "path": "birthDate", "type": "date"},
    "procedure_code": {"resource": "Procedure", "path": "code.coding[0].code"},
    "performed": {"resource": "Procedure", "path": "performedDateTime", "type": "timestamp"},
    "site": {"resource": "Encounter", "path": "serviceProvider.reference"},
    "systolic_bp": {"resource": "Observation", "code": "8480-6", "path": "valueQuantity.value", "type": "float"},
}}


def _patient(pid: str, gender: str, birth: str) -> Patient:
    return Patient(id=pid, gender=gender, birthDate=birth)


def _encounter(eid: str, pid: str, site: str, start: str) -> Encounter:
    return Encounter(id=eid, status="finished", subject={"reference": f"Patient/{pid}"},
                     class_fhir={"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
                     serviceProvider={"reference": f"Organization/{site}"}, period={"start": start})


def _procedure(prid: str, pid: str, eid: str | None, code: str, performed: str) -> Procedure:
    extra = {"encounter": {"reference": f"Encounter/{eid}"}} if eid else {}
    return Procedure(id=prid, status="completed", subject={"reference": f"Patient/{pid}"},
                     code={"coding": [{"system": "http://snomed.info/sct", "code": code}]},
                     performedDateTime=performed, **extra)


def _systolic(oid: str, pid: str, eid: str | None, when: str, value: float) -> Observation:
    extra = {"encounter": {"reference": f"Encounter/{eid}"}} if eid else {}
    return Observation(id=oid, status="final", subject={"reference": f"Patient/{pid}"}, effectiveDateTime=when,
                       code={"coding": [{"system": "http://loinc.org", "code": "8480-6",
                                         "display": "Systolic blood pressure"}]},
                       valueQuantity={"value": value, "unit": "mm[Hg]"}, **extra)


def resources() -> list[Any]:
    return [
        _patient("p1", "female", "1960-01-02"), _patient("p2", "male", "1975-05-06"),
        _patient("p3", "female", "1980-12-31"),
        _encounter("e1", "p1", "h1", "2024-01-10T08:00:00Z"), _encounter("e2", "p2", "h2", "2024-01-11T08:00:00Z"),
        _encounter("e3", "p1", "h2", "2024-03-01T08:00:00Z"),
        # 09:00 in UTC+8 is 01:00 UTC: o2 (01:30) is nearer than o1 (07:00) in the same encounter.
        _procedure("pr1", "p1", "e1", "80146002", "2024-01-10T09:00:00+08:00"),
        _procedure("pr2", "p2", "e2", "232717009", "2024-01-11T10:00:00Z"),
        _procedure("pr3", "p1", "e3", "80146002", "2024-03-01T11:00:00Z"),
        _procedure("pr4", "p3", None, "387713003", "2024-04-01T00:00:00Z"),
        _systolic("o1", "p1", "e1", "2024-01-10T07:00:00Z", 120.0),
        _systolic("o2", "p1", "e1", "2024-01-10T01:30:00Z", 135.0),
        _systolic("o3", "p1", "e3", "2024-03-01T10:00:00Z", 150.0),
        _systolic("o4", "p2", None, "2024-01-01T10:00:00Z", 110.0),
    ]


EXPECTED = {
    "patient_id": ["p1", "p2", "p1", "p3"],
    "sex": ["female", "male", "female", "female"],
    "birth_date": [dt.date(1960, 1, 2), dt.date(1975, 5, 6), dt.date(1960, 1, 2), dt.date(1980, 12, 31)],
    "procedure_code": ["80146002", "232717009", "80146002", "387713003"],
    "performed": [dt.datetime(2024, 1, 10, 1), dt.datetime(2024, 1, 11, 10), dt.datetime(2024, 3, 1, 11),
                  dt.datetime(2024, 4, 1)],
    "site": ["Organization/h1", "Organization/h2", "Organization/h2", None],
    "systolic_bp": [135.0, 110.0, 150.0, None],
}


def write_ndjson(path: Path, items: list[Any], *, compress: bool = False) -> Path:
    text = "".join(item.model_dump_json() + "\n" for item in items)
    if compress:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def card(mapping: dict[str, Any] | None = MAPPING) -> DatasetCard:
    columns = {"patient_id": {"type": "string"}, "sex": {"type": "string", "categories": ["female", "male"]},
               "birth_date": {"type": "date"}, "procedure_code": {"type": "string"},
               "performed": {"type": "timestamp"}, "site": {"type": "string"}, "systolic_bp": {"type": "float"}}
    return DatasetCard.model_validate({"name": "fhir-procedures", "title": "Procedures", "privacy_unit": "patient_id",
                                       "columns": columns, "fhir_mapping": mapping})


@pytest.mark.parametrize("name", ["bundle.ndjson", "bundle.ndjson.gz", "bundle.jsonl"])
def test_fhir_resources_flatten_to_one_row_per_procedure(tmp_path: Path, name: str) -> None:
    upload = write_ndjson(tmp_path / name, resources(), compress=name.endswith(".gz"))
    destination = tmp_path / "stored.parquet"
    ingested = ingest_version(card(), upload, name, destination)
    assert ingested.source_format == "fhir" and ingested.rows == 4
    stored = pq.read_table(destination).to_pydict()
    for column, values in EXPECTED.items():
        assert stored[column] == values, f"column {column}: {stored[column]} != {values}"


def test_the_mapping_is_typed_on_the_card(tmp_path: Path) -> None:
    assert isinstance(card().fhir_mapping, FhirMapping)
    assert card().model_dump(mode="json")["fhir_mapping"]["columns"]["systolic_bp"]["code"] == "8480-6"


def test_paths_are_a_tiny_language() -> None:
    resource = {"code": {"coding": [{"code": "a"}, {"code": "b"}]}, "name": [{"given": ["Ann"]}]}
    assert resolve(resource, parse_path("code.coding[1].code")) == "b"
    assert resolve(resource, parse_path("code.coding[5].code")) is None
    assert resolve(resource, parse_path("name.given")) == "Ann"  # a list without index: its first element
    for bad in ("code..coding", "code.coding[x]", "code.coding[0]]", "$where(1)", "a b", ""):
        with pytest.raises(ValueError, match="path"):
            parse_path(bad)


@pytest.mark.parametrize(("change", "expected"), [
    ({"row": "Medication"}, "row"),
    ({"columns": {"x": {"resource": "Patient", "path": "genderr"}}}, "not an element of a FHIR R4 Patient"),
    ({"columns": {"x": {"resource": "Patient", "path": "name[0]..family"}}}, "pattern"),
    ({"columns": {"x": {"resource": "Procedure", "path": "status", "code": "1"}}}, "selects Observations"),
    ({"row": "Patient", "columns": {"x": {"resource": "Procedure", "path": "status"}}}, "cannot be joined"),
    ({"columns": {"x": {"resource": "Observation", "path": "valueQuantity.value"}}}, "needs a code"),
    ({"columns": {"bad name": {"resource": "Patient", "path": "id"}}}, "names must be"),
])
def test_bad_mappings_are_refused_with_the_reason(change: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        FhirMapping.model_validate({**MAPPING, **change})


def test_a_path_the_file_does_not_have_is_invalid(tmp_path: Path) -> None:
    upload = write_ndjson(tmp_path / "bundle.ndjson", resources())
    mapping = {"row": "Procedure", "columns": {**MAPPING["columns"],
                                               "body_site": {"resource": "Procedure", "path": "bodySite.text"}}}
    with pytest.raises(Invalid) as caught:
        flatten_to_parquet([upload], FhirMapping.model_validate(mapping), tmp_path / "out.parquet")
    assert any("'body_site'" in error and "bodySite.text" in error for error in caught.value.errors)


def test_a_broken_line_is_named_by_its_number(tmp_path: Path) -> None:
    upload = write_ndjson(tmp_path / "bundle.ndjson", resources())
    lines = upload.read_text().splitlines()
    lines.insert(5, '{"resourceType": "Patient", "id": ')
    upload.write_text("\n".join(lines) + "\n")
    with pytest.raises(Invalid, match="line 6 is not JSON"):
        ingest_version(card(), upload, upload.name, tmp_path / "stored.parquet")


def test_a_resource_outside_the_four_is_invalid(tmp_path: Path) -> None:
    upload = write_ndjson(tmp_path / "bundle.ndjson", resources())
    with upload.open("a") as handle:
        handle.write(json.dumps({"resourceType": "MedicationRequest", "id": "m1"}) + "\n")
    with pytest.raises(Invalid, match="line 15 is a 'MedicationRequest'"):
        ingest_version(card(), upload, upload.name, tmp_path / "stored.parquet")


def test_fhir_without_a_mapping_on_the_card_is_invalid(tmp_path: Path) -> None:
    upload = write_ndjson(tmp_path / "bundle.ndjson", resources())
    with pytest.raises(Invalid, match="no fhir_mapping"):
        ingest_version(card(None), upload, upload.name, tmp_path / "stored.parquet")
    assert not list(tmp_path.glob(".upload-*")), "a temporary file was left behind"


def test_a_value_of_the_wrong_type_names_the_resource(tmp_path: Path) -> None:
    upload = write_ndjson(tmp_path / "bundle.ndjson", resources())
    mapping = {"row": "Procedure", "columns": {**MAPPING["columns"],
                                               "sex": {"resource": "Patient", "path": "gender", "type": "date"}}}
    with pytest.raises(Invalid, match="Patient/p1 column 'sex'"):
        flatten_to_parquet([upload], FhirMapping.model_validate(mapping), tmp_path / "out.parquet")


def test_the_proposed_mapping_covers_the_common_fields(tmp_path: Path) -> None:
    upload = write_ndjson(tmp_path / "bundle.ndjson", resources())
    proposed = propose_mapping([upload])
    assert proposed.row == "Procedure"
    columns = proposed.columns
    for name in ("patient_id", "sex", "birth_date", "procedure_code", "performed", "site", "admission"):
        assert name in columns, f"{name} missing from {sorted(columns)}"
    assert columns["systolic_blood_pressure"].code == "8480-6"
    assert columns["systolic_blood_pressure"].type == "float"
    count = flatten_to_parquet([upload], proposed, tmp_path / "proposed.parquet")
    stored = pq.read_table(tmp_path / "proposed.parquet").to_pydict()
    assert count == 4 and stored["systolic_blood_pressure"] == EXPECTED["systolic_bp"]


def test_non_utf8_and_damaged_gzip_are_invalid(tmp_path: Path) -> None:
    latin = write_ndjson(tmp_path / "latin.ndjson", resources())
    latin.write_bytes(latin.read_bytes() + b'{"resourceType": "Patient", "id": "\xe9"}\n')
    with pytest.raises(Invalid, match="line 15 is not UTF-8"):
        ingest_version(card(), latin, latin.name, tmp_path / "stored.parquet")
    packed = write_ndjson(tmp_path / "bundle.ndjson.gz", resources(), compress=True)
    packed.write_bytes(packed.read_bytes()[:-40])
    with pytest.raises(Invalid, match="damaged gzip"):
        ingest_version(card(), packed, packed.name, tmp_path / "stored.parquet")
