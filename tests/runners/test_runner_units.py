"""The Docker runner's parts that need no engine: container options, validation, log bounds, file-name rules,
and the output copy run against a hostile tree on the local disk (cgroup reading: test_cgroup_usage.py)."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from runners.base import JobDefinition, Resources
from runners.cgroup_usage import Usage
from runners.docker import (
    CONTAINER_TMP,
    LABEL_TIMEOUT,
    RunnerError,
    _stats_usage,
    _timestamp,
    bounded_log,
    container_options,
    log_file_bytes,
    truncation_marker,
)
from runners.output_copy import MAX_DEPTH, copy_output_tree, name_problem, printable_path

IMAGE = "sha256:" + "ab" * 32


@pytest.fixture
def job(tmp_path: Path) -> JobDefinition:
    (tmp_path / "code").mkdir()
    (tmp_path / "cohort.parquet").write_bytes(b"PAR1")
    return JobDefinition(
        id="job-1",
        org="acme",
        image=IMAGE,
        command=["python3", "main.py"],
        code_dir=tmp_path / "code",
        data_files={"cohort.parquet": tmp_path / "cohort.parquet"},
        resources=Resources(memory_mb=256, output_mb=20, tmp_mb=16, log_bytes=10_000, timeout_s=42),
        env={"SEED": "7"},
    )


def options_for(job: JobDefinition, tmp_path: Path) -> dict[str, Any]:
    return container_options(job, instance_id="inst", output_dir=tmp_path)


# --- container options ---


def test_environment_is_the_jobs_plus_home_and_never_the_services(
    job: JobDefinition, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOX_SECRET_SENTINEL", "do-not-leak")
    environment = options_for(job, tmp_path)["environment"]
    assert environment == {"SEED": "7", "HOME": CONTAINER_TMP}, f"the container would get {environment}"


def test_job_cannot_move_home_off_the_tmpfs(job: JobDefinition, tmp_path: Path) -> None:
    job = dataclasses.replace(job, env={"HOME": "/output"})
    assert options_for(job, tmp_path)["environment"]["HOME"] == "/tmp"


def test_gpus_are_requested_only_when_the_job_asks(job: JobDefinition, tmp_path: Path) -> None:
    assert "device_requests" not in options_for(job, tmp_path), "a CPU job would get GPU devices"
    gpu_job = dataclasses.replace(job, resources=dataclasses.replace(job.resources, gpus=2))
    (request,) = options_for(gpu_job, tmp_path)["device_requests"]
    assert request["Count"] == 2 and request["Capabilities"] == [["gpu"]]


def test_limits_follow_the_resources(job: JobDefinition, tmp_path: Path) -> None:
    options = options_for(job, tmp_path)
    assert options["mem_limit"] == options["memswap_limit"] == "256m"
    fsize = next(limit for limit in options["ulimits"] if limit["Name"] == "fsize")
    assert fsize["Soft"] == fsize["Hard"] == 20 * 1024 * 1024, "a single file could outgrow the output quota"
    assert options["labels"][LABEL_TIMEOUT] == "42"
    assert "size=16m" in options["tmpfs"]["/tmp"]
    assert options["log_config"]["Config"]["max-size"] == str(log_file_bytes(10_000))
    assert not any("seccomp" in option for option in options["security_opt"]), "seccomp profile replaced"


def test_mount_sources_are_real_paths(job: JobDefinition, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "code")
    options = options_for(dataclasses.replace(job, code_dir=tmp_path / "link"), tmp_path)
    code = next(mount for mount in options["mounts"] if mount["Target"] == "/code")
    assert code["Source"] == str(tmp_path / "code") and code["ReadOnly"] is True


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"id": "../escape"}, "job id", id="job id with a path"),
        pytest.param({"id": "a/b"}, "job id", id="job id with a slash"),
        pytest.param({"id": ""}, "job id", id="empty job id"),
        pytest.param({"id": ".hidden"}, "job id", id="job id starting with a dot"),
        pytest.param({"id": "x" * 101}, "job id", id="overlong job id"),
        pytest.param({"id": "job-1\n"}, "job id", id="job id with a trailing newline"),
        pytest.param({"image": IMAGE + "\n"}, "local image id", id="image id with a trailing newline"),
        pytest.param({"data_files": {"cohort.csv\n": Path("/etc/passwd")}}, "data file name", id="data name newline"),
        pytest.param({"env": {"A\n": "x"}}, "environment variable", id="env name with a trailing newline"),
        pytest.param({"image": "python:3.11"}, "local image id", id="mutable tag"),
        pytest.param({"command": []}, "command is empty", id="empty command"),
        pytest.param({"data_files": {"../etc/passwd": Path("/etc/passwd")}}, "data file name", id="data name path"),
        pytest.param({"data_files": {"a/b": Path("/etc/passwd")}}, "data file name", id="data name slash"),
        pytest.param({"env": {"LD PRELOAD": "x"}}, "environment variable", id="env name with a space"),
        pytest.param({"env": {"A=B": "x"}}, "environment variable", id="env name with equals"),
        pytest.param({"env": {"A": "x\0y"}}, "environment variable", id="env value with NUL"),
        pytest.param({"resources": Resources(memory_mb=0)}, "memory_mb", id="no memory"),
        pytest.param({"resources": Resources(pids=0)}, "pids", id="no pids"),
        pytest.param({"resources": Resources(gpus=-1)}, "gpus", id="negative gpus"),
        pytest.param({"resources": Resources(output_mb=0)}, "output_mb", id="no output quota"),
    ],
)
def test_unsafe_job_definitions_are_refused(
    job: JobDefinition, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(RunnerError, match=message):
        options_for(dataclasses.replace(job, **change), tmp_path)


@pytest.mark.parametrize("what", ["code folder is a file", "data file is a folder", "data file missing", "socket"])
def test_host_paths_must_exist_with_the_right_kind(job: JobDefinition, tmp_path: Path, what: str) -> None:
    # Docker would otherwise create a missing bind source as an empty root-owned folder on the host.
    if what == "code folder is a file":
        job = dataclasses.replace(job, code_dir=tmp_path / "cohort.parquet")
    elif what == "data file is a folder":
        job = dataclasses.replace(job, data_files={"cohort.parquet": tmp_path / "code"})
    elif what == "data file missing":
        job = dataclasses.replace(job, data_files={"cohort.parquet": tmp_path / "gone.parquet"})
    else:
        job = dataclasses.replace(job, dp_socket=tmp_path / "cohort.parquet")
    with pytest.raises(RunnerError, match=r"is not a|cannot be used"):
        options_for(job, tmp_path)


def test_dp_socket_folder_is_bound_at_its_documented_path(job: JobDefinition, tmp_path: Path) -> None:
    (tmp_path / "dp").mkdir()
    path = tmp_path / "dp" / "dp.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        mounts = options_for(dataclasses.replace(job, dp_socket=path), tmp_path)["mounts"]
    (bound,) = [mount for mount in mounts if mount["Target"] == "/run/sandbox"]
    assert bound["Source"] == str(path.parent) and bound["ReadOnly"]


def test_dp_socket_folder_must_hold_nothing_else(job: JobDefinition, tmp_path: Path) -> None:
    (tmp_path / "dp").mkdir()
    (tmp_path / "dp" / "secret.txt").write_text("host file")
    path = tmp_path / "dp" / "dp.sock"
    with socket.socket(socket.AF_UNIX) as server, pytest.raises(RunnerError, match="only entry"):
        server.bind(str(path))
        options_for(dataclasses.replace(job, dp_socket=path), tmp_path)


# --- logs, names, timestamps ---


def test_bounded_log_keeps_the_head_and_marks_the_cut() -> None:
    assert bounded_log(b"short", 10) == b"short"
    assert bounded_log(b"0123456789", 10) == b"0123456789"
    assert bounded_log(b"0123456789abc", 10) == b"0123456789" + truncation_marker(10)


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("evil\nname.txt", "evil\\nname.txt"),
        ("report\u202etxt.exe", "report\\u202etxt.exe"),
        ("zero\u200bwidth", "zero\\u200bwidth"),
        (os.fsdecode(b"\xff\xfe.bin"), "\\xff\\xfe.bin"),
        ("tab\there", "tab\\there"),
        ("bell\x07", "bell\\x07"),
    ],
)
def test_misleading_file_names_are_refused_and_shown_escaped(name: str, shown: str) -> None:
    assert name_problem(name) is not None, f"{shown} would be collected"
    assert printable_path(("folder", name)) == f"folder/{shown}"


@pytest.mark.parametrize("name", ["results.csv", "name with spaces.txt", "résumé-ünïcode.md", "...", "-rf", "a\\b"])
def test_ordinary_file_names_pass(name: str) -> None:
    assert name_problem(name) is None


def test_docker_timestamps() -> None:
    assert _timestamp("0001-01-01T00:00:00Z") is None
    assert _timestamp(None) is None
    assert _timestamp("2024-05-01T12:00:00.123456789Z") == pytest.approx(1714564800.123456789)
    assert _timestamp("2024-05-01T14:00:00+02:00") == 1714564800.0
    with pytest.raises(RunnerError, match="timestamp"):
        _timestamp("yesterday")


# --- the output copy, on a hostile tree built here ---


def hostile_tree(root: Path, outside: Path) -> None:
    (root / "nested" / "dir").mkdir(parents=True)
    (root / "nested" / "dir" / "deep.txt").write_text("deep")
    (root / "name with spaces.txt").write_text("spaces")
    os.link(root / "nested" / "dir" / "deep.txt", root / "hardlink.txt")
    (root / "to-outside").symlink_to(outside)
    (root / "to-outside-dir").symlink_to(outside.parent, target_is_directory=True)
    (root / "relative-escape").symlink_to("../../../../../../etc/passwd")
    (root / "nested" / "link-in-subfolder").symlink_to("/etc/shadow")
    os.mkfifo(root / "pipe")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(root / "sock"))
    (root / "evil\nname.txt").write_text("newline")
    (root / os.fsdecode(b"\xff.bin")).write_text("not utf-8")


def test_copy_takes_regular_files_only_and_follows_no_link(tmp_path: Path) -> None:
    source, destination = tmp_path / "output", tmp_path / "collected" / "files"
    source.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("host secret")
    hostile_tree(source, outside)

    files, refused = copy_output_tree(source, destination, max_total_bytes=10_000)

    assert sorted(f.path for f in files) == ["hardlink.txt", "name with spaces.txt", "nested/dir/deep.txt"]
    assert refused == {
        "to-outside": "symbolic link (never followed)",
        "to-outside-dir": "symbolic link (never followed)",
        "relative-escape": "symbolic link (never followed)",
        "nested/link-in-subfolder": "symbolic link (never followed)",
        "pipe": "named pipe (fifo)",
        "sock": "socket",
        "evil\\nname.txt": "file name has control or invisible characters",
        "\\xff.bin": "file name is not valid UTF-8",
    }
    copied = sorted(p.relative_to(destination).as_posix() for p in destination.rglob("*") if not p.is_dir())
    assert copied == ["hardlink.txt", "name with spaces.txt", "nested/dir/deep.txt"], f"unexpected copies: {copied}"
    assert all(not p.is_symlink() for p in destination.rglob("*")), "a symlink was copied into the collection"
    assert all("host secret" not in p.read_text() for p in destination.rglob("*") if p.is_file())


def test_sparse_files_cannot_copy_more_than_the_quota(tmp_path: Path) -> None:
    # Sparse files cost the job no blocks, so the quota alone would let it multiply the host disk use.
    source, destination = tmp_path / "output", tmp_path / "files"
    source.mkdir()
    for name in ("a.bin", "b.bin", "c.bin"):
        with (source / name).open("wb") as handle:
            handle.truncate(4000)
    files, refused = copy_output_tree(source, destination, max_total_bytes=10_000)
    assert [f.path for f in files] == ["a.bin", "b.bin"]
    assert refused == {"c.bin": "larger than what is left of the output quota"}
    assert sum(p.stat().st_size for p in destination.iterdir()) == 8000


def test_folders_nested_too_deep_are_refused(tmp_path: Path) -> None:
    source = tmp_path / "output"
    deepest = source.joinpath(*["d"] * (MAX_DEPTH + 3))
    deepest.mkdir(parents=True)
    (deepest / "bottom.txt").write_text("x")
    (source / "d" / "top.txt").write_text("y")
    files, refused = copy_output_tree(source, tmp_path / "files", max_total_bytes=10_000)
    assert [f.path for f in files] == ["d/top.txt"]
    assert refused == {"/".join(["d"] * (MAX_DEPTH + 1)): f"folders nested deeper than {MAX_DEPTH} levels"}


def test_copy_again_replaces_the_previous_collection(tmp_path: Path) -> None:
    source, destination = tmp_path / "output", tmp_path / "files"
    source.mkdir()
    (source / "result.csv").write_text("a,b\n")
    first = copy_output_tree(source, destination, max_total_bytes=10_000)
    (destination / "stale.txt").write_text("left from before")
    second = copy_output_tree(source, destination, max_total_bytes=10_000)
    assert first == second
    assert sorted(p.name for p in destination.iterdir()) == ["result.csv"]


def test_destination_planted_as_a_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    source, elsewhere = tmp_path / "output", tmp_path / "elsewhere"
    source.mkdir()
    elsewhere.mkdir()
    (source / "result.csv").write_text("a,b\n")
    (tmp_path / "files").symlink_to(elsewhere)
    copy_output_tree(source, tmp_path / "files", max_total_bytes=10_000)
    assert list(elsewhere.iterdir()) == [], "the copy followed a symlink planted at the destination"
    assert (tmp_path / "files" / "result.csv").read_text() == "a,b\n"


class _FakeContainer:
    def __init__(self, stats: Any) -> None:
        self._stats = stats

    def stats(self, **options: Any) -> Any:
        assert options == {"stream": False, "one_shot": True}, "the fallback would wait for a second sample"
        if isinstance(self._stats, Exception):
            raise self._stats
        return self._stats


@pytest.mark.parametrize(
    ("stats", "expected"),
    [
        pytest.param(
            {"cpu_stats": {"cpu_usage": {"total_usage": 1_500_000_000}}, "memory_stats": {"max_usage": 7, "usage": 3}},
            Usage(cpu_seconds=1.5, peak_memory_bytes=7),
            id="cgroup v1 engine",
        ),
        pytest.param(
            {"cpu_stats": {"cpu_usage": {"total_usage": 1_500_000_000}}, "memory_stats": {"usage": 3}},
            Usage(cpu_seconds=1.5, peak_memory_bytes=3),
            id="cgroup v2 engine (no max_usage)",
        ),
        pytest.param({"cpu_stats": {}, "memory_stats": {}}, None, id="exited container"),
        pytest.param(OSError("engine gone"), None, id="engine unreachable"),
    ],
)
def test_stats_endpoint_fallback(stats: Any, expected: Usage | None) -> None:
    assert _stats_usage(_FakeContainer(stats)) == expected


def test_collected_files_are_reported_under_the_destination_as_named(tmp_path: Path) -> None:
    # The worker stores `stored_at` relative to its artifacts folder, which may be reached through a symlink.
    source, real = tmp_path / "output", tmp_path / "real-artifacts"
    source.mkdir()
    real.mkdir()
    (source / "result.csv").write_text("a,b\n")
    (tmp_path / "artifacts").symlink_to(real)
    files, _ = copy_output_tree(source, tmp_path / "artifacts" / "job" / "files", max_total_bytes=10_000)
    assert files[0].stored_at.relative_to(tmp_path / "artifacts") == Path("job/files/result.csv")
    assert (real / "job" / "files" / "result.csv").read_text() == "a,b\n"
