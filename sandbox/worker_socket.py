"""The worker's local service: what the API process asks of the data side, over the worker's Unix socket.

The API process holds no data. It checks a request against the store, then forwards whatever must read
a dataset file to this service, which runs beside the data: DP queries, DP mock publication, a new
version's ingestion, checks (de-identification report, difference from the last version) and warm-up,
remediations and overrides of blocked versions, and cards drafted from a file. The service starts with
`sandbox worker` and with the embedded worker of `sandbox serve`, before Docker and without it, so DP
queries work while the engine is down.

The socket is 0600: only the service's own user (the API process) may connect, and the API passes the
principal it verified. Other modules add routes with `@worker_route("/notebooks/...")` in a module named in
`ROUTE_MODULES`, or pass `extra_routes` to `serve_worker_socket`.
"""

from __future__ import annotations

import importlib
import shutil
import threading
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from sandbox.auth.tokens import Principal, Role
from sandbox.catalog import collections, registration, service
from sandbox.catalog.cards import DatasetCard
from sandbox.catalog.diff import version_diff
from sandbox.catalog.drafting import draft_card
from sandbox.catalog.ingest import IngestedVersion
from sandbox.dp import mock_publication, queries
from sandbox.egress.content import ensure_fingerprints
from sandbox.errors import Conflict, Forbidden, Invalid, NotFound
from sandbox.instance import Instance
from sandbox.local_http import Handler, LocalHttpServer, WorkerUnavailable, call, worker_socket
from sandbox.logs import get_logger
from sandbox.policies import resolve_policy

log = get_logger("sandbox.worker_socket")

WorkerRoute = Callable[[Instance, dict[str, Any]], dict[str, Any]]

# Modules whose import registers more routes with `worker_route` (imported when the service starts).
ROUTE_MODULES: tuple[str, ...] = ("sandbox.notebooks.exports",)

_ROUTES: dict[str, WorkerRoute] = {}

# How long the API waits for each kind of answer. A query may wait for an identical one in flight.
QUERY_TIMEOUT_S = queries.WAIT_FOR_IDENTICAL_S + 60
LONG_TIMEOUT_S = 3600.0  # ingesting a large upload, drawing a mock, ranking a version


def worker_route(path: str) -> Callable[[WorkerRoute], WorkerRoute]:
    """Serve `path` on every worker's local service with the decorated `handler(instance, body)`."""

    def register(handler: WorkerRoute) -> WorkerRoute:
        if path in _ROUTES and _ROUTES[path] is not handler:
            raise ValueError(f"worker route {path} is registered twice")
        _ROUTES[path] = handler
        return handler

    return register


def serve_worker_socket(instance: Instance, *, extra_routes: Mapping[str, WorkerRoute] | None = None,
                        ) -> LocalHttpServer:
    """Serve the worker's local service for `instance` at `worker_socket(...)`, from a thread; no Docker needed."""
    for module in ROUTE_MODULES:
        importlib.import_module(module)
    routes = {**_ROUTES, **(extra_routes or {})}
    # Budget that a killed worker held mid-query goes back before this one answers.
    queries.settle_abandoned_reservations(instance)
    path = worker_socket(instance.settings.dp_socket_root, instance.instance_id)
    # The instance's folder also holds the jobs' DP socket folders: its mode stays as it was (0755).
    server = LocalHttpServer(path, {route: _bound(instance, handler) for route, handler in routes.items()},
                             mode=0o600, folder_mode=0o755, peer_name="api")
    log.info("worker_socket_serving", path=str(path), routes=sorted(routes))
    return server


def _bound(instance: Instance, handler: WorkerRoute) -> Handler:
    return lambda body: handler(instance, body)


def ask_worker(instance: Instance, route: str, body: dict[str, Any], *, timeout_s: float = 60.0,
               what: str = "this request") -> dict[str, Any]:
    """The API side: POST `body` to the worker's `route`; a refusal there is raised here unchanged."""
    return call(worker_socket(instance.settings.dp_socket_root, instance.instance_id), route, body,
                timeout_s=timeout_s,
                unavailable=f"{what} runs beside the data in the worker, which is not running; nothing was done")


def require_worker(instance: Instance, *, what: str) -> None:
    """Refuse now (503) when no worker serves this instance: before an upload is read, say."""
    path = worker_socket(instance.settings.dp_socket_root, instance.instance_id)
    if not path.exists():
        raise WorkerUnavailable(f"{what} runs beside the data in the worker, which is not running (no socket at "
                                f"{path}); start `sandbox worker`")


