"""The swarm lab for the tests under tests/swarm/: one per session, left with nothing of the project's on it.

`swarm_lab` brings up three dockerd nodes in network namespaces (node 3 with one fake GPU) and takes them
down at the session's end, after checking that no service, task container, network or secret labelled
`org.sandbox.managed=1` is left on any node. Cached images and swarm state persist between sessions
under the lab's root, so a warm start takes seconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import pytest

from runners.base import LABEL_MANAGED
from runners.images import DEFAULT_BASE_IMAGE
from runners.registry import RegistryImages
from runners.swarm_lab import SwarmLab, lab_session, why_no_lab

REQUIRE_DOCKER = os.environ.get("SANDBOX_REQUIRE_DOCKER") == "1"
MANAGED = f"{LABEL_MANAGED}=1"
# Task containers go some seconds after their service: the node's agent removes them on its next beat.
LEFTOVER_WAIT_S = 30.0


def _unavailable(why: str) -> None:
    if REQUIRE_DOCKER:
        pytest.fail(f"Docker is required (SANDBOX_REQUIRE_DOCKER=1) but {why}")
    pytest.skip(f"{why} (set SANDBOX_REQUIRE_DOCKER=1 to fail instead)")


def engine(url: str, timeout: int = 120) -> Any:
    """A client of one lab engine."""
    return docker.DockerClient(base_url=url, timeout=timeout)


@pytest.fixture(scope="session")
def swarm_lab() -> Iterator[SwarmLab]:
    """Three nodes, node 1 the manager, node 3 with one fake GPU; checked for leftovers, then taken down.

    Another test session on this machine may hold the lab too: then the last one to finish checks and
    takes it down (a check before that would find the other session's work in progress).
    """
    why = why_no_lab()
    if why is not None:
        _unavailable(why)
    left: list[str] = []

    def check(lab: SwarmLab) -> None:
        left.extend(leftovers(lab))
        if left:
            remove_leftovers(lab)

    with lab_session(nodes=3, gpu_nodes={3: 1}, before_down=check) as lab:
        yield lab
    assert not left, f"the project's objects were left on the swarm lab: {left}"


@pytest.fixture(scope="session")
def host_engine() -> Iterator[Any]:
    """The machine's own engine, where the job images are built."""
    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except (docker.errors.DockerException, OSError) as error:
        _unavailable(f"no Docker engine is reachable: {error}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def lab_images(swarm_lab: SwarmLab, host_engine: Any) -> Iterator[RegistryImages]:
    """Host image ids as digest references in the lab registry, pushed by the manager; remembered under the
    lab's root, beside the registry storage, so each image is pushed once across sessions."""
    manager = engine(swarm_lab.manager_url, timeout=600)
    yield RegistryImages(source=host_engine, pusher=manager, registry=swarm_lab.registry,
                         state_dir=swarm_lab.root / "published")
    manager.close()


@pytest.fixture(scope="session")
def base_reference(host_engine: Any, lab_images: RegistryImages) -> str:
    """The debootstrapped base image (python3, no project code), pinned by digest in the lab registry."""
    try:
        image_id = host_engine.images.get(DEFAULT_BASE_IMAGE).id
    except docker.errors.ImageNotFound:
        _unavailable(f"the host engine has no {DEFAULT_BASE_IMAGE} (build it with `sandbox images build`)")
    return lab_images.reference(image_id)


def leftovers(lab: SwarmLab, wait_s: float = LEFTOVER_WAIT_S) -> list[str]:
    """What the project left on the lab (services, secrets, networks, containers), once it stops shrinking."""
    deadline = time.monotonic() + wait_s
    while True:
        found = _managed_objects(lab)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _managed_objects(lab: SwarmLab) -> list[str]:
    found = []
    for index, node in enumerate(lab.nodes):
        client = engine(node.engine_url, timeout=10)
        try:
            if index == 0:
                found += [f"service {s['Spec']['Name']}" for s in client.api.services(filters={"label": MANAGED})]
                found += [f"secret {s['Spec']['Name']}" for s in client.api.secrets(filters={"label": MANAGED})]
            found += [f"network {n['Name']} on {node.name}" for n in client.api.networks(filters={"label": MANAGED})]
            found += [f"container {c['Names'][0]} on {node.name}"
                      for c in client.api.containers(all=True, filters={"label": MANAGED})]
        except (docker.errors.DockerException, OSError) as error:
            found.append(f"{node.name}'s engine did not answer ({error})")
        finally:
            client.close()
    return found


def remove_leftovers(lab: SwarmLab) -> None:
    """Remove what the project left, so the next session starts from a clean lab."""
    for index, node in enumerate(lab.nodes):
        client = engine(node.engine_url, timeout=30)
        try:
            if index == 0:
                for service in client.api.services(filters={"label": MANAGED}):
                    client.api.remove_service(service["ID"])
                for secret in client.api.secrets(filters={"label": MANAGED}):
                    client.api.remove_secret(secret["ID"])
            for container in client.api.containers(all=True, filters={"label": MANAGED}):
                client.api.remove_container(container["Id"], force=True)
            for network in client.api.networks(filters={"label": MANAGED}):
                client.api.remove_network(network["Id"])
        except (docker.errors.DockerException, OSError):
            continue  # reported by `leftovers` already
        finally:
            client.close()
