"""Catalog operations: register datasets, add versions, and show the public view."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sandbox.auth.orgs import owns
from sandbox.auth.tokens import Principal, Role
from sandbox.budgets.ledger import ensure_dataset_budget
from sandbox.catalog import registration, signing
from sandbox.catalog.cards import DatasetCard, card_errors, public_schema
from sandbox.catalog.ingest import IngestedVersion, ingest_version
from sandbox.context import Context
from sandbox.errors import Conflict, Invalid, NotFound
from sandbox.policies import resolve_policy
from sandbox.store.models import Dataset, DatasetVersion

ACTIVE, BLOCKED, SUPERSEDED = "active", "blocked", "superseded"


def create_dataset(ctx: Context, card: DatasetCard) -> Dataset:
    steward = ctx.require_role(Role.STEWARD)
    errors = card_errors(card)
    if errors:
        raise Invalid("the dataset card is invalid", errors)
    if ctx.session.execute(select(Dataset.id).where(Dataset.name == card.name)).first():
        raise Conflict(f"dataset {card.name!r} already exists")
    # The policy that will judge each version's de-identification report must exist and be approved now.
    resolve_policy(ctx.session, card.registration_policy, org=steward.org)
    dataset = Dataset(
        name=card.name,
        title=card.title,
        description=card.description,
        card=card.model_dump(mode="json"),
        privacy_unit=card.privacy_unit,
        privacy_unit_rows=card.privacy_unit_rows,
        kind=card.kind,
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
    report: dict[str, Any] | None = None,
    diff: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    reference: str | None = None,
) -> DatasetVersion:
    """Commit a staged Parquet file as the dataset's next immutable version.

    For a files dataset the Parquet is the collection's manifest and `reference` the folder it lists,
    read in place (`sandbox.catalog.collections`).

    With a de-identification `report` that blocks, the version is kept in quarantine (`blocked`): no job,
    query, notebook or buyer sees it until a steward remediates it or signs an override. Otherwise it is
    `active` and signed by the owner org's key.
    """
    steward = ctx.require_role(Role.STEWARD)
    # Row lock on PostgreSQL; SQLite's write lock is already held. Two uploads never share a number.
    dataset = owned_dataset(ctx.session, name, steward, for_update=True)
    require_kind(dataset, "files" if reference is not None else "table")
    latest = dataset.all_versions[-1] if dataset.all_versions else None
    if latest is not None and latest.sha256 == sha256:
        raise Conflict(f"this file is identical to {name} version {latest.version}"
                       + ("" if latest.status == ACTIVE else f" ({latest.status})"))
    number = (latest.version if latest else 0) + 1
    blocked = bool(report and report.get("blocked"))
    final = version_path(ctx.settings.artifacts_dir, name, number, quarantine=blocked)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # A file without a row: a crash between rename and commit. The row is the truth.
        final.unlink()
    os.replace(staged, final)
    os.chmod(final, 0o400 if blocked else 0o444)
    transforms = {key: value for key, value in (("dropped", ingested.dropped), ("generalised", ingested.generalised),
                                                ("encoding", ingested.encoding)) if value}
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
        status=BLOCKED if blocked else ACTIVE,
        deid=report,
        diff=diff,
        provenance={"nonce": secrets.token_hex(32), **transforms, **(provenance or {})},
        reference=reference,
    )
    ctx.session.add(version)
    ctx.session.flush()
    if not blocked:
        sign(ctx, dataset, version)
    ctx.record(
        "dataset.version.add", "dataset_version", f"{name}@{number}",
        sha256=sha256, upload_sha256=upload_sha256, rows=ingested.rows, format=ingested.source_format,
        status=version.status, **({"deid_sha256": registration.report_sha256(report)} if report else {}),
        **({"reasons": [r["check"] for r in report.get("reasons", [])]} if report else {}),
    )
    return version


def require_kind(dataset: Dataset, kind: str) -> None:
    """Refuse (422) a version of the other kind: a file upload to a files dataset, a reference to a table."""
    if dataset.kind != kind:
        how = "registered by reference to a folder" if dataset.kind == "files" else "uploaded as a file"
        raise Invalid(f"dataset {dataset.name!r} is a {dataset.kind} dataset: its versions are {how}")


def version_path(artifacts_dir: Path, name: str, number: int, *, quarantine: bool) -> Path:
    """Where a version's Parquet lives: a blocked one in the dataset's quarantine folder, which nothing mounts."""
    folder = artifacts_dir / "datasets" / name
    return (folder / "quarantine" if quarantine else folder) / f"v{number}.parquet"


def sign(ctx: Context, dataset: Dataset, version: DatasetVersion) -> None:
    """The owner org's signature over the version's statement (`sandbox.catalog.signing`)."""
    card = card_of(dataset)
    statement = signing.version_statement(
        dataset=dataset.name, version=version.version, org=dataset.owner_org, sha256=version.sha256,
        upload_sha256=str(version.schema.get("upload_sha256")), rows=version.rows, licence=card.licence,
        deid_sha256=registration.report_sha256(version.deid) if version.deid else None,
        created_at=version.created_at, nonce=bytes.fromhex(version.provenance["nonce"]))
    version.signature = signing.sign_version(ctx.settings.keys_dir, dataset.owner_org, statement)


def blocked_version(session: Session, name: str, number: int, principal: Principal, *,
                    for_update: bool = True) -> DatasetVersion:
    """A steward's blocked version, locked for the change unless `for_update` is False (a read-only look
    before the work); 409 when it is not blocked (any more)."""
    dataset = owned_dataset(session, name, principal, for_update=for_update)
    version = steward_version(dataset, number)
    if version.status != BLOCKED:
        raise Conflict(f"{name} version {number} is {version.status}, not blocked")
    return version


def steward_version(dataset: Dataset, number: int) -> DatasetVersion:
    """Any version of an owned dataset, blocked and superseded ones included."""
    for candidate in dataset.all_versions:
        if candidate.version == number:
            return candidate
    raise NotFound(f"dataset {dataset.name!r} has no version {number}")


def override_version(ctx: Context, *, name: str, number: int, reason: str) -> DatasetVersion:
    """Let a blocked version through on a steward's signed word, where the policy allows it."""
    steward = ctx.require_role(Role.STEWARD)
    reason = reason.strip()
    if len(reason) < 10:
        raise Invalid("an override needs a reason a reviewer can read (at least 10 characters)")
    version = blocked_version(ctx.session, name, number, steward)
    report = dict(version.deid or {})
    registration.check_overridable(report)
    quarantined = ctx.settings.artifacts_dir / version.path
    final = version_path(ctx.settings.artifacts_dir, name, number, quarantine=False)
    override: dict[str, Any] = {
        "by": steward.sub, "org": steward.org, "reason": reason, "at": datetime.now(UTC).isoformat(),
        "overrides": [r["check"] for r in report.get("reasons", [])],
        "report_sha256": registration.report_sha256(report)}
    # The steward's word, signed with their org's key: the org, not only the platform, vouches for it.
    override["signed"] = signing.sign_version(ctx.settings.keys_dir, steward.org, dict(override))
    version.deid = {**report, "override": override}
    version.status = ACTIVE
    version.path = str(final.relative_to(ctx.settings.artifacts_dir))
    if quarantined.exists() or not final.exists():
        # (A crash between this move and the commit leaves the file moved and the row blocked: go on.)
        os.replace(quarantined, final)
    os.chmod(final, 0o444)
    ctx.session.flush()
    sign(ctx, version.dataset, version)
    ctx.record("dataset.version.override", "dataset_version", f"{name}@{number}", reason=reason,
               overrides=override["overrides"], report_sha256=override["report_sha256"])
    return version


