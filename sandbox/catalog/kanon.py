"""k-anonymity, l-diversity and generalisation suggestions for a stored version's quasi-identifiers.

Everything is counted in DuckDB over the typed Parquet. The equivalence classes are the combinations
of the card's quasi-identifiers (a missing value is a value of its own); a class's size is the number
of DISTINCT privacy units in it, not of rows: five rows of one patient in a class hide nobody, so k
counts patients. With one row per unit (the card's `privacy_unit_rows: one`, which ingest enforces)
the two are equal and rows are counted, which is cheaper.

The report goes to the steward who owns the data only: its `rare` list shows the rare combinations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import duckdb

from sandbox import duck
from sandbox.catalog.cards import NUMERIC, ColumnType, DatasetCard, Generalisation

RARE_SHOWN = 20
# Band widths are the "nice" numbers 1, 2, 5 times 10^n whose band count over a column's range lies in
# this span: 3 bands at the coarsest (coarser tells a buyer little), 50 at the finest (finer barely
# merges anything). Ages 0-100 get 2, 5, 10 and 20 years.
FEWEST_BANDS = 3
MOST_BANDS = 50
_DATE_STEPS: tuple[Literal["month", "year"], ...] = ("month", "year")


@dataclass(frozen=True)
class Measure:
    """The equivalence classes under one generalisation: the smallest size, how many, and the rare ones."""

    k: int | None  # None: no rows, hence no classes
    classes: int
    rare_classes: int
    # The sizes of the rare classes summed: the units in them, except that a unit whose rows fall in
    # several rare classes counts in each (exact unit counts cost a join, paid once, for the report).
    rare_members: int


@dataclass(frozen=True)
class Candidate:
    column: str
    rule: Generalisation

    @property
    def id(self) -> str:
        if self.rule.band is not None:
            return f"{self.column}:band:{_number(self.rule.band)}"
        return f"{self.column}:to:{self.rule.to}"


def k_anonymity(parquet: Path, card: DatasetCard, *, min_k: int = 5, threads: int = 2) -> dict[str, Any]:
    """The k-anonymity report of a stored version: k, rare classes, l-diversity, suggestions and notes.

    k is the smallest number of distinct privacy units (`card.privacy_unit`) sharing one combination of
    the quasi-identifiers; l of a sensitive column is the smallest number of its distinct values (a
    missing value counts as one) within any combination. Suggestions are generalisations the steward can
    merge into `card.generalise`, each with the k it reaches on this version.
    """
    qis = list(card.quasi_identifiers)
    report: dict[str, Any] = {
        "quasi_identifiers": qis, "privacy_unit": card.privacy_unit, "counted": "distinct privacy units",
        "min_k": min_k, "k": None, "classes": 0, "units": 0, "rare_classes": 0, "rare_units": 0,
        "rare": [], "l_diversity": {}, "suggestions": [], "notes": [],
    }
    if not qis:
        report["notes"].append("the card declares no quasi-identifiers: k-anonymity was not measured")
        return report
    connection = duck.connect(threads=threads)
    try:
        counter = _ClassCounter(connection, parquet, card, min_k)
        measure = counter.measure({})
        report.update(k=measure.k, classes=measure.classes, rare_classes=measure.rare_classes,
                      rare_units=counter.rare_units() if measure.rare_classes else 0, units=counter.units())
        report["rare"] = counter.rare_classes(RARE_SHOWN)
        report["l_diversity"] = counter.l_diversity()
        if measure.k is None:
            report["notes"].append("the version has no rows")
        elif measure.k < min_k:
            report["suggestions"] = suggestions(counter, card, measure)
            report["notes"].extend(counter.uncoarsenable_notes())
    finally:
        connection.close()
    return report


def k_for(parquet: Path, card: DatasetCard, generalise: dict[str, Generalisation], *, min_k: int = 5,
          threads: int = 2) -> Measure:
    """The classes of the stored version once `generalise` is applied on top of what is stored."""
    connection = duck.connect(threads=threads)
    try:
        return _ClassCounter(connection, parquet, card, min_k).measure(generalise)
    finally:
        connection.close()


def generalised_sql(column: str, rule: Generalisation) -> str:
    """The SQL expression that coarsens `column` as `rule` says (the same arithmetic as ingest's)."""
    quoted = _quote(column)
    if rule.band is not None:
        # A whole width stays an integer literal; any other is a DOUBLE, never DuckDB's DECIMAL literal.
        width = _number(rule.band) if float(rule.band).is_integer() else f"CAST({_number(rule.band)} AS DOUBLE)"
        return f"floor({quoted} / {width}) * {width}"
    if rule.to is not None:
        return f"date_trunc('{rule.to}', {quoted})"
    return quoted


class _ClassCounter:
    """Counts equivalence classes of one version on one connection.

    The version is read once into `_cells`, which every candidate generalisation then groups: with one
    row per unit, the classes themselves with their row counts; otherwise the distinct (combination,
    unit) pairs, so that a class's size is its count of cells, and after coarsening, of distinct units.
    `_diversity` holds the classes' l of each sensitive column.
    """

    def __init__(self, connection: duckdb.DuckDBPyConnection, parquet: Path, card: DatasetCard,
                 min_k: int) -> None:
        self.connection = connection
        self.card = card
        self.qis = list(card.quasi_identifiers)
        self.min_k = int(min_k)  # written into the SQL text
        self.one_row_per_unit = card.privacy_unit_rows == "one"
        self._measured: dict[tuple[tuple[str, float | None, str | None], ...], Measure] = {}
        source = f"read_parquet({_literal(str(parquet))})"
        qi_list = self.qi_list = ", ".join(_quote(q) for q in self.qis)
        diversity = "".join(
            f", count(DISTINCT {_quote(s)}) + max(CASE WHEN {_quote(s)} IS NULL THEN 1 ELSE 0 END) AS _l_{i}"
            for i, s in enumerate(card.sensitive_columns)
        )
        if self.one_row_per_unit:
            connection.execute(
                f"CREATE TEMP TABLE _cells AS SELECT {qi_list}, count(*) AS _units{diversity} "  # noqa: S608
                f"FROM {source} GROUP BY {qi_list}"
            )
            connection.execute("CREATE TEMP VIEW _classes AS SELECT * FROM _cells")
            connection.execute("CREATE TEMP VIEW _diversity AS SELECT * FROM _cells")
            return
        # Counting distinct units per class in the same pass as the diversity costs twice as much as
        # deduplicating (combination, unit) pairs first and counting them.
        unit = _quote(card.privacy_unit)
        connection.execute(
            f"CREATE TEMP TABLE _cells AS SELECT DISTINCT {qi_list}, {unit} AS _unit FROM {source}"  # noqa: S608
        )
        connection.execute(
            f"CREATE TEMP TABLE _classes AS SELECT {qi_list}, count(*) AS _units FROM _cells GROUP BY {qi_list}"  # noqa: S608
        )
        if diversity:
            connection.execute(
                f"CREATE TEMP TABLE _diversity AS SELECT {qi_list}{diversity} FROM {source} GROUP BY {qi_list}"  # noqa: S608
            )

    def measure(self, rules: dict[str, Generalisation]) -> Measure:
        """k, class count and rare classes once `rules` coarsen the stored quasi-identifiers."""
        # The greedy combination's first round repeats every single-column step: count each once.
        memo_key = tuple(sorted((column, rule.band, rule.to) for column, rule in rules.items()))
        if memo_key not in self._measured:
            self._measured[memo_key] = self._count(rules)
        return self._measured[memo_key]

    def _count(self, rules: dict[str, Generalisation]) -> Measure:
        if rules:
            keys = ", ".join(f"{generalised_sql(q, rules[q]) if q in rules else _quote(q)} AS _g{i}"
                             for i, q in enumerate(self.qis))
            groups = ", ".join(f"_g{i}" for i in range(len(self.qis)))
            size = "sum(_units)" if self.one_row_per_unit else "count(DISTINCT _unit)"
            classes = f"SELECT {keys}, {size} AS _units FROM _cells GROUP BY {groups}"  # noqa: S608
        else:
            classes = "SELECT _units FROM _classes"
        k, count, rare_classes, rare_members = self._one(
            f"SELECT min(_units), count(*), count(*) FILTER (WHERE _units < {self.min_k}), "  # noqa: S608
            f"coalesce(sum(_units) FILTER (WHERE _units < {self.min_k}), 0) FROM ({classes})"
        )
        return Measure(k=None if k is None else int(k), classes=int(count), rare_classes=int(rare_classes),
                       rare_members=int(rare_members))

    def rare_units(self) -> int:
        """The distinct units in the stored version's rare classes."""
        if self.one_row_per_unit:
            return self.measure({}).rare_members
        # One patient can sit in several rare classes (his rows differ): count him once.
        same_class = " AND ".join(f"c.{_quote(q)} IS NOT DISTINCT FROM r.{_quote(q)}" for q in self.qis)
        return int(self._one(
            f"SELECT count(DISTINCT c._unit) FROM _cells c SEMI JOIN "  # noqa: S608
            f"(SELECT * FROM _classes WHERE _units < {self.min_k}) r ON {same_class}"
        )[0])

    def units(self) -> int:
        if self.one_row_per_unit:
            return int(self._one("SELECT coalesce(sum(_units), 0) FROM _cells")[0])
        return int(self._one("SELECT count(DISTINCT _unit) FROM _cells")[0])

    def rare_classes(self, limit: int) -> list[dict[str, Any]]:
        """The smallest classes under min_k, smallest first: their values and unit counts."""
        qi_list = self.qi_list
        rows = self.connection.execute(
            f"SELECT {qi_list}, _units FROM _classes WHERE _units < {self.min_k} "  # noqa: S608
            f"ORDER BY _units, {qi_list} LIMIT {int(limit)}"
        ).fetchall()
        return [{"values": {q: json_value(v) for q, v in zip(self.qis, row[:-1], strict=True)}, "units": int(row[-1])}
                for row in rows]

    def l_diversity(self) -> dict[str, int]:
        columns = self.card.sensitive_columns
        if not columns:
            return {}
        row = self._one("SELECT " + ", ".join(f"min(_l_{i})" for i in range(len(columns))) + " FROM _diversity")  # noqa: S608
        return {column: int(value) for column, value in zip(columns, row, strict=True) if value is not None}

    def column_range(self, column: str) -> tuple[float, float] | None:
        low, high = self._one(f"SELECT min({_quote(column)}), max({_quote(column)}) FROM _cells")  # noqa: S608
        return None if low is None else (float(low), float(high))

    def uncoarsenable_notes(self) -> list[str]:
        """A note for each quasi-identifier the card cannot coarsen whose values leave patients rare."""
        notes = []
        size = "sum(_units)" if self.one_row_per_unit else "count(DISTINCT _unit)"
        for column in self.qis:
            if _coarsening(self.card, column) is not None:
                continue
            values, rare = self._one(
                f"SELECT count(*), count(*) FILTER (WHERE _units < {self.min_k}) FROM ("  # noqa: S608
                f"SELECT {_quote(column)}, {size} AS _units FROM _cells GROUP BY 1)"
            )
            if rare:
                notes.append(f"{column}: {rare} of {values} values occur in fewer than {self.min_k} units: "
                             f"consider merging them in the export")
        return notes

    def _one(self, sql: str) -> tuple[Any, ...]:
        row = self.connection.execute(sql).fetchone()
        assert row is not None  # an aggregate without GROUP BY always returns one row
        return tuple(row)


def suggestions(counter: _ClassCounter, card: DatasetCard, base: Measure) -> list[dict[str, Any]]:
    """Single-column generalisations that help, then the greedy combination, least information lost first.

    Information lost is read as classes merged: of two suggestions reaching min_k, the one leaving more
    classes keeps more detail. Suggestions that do not reach min_k follow, highest k first.
    """
    options = {column: band_or_date_steps(counter, card, column) for column in counter.qis}
    found: dict[str, tuple[dict[str, Generalisation], Measure]] = {}
    for column, steps in options.items():
        for rule in steps:
            measure = counter.measure({column: rule})
            if _score(measure) > _score(base):
                found[Candidate(column, rule).id] = ({column: rule}, measure)
    combined, measure = _greedy(counter, options, base)
    if len(combined) > 1:
        found["+".join(Candidate(c, r).id for c, r in combined.items())] = (combined, measure)
    ordered = sorted(found.items(), key=lambda item: _order(item[0], item[1][1], counter.min_k))
    return [{"id": suggestion_id,
             "generalise": {c: rule_json(r) for c, r in rules.items()},
             "k": m.k, "rare_classes": m.rare_classes, "classes": m.classes,
             "reaches_min_k": m.k is not None and m.k >= counter.min_k}
            for suggestion_id, (rules, m) in ordered]


def band_or_date_steps(counter: _ClassCounter, card: DatasetCard, column: str) -> list[Generalisation]:
    """The coarsenings of `column` on offer, finest first, each coarser than what the card already applies."""
    kind = _coarsening(card, column)
    current = card.generalise.get(column)
    if kind == "date":
        done = current.to if current is not None else None
        start = _DATE_STEPS.index(done) + 1 if done in _DATE_STEPS else 0
        return [Generalisation(to=step) for step in _DATE_STEPS[start:]]
    if kind == "band":
        span = counter.column_range(column)
        if span is None:
            return []
        integer = card.columns[column].type is ColumnType.INTEGER
        already = current.band if current is not None and current.band is not None else None
        return [Generalisation(band=width) for width in band_widths(span[1] - span[0], integer=integer,
                                                                     coarser_than=already)]
    return []


def band_widths(span: float, *, integer: bool, coarser_than: float | None = None) -> list[float]:
    """Nice band widths (1, 2, 5 times 10^n) giving between FEWEST_BANDS and MOST_BANDS bands over `span`.

    A column already banded takes only multiples of its band, so that the suggested band applied to the
    raw export gives exactly the classes it was measured on here.
    """
    if not span > 0 or not math.isfinite(span):
        return []
    widths = []
    finest, coarsest = span / MOST_BANDS, span / FEWEST_BANDS
    for exponent in range(math.floor(math.log10(finest)), math.floor(math.log10(coarsest)) + 1):
        for mantissa in (1, 2, 5):
            width = float(f"{mantissa}e{exponent}")
            if not finest <= width <= coarsest:
                continue
            if integer and (width < 2 or width != int(width)):
                continue
            if coarser_than is not None:
                ratio = width / coarser_than
                if width <= coarser_than or abs(ratio - round(ratio)) > 1e-9:
                    continue
            widths.append(width)
    return widths


def _greedy(counter: _ClassCounter, options: dict[str, list[Generalisation]],
            base: Measure) -> tuple[dict[str, Generalisation], Measure]:
    """Apply the best single step, repeatedly, until k reaches min_k or no step helps."""
    chosen: dict[str, Generalisation] = {}
    current = base
    while current.k is not None and current.k < counter.min_k:
        tried = []
        for column, steps in options.items():
            for rule in _coarser(steps, chosen.get(column)):
                trial = {**chosen, column: rule}
                tried.append((trial, counter.measure(trial)))
        reaching = [t for t in tried if t[1].k is not None and t[1].k >= counter.min_k]
        if reaching:  # the step that gets there keeping most detail
            return max(reaching, key=lambda t: t[1].classes)
        if not tried:
            break
        best = max(tried, key=lambda t: (*_score(t[1]), t[1].classes))
        if _score(best[1]) <= _score(current):
            break
        chosen, current = best
    return chosen, current


def _coarser(steps: list[Generalisation], chosen: Generalisation | None) -> list[Generalisation]:
    """The steps of one column after `chosen` (the steps are listed finest first)."""
    if chosen is None:
        return steps
    return steps[steps.index(chosen) + 1:]


def _score(measure: Measure) -> tuple[int, int]:
    """Higher is safer: a larger k, then fewer units in rare classes."""
    return (measure.k or 0, -measure.rare_members)


def _order(suggestion_id: str, measure: Measure, min_k: int) -> tuple[Any, ...]:
    reaches = measure.k is not None and measure.k >= min_k
    if reaches:
        return (0, -measure.classes, suggestion_id)
    return (1, -(measure.k or 0), measure.rare_members, -measure.classes, suggestion_id)


def _coarsening(card: DatasetCard, column: str) -> str | None:
    """How the card can coarsen `column`: `band` (numbers without categories), `date`, or None."""
    spec = card.columns[column]
    if spec.type in NUMERIC and spec.categories is None:
        return "band"
    if spec.type in (ColumnType.DATE, ColumnType.TIMESTAMP):
        return "date"
    return None


def rule_json(rule: Generalisation) -> dict[str, Any]:
    """A generalisation as the card's JSON writes it: `{"band": 10}` (whole widths as integers), `{"to": "month"}`."""
    if rule.band is not None:
        return {"band": int(rule.band) if float(rule.band).is_integer() else rule.band}
    return {"to": rule.to}


def json_value(value: Any) -> Any:
    """A DuckDB value as JSON can hold it: dates and timestamps as ISO strings, no NaN or infinity."""
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _number(value: float) -> str:
    """A band width as the card and ids write it: 10, not 10.0."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
