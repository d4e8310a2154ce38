"""The scan's bound on Python work must not cost recall: past the candidate limit, one kind's crowd of
candidates (notes full of name-like words) cannot hide another kind's single hit in the same column."""

# ruff: noqa: RUF001

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deid_corpus import valid_id

from sandbox.catalog import deid
from sandbox.catalog.cards import DatasetCard


def test_one_identity_number_among_many_name_candidates_is_found(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deid, "CANDIDATE_LIMIT", 40)
    rng = random.Random(5)
    # 600 distinct notes that each look like a name in context (患者 then a surname, 高) but hold none, and
    # one with an ID number. Confirming one list of candidates across kinds found it in 1 seed of 10.
    notes = [f"患者高血压{i}年，术后第{i}天复查" for i in range(600)]
    secret = valid_id(rng)
    notes[417] = f"复查，身份证号{secret}，继续观察"
    path = tmp_path / "notes.parquet"
    pq.write_table(pa.table({"patient_id": [f"P{i:05d}" for i in range(600)], "note": notes}), path)
    card = DatasetCard(name="notes", title="notes", privacy_unit="patient_id",
                       columns={"patient_id": {"type": "string"}, "note": {"type": "string"}})
    found = {(f.column, f.kind.value): f for f in deid.scan_identifiers(path, card)}
    assert ("note", "national_id") in found, found
    assert found[("note", "national_id")].count == 1
    assert secret not in str(found)
