"""Idmapped mounts of image layers for containers in a user namespace (--userns).

Root in a --userns container is an unprivileged host uid (runner/spec.py's range, 100000 by
default), but image layers in the store are owned by host root and shared by every
container, so they must not be chowned. Instead each layer gets a second mount for the
container with an idmapping (mount_setattr(2) with MOUNT_ATTR_IDMAP). Through it, a file
that uid N owns on disk appears owned by host uid 100000+N. Container root thus owns what
image root owns, while the files on disk stay as they are. overlayfs takes idmapped mounts
as lower layers since Linux 5.19. The overlay's upper and work directories are plain
directories owned by the mapped root, so files the container creates are stored with
its host ids.

The mounts live at CONTAINER/idmapped/<n>, n counting from 0 at the bottom layer; the short
names keep overlay options short on kernels that take them through mount(2).
`unmount_layers` finds the mounts by listing that directory, so a crash between any two
steps leaves nothing that it cannot remove.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import stat

from lstore.errors import ContainerError
from lstore.runner import nsutil

log = logging.getLogger(__name__)

IDMAPPED_DIR = "idmapped"

# linux/mount.h and linux/fcntl.h.
_OPEN_TREE_CLONE = 0x1
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_MOUNT_ATTR_IDMAP = 0x00100000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4

# ENOSYS: no open_tree (Linux < 5.2) or mount_setattr (< 5.12). EINVAL or EOPNOTSUPP: the
# filesystem under the store cannot be idmapped (overlayfs, for one).
_NO_IDMAP_SUPPORT = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


class _MountAttr(ctypes.Structure):
    """struct mount_attr of mount_setattr(2), first version (MOUNT_ATTR_SIZE_VER0, 32 bytes)."""

    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def id_map_text(id_range: tuple[int, int]) -> str:
    """Return the uid_map or gid_map line that maps ids from 0 onto `id_range`."""
    host_id, size = id_range
    return f"0 {host_id} {size}\n"


# ---------------------------------------------------------------------------- user namespace


def open_userns(id_range: tuple[int, int]) -> int:
    """Create a user namespace mapping ids 0.. onto `id_range`; return an fd that refers to it.

    A forked child unshares the namespace, this process writes its uid and gid maps and
    opens /proc/CHILD/ns/user, and then kills the child, so no process stays in the
    namespace; the returned fd keeps it alive. Raises ContainerError when a step fails,
    after ending the child.
    """
    ready_read, ready_write = os.pipe2(os.O_CLOEXEC)
    hold_read, hold_write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        _hold_new_userns(ready_write, hold_read)
    os.close(ready_write)
    os.close(hold_read)

    try:
        _wait_until_unshared(ready_read, pid)
        _write_id_maps(pid, id_range)
        return _open_userns_file(pid)
    finally:
        os.close(ready_read)
        os.close(hold_write)
        _end_child(pid)


def _hold_new_userns(ready_write: int, hold_read: int) -> None:
    """Unshare a user namespace, report "ok" or the errno, and block until killed."""
    code = 0
    try:
        nsutil.unshare(nsutil.CLONE_NEWUSER)
        os.write(ready_write, b"ok")
    except OSError as exc:
        code = exc.errno or errno.EIO
        os.write(ready_write, str(code).encode())
    else:
        os.read(hold_read, 1)  # returns when the parent closes its end or kills this child
    finally:
        os._exit(code)


def _wait_until_unshared(ready_read: int, pid: int) -> None:
    reply = os.read(ready_read, 16).decode(errors="replace")
    if reply == "ok":
        return
    reason = os.strerror(int(reply)) if reply.isdigit() else "the child exited"
    raise ContainerError(f"failed to create a user namespace for --userns in child {pid}: "
                         f"{reason}")


def _write_id_maps(pid: int, id_range: tuple[int, int]) -> None:
    # This process has CAP_SETGID in the parent namespace, so it may write gid_map without
    # first writing "deny" to setgroups (user_namespaces(7)). No process ever runs in this
    # namespace: it only describes the mapping of the idmapped mounts.
    for name in ("uid_map", "gid_map"):
        path = f"/proc/{pid}/{name}"
        try:
            with open(path, "w") as id_map:
                id_map.write(id_map_text(id_range))
        except OSError as exc:
            raise ContainerError(f"cannot write {path}: {exc.strerror}", path=path) from exc


def _open_userns_file(pid: int) -> int:
    path = f"/proc/{pid}/ns/user"
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ContainerError(f"cannot open {path}: {exc.strerror}", path=path) from exc


def _end_child(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it exited after reporting an error; waitpid still reaps it
    os.waitpid(pid, 0)


# ---------------------------------------------------------------------------- idmapped mounts


def mount_idmapped(source: str, target: str, userns_fd: int) -> None:
    """Mount directory `source` at `target` with the ids of user namespace `userns_fd`.

    The mount is made detached (open_tree(2) with OPEN_TREE_CLONE), idmapped and only then
    attached, because the kernel idmaps only mounts that are not yet attached. Nothing
    stays mounted when this raises ContainerError.
    """
    tree_fd = nsutil.syscall(
        nsutil.SYS_OPEN_TREE,
        ctypes.c_int(_AT_FDCWD),
        os.fsencode(source),
        ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC),
    )
    if tree_fd == -1:
        _raise_idmap_error("open_tree", source)

    # Closing the fd of a tree that was never attached unmounts it.
    try:
        _set_idmap(tree_fd, source, userns_fd)
        _attach(tree_fd, source, target)
    finally:
        os.close(tree_fd)


def _set_idmap(tree_fd: int, source: str, userns_fd: int) -> None:
    attributes = _MountAttr(attr_set=_MOUNT_ATTR_IDMAP, userns_fd=userns_fd)
    result = nsutil.syscall(
        nsutil.SYS_MOUNT_SETATTR,
        ctypes.c_int(tree_fd),
        b"",
        ctypes.c_uint(_AT_EMPTY_PATH),
        ctypes.byref(attributes),
        ctypes.c_size_t(ctypes.sizeof(attributes)),
    )
    if result == -1:
        _raise_idmap_error("mount_setattr MOUNT_ATTR_IDMAP", source)


def _attach(tree_fd: int, source: str, target: str) -> None:
    result = nsutil.syscall(
        nsutil.SYS_MOVE_MOUNT,
        ctypes.c_int(tree_fd),
        b"",
        ctypes.c_int(_AT_FDCWD),
        os.fsencode(target),
        ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
    )
    if result == -1:
        code = ctypes.get_errno()
        raise ContainerError(
            f"cannot mount the idmapped layer {source} at {target}: {os.strerror(code)}",
            path=target,
        ) from OSError(code, os.strerror(code), target)


def _raise_idmap_error(step: str, source: str) -> None:
    code = ctypes.get_errno()
    message = f"{step} on {source} failed: {os.strerror(code)}"
    if code in _NO_IDMAP_SUPPORT:
        message = (
            "--userns needs idmapped mounts (Linux 5.19 or later, with the store on a "
            f"filesystem that supports them): {message}"
        )
    else:
        message = f"cannot make an idmapped mount of layer {source}: {message}"
    raise ContainerError(message, path=source) from OSError(code, os.strerror(code), source)


# ---------------------------------------------------------------------------- layers


def mount_layers(container_dir: str, layer_dirs: list[str], id_range: tuple[int, int]) -> list[str]:
    """Mount every layer idmapped under CONTAINER/idmapped; return the mount points.

    `layer_dirs` and the result are bottom layer first. Nothing stays mounted when this
    raises ContainerError. Not safe to run twice at once for one container.
    """
    base = os.path.join(container_dir, IDMAPPED_DIR)
    userns_fd = open_userns(id_range)
    try:
        targets = _mount_each(base, layer_dirs, userns_fd)
    except BaseException:
        unmount_layers(container_dir)
        raise
    finally:
        os.close(userns_fd)

    log.debug("mounted %d idmapped layers under %s", len(targets), base)
    return targets


def _mount_each(base: str, layer_dirs: list[str], userns_fd: int) -> list[str]:
    os.mkdir(base, 0o700)  # only host root, which mounts the overlay, looks up the layers
    targets = []
    for index, layer in enumerate(layer_dirs):
        target = os.path.join(base, str(index))
        os.mkdir(target, 0o700)
        mount_idmapped(layer, target, userns_fd)
        targets.append(target)
    return targets


def unmount_layers(container_dir: str) -> None:
    """Unmount and remove every idmapped layer mount of a container.

    Idempotent: mounts and directories already gone are skipped, so it cleans up after a
    crash at any step of `mount_layers`. Unmount the overlay first, because the overlay
    keeps its layers busy and a busy mount is only detached lazily. Raises StoreError when
    an unmount fails.
    """
    from lstore.store.overlay import unmount

    base = os.path.join(container_dir, IDMAPPED_DIR)
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return

    for name in names:
        target = os.path.join(base, name)
        unmount(target)
        _remove_empty_dir(target)
    _remove_empty_dir(base)


def _remove_empty_dir(path: str) -> None:
    # rmdir, never rmtree: a directory that is still a mount point shows an image layer.
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------- search access


def make_searchable(directories: list[str]) -> None:
    """Add search permission for others to each directory, as container root needs it.

    Mode 0700 becomes 0711: others may look names up but cannot list the directory.
    """
    for directory in directories:
        mode = stat.S_IMODE(os.stat(directory).st_mode)
        if not mode & stat.S_IXOTH:
            os.chmod(directory, mode | stat.S_IXGRP | stat.S_IXOTH)


def check_searchable(path: str, id_range: tuple[int, int]) -> None:
    """Check that container root can search `path` and every directory above it.

    The runtime bind-mounts the root filesystem from inside the user namespace, where the
    host path is looked up as the mapped root. Raises ContainerError naming the first
    directory that it cannot search.
    """
    host_id = id_range[0]
    for directory in _with_ancestors(os.path.abspath(path)):
        if not _searchable_by(os.stat(directory), host_id) and not _has_access_acl(directory):
            raise ContainerError(
                f"--userns: container root (host uid {host_id}) cannot search {directory}; "
                f"allow it with 'chmod o+x {directory}' or use a store root under "
                "searchable directories",
                path=directory,
            )


def _with_ancestors(path: str) -> list[str]:
    directories = [path]
    while path != "/":
        path = os.path.dirname(path)
        directories.append(path)
    return directories


def _searchable_by(st: os.stat_result, host_id: int) -> bool:
    # The owner class wins, then the group class, then others: no fallthrough (inode(7)).
    if st.st_uid == host_id:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == host_id:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _has_access_acl(path: str) -> bool:
    # NOTE: an access ACL may grant the search permission that the mode bits deny. It is not
    # evaluated here: the directory is let through and the kernel decides at start.
    try:
        return "system.posix_acl_access" in os.listxattr(path)
    except OSError:
        return False
