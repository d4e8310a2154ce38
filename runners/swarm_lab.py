"""A swarm of N dockerd nodes in network namespaces on this machine, for tests, benchmarks and the Swarm runner (root).

One lab per machine, with its own names and addresses (never the host engine's, nor another cluster's):

    bridge sbxlab0 10.232.0.1/24      the lab's "switch"; the registry listens on 10.232.0.1:5000
    netns sbxlab-<i> 10.232.0.<10+i>  one per node, its dockerd and containerd inside, hostname sbxlab-<i>
    /run/sandbox-swarm-lab/           sockets, pid files, exec roots, the lab's lock and shape (gone at reboot)
    <root>/engines/sbxlab-<i>/        each node's data root: pulled images and swarm state, kept across runs
    <root>/registry/                  the registry's storage (Debian's docker-registry), kept across runs
    <root>/logs/                      dockerd and registry logs, named in every error

Node 1 is the only manager and runs tasks too. Every node carries the node label
`org.sandbox.node=<name>`; a GPU node advertises `NVIDIA-GPU` generic resources whose ids are FAKE
placement tokens (`fake-<name>-gpu<k>`): the lab has no GPU, the ids only let the scheduler place and
count GPU work. Overlay networks take their subnets from 10.240.0.0/12, clear of the node subnet.

Every node's dockerd runs with `--no-new-privileges` and `--default-cgroupns-mode private` (what the
Swarm runner needs of a node and the 20.10 service API cannot ask per task), its own empty daemon.json,
containers under the cgroup parent `sandbox-<name>`, and the manager's heartbeat is 2 s, so a lost node
is seen down within seconds.

`lab_up` reconciles whatever it finds (a lab already up, the leftovers of a run killed midway: stale
netns, pid files, an engine started with other flags, swarm state of another cluster) towards the asked
shape, every step a cheap check when it already holds, and every wait bounded.

The lab is shared by every process on the machine: one that calls `lab_up` holds it until it exits;
`lab_session` takes it down when its block ends and no other holder lives; `lab_down` takes it down
regardless. Two holders that kill nodes or change the shape disturb each other.

All nodes share this machine's kernel and file system, so host bind mounts (code, data, /output, sockets)
resolve on every node; on real machines they need a shared file system at the same path.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import docker
import docker.errors

__all__ = [
    "DEFAULT_ROOT",
    "LabError",
    "LabNode",
    "SwarmLab",
    "kill_node",
    "lab_down",
    "lab_session",
    "lab_up",
    "revive_node",
    "why_no_lab",
]

DEFAULT_ROOT = Path("/var/lib/sandbox-swarm-lab")
RUN_DIR = Path("/run/sandbox-swarm-lab")
NETNS_DIR = Path("/var/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")

BRIDGE = "sbxlab0"
SUBNET_PREFIX = "10.232.0"
BRIDGE_ADDRESS = f"{SUBNET_PREFIX}.1"
REGISTRY = f"{BRIDGE_ADDRESS}:5000"
NODE_PREFIX = "sbxlab-"
VETH_PREFIX = "sbxlabv"  # host side of node i's veth; interface names are at most 15 characters
SWARM_PORT = 2377
# Overlay subnets: well clear of the node subnet, which every node's routing table holds.
ADDRESS_POOL = "10.240.0.0/12"
ADDRESS_POOL_MASK = 24
# The manager marks a node down after a few missed heartbeats; 2 s (Docker's default is 5 s) has the
# kill tests wait seconds, not tens of them, and still tolerates a loaded 2-core machine.
HEARTBEAT_NS = 2_000_000_000

LABEL_NODE = "org.sandbox.node"
GENERIC_GPU = "NVIDIA-GPU"
DEFAULT_GPU_NODES: Mapping[int, int] = MappingProxyType({3: 1})

ENGINE_START_S = 60.0
REGISTRY_START_S = 20.0
SWARM_READY_S = 90.0
NODE_DOWN_S = 60.0
STOP_GRACE_S = 20.0
KILL_S = 15.0
POLL_S = 0.2

_TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_NODE_NAME = re.compile(r"sbxlab-([1-9][0-9]?)")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LabError(RuntimeError):
    """The lab could not be brought to the asked state; the message names the step and the log to read."""


@dataclass(frozen=True)
class LabNode:
    name: str  # "sbxlab-1", also the node label org.sandbox.node=<name> and the node's hostname
    address: str  # "10.232.0.11"
    engine_url: str  # "unix:///run/sandbox-swarm-lab/sbxlab-1/docker.sock"
    gpus: int  # NVIDIA-GPU generic resources this node advertises (fake ids; no real GPU here)


@dataclass(frozen=True)
class SwarmLab:
    root: Path
    registry: str  # "10.232.0.1:5000", the host:port nodes pull from
    nodes: tuple[LabNode, ...]  # nodes[0] is the manager

    @property
    def manager_url(self) -> str:
        return self.nodes[0].engine_url

    def node(self, name: str) -> LabNode:
        """The node called `name`; LabError if the lab has none."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise LabError(f"the lab has no node {name!r}; its nodes are {[n.name for n in self.nodes]}")


