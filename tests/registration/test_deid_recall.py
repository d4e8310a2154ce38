"""The de-identification scan over a seeded clinical corpus: every seeded direct identifier is found, clean
clinical columns stay (nearly) silent, and no example shows a whole value."""

# Clinical Chinese is written with full-width punctuation (commas, colons, brackets), which the text keeps.
# ruff: noqa: RUF001

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deid_corpus import Corpus, clinical_table, invalid_id, valid_id

from sandbox.catalog import deid
from sandbox.catalog.cards import DatasetCard
from sandbox.catalog.deid import IdentifierFinding, IdentifierKind, scan_identifiers

ROWS = 2000
FALSE_POSITIVE_SHARE = 0.01
NOTES = ("notes_cn", "notes_en")
ARROW_TYPES = {pa.string(): "string", pa.int64(): "integer", pa.float64(): "float", pa.date32(): "date",
               pa.timestamp("us"): "timestamp"}


def card_for(table: pa.Table, privacy_unit: str = "patient_id") -> DatasetCard:
    columns = {name: {"type": ARROW_TYPES[table.schema.field(name).type]} for name in table.column_names}
    return DatasetCard(name="deid-corpus", title="Seeded clinical corpus", privacy_unit=privacy_unit, columns=columns)


def scan(table: pa.Table, directory: Path, name: str) -> dict[tuple[str, str], IdentifierFinding]:
    path = directory / f"{name}.parquet"
    pq.write_table(table, path)
    unit = "patient_id" if "patient_id" in table.column_names else table.column_names[0]
    return {(f.column, f.kind.value): f for f in scan_identifiers(path, card_for(table, unit), threads=2)}


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return clinical_table(ROWS, seed=16)


@pytest.fixture(scope="module")
def full_scan(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], IdentifierFinding]:
    return scan(corpus.table, tmp_path_factory.mktemp("deid"), "full")


def seeded_rows(corpus: Corpus, column: str) -> set[int]:
    return set().union(*(rows for (name, _), rows in corpus.truth.items() if name == column))


def test_recall_is_complete_on_every_seeded_kind(corpus: Corpus, full_scan: dict) -> None:
    for (column, kind), rows in sorted(corpus.truth.items()):
        finding = full_scan.get((column, kind))
        assert finding is not None, f"{column}: {len(rows)} seeded {kind} rows, none found"
        assert finding.count >= len(rows), f"{column}: {kind} found in {finding.count} of {len(rows)} seeded rows"


def test_seeded_rows_alone_are_found_exactly(corpus: Corpus, tmp_path: Path) -> None:
    """Only the notes rows that hold seeded identifiers: each kind's count is exactly its seeded rows."""
    for column in NOTES:
        rows = sorted(seeded_rows(corpus, column))
        table = pa.table({column: corpus.table.column(column).take(pa.array(rows))})
        position = {row: i for i, row in enumerate(rows)}
        findings = scan(table, tmp_path, f"seeded-{column}")
        for kind in IdentifierKind:
            want = {position[row] for row in corpus.truth.get((column, kind.value), set())}
            got = findings.get((column, kind.value))
            assert (got.count if got else 0) == len(want), \
                f"{column}: {kind.value} counted in {got.count if got else 0} rows, seeded in {len(want)}"


def test_clean_rows_of_notes_have_at_most_one_percent_false_positives(corpus: Corpus, tmp_path: Path) -> None:
    for column in NOTES:
        clean = sorted(set(range(ROWS)) - seeded_rows(corpus, column))
        table = pa.table({column: corpus.table.column(column).take(pa.array(clean))})
        flagged = sum(f.count for f in scan(table, tmp_path, f"clean-{column}").values())
        assert flagged <= FALSE_POSITIVE_SHARE * len(clean), \
            f"{column}: {flagged} identifier hits in {len(clean)} clean rows"


def test_clean_clinical_columns_have_at_most_one_percent_false_positives(corpus: Corpus, full_scan: dict) -> None:
    for column in corpus.clean_columns:
        hits = {kind: f.count for (name, kind), f in full_scan.items() if name == column}
        assert sum(hits.values()) <= FALSE_POSITIVE_SHARE * ROWS, f"clean column {column} flagged: {hits}"
    # The card's privacy unit is a pseudonym (P000123): scanned, and not an identifier.
    assert not [key for key in full_scan if key[0] == "patient_id"], "the pseudonymous patient_id was flagged"


