"""Alembic environment: runs on the connection `sandbox.store.database.migrate` hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from sandbox.store.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as owned:
        context.configure(connection=owned, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
