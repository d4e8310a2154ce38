"""Rows into numbers for the platform's trainer, and free-form training rows apart from held-out rows.

Both run in the worker, beside the data. Every unit keeps at most `max_rows_per_unit` rows, chosen in
an order keyed by the job (not by the rows' content or position), as DP queries bound a unit's rows.
The split is by privacy unit: all of a patient's rows fall on the same side.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sandbox.training.spec import Encoded, TrainingPlan


@dataclass(frozen=True)
class TrainingArrays:
    X: np.ndarray[Any, Any]
    y: np.ndarray[Any, Any]
    unit: np.ndarray[Any, Any]
    n_units: int

    def to_npz(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, X=self.X, y=self.y, unit=self.unit)
        return buffer.getvalue()


def _keyed_order(values: pa.Array, key: str) -> np.ndarray[Any, Any]:
    """A per-`key` pseudo-random rank of each value: the same value ranks the same within one key."""
    digests = [hashlib.blake2b(str(v).encode(), key=key.encode()[:64], digest_size=8).digest()
               for v in values.to_pylist()]
    return np.frombuffer(b"".join(digests), dtype=">u8").astype(np.uint64)


def unit_codes(table: pa.Table, unit: str) -> tuple[np.ndarray[Any, Any], int]:
    """Each row's unit as 0..n-1 (first seen first), and n."""
    encoded = pc.dictionary_encode(table.column(unit).combine_chunks())
    return np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64), len(encoded.dictionary)


def bounded_rows(table: pa.Table, unit: str, max_rows_per_unit: int, key: str) -> pa.Table:
    """At most `max_rows_per_unit` rows of each unit, the first ones in an order keyed by `key`."""
    codes, _ = unit_codes(table, unit)
    rank = _keyed_order(pa.array(np.arange(table.num_rows)), key)
    order = np.lexsort((rank, codes))
    sorted_codes = codes[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
    position = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep = np.sort(order[position < max_rows_per_unit])
    return table.take(pa.array(keep))


def _encode(column: pa.ChunkedArray, encoded: Encoded) -> np.ndarray[Any, Any]:
    if encoded.kind == "number":
        assert encoded.bounds is not None
        low, high = encoded.bounds
        values = np.asarray(pc.fill_null(pc.cast(column, pa.float64()), low).to_numpy(), dtype=np.float64)
        return np.clip((values - low) / (high - low), 0.0, 1.0)[:, None]
    values = column.to_pylist()
    index = {category: number for number, category in enumerate(encoded.categories)}
    onehot = np.zeros((len(values), len(encoded.categories)), dtype=np.float64)
    for row, value in enumerate(values):
        number = index.get(value)
        if number is not None:
            onehot[row, number] = 1.0  # a value outside the card's categories encodes as all zeros
    return onehot


def training_arrays(parquet: Path, plan: TrainingPlan, *, max_rows_per_unit: int, key: str) -> TrainingArrays:
    """The version's rows as the trainer's X, y and unit, each unit bounded to `max_rows_per_unit` rows.

    Rows whose label is missing or outside the card's categories are dropped (they carry no target).
    """
    columns = sorted({plan.unit, plan.label.column, *(f.column for f in plan.features)})
    table = bounded_rows(pq.read_table(parquet, columns=columns), plan.unit, max_rows_per_unit, key)
    label = table.column(plan.label.column)
    if plan.task == "classification":
        index = {category: number for number, category in enumerate(plan.label.categories)}
        y_list = [index.get(value, -1) for value in label.to_pylist()]
        y: np.ndarray[Any, Any] = np.asarray(y_list, dtype=np.int64)
        keep = y >= 0
    else:
        scaled = _encode(label, plan.label)[:, 0]
        keep = ~np.asarray(pc.is_null(label).to_numpy(zero_copy_only=False), dtype=bool)
        y = scaled.astype(np.float32)
    table, y = table.filter(pa.array(keep)), y[keep]
    X = np.hstack([_encode(table.column(f.column), f) for f in plan.features]).astype(np.float32)
    codes, n_units = unit_codes(table, plan.unit)
    return TrainingArrays(X=X, y=y, unit=codes, n_units=n_units)


def split_by_unit(parquet: Path, unit: str, *, holdout_fraction: float, key: str,
                  train_to: Path, holdout_to: Path) -> tuple[int, int]:
    """Write the version's training rows and held-out rows, split by unit; the rows on each side."""
    table = pq.read_table(parquet)
    codes, _ = unit_codes(table, unit)
    units = pc.dictionary_encode(table.column(unit).combine_chunks()).dictionary
    scale = float(np.iinfo(np.uint64).max)
    held_units = (_keyed_order(units, key).astype(np.float64) / scale) < holdout_fraction
    held = held_units[codes]
    for rows, target in ((~held, train_to), (held, holdout_to)):
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.filter(pa.array(rows)), target)
    return int((~held).sum()), int(held.sum())
