"""Notebook kernels on the Swarm runner, on the 3-node lab.

A real notebook session (the service on a loopback port, its proxy, the session's Jupyter server, a worker
built by `swarm_worker` from the instance's settings), driven over the Jupyter wire protocol as JupyterLab
does: a cell runs in a kernel that is a service on a lab node, a long cell is interrupted, the hardening holds
inside the kernel, and removing the kernel and the session leaves no service, network or container. Then the
runner alone: the time limit, and what degrades where a node's engine is unknown.
"""

from __future__ import annotations

import json
import secrets
import signal
import textwrap
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import nbworld
import pytest
from helpers import Tokens, auth
from jobworld import analysis_image  # noqa: F401 - the session fixture this module uses
from nbworld import WORKER_TICK_S, NotebookWorld, make_notebook_world

from runners.base import (
    LABEL_INSTANCE,
    LABEL_KERNEL,
    LABEL_NOTEBOOK,
    JobDefinition,
    KernelDefinition,
    Resources,
    RunState,
)
from runners.errors import RunnerError
from runners.images import DEFAULT_BASE_IMAGE
from runners.registry import RegistryImages
from runners.swarm import LABEL_NODE
from runners.swarm_kernels import EXIT_KILLED, SwarmKernelRunner
from runners.swarm_lab import SwarmLab
from sandbox.config import Settings
from sandbox.instance import Instance, init_instance
from sandbox.worker import Worker, swarm_worker

pytestmark = pytest.mark.docker

WAIT_S = 60.0

# What the kernel sees of its sandbox, as one JSON line.
HARDENING = textwrap.dedent("""
    import json, os, socket
    status = dict(line.split(':\\t', 1) for line in open('/proc/self/status').read().splitlines() if ':\\t' in line)
    routes = [line.split() for line in open('/proc/net/route').read().splitlines()[1:] if line.strip()]
    def writable(path):
        try:
            open(path, 'w').close()
            return True
        except OSError:
            return False
    try:
        socket.create_connection(('10.232.0.1', 5000), timeout=3).close()
        reached = True
    except OSError:
        reached = False
    print(json.dumps({'uid': os.getuid(), 'cwd': os.getcwd(), 'no_new_privs': status['NoNewPrivs'].strip(),
                      'cap_eff': status['CapEff'].strip(), 'cap_bnd': status['CapBnd'].strip(),
                      'root_writable': writable('/written-to-root'), 'code_writable': writable('/code/x'),
                      'output_writable': writable('/output/x'), 'reached_host': reached,
                      'default_route': any(r[1] == '00000000' for r in routes),
                      'interfaces': sorted(os.listdir('/sys/class/net'))}))
""")


def lab_engine(url: str) -> Any:
    return docker.DockerClient(base_url=url, timeout=60)


def lab_leftovers(lab: SwarmLab, label: str) -> list[str]:
    """Services, networks and task containers carrying `label` anywhere on the lab."""
    found = []
    for index, node in enumerate(lab.nodes):
        client = lab_engine(node.engine_url)
        try:
            if index == 0:
                found += [f"service {s['Spec']['Name']}" for s in client.api.services(filters={"label": label})]
            found += [f"network {n['Name']} on {node.name}" for n in client.api.networks(filters={"label": label})]
            found += [f"container {c['Names'][0]} on {node.name}"
                      for c in client.api.containers(all=True, filters={"label": label})]
        finally:
            client.close()
    return found


