"""The runner's steps against a real engine: restart safety, idempotence, crash recovery, usage, errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Any

import docker
import pytest
from runner_support import SMALL, JobFiles, run_to_exit, wait_for_exit

from runners.base import LABEL_INSTANCE, LABEL_JOB, LABEL_MANAGED, JobRunner, RunState
from runners.docker import DockerRunner, JobNotPreparedError, RunnerError
from runners.output_quota import is_mounted

pytestmark = pytest.mark.docker

WRITE_RESULT = """
import time
time.sleep(1.5)
open("/output/result.txt", "w").write("42\\n")
print("done")
"""


def test_docker_runner_is_a_job_runner(runner: DockerRunner) -> None:
    usable_as: JobRunner = runner  # checked by mypy; the assertion keeps the name used
    assert usable_as is runner


def test_a_new_runner_object_picks_up_a_running_job(
    runner: DockerRunner, job_files: JobFiles, docker_client: Any, state_dir: Path, instance_id: str, tmp_path: Path
) -> None:
    job = job_files.job(WRITE_RESULT)
    runner.prepare(job)
    runner.start(job)
    del runner  # the service restarts: nothing of the old object survives

    restarted = DockerRunner(state_dir=state_dir, instance_id=instance_id, client=docker_client)
    assert restarted.managed_jobs() == {job.id}
    assert restarted.poll(job.id).state is RunState.RUNNING
    status = wait_for_exit(restarted, job.id)
    collected = restarted.collect(job.id, tmp_path / "collected")
    restarted.cleanup(job.id)

    assert status.exit_code == 0, collected.stderr.stored_at.read_text()
    assert [(f.path, f.stored_at.read_text()) for f in collected.files] == [("result.txt", "42\n")]
    assert collected.stdout.stored_at.read_text() == "done\n"
    assert restarted.managed_jobs() == set(), "cleanup left something the runner still counts as managed"
    assert not (state_dir / job.id).exists(), "cleanup left the job's state folder"
    assert restarted.poll(job.id).state is RunState.UNKNOWN


def test_every_step_twice_is_harmless(
    runner: DockerRunner, job_files: JobFiles, docker_client: Any, tmp_path: Path
) -> None:
    job = job_files.job(WRITE_RESULT)
    runner.prepare(job)
    runner.prepare(job)
    runner.start(job)
    first_start = docker_client.containers.get(f"sandbox-job-{job.id}").attrs["State"]["StartedAt"]
    runner.start(job)
    status = wait_for_exit(runner, job.id)
    runner.start(job)  # after exit: must not run the job a second time
    assert docker_client.containers.get(f"sandbox-job-{job.id}").attrs["State"]["StartedAt"] == first_start
    runner.prepare(job)  # after exit: must not replace the container or wipe /output
    assert runner.poll(job.id) == runner.poll(job.id) == status
    runner.terminate(job.id)  # after exit: nothing to stop
    assert runner.poll(job.id).exit_code == 0
    first = runner.collect(job.id, tmp_path / "collected")
    second = runner.collect(job.id, tmp_path / "collected")
    assert first == second and [f.path for f in first.files] == ["result.txt"]
    containers = docker_client.containers.list(all=True, filters={"label": f"{LABEL_JOB}={job.id}"})
    assert len(containers) == 1, f"{len(containers)} containers for one job"
    runner.cleanup(job.id)
    runner.cleanup(job.id)
    runner.terminate(job.id)  # everything gone: still harmless
    assert runner.poll(job.id).state is RunState.UNKNOWN


def test_prepare_recovers_a_half_done_output_after_a_crash(
    runner: DockerRunner, job_files: JobFiles, docker_client: Any, state_dir: Path, tmp_path: Path
) -> None:
    job = job_files.job(WRITE_RESULT)
    job_dir = state_dir / job.id
    # Crash 1: killed while formatting; the half-made file system must not be used.
    job_dir.mkdir(parents=True)
    (job_dir / "output.img.partial").write_bytes(b"half a file system")
    runner.prepare(job)
    assert is_mounted(job_dir / "output") and not (job_dir / "output.img.partial").exists()
    # Crash 2: the mount is there, the container is not (killed between the two).
    (job_dir / "output" / "kept.txt").write_text("made before the crash")
    docker_client.containers.get(f"sandbox-job-{job.id}").remove(force=True)
    runner.prepare(job)
    assert (job_dir / "output" / "kept.txt").read_text() == "made before the crash", "the mount was not kept"
    # Crash 3: the host rebooted: the container is there, the loop mount is not.
    subprocess.run(["umount", str(job_dir / "output")], check=True)
    runner.start(job)
    status = wait_for_exit(runner, job.id)
    collected = runner.collect(job.id, tmp_path / "collected")
    runner.cleanup(job.id)

    assert status.exit_code == 0
    assert sorted(f.path for f in collected.files) == ["kept.txt", "result.txt"]


def test_cleanup_finishes_a_half_done_cleanup(runner: DockerRunner, job_files: JobFiles, state_dir: Path) -> None:
    job = job_files.job(command=["true"])
    run_to_exit(runner, job)
    runner.client.containers.get(f"sandbox-job-{job.id}").remove(force=True)  # crashed after this step
    assert runner.managed_jobs() == {job.id}, "a job with only a mounted state folder left is not found"
    runner.cleanup(job.id)
    assert not (state_dir / job.id).exists()
    assert runner.managed_jobs() == set()


def test_usage_is_sampled_and_survives_exit_and_restart(
    runner: DockerRunner, job_files: JobFiles, docker_client: Any, state_dir: Path, instance_id: str
) -> None:
    script = """
