"""The SQL checker fails closed: anything sqlglot parses that the checker does not fully understand is refused.

Review 11.6: `x IN ()` made the whole WHERE vanish and `BETWEEN SYMMETRIC` was ignored, so a different
query got another query's cached answer. Each variant here must be refused with a 422, never planned
as some other (smaller) query.
"""

from __future__ import annotations

import pytest

from sandbox.demo import CARD
from sandbox.dp import sql as dp_sql
from sandbox.dp.plan import DatasetPrivacy, plan_query
from sandbox.errors import Invalid

DATASET = DatasetPrivacy.from_card(CARD)
T = '"carotid-stenting"'

NOT_UNDERSTOOD = [
    f"SELECT COUNT(*) FROM {T} WHERE age IN ()",
    f"SELECT COUNT(*) FROM {T} WHERE age NOT IN ()",
    f"SELECT COUNT(*) FROM {T} WHERE age > 30 AND age IN ()",
    f"SELECT COUNT(*) FROM {T} WHERE age > 30 OR site IN ()",
    f"SELECT COUNT(*) FROM {T} WHERE age BETWEEN SYMMETRIC 90 AND 18",
    f"SELECT COUNT(*) FROM {T} WHERE age NOT BETWEEN SYMMETRIC 90 AND 18",
    f"SELECT COUNT(*) FROM {T} WHERE age > 30 AND (age BETWEEN SYMMETRIC 60 AND 40)",
    f"SELECT COUNT(*) FROM {T} WHERE site = 'Beijing' COLLATE nocase",
    f"SELECT COUNT(*) FROM {T} WHERE site COLLATE nocase = 'beijing'",
    f"SELECT COUNT(*) FROM {T} WHERE site = CASE WHEN age > 3 THEN 'a' ELSE 'b' END",
    f"SELECT SUM(CASE WHEN age > 30 THEN 1 ELSE 0 END) FROM {T}",
    f"SELECT COUNT(CASE age WHEN 30 THEN 1 END) FROM {T}",
    f"SELECT COUNT(*) FROM {T} WHERE CASE WHEN age > 30 THEN TRUE ELSE FALSE END",
    f"SELECT COUNT(*) FROM {T} WHERE coalesce(age, 0) > 3",
    f"SELECT COUNT(*) FROM {T} WHERE my_udf(age) > 3",
    f"SELECT my_udf(age) FROM {T}",
    f"SELECT SUM(abs(age)) FROM {T}",
    f"SELECT SUM(age) OVER (PARTITION BY site) FROM {T}",
    f"SELECT COUNT(*) OVER () FROM {T}",
    f"SELECT site, row_number() OVER () FROM {T} GROUP BY site",
    f"SELECT COUNT(*) FROM {T} WHERE age = (SELECT MAX(age) FROM {T})",
    f"SELECT COUNT(*) FROM {T} WHERE EXISTS (SELECT 1 FROM {T})",
    f"SELECT COUNT(*) FROM {T} WHERE age > ANY (SELECT age FROM {T})",
    f"SELECT (SELECT COUNT(*) FROM {T}) FROM {T}",
    f"SELECT COUNT(*) FROM {T} UNION ALL SELECT COUNT(*) FROM {T}",
    f"SELECT COUNT(*) FROM {T} INTERSECT SELECT COUNT(*) FROM {T}",
    f"SELECT COUNT(*) FROM {T} EXCEPT SELECT COUNT(*) FROM {T}",
    f"SELECT COUNT(*) FROM {T} WHERE age::VARCHAR = '30'",
    f"SELECT COUNT(*) FROM {T} WHERE CAST(age AS DOUBLE) > 3",
    f"SELECT COUNT(*) FROM {T} WHERE age > 3 + 1",
    f"SELECT COUNT(*) FROM {T} WHERE site ILIKE 'b%'",
    f"SELECT COUNT(*) FROM {T} WHERE site SIMILAR TO 'b.*'",
    f"SELECT COUNT(*) FROM {T} WHERE site IS DISTINCT FROM 'Beijing'",
    f"SELECT COUNT(*) FROM {T} WHERE age IN (30, 40 + 1)",
    f"SELECT COUNT(*) FROM {T} WHERE (age, sex) IN ((30, 'F'))",
    f"SELECT COUNT(*) FROM {T} WHERE age > $1",
    f"SELECT COUNT(*) FROM {T} WHERE age > ?",
    f"SELECT COUNT(*) FROM {T} WHERE site = E'\\x41'",
    f"SELECT COUNT(*) FROM {T} WHERE site = x'41'",
    f"SELECT COUNT(*) FROM {T} WHERE age > 1e400",
    f"SELECT COUNT(*) FROM {T} WHERE age > INTERVAL 3 DAY",
    f"SELECT COUNT(*) FROM {T} WHERE age > DATE '2020-01-01'",
    f"SELECT SUM(DISTINCT age) FROM {T}",
    f"SELECT COUNT(ALL age) FILTER (WHERE age > 3) FROM {T}",
    f"SELECT site, COUNT(*) FROM {T} GROUP BY ALL",
    f"SELECT site, COUNT(*) FROM {T} GROUP BY ROLLUP (site)",
    f"SELECT site, COUNT(*) FROM {T} GROUP BY CUBE (site)",
    f"SELECT site, COUNT(*) FROM {T} GROUP BY GROUPING SETS ((site), ())",
    f"SELECT site, COUNT(*) FROM {T} GROUP BY 1",
    f"SELECT COUNT(*) FROM {T} AS t",
    f"SELECT COUNT(*) FROM {T} WINDOW w AS ()",
    f"SELECT COUNT(*) FROM {T} ORDER BY 1",
    f"SELECT COUNT(*) FROM {T} WHERE struct_pack(a := age).a > 3",
    f"SELECT COUNT(*) FROM {T} WHERE [age][1] > 3",
    f"SELECT COUNT(*) FROM {T} WHERE age > 3 IS TRUE",
    f"SELECT COUNT(*) FROM {T} WHERE NOT NOT age IN ()",
]