def update_card(ctx: Context, dataset: Dataset, card: DatasetCard, *, why: str) -> None:
    """Replace an owned dataset's card (remediation drops and generalises columns); audited with the change."""
    before = set(dataset.columns)
    dataset.card = card.model_dump(mode="json")
    dataset.columns = {name: spec.model_dump(mode="json") for name, spec in card.columns.items()}
    dataset.title, dataset.description = card.title, card.description
    ctx.record("dataset.card.update", "dataset", dataset.name, why=why,
               removed_columns=sorted(before - set(card.columns)), drop_columns=card.drop_columns,
               generalise={c: r.model_dump(mode="json", exclude_none=True) for c, r in card.generalise.items()})


def supersede(ctx: Context, version: DatasetVersion, *, by: int) -> Path:
    """Mark a blocked version replaced by version `by`; returns its quarantined file, to delete after commit."""
    version.status = SUPERSEDED
    version.provenance = {**version.provenance, "superseded_by": by}
    ctx.record("dataset.version.supersede", "dataset_version", f"{version.dataset.name}@{version.version}", by=by)
    return ctx.settings.artifacts_dir / version.path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def version_view(version: DatasetVersion, *, steward: bool) -> dict[str, Any]:
    """A version as the catalog shows it: buyers see its number, date, signature and report summary.

    No digest of the stored Parquet (a buyer could test a guessed table against it) and no row count,
    exact or deterministically rounded (rounding boundaries, compared across weekly versions, give
    cohort sizes away; review 11.1). A buyer who needs a size asks a DP COUNT(*), paid from a budget.
    The signed release manifest keeps its own digests.

    The owner org's signature is shown to everyone: its statement commits to the data through a digest
    salted with a nonce only the owner's stewards see (`sandbox.catalog.signing`), so it traces a model
    to the exact version and licence without giving a buyer a digest to test guesses against.
    """
    view: dict[str, Any] = {"version": version.version, "created_at": version.created_at.isoformat()}
    if version.signature is not None:
        view["signature"] = signing.buyer_view(version.signature)
    deid = registration.summary(version.deid)
    if deid is not None:
        view["deid"] = deid
    if steward:
        view["status"] = version.status
        view["sha256"] = version.sha256
        view["rows"] = version.rows
        view["size_bytes"] = version.size_bytes
        view["source_format"] = version.source_format
        view["upload_sha256"] = version.schema.get("upload_sha256")
        view["provenance"] = version.provenance
    return view


