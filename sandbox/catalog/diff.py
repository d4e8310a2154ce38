"""What changed between two weekly versions of a dataset: rows, schema, and each public column's distribution.

The difference is shown to the dataset's stewards only. Both versions are the stored, typed Parquet; the
card may have changed between them, so the schemas may differ. Everything is counted in DuckDB.

Shift measures, per public column present in both versions:
- numeric (and date/timestamp, over epoch seconds): the exact two-sample Kolmogorov-Smirnov statistic,
  the largest gap between the two empirical distribution functions over the non-missing values;
- every column: the population stability index, PSI = sum over bins of (a - b) * ln(a / b), where b and a
  are the shares of the before and after rows in a bin. Numeric bins are cut at the before version's
  deciles (inverted CDF: the smallest value whose cumulative share reaches 10%, 20%, ...), categorical
  bins are the categories; missing values are a bin of their own, and an empty bin counts as a share of
  PSI_EPSILON so the logarithm stays finite;
- categorical: the total variation distance, half the sum of the absolute share differences.

Cost: rows are compared in one join (keyed) or one grouping (unkeyed); all numeric summaries, deciles and
PSI bins take one pass per version together. Exact KS sorts each numeric column's values of both
versions, which makes it the dearest part where values rarely repeat (about 3 s per such column of 10M
rows on two cores); columns whose values repeat (ages, dates, codes) are counted per value first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import duckdb

from sandbox import duck
from sandbox.catalog.cards import NUMERIC, ColumnType, DatasetCard
from sandbox.catalog.kanon import json_value

# The convention of credit scoring, where PSI comes from: below 0.1 stable, 0.1 to 0.2 a moderate
# shift, above 0.2 a significant one, worth a steward's look.
PSI_SHIFTED = 0.2
PSI_EPSILON = 1e-4
DECILES = [round(0.1 * step, 1) for step in range(1, 10)]
TOP_CATEGORIES = 50
_NUMBER_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
                 "UBIGINT", "FLOAT", "DOUBLE", "DECIMAL", "REAL")
_TEMPORAL_TYPES = ("DATE", "TIMESTAMP")
_SIDES = ("before", "after")


def version_diff(before: Path, after: Path, card: DatasetCard, *, threads: int = 2) -> dict[str, Any]:
    """Rows added, removed and changed, schema drift, and distribution shift per public column."""
    connection = duck.connect(threads=threads)
    try:
        for side, path in zip(_SIDES, (before, after), strict=True):
            connection.execute(f"CREATE TEMP VIEW _{side} AS SELECT * FROM read_parquet({_literal(str(path))})")  # noqa: S608
        schemas = {side: _schema(connection, f"_{side}") for side in _SIDES}
        notes: list[str] = []
        schema = schema_drift(schemas["before"], schemas["after"])
        rows = _row_changes(connection, card, schemas, notes)
        numeric: dict[str, bool] = {}  # column: whether it is a date or timestamp
        categorical: list[str] = []
        for column in schemas["after"]:
            spec = card.columns.get(column)
            if column not in schemas["before"] or spec is None or not spec.public:
                continue
            kinds = {_kind(schemas[side][column], spec.type, spec.categories is not None) for side in _SIDES}
            if len(kinds) != 1 or None in kinds:
                notes.append(f"{column}: {schemas['before'][column]} before, {schemas['after'][column]} after: "
                             f"its distributions are not compared")
                continue
            kind = kinds.pop()
            if kind == "categorical":
                categorical.append(column)
            else:
                numeric[column] = kind == "temporal"
        shifts = _numeric_shifts(connection, numeric, rows) if numeric else {}
        shifts.update({column: _categorical_shift(connection, column, schemas) for column in categorical})
        columns = {column: shifts[column] for column in schemas["after"] if column in shifts}
    finally:
        connection.close()
    return {"rows": rows, "schema": schema, "columns": columns, "psi_shifted_above": PSI_SHIFTED, "notes": notes}


def schema_drift(before: dict[str, str], after: dict[str, str]) -> dict[str, Any]:
    """Columns added, removed and retyped (DuckDB type names), in the order each version lists them."""
    return {
        "added": [c for c in after if c not in before],
        "removed": [c for c in before if c not in after],
        "retyped": [{"column": c, "before": before[c], "after": after[c]}
                    for c in after if c in before and before[c] != after[c]],
    }


def _row_changes(connection: duckdb.DuckDBPyConnection, card: DatasetCard, schemas: dict[str, dict[str, str]],
                 notes: list[str]) -> dict[str, Any]:
    common = [c for c in schemas["after"] if c in schemas["before"]]
    unit = card.privacy_unit
    keyed = card.privacy_unit_rows == "one" and unit in common
    counts, units = {}, {}
    for side in _SIDES:
        distinct = f"count(DISTINCT {_quote(unit)})" if keyed else "NULL"
        counts[side], units[side] = _one(connection, f"SELECT count(*), {distinct} FROM _{side}")  # noqa: S608
    retyped = {c for c in common if schemas["before"][c] != schemas["after"][c]}
    if retyped:
        notes.append(f"retyped columns ({', '.join(sorted(retyped))}) are compared as numbers where both types "
                     f"are numbers (30 equals 30.0), as text otherwise")

    def value(column: str) -> str:
        if column not in retyped:
            return _quote(column)
        numbers = all(schemas[side][column].upper().startswith(_NUMBER_TYPES) for side in _SIDES)
        return f"CAST({_quote(column)} AS {'DOUBLE' if numbers else 'VARCHAR'})"

    rows: dict[str, Any] = {"before": int(counts["before"]), "after": int(counts["after"])}
    repeating = [side for side in _SIDES if keyed and units[side] != counts[side]]
    if repeating:
        # The card says one row per unit, but an older version, stored under an older card, may repeat units.
        notes.append(f"the {repeating[0]} version repeats {unit!r}: rows are compared whole, without a key")
        keyed = False
    if keyed:
        others = [c for c in common if c != unit]
        projection = ", ".join([f"{value(unit)} AS _key", *(f"{value(c)} AS _c{i}" for i, c in enumerate(others))])
        differs = " OR ".join(f"a._c{i} IS DISTINCT FROM b._c{i}" for i in range(len(others))) or "false"
        # One full join answers all three: a key on one side only is added or removed, on both maybe changed.
        added, removed, changed = _one(connection, (
            f"WITH b AS (SELECT {projection} FROM _before), a AS (SELECT {projection} FROM _after) SELECT "  # noqa: S608
            "count(*) FILTER (WHERE b._key IS NULL), count(*) FILTER (WHERE a._key IS NULL), "
            f"count(*) FILTER (WHERE a._key IS NOT NULL AND b._key IS NOT NULL AND ({differs})) "
            "FROM a FULL JOIN b ON a._key = b._key"
        ))
        rows.update(added=int(added), removed=int(removed), changed=int(changed), keyed_by=unit)
        return rows
    if card.privacy_unit_rows != "one":
        notes.append("rows have no key (the card allows many rows per privacy unit): a changed row counts as "
                     "one removed and one added, and `changed` is not counted")
    elif unit not in common:  # renamed or dropped between the versions
        notes.append(f"the privacy unit {unit!r} is not in both versions: rows are compared whole, without a key")
    # Multiset difference in one pass: count each distinct row on both sides; the surplus is added or removed.
    projection = ", ".join(f"{value(c)} AS _c{i}" for i, c in enumerate(common)) or "1 AS _c0"
    groups = ", ".join(f"_c{i}" for i in range(max(len(common), 1)))
    added, removed = _one(connection, (
        "SELECT coalesce(sum(greatest(na - nb, 0)), 0), coalesce(sum(greatest(nb - na, 0)), 0) FROM ("  # noqa: S608
        "SELECT count(*) FILTER (WHERE _s = 0) AS nb, count(*) FILTER (WHERE _s = 1) AS na FROM ("
        f"SELECT {projection}, 0 AS _s FROM _before UNION ALL SELECT {projection}, 1 AS _s FROM _after) "
        f"GROUP BY {groups})"
    ))
    rows.update(added=int(added), removed=int(removed), changed=None, keyed_by=None)
    return rows


def _numeric_shifts(connection: duckdb.DuckDBPyConnection, temporal: dict[str, bool],
                    rows: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Summary, KS and PSI of each numeric (or temporal) column: every column's summary in one pass per
    version, the deciles in one more, the PSI bins in one per version, and one KS query per column."""
    columns = list(temporal)
    quoted = {c: _quote(c) for c in columns}
    number = {c: f"CAST(epoch({quoted[c]}) AS DOUBLE)" if temporal[c] else f"CAST({quoted[c]} AS DOUBLE)"
              for c in columns}
    summaries: dict[str, list[Any]] = {}
    for side in _SIDES:
        parts = [f"count({quoted[c]}), avg({number[c]}), stddev_samp({number[c]}), min({quoted[c]}), "
                 f"max({quoted[c]}), approx_count_distinct({number[c]})" for c in columns]
        summaries[side] = list(_one(connection, f"SELECT {', '.join(parts)} FROM _{side}"))  # noqa: S608
    deciles = _one(connection, "SELECT " + ", ".join(  # noqa: S608
        f"quantile_disc({number[c]}, {DECILES})" for c in columns) + " FROM _before")
    bins = {}
    for index, column in enumerate(columns):
        edges = sorted({float(edge) for edge in deciles[index] or []})
        cases = " ".join(f"WHEN {number[column]} <= CAST('{edge!r}' AS DOUBLE) THEN {i}"
                         for i, edge in enumerate(edges))
        bins[column] = f"histogram(CASE WHEN {quoted[column]} IS NULL THEN -1 {cases} ELSE {len(edges)} END)"
    histograms = {side: _one(connection, f"SELECT {', '.join(bins.values())} FROM _{side}")  # noqa: S608
                  for side in _SIDES}
    shifts = {}
    for index, column in enumerate(columns):
        result: dict[str, Any] = {"kind": "temporal" if temporal[column] else "numeric"}
        present, distinct = {}, 0
        for side in _SIDES:
            count, mean, std, low, high, values = summaries[side][6 * index: 6 * index + 6]
            present[side] = int(count)
            distinct += int(values or 0)
            plain = not temporal[column]
            result[side] = {"count": int(count), "nulls": rows[side] - int(count),
                            "mean": json_value(mean) if plain else None, "std": json_value(std) if plain else None,
                            "min": json_value(low), "max": json_value(high)}
        if all(present.values()):
            few_values = distinct * 4 < sum(present.values())
            result["ks"] = _ks(connection, number[column], quoted[column], present, few_values=few_values)
        else:
            result["ks"] = None
        result["psi"] = psi({key: int(n) for key, n in (histograms["before"][index] or {}).items()},
                            {key: int(n) for key, n in (histograms["after"][index] or {}).items()})
        result["shifted"] = result["psi"] > PSI_SHIFTED
        shifts[column] = result
    return shifts


