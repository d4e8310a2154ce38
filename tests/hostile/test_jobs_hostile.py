"""Hostile jobs, one attack each, submitted through the API and run by the real worker.

Every test asserts that the attack was contained, that the service still answers, and (in the
`job_world` fixture's teardown) that no container of this instance is left behind. The job code
reports what it could do on stdout, which the test reads through the steward's review endpoint.

Each attack also proves that it really ran, so a broken attack cannot pass as a blocked one: a refusal
counts only with the errno the guard gives (any other exception is "broken"), the disk flood writes up to
ENOSPC, the fork bomb forks up to the pids limit, the memory bomb allocates most of its limit before the
kill, and the network probe reaches its target from a container without the guard.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import docker
import pytest
from helpers import auth, stand_in_api
from jobworld import JobWorld

from runners.base import Resources

pytestmark = pytest.mark.docker

# A refusal is an OSError with an errno, named here ("blocked: EROFS"); any other exception means the attack
# itself broke ("broken: NameError: ..."), which no test accepts as contained.
PROBE = '''
import errno, json, os, socket
def attempt(fn):
    try:
        return "allowed: " + str(fn())
    except OSError as exc:
        return "blocked: " + (errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__)
    except Exception as exc:
        return "broken: " + type(exc).__name__ + ": " + str(exc)[:200]
'''
LIMITS = Resources()  # the runner's defaults for what a job spec does not set: pids, output and log sizes
NETWORK_REFUSALS = {"blocked: ENETUNREACH", "blocked: EHOSTUNREACH", "blocked: ECONNREFUSED", "blocked: ETIMEDOUT",
                    "blocked: TimeoutError"}
WRITE_REFUSALS = {"blocked: EROFS", "blocked: EACCES", "blocked: EPERM"}


def run(world: JobWorld, code: str, *, timeout_s: int = 60, memory_mb: int = 256,
        states: frozenset[str] = frozenset({"in_review", "failed", "done"})) -> tuple[dict[str, object], str]:
    created = world.submit({"main.py": PROBE + code}, ["python3", "main.py"],
                           resources={"cpus": 1, "memory_mb": memory_mb, "timeout_s": timeout_s})
    job = world.run_until(created["id"], set(states), timeout=timeout_s + 90)
    stdout = world.review_text(created["id"], "logs/stdout.txt")
    assert world.api.get("/healthz").json() == {"status": "ok"}, "the service stopped answering"
    return job, stdout


def report(stdout: str) -> dict[str, str]:
    line = next(line for line in stdout.splitlines() if line.startswith("{"))
    result: dict[str, str] = json.loads(line)
    return result


@pytest.fixture
def host_server() -> Iterator[int]:
    """A real HTTP server on every host address: a stand-in for the API's own port."""
    with stand_in_api() as port:
        yield port


def unguarded(image: str, code: str) -> dict[str, str]:
    """`code` run in the same image on Docker's default bridge network, without the runner's guard: the control
    that shows a target is reachable, so that a refusal inside a job is the guard's doing."""
    client = docker.from_env()
    try:
        output = client.containers.run(image, ["python3", "-c", PROBE + code], network="bridge", remove=True,
                                       stdout=True, stderr=True)
    finally:
        client.close()
    return report(output.decode())


def test_network_outside_gateway_and_api_port_are_unreachable(job_world: JobWorld, host_server: int,
                                                              analysis_image: str) -> None:
    gateway = subprocess.run(["docker", "network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Gateway}}"],
                             capture_output=True, text=True).stdout.strip() or "172.17.0.1"
    targets = {"outside-dns": ("1.1.1.1", 53), "outside-https": ("8.8.8.8", 443), "gateway": (gateway, 2375),
               "gateway-api": (gateway, host_server), "api-port": ("127.0.0.1", host_server)}
    code = f"""
def fetch(host, port):
    with socket.create_connection((host, port), timeout=3) as connection:
        connection.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        return connection.recv(200).decode(errors="replace").split("\\r\\n")[0]
results = {{name: attempt(lambda h=h, p=p: fetch(h, p)) for name, (h, p) in {targets!r}.items()}}
results["interfaces"] = ",".join(sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:]))
print(json.dumps(results))
"""
    # Control: without the guard, the same code in the same image reaches the stand-in API through the gateway.
    control = unguarded(analysis_image, code)
    assert control["gateway-api"].startswith("allowed: HTTP/1.0 200"), f"control: unreachable unguarded: {control}"
    _, stdout = run(job_world, code)
    results = report(stdout)
    for name in targets:
        assert results[name] in NETWORK_REFUSALS, f"the job reached {name} {targets[name]}: {results[name]}"
    assert results["interfaces"] == "lo", f"the container has interfaces {results['interfaces']}"


