"""GPUs as a scheduled, metered resource: the device request on the container, detection, refusal of GPU jobs
no worker can run, admission up to the GPUs there are, GPU-hours and their quota, and what `/healthz` shows.

This machine has no GPU and its engine no NVIDIA runtime. Containers are only created here, never started
with a GPU: the engine resolves a device request when a container starts. A worker record inserted in the
store stands in for a GPU host where the API must believe one exists.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import pytest
from helpers import auth
from jobworld import JobWorld

from runners.base import JobDefinition, Resources, RunState, RunStatus
from runners.docker import LABEL_GPUS, DockerRunner, container_name
from runners.errors import RunnerError
from runners.gpus import GpuInfo, detect_gpus, parse_nvidia_smi_list, parse_proc_information
from sandbox.audit import SystemActor
from sandbox.jobs.lifecycle import JobState
from sandbox.jobs.service import ResourceRequest, move, resource_problems
from sandbox.store.models import Job, WorkerRecord
from sandbox.worker import Capacity, Worker, _usage

SMALL = Resources(cpus=1.0, memory_mb=128, timeout_s=30, pids=64, output_mb=10, tmp_mb=16, log_bytes=10_000)
GPU_HOST = "gpu-host-stand-in"


def host_has_nvidia() -> bool:
    return Path("/proc/driver/nvidia/gpus").exists() or shutil.which("nvidia-smi") is not None


# --- the runner: the device request on a created container ---


@pytest.fixture
def runner_parts(tmp_path: Path, analysis_image: str) -> Iterator[tuple[Any, Path, str]]:
    """A Docker client, a job folder and the analysis image; every container this test's instance made is
    removed afterwards, and none may be left."""
    client = docker.from_env()
    instance_id = f"test-gpu-{uuid.uuid4().hex[:8]}"
    (tmp_path / "code").mkdir()
    yield client, tmp_path, instance_id
    left = client.containers.list(all=True, filters={"label": f"org.sandbox.instance={instance_id}"})
    for container in left:
        container.remove(force=True)
    assert not left, f"containers left behind: {[c.name for c in left]}"


def definition(folder: Path, image: str, *, gpus: int) -> JobDefinition:
    return JobDefinition(id=f"g{uuid.uuid4().hex[:12]}", org="acme", image=image, command=["nvidia-smi", "-L"],
                         code_dir=folder / "code", resources=replace(SMALL, gpus=gpus))


def created(client: Any, job: JobDefinition) -> dict[str, Any]:
    attrs: dict[str, Any] = client.containers.get(container_name(job.id)).attrs
    return attrs


def environment(attrs: dict[str, Any]) -> dict[str, str]:
    return dict(entry.split("=", 1) for entry in attrs["Config"]["Env"])


def test_a_gpu_job_container_carries_the_device_request(runner_parts: tuple[Any, Path, str],
                                                        analysis_image: str) -> None:
    client, folder, instance_id = runner_parts
    runner = DockerRunner(state_dir=folder / "runner", instance_id=instance_id, client=client)
    job = definition(folder, analysis_image, gpus=1)
    try:
        runner.prepare(job)  # created, never started
        attrs = created(client, job)
    finally:
        runner.cleanup(job.id)
    assert attrs["State"]["Status"] == "created"
    requests = attrs["HostConfig"]["DeviceRequests"]
    assert [(r["Count"], r["DeviceIDs"] or [], r["Capabilities"]) for r in requests] == [(1, [], [["gpu"]])], \
        f"the engine was not asked for one GPU: {requests}"
    env = environment(attrs)
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility", "the job would get graphics and display libraries"
    assert not attrs["HostConfig"]["Privileged"] and attrs["HostConfig"]["CapDrop"] == ["ALL"]
    assert not attrs["HostConfig"]["Devices"], "a GPU job got raw host devices beside its device request"


def test_each_gpu_goes_to_one_job_at_a_time(runner_parts: tuple[Any, Path, str], analysis_image: str) -> None:
    """A runner that hands out this machine's GPUs names them by id: Docker's count of N means GPUs 0..N-1,
    so two one-GPU jobs by count would share GPU 0 while GPU 1 sat idle."""
    client, folder, instance_id = runner_parts
    gpus = tuple(GpuInfo(index=i, name="Stand-in GPU", uuid=f"GPU-{uuid.uuid4()}") for i in range(2))
    runner = DockerRunner(state_dir=folder / "runner", instance_id=instance_id, client=client, gpus=gpus)
    first, second, third = (definition(folder, analysis_image, gpus=1) for _ in range(3))
    cpu_job = definition(folder, analysis_image, gpus=0)
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:  # prepared at once, as the worker's pool does
            list(pool.map(runner.prepare, [first, second]))
        given = [created(client, job)["HostConfig"]["DeviceRequests"] for job in (first, second)]
        ids = [request[0]["DeviceIDs"] for request in given]
        assert sorted(ids) == sorted([[gpu.uuid] for gpu in gpus]), f"two jobs share a GPU: {ids}"
        assert all(request[0]["Count"] in (0, None) for request in given), given
        assert created(client, first)["Config"]["Labels"][LABEL_GPUS] == ids[0][0]

        with pytest.raises(RunnerError, match="only 0 of this machine's 2 are free"):
            runner.prepare(third)
        runner.prepare(cpu_job)
        cpu = created(client, cpu_job)
        assert not cpu["HostConfig"]["DeviceRequests"], "a CPU job was given GPUs"
        # Under a default NVIDIA runtime, a CUDA image's own ENV would otherwise open every GPU.
        assert environment(cpu)["NVIDIA_VISIBLE_DEVICES"] == "void"

        runner.cleanup(first.id)  # its GPU is free again
        runner.prepare(third)
        assert created(client, third)["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] == ids[0]
    finally:
        for job in (first, second, third, cpu_job):
            runner.cleanup(job.id)


def test_a_job_cannot_choose_its_gpus_through_the_environment(runner_parts: tuple[Any, Path, str],
                                                              analysis_image: str) -> None:
    client, folder, instance_id = runner_parts
    runner = DockerRunner(state_dir=folder / "runner", instance_id=instance_id, client=client)
    job = replace(definition(folder, analysis_image, gpus=0), env={"NVIDIA_VISIBLE_DEVICES": "all"})
    with pytest.raises(RunnerError, match="the platform decides which GPUs"):
        runner.prepare(job)
    runner.cleanup(job.id)
    assert not client.containers.list(all=True, filters={"name": container_name(job.id)})


# --- detection ---


SMI_LIST = """GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5e1c2b7a-0c1d-4a8e-9f00-1b2c3d4e5f60)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d)
  MIG 1g.5gb      Device  0: (UUID: MIG-11111111-2222-3333-4444-555555555555)
