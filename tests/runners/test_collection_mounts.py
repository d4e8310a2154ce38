"""A file collection in a job's container: its manifest at /data/<dataset>/manifest.parquet and its folder at
/data/<dataset>/files, both read-only (the folder is the hospital's, read in place), beside a table's file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runner_support import JobFiles, last_json_line, logs, run_to_exit

from runners.docker import DockerRunner, RunnerError, container_options
from sandbox.demo_imaging import write_collection

pytestmark = pytest.mark.docker

PROBE = """
import errno, json, os
import pyarrow.parquet as pq

found = {"files": sorted(os.path.relpath(os.path.join(d, f), "/data/retina/files")
                         for d, _, names in os.walk("/data/retina/files") for f in names),
         "manifest": pq.read_table("/data/retina/manifest.parquet").column("path").to_pylist(),
         "table": os.path.isfile("/data/cohort.csv"), "writes": {}}
for target in ("/data/retina/files/new.dcm", "/data/retina/files/" + found["files"][0], "/data/retina/manifest.parquet",
               "/data/retina/extra.txt"):
    try:
        with open(target, "ab") as handle:
            handle.write(b"x")
        found["writes"][target] = "written"
    except OSError as error:
        found["writes"][target] = errno.errorcode.get(error.errno, str(error.errno))
print(json.dumps(found))
"""


def collection(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "hospital-share"
    paths = write_collection(root, hospital="north", patients=2, images_per_patient=2)
    # Writable by anyone on the host: only the read-only mount may stop the job.
    for folder in {root, *(path.parent for path in paths)}:
        folder.chmod(0o777)
    for path in paths:
        path.chmod(0o666)
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"path": [path.relative_to(root).as_posix() for path in paths]}), manifest)
    manifest.chmod(0o666)
    return root, manifest


def snapshot(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() if path.is_file() else b"/"
            for path in root.rglob("*")}


def test_a_collection_is_mounted_read_only_with_its_manifest(runner: DockerRunner, job_files: JobFiles,
                                                             tmp_path: Path) -> None:
    root, manifest = collection(tmp_path)
    before = snapshot(root)
    job = job_files.job(PROBE)
    job = dataclasses.replace(job, data_files={**job.data_files, "retina/manifest.parquet": manifest},
                              data_folders={"retina/files": root})
    status = run_to_exit(runner, job)
    stdout, stderr = logs(runner, job.id, tmp_path / "collected")
    runner.cleanup(job.id)
    assert status.exit_code == 0, stderr
    found = last_json_line(stdout)
    expected = sorted(path.relative_to(root).as_posix() for path in root.rglob("*.dcm"))
    assert found["files"] == expected and sorted(found["manifest"]) == expected
    assert found["table"], "the job's table went missing beside the collection"
    assert set(found["writes"].values()) == {"EROFS"}, f"a write into /data was not refused: {json.dumps(found)}"
    assert snapshot(root) == before, "the job changed the hospital's folder"


@pytest.mark.parametrize(("files", "folders", "message"), [
    ({"retina/other.parquet": Path("/etc/hostname")}, {}, "data file name"),
    ({}, {"retina": Path("/tmp")}, "data folder name"),
    ({}, {"../etc/files": Path("/tmp")}, "data folder name"),
    ({"retina": Path("/etc/hostname")}, {"retina/files": Path("/tmp")}, "named like a collection"),
])
def test_collection_mounts_are_named_as_documented(job_files: JobFiles, tmp_path: Path, files: dict[str, Path],
                                                    folders: dict[str, Path], message: str) -> None:
    job = dataclasses.replace(job_files.job(command=["true"]), data_files=files, data_folders=folders)
    with pytest.raises(RunnerError, match=message):
        container_options(job, instance_id="test", output_dir=tmp_path)


def test_a_collection_folder_must_be_a_folder(job_files: JobFiles, tmp_path: Path) -> None:
    job = dataclasses.replace(job_files.job(command=["true"]), data_folders={"retina/files": tmp_path / "gone"})
    with pytest.raises(RunnerError, match="cannot be used"):
        container_options(job, instance_id="test", output_dir=tmp_path)
