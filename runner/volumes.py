"""Volumes and tmpfs mounts of a container, returned as OCI runtime-spec mounts.

Named volumes live in ROOT/volumes/<name>/_data and are recorded in the LMDB `volumes`
database as {name, path, created, populated, anonymous}. On the first mount of a volume, the
image's content at the mount destination is copied into it with owners, modes, times,
xattrs and hard links kept. Unlike docker, which copies into any empty volume, later mounts
never copy again, even into an emptied volume. Bind mounts take an existing host path.
Tmpfs mounts default to nosuid,nodev,noexec.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from lstore.errors import InvalidArgumentError, NotFoundError, StoreError
from lstore.store.meta import Meta

log = logging.getLogger(__name__)

# docker's rule for local volume names: a letter or digit, then letters, digits, _ . -
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]+")
DATA_DIR = "_data"
MAX_SYMLINK_HOPS = 40  # the kernel's limit for one path lookup (ELOOP)

_VOLUME_OPTIONS = {"ro", "rw", "nocopy", "shared", "rshared", "slave", "rslave", "private",
                   "rprivate"}  # fmt: skip
_TMPFS_FLAGS = {"ro", "rw", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "sync",
                "async", "atime", "noatime", "relatime", "strictatime", "diratime",
                "nodiratime"}  # fmt: skip
_TMPFS_KEYS = {"size", "mode", "uid", "gid", "nr_inodes", "nr_blocks", "huge", "mpol"}
TMPFS_DEFAULTS = ("nosuid", "nodev", "noexec")
_OPPOSITE = {"nosuid": "suid", "nodev": "dev", "noexec": "exec"}
_OVERLAY_OPAQUE = ("trusted.overlay.opaque", "user.overlay.opaque")


@dataclass(frozen=True)
class VolumeSpec:
    """One parsed `-v` value. `source` is a host path (bind), a name, or None (anonymous)."""

    kind: str  # "bind" or "volume"
    source: str | None
    destination: str
    options: tuple[str, ...]

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


# ---------------------------------------------------------------------------- parsing


def _destination(path: str, spec: str) -> str:
    if not path.startswith("/"):
        raise InvalidArgumentError(f"invalid mount {spec!r}: the container path must be absolute")
    normalized = os.path.normpath(path)
    if normalized == "/":
        raise InvalidArgumentError(f"invalid mount {spec!r}: cannot mount over /")
    return normalized


def parse_volume(spec: str) -> VolumeSpec:
    """Parse `-v name:/path[:opts]`, `-v /host:/path[:opts]` or `-v /path` (anonymous)."""
    parts = spec.split(":")
    if len(parts) == 1:
        return VolumeSpec("volume", None, _destination(parts[0], spec), ())
    if len(parts) > 3:
        raise InvalidArgumentError(f"invalid volume {spec!r}: expected SOURCE:/PATH[:ro]")

    source, destination = parts[0], _destination(parts[1], spec)
    options = tuple(parts[2].split(",")) if len(parts) == 3 else ()
    unknown = [o for o in options if o not in _VOLUME_OPTIONS]
    if unknown or ("ro" in options and "rw" in options):
        raise InvalidArgumentError(
            f"invalid volume option {','.join(unknown) or 'ro,rw'} in {spec!r}: use ro or rw"
        )
    if source.startswith("/"):
        return VolumeSpec("bind", source, destination, options)
    if not _VOLUME_NAME.fullmatch(source):
        raise InvalidArgumentError(
            f"invalid volume name {source!r} in {spec!r}: use letters, digits, _ . - "
            "(2 characters or more), or an absolute host path for a bind mount"
        )
    return VolumeSpec("volume", source, destination, options)


def parse_tmpfs(spec: str) -> dict[str, Any]:
    """Parse `--tmpfs /path[:opts]` into an OCI tmpfs mount with the default options."""
    path, _, text = spec.partition(":")
    options = [o for o in text.split(",") if o]
    for option in options:
        key = option.split("=", 1)[0]
        if option not in _TMPFS_FLAGS and ("=" not in option or key not in _TMPFS_KEYS):
            raise InvalidArgumentError(f"invalid tmpfs option {option!r} in --tmpfs {spec!r}")

    defaults = [d for d in TMPFS_DEFAULTS if d not in options and _OPPOSITE[d] not in options]
    return {
        "destination": _destination(path, spec),
        "type": "tmpfs",
        "source": "tmpfs",
        "options": defaults + options,
    }


# ---------------------------------------------------------------------------- mounts


def prepare_mounts(
    meta: Meta,
    volumes_dir: str,
    specs: list[str],
    tmpfs: list[str],
    image_rootfs: str | list[str],
    owner: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Return the OCI mounts for `-v` and `--tmpfs` values, creating and filling volumes.

    `image_rootfs` is the container's merged root directory, or the image's layer
    directories (bottom layer first), read with overlay whiteout and opaque rules. A
    volume created here gets `owner` (uid, gid) for its _data directory, as a --userns
    container needs; bind mount sources stay as they are. A missing bind source raises
    NotFoundError; a destination used twice raises InvalidArgumentError. Volumes created
    before an error stay, as docker keeps them.
    """
    parsed = [parse_volume(spec) for spec in specs]
    tmpfs_mounts = [parse_tmpfs(spec) for spec in tmpfs]
    _check_unique([v.destination for v in parsed] + [t["destination"] for t in tmpfs_mounts])

    mounts = []
    for volume in parsed:
        if volume.kind == "bind":
            mounts.append(_bind_mount(volume))
        else:
            mounts.append(_volume_mount(meta, volumes_dir, volume, image_rootfs, owner))
    return mounts + tmpfs_mounts


