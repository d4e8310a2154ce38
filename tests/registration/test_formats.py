"""Each accepted format, written by its own ecosystem's writer, is ingested with its values intact; each
broken or unknown file is a 422 Invalid that says what is wrong."""

from __future__ import annotations

import datetime as dt
import zipfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pyreadstat
import pytest

from sandbox.catalog.cards import DatasetCard
from sandbox.catalog.formats import SAS7BDAT_MAGIC, SourceFormat, detect_format
from sandbox.catalog.ingest import IngestedVersion, ingest_version
from sandbox.errors import Invalid

ROWS = 12


def frame() -> pd.DataFrame:
    """A small clinical table; names fit SAS XPORT's eight characters."""
    return pd.DataFrame({
        "pid": [f"P{i:03d}" for i in range(ROWS)],
        "age": [40 + 3 * i for i in range(ROWS)],
        "sex": ["F" if i % 2 else "M" for i in range(ROWS)],
        "weight": [55.5 + i * 1.25 for i in range(ROWS)],
        "admitted": [dt.date(2024, 1, 1) + dt.timedelta(days=7 * i) for i in range(ROWS)],
        "proc_at": [dt.datetime(2024, 2, 1, 8, 30) + dt.timedelta(hours=13 * i) for i in range(ROWS)],
    })


def card(**columns: Any) -> DatasetCard:
    declared = columns or {"pid": {"type": "string"}, "age": {"type": "integer"},
                           "sex": {"type": "string", "categories": ["F", "M"]}, "weight": {"type": "float"},
                           "admitted": {"type": "date"}, "proc_at": {"type": "timestamp"}}
    return DatasetCard.model_validate({"name": "formats", "title": "Formats", "privacy_unit": next(iter(declared)),
                                       "privacy_unit_rows": "one", "columns": declared})


def ingest(tmp_path: Path, upload: Path, the_card: DatasetCard | None = None) -> tuple[IngestedVersion, pd.DataFrame]:
    destination = tmp_path / "stored" / "version.parquet"
    destination.parent.mkdir(exist_ok=True)
    ingested = ingest_version(the_card or card(), upload, upload.name, destination)
    leftovers = sorted(p.name for p in destination.parent.iterdir() if p != destination)
    assert not leftovers, f"temporary files were left beside the destination: {leftovers}"
    return ingested, pq.read_table(destination).to_pandas()


