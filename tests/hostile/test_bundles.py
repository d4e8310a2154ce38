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


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_and_links_unpack_in_every_format(tmp_path: Path, tar_format: int) -> None:
    deep = "/".join(["folder"] * 12) + "/" + "n" * 60 + ".py"  # 144 characters: prefix, long name or pax path
    long_target = "../" * 11 + "t" * 120 + ".py" if tar_format != tarfile.USTAR_FORMAT else "../util.py"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tar_format) as tar:
        for info, content in [regular(deep), regular("util.py"), link(deep + ".link", long_target)]:
            if content is not None:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                tar.addfile(info)
    path = tmp_path / "code.tar.gz"
    path.write_bytes(buffer.getvalue())
    destination = tmp_path / "out" / "code"
    summary = unpack_bundle(path, destination)
    assert summary.files == 3
    assert (destination / deep).read_text() == "print('hi')\n"
    assert (destination / (deep + ".link")).is_symlink()


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


@pytest.mark.parametrize("content", [b"", b"not a tarball", gzip.compress(b"not a tar inside", mtime=0),
                                     gzip.compress(b"x" * 2000, mtime=0)[:50]],
                         ids=["empty", "not a tarball", "gzip of no tar", "truncated gzip"])
def test_corrupt_bundles_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "code.tar.gz"
    path.write_bytes(content)
    destination = tmp_path / "out" / "code"
    with pytest.raises(Invalid):
        unpack_bundle(path, destination)
    assert_nothing_left(tmp_path, destination)


def _raw_header(name: bytes, typeflag: bytes, size: int, linkname: bytes = b"") -> bytes:
    """One ustar header block, written by hand so that it can claim any size."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"00000000000\0"
    block[156:157] = typeflag
    block[157:157 + len(linkname)] = linkname
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _header_bomb(tmp_path: Path, typeflag: bytes, body_bytes: int) -> Path:
    """A header record whose body is `body_bytes` of repeated text, gzip-compressed to ~1/1000."""
    path = tmp_path / "bomb.tar.gz"
    with gzip.open(path, "wb", compresslevel=6) as sink:
        sink.write(_raw_header(b"././@LongLink" if typeflag in b"LK" else b"pax", typeflag, body_bytes))
        chunk = b"a" * (1 << 20)
        for _ in range(body_bytes // len(chunk)):
            sink.write(chunk)
        sink.write(b"\0" * (-body_bytes % 512))
        sink.write(_raw_header(b"main.py", b"0", 0) + bytes(1024))
    return path


@pytest.mark.parametrize(("attack", "typeflag"), [("GNU long name", b"L"), ("GNU long link name", b"K"),
                                                  ("pax extended header", b"x"), ("pax global header", b"g")])
def test_header_bombs_are_refused_fast_in_bounded_memory(tmp_path: Path, attack: str, typeflag: bytes) -> None:
    """tarfile read such a header's body whole before any check: 1 MB of bundle, gigabytes of memory."""
    import time
    import tracemalloc

    body = 128 * 1024 * 1024
    path = _header_bomb(tmp_path, typeflag, body)
    assert path.stat().st_size < 1024 * 1024
    destination = tmp_path / "out" / "code"
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(PayloadTooLarge, match="header record"):
            unpack_bundle(path, destination)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - started
    assert peak < 8 * 1024 * 1024, f"a {attack} bomb made the unpacker allocate {peak / 2**20:.0f} MiB"
    assert elapsed < 5, f"a {attack} bomb took {elapsed:.1f} s to refuse"
    assert_nothing_left(tmp_path, destination)


def test_a_stream_of_empty_members_is_held_to_the_ratio(tmp_path: Path) -> None:
    """Headers expand too: millions of empty members compress to almost nothing."""
    path = tmp_path / "empties.tar.gz"
    with gzip.open(path, "wb") as sink:
        for number in range(5000):
            sink.write(_raw_header(b"d%d/" % number, b"5", 0))
        sink.write(bytes(1024))
    with pytest.raises(PayloadTooLarge, match="expands more than"):
        unpack_bundle(path, tmp_path / "out" / "code", BundleLimits(ratio_floor_bytes=64 * 1024, max_ratio=20))


@pytest.mark.parametrize(("attack", "members"), [
    ("a link through a link to the parent", [link("sub/b", ".."), link("c", "sub/b/..")]),
    ("the same, the outer link first", [link("c", "sub/b/../x"), link("sub/b", "..")]),
    ("three links deep", [link("p/q/r", "../.."), link("s/t", "../p/q/r/.."), link("u", "s/t/../etc")]),
    ("a link to a link to a folder's parent", [link("a/up", ".."), link("b/l", "../a/up"), link("z", "b/l/..")]),
])
def test_link_chains_leading_outside_are_refused(tmp_path: Path, attack: str,
                                                 members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    """Each link's own text stays inside; resolved through the others, it leaves the bundle."""
    path = bundle(tmp_path, [regular("main.py"), *members])
    destination = tmp_path / "out" / "code"
    with pytest.raises(Invalid, match="outside the bundle"):
        unpack_bundle(path, destination)
    assert_nothing_left(tmp_path, destination)


@pytest.mark.parametrize("members", [
    [link("l", "sub"), regular("sub/a.py"), link("h", "l/a.py", tarfile.LNKTYPE)],
    [link("up", "."), link("h", "up/../../etc/passwd", tarfile.LNKTYPE)],
])
def test_hard_links_through_symlinks_are_refused(tmp_path: Path,
                                                 members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    destination = tmp_path / "out" / "code"
    with pytest.raises(Invalid):
        unpack_bundle(bundle(tmp_path, members), destination)
    assert_nothing_left(tmp_path, destination)


def test_a_link_chain_that_stays_inside_unpacks(tmp_path: Path) -> None:
    path = bundle(tmp_path, [regular("lib/util.py"), link("sub/b", ".."), link("c", "sub/b/lib"),
                             link("d", "c/util.py")])
    destination = tmp_path / "out" / "code"
    unpack_bundle(path, destination)
    assert (destination / "d").read_text() == "print('hi')\n"
