"""Code bundles (tar.gz): checked member by member before anything runs, then unpacked safely."""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import tarfile
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

from sandbox.errors import Invalid, PayloadTooLarge

_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


@dataclass(frozen=True)
class BundleLimits:
    max_expanded_bytes: int = 256 * 1024 * 1024
    max_files: int = 10_000
    max_ratio: float = 100.0  # expanded / compressed, once the bundle expands past 1 MiB
    ratio_floor_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class BundleSummary:
    files: int
    expanded_bytes: int


def _member_problem(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if _CONTROL.search(name):
        return f"{name!r}: control characters or backslashes in a path"
    if name.startswith("/") or posixpath.isabs(name):
        return f"{name!r}: absolute path"
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return f"{name!r}: '..' in a path"
    if not parts:
        return None if member.isdir() else f"{name!r}: empty path"
    if member.isdev() or member.isfifo():
        return f"{name!r}: device or fifo"
    if member.islnk():
        return f"{name!r}: hard links are not allowed"
    if member.issym():
        target = member.linkname
        if target.startswith("/") or _CONTROL.search(target):
            return f"{name!r}: symlink to an absolute path {target!r}"
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname("/".join(parts)), target))
        if resolved == ".." or resolved.startswith("../"):
            return f"{name!r}: symlink leads outside the bundle ({target!r})"
        return None
    if not (member.isreg() or member.isdir()):
        return f"{name!r}: unsupported member type"
    return None


def unpack_bundle(archive: Path, destination: Path, limits: BundleLimits | None = None) -> BundleSummary:
    """Check every member and unpack into `destination` (which must not exist).

    Raises Invalid (422) for a bad member and PayloadTooLarge (413) past the limits; nothing is
    left behind on failure.
    """
    limits = limits or BundleLimits()
    compressed = archive.stat().st_size
    staging = destination.parent / f".unpack-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    files = 0
    expanded = 0
    try:
        try:
            tar = tarfile.open(archive, mode="r|gz")  # noqa: SIM115 - streaming, closed below
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise Invalid(f"the code bundle is not a gzip-compressed tar archive: {exc}") from exc
        try:
            for member in tar:
                problem = _member_problem(member)
                if problem:
                    raise Invalid(f"the code bundle is refused: {problem}")
                files += 1
                expanded += max(member.size, 0)
                if files > limits.max_files:
                    raise PayloadTooLarge(f"the code bundle has more than {limits.max_files} entries")
                if expanded > limits.max_expanded_bytes:
                    raise PayloadTooLarge(f"the code bundle expands past {limits.max_expanded_bytes} bytes")
                if expanded > limits.ratio_floor_bytes and expanded > limits.max_ratio * max(compressed, 1):
                    raise PayloadTooLarge(
                        f"the code bundle expands more than {limits.max_ratio:.0f}x (a compression bomb?)"
                    )
                _extract(tar, member, staging)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise Invalid(f"the code bundle is corrupt: {exc}") from exc
        finally:
            tar.close()
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BundleSummary(files=files, expanded_bytes=expanded)


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path) -> None:
    parts = [p for p in member.name.split("/") if p not in ("", ".")]
    if not parts:
        return
    target = root.joinpath(*parts)
    # Parents are created as real directories; a symlinked parent would let a later member escape.
    for parent in reversed(target.parents):
        if parent == root or root not in parent.parents:
            continue
        if parent.is_symlink():
            raise Invalid(f"the code bundle is refused: {member.name!r} goes through a symlink")
        parent.mkdir(mode=0o755, exist_ok=True)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise Invalid(f"the code bundle is refused: {member.name!r} appears twice")
    if member.isdir():
        target.mkdir(mode=0o755, exist_ok=True)
        os.chmod(target, 0o755)  # noqa: S103 - the job runs as another uid and must read its code
    elif member.issym():
        os.symlink(member.linkname, target)
    else:
        source = tar.extractfile(member)
        if source is None:
            raise Invalid(f"the code bundle is refused: {member.name!r} has no content")
        mode = 0o755 if member.mode & stat.S_IXUSR else 0o644
        with source, open(target, "xb") as sink:
            remaining = member.size
            while remaining > 0:
                chunk = source.read(min(1 << 20, remaining))
                if not chunk:
                    raise Invalid(f"the code bundle is truncated at {member.name!r}")
                sink.write(chunk)
                remaining -= len(chunk)
        os.chmod(target, mode)
