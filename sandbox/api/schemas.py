"""The JSON shapes the HTTP API answers with, as pydantic models, so OpenAPI documents each one.

The views (`job_view`, `dataset_view`, `budget_view`, ...) still build plain dicts; a route names the
model its view matches in `response_model=`. Routes serialise with `response_model_exclude_unset=True`,
so a field a view leaves out for some callers (a steward-only field, an output's `spec`) stays absent on
the wire, while a field it sets to null stays null: the JSON holds what the view built, key for key
and value for value (numbers too: see `Number`), in the model's field order.

Shapes the code computes are exact (`extra="forbid"`): a view that grows a field fails its tests
loudly (a 500, logged as a ResponseValidationError naming the field) until the field is declared here,
rather than losing it silently.
JSON the store keeps from earlier releases (a check result, a release manifest, a cached DP answer,
a contract's quotas) is open (`extra="allow"`), so an older row still answers with everything it holds;
usage figures, whose keys differ from job to job, stay a plain mapping.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from sandbox.auth.tokens import Role
from sandbox.billing.prices import Item
from sandbox.catalog.cards import ColumnType
from sandbox.contracts import JobKind, Tier
from sandbox.egress.verdicts import Verdict
from sandbox.jobs.lifecycle import JobState
from sandbox.release.status import Origin, OutputStatus

# A JSON number kept as the view gave it: 1 stays 1 and 1.0 stays 1.0 (a bare `float` would turn
# the integer 1 into 1.0 on the wire).
Number = Annotated[float | int, WithJsonSchema({"type": "number"})]
Timestamp = Annotated[str, Field(description="ISO 8601 date and time")]


class Shape(BaseModel):
    """A shape the code computes: exactly these fields."""

    model_config = ConfigDict(extra="forbid")


class StoredShape(BaseModel):
    """A shape kept as JSON in the store: these fields, and whatever an older release stored beside them."""

    model_config = ConfigDict(extra="allow")


# Requests shared by several routes.

class Decision(BaseModel):
    """A steward's decision on a job or a policy version, with an optional comment."""

    comment: str = Field(default="", max_length=5000)


# Health.

class HealthWorker(Shape):
    """A worker as it last published itself (`sandbox.worker.Worker.publish_worker`)."""

    id: str
    host: str
    live: bool = Field(description="seen within the last few minutes: GPU jobs are accepted only for live workers")
    seen_at: Timestamp
    cpus: Number
    memory_mb: int
    gpus: int
    gpu_names: list[str]


class HealthScheduler(Shape):
    """Which process schedules, among those sharing a PostgreSQL store (`sandbox.leader`)."""

    leader: str | None = Field(description="host:pid of the process whose worker dispatches; none between leaders")
    standbys: list[str] = Field(description="host:pid of each process standing by to take over")


class HealthDetails(Shape):
    workers: list[HealthWorker]
    scheduler: HealthScheduler | None = Field(default=None, description="on PostgreSQL only, where several "
                                                                       "processes stand for leadership")


class Health(Shape):
    status: Literal["ok"]
    details: HealthDetails | None = Field(default=None, description="with a steward's or an admin's token only")


# Catalog.

class CardColumn(Shape):
    """A column as the card declares it: what the owning org's stewards see."""

    type: ColumnType
    bounds: list[Number] | None
    categories: list[str | int | bool] | None
    public: bool
    description: str


class PublicColumn(Shape):
    """A column as everyone else sees it: bounds and categories only when `public`, a description
    only when there is one."""

    type: ColumnType
    public: bool
    description: str = Field(default="", description="present only when there is one")
    bounds: list[Number] | None = None
    categories: list[str | int | bool] | None = None


