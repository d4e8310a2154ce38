"""Catalog operations: register datasets, add versions, and show the public view."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sandbox.auth.orgs import owns
from sandbox.auth.tokens import Principal, Role
from sandbox.budgets.ledger import ensure_dataset_budget
from sandbox.catalog.cards import DatasetCard, card_errors, public_schema
from sandbox.catalog.ingest import IngestedVersion, ingest_version
from sandbox.context import Context
from sandbox.errors import Conflict, Invalid, NotFound
from sandbox.store.models import Dataset, DatasetVersion


def create_dataset(ctx: Context, card: DatasetCard) -> Dataset:
    steward = ctx.require_role(Role.STEWARD)
    errors = card_errors(card)
    if errors:
        raise Invalid("the dataset card is invalid", errors)
    if ctx.session.execute(select(Dataset.id).where(Dataset.name == card.name)).first():
        raise Conflict(f"dataset {card.name!r} already exists")
    dataset = Dataset(
        name=card.name,
        title=card.title,
        description=card.description,
        card=card.model_dump(mode="json"),
        privacy_unit=card.privacy_unit,
        privacy_unit_rows=card.privacy_unit_rows,
        columns={name: spec.model_dump(mode="json") for name, spec in card.columns.items()},
        owner_org=steward.org,
        created_by=steward.sub,
        created_at=datetime.now(UTC),
    )
    ctx.session.add(dataset)
    ctx.session.flush()
    ensure_dataset_budget(ctx.session, card.name)
    ctx.record("dataset.create", "dataset", card.name, columns=sorted(card.columns))
    return dataset


def get_dataset(session: Session, name: str, *, for_update: bool = False) -> Dataset:
    query = select(Dataset).where(Dataset.name == name)
    if for_update:
        query = query.with_for_update()
    dataset = session.execute(query).scalar_one_or_none()
    if dataset is None:
        raise NotFound(f"dataset {name!r} does not exist")
    return dataset


def owned_dataset(session: Session, name: str, principal: Principal, *, for_update: bool = False) -> Dataset:
    """A dataset that `principal` acts on as a steward of its owner org; any other is 'not found',
    as a missing one is, so a steward of another org learns nothing from the refusal."""
    query = select(Dataset).where(Dataset.name == name)
    if for_update:
        query = query.with_for_update()
    dataset = session.execute(query).scalar_one_or_none()
    if dataset is None or not owns(principal, dataset.owner_org):
        raise NotFound(f"dataset {name!r} does not exist")
    return dataset


def steward_view_for(principal: Principal, dataset: Dataset) -> bool:
    """Whether `principal` sees the steward's view of `dataset` (digests, row counts, every bound):
    only stewards of its owner org; anyone else, stewards of other orgs too, sees the buyer's view."""
    return owns(principal, dataset.owner_org)


def get_version(session: Session, name: str, version: int | None = None) -> DatasetVersion:
    """A dataset's version `version`, or its newest when None."""
    dataset = get_dataset(session, name)
    if not dataset.versions:
        raise NotFound(f"dataset {name!r} has no versions yet")
    if version is None:
        return dataset.versions[-1]
    for candidate in dataset.versions:
        if candidate.version == version:
            return candidate
    raise NotFound(f"dataset {name!r} has no version {version}")


def card_of(dataset: Dataset) -> DatasetCard:
    return DatasetCard.model_validate(dataset.card)


def prepare_version(
    settings_tmp: Path, card: DatasetCard, upload: Path, filename: str
) -> tuple[Path, IngestedVersion, str]:
    """Validate and convert an upload outside any transaction (it can take a while)."""
    settings_tmp.mkdir(parents=True, exist_ok=True)
    staged = settings_tmp / f"version-{uuid.uuid4().hex}.parquet"
    try:
        ingested = ingest_version(card, upload, filename, staged)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return staged, ingested, file_sha256(staged)


