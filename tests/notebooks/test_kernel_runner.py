"""A kernel's container is a job's container: the same hardening, limits and mounts, relabelled as a kernel
(so the job reconciliation leaves it alone), with its IPC folder as the only addition (no engine needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runners.base import (
    LABEL_CONTRACT,
    LABEL_INSTANCE,
    LABEL_JOB,
    LABEL_KERNEL,
    LABEL_NOTEBOOK,
    JobDefinition,
    KernelDefinition,
    Resources,
)
from runners.docker import RunnerError, container_options
from runners.kernels import IPC_DIR, kernel_container_name, kernel_options

IMAGE = "sha256:" + "cd" * 32


@pytest.fixture
def kernel(tmp_path: Path) -> KernelDefinition:
    for folder in ("code", "workspace", "ipc", "dp"):
        (tmp_path / folder).mkdir()
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    job = JobDefinition(id="j-1-k1", org="acme", image=IMAGE, command=["python", "-m", "ipykernel_launcher"],
                        code_dir=tmp_path / "code", data_files={"d.parquet": tmp_path / "data.parquet"},
                        resources=Resources(cpus=0.5, memory_mb=512, timeout_s=3600))
    return KernelDefinition(key="k1", notebook="j-1", contract="c-1", job=job, workspace=tmp_path / "workspace",
                            ipc_dir=tmp_path / "ipc")


def test_a_kernel_is_hardened_exactly_as_a_job(kernel: KernelDefinition) -> None:
    options = kernel_options(kernel, instance_id="inst")
    baseline = container_options(kernel.job, instance_id="inst", output_dir=kernel.workspace)
    differs = {key for key in baseline if key not in ("name", "working_dir", "labels", "mounts")
               and options[key] != baseline[key]}
    assert not differs, f"a kernel's container differs from a job's in {sorted(differs)}"
    assert options["network_mode"] == "none" and options["read_only"] and options["cap_drop"] == ["ALL"]
    assert options["name"] == kernel_container_name("k1") and options["working_dir"] == "/output"


def test_a_kernel_is_labelled_as_a_kernel_not_a_job(kernel: KernelDefinition) -> None:
    labels = kernel_options(kernel, instance_id="inst")["labels"]
    assert LABEL_JOB not in labels, "the job reconciliation would take the kernel for a job"
    assert (labels[LABEL_KERNEL], labels[LABEL_NOTEBOOK], labels[LABEL_CONTRACT], labels[LABEL_INSTANCE]) == (
        "k1", "j-1", "c-1", "inst")


def test_the_ipc_folder_is_the_only_mount_added(kernel: KernelDefinition) -> None:
    mounts = kernel_options(kernel, instance_id="inst")["mounts"]
    baseline = container_options(kernel.job, instance_id="inst", output_dir=kernel.workspace)["mounts"]
    added = [m for m in mounts if m not in baseline]
    assert [(m["Target"], m["Source"], m["ReadOnly"]) for m in added] == [(IPC_DIR, str(kernel.ipc_dir), False)]
    assert {m["Target"]: m["Source"] for m in mounts}["/output"] == str(kernel.workspace)


@pytest.mark.parametrize("key", ["", "../x", "a/b", "k 1", "-k"])
def test_a_key_that_could_escape_a_name_is_refused(kernel: KernelDefinition, key: str) -> None:
    with pytest.raises(RunnerError):
        kernel_options(KernelDefinition(key=key, notebook=kernel.notebook, contract=kernel.contract, job=kernel.job,
                                        workspace=kernel.workspace, ipc_dir=kernel.ipc_dir), instance_id="inst")