def _check_unique(destinations: list[str]) -> None:
    counts = collections.Counter(destinations)
    duplicates = sorted(d for d, n in counts.items() if n > 1)
    if duplicates:
        raise InvalidArgumentError(f"duplicate mount point {duplicates[0]}")


def _mount_options(volume: VolumeSpec) -> list[str]:
    propagation = [o for o in volume.options if o not in ("ro", "rw", "nocopy")]
    return ["rbind", "ro" if volume.readonly else "rw", *propagation]


def _bind_mount(volume: VolumeSpec) -> dict[str, Any]:
    assert volume.source is not None
    if not os.path.exists(volume.source):
        raise NotFoundError(
            f"bind mount source {volume.source} does not exist; create it or fix the path",
            path=volume.source,
        )
    return {
        "destination": volume.destination,
        "type": "bind",
        "source": volume.source,
        "options": _mount_options(volume),
    }


def _volume_mount(
    meta: Meta,
    volumes_dir: str,
    volume: VolumeSpec,
    image_rootfs: str | list[str],
    owner: tuple[int, int] | None,
) -> dict[str, Any]:
    name = volume.source or secrets.token_hex(32)
    fill_from = None if "nocopy" in volume.options else (image_rootfs, volume.destination)
    data = ensure_volume(meta, volumes_dir, name, anonymous=volume.source is None,
                         fill_from=fill_from, owner=owner)  # fmt: skip
    return {
        "destination": volume.destination,
        "type": "bind",
        "source": data,
        "options": _mount_options(volume),
    }


# ---------------------------------------------------------------------------- volumes