def _ks(connection: duckdb.DuckDBPyConnection, number: str, quoted: str, present: dict[str, int], *,
        few_values: bool) -> float:
    """The exact two-sample KS statistic: both ECDFs evaluated at every distinct value of either version.

    The window's default frame (RANGE, up to the current row's last peer) makes each row's running sums
    count every tie of its value. Where values repeat a lot (ages, codes, dates) they are counted per
    value first, so the window sorts the distinct values, not the rows.
    """
    merged = (f"SELECT {number} AS v, 0 AS s FROM _before WHERE {quoted} IS NOT NULL "  # noqa: S608
              f"UNION ALL SELECT {number}, 1 FROM _after WHERE {quoted} IS NOT NULL")
    if few_values:
        steps = (f"SELECT v, count(*) FILTER (WHERE s = 0) AS nb, count(*) FILTER (WHERE s = 1) AS na "  # noqa: S608
                 f"FROM ({merged}) GROUP BY v")
    else:
        steps = f"SELECT v, 1 - s AS nb, s AS na FROM ({merged})"  # noqa: S608
    row = _one(connection, (
        f"SELECT max(abs(cb / {present['before']} - ca / {present['after']})) FROM ("  # noqa: S608
        "SELECT CAST(sum(nb) OVER (ORDER BY v) AS DOUBLE) AS cb, CAST(sum(na) OVER (ORDER BY v) AS DOUBLE) AS ca "
        f"FROM ({steps}))"
    ))
    return float(row[0])