# --- the lab's public steps -------------------------------------------------------------------------------


def lab_up(root: Path = DEFAULT_ROOT, *, nodes: int = 3, gpu_nodes: Mapping[int, int] = DEFAULT_GPU_NODES) -> SwarmLab:
    """A running lab of `nodes` nodes (node i with gpu_nodes[i] fake GPUs), reusing what is already up and cached.

    The calling process holds the lab until it ends: a `lab_session` ending meanwhile leaves the lab up.
    """
    _check_machine()
    lab = _plan(root, nodes, gpu_nodes)
    with _lab_lock():
        _hold()
        _write_shape(lab)
        _ensure_bridge()
        _ensure_registry(lab.root)
        for node in lab.nodes:
            _ensure_node_network(node)
        _stop_nodes_beyond(lab)
        # All engines start at once; each takes a second or two to answer.
        starting = [_ensure_engine(lab.root, node) for node in lab.nodes]
        for node, started in zip(lab.nodes, starting, strict=True):
            _wait_for_engine(lab.root, node, started)
        _ensure_swarm(lab)
    return lab


def lab_down(root: Path = DEFAULT_ROOT) -> None:
    """Stop every engine, the registry and the lab's network, whoever holds it; keep the cached images, registry
    and swarm state."""
    _check_machine()
    with _lab_lock():
        _down(root)


@contextlib.contextmanager
def lab_session(root: Path = DEFAULT_ROOT, *, nodes: int = 3, gpu_nodes: Mapping[int, int] = DEFAULT_GPU_NODES,
                before_down: Callable[[SwarmLab], None] | None = None) -> Iterator[SwarmLab]:
    """`lab_up`, held by this process until the block ends; then `lab_down` unless another live process holds it.

    Test sessions and scripts on one machine share the one lab, so none takes it down under another. The
    last holder calls `before_down(lab)` (a check for leftovers, say) first, under the lab's lock.
    """
    lab = lab_up(root, nodes=nodes, gpu_nodes=gpu_nodes)
    try:
        yield lab
    finally:
        with _lab_lock():
            _holder_path().unlink(missing_ok=True)
            if not _live_holders():
                try:
                    if before_down is not None:
                        before_down(lab)
                finally:
                    _down(lab.root)


def kill_node(lab: SwarmLab, name: str) -> None:
    """Cut a worker's power: link down, SIGKILL its dockerd, containerd, shims and every container process.

    Returns once the manager reports the node down. The manager itself cannot be killed this way: nobody
    would be left to report it.
    """
    _check_machine()
    node = lab.node(name)
    if node == lab.nodes[0]:
        raise LabError(f"{name} is the lab's only manager: killing it leaves no one to see it down")
    with _lab_lock():
        node_id = _node_id_by_label(lab, name)
        # The link first, so no goodbye reaches the manager: it learns of the loss from missed heartbeats.
        _set_link(node, up=False)
        _kill_node_processes(name)
        # A powered-off machine keeps no mounts; an overlay network's namespace left mounted would also keep
        # its VXLAN device alive until the engine's next start.
        _unmount_under([_data_root(lab.root, name), _run_dir(name)])
        _remove_empty_cgroups(name)
        _wait_for(lambda: _node_state(lab, node_id) == "down", NODE_DOWN_S,
                  f"the manager to see {name} (node {node_id}) down")


def revive_node(lab: SwarmLab, name: str) -> None:
    """Power a node back on: link up, its engine started, back in the swarm and Ready."""
    _check_machine()
    node = lab.node(name)
    with _lab_lock():
        _ensure_node_network(node)
        started = _ensure_engine(lab.root, node)
        _wait_for_engine(lab.root, node, started)
        _ensure_swarm(lab)


# --- shape, lock and processes ------------------------------------------------------------------------------


