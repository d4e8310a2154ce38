"""DP answers as the platform shows them: values the DP engine released, under column names from the
query plan. Inside a job or a kernel the SQL and its aliases were written by code that read the rows,
so neither is ever echoed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.dp.plan import DatasetPrivacy, plan_query


@dataclass(frozen=True)
class DpAnswer:
    columns: list[str]
    rows: list[list[Any]]
    accuracy: list[list[Any]]  # per row, the half-width of a 95% interval per column (None for keys)

    def to_json(self) -> bytes:
        # No epsilon per answer: which step the code chose would be a few more bits of its choosing; the
        # contract's budget shows the total.
        return (json.dumps({"kind": "dp_result", "columns": self.columns, "rows": self.rows,
                            "accuracy_95": self.accuracy},
                           default=str, sort_keys=True) + "\n").encode()


def plan_columns(sql: str, card: dict[str, Any]) -> list[str]:
    """The answer's column names from the plan: group-key columns and `kind(column)` for aggregates."""
    plan = plan_query(sql, DatasetPrivacy.from_card(card))
    columns = []
    for output in plan.outputs:
        if output.key is not None:
            columns.append(output.key)
        elif output.aggregate is not None:
            kind, column = output.aggregate.kind, output.aggregate.column
            columns.append("count" if kind == "count_rows" else f"{kind}({column})")
    return columns


def platform_answer(sql: str, answer: dict[str, Any], card: dict[str, Any]) -> DpAnswer:
    """`answer` (what run_query returned for `sql`) as the platform records it."""
    columns = plan_columns(sql, card)
    rows = [list(row[:len(columns)]) for row in answer.get("rows") or []]
    accuracy = [list(widths[:len(columns)]) for widths in answer.get("accuracy") or []]
    return DpAnswer(columns=columns, rows=rows, accuracy=accuracy)


def record_job_answer(folder: Path, answer: DpAnswer) -> None:
    """Append an answer a job's DP socket gave to the job's record, which the job cannot reach."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "dp-answers.jsonl").open("ab") as handle:
        handle.write(answer.to_json())


def job_answers(folder: Path) -> list[bytes]:
    """The recorded answers of a job, one JSON document each."""
    path = folder / "dp-answers.jsonl"
    if not path.exists():
        return []
    return [line + b"\n" for line in path.read_bytes().splitlines() if line.strip()]
