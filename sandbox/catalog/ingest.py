"""Read an uploaded file of any accepted format with DuckDB, check it against the card, store Parquet."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from sandbox import duck
from sandbox.catalog.cards import NUMERIC, ColumnType, DatasetCard, Generalisation
from sandbox.catalog.formats import DOUBLE_NUMERIC_FORMATS, ReadableTable, readable_table
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


@dataclass(frozen=True)
class IngestedVersion:
    rows: int
    schema: dict[str, str]
    # csv, parquet, excel, spss, stata, sas or fhir
    source_format: str
    encoding: str | None = None
    # Columns of the file the card dropped on reading, and the generalisations applied before storage.
    dropped: list[str] = field(default_factory=list)
    generalised: dict[str, dict[str, Any]] = field(default_factory=dict)


def _connect() -> duckdb.DuckDBPyConnection:
    return duck.connect(threads=2)


def ingest_version(card: DatasetCard, upload: Path, filename: str, destination: Path) -> IngestedVersion:
    """Validate `upload` against `card` and write it to `destination` as typed Parquet.

    Columns in `card.drop_columns` are discarded on reading and `card.generalise` is applied after the
    cast, before any value check. Raises Invalid naming each mismatch: missing, undeclared or mistyped
    columns, values outside declared categories, an empty privacy unit, a repeated unit where one row is
    one unit, and any file the platform cannot read.
    """
    with readable_table(upload, filename, workdir=destination.parent, fhir_mapping=card.fhir_mapping) as table:
        connection = _connect()
        try:
            rows, dropped, generalised = _ingest(connection, card, table, filename, destination)
        finally:
            connection.close()
    schema = {name: spec.type.value for name, spec in card.columns.items()}
    return IngestedVersion(rows=rows, schema=schema, source_format=table.source_format.value,
                           encoding=table.encoding, dropped=dropped, generalised=generalised)


def _ingest(connection: duckdb.DuckDBPyConnection, card: DatasetCard, table: ReadableTable, filename: str,
            destination: Path) -> tuple[int, list[str], dict[str, dict[str, Any]]]:
    source, params, label = table.sql, table.params, table.source_format.value
    try:
        described = connection.execute(f"DESCRIBE SELECT * FROM {source}", params).fetchall()  # noqa: S608
    except duckdb.Error as exc:
        raise Invalid(f"could not read {filename!r} as {label}: {_first_line(exc)}") from exc
    found_all = {str(row[0]): str(row[1]) for row in described}
    renames = {source: target for source, target in card.rename.items() if source in found_all and source != target}
    if renames:
        source = renamed(source, renames)
        found_all = {renames.get(name, name): duck_type for name, duck_type in found_all.items()}
    # A dropped column is never read past DESCRIBE: it is neither checked nor stored.
    dropped = [name for name in card.drop_columns if name in found_all]
    found = {name: duck_type for name, duck_type in found_all.items() if name not in set(dropped)}
    lenient = table.source_format in DOUBLE_NUMERIC_FORMATS
    errors = schema_mismatches(card, found, whole_doubles_as_integers=lenient)
    if errors:
        raise Invalid("the file does not match the declared columns", errors)
    generalised = {name: rule.model_dump(exclude_none=True) for name, rule in card.generalise.items()}
    select_list = ", ".join(
        f'{_stored_expression(name, spec.type, card.generalise.get(name))} AS "{name}"'
        for name, spec in card.columns.items()
    )
    try:
        if lenient:
            _refuse_fractional_integers(connection, card, found, source, params)
        # The whole file is read here: a value the stored type cannot hold (a uint64 past 2^63) or a
        # corrupt page fails now, and is the uploader's error (422), not the service's (review 11.16).
        connection.execute(f"CREATE TEMP TABLE upload AS SELECT {select_list} FROM {source}", params)  # noqa: S608
    except duckdb.Error as exc:
        raise Invalid(f"could not read {filename!r} as {label}: {_first_line(exc)}") from exc
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
    return rows, dropped, generalised


def renamed(source: str, renames: dict[str, str]) -> str:
    """`source` (a DuckDB table expression) with its columns renamed as `renames` says."""
    pairs = ", ".join(f"{quote_identifier(old)} AS {quote_identifier(new)}" for old, new in renames.items())
    return f"(SELECT * RENAME ({pairs}) FROM {source})"  # noqa: S608


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _stored_expression(name: str, column_type: ColumnType, rule: Generalisation | None) -> str:
    """The SQL that casts a file column to its stored type, then generalises it by the card's rule."""
    stored = _STORED_TYPE[column_type]
    cast = f'CAST("{name}" AS {stored})'
    if rule is None:
        return cast
    if rule.band is not None and column_type in NUMERIC:
        if not math.isfinite(rule.band):
            raise Invalid(f"generalise: {name!r} band must be a finite number")
        if column_type is ColumnType.INTEGER:
            if not 1 <= rule.band <= 2**62 or not float(rule.band).is_integer():
                raise Invalid(f"generalise: {name!r} is an integer column; its band must be a whole number "
                              "from 1 to 2^62")
            band = int(rule.band)
            # Integer arithmetic is exact past 2^53 and floors negatives (-7 in bands of 5 is -10).
            return f"CAST({cast} - ((({cast} % {band}) + {band}) % {band}) AS BIGINT)"
        return f"CAST(floor({cast} / {float(rule.band)!r}) * {float(rule.band)!r} AS DOUBLE)"
    if rule.to is not None and column_type in (ColumnType.DATE, ColumnType.TIMESTAMP):
        return f"CAST(date_trunc('{rule.to}', {cast}) AS {stored})"
    raise Invalid(f"generalise: {name!r} is {column_type.value}; its rule does not apply to that type")


def _refuse_fractional_integers(connection: duckdb.DuckDBPyConnection, card: DatasetCard, found: dict[str, str],
                                source: str, params: dict[str, Any]) -> None:
    """SPSS, Stata and SAS hold integers as doubles: a declared integer column must hold whole values,
    which a cast would otherwise round without a word."""
    doubles = [name for name, spec in card.columns.items()
               if spec.type is ColumnType.INTEGER and found.get(name, "").upper() in ("DOUBLE", "FLOAT")]
    if not doubles:
        return
    counts = ", ".join(f'count(*) FILTER (WHERE "{n}" IS NOT NULL AND "{n}" <> trunc("{n}"))' for n in doubles)
    row = connection.execute(f"SELECT {counts} FROM {source}", params).fetchone()  # noqa: S608
    problems = [f"column {name!r} is declared integer but {count} value(s) are not whole numbers"
                for name, count in zip(doubles, row or (), strict=False) if count]
    if problems:
        raise Invalid("the file does not match the declared columns", problems)


def schema_mismatches(card: DatasetCard, found: dict[str, str], *,
                      whole_doubles_as_integers: bool = False) -> list[str]:
    """Each difference between declared columns and a file's DuckDB schema, one line each."""
    errors = []
    for name, spec in card.columns.items():
        accepted = _ACCEPTS[spec.type]
        if whole_doubles_as_integers and spec.type is ColumnType.INTEGER:
            accepted = (*accepted, "DOUBLE", "FLOAT")
        if name not in found:
            errors.append(f"column {name!r} is declared ({spec.type.value}) but missing from the file")
        elif not found[name].upper().startswith(accepted):
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