def _plan(root: Path, nodes: int, gpu_nodes: Mapping[int, int]) -> SwarmLab:
    if not 1 <= nodes <= 89:  # addresses 10.232.0.11 .. 10.232.0.99
        raise ValueError(f"a lab has 1 to 89 nodes, not {nodes}")
    root = Path(root).resolve()
    if root == Path("/"):
        raise ValueError("the lab's root cannot be /")
    gpus = dict(gpu_nodes)
    if gpu_nodes is DEFAULT_GPU_NODES:
        gpus = {index: count for index, count in gpus.items() if index <= nodes}
    wrong = {index: count for index, count in gpus.items() if not 1 <= index <= nodes or count < 0}
    if wrong:
        raise ValueError(f"gpu_nodes must map node numbers 1..{nodes} to GPU counts >= 0, not {wrong}")
    return SwarmLab(
        root=root,
        registry=REGISTRY,
        nodes=tuple(
            LabNode(name=f"{NODE_PREFIX}{i}", address=f"{SUBNET_PREFIX}.{10 + i}",
                    engine_url=f"unix://{_run_dir(f'{NODE_PREFIX}{i}')}/docker.sock", gpus=gpus.get(i, 0))
            for i in range(1, nodes + 1)
        ),
    )


def why_no_lab() -> str | None:
    """Why this machine cannot run the lab (not root, a tool missing); None if it can."""
    if os.geteuid() != 0:
        return "the swarm lab creates network namespaces and starts engines: it needs root"
    missing = [tool for tool in ("dockerd", "nsenter", "unshare", "ip", "iptables", "docker-registry", "umount")
               if shutil.which(tool, path=_TOOL_PATH) is None]
    if missing:
        return (f"the swarm lab needs {', '.join(missing)} "
                "(apt-get install docker.io docker-registry iproute2 iptables util-linux)")
    return None


def _check_machine() -> None:
    why = why_no_lab()
    if why is not None:
        raise LabError(why)


@contextlib.contextmanager
def _lab_lock() -> Iterator[None]:
    """One lab step at a time on this machine, across threads and processes (flock is per open file)."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with (RUN_DIR / "lab.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _down(root: Path) -> None:
    roots = {Path(root).resolve(), *_recorded_roots()}
    names = _lab_node_names()
    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        stopping = [pool.submit(_stop_node, roots, name) for name in names]
    for stopped in stopping:
        stopped.result()
    for name in names:
        _remove_node_network(name)
    _stop_registry()
    _remove_bridge()
    (RUN_DIR / "lab.json").unlink(missing_ok=True)
    shutil.rmtree(RUN_DIR / "holders", ignore_errors=True)


def _holder_path() -> Path:
    # The pid and its start time: a pid reused by another process is no holder.
    return RUN_DIR / "holders" / f"{os.getpid()}-{_start_time(os.getpid())}"


def _hold() -> None:
    """Note this process as a holder of the lab."""
    path = _holder_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def _live_holders() -> list[Path]:
    live = []
    with contextlib.suppress(OSError):
        for path in (RUN_DIR / "holders").iterdir():
            pid, _, started = path.name.partition("-")
            if pid.isdigit() and _alive(int(pid)) and _start_time(int(pid)) == started:
                live.append(path)
            else:
                path.unlink(missing_ok=True)  # its process ended without letting go
    return live


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return "?"


def _write_shape(lab: SwarmLab) -> None:
    """Note the lab's root, so `lab_down` unmounts what an engine left under it whatever root it is given."""
    shape = {"root": str(lab.root), "nodes": [node.name for node in lab.nodes]}
    (RUN_DIR / "lab.json").write_text(json.dumps(shape))


def _recorded_roots() -> list[Path]:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return [Path(json.loads((RUN_DIR / "lab.json").read_text())["root"])]
    return []


def _run_dir(name: str) -> Path:
    return RUN_DIR / name


def _data_root(root: Path, name: str) -> Path:
    return root / "engines" / name


def _log_path(root: Path, what: str) -> Path:
    return root / "logs" / f"{what}.log"


def _netns(name: str) -> Path:
    return NETNS_DIR / name


def _veth(name: str) -> str:
    match = _NODE_NAME.fullmatch(name)
    assert match is not None, name
    return f"{VETH_PREFIX}{match.group(1)}"


def _run(command: list[str], *, what: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, env={"PATH": _TOOL_PATH}, timeout=60,
                            check=False)
    if check and result.returncode != 0:
        raise LabError(f"{what} failed: {' '.join(command)}: {(result.stderr or result.stdout).strip()}")
    return result


