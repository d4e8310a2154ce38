"""What a job's container sees in /data: every dataset it reads, and whether a file collection may be mounted.

Jobs and notebook kernels both mount through `job_data`, so the tier's rules (the mock for dp_only, no image
files for dp_only, no /data for dp_training) hold for each the same way.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from sandbox.catalog.collections import check_in_place
from sandbox.catalog.service import get_dataset
from sandbox.contracts import JobKind, Tier
from sandbox.dp.mock_publication import mock_path
from sandbox.instance import Instance
from sandbox.store.models import Dataset, DatasetVersion, Job
from sandbox.store.parties import job_datasets
from sandbox.training import runs as training_runs


def job_data(instance: Instance, job: Job, session: Session) -> tuple[dict[str, Path], dict[str, Path]]:
    """What `job` sees in /data, read-only, for every dataset it reads: files, and folders.

    A table is `<dataset>.parquet`; a file collection is `<dataset>/manifest.parquet` and its folder, read in
    place, at `<dataset>/files`. dp_only code never sees a real row nor an image: a table's DP mock under the same
    name, a collection's manifest mock if there is one, never its files. A dp_training container holds no rows
    until the buyer's code is gone: the trainer asks the socket, so it gets no /data at all.
    """
    if job.kind == JobKind.DP_TRAINING.value:
        return {}, {}
    artifacts = instance.settings.artifacts_dir
    files: dict[str, Path] = {}
    folders: dict[str, Path] = {}
    for entry in job_datasets(job):
        version = _pinned_version(session, entry.name, entry.version)
        mock = mock_path(artifacts, entry.name, entry.version)
        if version is None or version.reference is None:
            data = artifacts / "datasets" / entry.name / f"v{entry.version}.parquet"
            if job.tier == Tier.DP_ONLY.value:
                data = mock
            elif job.kind == JobKind.TRAINING.value:
                # Free-form training sees its training rows only; the held-out rows are the gate's.
                data = training_runs.train_split(artifacts, job.id)[0]
            files[f"{entry.name}.parquet"] = data
        elif job.tier == Tier.DP_ONLY.value:
            if mock.is_file():
                files[f"{entry.name}/manifest.parquet"] = mock
        else:
            files[f"{entry.name}/manifest.parquet"] = artifacts / version.path
            folders[f"{entry.name}/files"] = Path(version.reference)
    return files, folders


def _pinned_version(session: Session, name: str, number: int) -> DatasetVersion | None:
    """The version a job pinned, whatever its status now (a job admitted on it runs on it)."""
    return session.execute(select(DatasetVersion).join(Dataset, Dataset.id == DatasetVersion.dataset_id)
                           .where(Dataset.name == name, DatasetVersion.version == number)).scalar_one_or_none()


def collection_problems(instance: Instance, job: Job, session: Session) -> list[str]:
    """Why a file collection `job` would mount cannot be mounted now (its folder changed since registration:
    `sandbox.catalog.collections.check_in_place`); empty when it may run."""
    artifacts = instance.settings.artifacts_dir
    _, folders = job_data(instance, job, session)
    problems = []
    for name in folders:
        dataset = name.partition("/")[0]
        entry = next(entry for entry in job_datasets(job) if entry.name == dataset)
        pinned = _pinned_version(session, entry.name, entry.version)
        assert pinned is not None and pinned.reference is not None
        known = [artifacts / version.path for version in get_dataset(session, entry.name).versions
                 if version.reference is not None]
        problems += [f"{dataset} v{entry.version}: {problem}" for problem in
                     check_in_place(Path(pinned.reference), artifacts / pinned.path, known)]
    return problems


NOT_MOUNTED = "a file collection changed since it was registered, so it is not mounted"


def not_mounted(problems: list[str], *, shown: int = 20) -> str:
    """What a job's refusal and a notebook session's notice say of `collection_problems`."""
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return f"{NOT_MOUNTED}: {'; '.join(problems[:shown])}{more}"