@pytest.mark.parametrize("sql", NOT_UNDERSTOOD, ids=[f"v{i}" for i in range(len(NOT_UNDERSTOOD))])
def test_what_the_checker_does_not_understand_is_refused(sql: str) -> None:
    try:
        plan = plan_query(sql, DATASET)
    except Invalid as refused:
        assert refused.status == 422
        assert refused.errors, "a refusal must say why"
        return
    pytest.fail(f"{sql!r} was planned as {plan.query.canonical()}, not refused")


def test_empty_in_and_symmetric_between_never_share_a_plan_with_a_smaller_query() -> None:
    for sql, message in ((f"SELECT COUNT(*) FROM {T} WHERE age IN ()", "IN ()"),
                         (f"SELECT COUNT(*) FROM {T} WHERE age BETWEEN SYMMETRIC 90 AND 18", "SYMMETRIC")):
        with pytest.raises(Invalid) as refused:
            plan_query(sql, DATASET)
        assert message.lower() in refused.value.detail.lower(), refused.value.detail


def test_the_allow_list_covers_every_node_of_the_accepted_queries() -> None:
    accepted = (f"SELECT site, COUNT(*) AS n, COUNT(age), SUM(age), AVG(age), VARIANCE(age), VAR_POP(age), "
                f"STDDEV(age), STDDEV_POP(age), MEDIAN(age), QUANTILE_CONT(age, 0.25) FROM {T} "
                "WHERE (age >= 30 AND NOT site IN ('Beijing')) OR age BETWEEN -1 AND 2.5 OR sex IS NULL "
                f"OR sex IS NOT NULL OR symptomatic OR {T}.age <> 3 OR symptomatic = TRUE GROUP BY site")
    plan = plan_query(accepted, DATASET)
    assert len(plan.outputs) == 11


def test_a_node_type_outside_the_allow_list_is_refused_even_where_the_checker_accepts_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The allow-list is a layer of its own: remove one entry and a query the rest accepts is refused."""
    from sqlglot import exp

    trimmed = {k: v for k, v in dp_sql.ALLOWED_NODES.items() if k is not exp.Between}
    monkeypatch.setattr(dp_sql, "ALLOWED_NODES", trimmed)
    with pytest.raises(Invalid, match="BETWEEN"):
        plan_query(f"SELECT COUNT(*) FROM {T} WHERE age BETWEEN 30 AND 40", DATASET)