def _ip_json(command: list[str]) -> list[dict[str, Any]]:
    result = _run(["ip", "-j", *command], what="ip", check=False)
    if result.returncode != 0 or not result.stdout.strip():
        return []
    parsed: list[dict[str, Any]] = json.loads(result.stdout)
    return parsed


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _kill(pid: int, signal_number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal_number)
    # Reap it if it is this process's child (an engine this process started), so no zombie keeps the pid.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _wait_for(condition: Callable[[], bool], timeout: float, what: str, *, log: Path | None = None) -> None:
    """Poll `condition` until it holds; LabError after `timeout` s, with the last failure and the log's end."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            if condition():
                return
        except LabError:
            raise
        except Exception as error:  # an engine still starting refuses connections, and that is expected
            last_error = f" (last: {error})"
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f} s waiting for {what}{last_error}{_log_hint(log)}")
        time.sleep(POLL_S)


def _log_hint(log: Path | None) -> str:
    if log is None:
        return ""
    try:
        tail = log.read_text(errors="replace").splitlines()[-15:]
    except OSError:
        return f"; no log at {log}"
    return f"; see {log}, which ends:\n    " + "\n    ".join(tail)


def _start_detached(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a long-lived lab process in its own session, output to `log` (the previous one kept as .1)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if log.exists():
        log.replace(log.with_name(log.name + ".1"))
    with log.open("wb") as output:
        # A clean environment: a proxy variable inherited here would send the nodes' pulls from the
        # lab registry to the proxy.
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                env={"PATH": _TOOL_PATH, "HOME": "/root"}, start_new_session=True)


# --- network ------------------------------------------------------------------------------------------------


def _ensure_bridge() -> None:
    if not _ip_json(["link", "show", "dev", BRIDGE]):
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"], what=f"creating the bridge {BRIDGE}")
    _run(["ip", "addr", "replace", f"{BRIDGE_ADDRESS}/24", "dev", BRIDGE], what=f"addressing {BRIDGE}")
    _run(["ip", "link", "set", BRIDGE, "up"], what=f"bringing {BRIDGE} up")
    # The host engine sets FORWARD's policy to DROP; with bridge netfilter on, that would drop node-to-node
    # traffic too. Nodes have no default route, so this opens nothing beyond the bridge.
    rule = ["FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"]
    if _run(["iptables", "-w", "-C", *rule], what="checking the forward rule", check=False).returncode != 0:
        _run(["iptables", "-w", "-I", *rule], what="allowing traffic between lab nodes")


def _remove_bridge() -> None:
    rule = ["FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"]
    while _run(["iptables", "-w", "-C", *rule], what="checking the forward rule", check=False).returncode == 0:
        _run(["iptables", "-w", "-D", *rule], what="removing the forward rule")
    if _ip_json(["link", "show", "dev", BRIDGE]):
        _run(["ip", "link", "del", BRIDGE], what=f"removing the bridge {BRIDGE}")


def _ensure_node_network(node: LabNode) -> None:
    """The node's netns with eth0 at its address, veth'd into the bridge; rebuilt if any part is missing."""
    netns, veth = _netns(node.name), _veth(node.name)
    if netns.exists() and _run(["ip", "-n", node.name, "link", "show", "lo"], what="", check=False).returncode:
        # A stale name whose namespace is gone (its mount lost): drop it and make a new one.
        _run(["ip", "netns", "del", node.name], what=f"removing the stale netns {node.name}", check=False)
        netns.unlink(missing_ok=True)
    if not netns.exists():
        _run(["ip", "netns", "add", node.name], what=f"creating the netns {node.name}")
    inside = _ip_json(["-n", node.name, "addr", "show", "dev", "eth0"])
    outside = _ip_json(["link", "show", "dev", veth])
    whole = (
        bool(inside) and bool(outside)
        and any(a.get("local") == node.address for a in inside[0].get("addr_info", []))
        and outside[0].get("master") == BRIDGE
    )
    if not whole:
        if outside:
            _run(["ip", "link", "del", veth], what=f"removing the stale veth {veth}")
        if _ip_json(["-n", node.name, "link", "show", "dev", "eth0"]):
            _run(["ip", "-n", node.name, "link", "del", "eth0"], what=f"removing {node.name}'s stale eth0")
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", node.name],
             what=f"creating the veth of {node.name}")
        _run(["ip", "link", "set", veth, "master", BRIDGE], what=f"attaching {veth} to {BRIDGE}")
        _run(["ip", "-n", node.name, "addr", "add", f"{node.address}/24", "dev", "eth0"],
             what=f"addressing {node.name}")
    _run(["ip", "-n", node.name, "link", "set", "lo", "up"], what=f"bringing {node.name}'s lo up")
    _run(["ip", "-n", node.name, "link", "set", "eth0", "up"], what=f"bringing {node.name}'s eth0 up")
    _set_link(node, up=True)


def _set_link(node: LabNode, *, up: bool) -> None:
    _run(["ip", "link", "set", _veth(node.name), "up" if up else "down"],
         what=f"setting {node.name}'s link {'up' if up else 'down'}")


def _remove_node_network(name: str) -> None:
    with contextlib.suppress(AssertionError):
        if _ip_json(["link", "show", "dev", _veth(name)]):
            _run(["ip", "link", "del", _veth(name)], what=f"removing the veth of {name}", check=False)
    if _netns(name).exists():
        _run(["ip", "netns", "del", name], what=f"removing the netns {name}", check=False)


def _lab_node_names() -> list[str]:
    """Every node that has anything on this machine: a netns, or a run folder (pid file, exec root)."""
    found = set()
    for folder in (NETNS_DIR, RUN_DIR):
        with contextlib.suppress(OSError):
            found |= {entry.name for entry in folder.iterdir() if _NODE_NAME.fullmatch(entry.name)}
    return sorted(found, key=lambda name: int(name.removeprefix(NODE_PREFIX)))


def _stop_nodes_beyond(lab: SwarmLab) -> None:
    """Stop the engines and networks of nodes a bigger lab left (the swarm forgets them in `_ensure_swarm`)."""
    wanted = {node.name for node in lab.nodes}
    for name in _lab_node_names():
        if name not in wanted:
            # Leave first: an engine that restarts with the state of a swarm that forgot it waits 20 s for
            # that swarm before it answers at all.
            with contextlib.suppress(docker.errors.DockerException, OSError):
                client = docker.DockerClient(base_url=f"unix://{_run_dir(name)}/docker.sock", timeout=10)
                _leave(client)
                client.close()
            _stop_node({lab.root}, name)
            _remove_node_network(name)


# --- the registry -------------------------------------------------------------------------------------------


def _registry_answers() -> bool:
    try:
        with _NO_PROXY.open(f"http://{REGISTRY}/v2/", timeout=2) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _ensure_registry(root: Path) -> None:
    config = root / "registry.yml"
    storage = root / "registry"
    storage.mkdir(parents=True, exist_ok=True)
    text = (
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {REGISTRY}\n"
    )
    if not config.exists() or config.read_text() != text:
        config.write_text(text)
    command = ["docker-registry", "serve", str(config)]
    pid_file = RUN_DIR / "registry.pid"
    pid = _read_pid(pid_file)
    if pid is not None and _alive(pid) and _cmdline(pid) == command and _registry_answers():
        return
    _stop_registry()
    if _registry_answers():
        raise LabError(f"something else answers at {REGISTRY}, not the lab's registry; stop it first (the "
                       "docker-registry package's own service listens on port 5000 of every address: "
                       "systemctl disable --now docker-registry)")
    log = _log_path(root, "registry")
    process = _start_detached(command, log)
    pid_file.write_text(str(process.pid))
    _wait_for(_registry_answers, REGISTRY_START_S, f"the registry at {REGISTRY}", log=log)


def _stop_registry() -> None:
    pid_file = RUN_DIR / "registry.pid"
    pid = _read_pid(pid_file)
    if pid is not None and _alive(pid) and _cmdline(pid)[:2] == ["docker-registry", "serve"]:
        _kill(pid, signal.SIGTERM)
        with contextlib.suppress(LabError):
            _wait_for(lambda: not _alive(pid), 10, "the registry to stop")
        if _alive(pid):
            _kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


# --- engines ------------------------------------------------------------------------------------------------


def _dockerd_command(root: Path, node: LabNode) -> list[str]:
    run_dir = _run_dir(node.name)
    command = [
        "dockerd",
        "--config-file", str(root / "dockerd.json"),
        "--data-root", str(_data_root(root, node.name)),
        "--exec-root", str(run_dir / "exec"),
        "--pidfile", str(run_dir / "docker.pid"),
        "--host", node.engine_url,
        "--insecure-registry", REGISTRY,
        "--cgroup-parent", f"sandbox-{node.name}",
        "--shutdown-timeout", "5",
        # What the Swarm runner needs of every node, since the 20.10 service API cannot ask it per task.
        "--no-new-privileges",
        "--default-cgroupns-mode", "private",
    ]
    for index in range(node.gpus):
        command += ["--node-generic-resource", f"{GENERIC_GPU}=fake-{node.name}-gpu{index}"]
    return command


def _engine_pid(node: LabNode) -> int | None:
    """The pid of the node's engine if one runs (whatever its flags); None if none does."""
    pid = _read_pid(_run_dir(node.name) / "docker.pid")
    if pid is None or not _alive(pid):
        return None
    command = _cmdline(pid)
    exec_root = str(_run_dir(node.name) / "exec")
    return pid if command[:1] == ["dockerd"] and exec_root in command else None


