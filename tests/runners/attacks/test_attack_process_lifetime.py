"""Attack: outlive the job: run past the timeout, ignore SIGTERM, leave background processes behind."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from runner_support import SMALL, JobFiles, host_processes_with, wait_for_exit

from runners.base import RunState, RunStatus
from runners.docker import DockerRunner

pytestmark = pytest.mark.docker


def test_timeout_kills_the_job_and_a_restarted_service_still_knows(
    runner: DockerRunner, job_files: JobFiles, docker_client: Any, state_dir: Path, instance_id: str
) -> None:
    job = job_files.job(command=["sleep", "600"], resources=dataclasses.replace(SMALL, timeout_s=3))
    runner.prepare(job)
    runner.start(job)
    status = wait_for_exit(runner, job.id, limit_s=30)

    assert status.timed_out, f"the job ran past its timeout: {status}"
    assert status.exit_code == 137, f"exit code {status.exit_code}, not SIGKILL's"
    assert status.started_at is not None and status.finished_at is not None
    assert 3 <= status.finished_at - status.started_at < 8, "killed long after (or before) the timeout"
    persisted = json.loads((state_dir / job.id / "status.json").read_text())
    assert persisted["timed_out"] is True, "the timeout is not written down"

    restarted = DockerRunner(state_dir=state_dir, instance_id=instance_id, client=docker_client)
    again = restarted.poll(job.id)
    assert again.state is RunState.EXITED and again.timed_out, f"a restarted service forgot the timeout: {again}"
    restarted.cleanup(job.id)


def test_job_killed_while_the_service_was_down_is_killed_on_the_first_poll(
    runner: DockerRunner, job_files: JobFiles, docker_client: Any, state_dir: Path, instance_id: str
) -> None:
    # Nobody polls for longer than the timeout (the service was down): the first poll after enforces it.
    job = job_files.job(command=["sleep", "600"], resources=dataclasses.replace(SMALL, timeout_s=2))
    runner.prepare(job)
    runner.start(job)
    time.sleep(2.5)
    restarted = DockerRunner(state_dir=state_dir, instance_id=instance_id, client=docker_client)
    status = restarted.poll(job.id)
    restarted.cleanup(job.id)
    assert status.state is RunState.EXITED and status.timed_out, f"the overdue job still runs: {status}"


def test_sleep_forever_then_terminate(runner: DockerRunner, job_files: JobFiles) -> None:
    job = job_files.job(command=["sleep", "infinity"])
    runner.prepare(job)
    runner.start(job)
    assert wait_until_running(runner, job.id).state is RunState.RUNNING
    runner.terminate(job.id)
    status = runner.poll(job.id)
    runner.terminate(job.id)  # again: harmless
    runner.start(job)  # a cancelled job must never come back: start() after exit does nothing
    after = runner.poll(job.id)
    runner.cleanup(job.id)

    assert status.state is RunState.EXITED, f"still {status.state} after terminate()"
    assert not status.timed_out, "a terminated job is not a timed-out one"
    assert after == status, f"the terminated job changed after start(): {after}"


def test_job_ignoring_sigterm_is_killed_after_the_grace(runner: DockerRunner, job_files: JobFiles) -> None:
    job = job_files.job(command=["sh", "-c", "trap '' TERM; while :; do sleep 1; done"])
    runner.prepare(job)
    runner.start(job)
    wait_until_running(runner, job.id)
    started = time.monotonic()
    runner.terminate(job.id)
    took = time.monotonic() - started
    status = runner.poll(job.id)
    runner.cleanup(job.id)

    assert status.state is RunState.EXITED and status.exit_code == 137, f"not SIGKILLed: {status}"
    assert took < runner.stop_grace_s + 5, f"terminate() took {took:.1f}s"


def test_background_processes_die_with_the_job(runner: DockerRunner, job_files: JobFiles) -> None:
    marks = [str(random.randint(100_000, 999_999)) for _ in range(3)]
    script = (
        f"sleep {marks[0]} & "  # plain background job
        f"setsid sleep {marks[1]} & "  # its own session
        f"( sleep {marks[2]} & ) ; "  # double fork: re-parented to the container's init
        "sleep 2; echo leaving"
    )
    job = job_files.job(command=["sh", "-c", script])
    runner.prepare(job)
    runner.start(job)
    seen_running: dict[str, list[int]] = {}

    def look(status: RunStatus) -> None:
        if status.state is RunState.RUNNING:
            for mark in marks:
                seen_running.setdefault(mark, []).extend(host_processes_with(mark))

    status = wait_for_exit(runner, job.id, limit_s=30, every_poll=look)
    survivors = {mark: host_processes_with(mark) for mark in marks}
    runner.cleanup(job.id)

    assert status.exit_code == 0
    assert all(seen_running.get(mark) for mark in marks), f"control: the sleeps never ran ({seen_running})"
    assert not any(survivors.values()), f"processes outlived the job on the host: {survivors}"


def wait_until_running(runner: DockerRunner, job_id: str) -> RunStatus:
    deadline = time.monotonic() + 20
    while (status := runner.poll(job_id)).state is not RunState.RUNNING:
        assert time.monotonic() < deadline, f"the job never ran: {status}"
        time.sleep(0.1)
    return status
