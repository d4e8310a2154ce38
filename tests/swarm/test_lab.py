"""The swarm lab itself: nodes Ready and labelled, no egress from an internal overlay, GPU placement, images
pinned by digest, a node's power cut seen by the manager and undone, and leftovers of a killed run repaired."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
import httpx
import pytest

from runners.base import LABEL_MANAGED
from runners.images import DEFAULT_BASE_IMAGE
from runners.registry import RegistryImages
from runners.swarm_lab import GENERIC_GPU, LABEL_NODE, RUN_DIR, SwarmLab, kill_node, lab_up, revive_node

pytestmark = pytest.mark.docker

TERMINAL = {"complete", "failed", "rejected", "shutdown", "orphaned", "remove"}
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
TASK_WAIT_S = 120.0

# Prints what the task sees: whether it has a default route, and whether a TCP connection to the lab
# registry on the host's bridge address gets through.
PROBE = """
import socket, sys
routes = open('/proc/net/route').read().splitlines()[1:]
default = any(line.split()[1] == '00000000' for line in routes if line.strip())
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    reached = 'yes'
except OSError as error:
    reached = f'no ({error})'
print(f"default_route={default} reached={reached}")
"""


@pytest.fixture(scope="module")
def manager(swarm_lab: SwarmLab) -> Iterator[Any]:
    client = engine(swarm_lab.manager_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def node_engines(swarm_lab: SwarmLab, manager: Any) -> Iterator[dict[str, Any]]:
    """Each node's engine by swarm node id."""
    urls = {node.name: node.engine_url for node in swarm_lab.nodes}
    clients = {node_id: engine(urls[name]) for node_id, name in _node_names(manager).items()}
    yield clients
    for client in clients.values():
        client.close()


def engine(url: str, timeout: int = 120) -> Any:
    return docker.DockerClient(base_url=url, timeout=timeout)


def _labels() -> dict[str, str]:
    return {LABEL_MANAGED: "1", "org.sandbox.test": "test_lab"}


@contextlib.contextmanager
def _network(manager: Any, *, internal: bool) -> Iterator[Any]:
    network = manager.networks.create(f"sbxtest-{uuid.uuid4().hex[:8]}", driver="overlay", internal=internal,
                                      labels=_labels())
    try:
        yield network
    finally:
        network.remove()


@contextlib.contextmanager
def _service(manager: Any, engines: dict[str, Any], image: str, command: list[str], **options: Any) -> Iterator[Any]:
    """A one-shot service; afterwards it is removed, and so are its task containers, which Docker 20.10 leaves
    on the nodes when a replicated-job service is removed."""
    service = manager.services.create(
        image, command=command, name=f"sbxtest-{uuid.uuid4().hex[:8]}",
        mode=docker.types.ServiceMode("replicated-job", concurrency=1, replicas=1),
        restart_policy=docker.types.RestartPolicy(condition="none"),
        labels=_labels(), container_labels=_labels(), **options)
    try:
        yield service
    finally:
        tasks = service.tasks()
        service.remove()
        for task in tasks:
            container = task["Status"].get("ContainerStatus", {}).get("ContainerID")
            if container and task.get("NodeID") in engines:
                with contextlib.suppress(docker.errors.NotFound):
                    engines[task["NodeID"]].api.remove_container(container, force=True)


