"""Run the API process alone, serving HTTP on a Unix socket, and record every file it opens.

Usage: python recorded_api.py SOCKET RECORD (settings from SANDBOX_* variables). Every `open` audit event
(builtins.open, io.open, os.open) is noted with its absolute path, and every call into the C libraries that
open files themselves (DuckDB, pyarrow's Parquet readers) as `call module.name(first argument)`. On SIGTERM
the server stops and the record is written to RECORD as JSON. No worker runs here: the test runs the
worker's local service in its own process.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

OPENED: list[str] = []


def _note_open(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and args and isinstance(args[0], str | bytes | os.PathLike):
        OPENED.append(os.path.abspath(os.fsdecode(args[0])))


sys.addaudithook(_note_open)


def _watch(module: Any, name: str) -> None:
    real = getattr(module, name)

    def watched(*args: Any, **kwargs: Any) -> Any:
        OPENED.append(f"call {module.__name__}.{name}({args[0] if args else ''})")
        return real(*args, **kwargs)

    setattr(module, name, watched)


def main() -> None:
    import duckdb
    import pyarrow.parquet as pq

    _watch(duckdb, "connect")
    for name in ("read_table", "read_schema", "read_metadata", "ParquetFile"):
        _watch(pq, name)

    import uvicorn

    from sandbox.api.app import create_app
    from sandbox.config import Settings
    from sandbox.instance import Instance

    socket_path, record = sys.argv[1], sys.argv[2]

    def write_record(*_: object) -> None:
        opened = list(OPENED)
        with open(record, "w") as handle:
            json.dump(opened, handle)
        sys.exit(0)

    # uvicorn stops on SIGTERM, restores this handler, then raises the signal again: the record is written then.
    signal.signal(signal.SIGTERM, write_record)
    instance = Instance(Settings())
    server = uvicorn.Server(uvicorn.Config(create_app(instance), uds=socket_path, log_config=None,
                                           access_log=False))
    server.run()
    write_record()


if __name__ == "__main__":
    main()
