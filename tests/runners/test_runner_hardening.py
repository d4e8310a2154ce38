"""Each hardening option, read back from the container the engine actually created.

One check per option, so dropping any single option from `container_options` fails a test by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from runner_support import SMALL, JobFiles, assert_nothing_left

from runners.base import LABEL_INSTANCE, LABEL_JOB, LABEL_MANAGED, LABEL_ORG, Resources
from runners.docker import LABEL_LOG_BYTES, LABEL_TIMEOUT, LOG_FILES, DockerRunner, RunnerError, log_file_bytes

pytestmark = pytest.mark.docker

RESOURCES = Resources(cpus=0.5, memory_mb=96, timeout_s=17, pids=77, output_mb=10, tmp_mb=33, log_bytes=12_345)
MIB = 1024 * 1024


class Prepared:
    """A prepared (never started) job container and what it was made from."""

    def __init__(self, attrs: dict[str, Any], files: JobFiles, job_id: str, instance_id: str, state_dir: Path) -> None:
        self.attrs = attrs
        self.host = attrs["HostConfig"]
        self.config = attrs["Config"]
        self.files = files
        self.job_id = job_id
        self.instance_id = instance_id
        self.state_dir = state_dir

    def mount(self, target: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = [mount for mount in self.attrs["Mounts"] if mount["Destination"] == target]
        assert len(found) == 1, f"{len(found)} mounts at {target}"
        return found[0]


@pytest.fixture(scope="module")
def prepared(docker_client: Any, analysis_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prepared]:
    root = tmp_path_factory.mktemp("hardening")
    files = JobFiles(root=root, image_id=analysis_image)
    files.code_dir.mkdir()
    (root / "cohort.parquet").write_bytes(b"PAR1")
    files.data_files["cohort.parquet"] = root / "cohort.parquet"
    (root / "dp").mkdir()
    dp_socket = root / "dp" / "dp.sock"
    instance_id = f"test-{uuid.uuid4().hex[:10]}"
    state_dir = root / "state"
    runner = DockerRunner(state_dir=state_dir, instance_id=instance_id, client=docker_client)
    job = files.job(command=["true"], resources=RESOURCES, env={"JOB_SETTING": "on"}, dp_socket=dp_socket)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(dp_socket))
        try:
            runner.prepare(job)
            attrs = docker_client.containers.get(f"sandbox-job-{job.id}").attrs
            yield Prepared(attrs, files, job.id, instance_id, state_dir)
        finally:
            # Also when prepare() failed half-way: nothing of the module may outlive it.
            with contextlib.suppress(RunnerError):
                runner.cleanup(job.id)
            assert_nothing_left(docker_client, instance_id, state_dir)


def check_network_none(c: Prepared) -> None:
    assert c.host["NetworkMode"] == "none", f"the job would have network {c.host['NetworkMode']!r}"


def check_read_only_root(c: Prepared) -> None:
    assert c.host["ReadonlyRootfs"] is True, "the image's root file system would be writable"


def check_all_capabilities_dropped(c: Prepared) -> None:
    assert c.host["CapDrop"] == ["ALL"], f"capabilities kept: dropped only {c.host['CapDrop']}"
    assert not c.host["CapAdd"], f"capabilities added back: {c.host['CapAdd']}"


def check_no_new_privileges(c: Prepared) -> None:
    assert "no-new-privileges" in (c.host["SecurityOpt"] or []), "setuid binaries could raise privileges"


def check_default_seccomp(c: Prepared) -> None:
    options = c.host["SecurityOpt"] or []
    assert not [o for o in options if o.startswith(("seccomp", "apparmor=unconfined", "label=disable"))], options


def check_not_privileged_and_no_devices(c: Prepared) -> None:
    assert c.host["Privileged"] is False, "the container is privileged"
    assert not c.host["Devices"], f"host devices passed in: {c.host['Devices']}"
    assert not c.host["DeviceRequests"], "GPUs requested for a job that asked for none"


def check_host_namespaces_not_shared(c: Prepared) -> None:
    assert c.host["PidMode"] in ("", "private"), f"pid namespace {c.host['PidMode']!r}"
    assert c.host["IpcMode"] in ("private", "none"), f"ipc namespace {c.host['IpcMode']!r}"
    assert c.host["UTSMode"] in ("", "private"), f"uts namespace {c.host['UTSMode']!r}"
    assert c.host["UsernsMode"] in ("",), f"user namespace {c.host['UsernsMode']!r}"
    assert c.host["CgroupnsMode"] == "private", f"cgroup namespace {c.host['CgroupnsMode']!r}"


def check_init(c: Prepared) -> None:
    assert c.host["Init"] is True, "no init: zombies and orphans would pile up, signals not forwarded"


def check_pids_limit(c: Prepared) -> None:
    assert c.host["PidsLimit"] == RESOURCES.pids, f"pids limit {c.host['PidsLimit']}: a fork bomb is unbounded"


def check_memory_without_swap(c: Prepared) -> None:
    assert c.host["Memory"] == RESOURCES.memory_mb * MIB, f"memory limit {c.host['Memory']}"
    assert c.host["MemorySwap"] == c.host["Memory"], "swap allowed: a memory bomb would thrash the host disk"


def check_cpu_limit(c: Prepared) -> None:
    assert c.host["NanoCpus"] == int(RESOURCES.cpus * 1e9), f"cpu limit {c.host['NanoCpus']}"


def check_ulimits(c: Prepared) -> None:
    limits = {u["Name"]: (u["Soft"], u["Hard"]) for u in c.host["Ulimits"] or []}
    assert limits.get("nofile") == (1024, 1024), f"open files: {limits.get('nofile')}"
    quota = RESOURCES.output_mb * MIB
    assert limits.get("fsize") == (quota, quota), f"max file size {limits.get('fsize')}: sparse/huge files unbounded"
    assert limits.get("core") == (0, 0), "core dumps would copy the job's memory (data rows) out of the sandbox"


def check_tmpfs(c: Prepared) -> None:
    options = set((c.host["Tmpfs"] or {}).get("/tmp", "").split(","))
    expected = {"rw", "noexec", "nosuid", "nodev", f"size={RESOURCES.tmp_mb}m", "mode=1777"}
    assert expected <= options, f"/tmp options {sorted(options)} lack {sorted(expected - options)}"


def check_code_and_data_read_only(c: Prepared) -> None:
    for target in ("/code", "/data/cohort.parquet", "/run/sandbox"):
        mount = c.mount(target)
        assert mount["Type"] == "bind" and mount["RW"] is False, f"{target} is writable: {mount}"


def check_output_is_the_quota_mount(c: Prepared) -> None:
    mount = c.mount("/output")
    assert mount["RW"] is True
    assert mount["Source"] == str((c.state_dir / c.job_id / "output").resolve()), f"/output is {mount['Source']}"


def check_no_other_mounts(c: Prepared) -> None:
    targets = sorted(mount["Destination"] for mount in c.attrs["Mounts"])
    assert targets == ["/code", "/data/cohort.parquet", "/output", "/run/sandbox"], targets
    sources = [mount["Source"] for mount in c.attrs["Mounts"]] + list(c.host["Binds"] or [])
    assert not [s for s in sources if "docker.sock" in s], "the Docker socket is mounted: full host takeover"
    assert not c.host["VolumesFrom"], "volumes from another container"


def check_bounded_logs(c: Prepared) -> None:
    log = c.host["LogConfig"]
    assert log["Type"] == "json-file", f"log driver {log['Type']}"
    assert log["Config"].get("max-size") == str(log_file_bytes(RESOURCES.log_bytes)), "log files grow unbounded"
    assert log["Config"].get("max-file") == str(LOG_FILES), "log files rotate unbounded"


def check_user(c: Prepared) -> None:
    assert c.config["User"] == "10001:10001", f"runs as {c.config['User']!r}"


def check_environment(c: Prepared) -> None:
    added = {entry for entry in c.config["Env"] if entry.split("=", 1)[0] in ("JOB_SETTING", "HOME")}
    assert added == {"JOB_SETTING=on", "HOME=/tmp"}, added
    image_env = {"PATH", "VIRTUAL_ENV", "LANG", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "MPLBACKEND"}
    names = {entry.split("=", 1)[0] for entry in c.config["Env"]}
    assert names <= image_env | {"JOB_SETTING", "HOME"}, f"unexpected variables: {names - image_env}"


def check_labels(c: Prepared) -> None:
    labels = c.config["Labels"]
    assert labels[LABEL_MANAGED] == "1" and labels[LABEL_JOB] == c.job_id and labels[LABEL_ORG] == "acme"
    assert labels[LABEL_INSTANCE] == c.instance_id
    assert labels[LABEL_TIMEOUT] == str(RESOURCES.timeout_s) and labels[LABEL_LOG_BYTES] == str(RESOURCES.log_bytes)


def check_never_removed_or_restarted_by_docker(c: Prepared) -> None:
    assert c.host["AutoRemove"] is False, "auto-remove would lose the exit code and logs before collect()"
    assert c.host["RestartPolicy"]["Name"] in ("", "no"), "a killed job would be restarted"


def check_oom_score(c: Prepared) -> None:
    assert c.host["OomScoreAdj"] > 0, "under host memory pressure the service would die before the job"


def check_name_and_workdir(c: Prepared) -> None:
    assert c.attrs["Name"] == f"/sandbox-job-{c.job_id}"
    assert c.config["WorkingDir"] == "/code"
    assert c.config["Cmd"] == ["true"]


CHECKS: dict[str, Callable[[Prepared], None]] = {
    name.removeprefix("check_"): check for name, check in dict(globals()).items() if name.startswith("check_")
}


@pytest.mark.parametrize("check", CHECKS.values(), ids=CHECKS.keys())
def test_container_has(prepared: Prepared, check: Callable[[Prepared], None]) -> None:
    check(prepared)


def test_gpu_request_reaches_the_engine(runner: DockerRunner, job_files: JobFiles, docker_client: Any) -> None:
    # Only created, never started: this engine has no GPU driver; the scheduler decides who gets GPUs.
    job = job_files.job(command=["true"], resources=dataclasses.replace(SMALL, gpus=2))
    runner.prepare(job)
    requests = docker_client.containers.get(f"sandbox-job-{job.id}").attrs["HostConfig"]["DeviceRequests"]
    runner.cleanup(job.id)
    assert [(r["Count"], r["Capabilities"]) for r in requests] == [(2, [["gpu"]])], requests
