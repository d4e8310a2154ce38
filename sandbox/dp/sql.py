"""The DP query language: parse a buyer's SQL with sqlglot and keep only what the engine can bound.

Nothing of the buyer's text reaches DuckDB. `parse_query` turns an allowlisted shape into plain
dataclasses; the engine renders its own SQL from them, quoting every identifier and literal itself.
ORDER BY and LIMIT are refused: public group keys come back in the card's category order, private
keys sorted, so ordering adds nothing and LIMIT could select on a noisy-free value.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from sandbox.errors import Invalid

Literal = str | int | float | bool
NUMERIC_TYPES = {"integer", "float"}
MAX_IN_ITEMS = 1000
MAX_LITERAL_LENGTH = 1000
COMPARISONS: dict[type[exp.Expression], str] = {
    exp.EQ: "=", exp.NEQ: "<>", exp.LT: "<", exp.LTE: "<=", exp.GT: ">", exp.GTE: ">=",
}
FLIPPED = {"=": "=", "<>": "<>", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
# Select-level clauses and the words a refusal uses for them.
CLAUSE_NAMES = {
    "with_": "WITH (common table expressions)", "with": "WITH (common table expressions)",
    "joins": "JOIN", "laterals": "LATERAL", "having": "HAVING", "order": "ORDER BY", "limit": "LIMIT",
    "offset": "OFFSET", "qualify": "QUALIFY", "distinct": "SELECT DISTINCT", "windows": "WINDOW",
    "sample": "TABLESAMPLE", "into": "SELECT INTO", "locks": "FOR UPDATE", "connect": "CONNECT BY",
    "prewhere": "PREWHERE", "cluster": "CLUSTER BY", "distribute": "DISTRIBUTE BY", "sort": "SORT BY",
    "settings": "SETTINGS", "format": "FORMAT", "match": "MATCH_RECOGNIZE", "pivots": "PIVOT",
    "kind": "SELECT AS STRUCT/VALUE", "hint": "optimizer hints", "exclude": "EXCLUDE",
    "operation_modifiers": "statement modifiers",
}
ALLOWED_CLAUSES = {"expressions", "from_", "from", "where", "group"}
# The whole parse tree is checked against this allow-list: every node must be of one of these exact
# types and set no argument outside its list. Anything sqlglot parses that is not here (a new clause,
# BETWEEN SYMMETRIC, COLLATE, an empty IN, a function we never reviewed) refuses the query, so a
# construct the checker below does not understand can never be silently dropped from the plan.
_BINARY = frozenset({"this", "expression"})
ALLOWED_NODES: dict[type[exp.Expression], frozenset[str]] = {
    exp.Select: frozenset({"expressions", "from_", "from", "where", "group"}),
    exp.From: frozenset({"this"}), exp.Table: frozenset({"this"}), exp.Where: frozenset({"this"}),
    exp.Group: frozenset({"expressions"}), exp.Identifier: frozenset({"this", "quoted"}),
    exp.Column: frozenset({"this", "table"}), exp.Alias: frozenset({"this", "alias"}),
    exp.Paren: frozenset({"this"}), exp.And: _BINARY, exp.Or: _BINARY, exp.Not: frozenset({"this"}),
    exp.EQ: _BINARY, exp.NEQ: _BINARY, exp.LT: _BINARY, exp.LTE: _BINARY, exp.GT: _BINARY, exp.GTE: _BINARY,
    exp.In: frozenset({"this", "expressions"}), exp.Between: frozenset({"this", "low", "high"}),
    exp.Is: _BINARY, exp.Null: frozenset(), exp.Boolean: frozenset({"this"}),
    exp.Literal: frozenset({"this", "is_string"}), exp.Neg: frozenset({"this"}), exp.Star: frozenset(),
    exp.Count: frozenset({"this", "big_int"}), exp.Sum: frozenset({"this"}), exp.Avg: frozenset({"this"}),
    exp.Variance: frozenset({"this"}), exp.VariancePop: frozenset({"this"}), exp.Stddev: frozenset({"this"}),
    exp.StddevSamp: frozenset({"this"}), exp.StddevPop: frozenset({"this"}), exp.Median: frozenset({"this"}),
    exp.PercentileCont: frozenset({"this", "expression"}),
}


@dataclass(frozen=True)
class Comparison:
    column: str
    op: str  # one of = <> < <= > >=
    value: Literal


@dataclass(frozen=True)
class InList:
    column: str
    values: tuple[Literal, ...]
    negated: bool = False


@dataclass(frozen=True)
class Between:
    column: str
    low: Literal
    high: Literal
    negated: bool = False


@dataclass(frozen=True)
class IsNull:
    column: str
    negated: bool = False


@dataclass(frozen=True)
class AllOf:
    parts: tuple[Condition, ...]


@dataclass(frozen=True)
class AnyOf:
    parts: tuple[Condition, ...]


@dataclass(frozen=True)
class Negation:
    part: Condition


Condition = Comparison | InList | Between | IsNull | AllOf | AnyOf | Negation


@dataclass(frozen=True)
class Aggregate:
    """One requested statistic. kind: count_rows, count, sum, avg, var_samp, var_pop, stddev_samp,
    stddev_pop or quantile (with `quantile` in [0, 1])."""

    kind: str
    column: str | None = None
    quantile: float | None = None


@dataclass(frozen=True)
class OutputColumn:
    name: str
    key: str | None = None              # a GROUP BY column, or
    aggregate: Aggregate | None = None  # a statistic


@dataclass(frozen=True)
class ParsedQuery:
    outputs: tuple[OutputColumn, ...]
    group_by: tuple[str, ...]
    where: Condition | None

    def canonical(self) -> str:
        """A stable text for the query's meaning: same query, same text, whatever the spacing or case."""
        return json.dumps({"outputs": [_plain(o) for o in self.outputs], "group_by": list(self.group_by),
                           "where": _plain(self.where)}, sort_keys=True, default=str)

    def digest(self, dataset: str) -> str:
        return hashlib.sha256(f"{dataset}\n{self.canonical()}".encode()).hexdigest()


