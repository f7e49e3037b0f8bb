"""Overlay mounts of image layers: the options (pure) and the mount calls.

mount(2) copies its data argument into one page (4096 bytes on x86_64 and arm64), which
caps a classic "lowerdir=a:b:..." mount at roughly 128 layers with absolute store paths.
Since Linux 6.8 overlayfs accepts one "lowerdir+" parameter per layer through the new mount
API (fsopen, fsconfig, fsmount, move_mount), with no limit on the total length, so that is
tried first. Older kernels get mount(2) with paths relative to the layers' common parent,
made in a short-lived child process that changes into that directory.

Layer lists are bottom layer first everywhere in lstore, as image manifests order them.
overlayfs wants the top layer first, so the functions here reverse the list.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os

from lstore.errors import InvalidArgumentError, StoreError
from lstore.runner import nsutil

log = logging.getLogger(__name__)


# New mount API constants (linux/mount.h).
_FSOPEN_CLOEXEC = 0x1
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 0x1
_MOUNT_ATTR_RDONLY = 0x1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_AT_FDCWD = -100

# The kernel copies mount(2) data into one page, NUL included.
_MOUNT_DATA_MAX = os.sysconf("SC_PAGE_SIZE") - 1


def overlay_options(
    lowerdirs: list[str], upperdir: str | None = None, workdir: str | None = None
) -> list[str]:
    """Return the overlay mount(2) options for layers given bottom first.

    Backslash, comma and colon in paths are escaped with a backslash, which overlayfs's
    option parser undoes. Raises InvalidArgumentError when no layer is given or when only
    one of upperdir and workdir is.
    """
    _validate(lowerdirs, upperdir, workdir)
    options = ["lowerdir=" + ":".join(_escape(d) for d in reversed(lowerdirs))]
    if upperdir is not None and workdir is not None:
        options += ["upperdir=" + _escape(upperdir), "workdir=" + _escape(workdir)]
    return options


def _validate(lowerdirs: list[str], upperdir: str | None, workdir: str | None) -> None:
    if not lowerdirs:
        raise InvalidArgumentError("an overlay mount needs at least one lower directory")
    if (upperdir is None) != (workdir is None):
        raise InvalidArgumentError(
            f"an overlay mount needs both upperdir and workdir, got upperdir={upperdir!r} "
            f"workdir={workdir!r}",
            path=upperdir or workdir,
        )


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def mount_overlay(
    target: str,
    lowerdirs: list[str],
    upperdir: str | None = None,
    workdir: str | None = None,
    readonly: bool = False,
) -> None:
    """Mount the layers `lowerdirs` (bottom first) as one overlay filesystem at `target`.

    A single lower directory without an upper one becomes a read-only bind mount, because
    overlayfs needs two layers when it has no upper. `readonly` makes the mount read-only
    even with an upper directory. Nothing stays mounted when this raises StoreError.
    """
    _validate(lowerdirs, upperdir, workdir)
    if len(lowerdirs) == 1 and upperdir is None:
        _bind_readonly(lowerdirs[0], target)
        return

    try:
        _mount_with_fsconfig(target, lowerdirs, upperdir, workdir, readonly)
        return
    except _LowerdirPlusUnsupported:
        log.debug("overlayfs has no lowerdir+ parameter, falling back to mount(2)")
    mount_overlay_classic(target, lowerdirs, upperdir, workdir, readonly)


def _bind_readonly(source: str, target: str) -> None:
    try:
        nsutil.mount(source, target, None, nsutil.MS_BIND)
    except OSError as exc:
        raise StoreError(
            f"cannot bind-mount {source} on {target}: {exc.strerror}", path=target
        ) from exc

    # A bind mount takes MS_RDONLY only in a second, remounting call.
    try:
        nsutil.mount(None, target, None, nsutil.MS_REMOUNT | nsutil.MS_BIND | nsutil.MS_RDONLY)
    except OSError as exc:
        nsutil.umount(target, nsutil.MNT_DETACH)
        raise StoreError(
            f"cannot make the bind mount at {target} read-only: {exc.strerror}", path=target
        ) from exc


class _LowerdirPlusUnsupported(Exception):
    """The kernel's overlayfs predates the "lowerdir+" parameter (Linux 6.8)."""


def _mount_with_fsconfig(
    target: str, lowerdirs: list[str], upperdir: str | None, workdir: str | None, readonly: bool
) -> None:
    fs_fd = nsutil.syscall(nsutil.SYS_FSOPEN, b"overlay", ctypes.c_uint(_FSOPEN_CLOEXEC))
    if fs_fd == -1:
        if ctypes.get_errno() == errno.ENOSYS:
            raise _LowerdirPlusUnsupported()
        _raise_mount_error(target, "fsopen overlay", -1)
    try:
        _configure(fs_fd, target, lowerdirs, upperdir, workdir)
        _attach(fs_fd, target, readonly)
    finally:
        os.close(fs_fd)


def _configure(
    fs_fd: int, target: str, lowerdirs: list[str], upperdir: str | None, workdir: str | None
) -> None:
    # "source" only names the mount in /proc/self/mountinfo, as mount(2)'s first argument.
    if _fsconfig(fs_fd, "source", "overlay") == -1:
        _raise_mount_error(target, "source", fs_fd)

    for index, lowerdir in enumerate(reversed(lowerdirs)):
        if _fsconfig(fs_fd, "lowerdir+", lowerdir) == -1:
            if index == 0 and ctypes.get_errno() == errno.EINVAL:
                raise _LowerdirPlusUnsupported()
            _raise_mount_error(target, f"lower directory {lowerdir}", fs_fd)

    for key, value in (("upperdir", upperdir), ("workdir", workdir)):
        if value is not None and _fsconfig(fs_fd, key, value) == -1:
            _raise_mount_error(target, f"{key} {value}", fs_fd)

    result = nsutil.syscall(
        nsutil.SYS_FSCONFIG,
        ctypes.c_int(fs_fd),
        ctypes.c_uint(_FSCONFIG_CMD_CREATE),
        None,
        None,
        ctypes.c_int(0),
    )
    if result == -1:
        _raise_mount_error(target, "creating the overlay", fs_fd)


