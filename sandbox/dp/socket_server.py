"""The DP endpoint inside a job or a notebook kernel: `POST /query` over a Unix socket of its own, mounted at
/run/sandbox/dp.sock.

Which socket a connection arrives on says which job or kernel (and so which contract and org) asks; the
code inside never presents a token. The server is the worker's local HTTP server (`sandbox.local_http`),
and the handler is `sandbox.dp.queries.socket_handler`: the same service, rules and ledger as
`POST /v1/queries`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from sandbox.local_http import MAX_REQUEST_BYTES, BytesHandler, Handler, LocalHttpServer

__all__ = ["MAX_REQUEST_BYTES", "DpSocket"]


class DpSocket(LocalHttpServer):
    """One job's or kernel's DP socket at `path` (the only entry of its folder), served by a thread.

    The socket is 0666 in a 0755 folder: the container's uid must connect, and connect() needs write
    permission on the socket inode. Nothing else lives in the folder.
    """

    def __init__(self, path: Path, handle_query: Handler | None,
                 more: Mapping[str, BytesHandler] | None = None) -> None:
        """`handle_query` None: the contract allows no queries, and the socket serves only `more`
        (a dp_training job's rows and progress)."""
        routes: dict[str, BytesHandler] = {"/query": handle_query} if handle_query is not None else {}
        super().__init__(path, {**routes, **(more or {})}, mode=0o666, folder_mode=0o755, peer_name="job")
