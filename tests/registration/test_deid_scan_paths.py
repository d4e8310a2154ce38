"""The scan's two ways through a table give the same findings: the one query over every text column (a small
table) and the column-by-column scan with its union prefilter (a large one), which the other scan tests, all on
small tables, no longer reach."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deid_corpus import clinical_table

from sandbox.catalog import deid
from sandbox.catalog.cards import DatasetCard

ARROW_TYPES = {pa.string(): "string", pa.int64(): "integer", pa.float64(): "float", pa.date32(): "date",
               pa.timestamp("us"): "timestamp"}


def findings(path: Path, card: DatasetCard) -> list[dict[str, object]]:
    return [deid.finding_json(finding) for finding in deid.scan_identifiers(path, card)]


@pytest.mark.parametrize("candidate_limit", [deid.CANDIDATE_LIMIT, 25])
def test_one_query_and_column_by_column_find_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      candidate_limit: int) -> None:
    table = clinical_table(300, seed=11).table
    # A text column that is all missing, and one whose name the one-query path must not let shadow its own.
    table = table.append_column("empty", pa.array([None] * table.num_rows, pa.string()))
    table = table.append_column("_flag_0", table.column("notes_en"))
    path = tmp_path / "corpus.parquet"
    pq.write_table(table, path)
    card = DatasetCard(name="deid-paths", title="Seeded clinical corpus", privacy_unit="patient_id",
                       columns={name: {"type": ARROW_TYPES[table.schema.field(name).type]}
                                for name in table.column_names})
    monkeypatch.setattr(deid, "CANDIDATE_LIMIT", candidate_limit)
    one_query = findings(path, card)
    monkeypatch.setattr(deid, "SMALL_TABLE_ROWS", 0)
    column_by_column = findings(path, card)
    assert {(f["column"], f["kind"]) for f in one_query} >= {("notes_en", "email"), ("_flag_0", "email")}, \
        "the seeded corpus lost its identifiers"
    assert one_query == column_by_column, "the two scans of one table disagree"