import time
block = bytearray(48 * 1024 * 1024)
while time.process_time() < 2.5:  # CPU time, not wall time: on a busy machine the loop still burns 2.5 s
    pass
"""
    job = job_files.job(script)
    runner.prepare(job)
    runner.start(job)
    status = wait_for_exit(runner, job.id)
    restarted = DockerRunner(state_dir=state_dir, instance_id=instance_id, client=docker_client)
    after_restart = restarted.poll(job.id)
    runner.cleanup(job.id)

    # Sampled while it runs: the last poll before the exit may miss the loop's last second.
    assert status.cpu_seconds > 1.0, f"{status.cpu_seconds} CPU seconds for 2.5 s of busy loop"
    assert status.peak_memory_bytes >= 48 * 1024 * 1024, f"peak memory {status.peak_memory_bytes}"
    assert status.peak_memory_bytes <= SMALL.memory_mb * 1024 * 1024
    assert (after_restart.cpu_seconds, after_restart.peak_memory_bytes) == (
        status.cpu_seconds,
        status.peak_memory_bytes,
    ), "usage was not kept for a restarted service"


def test_managed_jobs_counts_this_instance_only(
    runner: DockerRunner, job_files: JobFiles, docker_client: Any, tmp_path: Path
) -> None:
    other = DockerRunner(
        state_dir=tmp_path / "other-state", instance_id=runner.instance_id + "-other", client=docker_client
    )
    exited = job_files.job(command=["true"])
    prepared = job_files.job(command=["true"])
    theirs = job_files.job(command=["true"])
    run_to_exit(runner, exited)
    runner.prepare(prepared)
    other.prepare(theirs)
    try:
        assert runner.managed_jobs() == {exited.id, prepared.id}
        assert other.managed_jobs() == {theirs.id}
        with pytest.raises(RunnerError, match="does not own it"):
            runner.poll(theirs.id)  # same engine, another instance's container: hands off
        with pytest.raises(RunnerError, match="does not own it"):
            runner.cleanup(theirs.id)
    finally:
        for job_id in (exited.id, prepared.id):
            runner.cleanup(job_id)
        other.cleanup(theirs.id)


def test_unmanaged_container_with_the_jobs_name_is_not_touched(
    runner: DockerRunner, job_files: JobFiles, docker_client: Any, analysis_image: str
) -> None:
    job = job_files.job(command=["true"])
    squatter = docker_client.containers.create(
        analysis_image, ["true"], name=f"sandbox-job-{job.id}", labels={LABEL_INSTANCE: runner.instance_id}
    )
    try:
        with pytest.raises(RunnerError, match="does not own it"):
            runner.prepare(job)
        assert LABEL_MANAGED not in docker_client.containers.get(squatter.id).labels
    finally:
        squatter.remove(force=True)
        runner.cleanup(job.id)


def test_failures_are_runner_errors_with_a_reason(runner: DockerRunner, job_files: JobFiles, tmp_path: Path) -> None:
    missing_image = dataclasses.replace(job_files.job(command=["true"]), image="sha256:" + "0" * 64)
    with pytest.raises(RunnerError, match="is not in the local Docker engine"):
        runner.prepare(missing_image)
    runner.cleanup(missing_image.id)

    never_prepared = job_files.job(command=["true"])
    with pytest.raises(JobNotPreparedError, match="call prepare"):
        runner.start(never_prepared)
    with pytest.raises(JobNotPreparedError, match="no output file system"):
        runner.collect(never_prepared.id, tmp_path / "collected")
    assert runner.poll(never_prepared.id).state is RunState.UNKNOWN

    running = job_files.job(command=["sleep", "60"])
    runner.prepare(running)
    runner.start(running)
    with pytest.raises(RunnerError, match="still running"):
        runner.collect(running.id, tmp_path / "collected")
    runner.cleanup(running.id)  # a running job: cleanup removes it all the same

    with pytest.raises(RunnerError, match="job id"):
        runner.poll("../../etc")

    # The engine goes away under a running service: a RunnerError, not a requests exception.
    gone = docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version="1.41", timeout=2)
    unreachable = DockerRunner(state_dir=tmp_path / "s", instance_id="x", client=gone)
    with pytest.raises(RunnerError, match="listing this instance's containers failed"):
        unreachable.managed_jobs()
    with pytest.raises(RunnerError, match="inspecting container"):
        unreachable.poll("some-job")


def test_unreachable_engine_at_construction_is_a_runner_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(RunnerError, match="connecting to the Docker engine failed"):
        DockerRunner(state_dir=tmp_path, instance_id="x")


def test_prepared_job_terminated_before_start_never_starts(runner: DockerRunner, job_files: JobFiles) -> None:
    job = job_files.job(command=["true"])
    runner.prepare(job)
    runner.terminate(job.id)
    with pytest.raises(RunnerError, match="terminated"):
        runner.start(job)
    assert runner.poll(job.id).state is RunState.PREPARED
    runner.cleanup(job.id)


def test_output_quota_file_system_is_mounted_safely(runner: DockerRunner, job_files: JobFiles, state_dir: Path) -> None:
    job = job_files.job(command=["true"])
    runner.prepare(job)
    mountpoint = state_dir / job.id / "output"
    options = next(
        line.split()[5]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == str(mountpoint.resolve())
    )
    owner = (mountpoint.stat().st_uid, mountpoint.stat().st_gid)
    job_dir_mode = os.stat(state_dir / job.id).st_mode & 0o777
    image_size = (state_dir / job.id / "output.img").stat().st_size
    runner.cleanup(job.id)  # before the asserts, so a failure leaves nothing mounted

    for option in ("nosuid", "nodev", "noexec", "nosymfollow"):
        assert option in options.split(","), f"the output mount lacks {option}: {options}"
    assert owner == (10001, 10001), f"/output belongs to {owner}"
    assert job_dir_mode == 0o700, f"the job's state folder is open to others: {oct(job_dir_mode)}"
    assert image_size == SMALL.output_mb * 1024 * 1024