def _fsconfig(fs_fd: int, key: str, value: str) -> int:
    return nsutil.syscall(
        nsutil.SYS_FSCONFIG,
        ctypes.c_int(fs_fd),
        ctypes.c_uint(_FSCONFIG_SET_STRING),
        key.encode(),
        os.fsencode(value),
        ctypes.c_int(0),
    )


def _attach(fs_fd: int, target: str, readonly: bool) -> None:
    attributes = _MOUNT_ATTR_RDONLY if readonly else 0
    mount_fd = nsutil.syscall(
        nsutil.SYS_FSMOUNT,
        ctypes.c_int(fs_fd),
        ctypes.c_uint(_FSMOUNT_CLOEXEC),
        ctypes.c_uint(attributes),
    )
    if mount_fd == -1:
        _raise_mount_error(target, "fsmount", fs_fd)
    try:
        result = nsutil.syscall(
            nsutil.SYS_MOVE_MOUNT,
            ctypes.c_int(mount_fd),
            b"",
            ctypes.c_int(_AT_FDCWD),
            os.fsencode(target),
            ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH),
        )
        if result == -1:
            _raise_mount_error(target, "move_mount", -1)
    finally:
        os.close(mount_fd)


def _raise_mount_error(target: str, step: str, fs_fd: int) -> None:
    code = ctypes.get_errno()
    detail = _kernel_messages(fs_fd) if fs_fd >= 0 else ""
    message = f"cannot mount overlay at {target}: {step}: {os.strerror(code)}"
    raise StoreError(message + (f" ({detail})" if detail else ""), path=target) from OSError(
        code, os.strerror(code), target
    )


def _kernel_messages(fs_fd: int) -> str:
    # The new mount API queues the filesystem's error text on the fs context descriptor;
    # each read returns one line such as "e overlay: failed to resolve 'x': -2".
    lines = []
    while True:
        try:
            lines.append(os.read(fs_fd, 1024).decode(errors="replace").strip())
        except OSError:
            return "; ".join(lines)


def mount_overlay_classic(
    target: str,
    lowerdirs: list[str],
    upperdir: str | None = None,
    workdir: str | None = None,
    readonly: bool = False,
) -> None:
    """Mount an overlay with mount(2), as kernels before 6.8 require.

    When the options with absolute paths exceed one page, they are rewritten relative to
    the layers' common parent directory. The mount then runs in a child process that changes
    into that directory, because the working directory is shared by all threads of this
    process. Raises StoreError when even the relative form does not fit.
    """
    flags = nsutil.MS_RDONLY if readonly else 0
    data = ",".join(overlay_options(lowerdirs, upperdir, workdir))
    if len(data) <= _MOUNT_DATA_MAX:
        try:
            nsutil.mount("overlay", target, "overlay", flags, data)
        except OSError as exc:
            raise StoreError(
                f"cannot mount overlay at {target}: {exc.strerror}", path=target
            ) from exc
        return

    parent = os.path.commonpath([*lowerdirs, *(d for d in (upperdir, workdir) if d)])
    data = ",".join(_relative_options(parent, lowerdirs, upperdir, workdir))
    if len(data) > _MOUNT_DATA_MAX:
        raise StoreError(
            f"cannot mount {len(lowerdirs)} layers at {target}: the overlay options take "
            f"{len(data)} bytes even relative to {parent}, and mount(2) takes at most "
            f"{_MOUNT_DATA_MAX}; this needs Linux 6.8 or later",
            path=target,
        )
    _mount_in_directory(parent, os.path.abspath(target), flags, data)


def _relative_options(
    parent: str, lowerdirs: list[str], upperdir: str | None, workdir: str | None
) -> list[str]:
    def relative(path: str | None) -> str | None:
        return None if path is None else os.path.relpath(path, parent)

    relative_lowers = [relative(d) or "." for d in lowerdirs]
    return overlay_options(relative_lowers, relative(upperdir), relative(workdir))


def _mount_in_directory(directory: str, target: str, flags: int, data: str) -> None:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.chdir(directory)
            nsutil.mount("overlay", target, "overlay", flags, data)
        except OSError as exc:
            code = exc.errno or errno.EIO
        finally:
            os._exit(code)

    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        reason = os.strerror(code) if code > 0 else f"mount helper killed by signal {-code}"
        raise StoreError(
            f"cannot mount overlay at {target} from {directory}: {reason}", path=target
        )


def unmount(target: str) -> None:
    """Unmount `target`; a target that is not a mount point is left alone.

    A busy mount is detached lazily (MNT_DETACH): it disappears from the namespace now and
    the kernel frees it once the last user lets go.
    """
    try:
        nsutil.umount(target)
        return
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return
        if exc.errno != errno.EBUSY:
            raise StoreError(f"cannot unmount {target}: {exc.strerror}", path=target) from exc

    log.warning("mount %s is busy, detaching it lazily", target)
    try:
        nsutil.umount(target, nsutil.MNT_DETACH)
    except OSError as exc:
        raise StoreError(f"cannot unmount {target}: {exc.strerror}", path=target) from exc
