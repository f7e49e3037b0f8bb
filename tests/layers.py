"""Builders of test layers (tar streams made with tarfile) and helpers to unpack and mount them."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import struct
import subprocess
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from lstore.store.unpack import UnpackResult, unpack_layer

MTIME = 1_600_000_000
LAYER_DIGEST = "sha256:" + "ab" * 32

Member = tuple[tarfile.TarInfo, bytes]


@pytest.fixture
def needs_root() -> None:
    """Fail, never skip, when the suite runs without the root rights unpacking needs."""
    if os.geteuid() != 0:
        pytest.fail("unpack tests need root: they chown, mknod and set trusted.* xattrs")


def _info(name: str, kind: bytes, mode: int, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = MTIME
    xattrs = fields.pop("xattrs", None) or {}
    for key, value in fields.items():
        setattr(info, key, value)
    # tarfile writes a str pax value back to the same bytes with surrogateescape, so binary
    # xattr values such as security.capability survive the round trip.
    for key, raw in xattrs.items():  # type: ignore[union-attr]
        info.pax_headers["SCHILY.xattr." + key] = raw.decode("utf-8", "surrogateescape")
    return info


def file(name: str, data: bytes = b"", mode: int = 0o644, **fields: object) -> Member:
    info = _info(name, tarfile.REGTYPE, mode, **fields)
    info.size = len(data)
    return info, data


def directory(name: str, mode: int = 0o755, **fields: object) -> Member:
    return _info(name, tarfile.DIRTYPE, mode, **fields), b""


def symlink(name: str, target: str, **fields: object) -> Member:
    return _info(name, tarfile.SYMTYPE, 0o777, linkname=target, **fields), b""


def hardlink(name: str, target: str) -> Member:
    return _info(name, tarfile.LNKTYPE, 0o644, linkname=target), b""


def device(name: str, kind: bytes, major: int, minor: int, mode: int = 0o660) -> Member:
    return _info(name, kind, mode, devmajor=major, devminor=minor), b""


def fifo(name: str, mode: int = 0o640) -> Member:
    return _info(name, tarfile.FIFOTYPE, mode), b""


def whiteout(name: str) -> Member:
    """The OCI whiteout entry that deletes `name` of the lower layers."""
    parent, _, leaf = name.rpartition("/")
    return file(f"{parent}/.wh.{leaf}" if parent else f".wh.{leaf}")


def opaque(directory_name: str) -> Member:
    """The OCI opaque marker that hides the lower layers' contents of a directory."""
    return file(f"{directory_name}/.wh..wh..opq")


def tar_bytes(members: Sequence[Member], format: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def gzip_member(
    data: bytes, *, name: bytes | None = None, extra: bytes | None = None, header_crc: bool = False
) -> bytes:
    """Build one gzip member (RFC 1952) by hand, with the optional header fields asked for."""
    flags = 0
    if header_crc:
        flags |= 0x02
    if extra is not None:
        flags |= 0x04
    if name is not None:
        flags |= 0x08
    header = b"\x1f\x8b\x08" + bytes([flags]) + struct.pack("<I", MTIME) + b"\x00\xff"
    if extra is not None:
        header += struct.pack("<H", len(extra)) + extra
    if name is not None:
        header += name + b"\x00"
    if header_crc:
        header += struct.pack("<H", zlib.crc32(header) & 0xFFFF)

    deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = deflater.compress(data) + deflater.flush()
    return header + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class TrickleReader(io.RawIOBase):
    """A source that returns at most `step` bytes per read, like a download in progress."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._position = 0
        self._step = step

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        size = self._step if size < 0 else min(size, self._step)
        chunk = self._data[self._position : self._position + size].tobytes()
        self._position += len(chunk)
        return chunk


def unpack(
    blob: bytes,
    dest: Path,
    compression: str = "none",
    expected_diff_id: str | None = None,
) -> UnpackResult:
    dest.mkdir(parents=True, exist_ok=True)
    return unpack_layer(
        io.BytesIO(blob),
        compression,
        str(dest),
        layer_digest=LAYER_DIGEST,
        expected_diff_id=expected_diff_id,
    )


def unpack_layers(layers: Sequence[Sequence[Member]], root: Path) -> list[Path]:
    """Unpack each layer into root/<index>; returns the directories, bottom layer first."""
    dirs = []
    for index, members in enumerate(layers):
        dest = root / str(index)
        unpack(tar_bytes(members), dest)
        dirs.append(dest)
    return dirs


@contextlib.contextmanager
def overlay(layer_dirs: Sequence[Path], mountpoint: Path) -> Iterator[Path]:
    """Mount the layers read-only as OverlayFS, bottom layer first, and unmount afterwards."""
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.fail("mount and umount (util-linux) are needed for overlay tests")
    # Overlay needs two lower directories when it has no upper one; an empty bottom changes
    # nothing in the merged view.
    bottom = mountpoint.parent / (mountpoint.name + "-empty")
    bottom.mkdir()
    lowers = ":".join(str(path) for path in [*reversed(layer_dirs), bottom])
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lowers}", str(mountpoint)],
        check=True,
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def tree(root: Path) -> dict[str, str]:
    """Describe every node below `root`: file contents, "dir", "-> target" or "dev M:m"."""
    found: dict[str, str] = {}
    for current, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(current, name)
            found[str(path.relative_to(root))] = _describe(path)
    return found


def _describe(path: Path) -> str:
    status = path.lstat()
    if path.is_symlink():
        return "-> " + os.readlink(path)
    if path.is_dir():
        return "dir"
    if path.is_file():
        return path.read_text(errors="backslashreplace")
    return f"dev {os.major(status.st_rdev)}:{os.minor(status.st_rdev)}"
