"""Attack: write where nothing may be written (the image, the data, the code), or run a dropped binary."""

from __future__ import annotations

from pathlib import Path

import pytest
from runner_support import JobFiles, last_json_line, logs, run_to_exit

from runners.docker import DockerRunner

pytestmark = pytest.mark.docker

PROBE = """
import json, os, shutil, subprocess

def attempt(action):
    try:
        action()
        return "ok"
    except OSError as error:
        return os.strerror(error.errno) if error.errno else str(error)

def write(path):
    with open(path, "w") as handle:
        handle.write("planted")

report = {"write": {}, "exec": {}}
for folder in ("/", "/data", "/code", "/usr", "/etc", "/usr/lib", "/opt/venv/lib", "/var", "/run", "/run/sandbox"):
    report["write"][folder] = attempt(lambda: write(os.path.join(folder, "planted.txt")))
report["write"]["/data/cohort.csv (append)"] = attempt(lambda: open("/data/cohort.csv", "a").write("9999,1,x"))
report["write"]["/code (replace the script)"] = attempt(lambda: write(__file__))
report["write"]["/etc/passwd"] = attempt(lambda: open("/etc/passwd", "a").write("evil::0:0::/:/bin/sh"))
report["write"]["/tmp"] = attempt(lambda: write("/tmp/scratch.txt"))
report["write"]["/output"] = attempt(lambda: write("/output/result.txt"))
for folder in ("/tmp", "/output", "/dev/shm"):
    def run_copy(folder=folder):
        target = os.path.join(folder, "dropped-true")
        shutil.copy("/usr/bin/true", target)
        os.chmod(target, 0o755)
        subprocess.run([target], check=True)
    report["exec"][folder] = attempt(run_copy)
print(json.dumps(report))
"""

READ_ONLY = "Read-only file system"
NOT_PERMITTED = "Permission denied"


def test_image_data_and_code_are_read_only_and_scratch_is_noexec(
    runner: DockerRunner, job_files: JobFiles, tmp_path: Path
) -> None:
    data = job_files.data_files["cohort.csv"]
    job = job_files.job(PROBE)
    script = job_files.code_dir / f"{job.id}.py"
    # World-writable on the host, so only the read-only mounts can be what stops the job.
    for path, mode in ((data, 0o666), (script, 0o666), (job_files.code_dir, 0o777)):
        path.chmod(mode)
    data_before, script_before = data.read_bytes(), script.read_bytes()

    status = run_to_exit(runner, job)
    stdout, stderr = logs(runner, job.id, tmp_path / "collected")
    runner.cleanup(job.id)

    assert status.exit_code == 0, f"the probe failed: {stderr}"
    report = last_json_line(stdout)
    # EROFS, not EACCES: the mount refuses, whatever the file permissions say. /etc/passwd is root's
    # 0644 file, so permissions answer first there; the folders above show the root is read-only anyway.
    expected_read_only = {k: v for k, v in report["write"].items() if k not in ("/tmp", "/output", "/etc/passwd")}
    wrong = {folder: result for folder, result in expected_read_only.items() if result != READ_ONLY}
    assert not wrong, f"writable (or not refused as read-only): {wrong}"
    assert report["write"]["/tmp"] == "ok", "the tmpfs scratch space is not writable"
    assert report["write"]["/output"] == "ok", "/output is not writable"
    executed = {folder: result for folder, result in report["exec"].items() if result != NOT_PERMITTED}
    assert not executed, f"a binary dropped by the job could run from: {executed}"
    assert report["write"]["/etc/passwd"] in (READ_ONLY, NOT_PERMITTED), "the job could edit /etc/passwd"
    assert data.read_bytes() == data_before, "the job changed the dataset on the host"
    assert script.read_bytes() == script_before, "the job rewrote its code on the host"
