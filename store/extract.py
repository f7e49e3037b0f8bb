"""Creation of the files, directories, links and devices of one layer in its snapshot.

Every entry goes through `SnapshotRoot`, so no path is ever resolved through a symlink, and
through `Whiteouts` when its name is a whiteout. Files are created with O_EXCL | O_NOFOLLOW
relative to their parent's fd, written with os.write and given their metadata through the
same fd.

Duplicate paths: the last entry wins, as in containerd and GNU tar. An existing node is
removed before the new entry is created, so content and metadata always come from one entry,
and other hardlinks of a replaced file keep the old content. The exception is a directory
listed again as a directory: its contents stay and its metadata (owner, mode, mtime, xattrs)
is replaced by the new entry's.

Metadata is applied in this order: owner, then mode (chown clears setuid and setgid), then
xattrs (chown clears security.capability), then mtime. Directory mtimes are set after the
whole layer, because creating their contents changes them.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from collections.abc import Callable
from typing import TypeVar

from lstore.errors import StoreError, UnsafeLayerError, UnsupportedError
from lstore.store import tarstream
from lstore.store.safepath import Path, SnapshotRoot, display, split_name
from lstore.store.tarstream import TarEntry, TarReader
from lstore.store.whiteouts import OVERLAY_XATTR_PREFIXES, Whiteouts, is_whiteout, node_path

log = logging.getLogger(__name__)

_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# The layer root gets this mode, as containerd's and Docker's snapshot directories have it.
# A tar entry for the root itself ("./" or "/") is ignored, as both of them ignore it.
ROOT_MODE = 0o755

# xattr errors that mean the filesystem or the caller cannot store that xattr. Docker and
# containerd log these and go on rather than fail the pull.
_XATTR_SKIPPED_ERRORS = (errno.ENOTSUP, errno.EPERM)

_T = TypeVar("_T")


class LayerExtractor:
    """Extracts the entries of one tar stream into an empty snapshot directory.

    Not atomic: on error the directory contains part of the layer, and the caller removes it.
    Not thread-safe; use one instance per layer.
    """

    def __init__(self, dest: str, layer_digest: str) -> None:
        self._layer_digest = layer_digest
        self._whiteouts = Whiteouts(layer_digest)
        self._root = SnapshotRoot(dest, layer_digest, self._whiteouts)
        self._whiteouts.attach(self._root)
        self._dir_mtimes: dict[Path, int] = {}
        self._warned: set[str] = set()
        self._handlers: dict[bytes, Callable[[TarEntry, Path, TarReader], None]] = {
            tarstream.REGULAR: self._regular,
            tarstream.DIRECTORY: self._directory,
            tarstream.SYMLINK: self._symlink,
            tarstream.LINK: self._hardlink,
            tarstream.CHAR_DEVICE: self._device,
            tarstream.BLOCK_DEVICE: self._device,
            tarstream.FIFO: self._fifo,
        }

    def extract(self, reader: TarReader) -> int:
        """Extract every entry of `reader`, then set directory mtimes; returns the count."""
        os.chmod(self._root.path, ROOT_MODE)
        count = 0
        for entry in reader.entries():
            try:
                self._extract_entry(entry, reader)
            except OSError as error:
                raise self._os_error(entry, error) from error
            count += 1
            self._root.trim()
        self._set_directory_mtimes()
        return count

    def close(self) -> None:
        self._root.close()

    def __enter__(self) -> "LayerExtractor":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _extract_entry(self, entry: TarEntry, reader: TarReader) -> None:
        path = split_name(entry.name, self._layer_digest)
        if not path:
            log.debug("layer %s: ignored the entry for the layer root", self._layer_digest)
            return
        if is_whiteout(path):
            self._whiteouts.apply(path)
            return

        handler = self._handlers.get(entry.type)
        if handler is None:
            raise UnsupportedError(
                f"layer {self._layer_digest}: entry {entry.display_name!r} has tar type "
                f"{entry.type!r}, which lstore does not extract",
                digest=self._layer_digest,
            )
        self._dir_mtimes.pop(path, None)
        handler(entry, path, reader)

    # Entry types.

    def _regular(self, entry: TarEntry, path: Path, reader: TarReader) -> None:
        parent = self._root.parent_fd(path)
        name = path[-1]
        try:
            fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=parent)
        except FileExistsError:
            self._remove(parent, path)
            fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=parent)
        try:
            for view in reader.data():
                _write_all(fd, view)

            os.fchown(fd, entry.uid, entry.gid)
            os.fchmod(fd, stat.S_IMODE(entry.mode))
            self._set_xattrs(fd, entry)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(fd)

    def _directory(self, entry: TarEntry, path: Path, reader: TarReader) -> None:
        parent = self._root.parent_fd(path)
        name = path[-1]
        try:
            os.mkdir(name, 0o700, dir_fd=parent)
            self._whiteouts.directory_created(parent, name, path)
        except FileExistsError:
            self._reuse_or_replace_directory(parent, path, entry)

        self._set_node_metadata(parent, name, entry, set_mtime=False)
        self._dir_mtimes[path] = entry.mtime_ns

    def _symlink(self, entry: TarEntry, path: Path, reader: TarReader) -> None:
        parent = self._root.parent_fd(path)
        name = path[-1]
        self._create(parent, path, lambda: os.symlink(entry.linkname, name, dir_fd=parent))

        os.chown(name, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
        self._set_xattrs(node_path(parent, name), entry)
        os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _hardlink(self, entry: TarEntry, path: Path, reader: TarReader) -> None:
        """Link `path` to an earlier entry, resolved inside the layer root like every name.

        The inode keeps the metadata of the entry that created it, as in GNU tar.
        """
        target = self._hardlink_target(entry, path)
        source_parent = self._root.parent_fd(target, create=False)
        parent = self._root.parent_fd(path)
        name = path[-1]
        self._create(
            parent,
            path,
            lambda: os.link(
                target[-1],
                name,
                src_dir_fd=source_parent,
                dst_dir_fd=parent,
                follow_symlinks=False,
            ),
        )

    def _device(self, entry: TarEntry, path: Path, reader: TarReader) -> None:
        parent = self._root.parent_fd(path)
        name = path[-1]
        kind = stat.S_IFCHR if entry.type == tarstream.CHAR_DEVICE else stat.S_IFBLK
        device = os.makedev(entry.devmajor, entry.devminor)
        self._create(parent, path, lambda: os.mknod(name, kind | 0o600, device, dir_fd=parent))
        self._set_node_metadata(parent, name, entry)

    def _fifo(self, entry: TarEntry, path: Path, reader: TarReader) -> None:
        parent = self._root.parent_fd(path)
        name = path[-1]
        self._create(parent, path, lambda: os.mkfifo(name, 0o600, dir_fd=parent))
        self._set_node_metadata(parent, name, entry)

    # Replacement of existing nodes.

    def _create(self, parent: int, path: Path, make: Callable[[], _T]) -> _T:
        """Run `make`; if the name exists, remove the existing node and run it again."""
        try:
            return make()
        except FileExistsError:
            self._remove(parent, path)
        return make()

    def _remove(self, parent: int, path: Path) -> None:
        name = path[-1]
        if stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            shutil.rmtree(name, dir_fd=parent)
            self._root.forget(path)
            self._forget_directory_mtimes(path)
        else:
            os.unlink(name, dir_fd=parent)

    def _reuse_or_replace_directory(self, parent: int, path: Path, entry: TarEntry) -> None:
        name = path[-1]
        if not stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
            os.unlink(name, dir_fd=parent)
            os.mkdir(name, 0o700, dir_fd=parent)
            self._whiteouts.directory_created(parent, name, path)
            return

        # The last entry wins: xattrs of an earlier entry for this directory go, except the
        # overlay ones that whiteouts of this layer set.
        node = node_path(parent, name)
        for key in os.listxattr(node, follow_symlinks=False):
            if key not in entry.xattrs and not key.startswith(OVERLAY_XATTR_PREFIXES):
                os.removexattr(node, key, follow_symlinks=False)

    def _forget_directory_mtimes(self, path: Path) -> None:
        size = len(path)
        for key in [key for key in self._dir_mtimes if key[:size] == path]:
            del self._dir_mtimes[key]

    # Metadata.

    def _set_node_metadata(
        self, parent: int, name: bytes, entry: TarEntry, set_mtime: bool = True
    ) -> None:
        """Set owner, mode, xattrs and mtime of a directory, device or fifo just made.

        chmod follows a symlink at `name`, which is safe because the node there is the one
        just created or checked to be a directory.
        """
        os.chown(name, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
        os.chmod(name, stat.S_IMODE(entry.mode), dir_fd=parent)
        self._set_xattrs(node_path(parent, name), entry)
        if set_mtime:
            times = (entry.mtime_ns, entry.mtime_ns)
            os.utime(name, ns=times, dir_fd=parent, follow_symlinks=False)

    def _set_xattrs(self, target: int | bytes, entry: TarEntry) -> None:
        """Set the entry's pax xattrs on an open fd or, without following symlinks, a path."""
        for key, value in entry.xattrs.items():
            if key.startswith(OVERLAY_XATTR_PREFIXES):
                self._warn_once(f"skipped xattr {key}: layer entries may not set overlay state")
                continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as error:
                if error.errno not in _XATTR_SKIPPED_ERRORS:
                    raise
                self._warn_once(f"could not set xattr {key} ({error.strerror})")

    def _set_directory_mtimes(self) -> None:
        for path, mtime_ns in self._dir_mtimes.items():
            parent = self._root.parent_fd(path, create=False)
            os.utime(path[-1], ns=(mtime_ns, mtime_ns), dir_fd=parent, follow_symlinks=False)

    # Checks and errors.

    def _hardlink_target(self, entry: TarEntry, path: Path) -> Path:
        try:
            target = split_name(entry.linkname, self._layer_digest)
        except UnsafeLayerError:
            raise self._bad_hardlink(entry, "points outside the layer root") from None
        if not target or target == path:
            raise self._bad_hardlink(entry, "is not a file")

        try:
            parent = self._root.parent_fd(target, create=False)
            status = os.stat(target[-1], dir_fd=parent, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            raise self._bad_hardlink(entry, "is not an earlier entry of this layer") from None
        except UnsafeLayerError:
            raise self._bad_hardlink(entry, "lies below a symlink or a non-directory") from None
        if stat.S_ISDIR(status.st_mode):
            raise self._bad_hardlink(entry, "is a directory")
        if self._whiteouts.is_deleted(target) and stat.S_ISCHR(status.st_mode):
            raise self._bad_hardlink(entry, "was deleted by a whiteout of this layer")
        return target

    def _bad_hardlink(self, entry: TarEntry, reason: str) -> UnsafeLayerError:
        return UnsafeLayerError(
            f"layer {self._layer_digest}: hardlink {entry.display_name!r} rejected: its "
            f"target {display(entry.linkname)!r} {reason}; the layer is hostile or corrupt",
            digest=self._layer_digest,
            entry=entry.display_name,
        )

    def _os_error(self, entry: TarEntry, error: OSError) -> StoreError:
        return StoreError(
            f"layer {self._layer_digest}: cannot extract {entry.display_name!r} into "
            f"{self._root.path}: {error.strerror or error}",
            digest=self._layer_digest,
            path=self._root.path,
        )

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("layer %s: %s", self._layer_digest, message)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]
