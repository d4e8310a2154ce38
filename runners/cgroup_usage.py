"""What a running container has used so far, read from its cgroup: CPU seconds, peak memory, processes.

Reading the files is cheap enough for every poll; the Docker stats endpoint, the fallback, takes a
round trip through the engine. The cgroup goes when the container exits, so the caller keeps the
largest values it has seen.

Two layouts exist, and the host decides which (Debian 12 and most current servers: v2):
- **v2** (unified): one folder per cgroup under the root, every controller's files in it:
  `cpu.stat` (`usage_usec`), `memory.peak` (Linux 5.19+; else `memory.current`, a lower bound),
  `memory.max` (`max` when unlimited), `pids.current`.
- **v1**: a hierarchy per controller, mounted as `/sys/fs/cgroup/<controllers>` (`cpuacct`, or `cpu,cpuacct`
  with `cpu` and `cpuacct` as links): `cpuacct.usage` (ns), `memory.max_usage_in_bytes`,
  `memory.limit_in_bytes`, `pids.current`. A hybrid host also mounts an empty v2 hierarchy at `unified/`,
  which holds no controller: it is read as v1.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED_V1 = 1 << 62  # v1 reports "no limit" as a page-rounded LONG_MAX; anything this large is none


class CgroupLayout(StrEnum):
    V1 = "v1"
    V2 = "v2"


@dataclass(frozen=True)
class Usage:
    cpu_seconds: float
    peak_memory_bytes: int
    memory_limit_bytes: int | None = None  # None: unlimited, or not readable
    pids: int | None = None  # processes and threads in the cgroup now; None: not readable


@dataclass(frozen=True)
class ProcessCgroup:
    """Where one process's cgroup files are on this host."""

    layout: CgroupLayout
    folders: dict[str, Path]  # controller name -> its folder; under v2 every controller shares one folder

    def file(self, controller: str, name: str) -> Path | None:
        """The path of `name` in `controller`'s folder, if that file exists."""
        folder = self.folders.get(controller)
        if folder is None:
            return None
        candidate = folder / name
        return candidate if candidate.exists() else None

    def contains(self, container_id: str) -> bool:
        return bool(self.folders) and all(container_id in str(folder) for folder in self.folders.values())


def host_layout(cgroup_root: Path = CGROUP_ROOT) -> CgroupLayout | None:
    """The layout mounted at `cgroup_root`: v2 when the root itself is the unified hierarchy, v1 when it holds
    controller hierarchies, None when neither shows."""
    if (cgroup_root / "cgroup.controllers").exists():
        return CgroupLayout.V2
    if any((cgroup_root / name).is_dir() for name in ("memory", "cpuacct", "cpu,cpuacct", "pids")):
        return CgroupLayout.V1
    return None


def process_cgroup(pid: int, *, proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT) -> ProcessCgroup | None:
    """The cgroup folders of process `pid` as seen from this host, or None if it has gone."""
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    v1_paths: dict[str, tuple[str, str]] = {}  # controller -> (its hierarchy's name, the path in it)
    unified_path: str | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            unified_path = path
            continue
        for controller in controllers.split(","):
            v1_paths[controller.removeprefix("name=")] = (controllers, path)
    layout = host_layout(cgroup_root)
    if layout is None:  # nothing at the root tells: the process's own lines do
        layout = CgroupLayout.V1 if v1_paths else CgroupLayout.V2
    if layout is CgroupLayout.V2:
        if unified_path is None:
            return None
        folder = cgroup_root / unified_path.lstrip("/")
        return ProcessCgroup(layout, {name: folder for name in ("cpu", "cpuacct", "memory", "pids")})
    folders: dict[str, Path] = {}
    for controller, (hierarchy, path) in v1_paths.items():
        # A hierarchy is mounted under the name of its controllers ("cpu,cpuacct"), often with a link per
        # controller ("cpuacct"); either may be missing.
        for mount in (hierarchy, controller):
            candidate = cgroup_root / mount / path.lstrip("/")
            if candidate.is_dir():
                folders[controller] = candidate
                break
        else:
            folders[controller] = cgroup_root / hierarchy / path.lstrip("/")
    return ProcessCgroup(layout, {name: folders[name] for name in ("cpuacct", "memory", "pids") if name in folders})


def read_cgroup_usage(pid: int, container_id: str, *, proc: Path = PROC,
                      cgroup_root: Path = CGROUP_ROOT) -> Usage | None:
    """Usage of the cgroup that process `pid` (the container's init, as the host sees it) belongs to.

    None if the files cannot be read, or if the process is not in `container_id`'s cgroup (it has
    exited and the pid was reused). Handles cgroup v1 and v2, with the cgroupfs or systemd driver.
    """
    cgroup = process_cgroup(pid, proc=proc, cgroup_root=cgroup_root)
    if cgroup is None:
        return None
    if cgroup.layout is CgroupLayout.V1:
        if "cpuacct" not in cgroup.folders or "memory" not in cgroup.folders:
            return None
        if not cgroup.contains(container_id):
            return None
        cpu_ns = _first_integer([cgroup.file("cpuacct", "cpuacct.usage")])
        peak = _first_integer([cgroup.file("memory", "memory.max_usage_in_bytes")])
        if cpu_ns is None or peak is None:
            return None
        limit = _first_integer([cgroup.file("memory", "memory.limit_in_bytes")])
        return Usage(cpu_seconds=cpu_ns / 1e9, peak_memory_bytes=peak,
                     memory_limit_bytes=limit if limit is not None and limit < _UNLIMITED_V1 else None,
                     pids=_first_integer([cgroup.file("pids", "pids.current")]))
    if not cgroup.contains(container_id):
        return None
    usage_usec = _cpu_stat_usage(cgroup.file("cpu", "cpu.stat"))
    # memory.peak exists from Linux 5.19; before that the current usage is the best lower bound there is.
    peak = _first_integer([cgroup.file("memory", "memory.peak"), cgroup.file("memory", "memory.current")])
    if usage_usec is None or peak is None:
        return None
    return Usage(cpu_seconds=usage_usec / 1e6, peak_memory_bytes=peak,
                 memory_limit_bytes=_first_integer([cgroup.file("memory", "memory.max")]),  # "max": None
                 pids=_first_integer([cgroup.file("pids", "pids.current")]))


def _cpu_stat_usage(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _first_integer(candidates: list[Path | None]) -> int | None:
    for candidate in candidates:
        if candidate is None:
            continue
        try:
            return int(candidate.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return None