def add_version(
    ctx: Context,
    *,
    name: str,
    staged: Path,
    ingested: IngestedVersion,
    sha256: str,
    upload_sha256: str,
    size_bytes: int,
) -> DatasetVersion:
    """Commit a staged Parquet file as the dataset's next immutable version."""
    steward = ctx.require_role(Role.STEWARD)
    # Row lock on PostgreSQL; SQLite's write lock is already held. Two uploads never share a number.
    dataset = owned_dataset(ctx.session, name, steward, for_update=True)
    if dataset.versions and dataset.versions[-1].sha256 == sha256:
        raise Conflict(f"this file is identical to {name} version {dataset.versions[-1].version}")
    number = (dataset.versions[-1].version if dataset.versions else 0) + 1
    final = ctx.settings.artifacts_dir / "datasets" / name / f"v{number}.parquet"
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # A file without a row: a crash between rename and commit. The row is the truth.
        final.unlink()
    os.replace(staged, final)
    os.chmod(final, 0o444)
    version = DatasetVersion(
        dataset_id=dataset.id,
        version=number,
        sha256=sha256,
        rows=ingested.rows,
        size_bytes=final.stat().st_size,
        schema={"columns": ingested.schema, "upload_sha256": upload_sha256, "upload_bytes": size_bytes},
        path=str(final.relative_to(ctx.settings.artifacts_dir)),
        source_format=ingested.source_format,
        created_by=steward.sub,
        created_at=datetime.now(UTC),
    )
    ctx.session.add(version)
    ctx.session.flush()
    ctx.record(
        "dataset.version.add", "dataset_version", f"{name}@{number}",
        sha256=sha256, upload_sha256=upload_sha256, rows=ingested.rows, format=ingested.source_format,
    )
    return version


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def version_view(version: DatasetVersion, *, steward: bool) -> dict[str, Any]:
    """A version as the catalog shows it: buyers see only its number and date.

    No digest of the stored Parquet (a buyer could test a guessed table against it) and no row count,
    exact or deterministically rounded (rounding boundaries, compared across weekly versions, give
    cohort sizes away; review 11.1). A buyer who needs a size asks a DP COUNT(*), paid from a budget.
    The signed release manifest keeps its own digests.
    """
    view: dict[str, Any] = {"version": version.version, "created_at": version.created_at.isoformat()}
    if steward:
        view["sha256"] = version.sha256
        view["rows"] = version.rows
        view["size_bytes"] = version.size_bytes
        view["source_format"] = version.source_format
        view["upload_sha256"] = version.schema.get("upload_sha256")
    return view


def dataset_view(dataset: Dataset, *, steward: bool) -> dict[str, Any]:
    card = dataset.card
    return {
        "name": dataset.name,
        "title": dataset.title,
        "description": dataset.description,
        "provenance": card.get("provenance", ""),
        "deidentification": card.get("deidentification", ""),
        "licence": card.get("licence", ""),
        "update_cadence": card.get("update_cadence", ""),
        "privacy_unit": dataset.privacy_unit,
        "privacy_unit_rows": dataset.privacy_unit_rows,
        "columns": dataset.columns if steward else public_schema(dataset.columns),
        "marginal_pairs": card.get("marginal_pairs", []),
        "versions": [version_view(v, steward=steward) for v in dataset.versions],
        "created_at": dataset.created_at.isoformat(),
    }


def list_datasets(session: Session) -> list[Dataset]:
    return list(session.execute(select(Dataset).order_by(Dataset.name)).scalars())


# Rendered catalog entries per (store, dataset id, version count, audience). Datasets and versions
# are insert-only, so an entry with the same version count is still exact; only new datasets or
# versions are rendered again. The whole listing is reused while the table counts do not move.
_entries: dict[tuple[str, int, int, bool], bytes] = {}
_listings: dict[tuple[str, str | None], tuple[tuple[Any, ...], bytes, str]] = {}
_MAX_ENTRIES = 200_000


def catalog_listing(session: Session, *, steward_of: str | None) -> tuple[bytes, str]:
    """The catalog as JSON bytes and its ETag, rendering only datasets that are new or changed.

    `steward_of` is the org of a steward caller: its own datasets get the steward's view, every other
    dataset the buyer's (review 11.10); None gives everything the buyer's view.
    """
    store = str(session.get_bind().engine.url)
    generation = tuple(session.execute(select(
        select(func.count(Dataset.id)).scalar_subquery(), select(func.max(Dataset.id)).scalar_subquery(),
        select(func.count(DatasetVersion.id)).scalar_subquery(),
        select(func.max(DatasetVersion.id)).scalar_subquery(),
    )).one())
    cached = _listings.get((store, steward_of))
    if cached is not None and cached[0] == generation:
        return cached[1], cached[2]
    index = session.execute(
        select(Dataset.id, Dataset.owner_org, func.count(DatasetVersion.id))
        .outerjoin(DatasetVersion, DatasetVersion.dataset_id == Dataset.id)
        .group_by(Dataset.id, Dataset.name, Dataset.owner_org).order_by(Dataset.name)
    ).all()
    # The owner never changes, so an entry keyed by its audience stays exact.
    keys = [(store, int(dataset_id), int(versions), steward_of is not None and owner == steward_of)
            for dataset_id, owner, versions in index]
    if len(_entries) + len(keys) > _MAX_ENTRIES:
        _entries.clear()
    fragments = {key: _entries.get(key) for key in keys}
    missing = {key[1]: key for key, fragment in fragments.items() if fragment is None}
    ids = list(missing)
    for start in range(0, len(ids), 500):
        for dataset in session.execute(select(Dataset).where(Dataset.id.in_(ids[start:start + 500]))).scalars():
            steward = missing[dataset.id][3]
            fragment = json.dumps(dataset_view(dataset, steward=steward), separators=(",", ":")).encode()
            fragments[missing[dataset.id]] = _entries[missing[dataset.id]] = fragment
    body = b"[" + b",".join(fragment for fragment in fragments.values() if fragment is not None) + b"]"
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    if len(_listings) > 10_000:
        _listings.clear()
    _listings[(store, steward_of)] = (generation, body, etag)
    return body, etag