def test_identity_numbers_with_wrong_check_digits_do_not_count(corpus: Corpus, full_scan: dict) -> None:
    ids = corpus.table.column("id_number").to_pylist()
    wrong = [i for i, value in enumerate(ids) if i not in corpus.truth[("id_number", "national_id")]]
    assert wrong, "the corpus holds no wrong check digits to test"
    assert full_scan[("id_number", "national_id")].count == ROWS - len(wrong)


def test_only_wrong_check_digits_give_no_identity_finding(tmp_path: Path) -> None:
    import random

    rng = random.Random(5)
    table = pa.table({"id_number": [invalid_id(rng) for _ in range(300)],
                      "note": [f"身份证号{invalid_id(rng)}，ID card {invalid_id(rng)}" for _ in range(300)]})
    findings = scan(table, tmp_path, "invalid-ids")
    assert not [key for key in findings if key[1] == "national_id"], f"wrong check digits counted: {findings}"


def test_examples_are_masked_and_never_a_whole_value(corpus: Corpus, full_scan: dict) -> None:
    cells = {str(v) for name in corpus.table.column_names for v in corpus.table.column(name).to_pylist()}
    seeded = [value for value in corpus.seeded_values if len(value) >= 4]
    for (column, kind), finding in full_scan.items():
        assert 1 <= len(finding.examples) <= 3, f"{column}/{kind}: {len(finding.examples)} examples"
        for example in finding.examples:
            assert "*" in example, f"{column}/{kind}: example {example!r} is not masked"
            assert example not in cells, f"{column}/{kind}: example {example!r} is a whole cell value"
            leaked = [value for value in seeded if value in example]
            assert not leaked, f"{column}/{kind}: example {example!r} shows the seeded identifier {leaked[0]!r}"


def test_masks() -> None:
    assert deid.mask_name("张伟") == "张*"
    assert deid.mask_name("王") == "王*"
    assert deid.mask_name("John Smith") == "J*** S****"
    assert deid.mask_national_id("11010519491231002X") == "1101**********002X"
    assert deid.mask_phone("138-1234-5678") == "138-****-**78"
    assert deid.mask_email("j.smith@example.org") == "j***@example.org"
    assert deid.mask_birth_date("1985年3月12日") == "1985年*月**日"
    assert deid.mask_birth_date("03/12/1985") == "**/**/1985"
    assert deid.mask_record_number("ZY20231234") == "ZY********"
    assert "88" not in deid.mask_address("北京市朝阳区建国路88号")
    assert deid.mask_address("12 Oak Street") == "** O** S*****"


def test_name_column_threshold_depends_on_content_and_name(tmp_path: Path) -> None:
    """A column of clinical words with a few names: a name-like column name lowers the bar, content decides."""
    values = ["高血压", "冠心病", "肺炎", "贫血", "痛风", "房颤", "脑梗死", "骨质疏松", "白内障", "黄疸",
              "石淋", "毛囊炎", "哮喘", "胃炎", "肾结石", "张伟", "李娜"]  # 2 of 17 distinct values are names
    table = pa.table({"name": values * 20, "remark": values * 20})
    findings = scan(table, tmp_path, "threshold")
    assert findings[("name", "person_name")].count == 40, "a column named 'name' with names in it was not flagged"
    assert ("remark", "person_name") not in findings, "12% names in an unnamed column crossed the 30% bar"
    mostly_names = pa.table({"remark": ["张伟", "李娜", "王芳", "John Smith", "高血压"] * 10})
    assert scan(mostly_names, tmp_path, "names")[("remark", "person_name")].count == 40


def test_named_columns_need_supporting_content(tmp_path: Path) -> None:
    table = pa.table({"phone": ["unknown", "none", "n/a"] * 10, "dob": ["2020 cohort", "n/a", "-"] * 10,
                      "mrn": ["see notes", "n/a", "-"] * 10, "birth_date": pa.array([None] * 30, pa.date32())})
    assert scan(table, tmp_path, "named-empty") == {}, "a column's name alone made findings"


