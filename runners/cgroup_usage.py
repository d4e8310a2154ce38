"""What a running container has used so far, read from its cgroup: CPU seconds and peak memory.

Reading the files is cheap enough for every poll; the Docker stats endpoint, the fallback, takes a
round trip through the engine. The cgroup goes when the container exits, so the caller keeps the
largest values it has seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Usage:
    cpu_seconds: float
    peak_memory_bytes: int


def read_cgroup_usage(
    pid: int, container_id: str, *, proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> Usage | None:
    """Usage of the cgroup that process `pid` (the container's init, as the host sees it) belongs to.

    None if the files cannot be read, or if the process is not in `container_id`'s cgroup (it has
    exited and the pid was reused). Handles cgroup v1 and v2, with the cgroupfs or systemd driver.
    """
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    v1_paths: dict[str, str] = {}
    unified_path: str | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            unified_path = path
        for controller in controllers.split(","):
            v1_paths[controller] = path
    if "cpuacct" in v1_paths and "memory" in v1_paths:
        return _read_v1(v1_paths, container_id, cgroup_root)
    if unified_path is not None:
        return _read_v2(unified_path, container_id, cgroup_root)
    return None


def _read_v1(paths: dict[str, str], container_id: str, root: Path) -> Usage | None:
    cpu_path, memory_path = paths["cpuacct"], paths["memory"]
    if container_id not in cpu_path or container_id not in memory_path:
        return None
    # cpuacct is mounted on its own or together with cpu ("cpu,cpuacct"), depending on the distribution.
    cpu_files = [root / mount / cpu_path.lstrip("/") / "cpuacct.usage" for mount in ("cpuacct", "cpu,cpuacct")]
    cpu_ns = _first_integer(cpu_files)
    peak = _first_integer([root / "memory" / memory_path.lstrip("/") / "memory.max_usage_in_bytes"])
    if cpu_ns is None or peak is None:
        return None
    return Usage(cpu_seconds=cpu_ns / 1e9, peak_memory_bytes=peak)


def _read_v2(path: str, container_id: str, root: Path) -> Usage | None:
    if container_id not in path:
        return None
    folder = root / path.lstrip("/")
    try:
        cpu_stat = (folder / "cpu.stat").read_text()
    except OSError:
        return None
    usage_usec = next(
        (int(value) for key, value in (line.split() for line in cpu_stat.splitlines() if line) if key == "usage_usec"),
        None,
    )
    # memory.peak exists from Linux 5.19; before that the current usage is the best lower bound there is.
    peak = _first_integer([folder / "memory.peak", folder / "memory.current"])
    if usage_usec is None or peak is None:
        return None
    return Usage(cpu_seconds=usage_usec / 1e6, peak_memory_bytes=peak)


def _first_integer(candidates: list[Path]) -> int | None:
    for candidate in candidates:
        try:
            return int(candidate.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return None
