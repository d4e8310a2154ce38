"""Three `sandbox serve` processes on one PostgreSQL store and one home: one elected scheduler, and a killed
leader replaced in seconds without running, charging or leaving anything twice; and a leader whose lock check
hangs steps down before anyone else may lead (`sandbox.leader`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import docker
import httpx
import pytest
from cli.server import base_env, free_port, unmount_below, wait_healthy
from jobworld import analysis_image, pack
from pgdb import admin_engine, cloned_database
from sqlalchemy import create_engine, select, text

from sandbox.config import Settings
from sandbox.demo import CARD, write_registry
from sandbox.instance import Instance, init_instance
from sandbox.leader import Election, scheduler_view
from sandbox.store.models import AuditEvent

__all__ = ["analysis_image"]  # the session's image fixture, built once

pytestmark = pytest.mark.postgres

CLI = [sys.executable, "-m", "sandbox.cli"]
DATASET = "carotid-stenting"
# The job waits for the test's word (a file the test writes into its code folder, bind-mounted at /code) so
# that the leader is surely killed while it runs, whatever the machine's speed.
HELD_JOB = """
import os, time, pandas as pd
print('started', flush=True)
deadline = time.time() + 120
while not os.path.exists('/code/go') and time.time() < deadline:
    time.sleep(0.1)
pd.read_parquet('/data/carotid-stenting.parquet').groupby('sex').size().to_csv('/output/by_sex.csv')
print('released' if os.path.exists('/code/go') else 'gave up waiting')
"""
SETTLED = {"in_review", "done"}

T = TypeVar("T")


def wait_for(look: Callable[[], T | None], what: str, timeout_s: float = 60) -> T:
    """What `look` returns once it is truthy; fails naming `what` if it never is within the bound."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = look()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:g} s"
        time.sleep(0.2)


@dataclass
class Serve:
    url: str
    process: subprocess.Popen[str]

    @property
    def name(self) -> str:
        """The process's name as the election gives it (`sandbox.leader.process_name`)."""
        return f"{socket.gethostname()[:40]}:{self.process.pid}"


@dataclass
class Cluster:
    home: Path
    database_url: str
    env: dict[str, str]
    serves: list[Serve]
    steward: dict[str, str]
    buyer: dict[str, str]

    @property
    def instance_id(self) -> str:
        instance = Instance(Settings(home=self.home, database_url=self.database_url))
        try:
            return instance.instance_id
        finally:
            instance.close()

    def scheduler(self, serve: Serve) -> dict[str, Any] | None:
        answer = httpx.get(f"{serve.url}/healthz", headers=self.steward, timeout=10)
        assert answer.status_code == 200, answer.text
        scheduler: dict[str, Any] | None = answer.json()["details"].get("scheduler")
        return scheduler

    def leader(self, among: list[Serve] | None = None) -> Serve | None:
        """The serving process that leads, as every one of `among` reports it; None while they disagree or none does."""
        among = among if among is not None else self.serves
        names = {(self.scheduler(serve) or {}).get("leader") for serve in among}
        if len(names) != 1:
            return None
        [name] = names
        return next((serve for serve in among if serve.name == name), None)

    def job(self, serve: Serve, job_id: str, **params: Any) -> dict[str, Any]:
        answer = httpx.get(f"{serve.url}/v1/jobs/{job_id}", headers=self.buyer, params=params, timeout=60)
        assert answer.status_code == 200, answer.text
        job: dict[str, Any] = answer.json()
        return job

    def submit(self, serve: Serve, contract: str, code: dict[str, str]) -> str:
        spec = {"contract": contract, "dataset": DATASET, "image": "analysis", "command": ["python3", "main.py"],
                "resources": {"cpus": 1, "memory_mb": 512, "timeout_s": 150}}

        def submitted() -> httpx.Response | None:  # 201 once the leader's worker has published the images
            answer = httpx.post(f"{serve.url}/v1/jobs", headers=self.buyer, data={"spec": json.dumps(spec)},
                                files={"code": ("c.tar.gz", pack(code), "application/gzip")}, timeout=60)
            return answer if answer.status_code == 201 else None

        job_id: str = wait_for(submitted, "a job submission accepted").json()["id"]
        return job_id

    def audit(self, action: str, object_id: str | None = None) -> list[dict[str, Any]]:
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                query = "SELECT details FROM audit_events WHERE action = :action"
                if object_id is not None:
                    query += " AND object_id = :object"
                rows = connection.execute(text(query + " ORDER BY seq"), {"action": action, "object": object_id})
                return [dict(details) for (details,) in rows]
        finally:
            engine.dispose()


def start_serve(env: dict[str, str], log: Path) -> Serve:
    port = free_port()
    with open(log, "w") as sink:  # a pipe nobody reads would fill
        process = subprocess.Popen([*CLI, "serve", "--port", str(port)], env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, text=True)
    return Serve(url=f"http://127.0.0.1:{port}", process=process)


def end(serve: Serve) -> None:
    if serve.process.poll() is None:
        serve.process.terminate()
        try:
            serve.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.process.kill()
            serve.process.wait()


