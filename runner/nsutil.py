"""Thin ctypes wrappers over the Linux system calls that containers need.

Python 3.11 has no os.unshare, os.setns, mount or pivot_root, so these call libc or, for
calls that glibc does not wrap, syscall(2) with the number for this architecture. Every
wrapper raises OSError with the errno and the path or name involved; callers wrap it in an
lstore error that names the setup step.

Also here: the pure translation of OCI mount options into mount(2) flags, and a resolver
that joins a path to a root directory without following a symlink out of it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import stat
import struct
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)

# Namespace flags (linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_PARENT = 0x00008000

# OCI namespace type -> clone flag and the name of its file under /proc/PID/ns.
NAMESPACES: dict[str, tuple[int, str]] = {
    "user": (CLONE_NEWUSER, "user"),
    "ipc": (CLONE_NEWIPC, "ipc"),
    "uts": (CLONE_NEWUTS, "uts"),
    "network": (CLONE_NEWNET, "net"),
    "pid": (CLONE_NEWPID, "pid"),
    "mount": (CLONE_NEWNS, "mnt"),
    "cgroup": (CLONE_NEWCGROUP, "cgroup"),
}

# mount(2) flags (linux/mount.h).
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2

# System calls that glibc 2.36 does not wrap. The numbers at and above 424 are the same on
# every architecture (asm-generic unified table); the older ones differ.
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"clone": 56, "pivot_root": 155},
    "aarch64": {"clone": 220, "pivot_root": 41},
}
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_CLOSE_RANGE = 436
SYS_MOUNT_SETATTR = 442


def syscall_number(name: str) -> int:
    """Return the number of an architecture-specific system call on this machine."""
    machine = os.uname().machine
    try:
        return _SYSCALLS[machine][name]
    except KeyError:
        raise OSError(errno.ENOSYS, f"no syscall number for {name} on {machine}") from None


def syscall(number: int, *args: object) -> int:
    """Call a system call by number; returns -1 with errno set on failure, as libc does."""
    return _libc.syscall(ctypes.c_long(number), *args)


def check(result: int, what: str, path: str | None = None) -> int:
    """Raise OSError with the current errno when a libc call returned -1."""
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}", path)
    return result


def _bytes(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    """Call mount(2); raise OSError naming the target on failure."""
    result = _libc.mount(
        _bytes(source), _bytes(target), _bytes(fstype), ctypes.c_ulong(flags), _bytes(data)
    )
    check(result, f"mount {fstype or source} on {target}", target)


def umount(target: str, flags: int = 0) -> None:
    """Call umount2(2); raise OSError naming the target on failure."""
    check(_libc.umount2(_bytes(target), ctypes.c_int(flags)), f"umount {target}", target)


def unshare(flags: int) -> None:
    """Move the calling thread into new namespaces of the kinds in `flags`."""
    check(_libc.unshare(ctypes.c_int(flags)), f"unshare {flags:#x}")


def setns(fd: int, nstype: int = 0, name: str = "") -> None:
    """Join the namespace that `fd` (an open /proc/PID/ns/* file) refers to."""
    check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns {name}", name or None)


def pivot_root(new_root: str, put_old: str) -> None:
    """Make `new_root` the root mount of the calling process's mount namespace."""
    number = syscall_number("pivot_root")
    result = syscall(number, _bytes(new_root), _bytes(put_old))
    check(result, f"pivot_root {new_root}", new_root)


def sethostname(name: str) -> None:
    """Set the hostname of the calling process's UTS namespace."""
    data = name.encode()
    check(_libc.sethostname(data, ctypes.c_size_t(len(data))), f"sethostname {name}")


def set_cloexec_from(first_fd: int) -> None:
    """Mark every descriptor from `first_fd` up close-on-exec, so exec drops inherited ones.

    Uses close_range(2) with CLOSE_RANGE_CLOEXEC (Linux 5.11).
    """
    close_range_cloexec = 1 << 2
    result = syscall(
        SYS_CLOSE_RANGE,
        ctypes.c_uint(first_fd),
        ctypes.c_uint(0xFFFFFFFF),
        ctypes.c_uint(close_range_cloexec),
    )
    check(result, "close_range")


def clone_sibling() -> int:
    """Fork the calling process into a sibling: the new process's parent is our parent.

    Returns 0 in the new process and its pid in the caller, like fork(2). Uses clone(2) with
    CLONE_PARENT and no new stack, which copies the address space as fork does. Call it only
    from a single-threaded process, because glibc's fork handlers do not run: a lock held by
    another thread would stay held in the copy. A process that called unshare(CLONE_NEWPID)
    uses this to make the first member of the new PID namespace a direct child of its own
    parent, which can then wait for it without a process in between.
    """
    number = syscall_number("clone")
    sigchld = 17
    clone = ctypes.PyDLL(None, use_errno=True).syscall
    pid = clone(
        ctypes.c_long(number),
        ctypes.c_ulong(CLONE_PARENT | sigchld),
        ctypes.c_void_p(0),
        ctypes.c_void_p(0),
        ctypes.c_void_p(0),
        ctypes.c_void_p(0),
    )
    check(pid, "clone")
    if pid == 0:
        # Let the interpreter know that it is now a forked child, as os.fork() does.
        ctypes.pythonapi.PyOS_AfterFork_Child()
    return pid


# ---------------------------------------------------------------------------- mount options

_FLAG_OPTIONS: dict[str, tuple[bool, int]] = {
    # option -> (clear the flag instead of setting it, flag)
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "nosuid": (False, MS_NOSUID),
    "suid": (True, MS_NOSUID),
    "nodev": (False, MS_NODEV),
    "dev": (True, MS_NODEV),
    "noexec": (False, MS_NOEXEC),
    "exec": (True, MS_NOEXEC),
    "sync": (False, MS_SYNCHRONOUS),
    "async": (True, MS_SYNCHRONOUS),
    "dirsync": (False, MS_DIRSYNC),
    "remount": (False, MS_REMOUNT),
    "mand": (False, MS_MANDLOCK),
    "nomand": (True, MS_MANDLOCK),
    "atime": (True, MS_NOATIME),
    "noatime": (False, MS_NOATIME),
    "diratime": (True, MS_NODIRATIME),
    "nodiratime": (False, MS_NODIRATIME),
    "relatime": (False, MS_RELATIME),
    "norelatime": (True, MS_RELATIME),
    "strictatime": (False, MS_STRICTATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosymfollow": (False, MS_NOSYMFOLLOW),
    "bind": (False, MS_BIND),
    "rbind": (False, MS_BIND | MS_REC),
}

_PROPAGATION_OPTIONS: dict[str, int] = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}


@dataclass(frozen=True)
class MountOptions:
    """OCI mount options split the way mount(2) takes them."""

    flags: int
    """MS_* flags for the mount call itself."""
    propagation: list[int]
    """MS_PRIVATE/MS_SLAVE/... values, each applied by its own mount call afterwards."""
    data: str
    """Comma-separated filesystem options such as "mode=755,size=65536k"."""


def parse_mount_options(options: list[str]) -> MountOptions:
    """Translate OCI runtime-spec mount options (config.md "Mounts") into mount(2) terms.

    Options that are neither flags nor propagation types go to the filesystem as data,
    in the order given.
    """
    flags = 0
    propagation: list[int] = []
    data: list[str] = []
    for option in options:
        if option in _FLAG_OPTIONS:
            clear, flag = _FLAG_OPTIONS[option]
            flags = flags & ~flag if clear else flags | flag
        elif option in _PROPAGATION_OPTIONS:
            propagation.append(_PROPAGATION_OPTIONS[option])
        else:
            data.append(option)
    return MountOptions(flags, propagation, ",".join(data))


# ---------------------------------------------------------------------------- paths in a root

_MAX_SYMLINKS = 40  # the kernel's MAXSYMLINKS for path resolution


def resolve_in_root(root: str, path: str) -> str:
    """Join `path` to `root`, resolving symlinks as if `root` were "/".

    An absolute symlink target restarts at `root`, and ".." never climbs above it, so the
    result always lies inside `root` even when the tree under it is hostile. Components that
    do not exist are appended as they are. Raises OSError(ELOOP) after 40 symlinks.
    """
    root = os.path.abspath(root)
    pending = [part for part in path.split("/") if part not in ("", ".")]
    pending.reverse()
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part == "..":
            if resolved:
                resolved.pop()
            continue

        current = os.path.join(root, *resolved, part)
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            mode = 0
        if not stat.S_ISLNK(mode):
            resolved.append(part)
            continue

        links += 1
        if links > _MAX_SYMLINKS:
            raise OSError(errno.ELOOP, f"too many symlinks resolving {path} in {root}", path)
        target = os.readlink(current)
        if target.startswith("/"):
            resolved = []
        pending.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
    return os.path.join(root, *resolved)


# linux/sockios.h and linux/if.h: read and set an interface's flags.
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def bring_loopback_up() -> None:
    """Set `lo` up in the current network namespace, as docker's none mode has it.

    A new network namespace starts with its loopback interface down. Two ioctls do here what
    netlink would do, without importing a netlink library into the start path.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | _IFF_UP))
