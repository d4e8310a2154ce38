"""The engine is certain which column it ranks and filters on, whatever the data's columns are called.

Review 11.2: a data column named like the engine's rank column switched per-unit bounding off (a bounded
COUNT(*) answered 150 where at most 3 rows could count), and a column named like a reader's virtual
column made every query fail.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sandbox.dp.duckdb_engine import RANK_COLUMN, execute
from sandbox.dp.plan import DatasetPrivacy, plan_query
from sandbox.errors import Invalid

ROWS = 150
COLLIDING = ["_dp_unit_rank", RANK_COLUMN, RANK_COLUMN.upper(), "file_row_number", "filename"]


def _dataset(extra: list[str]) -> DatasetPrivacy:
    columns = {"pid": {"type": "string"}, "site": {"type": "string", "categories": ["a"], "public": True}}
    columns.update({name: {"type": "integer"} for name in extra})
    return DatasetPrivacy(name="toy", privacy_unit="pid", one_row_per_unit=False, columns=columns, rows_per_unit=3)


def _write(path: Path, extra: list[str]) -> Path:
    data: dict[str, list[object]] = {"pid": ["VICTIM"] * ROWS, "site": ["a"] * ROWS}
    for name in extra:
        data[name] = [1] * ROWS  # claims every row is its unit's first
    pq.write_table(pa.table(data), path)
    return path


@pytest.mark.parametrize("name", COLLIDING)
def test_an_undeclared_colliding_column_cannot_switch_bounding_off(tmp_path: Path, name: str) -> None:
    parquet = _write(tmp_path / "toy.parquet", [name])
    dataset = _dataset([])
    plan = plan_query("SELECT COUNT(*) AS n FROM toy", dataset)
    answer = execute(plan, parquet, plan.cost(epsilon=50.0), cache_dir=tmp_path)
    count = answer.rows[0][0]
    assert count <= 3 + 10, f"one unit with {ROWS} rows counted {count} (bounding to 3 rows was switched off)"


@pytest.mark.parametrize("name", COLLIDING)
def test_a_legacy_card_declaring_a_colliding_column_is_refused_at_plan_time(tmp_path: Path, name: str) -> None:
    with pytest.raises(Invalid, match="reserved") as refused:
        plan_query("SELECT COUNT(*) AS n FROM toy", _dataset([name]))
    assert refused.value.status == 422
