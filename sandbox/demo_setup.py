"""`sandbox demo`: an instance with the synthetic registry, a buyer contract and tokens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from sandbox import contracts
from sandbox.auth.tokens import Principal, Role
from sandbox.billing.prices import PriceList
from sandbox.catalog import service as catalog
from sandbox.catalog.cards import DatasetCard
from sandbox.config import Settings
from sandbox.demo import CARD, DATASET_NAME, write_registry
from sandbox.errors import NotFound
from sandbox.instance import Instance, init_instance
from sandbox.store.models import Contract

BUYER_ORG = "acme-ai"
HOSPITAL_ORG = "xuanwu-hospital"
# So the demo's invoice (`sandbox invoice`) has something on every line.
DEMO_PRICES = PriceList(currency="EUR", flat_per_period=Decimal("500"), cpu_hour=Decimal("0.40"),
                        gpu_hour=Decimal("2.50"), epsilon=Decimal("100"), released_gb=Decimal("10"))


def set_up_demo(settings: Settings) -> dict[str, Any]:
    """Idempotent: a second run reuses the dataset and contract and issues fresh tokens."""
    init_instance(settings)
    instance = Instance(settings)
    steward = Principal(sub="demo-steward", org=HOSPITAL_ORG, role=Role.STEWARD, jti="demo-setup",
                        issuer=settings.token_issuer, expires_at=datetime.now(UTC) + timedelta(hours=1))
    card = DatasetCard.model_validate(CARD)
    with instance.context(steward) as ctx:
        try:
            catalog.get_dataset(ctx.session, DATASET_NAME)
        except NotFound:
            catalog.create_dataset(ctx, card)
    with instance.sessions() as session:
        has_version = bool(catalog.get_dataset(session, DATASET_NAME).versions)
    if not has_version:
        upload = write_registry(settings.tmp_dir / "carotid-stenting-demo.parquet")
        staged, ingested, sha256 = catalog.prepare_version(settings.tmp_dir, card, upload, upload.name)
        with instance.context(steward) as ctx:
            catalog.add_version(ctx, name=DATASET_NAME, staged=staged, ingested=ingested, sha256=sha256,
                                upload_sha256=catalog.file_sha256(upload), size_bytes=upload.stat().st_size)
        upload.unlink()
    with instance.context(steward) as ctx:
        version = catalog.get_version(ctx.session, DATASET_NAME)
        contract = ctx.session.execute(
            select(Contract).where(Contract.buyer_org == BUYER_ORG, Contract.revoked_at.is_(None))
        ).scalars().first()
        if contract is None or contracts.contract_state(contract) != "active":
            contract = contracts.create_contract(ctx, contracts.ContractRequest(
                buyer_org=BUYER_ORG, datasets=[DATASET_NAME], tier=contracts.Tier.AGGREGATE,
                kinds=list(contracts.JobKind), purpose="Demo: stroke-risk modelling after carotid stenting",
                valid_until=(datetime.now(UTC) + timedelta(days=365)).date(), epsilon=5.0, delta=1e-6,
                prices=DEMO_PRICES,
            ))
        summary = {"dataset": DATASET_NAME, "version": version.version, "rows": version.rows,
                   "contract": contract.id, "buyer_org": BUYER_ORG}
    tokens = {
        "steward": instance.issue_token(sub="dr-li", org=HOSPITAL_ORG, role=Role.STEWARD, ttl_s=7 * 86400).token,
        "buyer": instance.issue_token(sub="alice", org=BUYER_ORG, role=Role.BUYER, ttl_s=7 * 86400).token,
        "auditor": instance.issue_token(sub="audit-wang", org=HOSPITAL_ORG, role=Role.AUDITOR,
                                        ttl_s=7 * 86400).token,
    }
    instance.close()
    return {**summary, "tokens": tokens}
