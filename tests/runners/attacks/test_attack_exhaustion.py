"""Attack: exhaust the host: processes, memory, disk (many files, one huge or sparse file), the log store."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from runner_support import SMALL, JobFiles, last_json_line, logs, pids_in_cgroup, run_to_exit, wait_for_exit

from runners.base import RunState, RunStatus
from runners.docker import LOG_FILES, DockerRunner, log_file_bytes, truncation_marker

pytestmark = pytest.mark.docker

MIB = 1024 * 1024


def test_fork_bomb_is_held_at_the_pids_limit(
    runner: DockerRunner, job_files: JobFiles, docker_client: Any, tmp_path: Path
) -> None:
    # Every process forks forever and shrugs off EAGAIN, so the bomb presses on the limit until the timeout.
    script = """
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.01)
"""
    resources = dataclasses.replace(SMALL, pids=64, timeout_s=4, memory_mb=256)
    job = job_files.job(script, resources=resources)
    runner.prepare(job)
    runner.start(job)
    container = docker_client.containers.get(f"sandbox-job-{job.id}")
    pids_seen: list[int] = []

    def count_pids(status: RunStatus) -> None:
        if status.state is RunState.RUNNING:
            current = pids_in_cgroup(int(container.attrs["State"]["Pid"]))
            if current is not None:
                pids_seen.append(current)

    status = wait_for_exit(runner, job.id, limit_s=30, every_poll=count_pids)
    host_still_forks = subprocess.run(["true"], check=False).returncode == 0
    runner.cleanup(job.id)

    assert status.timed_out, "the fork bomb ended on its own: it did not really run"
    assert pids_seen and max(pids_seen) <= resources.pids, f"processes in the job: {pids_seen}"
    assert max(pids_seen) >= resources.pids // 2, f"the bomb never came near the limit ({pids_seen}): test is void"
    assert host_still_forks, "the host could not start a process during the bomb"


def test_memory_bomb_is_oom_killed_and_reported(runner: DockerRunner, job_files: JobFiles) -> None:
    script = """
chunks = []
while True:
    chunks.append(bytearray(8 * 1024 * 1024))  # touched: bytearray zero-fills
"""
    job = job_files.job(script, resources=dataclasses.replace(SMALL, memory_mb=64))
    status = run_to_exit(runner, job, limit_s=30)
    runner.cleanup(job.id)

    assert status.oom_killed, f"no OOM kill reported: {status}"
    assert status.exit_code == 137, f"exit code {status.exit_code}"
    assert not status.timed_out


DISK_FLOOD = """
import errno, json, os
written, error_name, files = 0, None, 0
try:
    while True:
        with open(f"/output/flood-{files}.bin", "wb") as handle:
            files += 1
            for _ in range(4):
                handle.write(os.urandom(256 * 1024))
                written += 256 * 1024
except OSError as error:
    error_name = errno.errorcode[error.errno]
# And the inode table: empty files cost no blocks.
inode_error = None
try:
    for index in range(100_000):
        open(f"/output/empty-{index}", "w").close()
except OSError as error:
    inode_error = errno.errorcode[error.errno]
print(json.dumps({"written": written, "error": error_name, "inode_error": inode_error}))
"""


def test_disk_flood_meets_enospc_at_the_output_quota(
    runner: DockerRunner, job_files: JobFiles, state_dir: Path, tmp_path: Path
) -> None:
    host_free_before = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    job = job_files.job(DISK_FLOOD, resources=dataclasses.replace(SMALL, output_mb=10))
    status = run_to_exit(runner, job, limit_s=60)
    image = state_dir / job.id / "output.img"
    image_blocks = image.stat().st_blocks * 512
    host_free_after = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    stdout, stderr = logs(runner, job.id, tmp_path / "collected")
    collected = runner.collect(job.id, tmp_path / "collected")
    runner.cleanup(job.id)

    assert status.exit_code == 0, f"the flood crashed: {stderr}"
    report = last_json_line(stdout)
    assert report["error"] == "ENOSPC", f"the flood ended with {report['error']}, not ENOSPC"
    assert report["inode_error"] == "ENOSPC", f"creating files ended with {report['inode_error']}"
    assert report["written"] <= 10 * MIB, f"the job wrote {report['written']} bytes past a 10 MiB quota"
    assert status.output_full, "poll() does not report the full output file system"
    assert image_blocks <= 10 * MIB, f"the quota file uses {image_blocks} bytes of host disk"
    # Other processes write too; the point is that the job cost the host no more than its quota.
    assert host_free_before - host_free_after < 40 * MIB, "the host file system lost more than the quota"
    assert sum(f.size for f in collected.files) <= 10 * MIB
    assert not image.exists(), "cleanup left the quota file"


HUGE_FILE = """
import errno, json, os
report = {}
for path in ("/tmp/huge.bin", "/output/huge.bin"):
    size = 0
    try:
        with open(path, "wb") as handle:
            while True:
                handle.write(b"x" * 1024 * 1024)
                size += 1024 * 1024
    except OSError as error:
        report[path] = [errno.errorcode[error.errno], os.path.getsize(path)]
    os.unlink(path)