@contextlib.contextmanager
def _volume_lock(volume_dir: str) -> Iterator[None]:
    # One process at a time creates or fills a volume; the lock is the directory itself.
    fd = os.open(volume_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_volume(
    meta: Meta,
    volumes_dir: str,
    name: str,
    *,
    anonymous: bool = False,
    fill_from: tuple[str | list[str], str] | None = None,
    owner: tuple[int, int] | None = None,
) -> str:
    """Create volume `name` unless it exists, fill it on first use, return its _data path.

    `fill_from` is (image rootfs, path in the image). The fill is copied into a temporary
    directory and renamed over the empty _data, so a crash never leaves a half-filled
    volume marked as filled. `owner` (uid, gid) gets the _data directory of a volume
    created by this call; the fill then copies the image directory's owner over it.
    Safe to run concurrently: a lock on the volume directory serializes creation and
    filling.
    """
    if not _VOLUME_NAME.fullmatch(name):
        raise InvalidArgumentError(f"invalid volume name {name!r}: use letters, digits, _ . -")
    volume_dir = os.path.join(volumes_dir, name)
    data = os.path.join(volume_dir, DATA_DIR)
    os.makedirs(data, exist_ok=True)

    with _volume_lock(volume_dir):
        record = _read_record(meta, name)
        if record is None:
            record = _new_record(name, data, anonymous)
            if owner is not None:
                os.chown(data, *owner)
        if not record["populated"] and fill_from is not None:
            _fill(volume_dir, data, *fill_from)
        record["populated"] = record["populated"] or fill_from is not None
        with meta.write() as txn:
            txn.put("volumes", name, record)
    return data


def _read_record(meta: Meta, name: str) -> dict[str, Any] | None:
    with meta.read() as txn:
        return txn.get("volumes", name)


def _new_record(name: str, data: str, anonymous: bool) -> dict[str, Any]:
    log.info("creating volume %s", name)
    return {"name": name, "path": data, "created": time.time(), "populated": False,
            "anonymous": anonymous}  # fmt: skip


def list_volumes(meta: Meta) -> list[dict[str, Any]]:
    """Return every volume record, sorted by name."""
    with meta.read() as txn:
        return [record for _name, record in txn.items("volumes")]


def remove_volume(meta: Meta, volumes_dir: str, name: str, in_use: Collection[str] = ()) -> None:
    """Delete volume `name` and its data.

    Raises InvalidArgumentError when `name` is in `in_use` (the volumes that existing
    containers mount) and NotFoundError when it does not exist. The files go before the
    record, so an interrupted removal can be repeated.
    """
    if name in in_use:
        raise InvalidArgumentError(
            f"volume {name} is in use by a container; remove the container first"
        )
    if _read_record(meta, name) is None:
        raise NotFoundError(f"volume {name} not found")

    volume_dir = os.path.join(volumes_dir, name)
    if os.path.lexists(volume_dir):
        shutil.rmtree(volume_dir)
    with meta.write() as txn:
        txn.delete("volumes", name)
    log.info("removed volume %s", name)


# ---------------------------------------------------------------------------- filling


def _fill(volume_dir: str, data: str, image_rootfs: str | list[str], path: str) -> None:
    layered = isinstance(image_rootfs, list)
    layers = list(reversed(image_rootfs)) if layered else [image_rootfs]
    sources = _resolve_dir(layers, path, layered)
    if not sources:
        return  # nothing at `path` in the image: the volume starts empty
    if os.listdir(data):
        log.info("volume %s is not empty; image content at %s not copied", data, path)
        return

    staging = os.path.join(volume_dir, f"_fill.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.mkdir(staging)
    for source in reversed(sources):  # bottom layer first, upper layers replace entries
        _copy_dir(source, staging, layered, {})
    _copy_metadata(sources[0], staging)
    os.rename(staging, data)  # rename(2) may replace an empty directory
    log.info("filled volume %s from the image's %s", data, path)


def _is_whiteout(st: os.stat_result) -> bool:
    # overlayfs marks a deleted entry of lower layers with a 0:0 character device.
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: str) -> bool:
    for name in _OVERLAY_OPAQUE:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _lookup(dirs: list[str], part: str, layered: bool) -> list[str]:
    """Return the entries named `part` in `dirs` (topmost first) that form the merged entry.

    A non-directory hides everything below it, and so does a whiteout or an opaque dir.
    """
    found: list[str] = []
    for directory in dirs:
        candidate = os.path.join(directory, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            continue
        if layered and _is_whiteout(st):
            break
        if not stat.S_ISDIR(st.st_mode):
            if not found:
                found.append(candidate)
            break
        found.append(candidate)
        if layered and _is_opaque(candidate):
            break
    return found


def _resolve_dir(layers: list[str], path: str, layered: bool) -> list[str]:
    """Return the layer directories (topmost first) whose merge is `path` in the image.

    Symlinks resolve inside the image root, as they would inside the container, so an
    image link can never reach a host file. Returns [] when `path` is not a directory.
    """
    pending = collections.deque(p for p in path.split("/") if p)
    resolved: list[str] = []
    current, hops = list(layers), 0
    while pending:
        part = pending.popleft()
        if part in ("", "."):
            continue
        if part == "..":
            resolved = resolved[:-1]
            current = _walk(layers, resolved, layered)
            continue
        entries = _lookup(current, part, layered)
        if not entries:
            return []
        if os.path.islink(entries[0]):
            hops += 1
            if hops > MAX_SYMLINK_HOPS:
                raise InvalidArgumentError(f"too many symbolic links in image path {path}")
            target = os.readlink(entries[0])
            if target.startswith("/"):
                resolved = []
            pending.extendleft(reversed(target.split("/")))
            current = _walk(layers, resolved, layered)
            continue
        if not os.path.isdir(entries[0]):
            return []
        resolved.append(part)
        current = entries
    return current


def _walk(layers: list[str], parts: list[str], layered: bool) -> list[str]:
    current = list(layers)
    for part in parts:
        current = _lookup(current, part, layered)
    return current


def _copy_dir(source: str, dest: str, layered: bool, links: dict[tuple[int, int], str]) -> None:
    """Copy the entries of `source` into the existing directory `dest`.

    In layered mode, whiteouts delete the entry below and opaque directories replace the
    directory below instead of merging with it. `links` maps (device, inode) to the first
    copy, so hard links inside one source stay hard links.
    """
    with os.scandir(source) as entries:
        for entry in entries:
            target = os.path.join(dest, entry.name)
            st = entry.stat(follow_symlinks=False)
            if layered and _is_whiteout(st):
                _remove(target)
                continue
            if stat.S_ISDIR(st.st_mode):
                if (
                    not os.path.isdir(target)
                    or os.path.islink(target)
                    or (layered and _is_opaque(entry.path))
                ):
                    _remove(target)
                    os.mkdir(target)
                _copy_dir(entry.path, target, layered, links)
                _copy_metadata(entry.path, target)
                continue
            _remove(target)
            _copy_entry(entry.path, target, st, links)


def _remove(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _copy_entry(
    source: str, target: str, st: os.stat_result, links: dict[tuple[int, int], str]
) -> None:
    key = (st.st_dev, st.st_ino)
    if st.st_nlink > 1 and key in links:
        os.link(links[key], target)
        return
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(source), target)
    elif stat.S_ISREG(st.st_mode):
        shutil.copyfile(source, target, follow_symlinks=False)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        os.mknod(target, st.st_mode, st.st_rdev)
    else:
        log.debug("not copying socket %s into a volume", source)
        return
    _copy_metadata(source, target)
    if st.st_nlink > 1:
        links[key] = target


def _copy_metadata(source: str, target: str) -> None:
    """Copy owner, mode, xattrs and times; overlay's own xattrs are not copied."""
    st = os.lstat(source)
    os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(target, stat.S_IMODE(st.st_mode))  # after chown, which clears setuid bits
    _copy_xattrs(source, target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_xattrs(source: str, target: str) -> None:
    try:
        names = os.listxattr(source, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise StoreError(f"failed to read xattrs of {source}: {exc.strerror}", path=source) from exc
    for name in names:
        if name.startswith(("trusted.overlay.", "user.overlay.")):
            continue
        value = os.getxattr(source, name, follow_symlinks=False)
        try:
            os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as exc:
            log.warning("xattr %s of %s not copied into the volume: %s", name, source, exc)
