"""Metadata store: SQLAlchemy 2 on SQLite (default) or PostgreSQL, the same code for both."""