class DatasetVersionView(Shape):
    """A dataset version. Buyers see its number and date only; the owning org's stewards also see
    digests, row count and size."""

    version: int
    created_at: Timestamp
    sha256: str | None = Field(default=None, description="stewards of the owning org only")
    rows: int | None = Field(default=None, description="stewards of the owning org only")
    size_bytes: int | None = Field(default=None, description="stewards of the owning org only")
    source_format: str | None = Field(default=None, description="stewards of the owning org only")
    upload_sha256: str | None = Field(default=None, description="stewards of the owning org only")
    signature: dict[str, Any] | None = Field(
        default=None, description="the owner org's Ed25519 signature over the version's statement (its licence, "
                                  "report digest and a salted commitment to the data)")
    deid: dict[str, Any] | None = Field(default=None, description="the de-identification report's summary: k, "
                                                                  "quasi-identifiers, flagged columns, override")
    status: Literal["active", "blocked", "superseded"] | None = Field(
        default=None, description="stewards of the owning org only; buyers see active versions alone")
    provenance: dict[str, Any] | None = Field(default=None, description="stewards of the owning org only")


class DatasetView(Shape):
    """A catalog entry: the public card and schema (the owning org's stewards see every bound)."""

    name: str
    title: str
    description: str
    provenance: str
    deidentification: str
    licence: str | dict[str, Any]
    update_cadence: str
    privacy_unit: str
    privacy_unit_rows: Literal["one", "many"]
    # A card column has all five keys and is read as a CardColumn (listed first); a public one never has
    # both bounds and categories, so it is read as a PublicColumn. Each answers in its own key order.
    columns: dict[str, CardColumn | PublicColumn]
    marginal_pairs: list[list[str]]
    quasi_identifiers: list[str] = []
    deid: dict[str, Any] | None = None
    versions: list[DatasetVersionView]
    created_at: Timestamp
    kind: Literal["table", "files"] = "table"
    collection: dict[str, Any] | None = Field(default=None, description="a files dataset's formats and the image "
                                              "size the platform trainer resizes to")


# Contracts and policies.

class ContractQuotas(StoredShape):
    cpu_hours: Number | None = None
    gpu_hours: Number | None = None
    concurrent_jobs: int | None = None
    output_mb: Number | None = None


class ContractPrices(StoredShape):
    """A contract's price list (`sandbox.billing.prices.PriceList`): decimal strings, unpriced items absent."""

    currency: str | None = None
    flat_per_period: str | None = None
    cpu_hour: str | None = None
    gpu_hour: str | None = None
    epsilon: str | None = None
    released_gb: str | None = None


class ContractPartyView(Shape):
    """A data-holder org whose datasets a contract names (issue 17)."""

    org: str
    policy: str = Field(description="name@version: the org's policy (the creator's until it consents)")
    consented_by: str | None
    consented_at: Timestamp | None


class ContractView(Shape):
    id: str
    buyer_org: str
    datasets: list[str]
    tier: Tier
    kinds: list[JobKind]
    purpose: str
    valid_from: Timestamp
    valid_until: Timestamp
    epsilon: Number
    delta: Number
    quotas: ContractQuotas
    policy: str = Field(description="name@version")
    state: Literal["active", "not_yet_valid", "expired", "revoked"]
    revoked_at: Timestamp | None
    owner_org: str
    created_by: str
    created_at: Timestamp
    prices: ContractPrices = Field(default_factory=ContractPrices, description="empty: nothing is priced")
    parties: list[ContractPartyView] = Field(default_factory=list,
                                             description="the data-holder orgs; usable once every one consented")


class PolicyView(Shape):
    name: str
    version: int
    ref: str = Field(description="name@version")
    status: Literal["pending", "approved", "rejected"]
    owner_org: str | None
    sha256: str
    created_by: str
    created_at: Timestamp
    decided_by: str | None
    decided_at: Timestamp | None
    comment: str | None
    body: dict[str, Any] = Field(description="the policy document (runtime, egress and review rules)")


# Audit and tokens.

