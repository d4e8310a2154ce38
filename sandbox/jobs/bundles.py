"""Code bundles (tar.gz): read header by header under fixed bounds, checked, then unpacked safely.

The archive is parsed here rather than by `tarfile`, because `tarfile` reads a GNU long-name or pax
header body whole, whatever size the header claims, before any check can see it: a 1 MB bundle made
the API allocate 2.9 GB (review 11.13). Here every header body is bounded before a byte of it is read,
member data is streamed in chunks, and the decompressed total is held to the compression-ratio limit.
"""

from __future__ import annotations

import gzip
import os
import posixpath
import re
import shutil
import stat
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sandbox.errors import Invalid, PayloadTooLarge

_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")
BLOCK = 512
CHUNK = 1 << 20
# A GNU long name, long link or pax header body: real ones are a few hundred bytes.
MAX_META_BYTES = 64 * 1024
# Metadata headers allowed before one member (a pax header and GNU long name and link, with room).
MAX_META_PER_MEMBER = 4

REGULAR, DIRECTORY, SYMLINK, HARDLINK = "file", "directory", "symlink", "hardlink"
_TYPES = {b"0": REGULAR, b"\0": REGULAR, b"7": REGULAR, b"5": DIRECTORY, b"2": SYMLINK, b"1": HARDLINK,
          b"3": "character device", b"4": "block device", b"6": "fifo"}


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


@dataclass(frozen=True)
class Member:
    """One entry of the archive, as this parser reads it (the only reading there is)."""

    name: str
    kind: str
    size: int
    mode: int
    linkname: str


def _member_problem(member: Member) -> str | None:
    name = member.name
    if _CONTROL.search(name):
        return f"{name!r}: control characters or backslashes in a path"
    if name.startswith("/") or posixpath.isabs(name):
        return f"{name!r}: absolute path"
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return f"{name!r}: '..' in a path"
    if not parts:
        return None if member.kind == DIRECTORY else f"{name!r}: empty path"
    if member.kind == HARDLINK:
        return f"{name!r}: hard links are not allowed"
    if member.kind == SYMLINK:
        target = member.linkname
        if not target or target.startswith("/") or _CONTROL.search(target):
            return f"{name!r}: symlink to an absolute or empty path {target!r}"
        # The text is checked here; where the link really leads (through other links) is checked
        # once everything is unpacked, by resolving it on disk.
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname("/".join(parts)), target))
        if resolved == ".." or resolved.startswith("../"):
            return f"{name!r}: symlink leads outside the bundle ({target!r})"
        return None
    if member.kind not in (REGULAR, DIRECTORY):
        return f"{name!r}: {member.kind} entries are not allowed"
    return None


class _Stream:
    """The decompressed archive, read in bounded pieces and counted against the limits."""

    def __init__(self, handle: gzip.GzipFile, limits: BundleLimits, compressed: int) -> None:
        self._handle = handle
        self._limits = limits
        self._compressed = max(compressed, 1)
        self.consumed = 0

    def read_exact(self, size: int) -> bytes:
        """Exactly `size` bytes (callers keep `size` small), or Invalid at a premature end."""
        data = b""
        while len(data) < size:
            chunk = self._handle.read(min(CHUNK, size - len(data)))
            if not chunk:
                raise Invalid("the code bundle is truncated")
            data += chunk
        self._count(len(data))
        return data

    def copy(self, size: int, sink: IO[bytes] | None) -> None:
        """Stream `size` bytes to `sink` (or nowhere) in chunks of at most CHUNK."""
        remaining = size
        while remaining > 0:
            chunk = self._handle.read(min(CHUNK, remaining))
            if not chunk:
                raise Invalid("the code bundle is truncated")
            self._count(len(chunk))
            if sink is not None:
                sink.write(chunk)
            remaining -= len(chunk)

    def _count(self, size: int) -> None:
        self.consumed += size
        limits = self._limits
        # Headers and padding count too: a bundle of empty members must not expand without bound.
        if self.consumed > limits.ratio_floor_bytes and self.consumed > limits.max_ratio * self._compressed:
            raise PayloadTooLarge(f"the code bundle expands more than {limits.max_ratio:.0f}x (a compression bomb?)")
        if self.consumed > limits.max_expanded_bytes + limits.max_files * 4 * BLOCK:
            raise PayloadTooLarge(f"the code bundle expands past {limits.max_expanded_bytes} bytes")