def _wait_task(service: Any, states: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + TASK_WAIT_S
    while time.monotonic() < deadline:
        for task in service.tasks():
            if task["Status"]["State"] in states:
                found: dict[str, Any] = task
                return found
        time.sleep(0.2)
    raise AssertionError(f"no task of {service.name} reached {states} in {TASK_WAIT_S:.0f} s: {service.tasks()}")


def _node_names(manager: Any) -> dict[str, str]:
    return {entry["ID"]: (entry["Spec"].get("Labels") or {}).get(LABEL_NODE, "?") for entry in manager.api.nodes()}


def _manifest(lab: SwarmLab, reference: str) -> httpx.Response:
    repository, digest = reference.removeprefix(f"{lab.registry}/").split("@")
    return httpx.get(f"http://{lab.registry}/v2/{repository}/manifests/{digest}",
                     headers={"Accept": MANIFEST_V2}, trust_env=False, timeout=10)


def test_three_nodes_are_ready_labelled_and_only_node_3_offers_a_fake_gpu(swarm_lab: SwarmLab, manager: Any) -> None:
    entries = {(e["Spec"].get("Labels") or {}).get(LABEL_NODE): e for e in manager.api.nodes()}
    assert sorted(entries, key=str) == ["sbxlab-1", "sbxlab-2", "sbxlab-3"], f"the swarm's nodes: {list(entries)}"
    for node in swarm_lab.nodes:
        entry = entries[node.name]
        assert entry["Status"]["State"] == "ready", f"{node.name} is {entry['Status']}"
        assert entry["Spec"]["Availability"] == "active", f"{node.name} is {entry['Spec']['Availability']}"
        assert entry["Description"]["Hostname"] == node.name
        gpus = [r["NamedResourceSpec"]["Value"]
                for r in entry["Description"]["Resources"].get("GenericResources") or []
                if r.get("NamedResourceSpec", {}).get("Kind") == GENERIC_GPU]
        assert gpus == [f"fake-{node.name}-gpu{i}" for i in range(node.gpus)], f"{node.name} offers GPUs {gpus}"
        client = engine(node.engine_url)
        try:
            swarm = client.info()["Swarm"]
        finally:
            client.close()
        assert swarm["NodeAddr"] == node.address, f"{node.name} advertises {swarm['NodeAddr']}"
        assert swarm["ControlAvailable"] == (node == swarm_lab.nodes[0]), f"{node.name} manages: {swarm}"
    assert [node.gpus for node in swarm_lab.nodes] == [0, 0, 1]


def test_a_task_on_an_internal_overlay_cannot_reach_the_host(swarm_lab: SwarmLab, manager: Any,
                                                            node_engines: dict[str, Any], base_reference: str) -> None:
    host, port = swarm_lab.registry.split(":")
    probe = ["python3", "-c", PROBE, host, port]
    with _network(manager, internal=True) as internal, _network(manager, internal=False) as open_network, \
            _service(manager, node_engines, base_reference, probe, networks=[internal.id],
                     constraints=[f"node.labels.{LABEL_NODE}==sbxlab-2"]) as confined, \
            _service(manager, node_engines, base_reference, probe, networks=[open_network.id],
                     constraints=[f"node.labels.{LABEL_NODE}==sbxlab-1"]) as control:
        confined_task = _wait_task(confined, TERMINAL)
        control_task = _wait_task(control, TERMINAL)
        confined_log = b"".join(confined.logs(stdout=True, stderr=True)).decode(errors="replace")
        control_log = b"".join(control.logs(stdout=True, stderr=True)).decode(errors="replace")
    names = _node_names(manager)
    assert confined_task["Status"]["State"] == "complete", f"the confined probe: {confined_task['Status']}"
    assert control_task["Status"]["State"] == "complete", f"the control probe: {control_task['Status']}"
    # Not on the GPU node: its network churn would get the next test's GPU task rejected (see there).
    assert names[confined_task["NodeID"]] == "sbxlab-2"
    assert "default_route=False reached=no" in confined_log, f"a task on an internal overlay got out: {confined_log}"
    # The same probe on an ordinary overlay does get through: the confined one was stopped by its network.
    assert names[control_task["NodeID"]] == "sbxlab-1"
    assert "default_route=True reached=yes" in control_log, f"the control probe could not connect: {control_log}"


def test_a_gpu_reservation_lands_on_the_gpu_node_which_hands_it_a_fake_id(
        swarm_lab: SwarmLab, manager: Any, node_engines: dict[str, Any], base_reference: str) -> None:
    """The task reserving one NVIDIA-GPU goes to the only node that offers one, which tells it its id.

    Docker 20.10's swarmkit constraint enforcer rejects a task holding a named generic resource whenever its
    node is updated while the task is assigned (its "no longer available" check is inverted), and overlay
    networks coming and going update nodes, even nodes where none of their tasks run. In the lab, 6 of 8
    GPU tasks on fresh internal overlays were rejected ("assigned node no longer meets constraints"). This
    task has no network, and is tried again after such a rejection (another test's churn can still reach
    its node); the Swarm runner has to live with the same.
    """
    resources = docker.types.Resources(generic_resources={GENERIC_GPU: 1})
    command = ["python3", "-c", "import os; print('gpu=' + os.environ.get('DOCKER_RESOURCE_NVIDIA-GPU', '-'))"]
    rejections = []
    for _ in range(4):
        with _service(manager, node_engines, base_reference, command, resources=resources) as gpu_task:
            task = _wait_task(gpu_task, TERMINAL)
            log = b"".join(gpu_task.logs(stdout=True, stderr=True)).decode(errors="replace")
        if task["Status"].get("Message") != "task rejected by constraint enforcer":
            break
        rejections.append(task["Status"])
    assert task["Status"]["State"] == "complete", f"the GPU task: {task['Status']}; rejected before: {rejections}"
    assert _node_names(manager)[task["NodeID"]] == "sbxlab-3", "a GPU reservation was placed on a node without GPUs"
    assert "gpu=fake-sbxlab-3-gpu0" in log, log


def test_an_image_is_pinned_by_digest_and_a_node_pulls_that_exact_image(
        swarm_lab: SwarmLab, host_engine: Any, lab_images: RegistryImages, base_reference: str) -> None:
    source_id = host_engine.images.get(DEFAULT_BASE_IMAGE).id
    reference = lab_images.reference(source_id)
    assert reference == base_reference, "the same image id got a second reference"
    assert re.fullmatch(rf"{re.escape(swarm_lab.registry)}/sandbox-base@sha256:[0-9a-f]{{64}}", reference), reference
    manifest = _manifest(swarm_lab, reference)
    assert manifest.status_code == 200, manifest.text
    assert f"sha256:{hashlib.sha256(manifest.content).hexdigest()}" == reference.split("@")[1]
    assert json.loads(manifest.content)["config"]["digest"] == source_id, "the registry serves another image"
    node = engine(swarm_lab.nodes[2].engine_url, timeout=300)
    try:
        assert node.images.pull(reference).id == source_id
    finally:
        node.close()


def test_an_image_the_registry_lost_is_pushed_again(swarm_lab: SwarmLab, manager: Any, base_reference: str,
                                                    tmp_path: Path) -> None:
    # An image of its own, built on the manager (a label on the base: no layer, no container): deleting it
    # from the registry touches nothing another test uses.
    dockerfile = f"FROM {base_reference}\nLABEL org.sandbox.test={uuid.uuid4().hex}\n".encode()
    image = manager.images.build(fileobj=io.BytesIO(dockerfile), rm=True, forcerm=True)[0]
    published: set[str] = set()
    try:
        images = RegistryImages(source=manager, pusher=manager, registry=swarm_lab.registry, state_dir=tmp_path)
        with ThreadPoolExecutor(max_workers=4) as pool:
            references = set(pool.map(lambda _: images.reference(image.id), range(4)))
        assert len(references) == 1, f"concurrent callers got different references: {references}"
        reference = references.pop()
        published.add(reference)
        repository, digest = reference.removeprefix(f"{swarm_lab.registry}/").split("@")
        deleted = httpx.delete(f"http://{swarm_lab.registry}/v2/{repository}/manifests/{digest}",
                               trust_env=False, timeout=10)
        assert deleted.status_code == 202, deleted.text
        assert _manifest(swarm_lab, reference).status_code == 404
        # Another process would start from the same state folder: it must notice the loss.
        again = RegistryImages(source=manager, pusher=manager, registry=swarm_lab.registry, state_dir=tmp_path)
        republished = again.reference(image.id)
        published.add(republished)
        manifest = _manifest(swarm_lab, republished)
        assert manifest.status_code == 200, f"{republished} was not pushed again: {manifest.text}"
        assert json.loads(manifest.content)["config"]["digest"] == image.id
    finally:
        for ref in published:
            repository, digest = ref.removeprefix(f"{swarm_lab.registry}/").split("@")
            httpx.delete(f"http://{swarm_lab.registry}/v2/{repository}/manifests/{digest}", trust_env=False)
        manager.images.remove(image.id, force=True)


def _alive_in(pid: int, cgroup_parent: str) -> bool:
    try:
        return cgroup_parent in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


def test_a_killed_node_goes_down_with_its_containers_and_comes_back(
        swarm_lab: SwarmLab, manager: Any, node_engines: dict[str, Any], base_reference: str) -> None:
    victim = swarm_lab.node("sbxlab-2")
    with _service(manager, node_engines, base_reference, ["sleep", "600"],
                  constraints=[f"node.labels.{LABEL_NODE}=={victim.name}"]) as sleeper:
        task = _wait_task(sleeper, {"running", *TERMINAL})
        assert task["Status"]["State"] == "running", task["Status"]
        pid = task["Status"]["ContainerStatus"]["PID"]
        assert _alive_in(pid, f"sandbox-{victim.name}"), "the task's process is not in the node's cgroup"
        node_id = task["NodeID"]
        try:
            kill_node(swarm_lab, victim.name)
            assert manager.api.inspect_node(node_id)["Status"]["State"] == "down"
            assert not _alive_in(pid, f"sandbox-{victim.name}"), "the task's process survived the power cut"
            with pytest.raises(docker.errors.DockerException):
                engine(victim.engine_url, timeout=3).ping()
        finally:
            revive_node(swarm_lab, victim.name)
        assert manager.api.inspect_node(node_id)["Status"]["State"] == "ready"
        client = engine(victim.engine_url)
        try:
            assert client.ping()
        finally:
            client.close()


def test_lab_up_repairs_a_node_of_another_swarm_and_a_killed_engine(swarm_lab: SwarmLab, manager: Any) -> None:
    """What a run killed midway leaves: a node whose swarm state matches no lab swarm, and an engine SIGKILLed
    with its pid file, socket and containerd left behind. lab_up must rejoin the one and restart the other."""
    stray, crashed = swarm_lab.node("sbxlab-3"), swarm_lab.node("sbxlab-2")
    client = engine(stray.engine_url)
    try:
        stray_id = client.info()["Swarm"]["NodeID"]
        client.api.leave_swarm(force=True)
    finally:
        client.close()
    crashed_pid = int((RUN_DIR / crashed.name / "docker.pid").read_text())
    os.kill(crashed_pid, signal.SIGKILL)

    assert lab_up(swarm_lab.root, nodes=3, gpu_nodes={3: 1}) == swarm_lab

    entries = manager.api.nodes()
    labels = sorted((e["Spec"].get("Labels") or {}).get(LABEL_NODE, "?") for e in entries)
    assert labels == ["sbxlab-1", "sbxlab-2", "sbxlab-3"], f"the swarm's nodes after the repair: {entries}"
    assert stray_id not in {e["ID"] for e in entries}, "the stray node's old entry was kept"
    assert all(e["Status"]["State"] == "ready" for e in entries), [e["Status"] for e in entries]
    rejoined = next(e for e in entries if e["Spec"]["Labels"][LABEL_NODE] == stray.name)
    assert rejoined["Description"]["Resources"].get("GenericResources"), "the GPU node lost its GPU on rejoining"
    restarted_pid = int((RUN_DIR / crashed.name / "docker.pid").read_text())
    assert restarted_pid != crashed_pid
    client = engine(crashed.engine_url)
    try:
        assert client.info()["Swarm"]["LocalNodeState"] == "active"
    finally:
        client.close()
