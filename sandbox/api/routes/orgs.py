"""Organisation endpoints: the public keys that sign each org's dataset versions."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from sandbox.api.deps import AnyRole, InstanceDep
from sandbox.catalog import signing
from sandbox.errors import NotFound

router = APIRouter(prefix="/v1/orgs", tags=["orgs"])


class OrgKeyView(BaseModel):
    """A public key that verifies an org's signed dataset versions."""

    model_config = ConfigDict(extra="forbid")

    key_id: str
    algorithm: Literal["Ed25519"]
    public_key_pem: str
    created_at: datetime
    # True: the platform holds the private key and signs for the org; False: the org holds it.
    custodial: bool


def _view(key: signing.OrgKey) -> OrgKeyView:
    return OrgKeyView(key_id=key.key_id, algorithm="Ed25519", public_key_pem=key.public_key_pem,
                      created_at=key.created_at, custodial=key.custodial)


@router.get("/{org}/keys", response_model=list[OrgKeyView])
def list_keys(org: str, instance: InstanceDep, _principal: AnyRole) -> list[OrgKeyView]:
    """The org's version-signing public keys; pin them out of band for real trust."""
    keys = signing.org_public_keys(instance.settings.keys_dir, org)
    if not keys:
        raise NotFound(f"organisation {org!r} has no signing key")
    return [_view(key) for key in keys]
