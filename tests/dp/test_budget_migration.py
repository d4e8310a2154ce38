"""Migration 0007 backfills the integer ledger from the float one: totals rounded down, spend rounded up."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from pgdb import cloned_database

from sandbox.store.database import alembic_config, make_engine


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    with cloned_database(request.getfixturevalue("postgres_template")) as url:
        yield url


def _run(engine: sa.Engine, url: str, revision: str, *, down: bool = False) -> None:
    config = alembic_config(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)


def test_backfill_never_grants_budget(store_url: str) -> None:
    engine = make_engine(store_url)
    try:
        _run(engine, store_url, "head")
        _run(engine, store_url, "0006", down=True)
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
        _run(engine, store_url, "head")
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
