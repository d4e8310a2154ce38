"""Attack: read the service's secrets or the host's files: environment, /etc/shadow, the Docker socket."""

from __future__ import annotations

import dataclasses
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from runner_support import JobFiles, last_json_line, logs, run_to_exit

from runners.docker import DockerRunner

pytestmark = pytest.mark.docker

PROBE = """
import json, os, sys
host_secret_path = sys.argv[1]

def read(path):
    try:
        with open(path, "rb") as handle:
            return handle.read().decode(errors="replace")
    except OSError as error:
        return f"refused: {os.strerror(error.errno)}"

environs = {path: read(path).split("\\0") for path in ("/proc/1/environ", "/proc/self/environ")}
# Print everything found, so a leak would also show up in the logs.
print(json.dumps(environs))
print(json.dumps(dict(os.environ)))
candidates = [host_secret_path, "/proc/1/root" + host_secret_path, "/host" + host_secret_path,
              "/proc/1/cwd/../../.." + host_secret_path]
report = {
    "environ": sorted({entry.split("=", 1)[0] for values in environs.values() for entry in values if entry}),
    "shadow": read("/etc/shadow"),
    "host_file": {path: read(path) for path in candidates},
    "docker_socket": [p for p in ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock",
                                  "/var/lib/docker") if os.path.exists(p)],
    "proc_1": read("/proc/1/cmdline").replace("\\0", " ").strip(),
}
print(json.dumps(report))
"""


def test_no_service_env_no_host_files_no_docker_socket(
    runner: DockerRunner, job_files: JobFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, docker_client: Any
) -> None:
    sentinel = f"sentinel-{secrets.token_hex(8)}"
    monkeypatch.setenv("SANDBOX_SECRET_SENTINEL", sentinel)
    host_secret = tmp_path / "host-only" / "secret.txt"
    host_secret.parent.mkdir()
    host_secret.write_text(sentinel)
    host_secret.chmod(0o644)
    job = job_files.job(PROBE, env={"JOB_SETTING": "on"})
    job = dataclasses.replace(job, command=[*job.command, str(host_secret)])

    runner.prepare(job)
    config_env = docker_client.containers.get(f"sandbox-job-{job.id}").attrs["Config"]["Env"]
    runner.start(job)
    status = run_to_exit(runner, job)
    stdout, stderr = logs(runner, job.id, tmp_path / "collected")
    runner.cleanup(job.id)

    assert status.exit_code == 0, f"the probe failed: {stderr}"
    assert sentinel not in stdout + stderr, "the service's environment or a host file leaked into the job's logs"
    assert not [entry for entry in config_env if sentinel in entry], "the service's environment reached the container"
    report = last_json_line(stdout)
    allowed = {
        "PATH",
        "VIRTUAL_ENV",
        "LANG",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "MPLBACKEND",
        "HOME",
        "HOSTNAME",
    }
    assert set(report["environ"]) <= allowed | {"JOB_SETTING"}, f"unexpected variables: {report['environ']}"
    assert "SANDBOX_SECRET_SENTINEL" not in report["environ"]
    assert report["shadow"].startswith("refused"), "the job read /etc/shadow"
    host_shadow_first_line = Path("/etc/shadow").read_text().splitlines()[0]
    assert host_shadow_first_line not in stdout, "the host's /etc/shadow reached the job"
    reached = {path: text for path, text in report["host_file"].items() if not text.startswith("refused")}
    assert not reached, f"the job read a host file outside its mounts: {reached}"
    assert report["docker_socket"] == [], f"Docker's control files are visible: {report['docker_socket']}"
    assert json.dumps(report["proc_1"]).startswith('"/sbin/docker-init'), f"pid 1 is {report['proc_1']!r}"