# The principal the API verified, as it travels ------------------------------------------------------

def principal_body(principal: Principal) -> dict[str, str]:
    return {"sub": principal.sub, "org": principal.org, "role": principal.role.value, "jti": principal.jti,
            "issuer": principal.issuer, "expires_at": principal.expires_at.isoformat()}


def principal_of(body: dict[str, Any]) -> Principal:
    fields = body.get("principal")
    if not isinstance(fields, dict):
        raise Invalid("the request names no principal")
    try:
        return Principal(sub=str(fields["sub"]), org=str(fields["org"]), role=Role(fields["role"]),
                         jti=str(fields["jti"]), issuer=str(fields["issuer"]),
                         expires_at=datetime.fromisoformat(str(fields["expires_at"])))
    except (KeyError, ValueError) as exc:
        raise Invalid(f"the principal is malformed: {exc}") from exc


# Routes -------------------------------------------------------------------------------------------

@worker_route("/dp/query")
def dp_query(instance: Instance, body: dict[str, Any]) -> dict[str, Any]:
    """`{principal, query: QueryRequest, via}` -> the answer `run_query` gives, or its refusal."""
    request = queries.QueryRequest.model_validate(body.get("query"))
    return queries.run_query(instance, principal_of(body), request, via=str(body.get("via", "api")))


@worker_route("/dp/mock")
def dp_mock(instance: Instance, body: dict[str, Any]) -> dict[str, Any]:
    """`{principal, dataset, version, epsilon}` -> the published mock's view."""
    version, epsilon = body.get("version"), body.get("epsilon")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise Invalid("version must be an integer")
    if not isinstance(epsilon, int | float) or isinstance(epsilon, bool):
        raise Invalid("epsilon must be a number")
    return mock_publication.publish_mock(instance, principal_of(body), dataset=str(body.get("dataset")),
                                         version=version, epsilon=float(epsilon))


@worker_route("/datasets/versions")
def dataset_version(instance: Instance, body: dict[str, Any]) -> dict[str, Any]:
    """`{principal, dataset, upload, filename, upload_sha256, size_bytes}`: validate the upload the API
    staged, check it (de-identification report, difference from the last version), store it as the
    dataset's next version, active or blocked, and warm an active one up in the background; -> its view."""
    steward, name = principal_of(body), str(body.get("dataset"))
    upload = _staged_upload(instance, body.get("upload"))
    with instance.read_session() as session:
        card = service.card_of(service.owned_dataset(session, name, steward))
    return _register(instance, steward, name, card, upload, str(body.get("filename", "")),
                     upload_sha256=str(body.get("upload_sha256")), size_bytes=int(body.get("size_bytes", 0)))


