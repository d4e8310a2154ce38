"""No-op job latency: submit-to-done through the whole service vs a raw hardened container run.

Run: .venv/bin/python bench/jobs.py [--sequential 40] [--concurrent 8] [--per-thread 6]
Both sides use the same image id and run `true`, measured in the same run on the same engine, through the
same client: the Docker SDK (docker-py) the runner uses, create + start + wait + remove, so neither side pays
for the `docker` CLI's process start. The raw side gets the same hardening options the runner uses (no
network, read-only root, no capabilities, no-new-privileges, non-root, init, pids/memory/CPU limits, tmpfs
/tmp). Sequential runs alternate service and raw, so load that comes and goes falls on both; each figure is
printed with its spread (p10-p90), and the overhead with a bootstrap 90% interval, so an effect smaller than
the noise shows as one.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import docker
import docker.types
import httpx
from served import served

from runners.images import image_digest

# The runner's hardening, as docker-py arguments (runners/docker.py container_options, less the mounts).
RAW_OPTIONS = {"network_mode": "none", "read_only": True, "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"],
               "user": "10001:10001", "init": True, "pids_limit": 256, "mem_limit": 256 * 2**20,
               "memswap_limit": 256 * 2**20, "nano_cpus": 10**9,
               "tmpfs": {"/tmp": "rw,noexec,nosuid,nodev,size=64m,mode=1777"},
               "log_config": docker.types.LogConfig(type="json-file", config={"max-size": "1m"})}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def spread(values: list[float]) -> str:
    return f"p50 {statistics.median(values):6.0f} [{percentile(values, 0.1):5.0f}-{percentile(values, 0.9):5.0f}] ms"


def median_gap_interval(service: list[float], raw: list[float], draws: int = 2000) -> tuple[float, float]:
    """A bootstrap 90% interval of median(service) - median(raw)."""
    rng = random.Random(7)
    gaps = sorted(statistics.median(rng.choices(service, k=len(service)))
                  - statistics.median(rng.choices(raw, k=len(raw))) for _ in range(draws))
    return gaps[int(0.05 * draws)], gaps[int(0.95 * draws)]


def bundle() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("README")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"ok"))
    return buffer.getvalue()


def timed(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def concurrent(fn: Callable[[], None], threads: int, per_thread: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(per_thread):
            elapsed = timed(fn)
            with lock:
                latencies.append(elapsed)

    started = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return latencies, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequential", type=int, default=40)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--per-thread", type=int, default=6)
    args = parser.parse_args()
    image = image_digest("analysis")

    env = {"SANDBOX_WORKER_CPUS": "64", "SANDBOX_WORKER_MEMORY_MB": "65536", "SANDBOX_WORKER_INTERVAL_S": "0.5"}
    with served(prefix="bench-jobs-", procedures=200, env=env) as service:
        home, url, buyer = service.home, service.url, service.buyer
        contract = service.contract(tier="aggregate", kinds=["analysis"], concurrent_jobs=64, cpu_hours=1000)
        spec = json.dumps({"contract": contract, "dataset": "carotid-stenting", "command": ["true"],
                           "resources": {"cpus": 1, "memory_mb": 256, "timeout_s": 60}})
        code = bundle()

        def service_job() -> None:
            with httpx.Client(base_url=url, timeout=60) as session:
                response = session.post("/v1/jobs", headers=buyer, data={"spec": spec},
                                        files={"code": ("c.tar.gz", code, "application/gzip")})
                response.raise_for_status()
                job_id, state = response.json()["id"], response.json()["state"]
                while state not in ("done", "failed", "cancelled", "in_review"):
                    state = session.get(f"/v1/jobs/{job_id}", headers=buyer,
                                        params={"wait_s": 20, "since": state}).json()["state"]
                assert state == "done", f"no-op job ended {state}"

        engine = docker.from_env()

        def raw_job() -> None:
            container = engine.containers.create(image, ["true"], **RAW_OPTIONS)
            try:
                container.start()
                assert container.wait()["StatusCode"] == 0, "the raw no-op failed"
            finally:
                container.remove(force=True)

        deadline = time.monotonic() + 60
        while True:  # wait until the worker has published the image
            try:
                service_job()
                break
            except httpx.HTTPStatusError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        raw_job()

        service_seq: list[float] = []
        raw_seq: list[float] = []
        for _ in range(args.sequential):
            service_seq.append(timed(service_job))
            raw_seq.append(timed(raw_job))
        service_conc, service_wall = concurrent(service_job, args.concurrent, args.per_thread)
        raw_conc, raw_wall = concurrent(raw_job, args.concurrent, args.per_thread)

    total = args.concurrent * args.per_thread
    phases = phase_breakdown(home / "sandbox.db")
    print(f"no-op job, image {image[:19]}, {args.sequential} sequential, {args.concurrent} concurrent x "
          f"{args.per_thread}; both sides through the Docker SDK")
    for name, seq, conc, wall in (("service submit-to-done", service_seq, service_conc, service_wall),
                                  ("raw SDK create+start+wait", raw_seq, raw_conc, raw_wall)):
        print(f"  {name:26} seq {spread(seq)} p99 {percentile(seq, 0.99):5.0f} ms | "
              f"x{args.concurrent} {spread(conc)} p99 {percentile(conc, 0.99):6.0f} ms | "
              f"{total / wall * 60:5.0f} jobs/min")
    p50_gap = statistics.median(service_seq) - statistics.median(raw_seq)
    low, high = median_gap_interval(service_seq, raw_seq)
    p99_ratio = percentile(service_conc, 0.99) / percentile(raw_conc, 0.99)
    print(f"  sequential p50 overhead      {p50_gap:+7.0f} ms   90% interval [{low:+.0f}, {high:+.0f}] ms "
          f"(target <= +150 ms)")
    print(f"  p99 at {args.concurrent} concurrent ratio  {p99_ratio:7.2f}x    (target <= 2x)")
    print(f"  throughput ratio             {(total / service_wall) / (total / raw_wall):7.2f}x")
    print("  where a service job's time goes (median over all jobs, from the audit log):")
    for name, values in phases.items():
        print(f"    {name:26} {statistics.median(values):7.0f} ms")


def phase_breakdown(database: Path) -> dict[str, list[float]]:
    """Median gaps between a job's audited transitions: queueing, running, checking."""
    import sqlite3
    from datetime import datetime

    connection = sqlite3.connect(database)
    rows = connection.execute("SELECT object_id, action, at FROM audit_events WHERE object_type = 'job' "
                              "AND action IN ('job.submit', 'job.running', 'job.checking', 'job.done')").fetchall()
    times: dict[str, dict[str, datetime]] = {}
    for job_id, action, at in rows:
        times.setdefault(job_id, {})[action] = datetime.fromisoformat(str(at))
    phases: dict[str, list[float]] = {"submit -> running": [], "running -> exited+checking": [],
                                      "checking -> done": []}
    for marks in times.values():
        if {"job.submit", "job.running", "job.checking", "job.done"} <= marks.keys():
            phases["submit -> running"].append((marks["job.running"] - marks["job.submit"]).total_seconds() * 1000)
            phases["running -> exited+checking"].append(
                (marks["job.checking"] - marks["job.running"]).total_seconds() * 1000)
            phases["checking -> done"].append((marks["job.done"] - marks["job.checking"]).total_seconds() * 1000)
    return phases


if __name__ == "__main__":
    main()
