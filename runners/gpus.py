"""NVIDIA GPUs this machine can give to jobs: found at worker start, on the host and in the Docker engine.

A GPU counts only when both sides have it: the host lists it (`nvidia-smi -L`, else the driver's
`/proc/driver/nvidia/gpus/*/information`), and the engine can hand it to a container (the NVIDIA
runtime registered with Docker, or its runtime hook on this machine's PATH, which is what Docker
looks for to serve `--gpus` device requests). Either alone gives jobs nothing, so it counts nothing,
and `GpuDetection.problem` says why for the worker's log.

Whole GPUs only: MIG slices are not scheduled.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROC_GPUS = Path("/proc/driver/nvidia/gpus")
NVIDIA_RUNTIME = "nvidia"
NVIDIA_HOOK = "nvidia-container-runtime-hook"
SMI_TIMEOUT_S = 20

# `GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5e1c...)`; MIG lines below a GPU are indented and skipped.
_SMI_LINE = re.compile(r"GPU (\d+): (.+?) \(UUID: (GPU-[0-9A-Fa-f-]+)\)")
# What a device id may look like before it goes into a label and NVIDIA_VISIBLE_DEVICES.
DEVICE_ID = re.compile(r"[0-9]{1,3}|GPU-[0-9A-Fa-f-]{1,64}")


@dataclass(frozen=True)
class GpuInfo:
    index: int  # NVML's index (PCI bus order), as nvidia-smi shows it
    name: str
    uuid: str = ""

    @property
    def device_id(self) -> str:
        """How a device request names this GPU: its UUID, stable across reboots, else its index."""
        return self.uuid or str(self.index)


@dataclass(frozen=True)
class GpuDetection:
    gpus: tuple[GpuInfo, ...]
    problem: str = ""  # why GPUs the host has cannot be used; empty when all is well or there are none


def parse_nvidia_smi_list(text: str) -> list[GpuInfo]:
    """The whole GPUs of `nvidia-smi -L` output."""
    found = (_SMI_LINE.fullmatch(line.rstrip()) for line in text.splitlines())
    return [GpuInfo(index=int(m.group(1)), name=m.group(2).strip(), uuid=m.group(3)) for m in found if m]


def parse_proc_information(texts: list[str]) -> list[GpuInfo]:
    """GPUs from the driver's per-device `information` files, indexed in PCI bus order as NVML does."""
    devices = []
    for text in texts:
        fields = {}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if fields.get("GPU Excluded", "No").lower() == "yes" or "Model" not in fields:
            continue
        uuid = fields.get("GPU UUID", "")
        devices.append((fields.get("Bus Location", ""), fields["Model"], uuid if uuid.startswith("GPU-") else ""))
    return [GpuInfo(index=i, name=name, uuid=uuid) for i, (_, name, uuid) in enumerate(sorted(devices))]


def host_gpus(*, nvidia_smi: str | None, proc_dir: Path = PROC_GPUS) -> tuple[list[GpuInfo], str]:
    """The host's GPUs and, when the listing failed, why."""
    if nvidia_smi is not None:
        try:
            listed = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=SMI_TIMEOUT_S,
                                    check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            return [], f"{nvidia_smi} -L failed: {error}"
        if listed.returncode != 0:
            # No driver loaded, or no device: nvidia-smi says so on stdout or stderr.
            why = (listed.stderr or listed.stdout).strip().splitlines()
            return [], f"{nvidia_smi} -L exited {listed.returncode}: {why[0] if why else ''}".rstrip(": ")
        return parse_nvidia_smi_list(listed.stdout), ""
    try:
        files = sorted(proc_dir.glob("*/information"))
        return parse_proc_information([path.read_text() for path in files]), ""
    except OSError as error:
        return [], f"reading {proc_dir} failed: {error}"


def engine_serves_gpus(client: Any, *, hook: str | None) -> tuple[bool, str]:
    """Whether the Docker engine can give a container NVIDIA GPUs, and if not, why."""
    if hook is not None:
        return True, ""
    try:
        runtimes = client.info().get("Runtimes") or {}
    except Exception as error:  # the SDK's errors and the socket's: either way, no GPUs from this engine
        return False, f"asking the Docker engine for its runtimes failed: {error}"
    if NVIDIA_RUNTIME in runtimes:
        return True, ""
    return False, (f"the Docker engine has no {NVIDIA_RUNTIME!r} runtime and {NVIDIA_HOOK} is not on the PATH: "
                   "install the NVIDIA Container Toolkit and run `nvidia-ctk runtime configure --runtime=docker`")


def detect_gpus(client: Any, *, nvidia_smi: str | None = None, proc_dir: Path = PROC_GPUS,
                hook: str | None = None, look_up_path: bool = True) -> GpuDetection:
    """The GPUs jobs on this machine can be given. `look_up_path` finds nvidia-smi and the hook on the PATH
    where they are not given; the engine is asked only when the host has a GPU."""
    if look_up_path:
        nvidia_smi = nvidia_smi or shutil.which("nvidia-smi")
        hook = hook or shutil.which(NVIDIA_HOOK)
    gpus, problem = host_gpus(nvidia_smi=nvidia_smi, proc_dir=proc_dir)
    if not gpus:
        return GpuDetection((), problem)
    usable, problem = engine_serves_gpus(client, hook=hook)
    if not usable:
        return GpuDetection((), f"the host has {len(gpus)} NVIDIA GPU(s), but {problem}")
    unnamed = [gpu for gpu in gpus if not DEVICE_ID.fullmatch(gpu.device_id)]
    if unnamed:
        return GpuDetection((), f"cannot name GPU(s) {[gpu.device_id for gpu in unnamed]} in a device request")
    return GpuDetection(tuple(gpus))