def _register(instance: Instance, steward: Principal, name: str, card: DatasetCard, upload: Path, filename: str,
              *, upload_sha256: str, size_bytes: int, remediates: int | None = None,
              remediation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read, check and store one version; with `remediates`, it replaces that blocked version and the
    remediated `card` becomes the dataset's card in the same transaction."""
    staged, ingested, sha256 = service.prepare_version(instance.settings.tmp_dir, card, upload, filename)
    discard: Path | None = None
    try:
        with instance.read_session() as session:
            dataset = service.get_dataset(session, name)
            policy = resolve_policy(session, card.registration_policy, org=dataset.owner_org)
            rules = registration.RegistrationRules.from_policy(f"{policy.name}@{policy.version}", policy.body)
            previous = dataset.versions[-1] if dataset.versions else None
        report = registration.assess(staged, card, rules)
        diff = None
        if previous is not None:
            diff = {"from_version": previous.version,
                    **version_diff(instance.settings.artifacts_dir / previous.path, staged, card)}
        with instance.context(steward) as ctx:
            provenance: dict[str, Any] = {"filename": Path(filename).name[:200]}
            if remediates is not None:
                replaced = service.blocked_version(ctx.session, name, remediates, steward)
                service.update_card(ctx, replaced.dataset, card, why=f"remediation of version {remediates}")
                provenance.update(derived_from=remediates, remediation=remediation or {})
            version = service.add_version(ctx, name=name, staged=staged, ingested=ingested, sha256=sha256,
                                          upload_sha256=upload_sha256, size_bytes=size_bytes, report=report,
                                          diff=diff, provenance=provenance)
            if remediates is not None:
                discard = service.supersede(ctx, replaced, by=version.version)
            view = service.version_view(version, steward=True)
    finally:
        staged.unlink(missing_ok=True)
    if discard is not None:
        # The replaced version's quarantined rows are not kept once a version has replaced them.
        discard.unlink(missing_ok=True)
    if view["status"] == service.ACTIVE:
        _warm_up_later(instance, name, view["version"])
    return view


@worker_route("/datasets/reference-versions")
def dataset_reference_version(instance: Instance, body: dict[str, Any]) -> dict[str, Any]:
    """`{principal, dataset, reference}`: walk, hash and read the collection folder in place (never copied),
    check its DICOM headers and its manifest, and store the manifest as the dataset's next version."""
    steward, name = principal_of(body), str(body.get("dataset"))
    settings = instance.settings
    with instance.read_session() as session:
        dataset = service.owned_dataset(session, name, steward)
        service.require_kind(dataset, "files")
        card = service.card_of(dataset)
        labels = _labels_manifest(instance, session, card, dataset.owner_org)
        policy = resolve_policy(session, card.registration_policy, org=dataset.owner_org)
        rules = registration.RegistrationRules.from_policy(f"{policy.name}@{policy.version}", policy.body)
        previous = dataset.versions[-1] if dataset.versions else None
        previous_manifest = settings.artifacts_dir / previous.path if previous is not None else None
        previous_number = previous.version if previous is not None else None
    folder = collections.resolve_reference(str(body.get("reference") or ""),
                                           settings.reference_roots.get(steward.org, []), org=steward.org)
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    staged = settings.tmp_dir / f"manifest-{uuid.uuid4().hex}.parquet"
    scanned = staged.with_suffix(".scan.parquet")
    try:
        collection = collections.build_manifest(folder, card, staged, labels=labels,
                                                threads=settings.collection_threads)
        tabular = registration.assess(collections.scannable_copy(staged, scanned), card, rules)
        report = registration.with_dicom(tabular, collection.dicom, rules)
        diff = None
        if previous_manifest is not None:
            diff = {"from_version": previous_number, **collections.manifest_diff(previous_manifest, staged)}
        schema = {field.name: str(field.type) for field in pq.read_schema(staged)}
        total_bytes = int(pq.read_table(staged, columns=["size_bytes"]).column("size_bytes").to_numpy().sum())
        sha256 = service.file_sha256(staged)
        with instance.context(steward) as ctx:
            version = service.add_version(
                ctx, name=name, staged=staged, sha256=sha256, upload_sha256=sha256, size_bytes=total_bytes,
                ingested=IngestedVersion(rows=collection.files, schema=schema, source_format="files"),
                report=report, diff=diff, provenance={"reference": str(folder)}, reference=str(folder))
            view = service.version_view(version, steward=True)
    finally:
        staged.unlink(missing_ok=True)
        scanned.unlink(missing_ok=True)
    if view["status"] == service.ACTIVE:
        _warm_up_later(instance, name, view["version"])
    return {**view, "files": view["rows"], "reference": str(folder)}


def _labels_manifest(instance: Instance, session: Any, card: DatasetCard, org: str) -> Path | None:
    """The stored Parquet of the latest active version of the tabular dataset the card takes labels from."""
    if card.collection is None or card.collection.labels is None:
        return None
    source = card.collection.labels.dataset
    try:
        labels = service.get_dataset(session, source)
    except NotFound:
        labels = None
    if labels is None or labels.owner_org != org or labels.kind != "table":
        raise Invalid(f"the labels dataset {source!r} is not a table dataset of org {org!r}")
    if not labels.versions:
        raise Invalid(f"the labels dataset {source!r} has no active version yet")
    return instance.settings.artifacts_dir / labels.versions[-1].path


@worker_route("/datasets/remediate")
def dataset_remediate(instance: Instance, body: dict[str, Any]) -> dict[str, Any]:
    """`{principal, dataset, version, drop, generalise, accept}`: a blocked version's fix, as a new version
    read again from its quarantined copy under the remediated card; -> the new version's view."""
    steward, name, number = principal_of(body), str(body.get("dataset")), _version_number(body)
    request = registration.Remediation.model_validate(body.get("remediation") or {})
    with instance.read_session() as session:
        blocked = service.blocked_version(session, name, number, steward, for_update=False)
        if blocked.dataset.kind == "files":
            raise Invalid(f"{name} version {number} is a file collection, read in place: fix the files in place "
                          f"and register a new version, or override where the policy allows")
        card = registration.remediated_card(service.card_of(blocked.dataset), blocked.deid or {}, drop=request.drop,
                                            generalise=request.generalise, accept=request.accept)
        quarantined = instance.settings.artifacts_dir / blocked.path
        upload_sha256 = str(blocked.schema.get("upload_sha256"))
    try:
        return _register(instance, steward, name, card, quarantined, quarantined.name, upload_sha256=upload_sha256,
                         size_bytes=quarantined.stat().st_size, remediates=number,
                         remediation=request.model_dump(mode="json", exclude_defaults=True))
    except FileNotFoundError as exc:  # another remediation replaced it (and removed its rows) meanwhile
        raise Conflict(f"{name} version {number} was remediated or overridden meanwhile") from exc


@worker_route("/datasets/override")
def dataset_override(instance: Instance, body: dict[str, Any]) -> dict[str, Any]:
    """`{principal, dataset, version, reason}`: a steward's signed override of a blocked version."""
    steward, name, number = principal_of(body), str(body.get("dataset")), _version_number(body)
    with instance.context(steward) as ctx:
        version = service.override_version(ctx, name=name, number=number, reason=str(body.get("reason") or ""))
        view = service.version_view(version, steward=True)
    _warm_up_later(instance, name, number)
    return view


@worker_route("/datasets/drafts")
def dataset_draft(instance: Instance, body: dict[str, Any]) -> dict[str, Any]:
    """`{principal, name, upload, filename, dictionary?, dictionary_filename?, fhir_mapping?}`: a card drafted
    from a file, for the steward alone; nothing is stored."""
    principal = principal_of(body)
    if principal.role is not Role.STEWARD:
        raise Forbidden("only stewards draft cards")
    upload = _staged_upload(instance, body.get("upload"))
    dictionary = _staged_upload(instance, body["dictionary"]) if body.get("dictionary") else None
    mapping = body.get("fhir_mapping")
    if mapping is not None and not isinstance(mapping, dict):
        raise Invalid("fhir_mapping must be a JSON object")
    workdir = instance.settings.tmp_dir / f"draft-{uuid.uuid4().hex}"
    workdir.mkdir(parents=True)
    try:
        return draft_card(upload, str(body.get("filename", "")), name=str(body.get("name") or "dataset"),
                          dictionary=dictionary, dictionary_filename=str(body.get("dictionary_filename", "")),
                          fhir_mapping=mapping, workdir=workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _warm_up_later(instance: Instance, name: str, version: int) -> None:
    # The leak scan's fingerprints and the DP ranked copy: built now, not on the first job or query.
    threading.Thread(target=_warm_up_quietly, args=(instance, name, version), daemon=True,
                     name="version-warm-up").start()


def _version_number(body: dict[str, Any]) -> int:
    """The request's `version`, which must be an integer (a JSON true is no version)."""
    version = body.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise Invalid("version must be an integer")
    return version


def _staged_upload(instance: Instance, named: object) -> Path:
    """The API's staged upload: a file it wrote in the instance's tmp folder, never a path elsewhere."""
    if not isinstance(named, str):
        raise Invalid("the request names no staged upload")
    path = Path(named).resolve()
    if path.parent != instance.settings.tmp_dir.resolve() or not path.name.startswith("upload-") \
            or not path.is_file():
        raise Invalid("the staged upload is not a file the API staged")
    return path


@worker_route("/datasets/warm-up")
def dataset_warm_up(instance: Instance, body: dict[str, Any]) -> dict[str, Any]:
    """`{dataset, version}`: build what a version needs before its first use, now; -> when it is done."""
    version = _version_number(body)
    warm_up(instance, str(body.get("dataset")), version)
    return {"dataset": body.get("dataset"), "version": version, "warm": True}


_WARMING: dict[tuple[str, str, int], threading.Lock] = {}
_WARMING_LOCK = threading.Lock()


def warm_up(instance: Instance, name: str, version: int) -> None:
    """The leak-scan fingerprints and the ranked copy for DP bounding of a version.

    One build per version at a time: a second caller (the route, while the upload's own warm-up runs)
    waits for the first and then finds both built, instead of building them again beside it.
    """
    with _WARMING_LOCK:
        lock = _WARMING.setdefault((instance.instance_id, name, version), threading.Lock())
    with lock:
        with instance.read_session() as session:
            card = service.get_dataset(session, name).card
            parquet = instance.settings.artifacts_dir / service.get_version(session, name, version).path
        ensure_fingerprints(instance.settings.artifacts_dir, name, version, parquet, card)
        queries.warm_up(instance, name, version)


def _warm_up_quietly(instance: Instance, name: str, version: int) -> None:
    """A failure only means the first job or query builds it."""
    try:
        warm_up(instance, name, version)
    except Exception as exc:
        log.warning("version_warm_up_failed", dataset=name, version=version, error=str(exc))