def _in_netns(pid: int, netns: Path) -> bool:
    try:
        mine, theirs = os.stat(f"/proc/{pid}/ns/net"), os.stat(netns)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def _ensure_engine(root: Path, node: LabNode) -> subprocess.Popen[bytes] | None:
    """Start the node's dockerd unless the right one (same flags, in the node's netns) runs; the new process."""
    command = _dockerd_command(root, node)
    pid = _engine_pid(node)
    if pid is not None and _cmdline(pid) == command and _in_netns(pid, _netns(node.name)):
        return None
    _stop_node({root}, node.name)
    config = root / "dockerd.json"
    if not config.exists():
        # Its own (empty) configuration: an /etc/docker/daemon.json written for the host engine (hosts,
        # data-root) must not reach the nodes.
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text("{}\n")
    _data_root(root, node.name).mkdir(parents=True, exist_ok=True)
    _run_dir(node.name).mkdir(parents=True, exist_ok=True)
    # Pid files of the killed: a killed containerd can linger as a zombie until init reaps it, and dockerd
    # would take it for a containerd still running and wait for its socket in vain.
    (_run_dir(node.name) / "docker.pid").unlink(missing_ok=True)
    (_run_dir(node.name) / "exec" / "containerd" / "containerd.pid").unlink(missing_ok=True)
    # nsenter, not `ip netns exec`: the latter remounts /sys, and dockerd then finds no devices cgroup.
    # unshare --uts gives the node its own hostname, which `docker node ls` shows. Each exec keeps the pid.
    return _start_detached(
        ["nsenter", f"--net={_netns(node.name)}", "unshare", "--uts", "--",
         "sh", "-c", 'hostname "$0" && exec "$@"', node.name, *command],
        _log_path(root, node.name),
    )