for path in ("/tmp/sparse.bin", "/output/sparse.bin"):
    try:
        with open(path, "wb") as handle:
            handle.truncate(1 << 40)
        report[path] = ["created", os.path.getsize(path)]
    except OSError as error:
        report[path] = [errno.errorcode[error.errno], 0]
print(json.dumps(report))
"""


def test_single_huge_or_sparse_file_stops_at_the_file_size_limit(
    runner: DockerRunner, job_files: JobFiles, tmp_path: Path
) -> None:
    # /tmp is larger than the quota here, so only the file-size limit can stop the file in /tmp.
    job = job_files.job(HUGE_FILE, resources=dataclasses.replace(SMALL, output_mb=10, tmp_mb=48, memory_mb=128))
    status = run_to_exit(runner, job, limit_s=60)
    stdout, stderr = logs(runner, job.id, tmp_path / "collected")
    runner.cleanup(job.id)

    assert status.exit_code == 0, f"the probe crashed: {stderr}"
    report = last_json_line(stdout)
    assert report["/tmp/huge.bin"] == ["EFBIG", 10 * MIB], f"/tmp file: {report['/tmp/huge.bin']}"
    assert report["/output/huge.bin"][0] in ("EFBIG", "ENOSPC"), f"/output file: {report['/output/huge.bin']}"
    assert report["/output/huge.bin"][1] <= 10 * MIB
    for path in ("/tmp/sparse.bin", "/output/sparse.bin"):
        assert report[path][0] == "EFBIG", f"a 1 TiB sparse file was created at {path}: {report[path]}"


def test_log_flood_is_bounded_in_docker_and_in_what_is_collected(
    runner: DockerRunner, job_files: JobFiles, docker_client: Any, tmp_path: Path
) -> None:
    # 7.3 MB of text, far past what Docker keeps: Docker rotates it away, collect() returns a bounded head.
    script = """
import sys
line = "flood " * 20 + "\\n"
for _ in range(60_000):
    sys.stdout.write(line)
"""
    log_bytes = 64 * 1024
    job = job_files.job(script, resources=dataclasses.replace(SMALL, log_bytes=log_bytes))
    status = run_to_exit(runner, job, limit_s=60)
    log_path = Path(docker_client.containers.get(f"sandbox-job-{job.id}").attrs["LogPath"])
    docker_files = sorted(log_path.parent.glob(log_path.name + "*"))
    docker_bytes = sum(path.stat().st_size for path in docker_files)
    collected = runner.collect(job.id, tmp_path / "collected")
    runner.cleanup(job.id)

    assert status.exit_code == 0
    stdout = collected.stdout.stored_at.read_bytes()
    assert stdout.endswith(truncation_marker(log_bytes)), "the collected log is not marked as truncated"
    assert len(stdout) == log_bytes + len(truncation_marker(log_bytes)), f"collected {len(stdout)} bytes"
    assert collected.stdout.size == len(stdout)
    assert len(docker_files) <= LOG_FILES, f"Docker kept {len(docker_files)} log files"
    assert docker_bytes <= LOG_FILES * log_file_bytes(log_bytes) * 1.1, f"Docker's log files hold {docker_bytes} bytes"
    assert not log_path.exists(), "cleanup left Docker's log file"


def test_logs_keep_each_streams_head_separately(runner: DockerRunner, job_files: JobFiles, tmp_path: Path) -> None:
    # Within what Docker retains, the head is the real head and stderr is not mixed into stdout.
    script = """
import sys
print("first error line", file=sys.stderr, flush=True)
for number in range(20_000):
    print(f"line {number:06d}")
print("last error line", file=sys.stderr)
"""
    log_bytes = 64 * 1024
    job = job_files.job(script, resources=dataclasses.replace(SMALL, log_bytes=log_bytes))
    run_to_exit(runner, job, limit_s=60)
    collected = runner.collect(job.id, tmp_path / "collected")
    runner.cleanup(job.id)

    expected = "".join(f"line {number:06d}\n" for number in range(20_000)).encode()
    assert collected.stdout.stored_at.read_bytes() == expected[:log_bytes] + truncation_marker(log_bytes)
    assert collected.stderr.stored_at.read_bytes() == b"first error line\nlast error line\n"