def psi(before: dict[Any, int], after: dict[Any, int]) -> float:
    """The population stability index of two versions' counts per bin (see the module's docstring)."""
    total_before, total_after = sum(before.values()) or 1, sum(after.values()) or 1
    result = 0.0
    for key in before.keys() | after.keys():
        b = max(before.get(key, 0) / total_before, PSI_EPSILON)
        a = max(after.get(key, 0) / total_after, PSI_EPSILON)
        result += (a - b) * math.log(a / b)
    return result


def _categorical_shift(connection: duckdb.DuckDBPyConnection, column: str,
                       schemas: dict[str, dict[str, str]]) -> dict[str, Any]:
    quoted = _quote(column)
    value = quoted if schemas["before"][column] == schemas["after"][column] else f"CAST({quoted} AS VARCHAR)"
    connection.execute(
        f"CREATE OR REPLACE TEMP TABLE _frequencies AS SELECT v, count(*) FILTER (WHERE s = 0) AS nb, "  # noqa: S608
        f"count(*) FILTER (WHERE s = 1) AS na FROM (SELECT {value} AS v, 0 AS s FROM _before "
        f"UNION ALL SELECT {value}, 1 FROM _after) GROUP BY v"
    )
    total_before, total_after, distinct, nulls_before, nulls_after = _one(
        connection, "SELECT sum(nb), sum(na), count(*), sum(nb) FILTER (WHERE v IS NULL), "
                    "sum(na) FILTER (WHERE v IS NULL) FROM _frequencies")
    nb, na = max(int(total_before or 0), 1), max(int(total_after or 0), 1)
    tvd, psi = _one(connection, (
        f"SELECT 0.5 * sum(abs(nb / {nb} - na / {na})), "  # noqa: S608
        f"sum((greatest(na / {na}, {PSI_EPSILON}) - greatest(nb / {nb}, {PSI_EPSILON})) * "
        f"ln(greatest(na / {na}, {PSI_EPSILON}) / greatest(nb / {nb}, {PSI_EPSILON}))) FROM _frequencies"
    ))
    top = connection.execute(
        f"SELECT v, nb, na FROM _frequencies ORDER BY nb + na DESC, v NULLS LAST LIMIT {TOP_CATEGORIES}"  # noqa: S608
    ).fetchall()
    psi_value = float(psi or 0.0)
    return {
        "kind": "categorical",
        "before": {"count": int(total_before or 0) - int(nulls_before or 0), "nulls": int(nulls_before or 0)},
        "after": {"count": int(total_after or 0) - int(nulls_after or 0), "nulls": int(nulls_after or 0)},
        "distinct": int(distinct),
        "categories": [{"value": json_value(v), "before": int(b), "after": int(a)} for v, b, a in top],
        "tvd": float(tvd or 0.0), "psi": psi_value, "shifted": psi_value > PSI_SHIFTED,
    }


def _kind(duck_type: str, declared: ColumnType, has_categories: bool) -> str | None:
    """How a column's distribution is compared: `numeric`, `temporal`, `categorical`, or None (not at all)."""
    upper = duck_type.upper()
    if upper in ("VARCHAR", "BOOLEAN"):
        return "categorical"
    if upper.startswith(_NUMBER_TYPES):
        integer = not upper.startswith(("FLOAT", "DOUBLE", "DECIMAL", "REAL"))
        if integer and (has_categories or declared not in NUMERIC):
            return "categorical"
        return "numeric"
    if upper.startswith(_TEMPORAL_TYPES):
        return "temporal"
    return None


def _schema(connection: duckdb.DuckDBPyConnection, view: str) -> dict[str, str]:
    return {str(row[0]): str(row[1]) for row in connection.execute(f"DESCRIBE {view}").fetchall()}


def _one(connection: duckdb.DuckDBPyConnection, sql: str) -> tuple[Any, ...]:
    row = connection.execute(sql).fetchone()
    assert row is not None  # an aggregate without GROUP BY always returns one row
    return tuple(row)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