def _engine(node: LabNode, timeout: float = 30) -> Any:
    return docker.DockerClient(base_url=node.engine_url, timeout=timeout)


def _engine_answers(node: LabNode) -> bool:
    client = _engine(node, timeout=5)
    try:
        return bool(client.ping())
    finally:
        client.close()


def _wait_for_engine(root: Path, node: LabNode, started: subprocess.Popen[bytes] | None) -> None:
    log = _log_path(root, node.name)

    def answers() -> bool:
        if started is not None and started.poll() is not None:
            raise LabError(f"the engine of {node.name} exited with status {started.returncode}{_log_hint(log)}")
        return _engine_pid(node) is not None and _engine_answers(node)

    _wait_for(answers, ENGINE_START_S, f"the engine of {node.name} to answer at {node.engine_url}", log=log)


def _stop_node(roots: set[Path], name: str) -> None:
    """Stop the node's engine (SIGTERM, then everything of the node SIGKILLed) and unmount what it left."""
    pid = _read_pid(_run_dir(name) / "docker.pid")
    if pid is not None and _alive(pid) and str(_run_dir(name) / "exec") in _cmdline(pid):
        _kill(pid, signal.SIGTERM)
        with contextlib.suppress(LabError):
            _wait_for(lambda: not _alive(pid), STOP_GRACE_S, f"the engine of {name} to stop")
    _kill_node_processes(name)
    _unmount_under([*(_data_root(root, name) for root in roots), _run_dir(name)])
    _remove_empty_cgroups(name)


def _node_processes(name: str) -> set[int]:
    """Every process of the node: those in its netns (dockerd, containerd, shims) and in its containers' cgroups."""
    found: set[int] = set()
    pid = _read_pid(_run_dir(name) / "docker.pid")
    if pid is not None and _alive(pid) and str(_run_dir(name) / "exec") in _cmdline(pid):
        found.add(pid)
    containerd = _read_pid(_run_dir(name) / "exec" / "containerd" / "containerd.pid")
    if containerd is not None and _alive(containerd) and _cmdline(containerd)[:1] == ["containerd"]:
        found.add(containerd)
    netns = _netns(name)
    if netns.exists():
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid() and _in_netns(int(entry.name), netns):
                found.add(int(entry.name))
    for cgroup in _node_cgroups(name):
        for procs in cgroup.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                found |= {int(line) for line in procs.read_text().split()}
    return {pid for pid in found if _alive(pid)}


def _node_cgroups(name: str) -> list[Path]:
    """The node's cgroup parent in each hierarchy (cgroup v1 controllers, or the v2 root)."""
    parent = f"sandbox-{name}"
    candidates = [CGROUP_ROOT / parent]
    with contextlib.suppress(OSError):
        candidates += [controller / parent for controller in CGROUP_ROOT.iterdir() if controller.is_dir()]
    return [path for path in candidates if path.is_dir()]


