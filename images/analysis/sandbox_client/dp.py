"""Differentially private queries from inside the sandbox, over /run/sandbox/dp.sock.

    from sandbox_client import dp
    answer = dp.query('SELECT sex, COUNT(*) AS n FROM "carotid-stenting" GROUP BY sex', epsilon=0.5)
    answer.rows, answer.accuracy, answer.epsilon_remaining
    answer.to_pandas()

In a notebook kernel the answer is displayed as the platform recorded it: the kernel sends only the
answer's id (`application/vnd.sandbox.dp-answer+json`), and in the aggregate tier the browser sees the
platform's own rendering of the values the DP engine released, never bytes the kernel wrote.

The job's contract pays; the same rules and the same budget apply as for `sandbox query`.
There is no network: the socket is the only way out, and it answers only DP queries.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any

SOCKET_PATH = os.environ.get("SANDBOX_DP_SOCKET", "/run/sandbox/dp.sock")
ANSWER_MIME = "application/vnd.sandbox.dp-answer+json"


class DpError(Exception):
    """The sandbox refused or failed the query; `status` is the HTTP status, `detail` says why."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status, self.title, self.detail = status, title, detail


@dataclass
class Answer:
    columns: list[str]
    rows: list[list[Any]]
    accuracy: list[list[float | None]]
    epsilon_spent: float
    epsilon_remaining: float
    cached: bool
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    answer_id: str | None = None  # the platform's record of this answer, where it keeps one (notebooks)

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows, columns=self.columns)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        text = "\n".join(["\t".join(self.columns), *("\t".join(str(v) for v in row) for row in self.rows)])
        bundle: dict[str, Any] = {"text/plain": text}
        if self.answer_id is not None:
            bundle[ANSWER_MIME] = {"answer_id": self.answer_id}
        return bundle

    def show(self) -> None:
        """Display the answer in a notebook (the platform's rendering of it, in the aggregate tier)."""
        from IPython.display import display

        display(self)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("sandbox", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None and hasattr(get_ipython(), "kernel")


def query(sql: str, *, epsilon: float | None = None, rho: float | None = None, delta: float = 0.0,
          timeout: float = 300.0, socket_path: str | None = None, display: bool | None = None) -> Answer:
    """Run one DP query; raises DpError when it is refused (bad SQL, over budget...).

    `display` (default: when running in a notebook kernel whose platform records answers) shows the answer.
    """
    body: dict[str, Any] = {"sql": sql, "delta": delta}
    if epsilon is not None:
        body["epsilon"] = epsilon
    if rho is not None:
        body["rho"] = rho
    path = socket_path or SOCKET_PATH
    if not os.path.exists(path):
        raise DpError(503, "Unavailable", f"{path} is missing: this contract does not allow DP queries from jobs")
    connection = _UnixConnection(path, timeout)
    try:
        connection.request("POST", "/query", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = json.loads(response.read() or b"{}")
    finally:
        connection.close()
    if response.status != 200:
        raise DpError(response.status, str(payload.get("title", "Error")), str(payload.get("detail", "")))
    answer = Answer(columns=payload["columns"], rows=payload["rows"], accuracy=payload["accuracy"],
                    epsilon_spent=payload["epsilon_spent"], epsilon_remaining=payload["epsilon_remaining"],
                    cached=payload["cached"], raw=payload, answer_id=payload.get("answer_id"))
    if display if display is not None else (answer.answer_id is not None and _in_kernel()):
        answer.show()
    return answer
