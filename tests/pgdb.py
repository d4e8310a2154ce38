"""PostgreSQL databases for tests: the server's address, and fresh databases cloned from a migrated template."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

POSTGRES_URL = os.environ.get(
    "SANDBOX_TEST_POSTGRES_URL", "postgresql+psycopg://sandbox:sandbox@127.0.0.1:5432/postgres"
)
REQUIRE_POSTGRES = os.environ.get("SANDBOX_REQUIRE_POSTGRES") == "1"


def admin_engine() -> Engine:
    return create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


@contextmanager
def cloned_database(template: str | None) -> Iterator[str]:
    """A fresh PostgreSQL database cloned from the migrated template (empty without one), dropped afterwards."""
    name = f"sbx_test_{uuid.uuid4().hex[:12]}"
    admin = admin_engine()
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run_migration(engine: Engine, url: str, revision: str, *, down: bool = False) -> None:
    """Upgrade (or downgrade) the store at `url` to `revision` on `engine`'s connection, as Alembic would."""
    from alembic import command

    from sandbox.store.database import alembic_config

    config = alembic_config(url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)
