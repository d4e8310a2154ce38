"""Attack: smuggle host files out through /output: symlinks, fifos, sockets, hardlinks, odd names, sparse files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from runner_support import SMALL, JobFiles, run_to_exit

from runners.docker import DockerRunner

pytestmark = pytest.mark.docker

PLANT = """
import os, socket
os.chdir("/output")
os.makedirs("nested/deeper", exist_ok=True)
open("nested/deeper/result.csv", "w").write("mean_age,67.5\\n")
open("name with spaces.txt", "w").write("fine\\n")
os.link("nested/deeper/result.csv", "hardlink.csv")
os.symlink("/etc/passwd", "passwd-link")
os.symlink("/data/cohort.csv", "data-link")
os.symlink("/", "root-link")
os.symlink("../../../../../../../etc/shadow", "relative-escape")
os.symlink("/data", "nested/data-dir-link")
os.mkfifo("fifo")
socket.socket(socket.AF_UNIX).bind("socket")
open("evil\\nname.txt", "w").write("x")
open("report\\u202etxt.exe", "w").write("x")
open(b"\\xff\\xfe.bin", "w").write("x")
for name in ("sparse-a.bin", "sparse-b.bin"):
    with open(name, "wb") as handle:
        handle.truncate(6 * 1024 * 1024)
# Reading through the links works inside (the data is the job's to read), which is the point of refusing them.
print(open("/data/cohort.csv").read().splitlines()[1])
"""


def test_collect_copies_regular_files_and_refuses_everything_else(
    runner: DockerRunner, job_files: JobFiles, tmp_path: Path
) -> None:
    job = job_files.job(PLANT, resources=dataclasses.replace(SMALL, output_mb=10))
    status = run_to_exit(runner, job)
    destination = tmp_path / "collected"
    collected = runner.collect(job.id, destination)
    again = runner.collect(job.id, destination)
    runner.cleanup(job.id)

    assert status.exit_code == 0, collected.stderr.stored_at.read_text()
    by_path = {file.path: file for file in collected.files}
    assert sorted(by_path) == ["hardlink.csv", "name with spaces.txt", "nested/deeper/result.csv", "sparse-a.bin"]
    assert by_path["nested/deeper/result.csv"].stored_at.read_text() == "mean_age,67.5\n"
    assert by_path["hardlink.csv"].sha256 == by_path["nested/deeper/result.csv"].sha256
    assert collected.refused == {
        "passwd-link": "symbolic link (never followed)",
        "data-link": "symbolic link (never followed)",
        "root-link": "symbolic link (never followed)",
        "relative-escape": "symbolic link (never followed)",
        "nested/data-dir-link": "symbolic link (never followed)",
        "fifo": "named pipe (fifo)",
        "socket": "socket",
        "evil\\nname.txt": "file name has control or invisible characters",
        "report\\u202etxt.exe": "file name has control or invisible characters",
        "\\xff\\xfe.bin": "file name is not valid UTF-8",
        # Two 6 MiB sparse files cost the job no blocks, but would cost the host 12 MiB past a 10 MiB quota.
        "sparse-b.bin": "larger than what is left of the output quota",
    }
    everything = [path for path in destination.rglob("*")]
    assert not [path for path in everything if path.is_symlink()], "a symlink was copied"
    outside = [path for path in everything if not path.resolve().is_relative_to(destination.resolve())]
    assert not outside, f"written outside the collection folder: {outside}"
    host_passwd = Path("/etc/passwd").read_text()
    data = job_files.data_files["cohort.csv"].read_text()
    for path in (p for p in everything if p.is_file() and p.parent.name != "logs"):
        content = path.read_text(errors="replace")
        assert host_passwd not in content and data not in content, f"{path} carries a host or data file"
    assert collected == again, "a second collect() gave another answer"