"""

PROC_INFORMATION = """Model: \t\t NVIDIA H100 80GB HBM3
IRQ:   \t\t 150
GPU UUID: \t GPU-5e1c2b7a-0c1d-4a8e-9f00-1b2c3d4e5f60
Video BIOS: \t 96.00.74.00.01
Bus Type: \t PCIe
Bus Location: \t 0000:19:00.0
Device Minor: \t 3
GPU Excluded:\t No
"""


def test_nvidia_smi_listing_gives_whole_gpus_only() -> None:
    gpus = parse_nvidia_smi_list(SMI_LIST)
    assert [(g.index, g.name, g.device_id) for g in gpus] == [
        (0, "NVIDIA H100 80GB HBM3", "GPU-5e1c2b7a-0c1d-4a8e-9f00-1b2c3d4e5f60"),
        (1, "NVIDIA A100-SXM4-40GB", "GPU-0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d"),
    ], "a MIG slice was counted as a GPU, or a GPU was missed"


def test_the_drivers_proc_files_give_gpus_in_bus_order() -> None:
    later = PROC_INFORMATION.replace("0000:19:00.0", "0000:3b:00.0").replace("5e1c2b7a", "7f7f7f7f")
    excluded = PROC_INFORMATION.replace("GPU Excluded:\t No", "GPU Excluded:\t Yes")
    gpus = parse_proc_information([later, PROC_INFORMATION, excluded.replace("0000:19", "0000:5e")])
    assert [(g.index, g.uuid[:12]) for g in gpus] == [(0, "GPU-5e1c2b7a"), (1, "GPU-7f7f7f7f")]


def test_detection_finds_no_gpu_on_this_machine(tmp_path: Path) -> None:
    if host_has_nvidia():
        pytest.skip("this machine has NVIDIA GPUs; bench/gpu_check.sh checks detection there")
    client = docker.from_env()
    found = detect_gpus(client)
    assert found.gpus == (), f"detected GPUs on a machine without any: {found}"

    # A host that lists a GPU whose engine cannot serve it: still no GPU for jobs, and the log says why.
    if "nvidia" in (client.info().get("Runtimes") or {}):
        pytest.skip("this engine has the NVIDIA runtime")
    (tmp_path / "0000:19:00.0").mkdir()
    (tmp_path / "0000:19:00.0" / "information").write_text(PROC_INFORMATION)
    found = detect_gpus(client, proc_dir=tmp_path, nvidia_smi=None, hook=None, look_up_path=False)
    assert found.gpus == ()
    assert "has 1 NVIDIA GPU(s)" in found.problem and "'nvidia' runtime" in found.problem, found.problem


# --- submission, admission and metering through the API and the worker ---


def gpu_contract(world: JobWorld, *, gpu_hours: float = 1.0) -> str:
    response = world.api.post("/v1/contracts", headers=auth(world.steward), json={
        "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["analysis"],
        "purpose": "gpu jobs", "valid_until": "2099-01-01", "epsilon": 1.0,
        "quotas": {"concurrent_jobs": 4, "cpu_hours": 10, "gpu_hours": gpu_hours}})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def publish_gpu_host(world: JobWorld, *, gpus: int = 1, seen_at: datetime | None = None) -> None:
    with world.instance.sessions() as session:
        session.add(WorkerRecord(id=GPU_HOST, host=GPU_HOST, gpus=gpus, gpu_names=["Stand-in GPU"] * gpus,
                                 cpus=16.0, memory_mb=65536, seen_at=seen_at or datetime.now(UTC)))
        session.commit()


GPU_RESOURCES = {"cpus": 1, "memory_mb": 256, "timeout_s": 60, "gpus": 1}
CODE = {"main.py": "import time; time.sleep(60)\n"}


def test_a_gpu_job_no_live_worker_can_run_is_refused_not_queued(job_world: JobWorld) -> None:
    world = job_world
    world.worker.publish_worker()  # this machine's worker, as at its start: no GPU
    contract = gpu_contract(world)
    publish_gpu_host(world, seen_at=datetime.now(UTC) - timedelta(hours=1))  # gone for an hour
    refused = world.submit(CODE, ["python3", "main.py"], contract=contract, resources=GPU_RESOURCES, expect=422)
    assert [e for e in refused["errors"] if "no live worker has that many GPUs (the most any has is 0)" in e], \
        f"the refusal does not say why: {refused}"
    assert not world.api.get("/v1/jobs", headers=auth(world.buyer)).json(), "a refused GPU job was stored"
    with world.instance.read_session() as session:
        assert session.query(Job).count() == 0
        mine = session.get(WorkerRecord, world.worker.name)
        assert mine is not None and mine.gpus == 0 and mine.gpu_names == []


def test_gpu_jobs_are_admitted_up_to_the_gpus_there_are(job_world: JobWorld) -> None:
    world = job_world
    contract = gpu_contract(world)
    publish_gpu_host(world)
    first, second = (world.submit(CODE, ["python3", "main.py"], contract=contract, resources=GPU_RESOURCES)
                     for _ in range(2))
    cpu_job = world.submit(CODE, ["python3", "main.py"], contract=contract)
    assert {first["state"], second["state"], cpu_job["state"]} == {"queued"}

    # The worker of a one-GPU machine: it may hold one GPU job at a time, and CPU jobs beside it.
    worker = Worker(world.instance, world.runner, Capacity(cpus=4, memory_mb=4096, gpus=1))
    try:
        for future in worker.admit():
            future.result()
        states = {job["id"]: world.job(job["id"])["state"] for job in (first, second, cpu_job)}
        launched = [job_id for job_id in (first["id"], second["id"]) if states[job_id] != "queued"]
        assert len(launched) == 1, f"a one-GPU worker launched {len(launched)} GPU jobs at once: {states}"
        assert states[cpu_job["id"]] == "running", "a CPU job waited behind the GPU"
        if not host_has_nvidia():
            # Here the engine itself has no GPU: the launched job failed to start and holds nothing.
            reason = world.job(launched[0])["reason"]
            assert states[launched[0]] == "failed" and "could not start" in reason, reason
            for future in worker.admit():
                future.result()
            waiting = second["id"] if launched[0] == first["id"] else first["id"]
            assert world.job(waiting)["state"] != "queued", "the freed GPU was not given to the waiting job"
    finally:
        worker.stop()


def running_gpu_job(world: JobWorld, contract: str) -> str:
    """A GPU job the store shows running, as on a GPU host (this machine cannot start one)."""
    job_id = str(world.submit(CODE, ["python3", "main.py"], contract=contract, resources=GPU_RESOURCES)["id"])
    with world.instance.context(SystemActor(sub="test")) as ctx:
        job = ctx.session.get(Job, job_id)
        assert job is not None
        move(ctx, job, JobState.RUNNING)
    return job_id


def test_a_running_gpu_job_holds_its_gpu(job_world: JobWorld) -> None:
    world = job_world
    contract = gpu_contract(world)
    publish_gpu_host(world)
    running_gpu_job(world, contract)
    waiting = world.submit(CODE, ["python3", "main.py"], contract=contract, resources=GPU_RESOURCES)
    worker = Worker(world.instance, world.runner, Capacity(cpus=4, memory_mb=4096, gpus=1))
    try:
        assert worker.admit() == [], "a second GPU job was admitted to a one-GPU worker"
    finally:
        worker.stop()
    assert world.job(waiting["id"])["state"] == "queued"


def test_gpu_seconds_are_gpus_times_wall_seconds() -> None:
    status = RunStatus(state=RunState.EXITED, exit_code=0, started_at=1000.0, finished_at=1090.5, cpu_seconds=3.0)
    assert _usage(status, gpus=2)["gpu_seconds"] == pytest.approx(181.0)
    assert _usage(status, gpus=2)["wall_seconds"] == pytest.approx(90.5)
    assert "gpu_seconds" not in _usage(status), "a CPU job was metered GPU time"


def test_gpu_hours_are_metered_and_their_quota_enforced(job_world: JobWorld) -> None:
    world = job_world
    contract = gpu_contract(world, gpu_hours=1.0)
    publish_gpu_host(world)
    job_id = running_gpu_job(world, contract)
    worker = Worker(world.instance, world.runner, Capacity(cpus=4, memory_mb=4096, gpus=1))
    try:
        # Two hours on one GPU against a one-hour quota: metered, and the job is stopped.
        worker._record_usage(job_id, RunStatus(state=RunState.RUNNING, started_at=time.time() - 7200,
                                               cpu_seconds=1.0))
    finally:
        worker.stop()
    job = world.job(job_id)
    assert job["state"] == "cancelled" and "GPU-hours" in job["reason"], job
    assert job["usage"]["gpu_seconds"] == pytest.approx(7200, abs=60)
    usage = world.api.get("/v1/usage", headers=auth(world.steward)).json()
    assert [row["gpu_hours"] for row in usage if row["contract"] == contract] == [pytest.approx(2.0, abs=0.02)]

    refused = world.submit(CODE, ["python3", "main.py"], contract=contract, resources=GPU_RESOURCES, expect=403)
    assert "GPU-hours" in refused["detail"]
    # CPU jobs on the same contract still run: only its GPU-hours are spent.
    world.submit(CODE, ["python3", "main.py"], contract=contract)


def test_a_policy_without_gpus_refuses_gpu_jobs_plainly() -> None:
    runtime = {"max_cpus": 4, "max_memory_mb": 8192, "max_timeout_s": 600, "max_gpus": 0}
    assert resource_problems(ResourceRequest(gpus=1), runtime) == ["resources.gpus: the policy allows no GPUs"]
    assert resource_problems(ResourceRequest(gpus=0), runtime) == []
    assert resource_problems(ResourceRequest(gpus=2), {**runtime, "max_gpus": 1}) == \
        ["resources.gpus 2 is above the policy's limit of 1"]


# --- /healthz ---


def test_healthz_shows_workers_and_gpus_to_stewards_and_admins_only(job_world: JobWorld) -> None:
    world = job_world
    world.worker.publish_worker()
    publish_gpu_host(world, gpus=2)
    assert world.api.get("/healthz").json() == {"status": "ok"}
    assert world.api.get("/healthz", headers=auth(world.buyer)).json() == {"status": "ok"}, \
        "a buyer saw the workers"
    assert world.api.get("/healthz", headers={"Authorization": "Bearer forged"}).status_code == 401

    from helpers import Tokens

    for token in (world.steward, Tokens(world.instance).admin()):
        body = world.api.get("/healthz", headers=auth(token)).json()
        assert body["status"] == "ok"
        workers = {w["id"]: w for w in body["details"]["workers"]}
        gpu_host = workers[GPU_HOST]
        assert (gpu_host["gpus"], gpu_host["gpu_names"], gpu_host["live"]) == (2, ["Stand-in GPU"] * 2, True)
        here = workers[world.worker.name]
        assert (here["gpus"], here["gpu_names"], here["live"]) == (0, [], True)
