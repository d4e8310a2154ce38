"""An export with Chinese headers: the draft reads each under an ASCII card name (`rename`), and the same
file then registers under that card with its Chinese text intact."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sandbox.catalog.cards import DatasetCard, card_errors
from sandbox.catalog.drafting import card_names, draft_card
from sandbox.catalog.ingest import ingest_version
from sandbox.errors import Invalid

ROWS = [("P0001", 67, "男", "北京宣武医院", "颈动脉狭窄"), ("P0002", 72, "女", "上海华山医院", "高血压"),
        ("P0003", 59, "男", "北京宣武医院", "糖尿病")] * 4


def gb18030_export(path: Path) -> Path:
    lines = ["患者ID,年龄,性别,医院,诊断"] + [",".join(map(str, row)) for row in ROWS]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("gb18030"))
    return path


def test_chinese_headers_are_read_under_pinyin_names_and_registered(tmp_path: Path) -> None:
    export = gb18030_export(tmp_path / "export.csv")
    drafted = draft_card(export, "export.csv", name="registry", workdir=tmp_path)
    card = drafted["card"]
    assert card["rename"] == {"患者ID": "huan_zhe_id", "年龄": "nian_ling", "性别": "xing_bie", "医院": "yi_yuan",
                              "诊断": "zhen_duan"}
    assert card["privacy_unit"] == "huan_zhe_id"
    assert card["columns"]["zhen_duan"]["description"] == "诊断"
    parsed = DatasetCard.model_validate(card)
    assert card_errors(parsed) == []
    stored = ingest_version(parsed, export, "export.csv", tmp_path / "v1.parquet")
    assert stored.rows == len(ROWS) and stored.encoding is not None
    table = pq.read_table(tmp_path / "v1.parquet")
    assert table.column("yi_yuan").to_pylist()[:2] == ["北京宣武医院", "上海华山医院"]
    assert table.column("nian_ling").to_pylist()[:3] == [67, 72, 59]


def test_names_stay_unique_and_valid() -> None:
    renamed = card_names(["age", "年龄", "年 龄", "1号", "_x", "ok_name"])
    assert renamed == {"年龄": "nian_ling", "年 龄": "nian_ling_2", "1号": "column_4_1_hao", "_x": "x"}
    assert all(DatasetCard.model_validate({"name": "ab", "title": "t", "privacy_unit": n,
                                           "columns": {n: {"type": "string"}}}) for n in renamed.values())


def test_a_rename_to_an_undeclared_column_is_refused() -> None:
    card = DatasetCard.model_validate({"name": "ab", "title": "t", "privacy_unit": "pid",
                                       "columns": {"pid": {"type": "string"}}, "rename": {"患者": "nobody"}})
    assert any("neither a declared nor a dropped column" in error for error in card_errors(card))


def test_a_renamed_header_missing_from_the_next_export_is_named(tmp_path: Path) -> None:
    export = gb18030_export(tmp_path / "export.csv")
    card = DatasetCard.model_validate(draft_card(export, "export.csv", name="registry", workdir=tmp_path)["card"])
    later = tmp_path / "later.csv"
    later.write_bytes("病人ID,年龄,性别,医院,诊断\r\nP1,60,男,a,b\r\n".encode("gb18030"))
    with pytest.raises(Invalid) as refused:
        ingest_version(card, later, "later.csv", tmp_path / "v2.parquet")
    assert any("huan_zhe_id" in error for error in refused.value.errors)
