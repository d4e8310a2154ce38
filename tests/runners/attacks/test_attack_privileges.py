"""Attack: become root or more than the sandbox user: setuid binaries, capabilities, new namespaces, mounts."""

from __future__ import annotations

from pathlib import Path

import pytest
from runner_support import JobFiles, last_json_line, logs, run_to_exit

from runners.docker import DockerRunner

pytestmark = pytest.mark.docker

PROBE = """
import ctypes, json, os, subprocess
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
libc = ctypes.CDLL(None, use_errno=True)

def syscall_result(result):
    return "allowed" if result == 0 else f"refused: {os.strerror(ctypes.get_errno())}"

CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
report = {
    "id_u": subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip(),
    "id_g": subprocess.run(["id", "-g"], capture_output=True, text=True).stdout.strip(),
    "status": {key: status[key].strip() for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                                                     "NoNewPrivs", "Seccomp")},
    # setuid root binary: with no-new-privileges it runs as the caller and cannot switch user.
    "su": subprocess.run(["su", "-c", "id -u", "root"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         timeout=10).stdout.strip(),
    "unshare_user": syscall_result(libc.unshare(CLONE_NEWUSER)),
    "unshare_mount": syscall_result(libc.unshare(CLONE_NEWNS)),
    "mount_tmpfs": syscall_result(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)),
    "setuid_0": syscall_result(libc.setuid(0)),
    "chroot": syscall_result(libc.chroot(b"/tmp")),
}
print(json.dumps(report))
"""


def test_runs_unprivileged_with_no_way_up(runner: DockerRunner, job_files: JobFiles, tmp_path: Path) -> None:
    job = job_files.job(PROBE)
    status = run_to_exit(runner, job)
    stdout, stderr = logs(runner, job.id, tmp_path / "collected")
    runner.cleanup(job.id)

    assert status.exit_code == 0, f"the probe failed: {stderr}"
    report = last_json_line(stdout)
    assert (report["id_u"], report["id_g"]) == ("10001", "10001"), f"the job runs as {report['id_u']}"
    zero = "0000000000000000"
    capabilities = {key: value for key, value in report["status"].items() if key.startswith("Cap") and value != zero}
    assert not capabilities, f"the job holds capabilities: {capabilities}"
    assert report["status"]["NoNewPrivs"] == "1", "no-new-privileges is off: setuid binaries would work"
    assert report["status"]["Seccomp"] == "2", "no seccomp filter"
    assert report["su"] != "0", "su gave the job root"
    allowed = {key: value for key, value in report.items() if value == "allowed"}
    assert not allowed, f"privileged system calls succeeded: {allowed}"
