"""Engine, sessions and migrations: the only place that knows which database is behind the store."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """An engine for `url`; SQLite gets WAL, foreign keys and writer-serialising transactions.

    `read_only` engines (SQLite only) start deferred transactions: readers then share the
    database instead of queueing behind the write lock.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy, not the driver, decide when transactions start (see _on_begin).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Any) -> None:
            # BEGIN IMMEDIATE takes the write lock up front: a deferred transaction that reads and
            # later writes can fail with SQLITE_BUSY instead of waiting, which would break the
            # audit chain's and the budget ledger's read-then-append.
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@event.listens_for(Session, "do_orm_execute")
def _locking_reads_are_fresh(state: ORMExecuteState) -> None:
    # A row read earlier in the session stays in the identity map, and a later SELECT ... FOR UPDATE
    # would hand back those stale attributes: read-modify-write on them loses concurrent updates
    # (seen as a budget ledger that counted one query of ten). Locking reads always reload.
    if state.is_select and getattr(state.statement, "_for_update_arg", None) is not None:
        state.update_execution_options(populate_existing=True)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on any exception."""
    with sessions() as session, session.begin():
        yield session


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        # Several processes starting at once on one PostgreSQL store: one migrates, the others then find the head.
        serialise_transaction(connection, "migrate")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def serialise_transaction(connection: Connection | Session, name: str) -> None:
    """Make every other transaction that names `name` wait for this one to end (PostgreSQL's transaction-level
    advisory lock); SQLite's writers are serialised already (BEGIN IMMEDIATE)."""
    bind = connection.get_bind() if isinstance(connection, Session) else connection
    if bind.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"sandbox-store:{name}".encode()).digest()[:8], "big", signed=True)
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
