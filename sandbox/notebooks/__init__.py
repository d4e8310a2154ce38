"""Remote notebooks: a jupyter_server per session whose kernels run in hardened, network-less containers.

A session is a job of kind notebook (`sessions`, in the store). The worker runs each running session's
server as a child process (`servers`), which listens on a Unix socket only and announces itself beside it
(`endpoint`); the API's proxy (`sandbox.api.routes.notebook_proxy`) reaches it there with a session token.
Every message leaving a kernel passes the egress filter in the server's websocket bridge (`jupyter/`);
files leave through an export that a steward reviews (`exports`, run by the worker).
"""
