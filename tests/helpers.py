"""Small builders shared by tests: dataset cards and files."""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from sandbox.auth.tokens import Role
from sandbox.demo import CARD, write_registry
from sandbox.instance import Instance


def demo_card(name: str = "carotid-stenting") -> dict[str, Any]:
    return {**CARD, "name": name}


def patient_ids(*registries: Path) -> list[str]:
    """The patient ids in demo registry Parquet files (`write_registry`'s), in order, each once."""
    import pyarrow.parquet as pq

    ids = (str(v) for path in registries for v in pq.read_table(path, columns=["patient_id"]).column(0).to_pylist())
    return list(dict.fromkeys(ids))


def ids_in(text: str, ids: Iterable[str]) -> list[str]:
    """The patient ids (P + digits) that `text` carries: whole, or as their digits standing alone.

    The digits are matched only as a token of their own, and not as a timestamp's fraction of a second: a
    digest, a signature, a byte count or a time the platform wrote can hold any six digits by chance, and
    a check that fails by chance cannot tell a leak from luck.
    """
    text = re.sub(r"(?<=\d\d:\d\d:\d\d)\.\d+", "", text)  # a timestamp's microseconds are six digits too
    tokens = set(re.findall(r"[0-9A-Za-z]+", text))
    return sorted(pid for pid in ids if pid in text or pid[1:] in tokens)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def register_demo(api: TestClient, steward: str, tmp_path: Path, name: str = "carotid-stenting",
                  procedures: int = 300) -> dict[str, Any]:
    """Create the demo dataset and upload one version through the API."""
    created = api.post("/v1/datasets", json=demo_card(name), headers=auth(steward))
    assert created.status_code == 201, created.text
    path = write_registry(tmp_path / f"{name}.parquet", procedures=procedures)
    with path.open("rb") as handle:
        response = api.post(f"/v1/datasets/{name}/versions", files={"file": (path.name, handle)},
                            headers=auth(steward))
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


@dataclass
class Tokens:
    """Mints real tokens signed by the instance's key."""

    instance: Instance

    def make(self, role: Role, org: str, sub: str | None = None, ttl: int = 3600) -> str:
        return self.instance.issue_token(sub=sub or f"{role.value}-{org}", org=org, role=role, ttl_s=ttl).token

    def steward(self, sub: str = "steward-1", org: str = "hospital") -> str:
        return self.make(Role.STEWARD, org, sub)

    def buyer(self, org: str = "acme", sub: str | None = None) -> str:
        return self.make(Role.BUYER, org, sub)

    def auditor(self, org: str = "hospital") -> str:
        return self.make(Role.AUDITOR, org)

    def admin(self, org: str = "ops") -> str:
        return self.make(Role.ADMIN, org)


class _StandInHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"the service's own port")

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def stand_in_api() -> Iterator[int]:
    """A real HTTP server on every host address, standing in for the API's own port; yields the port."""
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _StandInHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