def _number(field: bytes) -> int:
    """A header number: octal text, or GNU base-256 (top bit set); Invalid if neither."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            raise Invalid("the code bundle has a negative size in a header")
        return value | ((field[0] & 0x3F) << (8 * (len(field) - 1)))
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError as exc:
        raise Invalid("the code bundle has a corrupt header (a number is not octal)") from exc


def _text(field: bytes) -> str:
    try:
        return field.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Invalid("the code bundle has a name that is not UTF-8") from exc


def _check_checksum(block: bytes) -> None:
    stored = _number(block[148:156])
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - 2 * sum(b for b in block[:148] + block[156:] if b > 127)
    if stored not in (unsigned, signed):
        raise Invalid("the code bundle is not a tar archive (a header checksum does not match)")


def _pax_records(body: bytes) -> dict[str, str]:
    """`LEN key=value\\n` records; anything else is refused (never guessed at)."""
    records: dict[str, str] = {}
    position = 0
    while position < len(body) and body[position:position + 1] != b"\0":
        space = body.find(b" ", position, position + 12)
        if space < 0:
            raise Invalid("the code bundle has a malformed pax header")
        try:
            length = int(body[position:space])
        except ValueError as exc:
            raise Invalid("the code bundle has a malformed pax header") from exc
        record = body[space + 1:position + length]
        if length <= 0 or position + length > len(body) or not record.endswith(b"\n") or b"=" not in record:
            raise Invalid("the code bundle has a malformed pax header")
        key, _, value = record[:-1].partition(b"=")
        try:
            records[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Invalid("the code bundle has a pax header that is not UTF-8") from exc
        position += length
    return records


def _blocks(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def read_members(stream: _Stream) -> Iterator[tuple[Member, int]]:
    """Each member and the padded size of its data (which the caller must consume or skip)."""
    pending: dict[str, str] = {}
    meta = 0
    while True:
        block = stream.read_exact(BLOCK)
        if block == bytes(BLOCK):
            return
        _check_checksum(block)
        typeflag = block[156:157]
        size = _number(block[124:136])
        if typeflag in (b"L", b"K", b"x", b"g"):
            # Bounded before the body is read: this is where tarfile allocated gigabytes.
            if size > MAX_META_BYTES:
                raise PayloadTooLarge(f"the code bundle has a {size}-byte header record (at most {MAX_META_BYTES})")
            meta += 1
            if meta > MAX_META_PER_MEMBER:
                raise Invalid("the code bundle has a chain of header records with no member")
            body = stream.read_exact(_blocks(size))[:size]
            if typeflag == b"L":
                pending["path"] = _text(body)
            elif typeflag == b"K":
                pending["linkpath"] = _text(body)
            else:
                records = _pax_records(body)
                if any(key.startswith("GNU.sparse") for key in records):
                    raise Invalid("the code bundle has sparse files, which are not allowed")
                if typeflag == b"x":
                    pending.update({k: v for k, v in records.items() if k in ("path", "linkpath", "size")})
                elif records.keys() & {"path", "linkpath", "size"}:
                    raise Invalid("the code bundle has a global pax header that renames members")
            continue
        kind = _TYPES.get(typeflag)
        if kind is None:
            raise Invalid(f"the code bundle has an entry of unsupported type {typeflag!r}")
        name = _text(block[0:100])
        if block[257:263] == b"ustar\0" and block[345:500].strip(b"\0"):
            name = _text(block[345:500]) + "/" + name
        name = pending.get("path", name)
        linkname = pending.get("linkpath", _text(block[157:257]))
        if "size" in pending:
            if not pending["size"].isdigit():
                raise Invalid("the code bundle has a malformed pax size")
            size = int(pending["size"])
        if typeflag == b"\0" and name.endswith("/"):
            kind = DIRECTORY
        if kind != REGULAR and size:
            raise Invalid(f"the code bundle is refused: {name!r} is a {kind} with content")
        yield Member(name=name, kind=kind, size=size, mode=_number(block[100:108]), linkname=linkname), _blocks(size)
        pending, meta = {}, 0


def unpack_bundle(archive: Path, destination: Path, limits: BundleLimits | None = None) -> BundleSummary:
    """Check every member and unpack into `destination` (which must not exist).

    Raises Invalid (422) for a bad member and PayloadTooLarge (413) past the limits; nothing is
    left behind on failure. Memory stays bounded by CHUNK and MAX_META_BYTES whatever the archive.
    """
    limits = limits or BundleLimits()
    compressed = archive.stat().st_size
    staging = destination.parent / f".unpack-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    files = 0
    expanded = 0
    try:
        try:
            with gzip.open(archive, "rb") as handle:
                stream = _Stream(handle, limits, compressed)
                for member, padded in read_members(stream):
                    problem = _member_problem(member)
                    if problem:
                        raise Invalid(f"the code bundle is refused: {problem}")
                    files += 1
                    expanded += member.size
                    if files > limits.max_files:
                        raise PayloadTooLarge(f"the code bundle has more than {limits.max_files} entries")
                    if expanded > limits.max_expanded_bytes:
                        raise PayloadTooLarge(f"the code bundle expands past {limits.max_expanded_bytes} bytes")
                    if expanded > limits.ratio_floor_bytes and expanded > limits.max_ratio * max(compressed, 1):
                        raise PayloadTooLarge(
                            f"the code bundle expands more than {limits.max_ratio:.0f}x (a compression bomb?)"
                        )
                    _extract(stream, member, staging)
                    stream.copy(padded - member.size, None)
        except (EOFError, OSError, zlib.error) as exc:
            raise Invalid(f"the code bundle is not a complete gzip-compressed tar archive: {exc}") from exc
        _refuse_escaping_links(staging)
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BundleSummary(files=files, expanded_bytes=expanded)


def _refuse_escaping_links(root: Path) -> None:
    """Resolve every symlink on disk, through any chain of other links, and refuse one that leaves `root`.

    Checking a link's text is not enough: `c -> sub/b/..` reads as inside, but with `sub/b -> ..`
    it resolves to the parent of the bundle.
    """
    real_root = os.path.realpath(root)
    for folder, directories, names in os.walk(root):
        for name in directories + names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                continue
            resolved = os.path.realpath(path)
            if resolved != real_root and not resolved.startswith(real_root + os.sep):
                shown = os.path.relpath(path, root)
                raise Invalid(f"the code bundle is refused: symlink {shown!r} leads outside the bundle "
                              "(through a chain of links)")


def _extract(stream: _Stream, member: Member, root: Path) -> None:
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
    if member.kind == DIRECTORY:
        target.mkdir(mode=0o755, exist_ok=True)
        os.chmod(target, 0o755)  # noqa: S103 - the job runs as another uid and must read its code
    elif member.kind == SYMLINK:
        os.symlink(member.linkname, target)
    else:
        mode = 0o755 if member.mode & stat.S_IXUSR else 0o644
        with open(target, "xb") as sink:
            stream.copy(member.size, sink)
        os.chmod(target, mode)


@dataclass(frozen=True)
class StagedBundle:
    """A checked bundle unpacked into `folder` (`code/` and `code.tar.gz`), ready to become a job's."""

    folder: Path
    sha256: str
    summary: BundleSummary

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def stage_bundle(archive: Path, *, sha256: str, staging_dir: Path, limits: BundleLimits | None = None) -> StagedBundle:
    """Unpack and check an uploaded bundle outside any database transaction; the archive moves in too."""
    folder = staging_dir / f"bundle-{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    try:
        summary = unpack_bundle(archive, folder / "code", limits)
        shutil.copyfile(archive, folder / "code.tar.gz")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return StagedBundle(folder=folder, sha256=sha256, summary=summary)
