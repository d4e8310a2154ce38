"""Jobs on the Swarm runner, on the 3-node lab: end to end through a real worker, hardened in the running task,
placed by data locality and GPUs, a node's power cut mid-job (failed, or rerun under a policy that allows
it, charged once, nothing left), and a worker restarted mid-job that adopts the running service."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.models.services
import pytest
from fastapi.testclient import TestClient
from helpers import Tokens, auth, register_demo
from jobworld import JobWorld, analysis_image  # noqa: F401 - the session fixture this module uses
from sqlalchemy import select

from runners.base import LABEL_INSTANCE, JobDefinition, Resources, RunState
from runners.docker import container_options
from runners.errors import RunnerError
from runners.images import DEFAULT_BASE_IMAGE
from runners.registry import RegistryImages
from runners.swarm import LABEL_NODE, SwarmRunner, data_label, service_arguments, service_name
from runners.swarm_lab import SwarmLab, kill_node, revive_node
from sandbox.audit import verify_chain
from sandbox.billing.meters import CPU_SECONDS, MeterEvent, meter
from sandbox.billing.prices import Period
from sandbox.instance import Instance
from sandbox.store.models import AuditEvent, Job
from sandbox.worker import Capacity, Worker, job_definition

pytestmark = pytest.mark.docker

DATASET = "carotid-stenting"
DATA_LABEL = data_label(f"{DATASET}.v1")
WAIT_S = 120.0

# What the job's task sees of its sandbox, printed as one JSON line.
HARDENING = """
import json, os, socket, pandas as pd
status = dict(line.split(':\\t', 1) for line in open('/proc/self/status').read().splitlines() if ':\\t' in line)
routes = [line.split() for line in open('/proc/net/route').read().splitlines()[1:] if line.strip()]
try:
    open('/written-to-root', 'w').close()
    root_writable = True
except OSError:
    root_writable = False
try:
    socket.create_connection(('10.232.0.1', 5000), timeout=3).close()
    reached = True
except OSError:
    reached = False
rows = len(pd.read_parquet('/data/carotid-stenting.parquet'))
print(json.dumps({'uid': os.getuid(), 'no_new_privs': status['NoNewPrivs'].strip(),
                  'cap_eff': status['CapEff'].strip(), 'cap_bnd': status['CapBnd'].strip(),
                  'root_writable': root_writable, 'interfaces': sorted({r[0] for r in routes}),
                  'default_route': any(r[1] == '00000000' for r in routes), 'reached_host': reached,
                  'cgroup': open('/proc/self/cgroup').read().splitlines()[0], 'rows': rows,
                  'gpus': os.environ.get('NVIDIA_VISIBLE_DEVICES')}))
pd.DataFrame({'group': ['a', 'b'], 'n': [150, 150]}).to_csv('/output/summary.csv', index=False)
"""
# Runs until the test lets it finish (`SwarmWorld.let_finish` puts `go` in its read-only /code), so a node
# can be killed mid-run without racing the job's own end.
SLEEPER = """import os, time
print('started', flush=True)
deadline = time.monotonic() + 100
while not os.path.exists('/code/go') and time.monotonic() < deadline:
    time.sleep(0.1)