def test_writes_outside_output_and_tmp_fail(job_world: JobWorld) -> None:
    code = """
def write(path):
    with open(path, "w") as handle:
        handle.write("x")
    return path
results = {p: attempt(lambda p=p: write(p)) for p in
           ["/evil", "/data/evil", "/data/carotid-stenting.parquet", "/code/evil", "/etc/evil", "/usr/evil"]}
results["tmp"] = attempt(lambda: write("/tmp/ok"))
import shutil, subprocess, stat
shutil.copy("/bin/true", "/tmp/true"); os.chmod("/tmp/true", 0o755)
results["exec-tmp"] = attempt(lambda: subprocess.run(["/tmp/true"], check=True))
print(json.dumps(results))
"""
    _, stdout = run(job_world, code)
    results = report(stdout)
    for path in ["/evil", "/data/evil", "/data/carotid-stenting.parquet", "/code/evil", "/etc/evil", "/usr/evil"]:
        assert results[path] in WRITE_REFUSALS, f"the job wrote {path}, or the write broke: {results[path]}"
    # The same write works where writing is allowed, and the copied binary runs nowhere but for noexec.
    assert results["tmp"] == "allowed: /tmp/ok", results
    assert results["exec-tmp"] == "blocked: EACCES", results


def test_host_files_environment_and_docker_socket_are_out_of_reach(job_world: JobWorld,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOX_SECRET_SENTINEL", "s3cr3t-sentinel-value")
    code = """
environ = open("/proc/1/environ", "rb").read().decode(errors="replace")
results = {
    "environ": environ + "|" + json.dumps(dict(os.environ)),
    "docker-sock": str(os.path.exists("/var/run/docker.sock") or os.path.exists("/run/docker.sock")),
    "shadow": attempt(lambda: open("/etc/shadow").read()[:20]),
    "host-root": str(os.path.exists("/work") or os.path.exists("/root/.cache")),
}
print(json.dumps(results))
"""
    _, stdout = run(job_world, code)
    results = report(stdout)
    assert "s3cr3t-sentinel-value" not in stdout and "SANDBOX_" not in results["environ"], "service env leaked"
    assert results["docker-sock"] == "False" and results["host-root"] == "False"
    assert results["shadow"] in {"blocked: EACCES", "blocked: ENOENT"}, results["shadow"]
    assert "PATH=" in results["environ"] and "HOME" in results["environ"], "the probe read no environment at all"


def test_identity_capabilities_and_seccomp_from_inside(job_world: JobWorld) -> None:
    code = """
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "CapEff": status["CapEff"].strip(),
                  "CapBnd": status["CapBnd"].strip(), "NoNewPrivs": status["NoNewPrivs"].strip(),
                  "Seccomp": status["Seccomp"].strip()}))
"""
    _, stdout = run(job_world, code)
    results = report(stdout)
    assert results["uid"] == 10001 and results["gid"] == 10001, f"the job ran as uid {results['uid']}"
    assert results["CapEff"] == "0000000000000000", f"effective capabilities {results['CapEff']}"
    assert results["CapBnd"] == "0000000000000000", f"bounding capabilities {results['CapBnd']}"
    assert results["NoNewPrivs"] == "1" and results["Seccomp"] == "2", results


def test_fork_bomb_is_contained(job_world: JobWorld) -> None:
    code = """
import time
children = 0
while True:
    try:
        if os.fork() == 0:
            time.sleep(30); os._exit(0)
        children += 1
    except OSError as exc:
        print(json.dumps({"children": children, "stopped_by": type(exc).__name__}), flush=True)
        break
os._exit(0)
"""
    _, stdout = run(job_world, code, timeout_s=30)
    results = report(stdout)
    # Stopped by the pids limit (EAGAIN from fork), after forking nearly up to it: it really ran.
    assert results["stopped_by"] == "BlockingIOError", f"the bomb stopped on something else: {results}"
    assert results["children"] < LIMITS.pids, f"the fork bomb made {results['children']} processes"
    assert results["children"] >= LIMITS.pids // 2, f"the bomb never came near the limit: {results}"


def test_memory_bomb_is_oom_killed(job_world: JobWorld) -> None:
    code = """
hoard = []
while True:
    hoard.append(b"\\x01" * (8 * 1024 * 1024))  # written, so every page is really in memory
    print(json.dumps({"allocated_mb": 8 * len(hoard)}), flush=True)
"""
    job, stdout = run(job_world, code, memory_mb=128)
    assert job["reason"].startswith("oom"), f"a memory bomb ended with {job['reason']!r}"
    allocated = max(json.loads(line)["allocated_mb"] for line in stdout.splitlines() if line.startswith("{"))
    assert allocated >= 64, f"killed after {allocated} MB of 128: the bomb never came near its limit"


def test_disk_flood_stops_at_the_output_quota(job_world: JobWorld) -> None:
    code = """
written = 0
chunk = os.urandom(1024 * 1024)
try:
    with open("/output/flood.bin", "wb") as handle:
        while written < 2 * 1024 ** 3:
            handle.write(chunk); handle.flush(); written += len(chunk)
    error = "none"
except OSError as exc:
    error = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__
print(json.dumps({"written_mb": written // (1024 * 1024), "error": error}))
"""
    job, stdout = run(job_world, code)
    results = report(stdout)
    # Stopped by a full quota (ENOSPC), after filling most of it: it really wrote.
    assert results["error"] in {"ENOSPC", "EDQUOT"}, f"the flood stopped on something else: {results}"
    assert LIMITS.output_mb * 0.8 <= results["written_mb"] <= LIMITS.output_mb * 1.1, f"the flood wrote {results}"
    flood = next((o for o in job["outputs"] if o["path"] == "flood.bin"), None)
    assert flood is None or flood["status"] == "blocked", "a .bin flood file was not blocked"


def test_log_flood_is_bounded(job_world: JobWorld) -> None:
    code = """
import sys
line = "x" * 1023 + "\\n"
written = 0
for _ in range(60 * 1024):
    written += sys.stdout.write(line)
sys.stdout.flush()
sys.stderr.write(json.dumps({"written_bytes": written}) + "\\n")
"""
    job, stdout = run(job_world, code)
    log = next(o for o in job["outputs"] if o["path"] == "logs/stdout.txt")
    assert log["size"] <= LIMITS.log_bytes * 1.1, f"a 60 MB log flood kept {log['size']} bytes"
    assert "truncated" in stdout.lower()
    # The flood really went out in full: the job got to its end and said so on stderr.
    assert job["exit_code"] == 0, job
    assert report(job_world.review_text(job["id"], "logs/stderr.txt")) == {"written_bytes": 60 * 1024 * 1024}


def test_timeout_kills_the_job(job_world: JobWorld) -> None:
    code = "import time\nprint(json.dumps({'sleeping': True}), flush=True)\ntime.sleep(600)\n"
    job, stdout = run(job_world, code, timeout_s=3)
    assert job["reason"].startswith("timeout"), f"a job past its limit ended with {job['reason']!r}"
    assert report(stdout) == {"sleeping": True}, "the job never got to its sleep"


def test_sleep_forever_then_cancel(job_world: JobWorld) -> None:
    created = job_world.submit({"main.py": "import time\ntime.sleep(10**6)\n"}, ["python3", "main.py"])
    job_world.run_until(created["id"], {"running"})
    assert [c.status for c in job_world.containers()] == ["running"], "no container ran the job"
    response = job_world.api.post(f"/v1/jobs/{created['id']}/cancel", headers=auth(job_world.buyer))
    assert response.json()["state"] == "cancelled"
    job_world.worker.tick()
    assert not job_world.containers()
    assert job_world.api.get("/healthz").status_code == 200


def test_orphaned_processes_die_with_the_job(job_world: JobWorld) -> None:
    code = """
import subprocess
import subprocess, time
subprocess.Popen(["sleep", "4242"], start_new_session=True)
subprocess.Popen(["sh", "-c", "nohup sleep 4243 >/dev/null 2>&1 &"])
def running():
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            found.add(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode().strip())
        except OSError:
            pass
    return sorted(found & {"sleep 4242", "sleep 4243"})
deadline = time.monotonic() + 5
while len(running()) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps({"orphans": running()}))
"""
    job, stdout = run(job_world, code)
    assert job["exit_code"] == 0
    assert report(stdout) == {"orphans": ["sleep 4242", "sleep 4243"]}, "the orphans were never started"
    survivors = subprocess.run(["pgrep", "-f", "sleep 424[23]"], capture_output=True, text=True).stdout.split()
    assert not survivors, f"orphaned processes outlived the job: {survivors}"


@pytest.mark.parametrize(("members", "expect"), [
    ({"../../escape.py": "print(1)"}, 422),
    ({"/etc/cron.d/evil": "* * * * * root true"}, 422),
])
def test_bundle_path_traversal_is_refused(job_world: JobWorld, members: dict[str, str], expect: int) -> None:
    job_world.submit(members, ["python3", "escape.py"], expect=expect)
    assert job_world.api.get("/v1/jobs", headers=auth(job_world.buyer)).json() == []
    jobs_root = job_world.instance.settings.artifacts_dir / "jobs"
    assert not jobs_root.exists() or not any(jobs_root.iterdir()), "a refused bundle left files behind"


def test_zip_bomb_bundle_is_refused(job_world: JobWorld) -> None:
    import gzip
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 50 * 1024 * 1024
        tar.addfile(info, io.BytesIO(b"\0" * info.size))
    bomb = gzip.compress(raw.getvalue(), compresslevel=9)
    assert len(bomb) < 200_000
    spec = {"contract": job_world.contract, "dataset": "carotid-stenting", "command": ["true"]}
    response = job_world.api.post("/v1/jobs", headers=auth(job_world.buyer), data={"spec": json.dumps(spec)},
                                  files={"code": ("bomb.tar.gz", bomb, "application/gzip")})
    assert response.status_code == 413 and "expands" in response.json()["detail"]
    assert job_world.api.get("/healthz").status_code == 200
