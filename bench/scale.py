"""Scale: API status reads with 1 and 4 API processes on PostgreSQL, and jobs per minute on 1 and 3 Swarm nodes.

Run: .venv/bin/python bench/scale.py [--quick] [--duration 15] [--users 16] [--rate 100] [--jobs 18] [--job-s 5]
                                     [--skip-api] [--skip-swarm]

Measured in one run:
- status reads: `GET /v1/jobs/{id}` with a buyer token against 1, then 4, `sandbox serve` processes with no
  embedded worker (the API alone: no scheduler ticking beside it), sharing one home and one PostgreSQL
  database, each on its own loopback port. A load generator of `--generators` processes, each an asyncio loop
  of keep-alive HTTP/1.1 users, spreads its users over the ports round-robin, as a load balancer would. Two
  loads: saturated (each user sends as soon as it has its answer, as locust users with no wait time: the most
  reads/s) and paced (`--rate` reads/s in all, on a fixed schedule; latency counts from the scheduled time, so
  a stalled server's backlog is measured, not skipped). Every answer is checked (200, the job's id). Rounds
  alternate 1 and 4 processes, so load that comes and goes falls on both. The CPU each party used in the
  measured window is read from /proc: the API processes, PostgreSQL (exited backends included), the
  generators, and the rest of the machine; and how many connections PostgreSQL opened.
- jobs per minute: real jobs submitted through the API to a real worker built by `sandbox.worker.make_worker`
  with `runner=swarm` on the lab of `runners/swarm_lab.py` (3 dockerd nodes in network namespaces on this
  machine), first with 2 nodes drained (availability `drain`), then with all 3 active. Each job reserves
  1 CPU and 128 MiB and sleeps `--job-s` seconds (waiting, not computing): every lab node offers this
  machine's cores, so the figure is what placement and the runner's steps allow, not what the cores do.

Targets: 4 API processes >= 3x the reads/s of 1, p99 < 50 ms; 3 nodes >= 2.5x the jobs/min of 1 node.
A missed target is printed, not an error: the script exits non-zero only when something fails.

Why separate processes, not uvicorn's `--workers`: `sandbox serve` hands uvicorn an application object
(uvicorn forks workers only from an import string), and separate processes on their own ports behind a
balancer are how several API processes run (docs/scaling.md); the generator plays the balancer.
Why not locust or httpx as the client: on a 2-core machine the client's CPU is taken from the servers. On
loopback against a trivial asyncio server, a bare asyncio keep-alive request cost 30-70 us of CPU (client and
server together) and an httpx.AsyncClient request about 900 us; the generators' CPU per read is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "sandbox.cli"]
POSTGRES_URL = os.environ.get("SANDBOX_TEST_POSTGRES_URL",
                              "postgresql+psycopg://sandbox:sandbox@127.0.0.1:5432/postgres")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SPAWN_S = 2.0  # time for the generator processes to start and connect, before the warm-up


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- CPU accounting from /proc -------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: index 0 is field 3 (state) of proc(5)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_cpu_s(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU seconds of one process (0 once it is gone), with its reaped children's if asked."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLOCK_TICKS


def postgres_cpu_s() -> float:
    """CPU seconds of every PostgreSQL process, those that already exited included.

    A backend lives as long as its connection: one opened and closed between two samples is counted through
    the postmaster's reaped-children time.
    """
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.add(int(entry.name))
            except OSError:
                continue
    total = 0.0
    for pid in pids:
        fields = _stat_fields(pid)
        postmaster = fields is not None and int(fields[1]) not in pids  # its parent is not PostgreSQL
        total += process_cpu_s(pid, reaped_children=postmaster)
    return total


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot, all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLOCK_TICKS  # less idle and iowait; guest is in user


@dataclass
class CpuSample:
    at: float
    machine: float
    servers: float
    postgres: float
    connections: int

    @classmethod
    def take(cls, server_pids: list[int], connections: Callable[[], int]) -> CpuSample:
        return cls(at=time.monotonic(), machine=machine_busy_s(), servers=sum(process_cpu_s(p) for p in server_pids),
                   postgres=postgres_cpu_s(), connections=connections())


# --- the load generator ---------------------------------------------------------------------------------------

@dataclass
class Load:
    ports: list[int]
    path: str
    authorization: str
    expect: bytes
    users: int
    rate: float | None  # reads per second in all, paced; None: each user sends as soon as it has its answer
    warm_at: float  # time.monotonic(), one clock for every process on the machine
    start_at: float
    end_at: float


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cpu_s: float = 0.0


async def _user(load: Load, port: int, offset_s: float, result: LoadResult) -> None:
    """One keep-alive connection; paced users measure from the scheduled time, so queueing counts."""
    request = (f"GET {load.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {load.authorization}\r\n"
               "Accept: application/json\r\n\r\n").encode()
    interval = load.users / load.rate if load.rate else 0.0
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    scheduled = load.warm_at + offset_s
    try:
        while True:
            if interval:
                await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
                began, scheduled = scheduled, scheduled + interval
            else:
                await asyncio.sleep(max(0.0, load.warm_at - time.monotonic()))
                began = time.monotonic()
            if began >= load.end_at:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            if status != b"200" or load.expect not in body:
                result.errors.append(f"{status.decode()} {body[:200]!r}")
                return
            if began >= load.start_at:
                result.latencies_ms.append((time.monotonic() - began) * 1000)
    finally:
        writer.close()


async def _generate(load: Load, first_user: int, users: int) -> LoadResult:
    result = LoadResult()
    tasks = [asyncio.create_task(_user(load, load.ports[(first_user + i) % len(load.ports)],
                                       (first_user + i) / load.rate if load.rate else 0.0, result))
             for i in range(users)]
    await asyncio.sleep(max(0.0, load.start_at - time.monotonic()))
    cpu_before = time.process_time()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, BaseException):
            result.errors.append(repr(outcome))
    result.cpu_s = time.process_time() - cpu_before
    return result


def _generator_process(load: Load, first_user: int, users: int, answers: Any) -> None:
    answers.put(asyncio.run(_generate(load, first_user, users)))


@dataclass
class Reads:
    processes: int
    rate: float | None
    per_s: float
    p50_ms: float
    p99_ms: float
    servers_cores: float
    postgres_cores: float
    generators_cores: float
    rest_cores: float
    connections_per_s: float
    generator_us_per_read: float


def drive(load: Load, generators: int, server_pids: list[int], connections: Callable[[], int]) -> Reads:
    """Run the generators over the load's window; reads/s, latency and where the machine's CPU went."""
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    share, extra = divmod(load.users, generators)
    first = 0
    children = []
    for index in range(generators):
        users = share + (1 if index < extra else 0)
        children.append(context.Process(target=_generator_process, args=(load, first, users, answers)))
        first += users
    for child in children:
        child.start()
    time.sleep(max(0.0, load.start_at - time.monotonic()))
    before = CpuSample.take(server_pids, connections)
    time.sleep(max(0.0, load.end_at - time.monotonic()))
    after = CpuSample.take(server_pids, connections)
    results = [answers.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)
    errors = [e for r in results for e in r.errors]
    if errors:
        raise RuntimeError(f"{len(errors)} reads failed, first: {errors[0]}")
    latencies = [v for r in results for v in r.latencies_ms]
    window = after.at - before.at
    servers = (after.servers - before.servers) / window
    postgres = (after.postgres - before.postgres) / window
    duration = load.end_at - load.start_at
    generators_cpu = sum(r.cpu_s for r in results)
    generators_cores = generators_cpu / duration
    return Reads(processes=len(load.ports), rate=load.rate, per_s=len(latencies) / duration,
                 p50_ms=statistics.median(latencies), p99_ms=percentile(latencies, 0.99),
                 servers_cores=servers, postgres_cores=postgres, generators_cores=generators_cores,
                 rest_cores=max(0.0, (after.machine - before.machine) / window - servers - postgres
                                - generators_cores),
                 connections_per_s=(after.connections - before.connections) / window,
                 generator_us_per_read=generators_cpu / max(1, len(latencies)) * 1e6)


# --- API processes on PostgreSQL --------------------------------------------------------------------------------

@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this run, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"sbx_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class ApiWorld:
    home: Path
    environment: dict[str, str]
    buyer: str
    job_id: str


def prepared_home(database_url: str) -> ApiWorld:
    """A home on `database_url` with the demo dataset, a contract and one queued job the buyer can read."""
    from fastapi.testclient import TestClient

    from sandbox.api.app import create_app
    from sandbox.auth.tokens import Role
    from sandbox.config import Settings
    from sandbox.demo import CARD, write_registry
    from sandbox.instance import Instance, init_instance
    from sandbox.worker_socket import serve_worker_socket

    home = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    environment = {**os.environ, "SANDBOX_HOME": str(home), "SANDBOX_DATABASE_URL": database_url,
                   "SANDBOX_EMBEDDED_WORKER": "false", "SANDBOX_LOG_LEVEL": "WARNING"}
    settings = Settings(home=home, database_url=database_url, log_level="WARNING")
    init_instance(settings)
    instance = Instance(settings)
    # The version upload runs beside the data, in the worker's local service: served here for the setup only.
    socket = serve_worker_socket(instance)
    try:
        steward = instance.issue_token(sub="steward", org="hospital", role=Role.STEWARD, ttl_s=3600).token
        buyer = instance.issue_token(sub="buyer", org="acme", role=Role.BUYER, ttl_s=3600).token
        with TestClient(create_app(instance)) as api:
            def call(method: str, path: str, token: str, **kwargs: Any) -> Any:
                answer = api.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)
                if answer.status_code >= 300:
                    raise RuntimeError(f"{method} {path}: {answer.status_code} {answer.text}")
                return answer.json()

            call("POST", "/v1/datasets", steward, json=CARD)
            data = write_registry(home / "registry.parquet", procedures=200)
            with data.open("rb") as handle:
                call("POST", "/v1/datasets/carotid-stenting/versions", steward, files={"file": ("r.parquet", handle)})
            contract = call("POST", "/v1/contracts", steward, json={
                "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["analysis"],
                "purpose": "bench", "valid_until": "2099-01-01", "epsilon": 1.0,
                "quotas": {"concurrent_jobs": 4, "cpu_hours": 10}})["id"]
            spec = {"contract": contract, "dataset": "carotid-stenting", "command": ["true"],
                    "resources": {"cpus": 1, "memory_mb": 256, "timeout_s": 60}}
            job = call("POST", "/v1/jobs", buyer, data={"spec": json.dumps(spec)},
                       files={"code": ("c.tar.gz", job_bundle({"README": "ok"}), "application/gzip")})
    finally:
        socket.close()
        instance.close()
    return ApiWorld(home=home, environment=environment, buyer=buyer, job_id=str(job["id"]))


def job_bundle(files: dict[str, str]) -> bytes:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            data = content.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@contextmanager
def api_processes(world: ApiWorld, count: int) -> Iterator[tuple[list[int], list[int]]]:
    """`count` API-only `sandbox serve` processes on one home and database; yields (ports, pids)."""
    import httpx

    servers: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for index in range(count):  # one after the other: each runs the (idempotent) init first
            port = free_port()
            with (world.home / f"serve-{index}.log").open("wb") as log:
                servers.append(subprocess.Popen([*CLI, "serve", "--port", str(port)], env=world.environment,
                                                stdout=log, stderr=subprocess.STDOUT))
            ports.append(port)
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if servers[-1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"API process {index} did not start; see {world.home}/serve-{index}.log")
                time.sleep(0.1)
        yield ports, [s.pid for s in servers]
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def bench_reads(args: argparse.Namespace) -> list[Reads]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    with postgres_database() as database_url:
        world = prepared_home(database_url)
        stats = create_engine(database_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)

        def connections() -> int:
            """Connections ever opened to the bench database (PostgreSQL 14+ counts them)."""
            with stats.connect() as connection:
                return int(connection.execute(text(
                    "SELECT sessions FROM pg_stat_database WHERE datname = current_database()")).scalar_one())

        measured: list[Reads] = []
        with api_processes(world, 4) as (ports, pids):
            for _ in range(args.rounds):
                for rate in (None, args.rate):
                    for count in (1, 4):
                        now = time.monotonic()
                        load = Load(ports=ports[:count], path=f"/v1/jobs/{world.job_id}",
                                    authorization=f"Bearer {world.buyer}", expect=world.job_id.encode(),
                                    users=args.users, rate=rate, warm_at=now + SPAWN_S,
                                    start_at=now + SPAWN_S + args.warmup,
                                    end_at=now + SPAWN_S + args.warmup + args.duration)
                        measured.append(drive(load, args.generators, pids[:count], connections))
                        print(f"  {count} API process(es), {f'paced {rate:g}/s' if rate else 'saturated'}: "
                              f"{measured[-1].per_s:6.0f} reads/s, p99 {measured[-1].p99_ms:6.1f} ms", flush=True)
        stats.dispose()
        shutil.rmtree(world.home, ignore_errors=True)
    return measured


def report_reads(measured: list[Reads], args: argparse.Namespace) -> None:
    print(f"\nstatus reads, GET /v1/jobs/{{id}} with a buyer token, PostgreSQL store, {args.users} keep-alive users "
          f"from {args.generators} generator processes, {args.duration:g} s measured after {args.warmup:g} s "
          f"warm-up, {args.rounds} round(s) alternating 1 and 4 processes; {os.cpu_count()} cores, load average "
          f"before {' '.join(f'{v:.2f}' for v in args.load_before)}")
    print("  load            API procs  reads/s   p50 ms   p99 ms | cores: API    PG  generators  rest "
          "| PG conns opened/s | generator us/read")
    for reads in measured:
        load = f"paced {reads.rate:g}/s" if reads.rate else "saturated"
        print(f"  {load:15} {reads.processes:9d} {reads.per_s:8.0f} {reads.p50_ms:8.2f} {reads.p99_ms:8.2f} |"
              f"        {reads.servers_cores:4.2f}  {reads.postgres_cores:4.2f}  {reads.generators_cores:10.2f}  "
              f"{reads.rest_cores:4.2f} | {reads.connections_per_s:17.1f} | {reads.generator_us_per_read:8.1f}")
    saturated = [r for r in measured if r.rate is None]
    paced = [r for r in measured if r.rate is not None]
    one = statistics.median(r.per_s for r in saturated if r.processes == 1)
    four = statistics.median(r.per_s for r in saturated if r.processes == 4)
    p99_paced = max(r.p99_ms for r in paced if r.processes == 4)
    p99_saturated = max(r.p99_ms for r in saturated if r.processes == 4)
    print(f"  saturated reads/s, 4 processes / 1 process       {four / one:6.2f}x    (target >= 3x)  "
          f"{'met' if four / one >= 3 else 'missed'}")
    print(f"  p99 with 4 processes, paced {args.rate:g}/s (worst round)  {p99_paced:6.1f} ms (target < 50 ms)  "
          f"{'met' if p99_paced < 50 else 'missed'}")
    print(f"  p99 with 4 processes, saturated (worst round)     {p99_saturated:6.1f} ms (a closed loop: about "
          f"{args.users} users / reads/s = {args.users / four * 1000:.0f} ms at the median)")
    per_read = statistics.median(r.servers_cores / r.per_s for r in saturated) * 1e3
    busy = statistics.median(r.servers_cores + r.postgres_cores + r.generators_cores + r.rest_cores
                             for r in saturated if r.processes == 4)
    print(f"  API CPU per read {per_read:.2f} ms: one process tops out near {1000 / per_read:.0f} reads/s per core "
          f"it gets; with 4 processes the machine was {busy:.2f} of {os.cpu_count()} cores busy")
    postgres_per_read = statistics.median(r.postgres_cores / r.per_s for r in saturated) * 1e3
    generator_per_read = statistics.median(r.generators_cores / r.per_s for r in saturated) * 1e3
    rest = statistics.median(r.rest_cores for r in saturated)
    wanted = 3 * one
    print(f"  3x the 1-process rate is {wanted:.0f} reads/s: about {wanted * per_read / 1e3:.2f} cores of API "
          f"processes, {wanted * postgres_per_read / 1e3:.2f} of PostgreSQL and "
          f"{wanted * generator_per_read / 1e3:.2f} of load generator, against {os.cpu_count()} cores of which "
          f"other work on the machine took {rest:.2f}")


# --- jobs per minute on the Swarm lab ---------------------------------------------------------------------------

@dataclass
class Throughput:
    active: list[str]
    jobs: int
    wall_s: float
    queued_p50_s: float  # submit -> running (admitted, service created)
    running_p50_s: float  # running -> checking (task placed, started, ran, exited, seen by the worker)
    nodes_used: set[str]
    failed: dict[str, str]  # job id -> why; jobs/min counts only the jobs that succeeded

    @property
    def per_min(self) -> float:
        return self.jobs / self.wall_s * 60


class TaskNodes:
    """Which lab nodes ran the instance's tasks: the manager's task list, sampled from a thread."""

    def __init__(self, manager: Any, instance_id: str) -> None:
        import threading

        from runners.base import LABEL_INSTANCE

        self.manager = manager
        self.label = f"{LABEL_INSTANCE}={instance_id}"
        self.seen: set[str] = set()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TaskNodes:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join()

    def _run(self) -> None:
        import docker.errors

        from runners.swarm import LABEL_NODE

        names = {n.id: n.attrs["Spec"]["Labels"].get(LABEL_NODE, n.id) for n in self.manager.nodes.list()}
        while not self.stopping.wait(0.5):
            try:
                for service in self.manager.services.list(filters={"label": self.label}):
                    self.seen.update(names.get(t.get("NodeID", ""), "?") for t in service.tasks() if t.get("NodeID"))
            except docker.errors.NotFound:  # a service removed while it was listed: the next look sees the rest
                continue


@contextmanager
def lab_steps_held() -> Iterator[None]:
    """Hold the lab's lock (`runners.swarm_lab`: one lab step at a time on the machine) over a batch.

    `lab_up` makes every node active again; a test session starting meanwhile would undo the drain under the
    measure. It waits here instead, and finds the lab as it was.
    """
    import fcntl

    from runners.swarm_lab import RUN_DIR

    with (RUN_DIR / "lab.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def set_active(manager: Any, active: set[str]) -> None:
    """Nodes named in `active` take tasks; the others are drained (availability `drain`)."""
    from runners.swarm import LABEL_NODE

    for node in manager.nodes.list():
        spec = node.attrs["Spec"]
        wanted = "active" if spec["Labels"].get(LABEL_NODE) in active else "drain"
        if spec.get("Availability") != wanted:
            node.update({**spec, "Availability": wanted})


def bench_jobs(args: argparse.Namespace) -> list[Throughput]:
    import docker
    from fastapi.testclient import TestClient

    from runners.images import image_digest
    from runners.swarm_lab import RUN_DIR, lab_down, lab_up
    from sandbox.api.app import create_app
    from sandbox.auth.tokens import Role
    from sandbox.config import Settings
    from sandbox.demo import CARD, write_registry
    from sandbox.instance import Instance, init_instance
    from sandbox.worker import make_worker
    from sandbox.worker_socket import serve_worker_socket

    was_up = (RUN_DIR / "lab.json").exists()
    started = time.monotonic()
    lab = lab_up(nodes=3)
    print(f"  swarm lab up in {time.monotonic() - started:.1f} s ({'already running' if was_up else 'started'}): "
          f"{', '.join(n.name for n in lab.nodes)}, registry {lab.registry}", flush=True)
    manager = docker.DockerClient(base_url=lab.manager_url, timeout=600)
    home = Path(tempfile.mkdtemp(prefix="bench-scale-jobs-"))
    settings = Settings(home=home, runner="swarm", swarm_manager_url=lab.manager_url, swarm_registry=lab.registry,
                        swarm_node_engines={n.name: n.engine_url for n in lab.nodes}, swarm_data="shared",
                        log_level="WARNING")
    init_instance(settings)
    instance = Instance(settings)
    socket_server = serve_worker_socket(instance)
    worker = None
    measured: list[Throughput] = []
    try:
        set_active(manager, {n.name for n in lab.nodes})
        worker = make_worker(instance)  # settings.runner == "swarm": the Swarm runner, as `sandbox worker` builds it
        # Warm-up, outside the measure: the image in the registry and pulled on every node.
        started = time.monotonic()
        reference = worker.runner.images.reference(image_digest("analysis"))
        for node in lab.nodes:
            docker.DockerClient(base_url=node.engine_url, timeout=600).images.pull(reference)
        print(f"  analysis image {reference.rsplit('@', 1)[1][:19]} pushed and on every node in "
              f"{time.monotonic() - started:.1f} s", flush=True)
        worker.refresh_images()
        application = create_app(instance)
        application.state.wake_worker = worker.wake
        worker.start_thread(settings.worker_interval_s)
        steward = instance.issue_token(sub="steward", org="hospital", role=Role.STEWARD, ttl_s=7200).token
        buyer = instance.issue_token(sub="buyer", org="acme", role=Role.BUYER, ttl_s=7200).token
        with TestClient(application) as api:
            def call(method: str, path: str, token: str, **kwargs: Any) -> Any:
                answer = api.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)
                if answer.status_code >= 300:
                    raise RuntimeError(f"{method} {path}: {answer.status_code} {answer.text}")
                return answer.json()

            call("POST", "/v1/datasets", steward, json=CARD)
            data = write_registry(home / "registry.parquet", procedures=200)
            with data.open("rb") as handle:
                call("POST", "/v1/datasets/carotid-stenting/versions", steward, files={"file": ("r.parquet", handle)})
            contract = call("POST", "/v1/contracts", steward, json={
                "buyer_org": "acme", "datasets": ["carotid-stenting"], "tier": "aggregate", "kinds": ["analysis"],
                "purpose": "bench", "valid_until": "2099-01-01", "epsilon": 1.0,
                "quotas": {"concurrent_jobs": 64, "cpu_hours": 1000}})["id"]
            spec = json.dumps({"contract": contract, "dataset": "carotid-stenting", "image": "analysis",
                               "command": ["python3", "-c", f"import time; time.sleep({args.job_s:g})"],
                               "resources": {"cpus": 1, "memory_mb": 128, "timeout_s": 300}})
            code = job_bundle({"README": "waits"})

            def run_batch(active: list[str]) -> Throughput:
                set_active(manager, set(active))
                failed: dict[str, str] = {}
                with TaskNodes(manager, instance.instance_id) as nodes:
                    began = time.monotonic()
                    ids = [call("POST", "/v1/jobs", buyer, data={"spec": spec},
                                files={"code": ("c.tar.gz", code, "application/gzip")})["id"] for _ in range(args.jobs)]
                    deadline = began + 60 + args.jobs * (args.job_s + 30)
                    pending = set(ids)
                    while pending:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"{len(pending)} jobs did not end in time on {active}")
                        for job_id in list(pending):
                            job = call("GET", f"/v1/jobs/{job_id}", buyer)
                            if job["state"] in ("failed", "cancelled"):
                                failed[job_id] = f"{job['state']}: {job.get('reason')}"
                            if job["state"] in ("done", "in_review", "failed", "cancelled"):
                                pending.discard(job_id)
                        time.sleep(0.2)
                    wall = time.monotonic() - began
                queued, running = phase_times(instance, ids)
                return Throughput(active=active, jobs=len(ids) - len(failed), wall_s=wall, queued_p50_s=queued,
                                  running_p50_s=running, nodes_used=nodes.seen, failed=failed)

            names = [n.name for n in lab.nodes]
            for _ in range(args.job_rounds):
                for active in (names[:1], names):
                    with lab_steps_held():
                        measured.append(run_batch(active))
                    print(f"  {len(active)} node(s) active: {measured[-1].jobs} of {args.jobs} jobs succeeded in "
                          f"{measured[-1].wall_s:.1f} s, {measured[-1].per_min:.1f} jobs/min, tasks on "
                          f"{sorted(measured[-1].nodes_used)}", flush=True)
    finally:
        if worker is not None:
            worker.stop(wait=True)
            runner = worker.runner
            for job_id in runner.managed_jobs():
                runner.terminate(job_id)
                runner.cleanup(job_id)
        socket_server.close()
        instance.close()
        shutil.rmtree(home, ignore_errors=True)  # the runner's cleanup unmounted the jobs' /output file systems
        try:
            set_active(manager, {n.name for n in lab.nodes})  # never leave the lab drained
        finally:
            manager.close()
            if not was_up:
                lab_down(lab.root)
    return measured


def phase_times(instance: Any, job_ids: list[str]) -> tuple[float, float]:
    """Median seconds from submit to running, and from running to checking, from the audit log."""
    from sqlalchemy import select

    from sandbox.store.models import AuditEvent

    with instance.read_session() as session:
        rows = session.execute(select(AuditEvent.object_id, AuditEvent.action, AuditEvent.at).where(
            AuditEvent.object_id.in_(job_ids),
            AuditEvent.action.in_(("job.submit", "job.running", "job.checking")))).all()
    marks: dict[str, dict[str, Any]] = {}
    for job_id, action, at in rows:
        marks.setdefault(job_id, {})[action] = at
    complete = [m for m in marks.values() if len(m) == 3]
    if not complete:
        return float("nan"), float("nan")
    return (statistics.median((m["job.running"] - m["job.submit"]).total_seconds() for m in complete),
            statistics.median((m["job.checking"] - m["job.running"]).total_seconds() for m in complete))


def report_jobs(measured: list[Throughput], args: argparse.Namespace) -> None:
    print(f"\njobs per minute on the swarm lab (3 dockerd nodes in network namespaces on this machine, Swarm runner "
          f"through a real worker), {args.jobs} jobs per batch, each reserving 1 CPU and 128 MiB and sleeping "
          f"{args.job_s:g} s; every node offers this machine's {os.cpu_count()} CPUs, so 2 jobs run at once per "
          "node")
    print("  active nodes  done  failed   wall s  jobs/min | p50 submit->running  running->checking | tasks ran on")
    for batch in measured:
        print(f"  {len(batch.active):12d} {batch.jobs:5d} {len(batch.failed):7d} {batch.wall_s:8.1f} "
              f"{batch.per_min:9.1f} | {batch.queued_p50_s:17.1f} s {batch.running_p50_s:16.1f} s | "
              f"{', '.join(sorted(batch.nodes_used))}")
    reasons = collections.Counter(why for batch in measured for why in batch.failed.values())
    for why, count in reasons.most_common():
        print(f"  FAILED x{count}: {why}")
    one = statistics.median(b.per_min for b in measured if len(b.active) == 1)
    three = statistics.median(b.per_min for b in measured if len(b.active) == 3)
    failed = sum(len(batch.failed) for batch in measured)
    verdict = (f"not judged: {failed} of {sum(b.jobs for b in measured) + failed} jobs failed" if failed
               else "met" if three / one >= 2.5 else "missed")
    print(f"  jobs/min 3 nodes / 1 node   {three / one:6.2f}x   (target >= 2.5x)  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="shorter rounds, one round, fewer jobs")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per round (15, quick 6)")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=None, help="alternating 1/4-process rounds (2, quick 1)")
    parser.add_argument("--users", type=int, default=16, help="keep-alive users (connections)")
    parser.add_argument("--rate", type=float, default=100.0, help="reads/s in all for the paced runs")
    parser.add_argument("--generators", type=int, default=2, help="load generator processes")
    parser.add_argument("--jobs", type=int, default=None, help="jobs per batch (18, quick 12)")
    parser.add_argument("--job-s", type=float, default=5.0, help="how long each job sleeps")
    parser.add_argument("--job-rounds", type=int, default=1, help="1-node/3-node batch pairs")
    parser.add_argument("--skip-api", action="store_true")
    parser.add_argument("--skip-swarm", action="store_true")
    args = parser.parse_args()
    args.duration = args.duration or (6.0 if args.quick else 15.0)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.jobs = args.jobs or (12 if args.quick else 18)
    args.load_before = os.getloadavg()
    from sandbox.logs import configure_logging

    configure_logging("WARNING", json=False)
    reads = None if args.skip_api else bench_reads(args)
    jobs = None if args.skip_swarm else bench_jobs(args)
    if reads is not None:
        report_reads(reads, args)
    if jobs is not None:
        report_jobs(jobs, args)
        if any(batch.failed for batch in jobs):
            sys.exit("some jobs failed (above): the jobs/min figures count only those that succeeded")


if __name__ == "__main__":
    main()
