"""DuckDB connections as every module here opens them: in memory, with no extension installed or loaded
behind our back (an extension is code from the network), and no progress bar on the service's console."""

from __future__ import annotations

import duckdb

Setting = str | bool | int | float | list[str]

LOCKED_DOWN: dict[str, Setting] = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
}


def connect(*, threads: int | None = None, **settings: Setting) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the lock-down settings (and `threads`, or other settings, if given)."""
    config: dict[str, Setting] = dict(LOCKED_DOWN)
    if threads is not None:
        config["threads"] = threads
    config.update(settings)
    connection = duckdb.connect(":memory:", config=config)
    connection.execute("SET enable_progress_bar = false")  # a session setting, not accepted at connect
    return connection