open('/output/done.txt', 'w').write('ok')
"""
# A quarter CPU each: two on one 2-CPU lab node leave room beside one-shot tasks other services left ended
# there, which Docker 20.10's constraint enforcer still counts against the node (moby/moby#52652).
SLEEPER_RESOURCES = {"cpus": 0.25, "memory_mb": 128, "timeout_s": 120}


@pytest.fixture
def database_url() -> None:
    """SQLite only: the store is not what these tests are about, and the swarm is the slow part."""
    return None


@dataclass
class SwarmWorld(JobWorld):
    lab: SwarmLab
    manager: Any
    engines: dict[str, Any]

    def task(self, job_id: str) -> dict[str, Any] | None:
        """The job's task on the manager (None until its service exists)."""
        tasks = job_tasks(self.manager, job_id)
        return tasks[0] if tasks else None

    def node_of(self, job_id: str) -> str:
        task = self.task(job_id)
        assert task is not None and task.get("NodeID"), f"job {job_id} has no task on a node: {task}"
        return str(self.manager.nodes.get(task["NodeID"]).attrs["Spec"]["Labels"][LABEL_NODE])

    def wait_task_running(self, job_id: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            self.worker.tick()
            task = self.task(job_id)
            if task is not None and task["Status"]["State"] == "running":
                return
            job = self.job(job_id)
            assert job["state"] in ("queued", "running"), f"job {job_id} is {job['state']}: {job['reason']}"
            time.sleep(0.2)
        raise AssertionError(f"job {job_id}'s task never ran: {self.task(job_id)}")

    def let_finish(self, job_id: str) -> None:
        """Tell a SLEEPER job to end (its code folder is a host folder, bound read-only into the task)."""
        (self.instance.settings.artifacts_dir / "jobs" / job_id / "code" / "go").touch()

    def leftovers(self) -> list[str]:
        """This instance's services, networks and task containers anywhere on the lab."""
        label = f"{LABEL_INSTANCE}={self.instance.instance_id}"
        found = [f"service {s.name}" for s in self.manager.services.list(filters={"label": label})]
        for name, client in self.engines.items():
            try:
                found += [f"network {n['Name']} on {name}" for n in client.api.networks(filters={"label": label})]
                found += [f"container {c['Names'][0]} on {name}"
                          for c in client.api.containers(all=True, filters={"label": label})]
            except (docker.errors.DockerException, OSError) as error:
                found.append(f"{name} did not answer: {error}")
        return found

    def wait_nothing_left(self, wait_s: float = 60.0) -> None:
        deadline = time.monotonic() + wait_s
        while self.leftovers() and time.monotonic() < deadline:
            self.worker.tick()  # its reconciliation removes the networks a cleanup could not
            time.sleep(0.5)
        assert not self.leftovers(), f"left on the swarm: {self.leftovers()}"


def place_data(manager: Any, label: str, nodes: set[str]) -> None:
    """Exactly `nodes` carry the data label `label` (an operator's replication, in the test)."""
    for node in manager.nodes.list():
        spec = node.attrs["Spec"]
        labels = dict(spec.get("Labels") or {})
        wanted = labels.get(LABEL_NODE) in nodes
        if wanted != (labels.get(label) == "1"):
            if wanted:
                labels[label] = "1"
            else:
                labels.pop(label, None)
            node.update({**spec, "Labels": labels})


@pytest.fixture(scope="module")
def manager(swarm_lab: SwarmLab) -> Iterator[Any]:
    client = engine(swarm_lab.manager_url)
    yield client
    place_data(client, DATA_LABEL, set())
    client.close()


@pytest.fixture(scope="module")
def node_engines(swarm_lab: SwarmLab) -> Iterator[dict[str, Any]]:
    clients = {node.name: engine(node.engine_url, timeout=30) for node in swarm_lab.nodes}
    yield clients
    for client in clients.values():
        client.close()


@pytest.fixture
def swarm_world(api: TestClient, instance: Instance, tokens: Tokens, tmp_path: Path, swarm_lab: SwarmLab,
                manager: Any, node_engines: dict[str, Any], lab_images: RegistryImages,
                analysis_image: str) -> Iterator[SwarmWorld]:  # noqa: F811 - the fixture imported above
    """A worker on the lab, in replicated data mode: the dataset's version is on sbxlab-2 only, to begin with."""
    lab_images.reference(analysis_image)  # pushed once per lab, outside any job's time limit
    place_data(manager, DATA_LABEL, {"sbxlab-2"})
    steward = tokens.steward(org="hospital")
    register_demo(api, steward, tmp_path, procedures=300)
    contract = api.post("/v1/contracts", headers=auth(steward), json={
        "buyer_org": "acme", "datasets": [DATASET], "tier": "aggregate", "kinds": ["analysis"],
        "purpose": "jobs", "valid_until": "2099-01-01", "epsilon": 1.0,
        "quotas": {"concurrent_jobs": 4, "cpu_hours": 10}})
    assert contract.status_code == 201, contract.text
    runner = SwarmRunner(manager, state_dir=tmp_path / "runner", instance_id=instance.instance_id,
                         images=lab_images, node_engines=node_engines, data_mode="replicated")
    worker = Worker(instance, runner, Capacity(cpus=6, memory_mb=8192, gpus=1))
    worker.refresh_images()
    world = SwarmWorld(api=api, instance=instance, worker=worker, runner=runner,  # type: ignore[arg-type]
                       steward=steward, buyer=tokens.buyer(org="acme"), contract=contract.json()["id"],
                       lab=swarm_lab, manager=manager, engines=node_engines)
    yield world
    for job_id in runner.managed_jobs():
        runner.terminate(job_id)
        runner.cleanup(job_id)
    world.wait_nothing_left(wait_s=30)
    world.tear_down()  # and nothing of the instance on the host engine either


@pytest.fixture
def small_runner(tmp_path: Path, manager: Any, node_engines: dict[str, Any], lab_images: RegistryImages,
                 base_reference: str) -> Iterator[tuple[SwarmRunner, str]]:
    """A runner alone (no worker), replicated data mode, and the base image's id (python3, nothing else)."""
    del base_reference  # pushed: the runner finds it by id
    runner = SwarmRunner(manager, state_dir=tmp_path / "runner", instance_id=f"swarm-jobs-{tmp_path.name}"[:60],
                         images=lab_images, node_engines=node_engines, data_mode="replicated")
    image_id = docker.from_env().images.get(DEFAULT_BASE_IMAGE).id
    yield runner, image_id
    for job_id in runner.managed_jobs():
        runner.terminate(job_id)
        runner.cleanup(job_id)


def test_the_service_carries_the_local_baseline(tmp_path: Path) -> None:
    """Pure: every limit of the local container maps onto the service, and an unmapped option stops it."""
    (tmp_path / "code").mkdir()
    (tmp_path / "output").mkdir()
    job = JobDefinition(id="j-map", org="acme", image="sha256:" + "0" * 64, command=["true"],
                        code_dir=tmp_path / "code", resources=Resources(cpus=1.5, memory_mb=300, pids=99, gpus=1))
    options = container_options(job, instance_id="i", output_dir=tmp_path / "output")
    arguments = service_arguments(options, image_ref="reg:5000/x@sha256:" + "1" * 64, network_id="net",
                                  name="sandbox-job-j-map", labels={"extra": "1"}, constraints=["node.labels.a==1"],
                                  generic_gpus=1)
    resources = arguments["resources"]
    assert resources["Limits"] == {"NanoCPUs": 1_500_000_000, "MemoryBytes": 300 * 2**20, "Pids": 99}
    assert resources["Reservations"]["NanoCPUs"] == 1_500_000_000
    assert resources["Reservations"]["GenericResources"] == [
        {"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 1}}]
    assert (arguments["user"], arguments["read_only"], arguments["cap_drop"], arguments["init"]) == (
        "10001:10001", True, ["ALL"], True)
    assert arguments["networks"] == ["net"] and arguments["constraints"] == ["node.labels.a==1"]
    assert arguments["restart_policy"]["Condition"] == "none" and arguments["mode"] == {"replicated": {"Replicas": 1}}
    assert {u["Name"]: u["Hard"] for u in arguments["ulimits"]} == {"nofile": 1024, "fsize": 100 * 2**20, "core": 0}
    tmpfs = [m for m in arguments["mounts"] if m["Type"] == "tmpfs"]
    assert tmpfs == [{"Target": "/tmp", "Source": None, "Type": "tmpfs", "ReadOnly": False,
                      "TmpfsOptions": {"SizeBytes": 256 * 2**20, "Mode": 0o1777}}]
    assert {m["Target"]: m["ReadOnly"] for m in arguments["mounts"] if m["Type"] == "bind"} == {
        "/code": True, "/output": False}
    assert arguments["labels"]["extra"] == "1" and arguments["container_labels"]["org.sandbox.job"] == "j-map"
    assert arguments["log_driver"] == "json-file" and arguments["log_driver_options"]["max-file"] == "2"
    with pytest.raises(TypeError, match="ulimits"):  # docker-py would drop them: create_service adds them
        docker.models.services._get_create_service_kwargs("create", dict(arguments))
    with pytest.raises(RunnerError, match="no Swarm mapping"):
        service_arguments({**options, "sysctls": {}}, image_ref="r", network_id="n", name="s", labels={},
                          constraints=[], generic_gpus=1)
    with pytest.raises(RunnerError, match="asks for 1 GPU"):
        service_arguments(options, image_ref="r", network_id="n", name="s", labels={}, constraints=[],
                          generic_gpus=0)
    chosen = service_arguments(container_options(job, instance_id="i", output_dir=tmp_path / "output"),
                               image_ref="r", network_id="n", name="s", labels={}, constraints=["node.id==x"],
                               generic_gpus=0, gpu_ids=["GPU-1234"])
    assert "NVIDIA_VISIBLE_DEVICES=GPU-1234" in chosen["env"] and "GenericResources" not in chosen["resources"][
        "Reservations"], "chosen GPUs must not be reserved from the swarm (20.10's enforcer would reject the task)"
    cpu_only = container_options(JobDefinition(id="j-cpu", org="acme", image=job.image, command=["true"],
                                               code_dir=tmp_path / "code"),
                                 instance_id="i", output_dir=tmp_path / "output", gpu_ids=[])
    cpu_arguments = service_arguments(cpu_only, image_ref="r", network_id="n", name="s", labels={}, constraints=[],
                                      generic_gpus=0)
    assert "NVIDIA_VISIBLE_DEVICES=void" in cpu_arguments["env"]


def test_a_job_runs_end_to_end_hardened_and_its_outputs_are_collected(swarm_world: SwarmWorld) -> None:
    w = swarm_world
    created = w.submit({"main.py": HARDENING}, ["python3", "main.py"])
    w.wait_task_running(created["id"])
    assert w.node_of(created["id"]) == "sbxlab-2", "the job ran where its data version is not"
    job = w.run_until(created["id"], {"in_review", "done", "failed"}, timeout=WAIT_S)
    assert job["state"] == "in_review" and job["exit_code"] == 0, job
    outputs = {o["path"]: o for o in job["outputs"]}
    assert set(outputs) == {"summary.csv", "logs/stdout.txt", "logs/stderr.txt"}, outputs
    assert w.review_text(created["id"], "summary.csv") == "group,n\na,150\nb,150\n"
    seen = json.loads(w.review_text(created["id"], "logs/stdout.txt"))
    assert seen["rows"] == 300, "the task did not read the dataset version"
    assert seen["uid"] == 10001, "the task ran as root"
    assert seen["cap_eff"] == seen["cap_bnd"] == "0000000000000000", "the task kept capabilities"
    assert seen["no_new_privs"] == "1", "the node engine does not set no-new-privileges"
    assert not seen["root_writable"], "the task's root file system is writable"
    assert seen["interfaces"] == ["eth0"] and not seen["default_route"], f"egress route: {seen}"
    assert not seen["reached_host"], "the task reached the host's registry: egress on an internal network"
    assert seen["cgroup"].endswith(":/"), f"the task sees the host's cgroup tree: {seen['cgroup']}"
    assert seen["gpus"] == "void", "a CPU task may see a GPU node's GPUs"
    usage = w.job(created["id"])["usage"]
    assert usage["cpu_seconds"] > 0 and "cpu_seconds_estimated" not in usage, usage
    w.wait_nothing_left()


def test_jobs_land_by_data_and_gpus_and_stop_at_their_time_limit(small_runner: tuple[SwarmRunner, str],
                                                         manager: Any, tmp_path: Path) -> None:
    runner, image_id = small_runner
    version = f"placement-{tmp_path.name[-8:].lower().replace('_', '-')}.v3"
    label = data_label(version)
    code = tmp_path / "code"
    code.mkdir()
    data = tmp_path / "rows.parquet"
    data.write_bytes(b"not really parquet")
    probe = ["python3", "-c", "import os; print(os.environ.get('NVIDIA_VISIBLE_DEVICES'))"]
    blind = SwarmRunner(manager, state_dir=tmp_path / "blind", instance_id=runner.instance_id,
                        images=runner.images, data_mode="replicated")
    try:
        missing = JobDefinition(id="j-nodata", org="acme", image=image_id, command=probe, code_dir=code,
                                data_files={"rows.parquet": data}, data_version=version)
        with pytest.raises(RunnerError, match="no Ready node holds"):
            runner.prepare(missing)
        place_data(manager, label, {"sbxlab-3"})
        on_data = JobDefinition(id="j-data", org="acme", image=image_id, command=probe, code_dir=code,
                                data_files={"rows.parquet": data}, data_version=version,
                                resources=Resources(cpus=0.25, memory_mb=64))
        gpu = JobDefinition(id="j-gpu", org="acme", image=image_id, command=probe, code_dir=code,
                            resources=Resources(cpus=0.25, memory_mb=64, gpus=1))
        # Past their time limit: one stopped through its node's engine, one by a runner without node engines
        # (its service removed instead, its CPU time estimated from the reservation).
        overdue = [JobDefinition(id=f"j-late-{which}", org="acme", image=image_id, code_dir=code,
                                 command=["sh", "-c", "echo before; sleep 60; echo after"],
                                 resources=Resources(cpus=0.25, memory_mb=64, timeout_s=2))
                   for which in ("seen", "blind")]
        for job, by in ((on_data, runner), (gpu, runner), (overdue[0], runner), (overdue[1], blind)):
            by.prepare(job)
            by.start(job)
        # The lab's one GPU is held until the first GPU job's service goes (it is not polled yet).
        second = JobDefinition(id="j-gpu2", org="acme", image=image_id, command=probe, code_dir=code,
                               resources=Resources(cpus=0.25, memory_mb=64, gpus=1))
        runner.prepare(second)
        with pytest.raises(RunnerError, match="no Ready node has that many free"):
            runner.start(second)
        assert runner.capacity().nodes == 3 and runner.capacity().gpus == 1
        # Running first, and only then polled: a task still waiting for a node has its time counted from its
        # service's creation, and on a busy machine a poll 2 s after that would rightly stop it before it ran.
        for job in overdue:
            wait_task_state(manager, job.id, "running")
        for job, by in ((overdue[0], runner), (overdue[1], blind)):
            late = wait_exited(by, job.id)
            assert late.timed_out and late.exit_code == 137 and late.lost is None, late
            assert by._service(job.id) is None, "an ended task's service was kept"
            assert by.collect(job.id, tmp_path / job.id).stdout.stored_at.read_text() == "before\n"
        assert late.usage_estimated and late.started_at is not None and late.finished_at is not None
        assert late.cpu_seconds == pytest.approx((late.finished_at - late.started_at) * 0.25) and late.cpu_seconds > 0
        nodes = {}
        for job in (on_data, gpu):
            status = wait_exited(runner, job.id)
            assert status.exit_code == 0 and status.lost is None, status
            nodes[job.id] = runner.node_of(job.id)
        logs = {job.id: runner.collect(job.id, tmp_path / job.id).stdout.stored_at.read_text().strip()
                for job in (on_data, gpu)}
        assert nodes == {"j-data": "sbxlab-3", "j-gpu": "sbxlab-3"}, nodes
        assert logs["j-gpu"] == "fake-sbxlab-3-gpu0", f"the GPU task was not given the node's GPU: {logs}"
        assert logs["j-data"] == "void", "a CPU task may see a GPU node's GPUs"
        # Shared mode: every node holds every version; the runner neither constrains nor labels (a node
        # update makes the swarm re-check, and on 20.10 wrongly reject, the node's tasks).
        shared = SwarmRunner(manager, state_dir=tmp_path / "shared", instance_id=runner.instance_id,
                             images=runner.images, data_mode="shared")
        assert shared._constraints(on_data) == []
        labelled = {n.attrs["Spec"]["Labels"][LABEL_NODE] for n in manager.nodes.list()
                    if n.attrs["Spec"]["Labels"].get(label) == "1"}
        assert labelled == {"sbxlab-3"}, "shared mode labelled nodes"
    finally:
        place_data(manager, label, set())
        for job_id in blind.managed_jobs():
            blind.cleanup(job_id)
        # Without node engines, a removed service's task keeps its network for up to ~30 s; the worker's
        # reconciliation (managed_jobs, every tick) removes it once the task lets go.
        deadline = time.monotonic() + 90
        while manager.networks.list(filters={"name": "sandbox-job-j-late-blind"}) and time.monotonic() < deadline:
            blind.managed_jobs()
            time.sleep(1)


def test_a_node_lost_mid_job_fails_it_or_reruns_it_once_charging_once(swarm_world: SwarmWorld,
                                                                      tokens: Tokens) -> None:
    w = swarm_world
    rerun_contract = contract_with_rerun(w, tokens)
    failing = w.submit({"main.py": SLEEPER}, ["python3", "main.py"], resources=SLEEPER_RESOURCES)["id"]
    rerun = w.submit({"main.py": SLEEPER}, ["python3", "main.py"], resources=SLEEPER_RESOURCES,
                     contract=rerun_contract)["id"]
    for job_id in (failing, rerun):
        w.wait_task_running(job_id)
        assert w.node_of(job_id) == "sbxlab-2"
    place_data(w.manager, DATA_LABEL, {"sbxlab-2", "sbxlab-3"})  # somewhere for the rerun to go
    w.worker.tick()  # a usage sample of each run before the power cut
    kill_node(w.lab, "sbxlab-2")
    try:
        failed = w.run_until(failing, {"failed", "in_review", "done"}, timeout=WAIT_S)
        assert failed["state"] == "failed", (failed["state"], failed["reason"])
        assert "node lost: sbxlab-2 went down mid-job" in failed["reason"], failed["reason"]
        w.wait_task_running(rerun)
        assert w.node_of(rerun) == "sbxlab-3", "the rerun went where the data is not"
        w.let_finish(rerun)
        done = w.run_until(rerun, {"in_review", "done", "failed"}, timeout=WAIT_S)
        assert done["state"] in ("in_review", "done") and done["exit_code"] == 0, (done["state"], done["reason"])
        assert "done.txt" in {o["path"] for o in done["outputs"]}
    finally:
        revive_node(w.lab, "sbxlab-2")
    with w.instance.read_session() as session:
        events = list(session.execute(select(AuditEvent).where(AuditEvent.object_id.in_([failing, rerun]))
                                      .order_by(AuditEvent.seq)).scalars())
        assert verify_chain(session, w.instance.public_key).ok, "the audit chain broke"
    lost = {e.object_id: e.details for e in events if e.action == "job.run.lost"}
    assert lost[failing]["rerun"] is False and lost[rerun]["rerun"] is True, lost
    moves = [e.action for e in events if e.object_id == rerun and e.action in ("job.run.lost", "job.queued",
                                                                                "job.running", "job.checking")]
    assert moves == ["job.running", "job.run.lost", "job.queued", "job.running", "job.checking"], moves
    # Charged once: the rerun's running total continues from the lost run's, and the metered CPU seconds
    # (an invoice's figure) are that total, not the lost run's added again.
    usage = w.job(rerun)["usage"]
    totals = [float(e.details["cpu_seconds"]) for e in events if e.object_id == rerun and e.action == "job.usage"]
    assert usage["lost_runs"] == 1 and 0 < usage["lost_cpu_seconds"] <= usage["cpu_seconds"], usage
    assert totals == sorted(totals) and totals[-1] == pytest.approx(usage["cpu_seconds"]), totals
    now = datetime.now(UTC)
    metered = meter([MeterEvent(seq=e.seq, at=e.at.replace(tzinfo=UTC) if e.at.tzinfo is None else e.at,
                                action=e.action, job=e.object_id, details=e.details)
                     for e in events if e.object_id == rerun and e.action == "job.usage"], Period(now.year, now.month))
    assert metered[CPU_SECONDS].quantity == Decimal(str(totals[-1])), metered
    w.wait_nothing_left()


def test_a_restarted_worker_adopts_the_running_services(swarm_world: SwarmWorld, manager: Any,
                                                        node_engines: dict[str, Any],
                                                        lab_images: RegistryImages) -> None:
    w = swarm_world
    running = w.submit({"main.py": SLEEPER}, ["python3", "main.py"], resources=SLEEPER_RESOURCES)["id"]
    w.wait_task_running(running)
    assert w.job(running)["state"] == "running"
    # A second job whose service the old worker created just before it died, before it recorded so.
    started = w.submit({"main.py": SLEEPER}, ["python3", "main.py"], resources=SLEEPER_RESOURCES)["id"]
    with w.instance.read_session() as session:
        stored = session.get(Job, started)
        assert stored is not None and stored.state == "queued"
        definition = job_definition(w.instance, stored)
    w.runner.prepare(definition)
    w.runner.start(definition)
    w.worker.stop()  # the old worker is gone; nothing of it survives but the store and the swarm
    runner = SwarmRunner(manager, state_dir=w.runner.state_dir, instance_id=w.instance.instance_id,
                         images=lab_images, node_engines=node_engines, data_mode="replicated")
    w.worker = Worker(w.instance, runner, Capacity(cpus=6, memory_mb=8192, gpus=1))
    w.runner = runner  # type: ignore[assignment]
    w.wait_task_running(started)
    assert w.job(started)["state"] == "running", "the new worker did not adopt the service started for it"
    for job_id in (running, started):
        w.let_finish(job_id)
        job = w.run_until(job_id, {"in_review", "done", "failed"}, timeout=WAIT_S)
        assert job["state"] in ("in_review", "done") and job["exit_code"] == 0, (job["state"], job["reason"])
        assert "done.txt" in {o["path"] for o in job["outputs"]}
    w.wait_nothing_left()


def contract_with_rerun(w: SwarmWorld, tokens: Tokens) -> str:
    """A contract pinning the default policy with `on_node_loss: rerun_once`, approved by a second steward."""
    body = w.api.get("/v1/policies/default/versions/1", headers=auth(w.steward)).json()["body"]
    body["runtime"]["on_node_loss"] = "rerun_once"
    proposed = w.api.post("/v1/policies", headers=auth(w.steward), json=body)
    assert proposed.status_code == 201, proposed.text
    version = proposed.json()["version"]
    approved = w.api.post(f"/v1/policies/default/versions/{version}/approve",
                          headers=auth(tokens.steward(sub="steward-2", org="hospital")), json={})
    assert approved.status_code == 200, approved.text
    contract = w.api.post("/v1/contracts", headers=auth(w.steward), json={
        "buyer_org": "acme", "datasets": [DATASET], "tier": "aggregate", "kinds": ["analysis"],
        "purpose": "jobs that may rerun", "valid_until": "2099-01-01", "epsilon": 1.0,
        "policy": f"default@{version}", "quotas": {"concurrent_jobs": 4, "cpu_hours": 10}})
    assert contract.status_code == 201, contract.text
    return str(contract.json()["id"])


def job_tasks(manager: Any, job_id: str) -> list[dict[str, Any]]:
    """The tasks of the job's service on the manager (none until the service exists)."""
    services = manager.services.list(filters={"name": service_name(job_id)})
    return list(services[0].tasks()) if services else []


def wait_task_state(manager: Any, job_id: str, state: str) -> None:
    """Wait, asking the manager and not the runner (whose polls act), until the job's task is in `state`."""
    deadline = time.monotonic() + WAIT_S
    tasks: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        tasks = job_tasks(manager, job_id)
        if any(task["Status"]["State"] == state for task in tasks):
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}'s task never reached {state}: {tasks}")


def wait_exited(runner: SwarmRunner, job_id: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        status = runner.poll(job_id)
        if status.state is RunState.EXITED:
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not exit: {runner.poll(job_id)}")



def engine(url: str, timeout: int = 120) -> Any:
    return docker.DockerClient(base_url=url, timeout=timeout)
