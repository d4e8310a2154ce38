"""A real `sandbox serve` on a loopback port with its own home, the demo registry and tokens: what the
end-to-end benchmarks measure against."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sandbox.demo import CARD, write_registry

CLI = [sys.executable, "-m", "sandbox.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Served:
    url: str
    home: Path
    api: httpx.Client
    steward: dict[str, str]
    buyer: dict[str, str]

    def contract(self, *, tier: str, kinds: list[str], **quotas: Any) -> str:
        answer = self.api.post("/v1/contracts", headers=self.steward, json={
            "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": tier, "kinds": kinds,
            "purpose": "bench", "valid_until": "2099-01-01", "epsilon": 1.0, "quotas": quotas})
        answer.raise_for_status()
        return str(answer.json()["id"])


@contextmanager
def served(*, prefix: str, procedures: int, env: dict[str, str] | None = None) -> Iterator[Served]:
    """Init a home, start the service, register the demo registry; stop the service afterwards."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    environment = {**os.environ, "SANDBOX_HOME": str(home), "SANDBOX_LOG_LEVEL": "WARNING", **(env or {})}
    subprocess.run([*CLI, "init"], env=environment, check=True, capture_output=True)

    def token(role: str, org: str) -> dict[str, str]:
        issued = subprocess.run([*CLI, "token", "issue", "--sub", role, "--org", org, "--role", role],
                                env=environment, check=True, capture_output=True, text=True).stdout.strip()
        return {"Authorization": f"Bearer {issued}"}

    steward, buyer = token("steward", "hospital"), token("buyer", "acme")
    port = free_port()
    with (home / "serve.log").open("wb") as log:
        server = subprocess.Popen([*CLI, "serve", "--port", str(port)], env=environment, stdout=log,
                                  stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    api = httpx.Client(base_url=url, timeout=120)
    try:
        for _ in range(600):
            try:
                if api.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        api.post("/v1/datasets", json=CARD, headers=steward).raise_for_status()
        data = write_registry(home / "registry.parquet", procedures=procedures)
        with data.open("rb") as handle:
            api.post("/v1/datasets/carotid-stenting/versions", headers=steward,
                     files={"file": ("r.parquet", handle)}).raise_for_status()
        yield Served(url=url, home=home, api=api, steward=steward, buyer=buyer)
    finally:
        api.close()
        server.terminate()
        server.wait(timeout=60)