@contextmanager
def three_serves(tmp_path: Path, database_url: str) -> Iterator[Cluster]:
    """Three `sandbox serve` started at once on a home nobody initialised and an empty database."""
    home = tmp_path / "home"
    env = {**base_env(home, database_url), "SANDBOX_WORKER_CPUS": "4", "SANDBOX_WORKER_MEMORY_MB": "4096"}
    with ExitStack() as stack:
        stack.callback(unmount_below, home)
        serves = []
        for index in range(3):
            serve = start_serve(env, tmp_path / f"serve-{index}.log")
            stack.callback(end, serve)
            serves.append(serve)
        for index, serve in enumerate(serves):
            try:
                wait_healthy(serve.url, serve.process, timeout=90)
            except AssertionError as failure:
                raise AssertionError(f"serve {index} of three started at once on one home did not come up:\n"
                                     f"{(tmp_path / f'serve-{index}.log').read_text()[-3000:]}") from failure

        def token(role: str, org: str) -> dict[str, str]:
            issued = subprocess.run([*CLI, "token", "issue", "--sub", role, "--org", org, "--role", role], env=env,
                                    check=True, capture_output=True, text=True).stdout.strip()
            return {"Authorization": f"Bearer {issued}"}

        cluster = Cluster(home=home, database_url=database_url, env=env, serves=serves,
                          steward=token("steward", "hospital"), buyer=token("buyer", "acme"))
        try:
            yield cluster
        finally:
            for serve in serves:
                end(serve)
            left = docker.from_env().containers.list(
                all=True, filters={"label": f"org.sandbox.instance={cluster.instance_id}"})
            for container in left:
                container.remove(force=True)


@pytest.mark.docker
@pytest.mark.slow
def test_one_leader_schedules_and_a_killed_leader_is_replaced(tmp_path: Path, analysis_image: str) -> None:
    # An empty database, no template: the three processes migrate it at once.
    with cloned_database(None) as database_url, three_serves(tmp_path, database_url) as cluster:
        # Three processes initialised one home and one empty database at once: one key, one genesis.
        assert len(cluster.audit("instance.init")) == 1, "more than one process initialised the instance"

        first = wait_for(cluster.leader, "one leader that all three processes agree on")
        standbys = [serve for serve in cluster.serves if serve is not first]
        view = cluster.scheduler(standbys[0])
        assert view is not None and sorted(view["standbys"]) == sorted(s.name for s in standbys), view
        elected = wait_for(lambda: cluster.audit("scheduler.leader"), "the leader's election on the audit chain")
        assert [e["process"] for e in elected] == [first.name], f"leadership went elsewhere: {elected}"

        # Everything through the processes that do not lead: the version's upload, the contract, the job.
        entry, watcher = standbys
        steward = cluster.steward
        assert httpx.post(f"{entry.url}/v1/datasets", json=CARD, headers=steward).status_code == 201
        with write_registry(tmp_path / "registry.parquet", procedures=200).open("rb") as handle:
            added = httpx.post(f"{entry.url}/v1/datasets/{DATASET}/versions", headers=steward, timeout=120,
                               files={"file": ("r.parquet", handle)})
        assert added.status_code == 201, added.text
        contract = httpx.post(f"{entry.url}/v1/contracts", headers=steward, json={
            "buyer_org": "acme", "datasets": [DATASET], "purpose": "leader election", "tier": "aggregate",
            "kinds": ["analysis"], "epsilon": 1.0, "valid_until": "2099-01-01",
            "quotas": {"concurrent_jobs": 2, "cpu_hours": 10}}).json()["id"]
        job_id = cluster.submit(entry, contract, {"main.py": HELD_JOB})
        # A long-poll on a process that dispatches nothing answers when the leader starts the job.
        polled = cluster.job(watcher, job_id, wait_s=30, since="queued")
        assert polled["state"] == "running", f"the long-poll on a standby answered {polled['state']}"

        containers = docker.from_env().containers
        [running] = wait_for(lambda: containers.list(filters={"label": f"org.sandbox.job={job_id}"}),
                             "the job's container")
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=10)
        killed_at = time.monotonic()

        survivors = standbys
        second = wait_for(lambda: cluster.leader(survivors), "a survivor taking over from the killed leader",
                          timeout_s=30)
        print(f"takeover: a new leader {time.monotonic() - killed_at:.1f} s after SIGKILL")
        other = next(serve for serve in survivors if serve is not second)
        assert cluster.job(other, job_id)["state"] == "running", "the job did not survive its leader"
        assert [c.id for c in containers.list(all=True, filters={"label": f"org.sandbox.job={job_id}"})] == \
            [running.id], "the new leader did not adopt the job's container (it was replaced or started again)"

        # A long-poll on the process that does not lead answers when the new leader settles the job.
        with ThreadPoolExecutor(1) as pool:
            poll = pool.submit(cluster.job, other, job_id, wait_s=30, since="running")
            (cluster.home / "artifacts" / "jobs" / job_id / "code" / "go").touch()
            assert poll.result(timeout=60)["state"] != "running", "the long-poll missed the change of state"
        job = wait_for(lambda: (j := cluster.job(other, job_id))["state"] in SETTLED and j, "the job settling")
        assert job["exit_code"] == 0, job
        stdout = httpx.get(f"{other.url}/v1/reviews/{job_id}/files/logs/stdout.txt", headers=steward).text
        assert stdout.count("started") == 1 and "released" in stdout, stdout

        assert len(cluster.audit("job.running", job_id)) == 1, "the job was started twice"
        usage = cluster.audit("job.usage", job_id)
        assert len(usage) == 1 and usage[0]["cpu_seconds"] > 0, f"usage charged {len(usage)} times: {usage}"
        wait_for(lambda: not containers.list(all=True, filters={"label": f"org.sandbox.job={job_id}"}),
                 "the job's container going")
        assert [e["process"] for e in cluster.audit("scheduler.leader")] == [first.name, second.name]
        never_led = (tmp_path / f"serve-{cluster.serves.index(other)}.log").read_text()
        assert '"worker_started"' not in never_led, "a process that never led ran a worker"

        # A leader whose lock connection is cut steps down (its worker drains and lets go of the runner lock);
        # whoever leads next runs the next job.
        admin = admin_engine()
        try:
            with admin.connect() as connection:
                cut = connection.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :name"),
                    {"name": f"sandbox-scheduler {second.name}"}).scalars().all()
        finally:
            admin.dispose()
        assert cut == [True], f"the leader's lock connection was not found: {cut}"
        wait_for(lambda: [e for e in cluster.audit("scheduler.step_down") if e["process"] == second.name],
                 "the leader stepping down once its lock connection was cut")
        third = wait_for(lambda: cluster.leader(survivors), "a leader after the step-down")
        quick = cluster.submit(other, contract, {"main.py": "print('after the step-down')"})
        settled = wait_for(lambda: (j := cluster.job(other, quick))["state"] in SETTLED and j,
                           f"a job run by the next leader ({third.name})")
        assert settled["exit_code"] == 0, settled

        verified = subprocess.run([*CLI, "audit", "verify", "--json"], env=cluster.env, capture_output=True,
                                  text=True)
        assert verified.returncode == 0, f"the audit chain does not verify: {verified.stdout}{verified.stderr}"
        owned = {"label": f"org.sandbox.instance={cluster.instance_id}"}
        wait_for(lambda: not containers.list(all=True, filters=owned), "every container of the instance going")


