"""Which contracts an org is a party to: the one rule every steward-side filter over contracts uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from sandbox.store.models import Contract, ContractParty, Job


def party_contracts(org: str) -> Select[str]:
    """The ids of the contracts naming a dataset of `org` (consented or not), as a subquery to filter on.

    A contract may name datasets of several data-holder orgs (issue 17); each is a party, and each party's
    stewards see the contract, the jobs under it, their budgets, usage, reviews and audit events."""
    return select(ContractParty.contract_id).where(ContractParty.org == org)


@dataclass(frozen=True)
class JobDataset:
    """One dataset version a job reads, and the data-holder org that owns it."""

    name: str
    version: int
    org: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "org": self.org}


def job_datasets(job: Job) -> list[JobDataset]:
    """Every dataset `job` reads, its own `dataset` first. Jobs from before several datasets existed read one,
    owned by their contract's org (`org` is then "")."""
    if job.datasets:
        return [JobDataset(name=str(entry["name"]), version=int(entry["version"]), org=str(entry.get("org", "")))
                for entry in job.datasets]
    return [JobDataset(name=job.dataset, version=job.dataset_version, org="")]


def datasets_orgs(datasets: list[Any] | None) -> list[str]:
    """The data-holder orgs a job's `datasets` column names, sorted; [] for a job from before issue 17."""
    return sorted({str(entry["org"]) for entry in datasets or [] if entry.get("org")})


def job_orgs(job: Job, *, owner: str = "") -> list[str]:
    """The data-holder orgs whose data `job` reads, sorted; for a job from before issue 17, `[owner]` (its
    contract's org) when given, else []."""
    return datasets_orgs(job.datasets) or ([owner] if owner else [])


def job_data_orgs(session: Session, job: Job) -> list[str]:
    """The data-holder orgs whose data `job` reads, sorted; a job from before issue 17 read its contract
    owner's data (looked up only for such a job)."""
    if job.datasets:
        return job_orgs(job)
    owner = session.execute(select(Contract.owner_org).where(Contract.id == job.contract_id)).scalar_one_or_none()
    return job_orgs(job, owner=owner or "")
