"""Cgroup reading under both layouts: usage metering (runners/cgroup_usage.py) and the tests' process counting.

Fake sysfs trees in tmp_path stand for cgroup v1 (cgroupfs and systemd drivers, a hybrid host) and v2 (Debian 12's
default); one Docker test reads a real container on whatever layout this host has."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
from runner_support import SMALL, JobFiles, cgroup_file, pids_in_cgroup, wait_for_exit

from runners.cgroup_usage import CgroupLayout, Usage, host_layout, process_cgroup, read_cgroup_usage
from runners.docker import DockerRunner

CONTAINER_ID = "c0ffee" * 10
V1_SCOPE = f"/docker/{CONTAINER_ID}"
V2_SCOPE = f"/system.slice/docker-{CONTAINER_ID}.scope"


def fake_cgroups(tmp_path: Path, proc_lines: list[str], files: dict[str, str],
                 links: dict[str, str] | None = None) -> tuple[Path, Path]:
    """A /proc/42/cgroup and a cgroup root holding `files` (paths relative to the root), and `links` (name ->
    target) at the root, as distributions link `cpuacct` to `cpu,cpuacct`."""
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cgroup").write_text("\n".join(proc_lines) + "\n")
    root.mkdir()
    for relative, content in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(content)
    for name, target in (links or {}).items():
        (root / name).symlink_to(target)
    return proc, root


V1_CGROUPFS = (
    [f"8:pids:{V1_SCOPE}", f"4:memory:{V1_SCOPE}", f"2:cpuacct:{V1_SCOPE}", "1:name=systemd:/"],
    {f"cpuacct{V1_SCOPE}/cpuacct.usage": "2500000000\n",
     f"memory{V1_SCOPE}/memory.max_usage_in_bytes": "1048576\n",
     f"memory{V1_SCOPE}/memory.limit_in_bytes": "134217728\n",
     f"pids{V1_SCOPE}/pids.current": "7\n"},
    None,
)
V1_SYSTEMD = (
    [f"6:pids:{V2_SCOPE}", f"5:memory:{V2_SCOPE}", f"3:cpu,cpuacct:{V2_SCOPE}"],
    {f"cpu,cpuacct{V2_SCOPE}/cpuacct.usage": "2500000000\n",
     f"memory{V2_SCOPE}/memory.max_usage_in_bytes": "1048576\n",
     f"memory{V2_SCOPE}/memory.limit_in_bytes": "134217728\n",
     f"pids{V2_SCOPE}/pids.current": "7\n"},
    {"cpuacct": "cpu,cpuacct", "cpu": "cpu,cpuacct"},
)
V1_HYBRID = (  # v1 controllers, and an empty unified hierarchy mounted at unified/ (Ubuntu 20.04, Debian 10)
    [f"8:pids:{V1_SCOPE}", f"4:memory:{V1_SCOPE}", f"2:cpu,cpuacct:{V1_SCOPE}", f"0::{V1_SCOPE}"],
    {f"cpu,cpuacct{V1_SCOPE}/cpuacct.usage": "2500000000\n",
     f"memory{V1_SCOPE}/memory.max_usage_in_bytes": "1048576\n",
     f"memory{V1_SCOPE}/memory.limit_in_bytes": "134217728\n",
     f"pids{V1_SCOPE}/pids.current": "7\n",
     f"unified{V1_SCOPE}/cgroup.procs": "42\n", "unified/cgroup.controllers": "\n"},
    None,
)
V2_SYSTEMD = (  # Debian 12: one hierarchy at the root, every controller's files in the container's folder
    [f"0::{V2_SCOPE}"],
    {"cgroup.controllers": "cpuset cpu io memory hugetlb pids rdma misc\n",
     f"system.slice{V2_SCOPE.removeprefix('/system.slice')}/cpu.stat": "usage_usec 2500000\nuser_usec 2000000\n",
     f"{V2_SCOPE.lstrip('/')}/memory.peak": "1048576\n",
     f"{V2_SCOPE.lstrip('/')}/memory.current": "4096\n",
     f"{V2_SCOPE.lstrip('/')}/memory.max": "134217728\n",
     f"{V2_SCOPE.lstrip('/')}/pids.current": "7\n"},
    None,
)
V2_OLD_KERNEL = (  # no memory.peak before Linux 5.19; no memory limit set
    [f"0::{V1_SCOPE}"],
    {"cgroup.controllers": "cpu memory pids\n",
     f"{V1_SCOPE.lstrip('/')}/cpu.stat": "user_usec 2000000\nusage_usec 2500000\n",
     f"{V1_SCOPE.lstrip('/')}/memory.current": "1048576\n",
     f"{V1_SCOPE.lstrip('/')}/memory.max": "max\n",
     f"{V1_SCOPE.lstrip('/')}/pids.current": "7\n"},
    None,
)
LAYOUTS = [
    pytest.param(*V1_CGROUPFS, CgroupLayout.V1, 134217728, id="v1 cgroupfs"),
    pytest.param(*V1_SYSTEMD, CgroupLayout.V1, 134217728, id="v1 systemd, cpu and cpuacct mounted together"),
    pytest.param(*V1_HYBRID, CgroupLayout.V1, 134217728, id="v1 with an empty unified hierarchy (hybrid)"),
    pytest.param(*V2_SYSTEMD, CgroupLayout.V2, 134217728, id="v2 systemd"),
    pytest.param(*V2_OLD_KERNEL, CgroupLayout.V2, None, id="v2 cgroupfs without memory.peak, no limit"),
]


@pytest.mark.parametrize(("proc_lines", "files", "links", "layout", "limit"), LAYOUTS)
def test_usage_is_read_for_each_layout(tmp_path: Path, proc_lines: list[str], files: dict[str, str],
                                       links: dict[str, str] | None, layout: CgroupLayout, limit: int | None) -> None:
    proc, root = fake_cgroups(tmp_path, proc_lines, files, links)
    assert host_layout(root) is layout
    usage = read_cgroup_usage(42, CONTAINER_ID, proc=proc, cgroup_root=root)
    assert usage == Usage(cpu_seconds=2.5, peak_memory_bytes=1048576, memory_limit_bytes=limit, pids=7)


@pytest.mark.parametrize(("proc_lines", "files", "links", "layout", "limit"), LAYOUTS)
def test_processes_are_counted_for_each_layout(tmp_path: Path, proc_lines: list[str], files: dict[str, str],
                                               links: dict[str, str] | None, layout: CgroupLayout,
                                               limit: int | None) -> None:
    """The helper the fork-bomb tests count processes with reads pids.current under both layouts."""
    proc, root = fake_cgroups(tmp_path, proc_lines, files, links)
    assert pids_in_cgroup(42, proc=proc, cgroup_root=root) == 7
    found = cgroup_file(42, "pids", "pids.current", proc=proc, cgroup_root=root)
    assert found is not None and CONTAINER_ID in str(found)
    cgroup = process_cgroup(42, proc=proc, cgroup_root=root)
    assert cgroup is not None and cgroup.layout is layout
    assert pids_in_cgroup(43, proc=proc, cgroup_root=root) is None, "a vanished pid"


def test_the_layout_is_the_hosts_not_the_first_line_seen(tmp_path: Path) -> None:
    """A v2 host whose process file also lists a named v1 hierarchy is read as v2, and a v1 host as v1 even
    though the process file has a unified line."""
    proc, root = fake_cgroups(tmp_path, [f"1:name=systemd:{V2_SCOPE}", *V2_SYSTEMD[0]], V2_SYSTEMD[1])
    assert read_cgroup_usage(42, CONTAINER_ID, proc=proc, cgroup_root=root) == Usage(2.5, 1048576, 134217728, 7)
    v1_proc, v1_root = fake_cgroups(tmp_path / "v1", V1_HYBRID[0], V1_HYBRID[1])
    cgroup = process_cgroup(42, proc=v1_proc, cgroup_root=v1_root)
    assert cgroup is not None and cgroup.layout is CgroupLayout.V1
    assert cgroup.file("memory", "memory.max_usage_in_bytes") is not None


def test_missing_files_or_controllers_read_as_none(tmp_path: Path) -> None:
    files = {key: value for key, value in V2_SYSTEMD[1].items() if not key.endswith("cpu.stat")}
    proc, root = fake_cgroups(tmp_path, V2_SYSTEMD[0], files)
    assert read_cgroup_usage(42, CONTAINER_ID, proc=proc, cgroup_root=root) is None, "no cpu.stat"
    v1_files = {key: value for key, value in V1_CGROUPFS[1].items() if "pids" not in key}
    v1_proc, v1_root = fake_cgroups(tmp_path / "v1", [line for line in V1_CGROUPFS[0] if "pids" not in line], v1_files)
    usage = read_cgroup_usage(42, CONTAINER_ID, proc=v1_proc, cgroup_root=v1_root)
    assert usage == Usage(2.5, 1048576, 134217728, None), "no pids controller: the rest is still read"
    assert pids_in_cgroup(42, proc=v1_proc, cgroup_root=v1_root) is None


def test_cgroup_of_a_reused_pid_is_not_charged_to_the_job(tmp_path: Path) -> None:
    proc, root = fake_cgroups(
        tmp_path,
        ["4:memory:/user.slice", "2:cpuacct:/user.slice"],
        {"cpuacct/user.slice/cpuacct.usage": "9\n", "memory/user.slice/memory.max_usage_in_bytes": "9\n"},
    )
    assert read_cgroup_usage(42, CONTAINER_ID, proc=proc, cgroup_root=root) is None
    assert read_cgroup_usage(43, CONTAINER_ID, proc=proc, cgroup_root=root) is None, "a vanished pid"
    v2_proc, v2_root = fake_cgroups(tmp_path / "v2", ["0:: /user.slice"], {
        "cgroup.controllers": "cpu memory pids\n", "user.slice/cpu.stat": "usage_usec 9\n",
        "user.slice/memory.peak": "9\n"})
    assert read_cgroup_usage(42, CONTAINER_ID, proc=v2_proc, cgroup_root=v2_root) is None


@pytest.mark.docker
def test_a_real_container_is_metered_on_this_hosts_layout(runner: DockerRunner, job_files: JobFiles,
                                                          docker_client: Any) -> None:
    """Whatever layout this host has (its /sys/fs/cgroup says), a running job's usage and process count read."""
    layout = host_layout()
    assert layout is not None, "this host shows neither cgroup layout at /sys/fs/cgroup"
    script = ("import os, time\nfor _ in range(6):\n    if os.fork() == 0:\n        time.sleep(30)\n"
              "        os._exit(0)\ntime.sleep(30)\n")
    resources = dataclasses.replace(SMALL, pids=64, timeout_s=20, memory_mb=128)
    job = job_files.job(script, resources=resources)
    runner.prepare(job)
    runner.start(job)
    try:
        container = docker_client.containers.get(f"sandbox-job-{job.id}")
        pid = int(container.attrs["State"]["Pid"])
        deadline = time.monotonic() + 15
        counted = pids_in_cgroup(pid)
        while (counted is None or counted < 7) and time.monotonic() < deadline:
            time.sleep(0.2)
            counted = pids_in_cgroup(pid)
        usage = read_cgroup_usage(pid, str(container.id))
        cgroup = process_cgroup(pid)
    finally:
        runner.terminate(job.id)
        wait_for_exit(runner, job.id, limit_s=30)
        runner.cleanup(job.id)
    assert cgroup is not None and cgroup.layout is layout, f"host is {layout}, read as {cgroup}"
    assert counted is not None and counted >= 7, f"python and its 6 children not counted: {counted}"
    assert usage is not None, f"no usage read on this {layout} host"
    assert usage.cpu_seconds > 0 and usage.peak_memory_bytes > 0
    assert usage.memory_limit_bytes == resources.memory_mb * 2**20, f"limit read as {usage.memory_limit_bytes}"
    assert usage.pids is not None and usage.pids >= 7
