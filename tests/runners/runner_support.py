"""Builders and waits shared by the runner tests: job definitions, running a job to its end, host-side probes."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runners.base import LABEL_INSTANCE, JobDefinition, Resources, RunState, RunStatus
from runners.cgroup_usage import CGROUP_ROOT, PROC, process_cgroup
from runners.docker import DockerRunner
from runners.output_quota import is_mounted

# Small limits keep the folder fast: every attack meets its wall within a few seconds.
SMALL = Resources(cpus=1.0, memory_mb=128, timeout_s=30, pids=64, output_mb=10, tmp_mb=32, log_bytes=64 * 1024)


@dataclass
class JobFiles:
    """The host side of a job: its code folder and data files, in a test's tmp_path."""

    root: Path
    image_id: str
    data_files: dict[str, Path] = field(default_factory=dict)

    @property
    def code_dir(self) -> Path:
        return self.root / "code"

    def job(
        self,
        script: str | None = None,
        *,
        command: list[str] | None = None,
        resources: Resources = SMALL,
        env: dict[str, str] | None = None,
        dp_socket: Path | None = None,
        job_id: str | None = None,
    ) -> JobDefinition:
        """A job running `script` (written to /code/job.py) with `python3`, or `command` as given."""
        job_id = job_id or f"t{uuid.uuid4().hex[:12]}"
        if script is not None:
            (self.code_dir / f"{job_id}.py").write_text(script)
            command = ["python3", f"/code/{job_id}.py"]
        assert command, "a test job needs a script or a command"
        return JobDefinition(
            id=job_id,
            org="acme",
            image=self.image_id,
            command=command,
            code_dir=self.code_dir,
            data_files=dict(self.data_files),
            resources=resources,
            dp_socket=dp_socket,
            env=env or {},
        )


def wait_for_exit(
    runner: DockerRunner,
    job_id: str,
    *,
    limit_s: float = 60,
    every_poll: Callable[[RunStatus], None] | None = None,
) -> RunStatus:
    """Poll as the scheduler would until the job has exited; fail if it takes longer than `limit_s`."""
    deadline = time.monotonic() + limit_s
    while True:
        status = runner.poll(job_id)
        if every_poll is not None:
            every_poll(status)
        if status.state is RunState.EXITED:
            return status
        assert time.monotonic() < deadline, f"job {job_id} still {status.state} after {limit_s}s"
        time.sleep(0.2)


def run_to_exit(runner: DockerRunner, job: JobDefinition, *, limit_s: float = 60) -> RunStatus:
    runner.prepare(job)
    runner.start(job)
    return wait_for_exit(runner, job.id, limit_s=limit_s)


def logs(runner: DockerRunner, job_id: str, destination: Path) -> tuple[str, str]:
    """Collect the job and return its stdout and stderr as text."""
    collected = runner.collect(job_id, destination)
    return (
        collected.stdout.stored_at.read_text(errors="replace"),
        collected.stderr.stored_at.read_text(errors="replace"),
    )


def last_json_line(stdout: str) -> Any:
    """The probe scripts print their findings as one JSON object on the last line."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "the job printed nothing; it probably crashed before reporting"
    return json.loads(lines[-1])


def host_processes_with(argument: str) -> list[int]:
    """Pids of host processes whose command line contains `argument` (as one argv element)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argument.encode() in argv:
            found.append(int(entry))
    return found


def cgroup_file(pid: int, controller: str, name: str, *, proc: Path = PROC,
                cgroup_root: Path = CGROUP_ROOT) -> Path | None:
    """The host path of file `name` of `controller` for process `pid`, under cgroup v1 or v2 (whichever the host
    has), or None if it is not there. Under v2 the files keep their v1 names where both have one (`pids.current`)."""
    cgroup = process_cgroup(pid, proc=proc, cgroup_root=cgroup_root)
    return cgroup.file(controller, name) if cgroup is not None else None


def pids_in_cgroup(pid: int, *, proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """How many processes and threads share process `pid`'s pids cgroup now (v1 or v2), or None."""
    current = cgroup_file(pid, "pids", "pids.current", proc=proc, cgroup_root=cgroup_root)
    try:
        return int(current.read_text().split()[0]) if current is not None else None
    except (OSError, ValueError, IndexError):
        return None


def assert_nothing_left(client: Any, instance_id: str, state_dir: Path) -> None:
    """Fail (after removing them) if containers or mounts of `instance_id` outlived the test."""
    leftovers = client.containers.list(all=True, filters={"label": f"{LABEL_INSTANCE}={instance_id}"})
    names = [container.name for container in leftovers]
    for container in leftovers:
        container.remove(force=True)
    mounts = [folder / "output" for folder in state_dir.glob("*") if is_mounted(folder / "output")]
    for mountpoint in mounts:
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=False)
    assert not names, f"containers left behind by the test: {names}"
    assert not mounts, f"output file systems left mounted by the test: {mounts}"