class AuditEventView(Shape):
    seq: int
    at: Timestamp
    actor: str
    org: str
    role: str
    action: str
    object_type: str
    object_id: str
    details: dict[str, Any]
    prev_hash: str
    hash: str


class ChainVerification(Shape):
    ok: bool
    events: int
    first_bad_seq: int | None
    problem: str | None


class WhoAmI(Shape):
    sub: str
    org: str
    role: Role
    jti: str
    expires_at: Timestamp


class IssuedTokenView(Shape):
    token: str = Field(description="the JWT")
    jti: str
    expires_at: Timestamp


class RevokedToken(Shape):
    jti: str
    status: Literal["revoked"]


class SigningKey(Shape):
    algorithm: Literal["Ed25519"]
    public_key_pem: str


# Jobs, outputs and review.

class CheckResultView(StoredShape):
    rule: str
    verdict: Verdict
    reason: str


class OutputView(Shape):
    """One output file as the caller may see it. A buyer sees a file it did not get as one anonymous
    entry (`status` `withheld`, name, size, digest and kind null); stewards see the checks in full."""

    path: str | None
    size: int | None
    sha256: str | None
    kind: str | None
    verdict: Verdict | None
    status: OutputStatus | Literal["withheld"]
    origin: Origin
    rules: list[str] = Field(description="the rules that did not pass")
    spec: dict[str, Any] | None = Field(default=None, description="a platform-made table's specification")
    checks: list[CheckResultView] | None = Field(default=None, description="stewards only")
    decided_by: str | None = Field(default=None, description="stewards only")
    comment: str | None = Field(default=None, description="stewards only")
    reasons: list[str] | None = Field(default=None, description="buyers only: why the platform made no table")


class JobResources(StoredShape):
    cpus: Number | None = None
    memory_mb: int | None = None
    timeout_s: int | None = None
    gpus: int | None = None


# A plain mapping, not a model: its keys come in the order the worker, the kernels and the release wrote
# them, and a model would answer them in its own.
Usage = Annotated[dict[str, Any], Field(
    description="what the job used so far: cpu_seconds, wall_seconds, peak_memory_bytes, bytes_released, "
                "kernels (notebooks), ...; buyers see it coarsened (whole seconds, memory in 64 MiB steps)")]


class TrainingProgress(StoredShape):
    step: int
    steps: int
    epsilon: Number = Field(description="epsilon the accountant has counted so far")


class TrainingView(StoredShape):
    """A training job's spec, the encoding the platform fixed from the card, its budget and progress."""

    spec: dict[str, Any] = Field(description="label, features, model, epochs, batch_size, learning_rate, "
                                             "max_grad_norm, epsilon, delta as submitted")
    plan: dict[str, Any] = Field(description="how rows become numbers: task, feature_names (the model's inputs in "
                                             "order), each feature's bounds or categories, n_features, n_outputs")
    epsilon: Number | None = None
    delta: Number | None = None
    max_rows_per_unit: int | None = None
    epsilon_charged: Number | None = Field(default=None, description="settled on the contract's ledger at the end")
    epsilon_charged_by_dataset: dict[str, Number] | None = Field(
        default=None, description="a run over several datasets: the epsilon settled on each dataset's ledger")
    progress: TrainingProgress | None = None
    split: dict[str, Any] | None = Field(default=None, description="free-form training: train_rows, holdout_rows, "
                                                                   "holdout_fraction (by privacy unit)")
    gate: dict[str, Any] | None = Field(default=None, description="free-form training: the membership-inference "
                                                                  "gate's report per model file (scores and counts)")


class JobCreated(Shape):
    id: str
    state: JobState
    image_id: str


class JobDatasetView(Shape):
    name: str
    version: int
    org: str = Field(description="the data-holder org")


class JobApprovalView(Shape):
    org: str
    steward: str
    comment: str
    at: Timestamp


