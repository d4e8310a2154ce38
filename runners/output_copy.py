"""Copy what a job left in /output to the host, trusting nothing about it.

The tree was written by hostile code. Every step opens relative to an already-open folder with
O_NOFOLLOW, so no symlink (in a name or a parent) is ever followed; only regular files are copied;
names that could mislead a reviewer or a shell are refused; and the bytes copied never exceed the
output quota, even for sparse files whose size is larger than the blocks they use.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import unicodedata
from pathlib import Path

from runners.base import CollectedFile
from runners.errors import RunnerError

MAX_DEPTH = 32
MAX_PATH_CHARS = 1024
_CHUNK = 1024 * 1024

# Control, format (bidi overrides, zero-width), surrogate (undecodable bytes), private-use and
# line-separator characters: a name holding one can show a reviewer something else than it is.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def copy_output_tree(
    source: Path, destination: Path, *, max_total_bytes: int
) -> tuple[list[CollectedFile], dict[str, str]]:
    """Copy the regular files under `source` into `destination` (emptied first); return them and the refusals.

    Refusals map a printable form of the path to a fixed reason. Reasons never quote anything the job
    chose (a link's target, say), since they are shown to the buyer.
    """
    if destination.is_symlink() or destination.is_file():
        destination.unlink()
    elif destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True, mode=0o750)
    copier = _TreeCopier(destination, budget=max_total_bytes)
    try:
        root_fd = os.open(source, _DIRECTORY_FLAGS)
    except OSError as error:
        raise RunnerError(f"cannot open the output folder {source}: {error}") from error
    try:
        copier.copy_folder(root_fd, ())
    finally:
        os.close(root_fd)
    return copier.files, copier.refused


def printable_path(parts: tuple[str, ...]) -> str:
    """The path with every refused character escaped (`\\n`, `\\u202e`, `\\xff` for an undecodable byte)."""
    shown: list[str] = []
    for character in "/".join(parts):
        code = ord(character)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, as os.fsdecode keeps it
            shown.append(f"\\x{code - 0xDC00:02x}")
        elif unicodedata.category(character) in _REFUSED_CATEGORIES:
            shown.append(character.encode("unicode_escape").decode("ascii"))
        else:
            shown.append(character)
    return "".join(shown)


def name_problem(name: str) -> str | None:
    """Why a file name from a job is refused, or None if it is fine."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8"
    if any(unicodedata.category(character) in _REFUSED_CATEGORIES for character in name):
        return "file name has control or invisible characters"
    return None


class _TreeCopier:
    def __init__(self, destination: Path, *, budget: int) -> None:
        # Files are reported under the destination as the caller named it; containment is checked on real paths.
        self.destination = Path(os.path.abspath(destination))
        self.real_destination = Path(os.path.realpath(destination))
        self.budget = budget
        self.files: list[CollectedFile] = []
        self.refused: dict[str, str] = {}

    def copy_folder(self, folder_fd: int, parts: tuple[str, ...]) -> None:
        with os.scandir(folder_fd) as listing:
            names = sorted(entry.name for entry in listing)
        for name in names:
            self._copy_entry(folder_fd, (*parts, name))

    def _copy_entry(self, folder_fd: int, parts: tuple[str, ...]) -> None:
        name = parts[-1]
        shown = printable_path(parts)
        problem = name_problem(name)
        if problem is not None:
            self.refused[shown] = problem
            return
        if len("/".join(parts)) > MAX_PATH_CHARS:
            self.refused[shown] = f"path longer than {MAX_PATH_CHARS} characters"
            return
        try:
            info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
        except OSError as error:
            self.refused[shown] = f"could not be read: {error.strerror}"
            return
        mode = info.st_mode
        if stat.S_ISDIR(mode):
            self._copy_subfolder(folder_fd, parts)
        elif stat.S_ISREG(mode):
            self._copy_file(folder_fd, parts, info)
        else:
            self.refused[shown] = _kind_refused(mode)

    def _copy_subfolder(self, folder_fd: int, parts: tuple[str, ...]) -> None:
        if len(parts) > MAX_DEPTH:
            self.refused[printable_path(parts)] = f"folders nested deeper than {MAX_DEPTH} levels"
            return
        try:
            subfolder_fd = os.open(parts[-1], _DIRECTORY_FLAGS, dir_fd=folder_fd)
        except OSError as error:
            self.refused[printable_path(parts)] = f"could not be read: {error.strerror}"
            return
        try:
            self.copy_folder(subfolder_fd, parts)
        finally:
            os.close(subfolder_fd)

    def _copy_file(self, folder_fd: int, parts: tuple[str, ...], info: os.stat_result) -> None:
        shown = printable_path(parts)
        if info.st_size > self.budget:
            self.refused[shown] = "larger than what is left of the output quota"
            return
        try:
            source_fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=folder_fd)
        except OSError as error:
            self.refused[shown] = f"could not be read: {error.strerror}"
            return
        try:
            opened = os.fstat(source_fd)
            if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
                self.refused[shown] = "changed while it was being collected"
                return
            target = self.destination.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            # Names are checked above, so this cannot fail; it is the last line of defence if that ever changes.
            if not Path(os.path.realpath(target)).is_relative_to(self.real_destination):
                self.refused[shown] = "would be written outside the collection folder"
                return
            size, digest = self._copy_bytes(source_fd, target)
        finally:
            os.close(source_fd)
        if size < 0:
            self.refused[shown] = "larger than what is left of the output quota"
            return
        self.budget -= size
        self.files.append(CollectedFile(path="/".join(parts), size=size, sha256=digest, stored_at=target))

    def _copy_bytes(self, source_fd: int, target: Path) -> tuple[int, str]:
        """Copy and hash; (-1, "") if the file turned out larger than the budget (the partial copy is removed)."""
        digest = hashlib.sha256()
        size = 0
        target_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        try:
            while chunk := os.read(source_fd, _CHUNK):
                size += len(chunk)
                if size > self.budget:
                    break
                digest.update(chunk)
                _write_all(target_fd, chunk)
        finally:
            os.close(target_fd)
        if size > self.budget:
            target.unlink()
            return -1, ""
        return size, digest.hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _kind_refused(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symbolic link (never followed)"
    if stat.S_ISFIFO(mode):
        return "named pipe (fifo)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return "not a regular file"
