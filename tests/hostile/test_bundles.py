"""Hostile code bundles: each is refused before anything is unpacked outside the staging folder."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from sandbox.errors import Invalid, PayloadTooLarge
from sandbox.jobs.bundles import BundleLimits, unpack_bundle


def bundle(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], name: str = "code.tar.gz") -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, content in members:
            if content is not None:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                tar.addfile(info)
    path = tmp_path / name
    path.write_bytes(buffer.getvalue())
    return path


def regular(name: str, content: bytes = b"print('hi')\n") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), content


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, None


def assert_nothing_left(tmp_path: Path, destination: Path) -> None:
    assert not destination.exists(), "a refused bundle was unpacked"
    assert not list(destination.parent.glob(".unpack-*")), "a staging folder was left behind"


def test_a_clean_bundle_unpacks(tmp_path: Path) -> None:
    path = bundle(tmp_path, [regular("main.py"), regular("lib/util.py"), link("lib/alias.py", "util.py")])
    destination = tmp_path / "out" / "code"
    summary = unpack_bundle(path, destination)
    assert summary.files == 3
    assert (destination / "main.py").read_text() == "print('hi')\n"
    assert (destination / "lib" / "alias.py").resolve() == (destination / "lib" / "util.py").resolve()


@pytest.mark.parametrize(("attack", "members"), [
    ("absolute path", [regular("/etc/cron.d/evil")]),
    ("dot-dot traversal", [regular("../../evil.py")]),
    ("dot-dot in the middle", [regular("lib/../../evil.py")]),
    ("symlink to an absolute path", [link("data", "/etc/passwd")]),
    ("symlink leading outside", [link("up", "../../..")]),
    ("symlink chain outside", [link("a/b", "../../outside")]),
    ("write through a symlinked folder", [link("lib", "."), regular("lib/x.py")]),
    ("hard link", [regular("a.py"), link("b.py", "a.py", tarfile.LNKTYPE)]),
    ("character device", [special("tty", tarfile.CHRTYPE)]),
    ("block device", [special("sda", tarfile.BLKTYPE)]),
    ("fifo", [special("pipe", tarfile.FIFOTYPE)]),
    ("backslash path", [regular("..\\..\\evil.py")]),
    ("control character", [regular("evil\x1b[2J.py")]),
    ("duplicate member", [regular("a.py"), regular("a.py")]),
])
def test_hostile_members_are_refused(tmp_path: Path, attack: str, members: list[tuple[tarfile.TarInfo, bytes | None]],
                                     ) -> None:
    path = bundle(tmp_path, members)
    destination = tmp_path / "out" / "code"
    with pytest.raises(Invalid):
        unpack_bundle(path, destination)
    assert_nothing_left(tmp_path, destination)
    assert not (tmp_path / "evil.py").exists() and not (tmp_path.parent / "evil.py").exists(), f"{attack} escaped"


def test_zip_bomb_is_refused_by_ratio(tmp_path: Path) -> None:
    path = bundle(tmp_path, [regular("zeros.bin", b"\0" * (20 * 1024 * 1024))])
    assert path.stat().st_size < 100_000
    destination = tmp_path / "out" / "code"
    with pytest.raises(PayloadTooLarge, match="expands more than"):
        unpack_bundle(path, destination)
    assert_nothing_left(tmp_path, destination)


def test_expanded_size_limit(tmp_path: Path) -> None:
    import os

    path = bundle(tmp_path, [regular("noise.bin", os.urandom(3 * 1024 * 1024))])
    with pytest.raises(PayloadTooLarge, match="expands past"):
        unpack_bundle(path, tmp_path / "out" / "code", BundleLimits(max_expanded_bytes=2 * 1024 * 1024))


def test_too_many_files(tmp_path: Path) -> None:
    path = bundle(tmp_path, [regular(f"f{n}.py") for n in range(30)])
    with pytest.raises(PayloadTooLarge, match="more than 20 entries"):
        unpack_bundle(path, tmp_path / "out" / "code", BundleLimits(max_files=20))


@pytest.mark.parametrize("content", [b"", b"not a tarball", gzip.compress(b"not a tar inside"),
                                     gzip.compress(b"x" * 2000)[:50]])
def test_corrupt_bundles_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "code.tar.gz"
    path.write_bytes(content)
    destination = tmp_path / "out" / "code"
    with pytest.raises(Invalid):
        unpack_bundle(path, destination)
    assert_nothing_left(tmp_path, destination)
