"""Catalog endpoints: stewards register datasets and versions; everyone reads the public card."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from sandbox.api import schemas
from sandbox.api.deps import AnyRole, InstanceDep, Steward
from sandbox.api.uploads import receive_multipart
from sandbox.auth.tokens import Principal, Role
from sandbox.catalog import service
from sandbox.catalog.cards import DatasetCard
from sandbox.catalog.registration import Remediation
from sandbox.errors import Invalid, NotFound
from sandbox.worker_socket import LONG_TIMEOUT_S, ask_worker, principal_body, require_worker

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=201, response_model=schemas.DatasetView, response_model_exclude_unset=True)
def create_dataset(card: DatasetCard, instance: InstanceDep, steward: Steward) -> dict[str, Any]:
    with instance.context(steward) as ctx:
        dataset = service.create_dataset(ctx, card)
        return service.dataset_view(dataset, steward=True)


@router.get("", response_model=list[schemas.DatasetView],
            responses={304: {"description": "Not modified: the catalog still has the ETag given in If-None-Match"}})
def list_datasets(request: Request, instance: InstanceDep, principal: AnyRole) -> Response:
    with instance.read_session() as session:
        steward_of = principal.org if principal.role is Role.STEWARD else None
        body, etag = service.catalog_listing(session, steward_of=steward_of)
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


@router.get("/{name}", response_model=schemas.DatasetView, response_model_exclude_unset=True)
def get_dataset(name: str, instance: InstanceDep, principal: AnyRole) -> dict[str, Any]:
    with instance.read_session() as session:
        dataset = service.get_dataset(session, name)
        return service.dataset_view(dataset, steward=service.steward_view_for(principal, dataset))


class ReferenceVersionView(schemas.DatasetVersionView):
    """A files dataset's new version: its manifest's view, the number of files and the folder read in place."""

    files: int | None = None
    reference: str | None = None


class ReferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reference: str = Field(min_length=1, max_length=1000)


@router.post("/{name}/versions", status_code=201, response_model=ReferenceVersionView,
             response_model_exclude_unset=True,
             openapi_extra={"requestBody": {"content": {
                 "multipart/form-data": {"schema": {"type": "object", "properties": {
                     "file": {"type": "string", "format": "binary"}}}},
                 "application/json": {"schema": ReferenceRequest.model_json_schema()}}}})
async def add_version(name: str, request: Request, instance: InstanceDep, steward: Steward) -> dict[str, Any]:
    """Stage the upload, then let the worker read, check and store it: this process opens no dataset file.

    A files dataset's version is JSON `{"reference": PATH}` instead: a folder under the org's configured
    reference roots, which the worker hashes and reads in place, never copying it."""
    settings = instance.settings
    with instance.read_session() as session:
        # Before the body is read: another org's steward uploads nothing (404, as for a missing name).
        kind = service.owned_dataset(session, name, steward).kind
    is_json = request.headers.get("content-type", "").split(";")[0].strip() == "application/json"
    if kind == "files" or is_json:
        if kind != "files":
            raise Invalid(f"dataset {name!r} is a table dataset: upload its versions as a file")
        if not is_json:
            raise Invalid(f"dataset {name!r} is a files dataset: register its versions as JSON {{\"reference\": PATH}}")
        try:
            reference = ReferenceRequest.model_validate_json(await request.body())
        except ValueError as exc:
            raise Invalid("the body must be JSON {\"reference\": PATH}") from exc
        require_worker(instance, what="registering a version")
        return await run_in_threadpool(
            ask_worker, instance, "/datasets/reference-versions",
            {"principal": principal_body(steward), "dataset": name, "reference": reference.reference},
            timeout_s=LONG_TIMEOUT_S, what="registering a version")
    require_worker(instance, what="registering a version")
    upload = await receive_multipart(request, file_fields={"file"}, staging_dir=settings.tmp_dir,
                                     max_file_bytes=settings.max_upload_bytes)
    try:
        if "file" not in upload.files:
            raise Invalid("the upload needs a part named 'file'")
        uploaded = upload.files["file"]
        # The worker also warms the new version up (leak-scan fingerprints, the DP ranked copy).
        return await run_in_threadpool(
            ask_worker, instance, "/datasets/versions",
            {"principal": principal_body(steward), "dataset": name, "upload": str(uploaded.path),
             "filename": uploaded.filename, "upload_sha256": uploaded.sha256, "size_bytes": uploaded.size},
            timeout_s=LONG_TIMEOUT_S, what="registering a version")
    finally:
        upload.discard()


@router.post("/drafts", response_model=schemas.CardDraftView,
             summary="Draft a card from a file (the steward's eyes only; nothing is stored)")
async def draft_card(request: Request, instance: InstanceDep, steward: Steward) -> dict[str, Any]:
    """Multipart `file` (any registrable format), optional `dictionary` (CSV or Excel data dictionary), and
    fields `name` and `fhir_mapping` (JSON, for FHIR NDJSON). The proposed types, bounds and categories come
    from the data: they are returned to this steward alone and become metadata only in a card they create."""
    settings = instance.settings
    require_worker(instance, what="drafting a card")
    upload = await receive_multipart(request, file_fields={"file", "dictionary"}, staging_dir=settings.tmp_dir,
                                     max_file_bytes=settings.max_upload_bytes)
    try:
        if "file" not in upload.files:
            raise Invalid("the upload needs a part named 'file'")
        mapping = None
        if upload.fields.get("fhir_mapping"):
            try:
                mapping = json.loads(upload.fields["fhir_mapping"])
            except ValueError as exc:
                raise Invalid(f"fhir_mapping is not JSON: {exc}") from exc
        dictionary = upload.files.get("dictionary")
        body: dict[str, Any] = {
            "principal": principal_body(steward), "name": upload.fields.get("name", ""),
            "upload": str(upload.files["file"].path), "filename": upload.files["file"].filename,
            "fhir_mapping": mapping}
        if dictionary is not None:
            body.update(dictionary=str(dictionary.path), dictionary_filename=dictionary.filename)
        return await run_in_threadpool(ask_worker, instance, "/datasets/drafts", body, timeout_s=LONG_TIMEOUT_S,
                                       what="drafting a card")
    finally:
        upload.discard()


def _owned_version(instance: Any, name: str, version: int, steward: Principal) -> Any:
    with instance.read_session() as session:
        return service.steward_version(service.owned_dataset(session, name, steward), version)


@router.get("/{name}/versions/{version}/deid", response_model=schemas.DeidReportView,
            summary="A version's de-identification report (owning org's stewards)")
def deid_report(name: str, version: int, instance: InstanceDep, steward: Steward) -> dict[str, Any]:
    stored = _owned_version(instance, name, version, steward)
    if stored.deid is None:
        raise NotFound(f"{name} version {version} was registered before de-identification reports")
    return {"dataset": name, "version": version, "status": stored.status, **stored.deid}


@router.get("/{name}/versions/{version}/diff", response_model=schemas.VersionDiffView,
            summary="What changed since the previous version (stewards only)")
def version_diff(name: str, version: int, instance: InstanceDep, steward: Steward) -> dict[str, Any]:
    stored = _owned_version(instance, name, version, steward)
    if stored.diff is None:
        raise NotFound(f"{name} version {version} has no previous version to compare with")
    return {"dataset": name, "version": version, **stored.diff}


@router.post("/{name}/versions/{version}/remediate", status_code=201, response_model=schemas.DatasetVersionView,
             response_model_exclude_unset=True)
async def remediate_version(name: str, version: int, remediation: Remediation, instance: InstanceDep,
                            steward: Steward) -> dict[str, Any]:
    """Fix a blocked version: drop columns, generalise quasi-identifiers, or accept the report's suggestions.
    The card changes for this and every later version, and the fixed data is checked again as a new version."""
    with instance.read_session() as session:
        service.owned_dataset(session, name, steward)
    require_worker(instance, what="remediating a version")
    return await run_in_threadpool(
        ask_worker, instance, "/datasets/remediate",
        {"principal": principal_body(steward), "dataset": name, "version": version,
         "remediation": remediation.model_dump(mode="json")}, timeout_s=LONG_TIMEOUT_S, what="remediating a version")


class OverrideRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=10, max_length=5000)


@router.post("/{name}/versions/{version}/override", response_model=schemas.DatasetVersionView,
             response_model_exclude_unset=True)
async def override_version(name: str, version: int, override: OverrideRequest, instance: InstanceDep,
                           steward: Steward) -> dict[str, Any]:
    """Let a blocked version through on this steward's signed word, where the policy allows an override."""
    with instance.read_session() as session:
        service.owned_dataset(session, name, steward)
    require_worker(instance, what="overriding a version's block")
    return await run_in_threadpool(
        ask_worker, instance, "/datasets/override",
        {"principal": principal_body(steward), "dataset": name, "version": version, "reason": override.reason},
        timeout_s=LONG_TIMEOUT_S, what="overriding a version's block")