@dataclass(frozen=True)
class Schema:
    """What the parser needs to know about a dataset."""

    name: str
    privacy_unit: str
    columns: dict[str, dict[str, Any]]

    def resolve(self, name: str) -> str | None:
        """The declared column a (case-insensitive, as in DuckDB) name refers to."""
        lowered = name.lower()
        for column in self.columns:
            if column.lower() == lowered:
                return column
        return None

    # Only a public domain may shape a released number (a clamp, an accuracy, a quantile grid, an
    # average of nothing). A hidden one is treated exactly as none, so no refusal tells them apart.
    def has_public_domain(self, column: str) -> bool:
        spec = self.columns[column]
        if spec.get("type") == "boolean":
            return True  # the type alone fixes the domain
        return bool(spec.get("public")) and (spec.get("bounds") is not None or spec.get("categories") is not None)

    def has_public_bounds(self, column: str) -> bool:
        spec = self.columns[column]
        return bool(spec.get("public")) and spec.get("type") in NUMERIC_TYPES and spec.get("bounds") is not None


# Deeper nesting than any real query: 2,400 nested parentheses exhausted the recursive parser (review 11.16).
MAX_NESTING = 100


def parse_query(sql: str, schema: Schema) -> ParsedQuery:
    """The query's validated meaning; raises Invalid listing every part that is not allowed."""
    checker = _Checker(schema)
    try:
        statement = checker.single_select(sql)
    except RecursionError:  # nesting the token count did not show (NOT NOT ..., - - ...): refused the same
        raise _invalid([f"the query is nested more than {MAX_NESTING} levels deep"]) from None
    if statement is None:
        raise _invalid(checker.errors)
    if _depth(statement) > MAX_NESTING:
        raise _invalid([f"the query is nested more than {MAX_NESTING} levels deep"])
    outputs, group_by, where = checker.select(statement)
    checker.allow_listed(statement)
    if statement.args.get("where") is not None and where is None and not checker.errors:
        checker.fail("the WHERE clause could not be fully understood")  # never answer without it
    if checker.errors:
        raise _invalid(checker.errors)
    return ParsedQuery(outputs=tuple(outputs), group_by=tuple(group_by), where=where)


