"""Confinement of every path of a layer to its snapshot directory.

Each entry name and hardlink target goes through `split_name`, and each parent directory is
opened by `SnapshotRoot.parent_fd`, which walks from the snapshot root one component at a time
with O_NOFOLLOW. No symlink is followed while extracting, so no entry can create, change or
link anything outside the snapshot, whatever symlinks earlier entries made.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Protocol

from lstore.errors import UnsafeLayerError

log = logging.getLogger(__name__)

Path = tuple[bytes, ...]
"""A normalised path inside the layer root: its components, () for the root itself."""

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Directory fds kept open between entries. Tar streams list a directory's members together,
# so a small cache saves most lookups; 256 stays far below the usual 1024 fd limit.
_MAX_CACHED_DIRS = 256

# Mode of directories an entry needs but the layer does not list, as containerd creates them.
IMPLICIT_DIR_MODE = 0o755


def display(path: Path | bytes) -> str:
    """Format a layer path for messages; bytes that are not UTF-8 show as escapes."""
    raw = b"/".join(path) if isinstance(path, tuple) else path
    return raw.decode("utf-8", "backslashreplace")


def split_name(raw: bytes, layer_digest: str) -> Path:
    """Normalise a member name or hardlink target into components below the layer root.

    Empty and "." components are dropped, so "./a/", "/a" and "a" are the same path: absolute
    names are relative to the layer root (chroot-style), as in containerd. ".." removes the
    component before it, and one that would climb above the root raises UnsafeLayerError, as
    Docker rejects it.
    """
    if b"\x00" in raw:
        raise _unsafe_name(raw, "contains a NUL byte", layer_digest)
    parts = raw.strip(b"/").split(b"/")
    if b"" not in parts and b"." not in parts and b".." not in parts:
        return tuple(parts)

    parts = []
    for part in raw.split(b"/"):
        if part == b"..":
            if not parts:
                raise _unsafe_name(raw, "points outside the layer root", layer_digest)
            parts.pop()
        elif part not in (b"", b"."):
            parts.append(part)
    return tuple(parts)


def _unsafe_name(raw: bytes, reason: str, layer_digest: str) -> UnsafeLayerError:
    return UnsafeLayerError(
        f"layer {layer_digest}: entry {display(raw)!r} {reason}; the layer is hostile or corrupt",
        digest=layer_digest,
        entry=display(raw),
    )


def make_directory(parent_fd: int, name: bytes) -> None:
    """Create a directory with mode 0755 whatever the umask."""
    os.mkdir(name, IMPLICIT_DIR_MODE, dir_fd=parent_fd)
    os.chmod(name, IMPLICIT_DIR_MODE, dir_fd=parent_fd)


class DirectoryHooks(Protocol):
    """Callbacks through which the whiteout logic learns of directories the walk touches."""

    def directory_created(self, parent_fd: int, name: bytes, path: Path) -> None:
        """Called after a directory was created at `path`."""

    def replace_with_directory(self, parent_fd: int, name: bytes, path: Path) -> bool:
        """Called when a non-directory blocks `path`; returns True if it made a directory."""


class SnapshotRoot:
    """The snapshot directory being filled, with every lookup confined to it.

    Not thread-safe. Fds returned stay valid until `trim()`, which the extractor calls
    between entries.
    """

    def __init__(self, path: str, layer_digest: str, hooks: DirectoryHooks) -> None:
        self.path = path
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._layer_digest = layer_digest
        self._hooks = hooks
        self._fds: dict[Path, int] = {(): self.fd}
        self._retired: list[int] = []

    def parent_fd(self, path: Path, create: bool = True) -> int:
        """Return an O_PATH fd of the directory that contains `path`.

        With `create`, missing parents are created with mode 0755. Without it, a missing
        parent raises FileNotFoundError. A parent that is a symlink or not a directory raises
        UnsafeLayerError naming `path`.
        """
        return self.directory_fd(path[:-1], create, entry=path)

    def directory_fd(self, path: Path, create: bool = True, entry: Path | None = None) -> int:
        """Return an O_PATH fd of the directory `path` itself, like `parent_fd`."""
        fd = self._fds.get(path)
        if fd is not None:
            return fd

        parent = self.directory_fd(path[:-1], create, entry)
        fd = self._open_directory(parent, path, create, path if entry is None else entry)
        self._fds[path] = fd
        return fd

    def forget(self, path: Path) -> None:
        """Drop cached fds of `path` and below, after the directory there was removed."""
        size = len(path)
        for key in [key for key in self._fds if key and key[:size] == path]:
            self._retired.append(self._fds.pop(key))

    def trim(self) -> None:
        """Close fds of removed directories, and all cached ones when the cache is full."""
        if len(self._fds) > _MAX_CACHED_DIRS:
            self._retired.extend(fd for key, fd in self._fds.items() if key)
            self._fds = {(): self.fd}
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()

    def close(self) -> None:
        self._retired.extend(self._fds.values())
        self._fds.clear()
        self.trim()

    def _open_directory(self, parent: int, path: Path, create: bool, entry: Path) -> int:
        name = path[-1]
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            make_directory(parent, name)
            self._hooks.directory_created(parent, name, path)
        except NotADirectoryError:
            self._replace_blocker(parent, path, create, entry)
        return os.open(name, _DIR_FLAGS, dir_fd=parent)

    def _replace_blocker(self, parent: int, path: Path, create: bool, entry: Path) -> None:
        mode = os.stat(path[-1], dir_fd=parent, follow_symlinks=False).st_mode
        if stat.S_ISLNK(mode):
            reason = f"its parent {display(path)!r} is a symlink, which could lead outside"
        elif create and self._hooks.replace_with_directory(parent, path[-1], path):
            return
        else:
            reason = f"its parent {display(path)!r} is not a directory"
        raise UnsafeLayerError(
            f"layer {self._layer_digest}: entry {display(entry)!r} rejected: {reason}; "
            "the layer is hostile or corrupt",
            digest=self._layer_digest,
            entry=display(entry),
        )
