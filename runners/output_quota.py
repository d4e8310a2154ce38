"""The job's /output: a loop-mounted ext4 file in the job's state folder, so a writer meets ENOSPC at the quota.

Docker's overlay2 on ext4 cannot limit a bind mount's size, and a job that fills the host disk stops
every other job and the service itself. A small file system of its own is a limit the kernel enforces.
Each step here is idempotent and recovers what a crash half did.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from runners.errors import RunnerError

MIB = 1024 * 1024
IMAGE_NAME = "output.img"
MOUNT_NAME = "output"

# nosymfollow: the host (collect, egress, a steward's shell) never follows a link a job planted.
# It also holds inside the container, since a bind mount keeps its source's flags.
MOUNT_OPTIONS = "loop,nosuid,nodev,noexec,nosymfollow"

_TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def image_path(job_dir: Path) -> Path:
    return job_dir / IMAGE_NAME


def mount_path(job_dir: Path) -> Path:
    return job_dir / MOUNT_NAME


def ensure_mounted(job_dir: Path, *, size_mb: int, owner: tuple[int, int], create: bool = True) -> Path:
    """Make `job_dir/output` a mounted ext4 file system of `size_mb`, owned by `owner`; keep one already there.

    With `create` False, only an existing file system is (re)mounted, as after a host reboot.
    """
    mountpoint = mount_path(job_dir)
    image = image_path(job_dir)
    if not is_mounted(mountpoint):
        if not image.exists():
            if not create:
                raise RunnerError(f"the output file system {image} does not exist")
            _create_image(image, size_mb)
        _make_mountpoint(mountpoint)
        _run(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, str(image), str(mountpoint)], what=f"mounting {image}")
    # Redone on every call: a crash may have come between the mount and these.
    os.chown(mountpoint, *owner)
    os.chmod(mountpoint, 0o700)
    lost_and_found = mountpoint / "lost+found"
    if lost_and_found.is_dir() and not lost_and_found.is_symlink():
        # Left by mkfs, owned by root: the job cannot use it. Kept if an fsck put something in it.
        with contextlib.suppress(OSError):
            lost_and_found.rmdir()
    return mountpoint


def remove(job_dir: Path) -> None:
    """Unmount the output file system, free its loop device and delete it; a no-op if it is gone."""
    mountpoint = mount_path(job_dir)
    image = image_path(job_dir)
    if is_mounted(mountpoint):
        result = _run(["umount", str(mountpoint)], what=f"unmounting {mountpoint}", check=False)
        if result.returncode != 0:
            # Something on the host still holds it open; detach it now, the kernel frees it when released.
            _run(["umount", "--lazy", str(mountpoint)], what=f"unmounting {mountpoint}")
        if is_mounted(mountpoint):
            raise RunnerError(f"{mountpoint} is still mounted after umount")
    if image.exists():
        # A crash between attaching the loop device and mounting it leaves the device attached.
        listing = _run(["losetup", "--associated", str(image)], what=f"listing loop devices of {image}")
        for line in listing.stdout.splitlines():
            device = line.split(":", 1)[0].strip()
            if device.startswith("/dev/loop"):
                _run(["losetup", "--detach", device], what=f"detaching {device}", check=False)
        image.unlink()
    for leftover in (mountpoint, image.with_name(IMAGE_NAME + ".partial")):
        if leftover.is_dir() and not leftover.is_symlink():
            leftover.rmdir()
        elif leftover.exists() or leftover.is_symlink():
            leftover.unlink()


def is_mounted(mountpoint: Path) -> bool:
    """Whether exactly `mountpoint` is a mount point in this process's mount namespace."""
    target = os.path.realpath(mountpoint)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError as error:
        raise RunnerError(f"cannot read the mount table: {error}") from error
    return any(_unescape_mountinfo(line.split()[4]) == target for line in lines if len(line.split()) > 4)


def space_left(mountpoint: Path) -> tuple[int, int]:
    """Bytes and inodes an unprivileged writer can still use on the mounted output file system."""
    try:
        stats = os.statvfs(mountpoint)
    except OSError as error:
        raise RunnerError(f"cannot read the free space of {mountpoint}: {error}") from error
    return stats.f_bavail * stats.f_frsize, stats.f_favail


def _create_image(image: Path, size_mb: int) -> None:
    # Format under another name and rename, so `output.img` exists only once it is a whole file system.
    partial = image.with_name(IMAGE_NAME + ".partial")
    partial.unlink(missing_ok=True)
    try:
        with partial.open("xb") as handle:
            handle.truncate(size_mb * MIB)  # sparse: the host disk is used only as the job writes
    except OSError as error:
        raise RunnerError(f"cannot create the output file {partial}: {error}") from error
    # -m 0: no blocks reserved for root, so the quota is what the job can use.
    _run(["mkfs.ext4", "-q", "-F", "-m", "0", str(partial)], what=f"formatting {partial}")
    partial.rename(image)


def _make_mountpoint(mountpoint: Path) -> None:
    # Mode 000 and owned by root: if the loop mount were ever missing or invisible to the engine, the job
    # would find an unwritable folder instead of writing to the host disk without a quota.
    if mountpoint.is_symlink() or (mountpoint.exists() and not mountpoint.is_dir()):
        raise RunnerError(f"{mountpoint} exists and is not a folder")
    mountpoint.mkdir(mode=0o000, exist_ok=True)
    os.chown(mountpoint, 0, 0)
    os.chmod(mountpoint, 0o000)


def _run(command: list[str], *, what: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    executable = shutil.which(command[0], path=_TOOL_PATH)
    if executable is None:
        raise RunnerError(f"{what} needs `{command[0]}`, which is not installed")
    try:
        result = subprocess.run(
            [executable, *command[1:]],
            capture_output=True,
            text=True,
            errors="replace",
            env={"PATH": _TOOL_PATH, "LC_ALL": "C"},
            check=False,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RunnerError(f"{what} failed: {error}") from error
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise RunnerError(f"{what} failed (exit code {result.returncode}): {detail}")
    return result


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), field)