def assert_same_values(stored: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(stored["pid"]) == list(expected["pid"])
    assert list(stored["age"]) == list(expected["age"])
    assert list(stored["sex"]) == list(expected["sex"])
    assert stored["weight"].tolist() == pytest.approx(expected["weight"].tolist(), abs=1e-9)
    assert [d for d in stored["admitted"]] == list(expected["admitted"])
    assert [pd.Timestamp(t).to_pydatetime() for t in stored["proc_at"]] == list(expected["proc_at"])


def test_excel_written_by_pandas_round_trips(tmp_path: Path) -> None:
    upload = tmp_path / "export.xlsx"
    frame().to_excel(upload, index=False, engine="openpyxl")
    ingested, stored = ingest(tmp_path, upload)
    assert ingested.source_format == "excel" and ingested.rows == ROWS
    assert_same_values(stored, frame())


@pytest.mark.parametrize(("writer", "suffix", "source_format"), [
    (pyreadstat.write_sav, ".sav", "spss"),
    (pyreadstat.write_dta, ".dta", "stata"),
    (pyreadstat.write_xport, ".xpt", "sas"),
])
def test_statistical_files_written_by_pyreadstat_round_trip(tmp_path: Path, writer: Any, suffix: str,
                                                            source_format: str) -> None:
    upload = tmp_path / f"export{suffix}"
    writer(frame(), str(upload))
    ingested, stored = ingest(tmp_path, upload)
    assert ingested.source_format == source_format and ingested.rows == ROWS
    assert_same_values(stored, frame())
    types = {field.name: str(field.type) for field in pq.read_schema(tmp_path / "stored" / "version.parquet")}
    assert types["admitted"] == "date32[day]" and types["proc_at"].startswith("timestamp"), types


def test_spss_value_labels_keep_the_raw_codes(tmp_path: Path) -> None:
    data = pd.DataFrame({"pid": ["a", "b", "c"], "sex": [1, 2, 1]})
    upload = tmp_path / "labelled.sav"
    pyreadstat.write_sav(data, str(upload), variable_value_labels={"sex": {1: "male", 2: "female"}})
    _, stored = ingest(tmp_path, upload, card(pid={"type": "string"}, sex={"type": "integer", "categories": [1, 2]}))
    assert list(stored["sex"]) == [1, 2, 1]


def test_a_fractional_value_in_an_integer_column_is_refused_not_rounded(tmp_path: Path) -> None:
    data = frame()
    data["age"] = data["age"].astype(float)
    data.loc[3, "age"] = 50.5
    upload = tmp_path / "fraction.sav"
    pyreadstat.write_sav(data, str(upload))
    with pytest.raises(Invalid) as caught:
        ingest(tmp_path, upload)
    assert any("'age'" in error and "not whole" in error for error in caught.value.errors), caught.value.errors


# A card's privacy unit must be an ASCII name; the other columns keep their Chinese names.
CHINESE = pd.DataFrame({
    "pid": [f"ZY{i:04d}" for i in range(ROWS)],
    "姓名": ["张三", "李四", "王五", "赵六", "钱七", "孙八", "周九", "吴十", "郑一", "冯二", "陈三", "褚四"],
    "年龄": [30 + i for i in range(ROWS)],
    "医院": ["北京协和医院" if i % 2 else "上海瑞金医院" for i in range(ROWS)],
})
CHINESE_CARD = {"pid": {"type": "string"}, "姓名": {"type": "string"}, "年龄": {"type": "integer"},
                "医院": {"type": "string", "categories": ["北京协和医院", "上海瑞金医院"]}}


@pytest.mark.parametrize(("encoding", "sep", "read_as"), [
    ("gb18030", ",", "gb18030"),
    ("gbk", ";", "gb18030"),
    ("utf-16", "\t", "utf-16"),
    ("utf-8-sig", "|", "utf-8-sig"),
    ("utf-8", ",", "utf-8"),
])
def test_csv_in_any_encoding_and_delimiter_is_read_correctly(tmp_path: Path, encoding: str, sep: str,
                                                             read_as: str) -> None:
    upload = tmp_path / "export.csv"
    CHINESE.to_csv(upload, sep=sep, encoding=encoding, index=False)
    ingested, stored = ingest(tmp_path, upload, card(**CHINESE_CARD))
    assert ingested.source_format == "csv" and ingested.encoding == read_as
    assert list(stored.columns) == list(CHINESE.columns)
    for column in CHINESE.columns:
        assert list(stored[column]) == list(CHINESE[column]), f"{encoding}: column {column} changed"


def test_gbk_that_starts_after_megabytes_of_ascii_is_still_transcoded(tmp_path: Path) -> None:
    upload = tmp_path / "late.csv"
    ascii_rows = 300_000
    with upload.open("wb") as handle:
        handle.write("pid,姓名,年龄,医院\n".encode("gb18030"))
        handle.write("".join(f"A{i:07d},x,40,x\n" for i in range(ascii_rows)).encode("ascii"))
        handle.write("".join(f"{r[1]},{r[2]},{r[3]},{r[4]}\n" for r in CHINESE.itertuples()).encode("gbk"))
    assert upload.stat().st_size > 4 << 20
    declared = {**CHINESE_CARD, "医院": {"type": "string"}}
    ingested, stored = ingest(tmp_path, upload, card(**declared))
    assert ingested.encoding == "gb18030" and ingested.rows == ascii_rows + ROWS
    assert list(stored["姓名"][-ROWS:]) == list(CHINESE["姓名"])
    assert list(stored["医院"][-ROWS:]) == list(CHINESE["医院"])


def test_parquet_passes_through(tmp_path: Path) -> None:
    upload = tmp_path / "export.parquet"
    frame().to_parquet(upload, index=False)
    ingested, stored = ingest(tmp_path, upload)
    assert ingested.source_format == "parquet" and ingested.encoding is None
    assert_same_values(stored, frame())


def test_content_decides_over_the_name(tmp_path: Path) -> None:
    upload = tmp_path / "named.csv"
    frame().to_parquet(upload, index=False)
    assert detect_format(upload, "named.csv") is SourceFormat.PARQUET
    sav = tmp_path / "renamed.bin"
    pyreadstat.write_sav(frame(), str(sav))
    assert detect_format(sav, "renamed.bin") is SourceFormat.SPSS


def _corrupt_xlsx(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("xl/workbook.xml", "<not a workbook")
        archive.writestr("[Content_Types].xml", "garbage")


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("notes.docx", b"hello world", "accepted: .csv"),
    ("export.sav", b"this is plainly not SPSS", "named as an spss file but its content is not one"),
    ("export.sav", b"$FL2" + b"\x00" * 200, "could not read"),
    ("export.xlsx", b"PK\x03\x04 truncated", "named as an excel file but its content is not one"),
    ("legacy.xls", bytes.fromhex("d0cf11e0a1b11ae1") + b"\x00" * 200, "legacy .xls"),
    ("export.sas7bdat", SAS7BDAT_MAGIC + b"\x00" * 300, "could not read"),
    ("export.xpt", b"no header record", "not a sas transport"),
    ("export.dta", b"<stata_dta><header>broken", "could not read"),
    ("export.parquet", b"not parquet at all", "named as a parquet file but its content is not one"),
])
def test_bad_files_are_invalid_with_a_useful_message(tmp_path: Path, name: str, content: bytes,
                                                     expected: str) -> None:
    upload = tmp_path / name
    upload.write_bytes(content)
    with pytest.raises(Invalid) as caught:
        ingest(tmp_path, upload)
    assert expected in caught.value.detail.lower(), caught.value.detail


def test_a_corrupt_excel_workbook_is_invalid(tmp_path: Path) -> None:
    upload = tmp_path / "broken.xlsx"
    _corrupt_xlsx(upload)
    with pytest.raises(Invalid) as caught:
        ingest(tmp_path, upload)
    assert "could not read 'broken.xlsx' as an excel workbook" in caught.value.detail.lower()


def test_invalid_bytes_in_a_declared_encoding_name_the_offset(tmp_path: Path) -> None:
    upload = tmp_path / "mixed.csv"
    upload.write_bytes("pid,医院\n1,北京\n".encode("gb18030") + b"2,\xff\xff\xff\n")
    with pytest.raises(Invalid):
        ingest(tmp_path, upload, card(**{"pid": {"type": "integer"}, "医院": {"type": "string"}}))