class JobView(Shape):
    id: str
    contract: str
    buyer_org: str
    submitted_by: str
    dataset: str
    version: int
    kind: str
    tier: Tier
    policy: str = Field(description="name@version")
    image: str
    image_id: str
    command: list[str]
    resources: JobResources
    state: JobState
    reason: str = Field(description="why it is in its state (exit code, OOM kill, timeout, a decision)")
    exit_code: int | None = Field(description="for buyers 0 or 1 only: the exact code is the job's to choose")
    usage: Usage
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    outputs: list[OutputView]
    training: TrainingView | None = Field(default=None, description="training and dp_training jobs only")
    datasets: list[JobDatasetView] = Field(default_factory=list, description="every dataset the job reads, "
                                                                             "`dataset` first (issue 17)")
    approvals: list[JobApprovalView] = Field(default_factory=list, description="each data-holder org's approval")


class ReportedFile(Shape):
    path: str | None
    size: int | None
    sha256: str | None
    kind: str | None
    origin: Origin


class BlockedFile(ReportedFile):
    rules: list[str]
    reasons: list[str]


class FileInReview(ReportedFile):
    approvals: int
    needed: int
    rules: list[str]


class ReleaseReport(Shape):
    job: str
    state: JobState
    reason: str
    released: list[ReportedFile]
    blocked: list[BlockedFile]
    in_review: list[FileInReview]
    withheld: int = Field(description="files a buyer may not see, counted")


class ManifestFile(StoredShape):
    path: str | None = None
    sha256: str | None = None
    size: int | None = None
    origin: str | None = None
    spec: dict[str, Any] | None = None


class ReleaseManifest(StoredShape):
    job: str | None = None
    dataset: str | None = Field(default=None, description="name@version")
    code_sha256: str | None = None
    image_id: str | None = None
    files: list[ManifestFile] | None = None
    signed_at: Timestamp | None = None


class SignedManifest(Shape):
    manifest: ReleaseManifest
    signature: str | None = Field(description="hex Ed25519 signature over the canonical manifest JSON")
    algorithm: Literal["Ed25519"]


class ContractUsage(Shape):
    contract: str
    buyer_org: str
    jobs: int
    cpu_hours: Number
    cpu_hours_quota: Number | None
    wall_hours: Number
    gpu_hours: Number
    bytes_released: int


# Differential privacy.

class DpAnswer(StoredShape):
    """A DP query's answer: noisy cells, their accuracy and what the query cost."""

    columns: list[str]
    rows: list[list[Any]]
    accuracy: list[list[Number | None]] = Field(description="half-width of a 95% interval around each cell")
    accuracy_meaning: str | None = None
    mechanism: str | None = None
    notes: list[str] | None = None
    dataset_version: int | None = None
    epsilon: Number | None = None
    rho: Number | None = None
    delta: Number | None = None
    epsilon_spent: Number = Field(description="0 for an answer served again from the cache")
    epsilon_remaining: Number
    cached: bool | None = None


class BudgetView(Shape):
    """One DP ledger. Dataset-wide spend sums every buyer's, so only stewards see it."""

    contract: str
    dataset: str
    epsilon_total: Number
    epsilon_spent: Number
    epsilon_reserved: Number
    epsilon_remaining: Number
    delta_total: Number
    delta_spent: Number
    dataset_epsilon_cap: Number | None
    dataset_epsilon_spent: Number | None = Field(default=None, description="stewards only")
    dataset_epsilon_remaining: Number | None = Field(default=None, description="stewards only")


class DatasetBudgetCap(Shape):
    dataset: str
    epsilon_cap: Number | None
    epsilon_spent: Number
    mock_epsilon: Number


class DpMockView(Shape):
    dataset: str
    version: int
    rows: int
    epsilon: Number
    sha256: str
    marginals: dict[str, Number] = Field(description="each measured marginal and its epsilon share")
    notes: list[str]
    created_at: Timestamp


# Notebooks.

