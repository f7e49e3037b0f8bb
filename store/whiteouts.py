"""Conversion of the OCI whiteouts of one layer into OverlayFS whiteouts.

OCI image-spec layer.md ("Whiteouts"): an entry `.wh.NAME` deletes NAME of the lower layers,
and an entry `DIR/.wh..wh..opq` hides everything the lower layers have in DIR. OverlayFS
(Documentation/filesystems/overlayfs.rst in the kernel) expresses these as a character device
0:0 named NAME and as the xattr trusted.overlay.opaque=y on DIR.

A whiteout hides the lower layers only, never entries of its own layer, and its position in
the tar does not matter. So `.wh.x` next to a directory `x/` of the same layer, before or
after it, leaves that directory with its new contents and marks it opaque, so that the lower
`x` stays hidden. Next to a non-directory `x` of the same layer nothing more is needed: in an
upper layer any non-directory hides the lower `x` already.
"""

from __future__ import annotations

import logging
import os
import stat

from lstore.errors import UnsafeLayerError
from lstore.store.safepath import Path, SnapshotRoot, display, make_directory

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"

# Other `.wh..wh.` names (.wh..wh.plnk, .wh..wh.aufs) are AUFS bookkeeping of old Docker
# versions, not files of the image. Docker skips them, and the files below them.
# NOTE: Docker also resolves hardlinks into /.wh..wh.plnk; here such hardlinks are rejected.
_AUFS_METADATA_PREFIX = b".wh..wh."

OPAQUE_XATTR = "trusted.overlay.opaque"

# Xattrs through which overlayfs reads its own state. Layer entries may not set them, because
# only whiteout entries may hide lower content (and redirect xattrs could point elsewhere).
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


def is_whiteout(path: Path) -> bool:
    """Tell whether `path` may be a whiteout, an opaque marker or AUFS metadata."""
    return path[-1].startswith(WHITEOUT_PREFIX) or path[0].startswith(_AUFS_METADATA_PREFIX)


def _is_aufs_metadata(path: Path) -> bool:
    ends = (path[0], path[-1])
    return any(part.startswith(_AUFS_METADATA_PREFIX) and part != OPAQUE_MARKER for part in ends)


def node_path(parent_fd: int, name: bytes) -> bytes:
    """Return a path that reaches `name` in the directory `parent_fd` without a lookup by name
    of the parents, for calls that have no *at() form (setxattr, listxattr)."""
    return b"/proc/self/fd/%d/%s" % (parent_fd, name)


class Whiteouts:
    """The whiteouts of one layer being extracted into `root`.

    Not thread-safe; one instance per layer. It also serves as the DirectoryHooks of `root`.
    """

    def __init__(self, layer_digest: str) -> None:
        self._layer_digest = layer_digest
        self._root: SnapshotRoot | None = None
        self._deleted: set[Path] = set()
        self._opaque: set[Path] = set()

    def attach(self, root: SnapshotRoot) -> None:
        self._root = root

    def apply(self, path: Path) -> None:
        """Apply the entry at `path`, for which `is_whiteout` is true."""
        name = path[-1]
        if _is_aufs_metadata(path):
            log.debug("layer %s: skipped AUFS metadata %s", self._layer_digest, display(path))
        elif name == OPAQUE_MARKER:
            self._mark_opaque(path[:-1])
        else:
            self._delete(path, path[:-1] + (name[len(WHITEOUT_PREFIX) :],))

    def is_deleted(self, path: Path) -> bool:
        """Tell whether this layer has a whiteout for `path`."""
        return path in self._deleted

    def directory_created(self, parent_fd: int, name: bytes, path: Path) -> None:
        if path in self._deleted or path in self._opaque:
            os.setxattr(node_path(parent_fd, name), OPAQUE_XATTR, b"y", follow_symlinks=False)

    def replace_with_directory(self, parent_fd: int, name: bytes, path: Path) -> bool:
        """Replace this layer's whiteout device at `path` by an opaque directory."""
        if path not in self._deleted:
            return False
        if not _is_whiteout_device(os.stat(name, dir_fd=parent_fd, follow_symlinks=False)):
            return False
        os.unlink(name, dir_fd=parent_fd)
        make_directory(parent_fd, name)
        self.directory_created(parent_fd, name, path)
        return True

    def _delete(self, entry: Path, target: Path) -> None:
        if target[-1] in (b"", b".", b".."):
            raise UnsafeLayerError(
                f"layer {self._layer_digest}: whiteout {display(entry)!r} names no valid "
                "file; the layer is hostile or corrupt",
                digest=self._layer_digest,
                entry=display(entry),
            )
        self._deleted.add(target)
        parent = self._require_root().parent_fd(target)
        name = target[-1]

        try:
            mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
        except FileNotFoundError:
            _make_whiteout_device(parent, name)
            return
        if stat.S_ISDIR(mode):
            self.directory_created(parent, name, target)

    def _mark_opaque(self, directory: Path) -> None:
        self._opaque.add(directory)
        fd = self._require_root().directory_fd(directory)
        os.setxattr(f"/proc/self/fd/{fd}", OPAQUE_XATTR, b"y")

    def _require_root(self) -> SnapshotRoot:
        if self._root is None:
            raise RuntimeError("Whiteouts.attach() was not called")
        return self._root


def _make_whiteout_device(parent_fd: int, name: bytes) -> None:
    os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent_fd)
    os.chown(name, 0, 0, dir_fd=parent_fd, follow_symlinks=False)


def _is_whiteout_device(status: os.stat_result) -> bool:
    return stat.S_ISCHR(status.st_mode) and status.st_rdev == 0
