"""DP mock data: a synthetic copy of a dataset version, same schema, sampled from noisy marginals.

`dp_only` jobs see the mock at /data and buyers may download it, so everything in it is either
public metadata (the schema, public categories and bounds), fresh synthetic values, or a sample
from histograms released under pure differential privacy:

1. Each privacy unit keeps one row, chosen by a hash of that unit's own rows, so adding or
   removing a unit changes every histogram below by at most one count (L1 sensitivity 1).
2. Each domain column is put into cells: its public categories, or `bins` equal-width bins of
   its public bounds, plus one cell for null or undeclared values. Histograms are counted in
   DuckDB: one per declared pair, one per domain column outside every pair, and the total.
3. OpenDP's Laplace mechanism (discrete Laplace on integer counts, scale = 1/epsilon share)
   noises each histogram; `epsilon` is split in equal shares (sequential composition).
4. Rows are sampled from the noisy histograms (negative counts clipped to zero) with numpy;
   this is post-processing, so it costs nothing more.

Columns without a public domain get placeholders: synthetic strings for text columns, null
otherwise. The privacy-unit column gets fresh ids. No value is ever copied from the data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np
import pyarrow as pa
from opendp import domains, measurements, metrics
from opendp.mod import enable_features

from sandbox import duck
from sandbox.catalog.cards import ColumnSpec, ColumnType
from sandbox.errors import Invalid

enable_features("contrib")

TOTAL_ROWS = "total rows"  # the report's key for the row-count share; column names cannot hold a space
MOCK_ID_PREFIX = "M"
PLACEHOLDER_PREFIX = "mock-"
# OpenDP noises about a hundred thousand cells a second; a larger pair table would stall the mock.
MAX_PAIR_CELLS = 250_000

CellArray = np.ndarray[Any, np.dtype[np.int64]]


@dataclass(frozen=True)
class MockReport:
    rows: int
    epsilon: float  # total spent (pure DP): the sum of `marginals`
    marginals: dict[str, float]  # measurement -> its epsilon share, e.g. {"age": 0.05, "a x b": 0.05}
    notes: list[str]


@dataclass(frozen=True)
class ColumnDomain:
    """A column's cells, fixed by the card alone: categories or bins, then one cell for null/undeclared."""

    name: str
    kind: Literal["categories", "integer_bins", "float_bins"]
    column_type: ColumnType
    categories: tuple[str | int | bool, ...] = ()
    low: float = 0.0
    high: float = 0.0
    bins: int = 0

    @property
    def null_cell(self) -> int:
        return len(self.categories) if self.kind == "categories" else self.bins

    @property
    def cells(self) -> int:
        return self.null_cell + 1

    @property
    def integer_low(self) -> int:
        return math.ceil(self.low)

    @property
    def integer_count(self) -> int:
        return math.floor(self.high) - math.ceil(self.low) + 1

    def integer_bin_range(self, cell: int) -> tuple[int, int]:
        """The first and last integer in bin `cell`; bin(v) = (v - low) * bins // count, so none is empty."""
        count = self.integer_count
        first = -(-cell * count // self.bins)
        last = -(-(cell + 1) * count // self.bins) - 1
        return self.integer_low + first, self.integer_low + last


@dataclass(frozen=True)
class MockDesign:
    """What the mock measures and how it samples, decided from the card and the schema only."""

    unit: str
    schema: list[tuple[str, str]]  # (column, DuckDB type) in file order
    domains: dict[str, ColumnDomain]
    pairs: list[tuple[str, str]]  # measured pairs, in sampling order
    singles: list[str]  # domain columns measured on their own
    notes: list[str] = field(default_factory=list)

    def measurement_keys(self, *, count_rows: bool) -> list[str]:
        keys = [pair_key(first, second) for first, second in self.pairs] + list(self.singles)
        return [*keys, TOTAL_ROWS] if count_rows else keys


def pair_key(first: str, second: str) -> str:
    return f"{first} x {second}"


def synthesize_mock(
    parquet: Path,
    card: dict[str, Any],
    *,
    epsilon: float,
    destination: Path,
    rows: int | None = None,
    seed: int | None = None,
    bins: int = 20,
) -> MockReport:
    """Write a DP mock of `parquet` to `destination` (same columns, order and types) spending `epsilon`.

    `rows` fixes the mock's size and costs nothing, so it must already be public (a steward's choice
    or a published count); without it the size is a noisy count of privacy units. `seed` makes the
    sampling step reproducible; the DP noise is never seeded. The caller charges `epsilon` to the
    publication budget before calling.
    """
    _check_arguments(epsilon=epsilon, rows=rows, bins=bins)
    connection = _connect()
    try:
        schema = _describe(connection, parquet)
        design = design_mock(card, schema, bins=bins)
        keys = design.measurement_keys(count_rows=rows is None)
        exact = _exact_histograms(connection, parquet, design) if keys else {}
    finally:
        connection.close()
    notes = list(design.notes)
    shares = split_epsilon(epsilon, keys)
    if shares:
        notes.append(
            f"epsilon {epsilon:g} split in {len(shares)} equal shares of {epsilon / len(shares):g}: "
            + ", ".join(shares)
            + " (sequential composition; each histogram has L1 sensitivity 1 per privacy unit)"
        )
    else:
        notes.append("nothing needed measuring (no column has a public domain and `rows` was given); no epsilon spent")
    noisy = {key: laplace_histogram(exact[key], shares[key]) for key in shares}
    if rows is None:
        mock_rows = max(1, int(noisy[TOTAL_ROWS][0]))
        notes.append(f"{mock_rows} rows: a noisy count of privacy units (one row each), at least 1")
    else:
        mock_rows = rows
        notes.append(f"{mock_rows} rows, as requested (public; no epsilon spent on the count)")
    notes.append("the DP noise comes from OpenDP's system-seeded samplers; `seed` only fixes the sampling")
    rng = np.random.default_rng(seed)
    cells = sample_cells(design, noisy, mock_rows, rng)
    values = {name: _values_from_cells(design.domains[name], cells[name], rng) for name in design.domains}
    _write_mock(design, values, mock_rows, destination)
    return MockReport(rows=mock_rows, epsilon=math.fsum(shares.values()), marginals=shares, notes=notes)


def _check_arguments(*, epsilon: float, rows: int | None, bins: int) -> None:
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not math.isfinite(epsilon) or epsilon <= 0:
        raise Invalid(f"epsilon must be a positive finite number, not {epsilon!r}")
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
        raise Invalid(f"rows must be a non-negative integer, not {rows!r}")
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= 10_000:
        raise Invalid(f"bins must be an integer from 1 to 10000, not {bins!r}")


def design_mock(card: dict[str, Any], schema: list[tuple[str, str]], *, bins: int) -> MockDesign:
    """Choose each column's domain, the pairs to measure and the notes; reads the card, never the data."""
    unit = card.get("privacy_unit")
    names = [name for name, _ in schema]
    if not isinstance(unit, str) or unit not in names:
        raise Invalid(f"privacy_unit {unit!r} is not a column of the dataset version")
    try:
        specs = {name: ColumnSpec.model_validate(spec) for name, spec in dict(card.get("columns") or {}).items()}
    except ValueError as exc:
        raise Invalid(f"the card's columns are invalid: {exc}") from exc
    notes: list[str] = []
    if card.get("privacy_unit_rows", "many") == "many":
        notes.append(
            f"each {unit!r} contributes one row, chosen by a hash of that unit's own rows, before any counting"
        )
    domains: dict[str, ColumnDomain] = {}
    placeholders: list[str] = []
    for name, _ in schema:
        if name == unit:
            continue
        spec = specs.get(name)
        domain = _domain(name, spec, bins) if spec is not None else None
        if domain is not None:
            domains[name] = domain
        else:
            # A hidden domain and no domain read the same here: the notes must not say which is which.
            placeholders.append(name)
    notes.append(f"{unit!r} holds fresh synthetic ids ({MOCK_ID_PREFIX}000001, ...), unrelated to real ones")
    if placeholders:
        notes.append(
            "no public domain, so placeholders (text: "
            f"{PLACEHOLDER_PREFIX}000001, ...; other types: null): " + ", ".join(placeholders)
        )
    if domains:
        notes.append("every domain has one extra cell for null or undeclared values; it samples as null")
    pairs, pair_notes = _plan_pairs(card.get("marginal_pairs") or [], domains)
    notes.extend(pair_notes)
    paired = {column for pair in pairs for column in pair}
    singles = [name for name in domains if name not in paired]
    return MockDesign(unit=unit, schema=schema, domains=domains, pairs=pairs, singles=singles, notes=notes)


def _domain(name: str, spec: ColumnSpec, bins: int) -> ColumnDomain | None:
    """Public categories, public bounds, or the two booleans; None when the card declares nothing public."""
    if spec.public and spec.categories is not None:
        categories = tuple(spec.categories)
        if len({repr(category) for category in categories}) != len(categories):
            raise Invalid(f"column {name!r}: categories must be unique")
        return ColumnDomain(name, "categories", spec.type, categories=categories)
    if spec.type is ColumnType.BOOLEAN:
        # The type alone fixes the domain, so it reveals nothing the schema does not.
        return ColumnDomain(name, "categories", spec.type, categories=(False, True))
    if spec.public and spec.bounds is not None and spec.type in (ColumnType.INTEGER, ColumnType.FLOAT):
        low, high = float(spec.bounds[0]), float(spec.bounds[1])
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise Invalid(f"column {name!r}: bounds must be finite with lower below upper")
        if spec.type is ColumnType.FLOAT:
            return ColumnDomain(name, "float_bins", spec.type, low=low, high=high, bins=bins)
        integers = math.floor(high) - math.ceil(low) + 1
        if integers < 1:
            raise Invalid(f"column {name!r}: bounds {spec.bounds} hold no integer")
        # No more bins than integers, so every bin holds at least one integer.
        return ColumnDomain(name, "integer_bins", spec.type, low=low, high=high, bins=min(bins, integers))
    return None


def _plan_pairs(declared: Sequence[Sequence[str]], domains: dict[str, ColumnDomain]) -> tuple[
    list[tuple[str, str]], list[str]
]:
    """Pairs in card order; a pair whose columns both come from earlier pairs is skipped, not measured."""
    pairs: list[tuple[str, str]] = []
    notes: list[str] = []
    sampled: set[str] = set()
    for entry in declared:
        first, second = (str(column) for column in entry)
        if first == second or first not in domains or second not in domains:
            notes.append(f"pair ({first}, {second}) skipped: both columns need a public domain")
            continue
        if domains[first].cells * domains[second].cells > MAX_PAIR_CELLS:
            notes.append(f"pair ({first}, {second}) skipped: its table would exceed {MAX_PAIR_CELLS} cells")
            continue
        if first in sampled and second in sampled:
            notes.append(f"pair ({first}, {second}) skipped: both columns are already sampled from earlier pairs")
            continue
        if first in sampled or second in sampled:
            notes.append(
                f"pair ({first}, {second}): {second if first in sampled else first} is sampled conditionally "
                "on its partner from this pair's noisy table"
            )
        pairs.append((first, second))
        sampled.update((first, second))
    return pairs, notes


def split_epsilon(epsilon: float, keys: Sequence[str]) -> dict[str, float]:
    """Equal shares whose floating-point sum never exceeds `epsilon`."""
    if not keys:
        return {}
    share = epsilon / len(keys)
    while math.fsum([share] * len(keys)) > epsilon:
        share = math.nextafter(share, 0.0)
    return dict.fromkeys(keys, share)


def laplace_scale(epsilon_share: float) -> float:
    """A histogram with L1 sensitivity 1 is epsilon-DP under Laplace noise of scale 1/epsilon."""
    return 1.0 / epsilon_share


def laplace_histogram(counts: CellArray, epsilon_share: float) -> CellArray:
    """`counts` plus OpenDP discrete Laplace noise, checked to cost at most `epsilon_share` at sensitivity 1."""
    flat = [int(count) for count in counts.ravel()]
    scale = laplace_scale(epsilon_share)
    for _ in range(64):
        measurement = measurements.make_laplace(
            domains.vector_domain(domains.atom_domain(T="i64"), size=len(flat)), metrics.l1_distance(T="i64"),
            scale=scale,
        )
        # OpenDP rounds its privacy map conservatively; widen the scale by an ulp until it fits the share.
        if measurement.map(1) <= epsilon_share:  # type: ignore[no-untyped-call]
            return np.asarray(measurement(flat), dtype=np.int64).reshape(counts.shape)
        scale = math.nextafter(scale, math.inf)
    raise RuntimeError(f"no Laplace scale near {laplace_scale(epsilon_share)} fits epsilon {epsilon_share}")


def one_row_per_unit_sql(source: str, unit: str, columns: Sequence[str]) -> str:
    """SQL keeping one row per unit, chosen by a hash of the unit's own rows (so other units cannot sway it)."""
    hashed = ", ".join(_quote(column) for column in columns)
    return (
        f"SELECT * FROM {source} "  # noqa: S608 - identifiers are quoted; source is ours
        f"QUALIFY row_number() OVER (PARTITION BY {_quote(unit)} ORDER BY hash({hashed})) = 1"
    )


def exact_histograms(parquet: Path, card: dict[str, Any], *, bins: int = 20) -> dict[str, CellArray]:
    """The contribution-bounded counts the mock would noise; for tests and audits, never for release."""
    connection = _connect()
    try:
        design = design_mock(card, _describe(connection, parquet), bins=bins)
        return _exact_histograms(connection, parquet, design)
    finally:
        connection.close()


def _exact_histograms(connection: duckdb.DuckDBPyConnection, parquet: Path, design: MockDesign) -> dict[
    str, CellArray
]:
    names = list(design.domains)
    source = one_row_per_unit_sql("read_parquet($path)", design.unit, [name for name, _ in design.schema])
    joins = []
    for index, name in enumerate(names):
        domain = design.domains[name]
        if domain.kind == "categories":
            connection.register(f"categories_{index}", _categories_table(domain))
            joins.append(f'LEFT JOIN categories_{index} ON bounded.{_quote(name)} = categories_{index}."value"')
    select_list = ", ".join(f"{_cell_sql(design.domains[name], index)} AS c{index}" for index, name in enumerate(names))
    connection.execute(
        f"CREATE TEMP TABLE cells AS SELECT {select_list or '1 AS one'} "  # noqa: S608
        f"FROM ({source}) AS bounded {' '.join(joins)}",
        {"path": str(parquet)},
    )
    histograms: dict[str, CellArray] = {}
    for first, second in design.pairs:
        i, j = names.index(first), names.index(second)
        table = np.zeros((design.domains[first].cells, design.domains[second].cells), dtype=np.int64)
        for a, b, count in connection.execute(f"SELECT c{i}, c{j}, count(*) FROM cells GROUP BY 1, 2").fetchall():  # noqa: S608
            table[a, b] = count
        histograms[pair_key(first, second)] = table
    for name in design.singles:
        i = names.index(name)
        vector = np.zeros(design.domains[name].cells, dtype=np.int64)
        for a, count in connection.execute(f"SELECT c{i}, count(*) FROM cells GROUP BY 1").fetchall():  # noqa: S608
            vector[a] = count
        histograms[name] = vector
    total = connection.execute("SELECT count(*) FROM cells").fetchall()[0][0]
    histograms[TOTAL_ROWS] = np.array([total], dtype=np.int64)
    return histograms


def _categories_table(domain: ColumnDomain) -> pa.Table:
    return pa.table({
        "value": pa.array(list(domain.categories), type=_arrow_type(domain.column_type)),
        "cell": pa.array(range(len(domain.categories)), type=pa.int64()),
    })


def _cell_sql(domain: ColumnDomain, index: int) -> str:
    """A SQL expression for the column's cell number; out-of-bounds values clamp to the edge bins."""
    column = f"bounded.{_quote(domain.name)}"
    if domain.kind == "categories":
        return f'coalesce(categories_{index}."cell", {domain.null_cell})'
    if domain.kind == "integer_bins":
        low, high = domain.integer_low, domain.integer_low + domain.integer_count - 1
        clamped = f"least(greatest(CAST({column} AS HUGEINT), {low}), {high})"
        binned = f"CAST((({clamped} - {low}) * {domain.bins}) // {domain.integer_count} AS BIGINT)"
        return f"CASE WHEN {column} IS NULL THEN {domain.null_cell} ELSE {binned} END"
    value = f"CAST({column} AS DOUBLE)"
    low_sql, high_sql = _double(domain.low), _double(domain.high)
    binned = (
        f"least({domain.bins - 1}, CAST(floor((least(greatest({value}, {low_sql}), {high_sql}) - {low_sql}) "
        f"/ ({high_sql} - {low_sql}) * {domain.bins}) AS BIGINT))"
    )
    return f"CASE WHEN {value} IS NULL OR isnan({value}) THEN {domain.null_cell} ELSE {binned} END"


def sample_cells(design: MockDesign, noisy: dict[str, CellArray], rows: int, rng: np.random.Generator) -> dict[
    str, CellArray
]:
    """Cell numbers per domain column: pairs jointly (or conditionally on a sampled partner), the rest alone."""
    cells: dict[str, CellArray] = {}
    for first, second in design.pairs:
        table = np.clip(noisy[pair_key(first, second)], 0, None).astype(np.float64)
        if first in cells:
            cells[second] = _sample_conditionally(table, cells[first], rng)
        elif second in cells:
            cells[first] = _sample_conditionally(table.T, cells[second], rng)
        else:
            flat = rng.choice(table.size, size=rows, p=_probabilities(table.ravel()))
            cells[first], cells[second] = (np.asarray(part, dtype=np.int64) for part in np.divmod(flat, table.shape[1]))
    for name in design.singles:
        vector = np.clip(noisy[name], 0, None).astype(np.float64)
        cells[name] = np.asarray(rng.choice(vector.size, size=rows, p=_probabilities(vector)), dtype=np.int64)
    return cells


def _sample_conditionally(table: np.ndarray[Any, Any], given: CellArray, rng: np.random.Generator) -> CellArray:
    """For each given cell a, a partner from row a of `table`; an empty row falls back to the column totals."""
    result = np.zeros(given.size, dtype=np.int64)
    fallback = table.sum(axis=0)
    for cell in np.unique(given):
        where = np.flatnonzero(given == cell)
        row = table[cell] if table[cell].sum() > 0 else fallback
        result[where] = rng.choice(row.size, size=where.size, p=_probabilities(row))
    return result


def _probabilities(weights: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    total = weights.sum()
    if total <= 0:
        return np.full(weights.size, 1.0 / weights.size)
    return np.asarray(weights / total)


def _values_from_cells(domain: ColumnDomain, cells: CellArray, rng: np.random.Generator) -> pa.Array:
    """Values for sampled cells: the category, or uniform within the bin; the null cell gives null."""
    if domain.kind == "categories":
        lookup = pa.array([*domain.categories, None], type=_arrow_type(domain.column_type))
        return lookup.take(pa.array(cells))
    missing = cells == domain.null_cell
    safe = np.where(missing, 0, cells)
    if domain.kind == "integer_bins":
        ranges = np.array([domain.integer_bin_range(cell) for cell in range(domain.bins)], dtype=np.int64)
        values = rng.integers(ranges[safe, 0], ranges[safe, 1], endpoint=True)
        return pa.array(values, mask=missing, type=pa.int64())
    width = (domain.high - domain.low) / domain.bins
    values = np.clip(domain.low + (safe + rng.random(safe.size)) * width, domain.low, domain.high)
    return pa.array(values, mask=missing, type=pa.float64())


def _write_mock(design: MockDesign, values: dict[str, pa.Array], rows: int, destination: Path) -> None:
    """Cast every column to the real DuckDB type, in the real order, and write Parquet atomically."""
    names = list(design.domains)
    arrays = {f"v{index}": values[name] for index, name in enumerate(names)}
    arrays["n"] = pa.array(np.arange(1, rows + 1, dtype=np.int64))
    width = max(6, len(str(rows)))
    select_list = [
        f"{_mock_column_sql(design, name, duck_type, names, width)} AS {_quote(name)}"
        for name, duck_type in design.schema
    ]
    partial = destination.with_name(destination.name + ".partial")
    connection = _connect()
    try:
        connection.register("mock", pa.table(arrays))
        connection.execute(
            f"COPY (SELECT {', '.join(select_list)} FROM mock ORDER BY n) TO $dest "  # noqa: S608
            "(FORMAT parquet, COMPRESSION zstd)",
            {"dest": str(partial)},
        )
    finally:
        connection.close()
    os.replace(partial, destination)


def _mock_column_sql(design: MockDesign, name: str, duck_type: str, names: list[str], width: int) -> str:
    """Sampled values, fresh ids or a placeholder, cast to the column's real type; `n` is the row number."""
    if name in design.domains:
        return f"CAST(v{names.index(name)} AS {duck_type})"
    if name == design.unit:
        if duck_type == "VARCHAR":
            return f"printf('{MOCK_ID_PREFIX}%0{width}d', n)"
        # A numeric id column takes 1, 2, ...; a type that cannot hold them gets null.
        return f"TRY_CAST(n AS {duck_type})"
    if duck_type == "VARCHAR":
        return f"printf('{PLACEHOLDER_PREFIX}%0{width}d', n)"
    return f"CAST(NULL AS {duck_type})"


def _connect() -> duckdb.DuckDBPyConnection:
    return duck.connect()


def _describe(connection: duckdb.DuckDBPyConnection, parquet: Path) -> list[tuple[str, str]]:
    try:
        described = connection.execute("DESCRIBE SELECT * FROM read_parquet($path)", {"path": str(parquet)}).fetchall()
    except duckdb.Error as exc:
        raise Invalid(f"could not read the dataset version as Parquet: {str(exc).strip()[:300]}") from exc
    return [(str(row[0]), str(row[1])) for row in described]


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _double(value: float) -> str:
    return f"CAST('{value!r}' AS DOUBLE)"


def _arrow_type(column_type: ColumnType) -> pa.DataType:
    return {ColumnType.BOOLEAN: pa.bool_(), ColumnType.INTEGER: pa.int64()}.get(column_type, pa.string())
