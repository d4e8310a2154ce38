#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU, Docker and the NVIDIA Container Toolkit (issue 13). Run as root
# from the repository (the runner loop-mounts each job's /output):
#
#     bench/gpu_check.sh                      # PYTHON=.venv/bin/python by default
#
# 1. runners.gpus.detect_gpus reports the GPUs `nvidia-smi -L` lists on the host;
# 2. a GPU job's container, created and started by the real DockerRunner with its device request (hardened as
#    every job: read-only root, no capabilities, user 10001, no network), sees the one GPU it was given
#    (`nvidia-smi -L` inside);
# 3. a second GPU job is refused while a one-GPU machine's GPU is held;
# 4. a CPU job in an image that sets NVIDIA_VISIBLE_DEVICES=all sees no GPU device.
# Needs no network: the probe image is made here from the host's own `ls` and the C libraries it and nvidia-smi
# load; the NVIDIA hook mounts nvidia-smi and the driver into the container at start, as for any job.
# Prints OK and exits 0 when every check holds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
IMAGE=sandbox-gpu-probe:latest

fail() { echo "FAIL: $*" >&2; exit 1; }
command -v nvidia-smi >/dev/null || fail "no nvidia-smi on this machine"
command -v docker >/dev/null || fail "no docker CLI on this machine"
[ "$(id -u)" = 0 ] || fail "run as root: the runner loop-mounts each job's /output"
nvidia-smi -L || fail "nvidia-smi -L failed: no driver or no GPU"
docker info --format '{{json .Runtimes}}'

work=$(mktemp -d)
trap 'rm -rf "$work"; docker image rm -f "$IMAGE" >/dev/null 2>&1 || true' EXIT
rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,usr/bin,etc,tmp,dev,proc,sys}
cp -L "$(command -v ls)" "$rootfs/bin/ls"
for binary in "$(command -v ls)" "$(command -v nvidia-smi)"; do
    # The C libraries only: the driver's own libraries must come from the hook, or the check proves nothing.
    for library in $(ldd "$binary" | grep -o '/[^ )]*' | grep -v nvidia); do
        mkdir -p "$rootfs$(dirname "$library")"
        cp -L "$library" "$rootfs$library"
    done
done
tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV NVIDIA_VISIBLE_DEVICES=all' - "$IMAGE" >/dev/null

PYTHONPATH=. "$PYTHON" - "$IMAGE" "$work" <<'PY'
import re
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import docker

from runners.base import JobDefinition, Resources, RunState
from runners.docker import DockerRunner
from runners.errors import RunnerError
from runners.gpus import detect_gpus

image_name, work = sys.argv[1], Path(sys.argv[2])
client = docker.from_env()
host = re.findall(r"UUID: (GPU-[0-9a-fA-F-]+)", subprocess.run(["nvidia-smi", "-L"], capture_output=True,
                                                                 text=True, check=True).stdout)
found = detect_gpus(client)
print("detected:", found)
assert found.gpus, f"detection found no GPU: {found.problem}"
assert [gpu.uuid for gpu in found.gpus] == host, f"detection {found.gpus} differs from nvidia-smi {host}"

runner = DockerRunner(state_dir=work / "runner", instance_id=f"gpu-check-{uuid.uuid4().hex[:8]}", client=client)
assert runner.use_host_gpus().gpus == found.gpus
(work / "code").mkdir()
base = JobDefinition(id="", org="bench", image=client.images.get(image_name).id, command=[], code_dir=work / "code",
                     resources=Resources(cpus=1.0, memory_mb=256, timeout_s=60, output_mb=10, tmp_mb=16))


def run(command: list[str], gpus: int) -> tuple[int | None, str, str]:
    job = replace(base, id=f"gpu-check-{uuid.uuid4().hex[:8]}", command=command,
                  resources=replace(base.resources, gpus=gpus))
    try:
        runner.prepare(job)
        runner.start(job)
        deadline = time.monotonic() + 60
        while (status := runner.poll(job.id)).state is not RunState.EXITED:
            assert time.monotonic() < deadline, f"{command} did not exit within 60 s"
            time.sleep(0.5)
        collected = runner.collect(job.id, work / job.id)
        return status.exit_code, collected.stdout.stored_at.read_text(), collected.stderr.stored_at.read_text()
    finally:
        runner.cleanup(job.id)


code, out, err = run(["nvidia-smi", "-L"], gpus=1)
print("GPU job, nvidia-smi -L:", code, out.strip(), err.strip())
seen = re.findall(r"UUID: (GPU-[0-9a-fA-F-]+)", out)
assert code == 0 and len(seen) == 1 and seen[0] in host, f"the GPU job did not see exactly its GPU: {out} {err}"

if len(found.gpus) == 1:
    holder = replace(base, id=f"gpu-check-{uuid.uuid4().hex[:8]}", command=["ls"],
                     resources=replace(base.resources, gpus=1))
    second = replace(holder, id=f"gpu-check-{uuid.uuid4().hex[:8]}")
    try:
        runner.prepare(holder)
        try:
            runner.prepare(second)
        except RunnerError as error:
            print("second GPU job refused:", error)
        else:
            raise AssertionError("a second GPU job was given the one GPU already held")
    finally:
        runner.cleanup(holder.id)
        runner.cleanup(second.id)

code, out, err = run(["ls", "/dev"], gpus=0)
print("CPU job, ls /dev:", code, out.split())
assert code == 0 and not [name for name in out.split() if name.startswith("nvidia")], \
    f"a CPU job saw GPU devices: {out}"
print("OK")
PY