class HangingCheck(Election):
    """An election whose lock check can be made to hang, as on a connection that stops answering."""

    hang = threading.Event()
    release = threading.Event()

    def _holds(self, connection: Any) -> bool:
        if self.hang.is_set():
            self.release.wait(60)
        return super()._holds(connection)


def test_a_leader_whose_check_hangs_steps_down_and_nobody_leads_until_its_lock_goes(
        tmp_path: Path, postgres_template: str) -> None:
    HangingCheck.hang.clear()
    HangingCheck.release.clear()
    with cloned_database(postgres_template) as url:
        settings = Settings(home=tmp_path / "home", database_url=url, leader_retry_s=0.1, leader_check_s=0.1,
                            leader_lease_s=0.5)
        init_instance(settings)
        instance = Instance(settings)
        leading: list[str] = []  # who runs a worker now, as the callbacks say
        events: list[str] = []

        def candidate(name: str, kind: type[Election]) -> Election:
            def elected() -> None:
                leading.append(name)
                events.append(f"{name} elected")

            def deposed(reason: str) -> None:
                leading.remove(name)
                events.append(f"{name} deposed: {reason}")

            return kind(instance, name=name, on_elected=elected, on_deposed=deposed)

        first = candidate("first", HangingCheck)
        first.start()
        try:
            wait_for(lambda: leading == ["first"], "the first candidate leading")
            second = candidate("second", Election)
            second.start()
            try:
                wait_for(lambda: scheduler_view(instance.engine, instance.instance_id).standbys == ["second"],
                         "the second candidate standing by")
                HangingCheck.hang.set()
                wait_for(lambda: not leading, "the leader stepping down while its check hangs")
                assert "unanswered" in events[-1], events
                # Its connection still holds the lock: nobody may lead until that connection lets go.
                assert scheduler_view(instance.engine, instance.instance_id).leader == "first"
                time.sleep(1.0)  # ten of the standby's tries
                assert not leading, f"someone led while the deposed leader's connection held the lock: {events}"
                HangingCheck.release.set()
                wait_for(lambda: leading == ["second"], "the standby leading once the lock went")
                steps = [(e["process"], action) for action in ("scheduler.leader", "scheduler.step_down")
                         for e in audit_details(instance, action)]
                assert sorted(steps) == [("first", "scheduler.leader"), ("first", "scheduler.step_down"),
                                         ("second", "scheduler.leader")], steps
            finally:
                second.stop()
        finally:
            HangingCheck.release.set()
            first.stop()
            instance.close()
        assert not leading, events


def audit_details(instance: Instance, action: str) -> list[dict[str, Any]]:
    with instance.read_session() as session:
        return [dict(e.details) for e in session.execute(
            select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)).scalars()]