def dataset_view(dataset: Dataset, *, steward: bool) -> dict[str, Any]:
    card = dataset.card
    versions = dataset.all_versions if steward else dataset.versions
    return {
        "name": dataset.name,
        "title": dataset.title,
        "description": dataset.description,
        "provenance": card.get("provenance", ""),
        "deidentification": card.get("deidentification", ""),
        "licence": card_of(dataset).licence.model_dump(mode="json"),
        "update_cadence": card.get("update_cadence", ""),
        "privacy_unit": dataset.privacy_unit,
        "privacy_unit_rows": dataset.privacy_unit_rows,
        "columns": dataset.columns if steward else public_schema(dataset.columns),
        "marginal_pairs": card.get("marginal_pairs", []),
        "quasi_identifiers": card.get("quasi_identifiers", []),
        # The newest usable version's report summary: k over the quasi-identifiers and the flagged columns.
        "deid": registration.summary(dataset.versions[-1].deid) if dataset.versions else None,
        "versions": [version_view(v, steward=steward) for v in versions],
        "created_at": dataset.created_at.isoformat(),
        "kind": dataset.kind,
        **({"collection": _public_collection(card)} if dataset.kind == "files" else {}),
    }


def _public_collection(card: dict[str, Any]) -> dict[str, Any]:
    """What a buyer may know of a collection: its formats and the size images are resized to for training."""
    collection = card.get("collection") or {}
    return {"formats": collection.get("formats", ["dicom"]), "image": collection.get("image") or {}}


def list_datasets(session: Session) -> list[Dataset]:
    return list(session.execute(select(Dataset).order_by(Dataset.name)).scalars())


# Rendered catalog entries per (store, dataset id, version count, active versions, audience). A card
# changes only with a new version (remediation) and a version's status only from blocked to active or
# superseded, so an entry with the same counts is still exact; only changed datasets are rendered again.
# The whole listing is reused while the table counts do not move.
_entries: dict[tuple[str, int, int, int, bool], bytes] = {}
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
        select(func.count(DatasetVersion.id)).where(DatasetVersion.status == ACTIVE).scalar_subquery(),
    )).one())
    cached = _listings.get((store, steward_of))
    if cached is not None and cached[0] == generation:
        return cached[1], cached[2]
    index = session.execute(
        select(Dataset.id, Dataset.owner_org, func.count(DatasetVersion.id),
               func.count(DatasetVersion.id).filter(DatasetVersion.status == ACTIVE))
        .outerjoin(DatasetVersion, DatasetVersion.dataset_id == Dataset.id)
        .group_by(Dataset.id, Dataset.name, Dataset.owner_org).order_by(Dataset.name)
    ).all()
    # The owner never changes, so an entry keyed by its audience stays exact.
    # A version's status changes (an override) without a new row: the active count keys that.
    keys = [(store, int(dataset_id), int(versions), int(active), steward_of is not None and owner == steward_of)
            for dataset_id, owner, versions, active in index]
    if len(_entries) + len(keys) > _MAX_ENTRIES:
        _entries.clear()
    fragments = {key: _entries.get(key) for key in keys}
    missing = {key[1]: key for key, fragment in fragments.items() if fragment is None}
    ids = list(missing)
    for start in range(0, len(ids), 500):
        for dataset in session.execute(select(Dataset).where(Dataset.id.in_(ids[start:start + 500]))).scalars():
            steward = missing[dataset.id][4]
            fragment = json.dumps(dataset_view(dataset, steward=steward), separators=(",", ":")).encode()
            fragments[missing[dataset.id]] = _entries[missing[dataset.id]] = fragment
    body = b"[" + b",".join(fragment for fragment in fragments.values() if fragment is not None) + b"]"
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    if len(_listings) > 10_000:
        _listings.clear()
    _listings[(store, steward_of)] = (generation, body, etag)
    return body, etag
