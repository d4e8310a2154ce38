"""Publishing a version's DP mock: paid from the dataset's budget, recorded, audited, downloadable."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from sandbox.auth.tokens import Principal, Role
from sandbox.budgets import ledger
from sandbox.catalog.service import file_sha256, get_dataset, get_version
from sandbox.context import Context
from sandbox.contracts import contract_state
from sandbox.dp.mock import synthesize_mock
from sandbox.errors import Conflict, Forbidden, NotFound
from sandbox.instance import Instance
from sandbox.store.models import Contract, DatasetMock, DatasetVersion


def mock_path(artifacts: Path, dataset: str, version: int) -> Path:
    """Where a version's mock lives: beside the version, so /data can show it under the same name."""
    return artifacts / "datasets" / dataset / f"v{version}.mock.parquet"


def find_mock(session: object, version: DatasetVersion) -> DatasetMock | None:
    return session.execute(  # type: ignore[attr-defined, no-any-return]
        select(DatasetMock).where(DatasetMock.dataset_version_id == version.id)).scalar_one_or_none()


def publish_mock(instance: Instance, steward: Principal, *, dataset: str, version: int | None,
                 epsilon: float) -> dict[str, object]:
    """Build the mock of a version from DP marginals, charging `epsilon` to the dataset's budget."""
    with instance.context(steward) as ctx:
        ctx.require_role(Role.STEWARD)
        record = get_dataset(ctx.session, dataset)
        chosen = get_version(ctx.session, dataset, version)
        if find_mock(ctx.session, chosen) is not None:
            raise Conflict(f"{dataset}@{chosen.version} already has a mock; versions and their mocks are immutable")
        # Held before the noise is drawn, like any query; released below if the build fails.
        ledger.add_mock_spend(ctx.session, dataset, epsilon)
        card, source, version_id, number = record.card, chosen.path, chosen.id, chosen.version
    artifacts = instance.settings.artifacts_dir
    destination = mock_path(artifacts, dataset, number)
    staged = destination.with_name(f".{uuid.uuid4().hex}.mock.parquet")
    try:
        report = synthesize_mock(artifacts / source, card, epsilon=epsilon, destination=staged)
        os.replace(staged, destination)
        os.chmod(destination, 0o444)
    except BaseException:
        staged.unlink(missing_ok=True)
        with instance.context(steward) as ctx:
            ledger.refund_mock_spend(ctx.session, dataset, epsilon)
        raise
    with instance.context(steward) as ctx:
        mock = DatasetMock(dataset_version_id=version_id, path=str(destination.relative_to(artifacts)),
                           sha256=file_sha256(destination), rows=report.rows, epsilon=report.epsilon,
                           report={"marginals": report.marginals, "notes": report.notes},
                           created_by=steward.sub, created_at=datetime.now(UTC))
        ctx.session.add(mock)
        ctx.record("dataset.mock.publish", "dataset_version", f"{dataset}@{number}", epsilon=epsilon,
                   rows=report.rows, sha256=mock.sha256)
        return mock_view(dataset, number, mock)


def mock_view(dataset: str, version: int, mock: DatasetMock) -> dict[str, object]:
    return {"dataset": dataset, "version": version, "rows": mock.rows, "epsilon": mock.epsilon,
            "sha256": mock.sha256, "marginals": mock.report.get("marginals", {}),
            "notes": mock.report.get("notes", []), "created_at": mock.created_at.isoformat()}


def mock_file(ctx: Context, dataset: str, version: int | None) -> tuple[DatasetMock, Path]:
    """The mock a caller may download: stewards, and buyers whose usable contract covers the dataset."""
    principal = ctx.require_role(Role.STEWARD, Role.BUYER)
    chosen = get_version(ctx.session, dataset, version)
    if principal.role is Role.BUYER:
        contracts = ctx.session.execute(select(Contract).where(Contract.buyer_org == principal.org)).scalars()
        if not any(contract_state(c) == "active" and dataset in c.datasets for c in contracts):
            raise Forbidden(f"no active contract of {principal.org} covers {dataset!r}", object=dataset)
    mock = find_mock(ctx.session, chosen)
    if mock is None:
        raise NotFound(f"{dataset}@{chosen.version} has no DP mock yet (a steward publishes it)")
    ctx.record("dataset.mock.download", "dataset_version", f"{dataset}@{chosen.version}", sha256=mock.sha256)
    return mock, ctx.settings.artifacts_dir / mock.path