def wait_nothing_left(lab: SwarmLab, label: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while lab_leftovers(lab, label) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not lab_leftovers(lab, label), f"left on the swarm: {lab_leftovers(lab, label)}"


@pytest.fixture(scope="module")
def swarm_nb_world(swarm_lab: SwarmLab, lab_images: RegistryImages, analysis_image: str,  # noqa: F811
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[NotebookWorld]:
    """One service, dataset and set of contracts, with a worker and notebook servers whose kernels run on the lab."""
    tmp = tmp_path_factory.mktemp("swarm-notebooks")
    # Pulled on every node now, so no kernel start waits for 1.3 GB (cached across sessions).
    reference = lab_images.reference(analysis_image)
    for node in swarm_lab.nodes:
        client = lab_engine(node.engine_url)
        try:
            client.api.inspect_image(reference)
        except docker.errors.ImageNotFound:
            client.api.pull(reference)
        finally:
            client.close()
    settings = Settings(home=tmp / "home", log_json=True, notebook_cull_interval_s=1, runner="swarm",
                        swarm_manager_url=swarm_lab.manager_url, swarm_registry=swarm_lab.registry,
                        swarm_node_engines={node.name: node.engine_url for node in swarm_lab.nodes})
    init_instance(settings)
    instance = Instance(settings)

    def start_worker(instance: Instance, runner_dir: Path) -> Worker:
        worker = swarm_worker(instance)  # as `sandbox worker` builds it with runner = "swarm"
        worker.refresh_images()
        worker.start_thread(WORKER_TICK_S)
        return worker

    with ExitStack() as stack, pytest.MonkeyPatch.context() as patch:
        stack.callback(instance.close)
        patch.setattr(nbworld, "start_worker", start_worker)
        yield from make_notebook_world(instance, Tokens(instance), tmp)
    wait_nothing_left(swarm_lab, f"{LABEL_INSTANCE}={instance.instance_id}")


def kernel_service(world: NotebookWorld, manager: Any, session_id: str) -> dict[str, Any]:
    """The one kernel service of the session, with its task."""
    services = manager.api.services(filters={"label": [f"{LABEL_NOTEBOOK}={session_id}",
                                                       f"{LABEL_INSTANCE}={world.instance.instance_id}"]})
    assert len(services) == 1, f"the session has {len(services)} kernel services"
    tasks = manager.api.tasks(filters={"service": services[0]["ID"]})
    assert len(tasks) == 1, tasks
    return {**services[0], "task": tasks[0]}


@pytest.fixture(scope="module")
def manager(swarm_lab: SwarmLab) -> Iterator[Any]:
    client = lab_engine(swarm_lab.manager_url)
    yield client
    client.close()


def test_a_cell_runs_in_a_kernel_service_on_a_lab_node(swarm_nb_world: NotebookWorld, swarm_lab: SwarmLab,
                                                       manager: Any) -> None:
    world = swarm_nb_world
    session = world.session("dp_only")
    kernel = world.shared_kernel("dp_only")
    result = kernel.execute("print(6 * 7)")
    assert result.reply["content"]["status"] == "ok" and "42" in result.stdout, result.text

    service = kernel_service(world, manager, session["id"])
    spec = service["Spec"]
    assert spec["Mode"] == {"Replicated": {"Replicas": 1}}
    assert spec["TaskTemplate"]["RestartPolicy"]["Condition"] == "none"
    image = spec["TaskTemplate"]["ContainerSpec"]["Image"]
    assert image.startswith(f"{swarm_lab.registry}/") and "@sha256:" in image, f"not pinned by digest: {image}"
    task = service["task"]
    assert task["Status"]["State"] == "running"
    node = manager.api.inspect_node(task["NodeID"])["Spec"]["Labels"][LABEL_NODE]
    assert node in {n.name for n in swarm_lab.nodes}
    network = manager.api.inspect_network(spec["TaskTemplate"]["Networks"][0]["Target"])
    assert network["Driver"] == "overlay" and network["Internal"] is True

    container_id = task["Status"]["ContainerStatus"]["ContainerID"]
    on_node = lab_engine(swarm_lab.node(node).engine_url)
    try:
        labels = on_node.api.inspect_container(container_id)["Config"]["Labels"]
    finally:
        on_node.close()
    assert labels[LABEL_NOTEBOOK] == session["id"] and labels[LABEL_KERNEL] == spec["Labels"][LABEL_KERNEL]
    on_host = docker.from_env().api.containers(
        all=True, filters={"label": f"{LABEL_INSTANCE}={world.instance.instance_id}"})
    assert not on_host, "a kernel ran on this machine's own engine"


def test_the_hardening_holds_in_the_kernel(swarm_nb_world: NotebookWorld) -> None:
    result = swarm_nb_world.shared_kernel("dp_only").execute(HARDENING)
    assert result.reply["content"]["status"] == "ok", result.text
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["uid"] == 10001 and seen["cwd"] == "/output", seen
    assert seen["cap_eff"] == seen["cap_bnd"] == "0000000000000000", f"capabilities left: {seen}"
    assert seen["no_new_privs"] == "1", "the node's engine runs without --no-new-privileges"
    assert not seen["root_writable"] and not seen["code_writable"] and seen["output_writable"], seen
    assert not seen["default_route"] and not seen["reached_host"], f"the kernel has egress: {seen}"
    assert seen["interfaces"] == ["eth0", "lo"], seen


def test_an_interrupt_stops_a_long_cell_and_the_kernel_lives_on(swarm_nb_world: NotebookWorld) -> None:
    kernel = swarm_nb_world.shared_kernel("dp_only")
    msg_id = kernel.send("execute_request", {
        "code": "import time\nprint('sleeping', flush=True)\ntime.sleep(600)", "silent": False,
        "store_history": True, "user_expressions": {}, "allow_stdin": False, "stop_on_error": True})
    deadline = time.monotonic() + WAIT_S
    running = False
    while not running:  # the cell is running once its first output arrives
        message = kernel.receive(timeout=max(0.1, deadline - time.monotonic()))
        running = (message["parent_header"].get("msg_id") == msg_id and message["msg_type"] == "stream"
                   and "sleeping" in message["content"]["text"])
    interrupted = httpx.post(f"{kernel.base}api/kernels/{kernel.id}/interrupt",
                             headers={"Authorization": f"token {kernel.token}"}, timeout=WAIT_S)
    assert interrupted.status_code == 204, interrupted.text
    while True:
        message = kernel.receive(timeout=max(0.1, deadline - time.monotonic()))
        if message["parent_header"].get("msg_id") == msg_id and message["msg_type"] == "execute_reply":
            break
    assert message["content"]["status"] == "error" and message["content"]["ename"] == "KeyboardInterrupt", message
    assert "still here" in kernel.execute("print('still here')").stdout


def test_removing_a_kernel_and_the_session_meters_it_and_leaves_nothing(swarm_nb_world: NotebookWorld,
                                                                         swarm_lab: SwarmLab, manager: Any) -> None:
    world = swarm_nb_world
    session = world.session("dp_only")
    kernel = world.shared_kernel("dp_only")
    kernel.execute("sum(i * i for i in range(3_000_000))")
    service = kernel_service(world, manager, session["id"])
    network_id = service["Spec"]["TaskTemplate"]["Networks"][0]["Target"]
    node = manager.api.inspect_node(service["task"]["NodeID"])["Spec"]["Labels"][LABEL_NODE]

    stopped = httpx.delete(f"{kernel.base}api/kernels/{kernel.id}",
                           headers={"Authorization": f"token {kernel.token}"}, timeout=WAIT_S)
    assert stopped.status_code == 204, stopped.text
    world.kernel_by_tier.pop("dp_only", None)
    # The runner waits for the container to leave its node before the shutdown answers.
    assert not manager.api.services(filters={"id": service["ID"]}), "the kernel's service is left"
    with pytest.raises(docker.errors.NotFound):
        manager.api.inspect_network(network_id)
    on_node = lab_engine(swarm_lab.node(node).engine_url)
    try:
        assert not on_node.api.containers(all=True, filters={"label": f"{LABEL_NOTEBOOK}={session['id']}"})
    finally:
        on_node.close()
    job = world.http.get(f"/v1/jobs/{session['id']}", headers=auth(world.buyer)).json()
    assert job["usage"]["kernels"] == 1 and job["usage"]["cpu_seconds"] > 0.1, job["usage"]

    world.kernel(session)  # a second kernel, which the session's end removes
    ended = world.http.delete(f"/v1/notebooks/{session['id']}", headers=auth(world.buyer))
    assert ended.status_code == 200 and ended.json()["state"] == "done", ended.text
    world.sessions.remove(session["id"])
    world.by_tier.pop("dp_only", None)
    wait_nothing_left(swarm_lab, f"{LABEL_NOTEBOOK}={session['id']}")


# --- the runner alone, on the base image ---------------------------------------------------------------------

SLEEPER = "import time\nprint('up', flush=True)\ntime.sleep(600)"


def definition(tmp_path: Path, image_id: str, *, key: str, timeout_s: int = 600) -> KernelDefinition:
    for folder in ("code", "workspace", "ipc"):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder).chmod(0o777)
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    job = JobDefinition(id=f"nb-{key}", org="acme", image=image_id, command=["python3", "-c", SLEEPER],
                        code_dir=tmp_path / "code", data_files={"d.parquet": tmp_path / "data.parquet"},
                        resources=Resources(cpus=0.5, memory_mb=256, timeout_s=timeout_s))
    return KernelDefinition(key=key, notebook="nb", contract="c", job=job, workspace=tmp_path / "workspace",
                            ipc_dir=tmp_path / "ipc")


@pytest.fixture
def lone_runner(swarm_lab: SwarmLab, manager: Any, lab_images: RegistryImages, base_reference: str,
                tmp_path: Path) -> Iterator[tuple[SwarmKernelRunner, str]]:
    """A kernel runner with every node's engine, and the base image's id (python3, nothing else)."""
    del base_reference  # pushed: the runner finds it by id
    engines = {node.name: lab_engine(node.engine_url) for node in swarm_lab.nodes}
    runner = SwarmKernelRunner(manager, instance_id=f"swarm-kernels-{tmp_path.name}"[:60], images=lab_images,
                               node_engines=engines)
    yield runner, docker.from_env().images.get(DEFAULT_BASE_IMAGE).id
    for status in runner.kernels():
        runner.remove_kernel(status.key)
    wait_nothing_left(swarm_lab, f"{LABEL_INSTANCE}={runner.instance_id}")
    for client in engines.values():
        client.close()


def test_a_kernel_past_its_time_limit_is_killed(lone_runner: tuple[SwarmKernelRunner, str], tmp_path: Path) -> None:
    runner, image_id = lone_runner
    key = f"late-{secrets.token_hex(4)}"  # service names are the swarm's, across instances and runs
    runner.start_kernel(definition(tmp_path, image_id, key=key, timeout_s=1))
    deadline = time.monotonic() + WAIT_S
    status = runner.kernel_status(key)
    while not status.timed_out and time.monotonic() < deadline:
        assert status.state is RunState.RUNNING, status
        time.sleep(0.2)
        status = runner.kernel_status(key)
    assert status.timed_out and status.state is RunState.EXITED and status.exit_code == EXIT_KILLED, status
    assert [(k.key, k.state) for k in runner.kernels()] == [(key, RunState.EXITED)]
    runner.remove_kernel(key)
    assert runner.kernels() == [] and runner.kernel_status(key).state is RunState.UNKNOWN


def test_without_its_nodes_engine_a_kernel_cannot_be_interrupted_but_still_ends(
        lone_runner: tuple[SwarmKernelRunner, str], tmp_path: Path) -> None:
    full, image_id = lone_runner
    runner = SwarmKernelRunner(full.manager, instance_id=full.instance_id, images=full.images, node_engines={})
    key = f"far-{secrets.token_hex(4)}"
    runner.start_kernel(definition(tmp_path, image_id, key=key))
    status = runner.kernel_status(key)
    assert status.state is RunState.RUNNING and status.started_at is not None
    with pytest.raises(RunnerError, match="interrupt"):
        runner.signal_kernel(key, signal.SIGINT)
    runner.signal_kernel(key, signal.SIGKILL)  # by removing the service: the swarm stops the task
    assert runner.kernel_status(key).state is RunState.UNKNOWN
