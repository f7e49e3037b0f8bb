"""unpack_layer on single layers: entry types, metadata, names, diffID, duplicates, whiteouts."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile
import threading
import time
from pathlib import Path

import pytest
import zstandard

from lstore.errors import IntegrityError, UnsafeLayerError, UnsupportedError
from tests import layers
from tests.layers import (
    MTIME,
    Member,
    device,
    directory,
    fifo,
    file,
    hardlink,
    needs_root,  # noqa: F401 - fixture
    opaque,
    sha256,
    symlink,
    tar_bytes,
    unpack,
    whiteout,
)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_root")]

# struct vfs_cap_data, revision 2, granting cap_net_bind_service: binary, not valid UTF-8.
CAPABILITY = bytes.fromhex("0000000200040000000000000000000000000000")


def extract(members: list[Member], tmp_path: Path, **options: object) -> Path:
    dest = tmp_path / "layer"
    unpack(tar_bytes(members, **options), dest)  # type: ignore[arg-type]
    return dest


def opaque_flag(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False)
    except OSError:
        return None


def is_whiteout_device(path: Path) -> bool:
    status = path.lstat()
    return stat.S_ISCHR(status.st_mode) and status.st_rdev == 0


# Entry types and metadata.


def test_regular_file_content_and_metadata(tmp_path: Path) -> None:
    dest = extract([file("etc/motd", b"hello\n", mode=0o640, uid=1000, gid=100)], tmp_path)
    status = (dest / "etc/motd").stat()

    assert (dest / "etc/motd").read_bytes() == b"hello\n"
    assert stat.S_IMODE(status.st_mode) == 0o640
    assert (status.st_uid, status.st_gid) == (1000, 100)
    assert status.st_mtime_ns == MTIME * 10**9


@pytest.mark.parametrize("mode", [0o4755, 0o2755, 0o6711, 0o1777, 0o000])
def test_special_mode_bits_survive_chown(tmp_path: Path, mode: int) -> None:
    dest = extract(
        [file("bin/tool", b"x", mode=mode, uid=1000, gid=1000), directory("d", mode=mode, uid=7)],
        tmp_path,
    )

    assert stat.S_IMODE((dest / "bin/tool").stat().st_mode) == mode
    assert stat.S_IMODE((dest / "d").stat().st_mode) == mode


def test_directory_mtime_set_last(tmp_path: Path) -> None:
    dest = extract(
        [directory("d", mtime=1000), file("d/a", b"a"), directory("d/sub", mtime=2000),
         file("d/sub/b", b"b"), symlink("d/link", "a"), whiteout("d/gone")],
        tmp_path,
    )

    assert (dest / "d").stat().st_mtime_ns == 1000 * 10**9
    assert (dest / "d/sub").stat().st_mtime_ns == 2000 * 10**9


def test_symlink_target_owner_mtime(tmp_path: Path) -> None:
    dest = extract([symlink("usr/bin/vi", "/usr/bin/vim.basic", uid=5, gid=6, mtime=3000)],
                   tmp_path)
    status = (dest / "usr/bin/vi").lstat()

    assert os.readlink(dest / "usr/bin/vi") == "/usr/bin/vim.basic"
    assert (status.st_uid, status.st_gid) == (5, 6)
    assert status.st_mtime_ns == 3000 * 10**9


def test_hardlink_shares_the_inode(tmp_path: Path) -> None:
    dest = extract([file("a", b"data", mode=0o600), hardlink("sub/b", "a")], tmp_path)

    assert (dest / "a").stat().st_ino == (dest / "sub/b").stat().st_ino
    assert (dest / "a").stat().st_nlink == 2
    assert stat.S_IMODE((dest / "sub/b").stat().st_mode) == 0o600


def test_devices_and_fifo_are_created(tmp_path: Path) -> None:
    dest = extract(
        [device("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666),
         device("dev/sda", tarfile.BLKTYPE, 8, 0, mode=0o660),
         fifo("run/initctl", mode=0o600)],
        tmp_path,
    )
    null = (dest / "dev/null").lstat()
    sda = (dest / "dev/sda").lstat()
    pipe = (dest / "run/initctl").lstat()

    assert stat.S_ISCHR(null.st_mode)
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISBLK(sda.st_mode)
    assert (os.major(sda.st_rdev), os.minor(sda.st_rdev)) == (8, 0)
    assert stat.S_ISFIFO(pipe.st_mode)
    assert stat.S_IMODE(pipe.st_mode) == 0o600


LONG_DIR = "/".join(["directory-with-a-long-name"] * 6)


@pytest.mark.parametrize("format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_long_names_are_kept(tmp_path: Path, format: int) -> None:
    name = f"{LONG_DIR}/file-{'n' * 80}"
    members = [file(name, b"long"), symlink("short", name), symlink(f"{LONG_DIR}/l", "t" * 300)]
    dest = extract(members, tmp_path, format=format)

    assert (dest / name).read_bytes() == b"long"
    assert os.readlink(dest / "short") == name
    assert os.readlink(dest / LONG_DIR / "l") == "t" * 300


def test_ustar_prefix_is_joined_to_the_name(tmp_path: Path) -> None:
    name = "/".join(["directory-with-a-long-name"] * 5) + "/file-" + "n" * 80
    dest = extract([file(name, b"prefixed")], tmp_path, format=tarfile.USTAR_FORMAT)

    assert (dest / name).read_bytes() == b"prefixed"


def test_gnu_dumpdir_is_a_directory(tmp_path: Path) -> None:
    listing = b"Yfile\x00\x00"
    info, _ = directory("d", mode=0o750)
    info.type = b"D"
    info.size = len(listing)
    dest = extract([(info, listing), file("d/file", b"f")], tmp_path, format=tarfile.GNU_FORMAT)

    assert layers.tree(dest) == {"d": "dir", "d/file": "f"}
    assert stat.S_IMODE((dest / "d").stat().st_mode) == 0o750


def test_binary_capability_survives_chown(tmp_path: Path) -> None:
    members = [file("usr/bin/ping", b"ELF", mode=0o755, uid=1000, gid=1000,
                    xattrs={"security.capability": CAPABILITY, "user.note": b"\xff\x00\x01"})]
    dest = extract(members, tmp_path)

    assert os.getxattr(dest / "usr/bin/ping", "security.capability") == CAPABILITY
    assert os.getxattr(dest / "usr/bin/ping", "user.note") == b"\xff\x00\x01"
    assert (dest / "usr/bin/ping").stat().st_uid == 1000


def test_xattrs_on_directories_and_symlinks(tmp_path: Path) -> None:
    members = [directory("d", xattrs={"user.dir": b"1"}),
               symlink("l", "d", xattrs={"trusted.link": b"2"})]
    dest = extract(members, tmp_path)

    assert os.getxattr(dest / "d", "user.dir") == b"1"
    assert os.getxattr(dest / "l", "trusted.link", follow_symlinks=False) == b"2"


def test_overlay_xattrs_in_tar_ignored(tmp_path: Path) -> None:
    members = [directory("d", xattrs={"trusted.overlay.opaque": b"y",
                                      "trusted.overlay.redirect": b"/etc"})]
    dest = extract(members, tmp_path)

    assert os.listxattr(dest / "d") == []


# Names.


@pytest.mark.parametrize("name", ["./", "/", ".", "./."])
def test_root_entry_is_ignored(tmp_path: Path, name: str) -> None:
    dest = extract([directory(name, mode=0o700, uid=1234), file("a", b"a")], tmp_path)
    status = dest.stat()

    assert stat.S_IMODE(status.st_mode) == 0o755
    assert status.st_uid == 0
    assert (dest / "a").read_bytes() == b"a"


def test_names_are_normalised(tmp_path: Path) -> None:
    dest = extract(
        [file("./a", b"1"), file("/b", b"2"), directory("c/"), file("//c//./d", b"3"),
         file("e/../f", b"4")],
        tmp_path,
    )

    assert layers.tree(dest) == {"a": "1", "b": "2", "c": "dir", "c/d": "3", "f": "4"}


def test_missing_parents_are_created_0755(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        dest = extract([file("x/y/z", b"deep"), whiteout("w"), file("w/f", b"f")], tmp_path)
    finally:
        os.umask(old_umask)

    assert stat.S_IMODE((dest / "x").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "x/y").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "w").stat().st_mode) == 0o755


def test_non_utf8_names_are_kept_as_bytes(tmp_path: Path) -> None:
    raw_name = b"caf\xe9"
    members = [file(raw_name.decode("utf-8", "surrogateescape"), b"latin-1")]
    dest = extract(members, tmp_path, format=tarfile.GNU_FORMAT)

    assert os.listdir(os.fsencode(dest)) == [raw_name]


# diffID, size and entry count.


def test_diff_id_covers_the_whole_stream(tmp_path: Path) -> None:
    tar = tar_bytes([file("hello", b"hi\n")]) + bytes(4096)
    result = unpack(tar, tmp_path / "layer", expected_diff_id=sha256(tar))

    assert result.diff_id == sha256(tar)
    assert result.size == len(tar)
    assert result.entries == 1


def test_diff_id_mismatch_raises(tmp_path: Path) -> None:
    tar = tar_bytes([file("hello", b"hi\n")])
    wrong = sha256(b"something else")

    with pytest.raises(IntegrityError) as caught:
        unpack(tar, tmp_path / "layer", expected_diff_id=wrong)

    assert caught.value.expected == wrong
    assert caught.value.actual == sha256(tar)
    assert layers.LAYER_DIGEST in str(caught.value)
    assert wrong in str(caught.value)
    assert sha256(tar) in str(caught.value)


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_compressions_give_same_layer(tmp_path: Path, compression: str) -> None:
    big = os.urandom(3 << 20) * 3
    tar = tar_bytes([file("big", big), file("small", b"s"), directory("d")])
    blob = {"gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress,
            "none": bytes}[compression](tar)
    result = unpack(blob, tmp_path / "layer", compression, expected_diff_id=sha256(tar))

    assert result.diff_id == sha256(tar)
    assert result.entries == 3
    digest = hashlib.sha256((tmp_path / "layer/big").read_bytes()).digest()
    assert digest == hashlib.sha256(big).digest()


def test_short_reads_from_the_source(tmp_path: Path) -> None:
    tar = tar_bytes([file(f"f{i}", os.urandom(i * 97)) for i in range(40)])
    dest = tmp_path / "layer"
    dest.mkdir()
    result = layers.unpack_layer(
        layers.TrickleReader(gzip.compress(tar), 333), "gzip", str(dest),
        layer_digest=layers.LAYER_DIGEST,
    )

    assert result.diff_id == sha256(tar)
    assert len(os.listdir(dest)) == 40


def test_empty_stream_is_an_empty_layer(tmp_path: Path) -> None:
    result = unpack(b"", tmp_path / "layer")

    assert result.entries == 0
    assert result.diff_id == sha256(b"")


# Duplicate paths: the last entry wins, whole.


def test_duplicate_file_last_wins(tmp_path: Path) -> None:
    dest = extract(
        [directory("etc/"), file("etc/conf", b"first", mode=0o644, xattrs={"user.a": b"1"}),
         file("etc/conf", b"second", mode=0o600)],
        tmp_path,
    )

    assert (dest / "etc/conf").read_bytes() == b"second"
    assert stat.S_IMODE((dest / "etc/conf").stat().st_mode) == 0o600
    assert os.listxattr(dest / "etc/conf") == []


def test_file_replaced_by_directory(tmp_path: Path) -> None:
    dest = extract([file("x", b"file"), directory("x/"), file("x/y", b"y")], tmp_path)

    assert layers.tree(dest) == {"x": "dir", "x/y": "y"}


def test_directory_replaced_by_file(tmp_path: Path) -> None:
    dest = extract([directory("x"), file("x/y", b"y"), file("x", b"file")], tmp_path)

    assert layers.tree(dest) == {"x": "file"}


def test_repeated_directory_last_metadata_wins(tmp_path: Path) -> None:
    dest = extract(
        [directory("./d", mode=0o755, mtime=100, xattrs={"user.old": b"1"}),
         file("d/keep", b"k"),
         directory("d/", mode=0o700, mtime=200, uid=3, xattrs={"user.new": b"2"})],
        tmp_path,
    )
    status = (dest / "d").stat()

    assert stat.S_IMODE(status.st_mode) == 0o700
    assert status.st_mtime_ns == 200 * 10**9
    assert status.st_uid == 3
    assert os.listxattr(dest / "d") == ["user.new"]
    assert (dest / "d/keep").read_bytes() == b"k"


def test_replaced_name_keeps_hardlink_content(tmp_path: Path) -> None:
    dest = extract([file("t1", b"123\n"), hardlink("t2", "t1"), file("t1", b"456\n")], tmp_path)

    assert (dest / "t1").read_bytes() == b"456\n"
    assert (dest / "t2").read_bytes() == b"123\n"
    assert (dest / "t2").stat().st_nlink == 1


def test_symlink_replaced_by_file(tmp_path: Path) -> None:
    dest = extract([file("target", b"T"), symlink("l", "target"), file("l", b"L")], tmp_path)

    assert layers.tree(dest) == {"target": "T", "l": "L"}


# Whiteouts within one layer.


def test_whiteout_becomes_a_root_owned_device(tmp_path: Path) -> None:
    dest = extract([directory("etc", uid=9, gid=9), whiteout("etc/old.conf")], tmp_path)
    status = (dest / "etc/old.conf").lstat()

    assert is_whiteout_device(dest / "etc/old.conf")
    assert stat.S_IMODE(status.st_mode) == 0
    assert (status.st_uid, status.st_gid) == (0, 0)
    assert not (dest / "etc/.wh.old.conf").exists()


@pytest.mark.parametrize("marker_last", [False, True])
def test_opaque_marker_sets_the_xattr(tmp_path: Path, marker_last: bool) -> None:
    members = [directory("a"), file("a/new", b"n")]
    members.insert(len(members) if marker_last else 1, opaque("a"))
    dest = extract(members, tmp_path)

    assert opaque_flag(dest / "a") == b"y"
    assert layers.tree(dest) == {"a": "dir", "a/new": "n"}


def test_opaque_marker_alone_creates_the_directory(tmp_path: Path) -> None:
    dest = extract([opaque("var/cache")], tmp_path)

    assert opaque_flag(dest / "var/cache") == b"y"
    assert os.listdir(dest / "var/cache") == []


@pytest.mark.parametrize(
    "members",
    [
        [whiteout("x"), directory("x"), file("x/new", b"n")],
        [directory("x"), file("x/new", b"n"), whiteout("x")],
        [whiteout("x"), file("x/new", b"n")],
        [whiteout("x"), file("x", b"f"), directory("x"), file("x/new", b"n")],
    ],
    ids=["whiteout-first", "whiteout-last", "implicit-directory", "file-in-between"],
)
def test_whiteout_spares_own_directory(tmp_path: Path, members: list[Member]) -> None:
    dest = extract(members, tmp_path)

    assert layers.tree(dest) == {"x": "dir", "x/new": "n"}
    assert opaque_flag(dest / "x") == b"y"


def test_whiteout_spares_own_file(tmp_path: Path) -> None:
    dest = extract([file("x", b"mine"), whiteout("x")], tmp_path)

    assert layers.tree(dest) == {"x": "mine"}


def test_root_whiteout_and_aufs_metadata(tmp_path: Path) -> None:
    dest = extract(
        [whiteout("gone"), file(".wh..wh.plnk/1234.5", b"aufs"), file(".wh..wh.aufs", b""),
         opaque(".wh..wh.plnk"), file("d/.wh..wh.orph", b"")],
        tmp_path,
    )

    assert layers.tree(dest) == {"gone": "dev 0:0"}
    assert opaque_flag(dest) is None


@pytest.mark.parametrize("name", [".wh.", "d/.wh..", "d/.wh..."])
def test_whiteout_without_a_name_is_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafeLayerError) as caught:
        extract([file(name)], tmp_path)

    assert caught.value.digest == layers.LAYER_DIGEST


def test_opaque_marker_at_layer_root(tmp_path: Path) -> None:
    dest = extract([opaque("."), file("f", b"f")], tmp_path)

    assert opaque_flag(dest) == b"y"
    assert layers.tree(dest) == {"f": "f"}


# Corrupt or unsupported tar streams.


def corrupt(tar: bytes, offset: int, value: bytes) -> bytes:
    return tar[:offset] + value + tar[offset + len(value):]


def test_bad_header_checksum_is_rejected(tmp_path: Path) -> None:
    tar = corrupt(tar_bytes([file("a", b"a")], format=tarfile.USTAR_FORMAT), 0, b"b")

    with pytest.raises(IntegrityError, match="checksum"):
        unpack(tar, tmp_path / "layer")


@pytest.mark.parametrize("cut", [100, 512 + 10, 1536 + 3])
def test_truncated_tar_is_rejected(tmp_path: Path, cut: int) -> None:
    tar = tar_bytes([file("a", b"a" * 1000), file("b", b"b")], format=tarfile.USTAR_FORMAT)

    with pytest.raises(IntegrityError, match="invalid tar stream"):
        unpack(tar[:cut], tmp_path / "layer")


def test_sparse_file_is_unsupported(tmp_path: Path) -> None:
    info = tarfile.TarInfo("sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    tar = tar_bytes([(info, b"")], format=tarfile.GNU_FORMAT)

    with pytest.raises(UnsupportedError, match="sparse"):
        unpack(tar, tmp_path / "layer")


def test_pax_sparse_file_is_unsupported(tmp_path: Path) -> None:
    info, data = file("sparse", b"")
    info.pax_headers["GNU.sparse.major"] = "1"

    with pytest.raises(UnsupportedError, match="sparse"):
        unpack(tar_bytes([(info, data)]), tmp_path / "layer")


def test_malformed_pax_record_is_rejected(tmp_path: Path) -> None:
    info, data = file("a", b"")
    info.pax_headers["comment"] = "x"
    tar = tar_bytes([(info, data)])
    tar = tar.replace(b"comment=x", b"commentXx")

    with pytest.raises(IntegrityError, match="pax"):
        unpack(tar, tmp_path / "layer")


def test_failed_unpack_stops_reading_the_source(tmp_path: Path) -> None:
    files = [file(f"f{i}", os.urandom(50_000)) for i in range(99)]
    tar = tar_bytes([file("../evil", b"x"), *files])
    source = layers.TrickleReader(tar, 4096)

    with pytest.raises(UnsafeLayerError):
        layers.unpack_layer(source, "none", str(tmp_path), layer_digest=layers.LAYER_DIGEST)
    position = source.tell()
    time.sleep(0.3)

    assert source.tell() == position
    assert position < len(tar)
    assert "lstore-unpack-read" not in [thread.name for thread in threading.enumerate()]
