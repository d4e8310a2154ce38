"""Hostile DP queries: each is refused at planning with a 422 that names what it tried."""


from __future__ import annotations

import pytest

from sandbox.demo import CARD
from sandbox.dp.plan import DatasetPrivacy, plan_query
from sandbox.errors import Invalid

DATASET = DatasetPrivacy.from_card(CARD)
T = '"carotid-stenting"'

REFUSED = [
    (f"SELECT COUNT(*) FROM {T}; DROP TABLE x", "one statement"),
    (f"SELECT COUNT(*) FROM {T}; SELECT COUNT(*) FROM {T}", "one statement"),
    ("SELECT COUNT(*) FROM read_csv('/etc/passwd')", "read_csv"),
    ("SELECT * FROM read_parquet('/data/*.parquet')", "read_parquet"),
    ("SELECT COUNT(*) FROM glob('/etc/*')", "dataset table"),
    (f"SELECT pg_read_file('/etc/passwd') FROM {T}", "pg_read_file"),
    (f"SELECT COUNT(*) FROM {T} WHERE site = pg_read_file('/etc/passwd')", "literal"),
    ("ATTACH '/tmp/x.db' AS x", "only SELECT"),
    ("COPY (SELECT 1) TO '/tmp/out.csv'", "only SELECT"),
    ("SET enable_external_access = true", "only SELECT"),
    ("PRAGMA database_list", "only SELECT"),
    ("INSTALL httpfs", "only SELECT"),
    ("LOAD httpfs", "only SELECT"),
    (f"SELECT SUM(patient_id) FROM {T}", "privacy-unit"),
    (f"SELECT patient_id, COUNT(*) FROM {T} GROUP BY patient_id", "privacy-unit"),
    (f'SELECT COUNT(*) FROM {T} WHERE "PATIENT_ID" = \'P100000\'', "privacy-unit"),
    (f"SELECT COUNT(DISTINCT patient_id) FROM {T}", "DISTINCT"),
    (f"SELECT COUNT(DISTINCT site) FROM {T}", "DISTINCT"),
    (f"SELECT age FROM {T}", "not in GROUP BY"),
    (f"SELECT * FROM {T}", "STAR"),
    (f"SELECT SUM(sex) FROM {T}", "public bounds"),
    (f"SELECT SUM(age * 1000) FROM {T}", "plain column"),
    (f"SELECT COUNT(*) FROM (SELECT * FROM {T} LIMIT 1)", "dataset table"),
    (f"SELECT COUNT(*) FROM {T} WHERE age IN (SELECT age FROM {T})", "subqueries"),
    (f"SELECT COUNT(*) FROM {T} a JOIN {T} b ON a.age = b.age", "JOIN"),
    (f"SELECT COUNT(*) FROM {T}, {T}", "JOIN"),
    (f"WITH x AS (SELECT * FROM {T}) SELECT COUNT(*) FROM x", "WITH"),
    (f"SELECT COUNT(*) FROM {T} UNION SELECT COUNT(*) FROM {T}", "UNION"),
    (f"SELECT site, COUNT(*) FROM {T} GROUP BY site HAVING COUNT(*) > 5", "HAVING"),
    (f"SELECT SUM(age) OVER () FROM {T}", "window"),
    (f"SELECT site, COUNT(*) FROM {T} GROUP BY site ORDER BY 2 LIMIT 1", "LIMIT"),
    (f"SELECT COUNT(*) FROM {T} LIMIT 1", "LIMIT"),
    (f"SELECT COUNT(*) FROM {T} OFFSET 1", "OFFSET"),
    (f"SELECT COUNT(*) FROM {T} /* */ WHERE age > 3", "comments"),
    (f"SELECT COUNT(*) FROM {T} -- trailing", "comments"),
    (f"SELECT COUNT(*) FROM {T} WHERE site = 'a' || 'b'", "literal"),
    (f"SELECT COUNT(*) FROM {T} WHERE site = concat('a', 'b')", "literal"),
    ('SELECT COUNT(*) FROM "carotid-stenting""; DROP TABLE x; --"', "the only table"),
    ("SELECT COUNT(*) FROM carotid_stenting", "the only table"),
    (f"SELECT COUNT(*) FROM main.{T}", "only the dataset table"),
    (f"SELECT COUNT(*) FROM {T} WHERE age > length_of_stay", "literal"),
    (f"SELECT COUNT(*) FROM {T} WHERE age > '30'", "another type"),
    (f"SELECT COUNT(*) FROM {T} WHERE patient_id LIKE 'P1%'", "LIKE is not allowed"),
    (f"SELECT COUNT(*) FROM {T} WHERE site LIKE 'b%'", "not allowed in WHERE"),
    (f"SELECT COUNT(*) FILTER (WHERE age > 80) FROM {T}", "FILTER"),
    (f"SELECT DISTINCT site FROM {T}", "DISTINCT"),
    (f"SELECT quantile_cont(age, 2) FROM {T}", "level between 0 and 1"),
    (f"SELECT MAX(age) FROM {T}", "not an allowed aggregate"),
    (f"SELECT COUNT(*) FROM {T} QUALIFY row_number() OVER () = 1", "QUALIFY"),
    (f"SELECT COUNT(*) FROM {T} USING SAMPLE 10", "TABLESAMPLE"),
    (f"SELECT COUNT(*) FROM {T} WHERE nonexistent = 1", "unknown column"),
    ("SELECT 1", "must read FROM"),
    ("", "exactly one SELECT"),
]


@pytest.mark.parametrize(("sql", "named"), REFUSED, ids=[f"q{i}" for i in range(len(REFUSED))])
def test_hostile_query_is_refused_naming_the_problem(sql: str, named: str) -> None:
    with pytest.raises(Invalid) as refused:
        plan_query(sql, DATASET)
    message = refused.value.detail + " | " + " | ".join(refused.value.errors)
    assert named.lower() in message.lower(), f"{sql!r} was refused, but the reason does not name {named!r}: {message}"
    assert refused.value.status == 422


def test_every_problem_is_listed_not_just_the_first() -> None:
    with pytest.raises(Invalid) as refused:
        plan_query(f"SELECT patient_id, MAX(age) FROM {T} HAVING COUNT(*) > 1 LIMIT 2", DATASET)
    text = " ".join(refused.value.errors)
    for part in ("HAVING", "LIMIT", "privacy-unit", "MAX"):
        assert part in text, f"{part} missing from {refused.value.errors}"
