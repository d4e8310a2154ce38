"""Remote notebooks: a jupyter_server per session whose kernels run in hardened, network-less containers.

The service starts the server (`servers`), which listens on a Unix socket only; clients reach it through
the service's proxy (`proxy`), with a session token. Every message leaving a kernel passes the egress
filter (`egress`) in the server's websocket bridge (`bridge`); the contents API (`contents`) serves
notebooks and code, never data; files leave through an export that a steward reviews (`sessions`).
"""
