"""Read an uploaded CSV or Parquet file with DuckDB, check it against the card, store Parquet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from sandbox import duck
from sandbox.catalog.cards import ColumnType, DatasetCard
from sandbox.errors import Invalid

# DuckDB type names (prefixes) each declared type accepts from a file.
_ACCEPTS: dict[ColumnType, tuple[str, ...]] = {
    ColumnType.INTEGER: ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
                         "UINTEGER", "UBIGINT"),
    ColumnType.FLOAT: ("FLOAT", "DOUBLE", "DECIMAL", "REAL", "TINYINT", "SMALLINT", "INTEGER", "BIGINT",
                       "HUGEINT"),
    ColumnType.BOOLEAN: ("BOOLEAN",),
    ColumnType.STRING: ("VARCHAR",),
    ColumnType.DATE: ("DATE",),
    ColumnType.TIMESTAMP: ("TIMESTAMP",),
}
_STORED_TYPE = {
    ColumnType.INTEGER: "BIGINT",
    ColumnType.FLOAT: "DOUBLE",
    ColumnType.BOOLEAN: "BOOLEAN",
    ColumnType.STRING: "VARCHAR",
    ColumnType.DATE: "DATE",
    ColumnType.TIMESTAMP: "TIMESTAMP",
}
PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class IngestedVersion:
    rows: int
    schema: dict[str, str]
    source_format: str


def detect_format(path: Path, filename: str) -> str:
    """`parquet` or `csv`, by content first (Parquet has a magic number), then by name."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if head == PARQUET_MAGIC:
        return "parquet"
    if filename.lower().endswith((".csv", ".csv.gz")):
        return "csv"
    if filename.lower().endswith(".parquet"):
        raise Invalid(f"{filename!r} is named .parquet but is not a Parquet file")
    raise Invalid(f"{filename!r} is neither Parquet nor CSV (upload a .parquet or .csv file)")


def _connect() -> duckdb.DuckDBPyConnection:
    return duck.connect(threads=2)


def _source_sql(source_format: str) -> str:
    if source_format == "parquet":
        return "read_parquet($path)"
    return "read_csv($path, header = true, auto_detect = true, sample_size = -1)"


def ingest_version(card: DatasetCard, upload: Path, filename: str, destination: Path) -> IngestedVersion:
    """Validate `upload` against `card` and write it to `destination` as typed Parquet.

    Raises Invalid naming each mismatch: missing, undeclared or mistyped columns, values
    outside declared categories, an empty privacy unit, a repeated unit where one row is one unit.
    """
    source_format = detect_format(upload, filename)
    connection = _connect()
    try:
        source = _source_sql(source_format)
        params = {"path": str(upload)}
        try:
            described = connection.execute(f"DESCRIBE SELECT * FROM {source}", params).fetchall()  # noqa: S608
        except duckdb.Error as exc:
            raise Invalid(f"could not read {filename!r} as {source_format}: {_first_line(exc)}") from exc
        found = {str(row[0]): str(row[1]) for row in described}
        errors = schema_mismatches(card, found)
        if errors:
            raise Invalid("the file does not match the declared columns", errors)
        select_list = ", ".join(
            f'CAST("{name}" AS {_STORED_TYPE[spec.type]}) AS "{name}"' for name, spec in card.columns.items()
        )
        try:
            # The whole file is read here: a value the stored type cannot hold (a uint64 past 2^63) or a
            # corrupt page fails now, and is the uploader's error (422), not the service's (review 11.16).
            connection.execute(f"CREATE TEMP TABLE upload AS SELECT {select_list} FROM {source}", params)  # noqa: S608
        except duckdb.Error as exc:
            raise Invalid(f"could not read {filename!r} as {source_format}: {_first_line(exc)}") from exc
        errors = value_problems(connection, card)
        if errors:
            raise Invalid("the file's values do not match the declared privacy metadata", errors)
        rows = int(_scalar(connection, "SELECT count(*) FROM upload"))
        if rows == 0:
            raise Invalid("the file has no rows")
        connection.execute(
            "COPY upload TO $dest (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 122880)",
            {"dest": str(destination)},
        )
    finally:
        connection.close()
    schema = {name: spec.type.value for name, spec in card.columns.items()}
    return IngestedVersion(rows=rows, schema=schema, source_format=source_format)


def schema_mismatches(card: DatasetCard, found: dict[str, str]) -> list[str]:
    """Each difference between declared columns and a file's DuckDB schema, one line each."""
    errors = []
    for name, spec in card.columns.items():
        if name not in found:
            errors.append(f"column {name!r} is declared ({spec.type.value}) but missing from the file")
        elif not found[name].upper().startswith(_ACCEPTS[spec.type]):
            errors.append(f"column {name!r} is declared {spec.type.value} but the file has {found[name]}")
    for name, duck_type in found.items():
        if name not in card.columns:
            errors.append(f"column {name!r} ({duck_type}) is in the file but not declared")
    return errors


def value_problems(connection: duckdb.DuckDBPyConnection, card: DatasetCard) -> list[str]:
    unit = card.privacy_unit
    errors = []
    nulls = _scalar(connection, f'SELECT count(*) FROM upload WHERE "{unit}" IS NULL')  # noqa: S608
    if nulls:
        errors.append(f"privacy_unit {unit!r} is empty in {nulls} row(s)")
    if card.privacy_unit_rows == "one":
        repeated = _scalar(
            connection,
            f'SELECT count(*) FROM (SELECT "{unit}" FROM upload GROUP BY 1 HAVING count(*) > 1)',  # noqa: S608
        )
        if repeated:
            errors.append(f"privacy_unit {unit!r} repeats for {repeated} unit(s) but the card says one row per unit")
    for name, spec in card.columns.items():
        if spec.categories is None:
            continue
        outside = _scalar(
            connection,
            f'SELECT count(*) FROM upload WHERE "{name}" IS NOT NULL AND NOT list_contains($cats, "{name}")',  # noqa: S608
            {"cats": list(spec.categories)},
        )
        if outside:
            errors.append(f"column {name!r} has {outside} row(s) outside its declared categories")
    return errors


def _scalar(connection: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any] | None = None) -> Any:
    row = connection.execute(sql, params or {}).fetchone()
    return row[0] if row else None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