def test_integer_columns_phone_and_identity_numbers(tmp_path: Path) -> None:
    import random

    rng = random.Random(9)
    ids = [int(number) for number in (valid_id(rng) for _ in range(80)) if number[-1] != "X"][:50]
    table = pa.table({"contact": pa.array([13_812_345_678 + i for i in range(60)], pa.int64()),
                      "lab_order": pa.array([20_230_000_000 + i for i in range(60)], pa.int64()),
                      "resident": pa.array(ids + [110_105_194_912_310_021] * (60 - len(ids)), pa.int64())})
    findings = scan(table, tmp_path, "integers")
    assert findings[("contact", "phone")].count == 60
    assert ("lab_order", "phone") not in findings
    valid = sum(1 for number in table.column("resident").to_pylist() if deid._detectors().r.valid_prc_id(str(number)))
    assert findings[("resident", "national_id")].count == valid


def test_many_candidates_are_sampled_and_scaled(corpus: Corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    """Past CANDIDATE_LIMIT distinct candidates, counts are scaled from a fixed sample: close, not exact."""
    monkeypatch.setattr(deid, "CANDIDATE_LIMIT", 300)
    findings = scan(corpus.table.select(["notes_cn", "id_number"]), tmp_path, "sampled")
    for key in (("notes_cn", "phone"), ("id_number", "national_id")):
        want = len(corpus.truth[key])
        assert abs(findings[key].count - want) <= 0.2 * want, f"{key}: scaled {findings[key].count}, seeded {want}"


def test_scan_makes_no_network_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the scan opened a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    table = pa.table({"note": ["Email j.smith@example.org, tel +1 (617) 253-1000", "邮箱 li_na88@163.com"]})
    findings = scan(table, tmp_path, "offline")
    assert findings[("note", "email")].count == 2


def test_importing_the_scan_does_not_import_presidio() -> None:
    code = ("import sys, sandbox.catalog.deid; "
            "print(sorted(m for m in ('presidio_analyzer', 'spacy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing sandbox.catalog.deid imported {out.strip()}"


def test_a_scan_that_finds_no_candidate_does_not_import_presidio(tmp_path: Path) -> None:
    """Most versions hold no candidate at all: their registration must not pay presidio's import (seconds)."""
    from sandbox.demo import write_registry

    path = write_registry(tmp_path / "registry.parquet", procedures=300)
    code = ("import sys; from pathlib import Path; from sandbox.catalog.deid import scan_identifiers; "
            "from sandbox.catalog.cards import DatasetCard; from sandbox.demo import CARD; "
            f"print(scan_identifiers(Path({str(path)!r}), DatasetCard.model_validate(CARD)), "
            "sorted(m for m in ('presidio_analyzer', 'spacy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []", out


def test_counts_are_rows_not_hits(tmp_path: Path) -> None:
    table = pa.table({"note": ["电话 13812345678，手机 13912345678", "电话 13812345678", "no phone here"]})
    assert scan(table, tmp_path, "rows")[("note", "phone")].count == 2
    assert pc.count(table.column("note")).as_py() == 3


def test_birth_dates_by_column_name_and_type(tmp_path: Path) -> None:
    import datetime

    born = [datetime.datetime(1950 + i, 1 + i % 12, 1 + i % 28) for i in range(20)]
    stamps = pa.array(born, pa.timestamp("us"))
    table = pa.table({"date_of_birth": stamps, "admitted": stamps,
                      "dob": [f"{d:%Y-%m-%d}" for d in born], "visit": [f"{d:%Y-%m-%d}" for d in born]})
    findings = scan(table, tmp_path, "births")
    assert findings[("date_of_birth", "date_of_birth")].count == 20
    assert findings[("dob", "date_of_birth")].count == 20
    assert all(re.fullmatch(r"19\d\d-\*\*-\*\*", e) for e in findings[("dob", "date_of_birth")].examples)
    assert ("admitted", "date_of_birth") not in findings, "a timestamp not named like a birth date was flagged"
    assert ("visit", "date_of_birth") not in findings, "a date string not named like a birth date was flagged"
