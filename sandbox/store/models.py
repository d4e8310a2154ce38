"""Tables of the metadata store. Rows are plain records; rules live in the domain modules."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both stores (SQLite would otherwise drop the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use UTC-aware datetimes")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    card: Mapped[dict[str, Any]] = mapped_column(default=dict)
    privacy_unit: Mapped[str] = mapped_column(String(64))
    privacy_unit_rows: Mapped[str] = mapped_column(String(8), default="many")
    # "table" (one Parquet table per version) or "files" (a collection of DICOM or image files registered in
    # place; each version's table is its manifest: one row per file).
    kind: Mapped[str] = mapped_column(String(8), default="table", server_default="table")
    columns: Mapped[dict[str, Any]] = mapped_column()
    # The data-holder org: its stewards, and only they, act on the dataset, its versions, caps and
    # contracts. The org of the steward who created it (sandbox.auth.orgs.UNKNOWN_OWNER if lost).
    owner_org: Mapped[str] = mapped_column(String(64), index=True)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column()

    # Every version a steward registered, blocked ones included; only stewards of the owner org see them.
    all_versions: Mapped[list[DatasetVersion]] = relationship(
        back_populates="dataset", order_by="DatasetVersion.version", lazy="selectin"
    )
    # The versions that may be used: those whose registration checks passed or were overridden. Jobs,
    # queries, notebooks and the buyers' catalog read only these (a blocked version is in quarantine).
    versions: Mapped[list[DatasetVersion]] = relationship(
        primaryjoin="and_(Dataset.id == DatasetVersion.dataset_id, DatasetVersion.status == 'active')",
        order_by="DatasetVersion.version", lazy="selectin", viewonly=True,
    )


class DatasetVersion(Base):
    __tablename__ = "dataset_versions"
    __table_args__ = (UniqueConstraint("dataset_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(BigInteger)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    schema: Mapped[dict[str, Any]] = mapped_column()
    path: Mapped[str] = mapped_column(String(500))
    source_format: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column()
    # active | blocked (in quarantine, awaiting remediation or a signed override) | superseded
    status: Mapped[str] = mapped_column(String(16), default="active", server_default="active")
    deid: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    diff: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    signature: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    provenance: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # A file collection's folder, read in place and never copied (`path` is then its manifest's Parquet).
    reference: Mapped[str | None] = mapped_column(String(1000), default=None)

    dataset: Mapped[Dataset] = relationship(back_populates="all_versions")


class Policy(Base):
    __tablename__ = "policies"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any]] = mapped_column()
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # pending | approved | rejected
    # The org whose steward proposed this version; None for shipped (global) versions from policies/.
    owner_org: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column()
    decided_by: Mapped[str | None] = mapped_column(String(200), default=None)
    decided_at: Mapped[datetime | None] = mapped_column(default=None)
    comment: Mapped[str] = mapped_column(Text, default="")


class Contract(Base):
    __tablename__ = "contracts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    buyer_org: Mapped[str] = mapped_column(String(64), index=True)
    datasets: Mapped[list[Any]] = mapped_column()
    tier: Mapped[str] = mapped_column(String(16))
    kinds: Mapped[list[Any]] = mapped_column()
    purpose: Mapped[str] = mapped_column(Text)
    valid_from: Mapped[datetime] = mapped_column()
    valid_until: Mapped[datetime] = mapped_column()
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float, default=0.0)
    quotas: Mapped[dict[str, Any]] = mapped_column(default=dict)
    policy_name: Mapped[str] = mapped_column(String(64))
    policy_version: Mapped[int] = mapped_column(Integer)
    # The data-holder org that granted it: the owner of every dataset it names.
    owner_org: Mapped[str] = mapped_column(String(64), index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_by: Mapped[str | None] = mapped_column(String(200), default=None)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column()
    # The price list (sandbox.billing.prices.PriceList.stored): decimal strings; {} prices nothing.
    prices: Mapped[dict[str, Any]] = mapped_column(default=dict)

    parties: Mapped[list[ContractParty]] = relationship(back_populates="contract", order_by="ContractParty.org",
                                                        lazy="selectin")


class ContractParty(Base):
    """A data-holder org whose datasets a contract names. The contract is usable only once every party
    consented; each party's policy applies to what leaves, the strictest rule winning."""

    __tablename__ = "contract_parties"
    __table_args__ = (UniqueConstraint("contract_id", "org"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    contract_id: Mapped[str] = mapped_column(ForeignKey("contracts.id"), index=True)
    org: Mapped[str] = mapped_column(String(64), index=True)
    policy_name: Mapped[str] = mapped_column(String(64))
    policy_version: Mapped[int] = mapped_column(Integer)
    consented_by: Mapped[str | None] = mapped_column(String(200), default=None)
    consented_at: Mapped[datetime | None] = mapped_column(default=None)

    contract: Mapped[Contract] = relationship(back_populates="parties")


class IssuedToken(Base):
    """Tokens this instance issued (never the token itself), so they can be listed and revoked."""

    __tablename__ = "issued_tokens"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    sub: Mapped[str] = mapped_column(String(200))
    org: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    issued_at: Mapped[datetime] = mapped_column()
    expires_at: Mapped[datetime] = mapped_column()


class RevokedToken(Base):
    __tablename__ = "revoked_tokens"

    jti: Mapped[str] = mapped_column(String(200), primary_key=True)
    revoked_at: Mapped[datetime] = mapped_column()
    revoked_by: Mapped[str] = mapped_column(String(200))


class AuditEvent(Base):
    """One link of the hash chain: `hash` covers every field and `prev_hash`."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                     autoincrement=False)
    at: Mapped[datetime] = mapped_column()
    actor: Mapped[str] = mapped_column(String(200))
    org: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64), index=True)
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str] = mapped_column(String(200))
    details: Mapped[dict[str, Any]] = mapped_column()
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The signed tip of the chain: catches deletion of the newest events, which no link can."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(200))


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    contract_id: Mapped[str] = mapped_column(ForeignKey("contracts.id"), index=True)
    buyer_org: Mapped[str] = mapped_column(String(64), index=True)
    submitted_by: Mapped[str] = mapped_column(String(200))
    dataset: Mapped[str] = mapped_column(String(64))
    dataset_version: Mapped[int] = mapped_column(Integer)
    # Every dataset the job reads, `[{"name", "version", "org"}]`, the first being `dataset` above; None for
    # jobs from before issue 17, which read only that one (`sandbox.store.parties.job_datasets`).
    datasets: Mapped[list[Any] | None] = mapped_column(JSON, default=None)
    kind: Mapped[str] = mapped_column(String(16))
    tier: Mapped[str] = mapped_column(String(16))
    policy: Mapped[str] = mapped_column(String(80))
    image: Mapped[str] = mapped_column(String(80))
    image_id: Mapped[str] = mapped_column(String(80))
    command: Mapped[list[Any]] = mapped_column()
    resources: Mapped[dict[str, Any]] = mapped_column()
    code_sha256: Mapped[str] = mapped_column(String(64))
    code_bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(20), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    exit_code: Mapped[int | None] = mapped_column(Integer, default=None)
    usage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    manifest_signature: Mapped[str | None] = mapped_column(String(200), default=None)
    # Training jobs: the spec, the encoding plan, the budget reservation and the trainer's progress.
    training: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[datetime] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)

    outputs: Mapped[list[JobOutput]] = relationship(back_populates="job", order_by="JobOutput.path", lazy="selectin")
    approvals: Mapped[list[JobApproval]] = relationship(order_by="JobApproval.org", lazy="selectin")


class JobApproval(Base):
    """One data-holder org's approval of a job that reads its data; the job is queued once every such org
    approved (one steward each)."""

    __tablename__ = "job_approvals"
    __table_args__ = (UniqueConstraint("job_id", "org"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    org: Mapped[str] = mapped_column(String(64))
    steward: Mapped[str] = mapped_column(String(200))
    comment: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column()


class JobOutput(Base):
    """One file a job produced (logs included), with its checks and release state."""

    __tablename__ = "job_outputs"
    __table_args__ = (UniqueConstraint("job_id", "path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    path: Mapped[str] = mapped_column(String(500))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    verdict: Mapped[str] = mapped_column(String(16))  # pass | review | block
    checks: Mapped[list[Any]] = mapped_column()
    status: Mapped[str] = mapped_column(String(16))  # sandbox.release.status.OutputStatus
    # Who made the bytes: "platform" (a verified table or DP result the platform wrote itself),
    # "buyer" (anything the buyer's code wrote) or "log" (the job's own stdout/stderr).
    origin: Mapped[str] = mapped_column(String(16), default="buyer", server_default="buyer")
    # For a platform-made table: the canonical specification it was recomputed from (differencing
    # checks compare later tables against it).
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    stored_path: Mapped[str | None] = mapped_column(String(500), default=None)
    decided_by: Mapped[str | None] = mapped_column(String(200), default=None)
    decided_at: Mapped[datetime | None] = mapped_column(default=None)
    comment: Mapped[str] = mapped_column(Text, default="")

    job: Mapped[Job] = relationship(back_populates="outputs")


class ImageRecord(Base):
    """Job images the worker found in its engine; the API resolves names here, never in Docker."""

    __tablename__ = "images"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    image_id: Mapped[str] = mapped_column(String(80))
    seen_at: Mapped[datetime] = mapped_column()


class WorkerRecord(Base):
    """A worker and what its machine gives jobs, published at its start and refreshed while it runs: the API
    (which never talks to Docker) refuses a GPU job no live worker could run."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    gpus: Mapped[int] = mapped_column(Integer, default=0)
    gpu_names: Mapped[list[Any]] = mapped_column(default=list)
    cpus: Mapped[float] = mapped_column(Float)
    memory_mb: Mapped[int] = mapped_column(Integer)
    seen_at: Mapped[datetime] = mapped_column()


class BudgetLedger(Base):
    """DP spend of one contract on one dataset lineage (all its versions); never above the total."""

    __tablename__ = "budget_ledgers"
    __table_args__ = (UniqueConstraint("contract_id", "dataset"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    contract_id: Mapped[str] = mapped_column(ForeignKey("contracts.id"), index=True)
    dataset: Mapped[str] = mapped_column(String(64))
    epsilon_total: Mapped[float] = mapped_column(Float)
    epsilon_spent: Mapped[float] = mapped_column(Float, default=0.0)
    epsilon_reserved: Mapped[float] = mapped_column(Float, default=0.0)
    delta_total: Mapped[float] = mapped_column(Float, default=0.0)
    delta_spent: Mapped[float] = mapped_column(Float, default=0.0)
    delta_reserved: Mapped[float] = mapped_column(Float, default=0.0)
    # The truth the ledger computes with: integers of a fixed unit (budgets.cost.EPSILON_SCALE, DELTA_SCALE),
    # so no float slack can let a query through; the float columns above only mirror them for display.
    epsilon_total_units: Mapped[int] = mapped_column(BigInteger, default=0)
    epsilon_spent_units: Mapped[int] = mapped_column(BigInteger, default=0)
    epsilon_reserved_units: Mapped[int] = mapped_column(BigInteger, default=0)
    delta_total_units: Mapped[int] = mapped_column(BigInteger, default=0)
    delta_spent_units: Mapped[int] = mapped_column(BigInteger, default=0)
    delta_reserved_units: Mapped[int] = mapped_column(BigInteger, default=0)


class DatasetBudget(Base):
    """A cap on DP spend per dataset across all buyers, set by a steward (none means uncapped)."""

    __tablename__ = "dataset_budgets"

    dataset: Mapped[str] = mapped_column(String(64), primary_key=True)
    epsilon_cap: Mapped[float | None] = mapped_column(Float, default=None)
    epsilon_spent: Mapped[float] = mapped_column(Float, default=0.0)
    epsilon_reserved: Mapped[float] = mapped_column(Float, default=0.0)
    mock_epsilon: Mapped[float] = mapped_column(Float, default=0.0)
    epsilon_cap_units: Mapped[int | None] = mapped_column(BigInteger, default=None)
    epsilon_spent_units: Mapped[int] = mapped_column(BigInteger, default=0)
    epsilon_reserved_units: Mapped[int] = mapped_column(BigInteger, default=0)
    mock_epsilon_units: Mapped[int] = mapped_column(BigInteger, default=0)


class BudgetReservation(Base):
    """Budget held for one query between reservation and its answer (or its failure)."""

    __tablename__ = "budget_reservations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    ledger_id: Mapped[int] = mapped_column(ForeignKey("budget_ledgers.id"), index=True)
    epsilon: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16))  # reserved | committed | released
    query_key: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column()
    epsilon_units: Mapped[int] = mapped_column(BigInteger, default=0)
    delta_units: Mapped[int] = mapped_column(BigInteger, default=0)
    # Which process holds it: a reservation of a process that is gone is released at startup.
    holder: Mapped[str] = mapped_column(String(64), default="")


class DpAnswer(Base):
    """A released answer, kept so the same query on the same version costs nothing again."""

    __tablename__ = "dp_answers"
    __table_args__ = (UniqueConstraint("contract_id", "cache_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    contract_id: Mapped[str] = mapped_column(ForeignKey("contracts.id"), index=True)
    cache_key: Mapped[str] = mapped_column(String(64))
    dataset: Mapped[str] = mapped_column(String(64))
    dataset_version: Mapped[int] = mapped_column(Integer)
    sql: Mapped[str] = mapped_column(Text)
    answer: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column()


class DatasetMock(Base):
    """The DP synthetic mock of one version: what dp_only jobs see at /data, and what buyers download."""

    __tablename__ = "dataset_mocks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_version_id: Mapped[int] = mapped_column(ForeignKey("dataset_versions.id"), unique=True)
    path: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(BigInteger)
    epsilon: Mapped[float] = mapped_column(Float)
    report: Mapped[dict[str, Any]] = mapped_column()
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column()


class OutputReview(Base):
    """One steward's decision on one output file, tied to the content it saw (sha256)."""

    __tablename__ = "output_reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("job_outputs.id"), index=True)
    steward: Mapped[str] = mapped_column(String(200))
    org: Mapped[str] = mapped_column(String(64))
    decision: Mapped[str] = mapped_column(String(16))  # release | reject
    sha256: Mapped[str] = mapped_column(String(64))
    comment: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[datetime] = mapped_column()


class NotebookToken(Base):
    """A token for one notebook session's Jupyter server, bound to the service token that asked for it:
    it stops working when that token expires or is revoked, or when the session ends. Only its hash is kept."""

    __tablename__ = "notebook_tokens"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    jti: Mapped[str] = mapped_column(String(200))
    sub: Mapped[str] = mapped_column(String(200))
    org: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column()
    created_at: Mapped[datetime] = mapped_column()
