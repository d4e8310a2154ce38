"""Attack: send data out over the network, to the internet, the Docker host, or the service's own port."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import stand_in_api
from runner_support import JobFiles, last_json_line, logs, run_to_exit

from runners.docker import DockerRunner

pytestmark = pytest.mark.docker

PROBE = """
import json, socket, sys
results = {}
for host, port in json.loads(sys.argv[1]):
    for kind in ("tcp", "udp"):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
        s.settimeout(3)
        try:
            if kind == "tcp":
                s.connect((host, port))
                s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
                results[f"{kind} {host}:{port}"] = "CONNECTED " + s.recv(64).decode(errors="replace")
            else:
                s.sendto(b"leak", (host, port))
                results[f"{kind} {host}:{port}"] = "SENT"
        except OSError as error:
            results[f"{kind} {host}:{port}"] = f"blocked errno={error.errno}"
        finally:
            s.close()
try:
    socket.getaddrinfo("example.com", 443)
    results["dns example.com"] = "RESOLVED"
except OSError as error:
    results["dns example.com"] = f"blocked {error}"
interfaces = sorted(name for _, name in socket.if_nameindex())
net_dev = [line.split(":")[0].strip() for line in open("/proc/net/dev").read().splitlines()[2:]]
print(json.dumps({"results": results, "interfaces": interfaces, "net_dev": net_dev}))
"""


@pytest.fixture
def host_server() -> Iterator[int]:
    """A real HTTP server on every host address, standing in for the API's own port."""
    with stand_in_api() as port:
        yield port


@pytest.fixture
def host_udp_listener() -> Iterator[tuple[int, list[bytes]]]:
    """A UDP socket on every host address; whatever reaches it is appended to the list."""
    received: list[bytes] = []
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("0.0.0.0", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                received.append(listener.recv(4096))
            except TimeoutError:
                continue

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    yield listener.getsockname()[1], received
    stop.set()
    thread.join()
    listener.close()


def host_addresses(docker_client: Any) -> set[str]:
    """The Docker bridge gateway and every IPv4 address of the host: where a leaked connection would land."""
    addresses = {"172.17.0.1"}
    for config in docker_client.networks.get("bridge").attrs["IPAM"]["Config"] or []:
        if config.get("Gateway"):
            addresses.add(config["Gateway"])
        elif config.get("Subnet"):
            addresses.add(str(next(ipaddress.ip_network(config["Subnet"]).hosts())))
    listing = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=False).stdout
    addresses |= {line.split()[3].split("/")[0] for line in listing.splitlines() if len(line.split()) > 3}
    return addresses


def test_no_route_to_the_internet_the_host_or_the_service_port(
    runner: DockerRunner,
    job_files: JobFiles,
    docker_client: Any,
    host_server: int,
    host_udp_listener: tuple[int, list[bytes]],
    tmp_path: Path,
) -> None:
    addresses = host_addresses(docker_client)
    # The server must really answer from the host, or a blocked connection would prove nothing.
    for address in addresses:
        with urllib.request.urlopen(f"http://{address}:{host_server}/", timeout=3) as response:
            assert response.status == 200, f"control: the test server is not reachable on {address}"
    udp_port, received = host_udp_listener
    targets = [("1.1.1.1", 53), ("8.8.8.8", 443)]
    for address in ["127.0.0.1", *sorted(addresses)]:
        targets += [(address, host_server), (address, udp_port), (address, 2375)]
    job = job_files.job(PROBE)
    job = dataclasses.replace(job, command=[*job.command, json.dumps(targets)])

    status = run_to_exit(runner, job)
    stdout, stderr = logs(runner, job.id, tmp_path / "collected")
    runner.cleanup(job.id)

    assert status.exit_code == 0, f"the probe failed: {stderr}"
    report = last_json_line(stdout)
    # The container's own loopback exists: UDP "sent" there goes nowhere, which the host listener confirms.
    leaked = {
        target: result
        for target, result in report["results"].items()
        if "blocked" not in result and not (target.startswith("udp 127.0.0.1:") and result == "SENT")
    }
    assert not leaked, f"the job reached the network: {leaked}"
    assert not received, f"datagrams from the job reached the host: {received}"
    assert report["results"]["dns example.com"].startswith("blocked"), "the job resolved a name"
    assert report["interfaces"] == ["lo"], f"network interfaces inside the job: {report['interfaces']}"
    assert report["net_dev"] == ["lo"], f"/proc/net/dev inside the job lists {report['net_dev']}"