def _depth(root: exp.Expression) -> int:
    """The parse tree's depth, found without recursion."""
    deepest = 0
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node.iter_expressions())
    return deepest


def _invalid(errors: list[str]) -> Invalid:
    unique = list(dict.fromkeys(errors))
    return Invalid("DP query refused: " + "; ".join(unique), errors=unique)


class _Checker:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.errors: list[str] = []

    def fail(self, message: str) -> None:
        self.errors.append(message)

    def allowed(self, node: exp.Expression) -> bool:
        """Whether `node` itself is of an allow-listed type and sets only allow-listed arguments."""
        allowed = ALLOWED_NODES.get(type(node))
        if allowed is None:
            self.fail(f"{_describe(node)} is not allowed in a DP query")
            return False
        extras = sorted(k for k, v in node.args.items() if k not in allowed and v not in (None, False, [], ()))
        if extras:
            self.fail(f"{_describe(node)} with {', '.join(e.upper() for e in extras)} is not allowed in a DP query")
            return False
        return True

    def allow_listed(self, statement: exp.Expression) -> None:
        """Check every node of the parse tree against ALLOWED_NODES (the fail-closed layer)."""
        for node in statement.walk():
            if isinstance(node, exp.Expression):
                self.allowed(node)
            else:
                self.fail(f"{type(node).__name__} is not allowed in a DP query")
        for node in statement.find_all(exp.In):
            if not node.expressions:
                self.fail("IN () needs at least one value")

    def single_select(self, sql: str) -> exp.Select | None:
        if "\x00" in sql:
            self.fail("the query contains a NUL character")
            return None
        try:
            tokens = sqlglot.Dialect.get_or_raise("duckdb").tokenize(sql)
        except TokenError as error:
            self.fail(f"the query could not be read: {_short(error)}")
            return None
        depth = deepest = 0
        for token in tokens:
            depth += (token.token_type == sqlglot.TokenType.L_PAREN) - (token.token_type == sqlglot.TokenType.R_PAREN)
            deepest = max(deepest, depth)
        if deepest > MAX_NESTING:
            self.fail(f"the query is nested more than {MAX_NESTING} levels deep")
            return None
        if any(token.comments for token in tokens):
            self.fail("comments (-- or /* */) are not allowed in a DP query")
        semicolons = [t for t in tokens if t.token_type == sqlglot.TokenType.SEMICOLON]
        if semicolons and (len(semicolons) > 1 or semicolons[-1] is not tokens[-1]):
            self.fail("only one statement is allowed (found ';' between statements)")
        try:
            statements = [s for s in sqlglot.parse(sql, read="duckdb") if s is not None]
        except (ParseError, TokenError) as error:
            self.fail(f"the query could not be parsed: {_short(error)}")
            return None
        if len(statements) != 1:
            self.fail("exactly one SELECT statement is allowed")
            return None
        statement = statements[0]
        if isinstance(statement, exp.SetOperation):
            self.fail("UNION, INTERSECT and EXCEPT are not allowed")
            return None
        if not isinstance(statement, exp.Select):
            self.fail(f"only SELECT is allowed, not {statement.key.upper()}")
            return None
        if self.errors:
            return None
        return statement

    def select(self, select: exp.Select) -> tuple[list[OutputColumn], list[str], Condition | None]:
        for name, value in select.args.items():
            if name not in ALLOWED_CLAUSES and value not in (None, False, [], ()):
                self.fail(f"{CLAUSE_NAMES.get(name, name.upper())} is not allowed in a DP query")
        self.table(select.args.get("from_") or select.args.get("from"))
        group_by = self.group_by(select.args.get("group"))
        outputs = self.outputs(select.expressions, group_by)
        where_clause = select.args.get("where")
        where = self.condition(where_clause.this) if where_clause is not None else None
        return outputs, group_by, where

    def table(self, source: exp.Expression | None) -> None:
        if source is None:
            self.fail(f'the query must read FROM "{self.schema.name}"')
            return
        table = source.this
        if not isinstance(table, exp.Table) or not isinstance(table.this, exp.Identifier):
            inner = table.this if isinstance(table, exp.Table) else table
            self.fail(f"FROM must name the dataset table, not {_describe(inner)}")
            return
        extras = [k for k, v in table.args.items() if k != "this" and v not in (None, False, [], ())]
        if extras:
            self.fail(f"FROM must name only the dataset table (found {', '.join(sorted(extras))})")
        if table.this.name != self.schema.name:
            self.fail(f'the only table is "{self.schema.name}", not {table.this.name!r}')

    def group_by(self, group: exp.Group | None) -> list[str]:
        if group is None:
            return []
        columns: list[str] = []
        extras = [k for k, v in group.args.items() if k != "expressions" and v not in (None, False, [], ())]
        if extras:
            self.fail(f"GROUP BY may list columns only (found {', '.join(sorted(extras))})")
        for item in group.expressions:
            column = self.column(item, "GROUP BY")
            if column is not None:
                if column in columns:
                    self.fail(f"GROUP BY lists {column!r} twice")
                columns.append(column)
        return columns

    def outputs(self, expressions: list[exp.Expression], group_by: list[str]) -> list[OutputColumn]:
        outputs: list[OutputColumn] = []
        for item in expressions:
            alias: str | None = None
            if isinstance(item, exp.Alias):
                alias = item.alias
                item = item.this
            if isinstance(item, exp.Column):
                column = self.column(item, "SELECT")
                if column is None:
                    continue
                if column not in group_by:
                    self.fail(f"column {column!r} is selected but not in GROUP BY; only aggregates of it are allowed")
                outputs.append(OutputColumn(name=alias or column, key=column))
                continue
            aggregate = self.aggregate(item)
            if aggregate is not None:
                outputs.append(OutputColumn(name=alias or _default_name(aggregate), aggregate=aggregate))
        if not any(o.aggregate for o in outputs) and not self.errors:
            self.fail("the query must compute at least one aggregate")
        selected = {o.key for o in outputs if o.key}
        for column in group_by:
            if column not in selected:
                self.fail(f"GROUP BY column {column!r} must also be selected")
        names = [o.name.lower() for o in outputs]
        for name in {n for n in names if names.count(n) > 1}:
            self.fail(f"output column name {name!r} is used twice; give each an alias")
        for output in outputs:
            if len(output.name) > 128:
                self.fail("output column names must be at most 128 characters")
        return outputs

    def aggregate(self, node: exp.Expression) -> Aggregate | None:
        if isinstance(node, exp.Window):
            self.fail("window functions (OVER ...) are not allowed")
            return None
        if isinstance(node, exp.Filter):
            self.fail("aggregate FILTER clauses are not allowed; use WHERE")
            return None
        if isinstance(node, exp.Count):
            if isinstance(node.this, exp.Star):
                return Aggregate("count_rows")
            if isinstance(node.this, exp.Distinct):
                self.fail("COUNT(DISTINCT ...) is not allowed (it counts units without bounding them)")
                return None
            column = self.aggregate_argument(node, "COUNT")
            return Aggregate("count", column) if column else None
        kinds: dict[type[exp.Expression], str] = {
            exp.Sum: "sum", exp.Avg: "avg", exp.Variance: "var_samp", exp.VariancePop: "var_pop",
            exp.Stddev: "stddev_samp", exp.StddevSamp: "stddev_samp", exp.StddevPop: "stddev_pop",
            exp.Median: "quantile", exp.PercentileCont: "quantile",
        }
        kind = kinds.get(type(node))
        if kind is None:
            self.fail(f"{_describe(node)} is not an allowed aggregate (allowed: COUNT, SUM, AVG, VARIANCE, "
                      "VAR_SAMP, VAR_POP, STDDEV, STDDEV_SAMP, STDDEV_POP, MEDIAN, QUANTILE_CONT)")
            return None
        quantile: float | None = None
        if isinstance(node, exp.Median):
            quantile = 0.5
        elif isinstance(node, exp.PercentileCont):
            quantile = self.quantile_level(node.args.get("expression"))
            if quantile is None:
                return None
        column = self.aggregate_argument(node, kind.upper(), allow={"expression"} if quantile is not None else set())
        if column is None:
            return None
        if not self.schema.has_public_bounds(column):
            self.fail(f"{kind.upper()}({column}) needs public bounds on column {column!r}")
            return None
        return Aggregate(kind, column, quantile)

    def quantile_level(self, node: exp.Expression | None) -> float | None:
        value = self.literal(node) if node is not None else None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            self.fail("QUANTILE_CONT takes a column and one literal level between 0 and 1")
            return None
        return float(Fraction(value).limit_denominator(1000))

    def aggregate_argument(self, node: exp.Expression, name: str, allow: set[str] | None = None) -> str | None:
        extras = [k for k, v in node.args.items()
                  if k not in {"this", "big_int"} | (allow or set()) and v not in (None, False, [], ())]
        if extras:
            self.fail(f"{name}(...) takes one plain column (found {', '.join(sorted(extras))})")
            return None
        argument = node.this
        if not isinstance(argument, exp.Column):
            self.fail(f"{name}(...) takes one plain column, not {_describe(argument)}")
            return None
        column = self.column(argument, f"{name}(...)")
        if column is not None and not self.schema.has_public_domain(column):
            self.fail(f"column {column!r} needs public bounds or categories to be aggregated")
            return None
        return column

    def column(self, node: exp.Expression, where: str) -> str | None:
        if not isinstance(node, exp.Column) or not isinstance(node.this, exp.Identifier):
            self.fail(f"{where} accepts plain column names only, not {_describe(node)}")
            return None
        qualifiers = [k for k, v in node.args.items() if k not in {"this", "table"} and v]
        table = node.args.get("table")
        if qualifiers or (table is not None and table.name != self.schema.name):
            self.fail(f"column {node.sql(dialect='duckdb')!r} is qualified with something other than the dataset")
            return None
        column = self.schema.resolve(node.this.name)
        if column is None:
            self.fail(f"unknown column {node.this.name!r}")
            return None
        if column == self.schema.privacy_unit:
            self.fail(f"the privacy-unit column {column!r} may not appear in a DP query")
            return None
        return column

    def condition(self, node: exp.Expression) -> Condition | None:
        if isinstance(node, exp.Paren):
            return self.condition(node.this)
        if isinstance(node, exp.And | exp.Or):
            left, right = self.condition(node.this), self.condition(node.expression)
            if left is None or right is None:
                return None
            joined = AllOf if isinstance(node, exp.And) else AnyOf
            parts: list[Condition] = []
            for side in (left, right):
                parts.extend(side.parts if isinstance(side, joined) else (side,))
            return joined(tuple(parts))
        if isinstance(node, exp.Not):
            if isinstance(node.this, exp.Is):
                inner = self.condition(node.this)
                return IsNull(inner.column, negated=True) if isinstance(inner, IsNull) else None
            part = self.condition(node.this)
            return Negation(part) if part is not None else None
        if isinstance(node, exp.Column):
            column = self.filter_column(node)
            if column is not None and self.schema.columns[column].get("type") != "boolean":
                self.fail(f"column {column!r} alone is not a condition; compare it with a literal")
                return None
            return Comparison(column, "=", True) if column else None
        if type(node) in COMPARISONS:
            return self.comparison(node, COMPARISONS[type(node)])
        if isinstance(node, exp.In):
            return self.in_list(node)
        if isinstance(node, exp.Between):
            if not self.allowed(node):
                return None
            column = self.filter_column(node.this)
            low = self.typed_literal(node.args.get("low"), column)
            high = self.typed_literal(node.args.get("high"), column)
            if column is None or low is None or high is None:
                return None
            return Between(column, low, high)
        if isinstance(node, exp.Is):
            column = self.filter_column(node.this)
            if not isinstance(node.expression, exp.Null):
                self.fail("IS may only test for NULL")
                return None
            return IsNull(column) if column else None
        self.fail(f"{_describe(node)} is not allowed in WHERE (use comparisons, IN, BETWEEN, IS NULL, AND, OR, NOT)")
        return None

    def comparison(self, node: exp.Expression, op: str) -> Condition | None:
        left, right = node.this, node.expression
        if isinstance(right, exp.Column) and not isinstance(left, exp.Column):
            left, right, op = right, left, FLIPPED[op]
        column = self.filter_column(left)
        value = self.typed_literal(right, column)
        if column is None or value is None:
            return None
        return Comparison(column, op, value)

    def in_list(self, node: exp.In) -> Condition | None:
        if node.args.get("query") is not None or node.args.get("unnest") is not None:
            self.fail("subqueries are not allowed (IN must list literals)")
            return None
        column = self.filter_column(node.this)
        if len(node.expressions) > MAX_IN_ITEMS:
            self.fail(f"IN lists may hold at most {MAX_IN_ITEMS} values")
            return None
        if not node.expressions:
            self.fail("IN () needs at least one value")
            return None
        values = [self.typed_literal(item, column) for item in node.expressions]
        if column is None or not values or any(v is None for v in values):
            return None
        return InList(column, tuple(v for v in values if v is not None))

    def filter_column(self, node: exp.Expression) -> str | None:
        if isinstance(node, exp.Subquery | exp.Select):
            self.fail("subqueries are not allowed")
            return None
        column = self.column(node, "WHERE")
        if column is not None and not self.schema.has_public_domain(column):
            self.fail(f"column {column!r} needs public bounds or categories to be tested in WHERE")
            return None
        return column

    def typed_literal(self, node: exp.Expression | None, column: str | None) -> Literal | None:
        value = self.literal(node)
        if value is None or column is None:
            return None
        column_type = self.schema.columns[column].get("type")
        fits = {
            "integer": isinstance(value, int | float) and not isinstance(value, bool),
            "float": isinstance(value, int | float) and not isinstance(value, bool),
            "string": isinstance(value, str),
            "boolean": isinstance(value, bool),
        }.get(str(column_type), False)
        if not fits:
            self.fail(f"column {column!r} ({column_type}) is compared with {value!r}, a value of another type")
            return None
        return value

    def literal(self, node: exp.Expression | None) -> Literal | None:
        if isinstance(node, exp.Subquery | exp.Select):
            self.fail("subqueries are not allowed")
            return None
        negative = False
        if isinstance(node, exp.Neg):
            negative, node = True, node.this
        if isinstance(node, exp.Boolean) and not negative:
            return bool(node.this)
        if isinstance(node, exp.Literal) and node.is_string and not negative:
            if len(node.this) > MAX_LITERAL_LENGTH:
                self.fail(f"string literals may be at most {MAX_LITERAL_LENGTH} characters")
                return None
            return str(node.this)
        if isinstance(node, exp.Literal) and not node.is_string:
            number = _number(node.this)
            if number is None:
                self.fail(f"{node.this!r} is not a finite number")
                return None
            return -number if negative else number
        self.fail(f"only literal values may be compared with columns, not {_describe(node)}")
        return None


def _number(text: str) -> int | float | None:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _default_name(aggregate: Aggregate) -> str:
    if aggregate.kind == "count_rows":
        return "count"
    if aggregate.kind == "quantile":
        if aggregate.quantile == 0.5:
            return f"median_{aggregate.column}"
        return f"quantile_{aggregate.quantile:g}_{aggregate.column}"
    return f"{aggregate.kind}_{aggregate.column}"


def _describe(node: exp.Expression | None) -> str:
    if node is None:
        return "nothing"
    if isinstance(node, exp.Anonymous):
        return f"function {str(node.this).upper()}"
    if isinstance(node, exp.Func):
        return f"function {node.sql_name()}"
    if isinstance(node, exp.Subquery | exp.Select):
        return "a subquery"
    return node.key.upper()


def _short(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return [type(value).__name__, value] if isinstance(value, bool | int | float) else value
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    fields = getattr(value, "__dataclass_fields__", None)
    if fields is not None:
        return {"node": type(value).__name__, **{name: _plain(getattr(value, name)) for name in fields}}
    return str(value)
