"""DP-SGD on a DICOM collection as an AI company would run it: the hospital registers retinal photographs by
reference, the buyer sends a small CNN, the worker decodes the images beside the data, and the model comes back
signed with its epsilon charged. A collection whose folder changed since registration is never mounted: the
job fails and says why. On the real Docker engine and the training image."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth
from jobworld import JobWorld, pack

from runners.docker import DockerRunner
from sandbox.config import Settings
from sandbox.demo_imaging import PSEUDONYM_PATTERN, write_collection, write_labels
from sandbox.instance import Instance
from sandbox.jobs.mounts import job_data
from sandbox.store.models import Job
from sandbox.worker import Capacity, Worker

pytestmark = pytest.mark.docker

NAME = "retina-north"
PATIENTS = 12
CNN = (Path(__file__).resolve().parent / "buyer_code" / "small_cnn.py").read_text()
LIST_FILES = """
import os, pyarrow.parquet as pq, pydicom, nibabel, PIL  # the readers a collection's formats need
files = sorted(os.path.join(d, f) for d, _, names in os.walk("/data/retina-north/files") for f in names)
print(len(files), "files;", pq.read_table("/data/retina-north/manifest.parquet").num_rows, "manifest rows")
assert pydicom.dcmread(files[0]).PatientID.startswith("PSN-")
"""


@pytest.fixture
def database_url() -> None:
    """SQLite only: the runs exercise the worker, containers and the trainer, not the store."""
    return None


@pytest.fixture
def settings(tmp_path: Path, database_url: str | None) -> Settings:
    return Settings(home=tmp_path / "home", database_url=database_url, log_json=True,
                    reference_roots={org: [tmp_path / org / "exports"] for org in ("hospital", "north", "south")})


def register(api: TestClient, steward: str, tmp_path: Path, *, org: str = "hospital", hospital: str = "north",
             patients: int = PATIENTS, file_format: Literal["dicom", "png"] = "dicom") -> Path:
    """The labels table and the collection (`patients` x 2 images, 16x16) of `hospital`, registered by reference
    by a steward of `org`: DICOM files (the patient in PatientID) or RGB PNG photographs (in the folder name)."""
    name = f"retina-{hospital}"
    labels_name = f"{name}-labels"
    labels = {"name": labels_name, "title": "Retinopathy grades", "privacy_unit": "patient_id",
              "privacy_unit_rows": "one",
              "columns": {"patient_id": {"type": "string"}, "label": {"type": "integer", "bounds": [0, 1]},
                          "age": {"type": "integer", "bounds": [18, 100]}}}
    assert api.post("/v1/datasets", json=labels, headers=auth(steward)).status_code == 201
    path = write_labels(tmp_path / org / "labels.csv", hospital=hospital, patients=patients)
    with path.open("rb") as handle:
        added = api.post(f"/v1/datasets/{labels_name}/versions", files={"file": (path.name, handle)},
                         headers=auth(steward))
    assert added.status_code == 201, added.text
    card = {"name": name, "title": f"Retinal photographs, {hospital}", "kind": "files", "privacy_unit": "patient_id",
            "dp": {"rows_per_unit": 2},
            "columns": {"patient_id": {"type": "string"}, "modality": {"type": "string", "public": True},
                        "label": {"type": "integer", "categories": [0, 1], "public": True}},
            "collection": {"pseudonym_pattern": PSEUDONYM_PATTERN, "image": {"channels": 1, "height": 16, "width": 16},
                           "labels": {"dataset": labels_name, "on": "patient_id", "columns": ["label"]},
                           "formats": [file_format], "unit_from": "PatientID" if file_format == "dicom" else "path:0"}}
    created = api.post("/v1/datasets", json=card, headers=auth(steward))
    assert created.status_code == 201, created.text
    folder = tmp_path / org / "exports" / "retina"
    write_collection(folder, hospital=hospital, patients=patients, images_per_patient=2, file_format=file_format)
    version = api.post(f"/v1/datasets/{name}/versions", json={"reference": str(folder)}, headers=auth(steward))
    assert version.status_code == 201 and version.json()["status"] == "active", version.text
    return folder


@pytest.fixture
def world(api: TestClient, instance: Instance, tokens: Tokens, tmp_path: Path,
          training_image: str) -> Iterator[tuple[JobWorld, Path]]:
    steward = tokens.steward(org="hospital")
    folder = register(api, steward, tmp_path)
    runner = DockerRunner(state_dir=tmp_path / "runner", instance_id=instance.instance_id)
    worker = Worker(instance, runner, Capacity(cpus=4, memory_mb=8192))
    worker.refresh_images()
    built = JobWorld(api=api, instance=instance, worker=worker, runner=runner, steward=steward,
                     buyer=tokens.buyer(org="acme"), contract="")
    yield built, folder
    built.tear_down()


def contract(world: JobWorld, tier: str, kinds: list[str], **extra: Any) -> str:
    response = world.api.post("/v1/contracts", headers=auth(world.steward), json={
        "buyer_org": "acme", "datasets": [NAME], "tier": tier, "kinds": kinds, "purpose": "retinopathy",
        "valid_until": "2099-01-01", "epsilon": 3.0, "delta": 1e-5,
        "quotas": {"concurrent_jobs": 2, "cpu_hours": 10}, **extra})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def submit(world: JobWorld, spec: dict[str, Any], code: dict[str, str]) -> str:
    spec = {"dataset": NAME, "resources": {"cpus": 2, "memory_mb": 2048, "timeout_s": 300}, **spec}
    response = world.api.post("/v1/jobs", headers=auth(world.buyer), data={"spec": json.dumps(spec)},
                              files={"code": ("code.tar.gz", pack(code), "application/gzip")})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_a_dp_cnn_trains_on_a_dicom_collection_and_comes_back_signed(world: tuple[JobWorld, Path]) -> None:
    jobs, folder = world
    # dp_only: the buyer's code never sees a pixel, only the platform's trainer does (buyer code on a collection
    # under dp_only is refused at submission).
    agreed = contract(jobs, "dp_only", ["dp_training", "analysis"])
    refused_code = jobs.api.post("/v1/jobs", headers=auth(jobs.buyer), data={"spec": json.dumps({
        "contract": agreed, "dataset": NAME, "kind": "analysis", "command": ["python", "list.py"]})},
        files={"code": ("code.tar.gz", pack({"list.py": LIST_FILES}), "application/gzip")})
    assert refused_code.status_code == 422 and "file collection" in refused_code.text, refused_code.text
    job_id = submit(jobs, {"contract": agreed, "kind": "dp_training", "training": {
        "label": "label", "features": ["image"], "epochs": 2, "batch_size": 6, "learning_rate": 0.5,
        "max_grad_norm": 1.0, "epsilon": 2.0}}, {"model.py": CNN})
    job = jobs.run_until(job_id, {"done", "in_review", "failed"}, timeout=300)
    outputs = {o["path"]: o for o in job["outputs"]}
    assert outputs.get("model/model.safetensors", {}).get("status") == "released", (job.get("reason"), outputs)
    assert job["training"]["plan"]["image"] == [1, 16, 16] and job["training"]["max_rows_per_unit"] == 2
    with jobs.instance.read_session() as session:
        stored = session.get(Job, job_id)
        assert stored is not None and stored.training is not None
        trainer = stored.training["trainer"]
    assert trainer["input_shape"] == [1, 16, 16] and trainer["features"] == ["image"]
    assert trainer["n_units"] == PATIENTS, "patients were merged or dropped"
    record = jobs.api.get(f"/v1/jobs/{job_id}/outputs/model/training-record.json", headers=auth(jobs.buyer))
    assert record.status_code == 200, record.text
    body = json.loads(record.text)["record"]
    assert 0 < body["epsilon"] <= 2.0 and body["epsilon_charged"] >= body["epsilon"] - 1e-6
    assert body["features"] == ["image"] and body["n_features"] == 256
    assert job["training"]["epsilon_charged"] == pytest.approx(body["epsilon_charged"])

    # A file replaced since registration: the worker refuses to train on it, and nothing is charged.
    victim = sorted(folder.rglob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\xff")
    again = submit(jobs, {"contract": agreed, "kind": "dp_training", "training": {
        "label": "label", "features": ["image"], "epsilon": 0.5}}, {"model.py": CNN})
    refused = jobs.run_until(again, {"done", "in_review", "failed"}, timeout=120)
    assert refused["state"] == "failed" and "changed since the version was registered" in refused["reason"], refused
    jobs.worker.tick()
    assert jobs.job(again)["training"].get("epsilon_charged") == 0, "a run that never started was charged"


def test_an_analysis_job_reads_the_collection_and_a_changed_folder_is_never_mounted(
        world: tuple[JobWorld, Path]) -> None:
    jobs, folder = world
    agreed = contract(jobs, "trusted", ["analysis"])
    spec = {"contract": agreed, "kind": "analysis", "image": "analysis", "command": ["python", "list.py"]}
    first = jobs.run_until(submit(jobs, spec, {"list.py": LIST_FILES}), {"done", "in_review", "failed"})
    assert first["state"] != "failed", first.get("reason")
    assert jobs.review_text(first["id"], "logs/stdout.txt") == f"{2 * PATIENTS} files; {2 * PATIENTS} manifest rows\n"

    with jobs.instance.read_session() as session:
        stored = session.get(Job, first["id"])
        assert stored is not None
        files, folders = job_data(jobs.instance, stored, session)
        assert set(files) == {f"{NAME}/manifest.parquet"} and folders == {f"{NAME}/files": folder.resolve()}
        for tier, kind in (("dp_only", "analysis"), ("aggregate", "dp_training")):
            other = Job(id="j-probe", dataset=NAME, dataset_version=1, datasets=stored.datasets, tier=tier, kind=kind)
            files, folders = job_data(jobs.instance, other, session)
            assert folders == {} and all(not str(path).startswith(str(folder)) for path in files.values()), \
                f"a {tier} {kind} job would see the images"

    (folder / "unregistered.dcm").write_bytes(b"a file no version lists")
    second = jobs.run_until(submit(jobs, spec, {"list.py": LIST_FILES}), {"done", "in_review", "failed"})
    assert second["state"] == "failed"
    assert "unregistered.dcm" in second["reason"] and "not mounted" in second["reason"], second["reason"]


def test_a_dp_cnn_trains_on_two_hospitals_collections_after_both_approve(
        api: TestClient, instance: Instance, tokens: Tokens, tmp_path: Path, training_image: str) -> None:
    """The acceptance run: retinal photographs held by two hospitals, one contract, both stewards approve, one
    model, each hospital's patients counted apart and each dataset's budget charged. North exports DICOM, south
    colour PNG photographs: the trainer takes both, as one grey channel."""
    north, south = tokens.steward("ana", org="north"), tokens.steward("carl", org="south")
    register(api, north, tmp_path, org="north", hospital="north", patients=8)
    register(api, south, tmp_path, org="south", hospital="south", patients=6, file_format="png")
    runner = DockerRunner(state_dir=tmp_path / "runner", instance_id=instance.instance_id)
    worker = Worker(instance, runner, Capacity(cpus=4, memory_mb=8192))
    worker.refresh_images()
    jobs = JobWorld(api=api, instance=instance, worker=worker, runner=runner, steward=north,
                    buyer=tokens.buyer(org="acme"), contract="")
    try:
        created = api.post("/v1/contracts", headers=auth(north), json={
            "buyer_org": "acme", "datasets": ["retina-north", "retina-south"], "tier": "dp_only",
            "kinds": ["dp_training"], "purpose": "retinopathy", "valid_until": "2099-01-01", "epsilon": 3.0,
            "delta": 1e-5, "quotas": {"concurrent_jobs": 2, "cpu_hours": 10},
            "prices": {"cpu_hour": "2.50", "epsilon": "100"}})
        assert created.status_code == 201, created.text
        agreed = created.json()["id"]
        spec = {"contract": agreed, "datasets": ["retina-north", "retina-south"], "kind": "dp_training",
                "training": {"label": "label", "features": ["image"], "epochs": 2, "batch_size": 7,
                             "learning_rate": 0.5, "max_grad_norm": 1.0, "epsilon": 2.0}}
        unconsented = api.post("/v1/jobs", headers=auth(jobs.buyer), data={"spec": json.dumps(spec)},
                               files={"code": ("code.tar.gz", pack({"model.py": CNN}), "application/gzip")})
        assert unconsented.status_code in (403, 409, 422) and "south" in unconsented.text, \
            "a job ran on the south hospital's data before it consented to the contract"
        consent = api.post(f"/v1/contracts/{agreed}/consent", headers=auth(south), json={})
        assert consent.status_code == 200, consent.text
        job_id = submit(jobs, spec, {"model.py": CNN})
        assert api.post(f"/v1/jobs/{job_id}/approve", headers=auth(north), json={}).status_code == 200
        worker.tick()
        waiting = jobs.job(job_id)
        assert waiting["state"] == "pending_approval" and "south" in waiting["reason"], \
            f"the job left approval with only the north hospital's approval: {waiting}"
        assert api.post(f"/v1/jobs/{job_id}/approve", headers=auth(south), json={}).status_code == 200
        job = jobs.run_until(job_id, {"done", "in_review", "failed"}, timeout=300)
        outputs = {o["path"]: o for o in job["outputs"]}
        assert outputs.get("model/model.safetensors", {}).get("status") == "released", (job.get("reason"), outputs)
        model = api.get(f"/v1/jobs/{job_id}/outputs/model/model.safetensors", headers=auth(jobs.buyer))
        assert model.status_code == 200 and len(model.content) > 100
        with instance.read_session() as session:
            stored = session.get(Job, job_id)
            assert stored is not None and stored.training is not None
            trainer = stored.training["trainer"]
        assert trainer["n_units"] == 8 + 6, "a patient of one hospital was merged with one of the other, or lost"
        assert trainer["input_shape"] == [1, 16, 16]
        charged = job["training"].get("epsilon_charged_by_dataset") or {}
        assert set(charged) == {"retina-north", "retina-south"}, job["training"]
        assert all(0 < value <= 2.0 for value in charged.values()), charged
        record = api.get(f"/v1/jobs/{job_id}/outputs/model/training-record.json", headers=auth(jobs.buyer))
        assert record.status_code == 200, (outputs["model/training-record.json"], record.text)
        assert json.loads(record.text)["record"]["datasets"] == [
            {"name": "retina-north", "version": 1}, {"name": "retina-south", "version": 1}]

        # Each hospital's budget paid the run's epsilon, and the buyer's invoice has a line for each hospital.
        budgets = api.get("/v1/budgets", headers=auth(jobs.buyer)).json()
        spent = {b["dataset"]: b["epsilon_spent"] for b in budgets if b["contract"] == agreed}
        assert spent == pytest.approx(charged, abs=1e-6), (spent, charged)
        period = job["finished_at"][:7] if job.get("finished_at") else None
        invoices = api.get("/v1/invoices", params={"period": period} if period else {}, headers=auth(jobs.buyer))
        assert invoices.status_code == 200, invoices.text
        lines = [line for invoice in invoices.json() if invoice["contract"] == agreed for line in invoice["lines"]]
        epsilon_lines = {line["org"]: line for line in lines if line["item"] == "epsilon"}
        assert set(epsilon_lines) == {"north", "south"}, lines
        for org, name in (("north", "retina-north"), ("south", "retina-south")):
            assert float(epsilon_lines[org]["quantity"]) == pytest.approx(charged[name], abs=1e-3)
        for steward, org in ((north, "north"), (south, "south")):
            seen = api.get("/v1/invoices", params={"period": period} if period else {}, headers=auth(steward)).json()
            orgs = {line["org"] for invoice in seen if invoice["contract"] == agreed for line in invoice["lines"]}
            assert orgs == {org}, f"{org}'s steward sees invoice lines of {orgs}"
    finally:
        jobs.tear_down()
