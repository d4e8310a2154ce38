"""Small builders shared by tests: dataset cards and files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from sandbox.auth.tokens import Role
from sandbox.demo import CARD, write_registry
from sandbox.instance import Instance


def demo_card(name: str = "carotid-stenting") -> dict[str, Any]:
    return {**CARD, "name": name}


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
