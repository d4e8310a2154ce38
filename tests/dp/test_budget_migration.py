"""Migration 0007 backfills the integer ledger from the float one: totals rounded down, spend rounded up."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from pgdb import run_migration

from sandbox.store.database import make_engine


def test_backfill_never_grants_budget(store_url: str) -> None:
    engine = make_engine(store_url)
    try:
        run_migration(engine, store_url, "head")
        run_migration(engine, store_url, "0006", down=True)
        now = datetime.now(UTC)
        with engine.begin() as connection:
            tables = sa.MetaData()
            tables.reflect(connection, only=["contracts", "budget_ledgers", "dataset_budgets"])
            connection.execute(tables.tables["contracts"].insert().values(
                id="c1", buyer_org="acme", datasets=["d"], tier="dp_only", kinds=["query"], purpose="p",
                valid_from=now, valid_until=now, epsilon=1.0000009, delta=1e-6, quotas={}, policy_name="x",
                policy_version=1, created_by="s", created_at=now))
            connection.execute(tables.tables["budget_ledgers"].insert().values(
                contract_id="c1", dataset="d", epsilon_total=1.0000009, epsilon_spent=0.1 + 0.2,
                epsilon_reserved=0.0, delta_total=1e-6, delta_spent=3e-9, delta_reserved=0.0))
            connection.execute(tables.tables["dataset_budgets"].insert().values(
                dataset="d", epsilon_cap=2.5, epsilon_spent=0.30000000000000004, epsilon_reserved=0.0,
                mock_epsilon=0.1234567))
        run_migration(engine, store_url, "head")
        with engine.connect() as connection:
            ledger = connection.execute(sa.text(
                "SELECT epsilon_total_units, epsilon_spent_units, delta_total_units, delta_spent_units "
                "FROM budget_ledgers")).one()
            cap = connection.execute(sa.text(
                "SELECT epsilon_cap_units, epsilon_spent_units, mock_epsilon_units FROM dataset_budgets")).one()
        assert tuple(ledger) == (1_000_000, 300_000, 1_000_000, 3_000), ledger
        assert tuple(cap) == (2_500_000, 300_000, 123_457), cap
    finally:
        engine.dispose()