def _kill_node_processes(name: str) -> None:
    """SIGKILL every process of the node, again until none is left (a dying container may still fork)."""
    deadline = time.monotonic() + KILL_S
    while pids := _node_processes(name):
        if time.monotonic() > deadline:
            raise LabError(f"processes of {name} survived SIGKILL for {KILL_S:.0f} s: {sorted(pids)}")
        for pid in pids:
            _kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _remove_empty_cgroups(name: str) -> None:
    for cgroup in _node_cgroups(name):
        for folder in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                folder.rmdir()
        with contextlib.suppress(OSError):
            cgroup.rmdir()


def _unmount_under(folders: list[Path]) -> None:
    """Lazily unmount every mount at or below `folders`, deepest first."""
    prefixes = [str(folder.resolve()) if folder.exists() else str(folder) for folder in folders]
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError as error:
        raise LabError(f"cannot read the mount table: {error}") from error
    points = []
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            point = _unescape_mountinfo(fields[4])
            if any(point == prefix or point.startswith(prefix + "/") for prefix in prefixes):
                points.append(point)
    for point in sorted(set(points), key=lambda p: -p.count("/")):
        _run(["umount", "--lazy", point], what=f"unmounting {point}", check=False)


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


# --- the swarm ----------------------------------------------------------------------------------------------


def _swarm_info(client: Any) -> dict[str, Any]:
    swarm: dict[str, Any] = client.info()["Swarm"]
    return swarm


def _manager_address(lab: SwarmLab) -> str:
    return f"{lab.nodes[0].address}:{SWARM_PORT}"


def _ensure_swarm(lab: SwarmLab) -> None:
    """Node 1 manages a swarm every node has joined, each labelled; nodes of no lab node are forgotten."""
    manager = _engine(lab.nodes[0])
    try:
        _ensure_manager(lab, manager)
        token = manager.api.inspect_swarm()["JoinTokens"]["Worker"]
        node_ids = {lab.nodes[0].name: _swarm_info(manager)["NodeID"]}
        for node in lab.nodes[1:]:
            node_ids[node.name] = _ensure_worker(lab, node, token, manager)
        _label_and_forget(lab, manager, node_ids)
        _wait_for(lambda: _all_ready(manager, node_ids), SWARM_READY_S,
                  f"every lab node to be Ready ({', '.join(node_ids)})", log=_log_path(lab.root, lab.nodes[0].name))
    finally:
        manager.close()


def _init_swarm(lab: SwarmLab, manager: Any, *, force_new_cluster: bool) -> None:
    address = lab.nodes[0].address
    spec = manager.api.create_swarm_spec(dispatcher_heartbeat_period=HEARTBEAT_NS)
    manager.api.init_swarm(advertise_addr=address, listen_addr=f"{address}:{SWARM_PORT}",
                           force_new_cluster=force_new_cluster, swarm_spec=spec,
                           default_addr_pool=[ADDRESS_POOL], subnet_size=ADDRESS_POOL_MASK)


def _leave(client: Any) -> None:
    with contextlib.suppress(docker.errors.APIError):
        client.api.leave_swarm(force=True)


def _ensure_manager(lab: SwarmLab, manager: Any) -> None:
    """Node 1 leads a working swarm of the lab's shape; a stale one is recovered or replaced."""
    name = lab.nodes[0].name
    # A manager just started is `pending` while its raft comes up; that is no reason to start over.
    with contextlib.suppress(LabError):
        _wait_for(lambda: _swarm_info(manager).get("LocalNodeState") != "pending", 20, f"{name}'s swarm state")
    info = _swarm_info(manager)
    state = info.get("LocalNodeState")
    if state == "inactive":
        _init_swarm(lab, manager, force_new_cluster=False)
        return
    ours = (
        state == "active" and info.get("ControlAvailable")
        and info.get("NodeAddr") == lab.nodes[0].address
        and (info.get("Cluster") or {}).get("DefaultAddrPool") == [ADDRESS_POOL]
    )
    if ours:
        try:
            manager.api.nodes()
        except docker.errors.APIError:
            # A manager whose raft lost quorum (another manager of an old shape is gone): keep its state,
            # as the only member of a new cluster.
            _init_swarm(lab, manager, force_new_cluster=True)
        spec = manager.api.inspect_swarm()
        if spec["Spec"]["Dispatcher"].get("HeartbeatPeriod") != HEARTBEAT_NS:
            manager.api.update_swarm(version=spec["Version"]["Index"],
                                     swarm_spec=manager.api.create_swarm_spec(dispatcher_heartbeat_period=HEARTBEAT_NS))
        return
    # A worker of some other cluster, a manager at another address or address pool, a locked or failed
    # node: leave, and start over; if even leaving fails, wipe its swarm state.
    _leave(manager)
    try:
        _init_swarm(lab, manager, force_new_cluster=False)
    except docker.errors.APIError:
        _wipe_swarm_state(lab, lab.nodes[0])
        try:
            _init_swarm(lab, manager, force_new_cluster=False)
        except docker.errors.APIError as error:
            raise LabError(f"{name} could not start a new swarm, even with its swarm state wiped ({state}): "
                           f"{error}{_log_hint(_log_path(lab.root, name))}") from error