class NotebookExport(Shape):
    path: str | None
    status: OutputStatus | Literal["withheld"]
    kind: str | None


class NotebookSession(Shape):
    id: str
    contract: str
    dataset: str
    version: int
    tier: Tier
    state: JobState
    usage: Usage
    created_at: Timestamp
    exports: list[NotebookExport]
    notice: str | None = Field(default=None, description="why the session lacks data it would have: a file "
                               "collection whose folder changed since registration is not mounted (its manifest is)")
    url: str | None = Field(default=None, description="the Jupyter server's URL, when the session is started")
    token: str | None = Field(default=None, description="a new session token, when the session is started")
    lab_url: str | None = Field(default=None, description="JupyterLab in a browser, with the new session token "
                                "(exchanged for a session cookie on first load), when the session is started")


# Media types of the answers that are not JSON, for OpenAPI.

def file_answer(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entry of a route that answers with a file."""
    return {200: {"description": description,
                  "content": {media_type: {"schema": {"type": "string", "format": "binary"}}}}}


def text_answer(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entry of a route that answers with text."""
    return {200: {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}}


# Invoices.

DecimalString = Annotated[str, Field(pattern=r"^-?[0-9]+(\.[0-9]+)?$", description="an exact decimal, as a string")]


class InvoiceLine(Shape):
    item: Item
    quantity: DecimalString
    unit: str
    unit_price: DecimalString
    amount: DecimalString = Field(description="quantity x unit_price, rounded half-up to cents")
    events: list[int] = Field(description="seqs of the audit events the quantity was read from")
    org: str = Field(description="the data-holder org this line is owed to (a contract over several orgs' data "
                                 "has each org's lines)")


class Invoice(Shape):
    """A contract's invoice for one month (UTC): its price list applied to its audited usage."""

    contract: str
    buyer_org: str
    owner_org: str
    period: str = Field(description="YYYY-MM")
    currency: str
    lines: list[InvoiceLine]
    total: DecimalString


# Registration (issue 16).

class IdentifierFound(Shape):
    column: str
    kind: str = Field(description="person_name, national_id, phone, email, address, medical_record_number or "
                                  "date_of_birth")
    count: int = Field(description="rows of the column holding at least one")
    examples: list[str] = Field(description="up to three hits, masked")
    estimated: bool | None = Field(default=None, description="true when the count is scaled from a sample of "
                                                             "over 20,000 distinct candidates")


class BlockReason(Shape):
    check: Literal["identifiers", "k_anonymity", "l_diversity", "dicom"]
    overridable: bool
    detail: str


class DeidReportView(Shape):
    """A version's de-identification report, kept with the version; owning org's stewards only."""

    dataset: str
    version: int
    status: Literal["active", "blocked", "superseded"]
    blocked: bool
    reasons: list[BlockReason]
    identifiers: list[IdentifierFound]
    flagged_columns: list[str]
    k_anonymity: dict[str, Any] = Field(description="quasi_identifiers, k, min_k, rare, rare_classes, rare_units, "
                                                    "l_diversity, suggestions, notes")
    policy: str
    rules: dict[str, Any]
    checked_at: Timestamp
    override: dict[str, Any] | None = None
    dicom: dict[str, Any] | None = Field(default=None, description="a collection's file header check (DICOM "
                                         "against the PS3.15 Basic Profile; the text PNG, JPEG and NIfTI headers "
                                         "embed): files, flagged_files, classes, findings per tag, rules")


class VersionDiffView(StoredShape):
    """What changed from the previous usable version: rows, schema and each public column's distribution."""

    dataset: str
    version: int
    from_version: int
    rows: dict[str, Any]
    columns: dict[str, Any]


class CardDraftView(Shape):
    """A card proposed from a file, for the steward who sent it; nothing is stored."""

    card: dict[str, Any]
    fhir_mapping: dict[str, Any] | None = None
    notes: list[str]