def _wipe_swarm_state(lab: SwarmLab, node: LabNode) -> None:
    """The last resort for swarm state the engine cannot leave: stop the engine, delete the state, restart."""
    _stop_node({lab.root}, node.name)
    shutil.rmtree(_data_root(lab.root, node.name) / "swarm", ignore_errors=True)
    _wait_for_engine(lab.root, node, _ensure_engine(lab.root, node))


def _ensure_worker(lab: SwarmLab, node: LabNode, token: str, manager: Any) -> str:
    """The node's id as a worker of the lab's swarm; it leaves and rejoins if its state is of another swarm."""
    client = _engine(node)
    try:
        known = {entry["ID"] for entry in manager.api.nodes()}

        def member() -> bool:
            info = _swarm_info(client)
            remotes = {remote.get("Addr") for remote in info.get("RemoteManagers") or []}
            return (info.get("LocalNodeState") == "active" and info.get("NodeID") in known
                    and info.get("NodeAddr") == node.address and _manager_address(lab) in remotes)

        info = _swarm_info(client)
        if info.get("LocalNodeState") == "pending" and info.get("NodeID") in known:
            # A restarted member reconnecting: give it a moment before deciding it is lost.
            with contextlib.suppress(LabError):
                _wait_for(member, 15, f"{node.name} to reconnect")
        if not member():
            if _swarm_info(client).get("LocalNodeState") != "inactive":
                _leave(client)
            _join(lab, node, client, token)
        node_id: str = _swarm_info(client)["NodeID"]
        return node_id
    finally:
        client.close()


def _join(lab: SwarmLab, node: LabNode, client: Any, token: str) -> None:
    """Join the node to the lab's swarm: a few tries, then its swarm state wiped, then a few more."""
    error: docker.errors.APIError | None = None
    for attempt in range(6):
        if attempt == 3:
            _wipe_swarm_state(lab, node)
        try:
            client.api.join_swarm(remote_addrs=[_manager_address(lab)], join_token=token,
                                  listen_addr=f"{node.address}:{SWARM_PORT}", advertise_addr=node.address)
            return
        except docker.errors.APIError as failed:
            error = failed
            # A half-done join leaves state behind that blocks the next attempt.
            _leave(client)
            time.sleep(1)
    raise LabError(f"{node.name} could not join the swarm at {_manager_address(lab)}: {error}"
                   f"{_log_hint(_log_path(lab.root, node.name))}")


def _label_and_forget(lab: SwarmLab, manager: Any, node_ids: dict[str, str]) -> None:
    """Label each lab node with its name; remove the swarm's entries of nodes the lab no longer has."""
    current = set(node_ids.values())
    for entry in manager.api.nodes():
        if entry["ID"] not in current:
            with contextlib.suppress(docker.errors.APIError):
                manager.api.remove_node(entry["ID"], force=True)
    for name, node_id in node_ids.items():
        entry = manager.api.inspect_node(node_id)
        spec = entry["Spec"]
        if (spec.get("Labels") or {}).get(LABEL_NODE) != name or spec.get("Availability") != "active":
            spec["Labels"] = {**(spec.get("Labels") or {}), LABEL_NODE: name}
            spec["Availability"] = "active"
            manager.api.update_node(node_id, entry["Version"]["Index"], spec)


def _all_ready(manager: Any, node_ids: dict[str, str]) -> bool:
    states = {entry["ID"]: entry["Status"]["State"] for entry in manager.api.nodes()}
    return all(states.get(node_id) == "ready" for node_id in node_ids.values())


def _node_id_by_label(lab: SwarmLab, name: str) -> str:
    manager = _engine(lab.nodes[0])
    try:
        for entry in manager.api.nodes():
            if (entry["Spec"].get("Labels") or {}).get(LABEL_NODE) == name:
                node_id: str = entry["ID"]
                return node_id
    finally:
        manager.close()
    raise LabError(f"the manager knows no node labelled {LABEL_NODE}={name}")


def _node_state(lab: SwarmLab, node_id: str) -> str:
    manager = _engine(lab.nodes[0], timeout=10)
    try:
        state: str = manager.api.inspect_node(node_id)["Status"]["State"]
        return state
    finally:
        manager.close()
