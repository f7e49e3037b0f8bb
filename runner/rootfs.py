"""The container's filesystem view, set up by its init process inside its mount namespace.

Runs after unshare(CLONE_NEWNS) and before exec, in the process that becomes the container's
PID 1: the OCI mounts, /dev with its standard nodes, pivot_root into the root filesystem,
then read-only root, sysctls, masked and read-only paths (OCI config-linux.md). Every mount
destination is resolved inside the root filesystem, so a symlink in the image cannot send a
mount to a host path. Nothing here is visible outside the container's mount namespace, so
an error leaves nothing behind once the process exits.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from lstore.runner import nsutil
from lstore.runner.nsutil import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    resolve_in_root,
)
from lstore.runner.terminal import open_pty

# The nodes every container gets in /dev: name -> (major, minor), as runc creates them.
DEFAULT_DEVICES: dict[str, tuple[int, int]] = {
    "null": (1, 3),
    "zero": (1, 5),
    "full": (1, 7),
    "random": (1, 8),
    "urandom": (1, 9),
    "tty": (5, 0),
}

DEV_SYMLINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "ptmx": "pts/ptmx",
}

# statvfs flags a bind remount must keep: in a user namespace the kernel rejects a remount
# that would clear a flag locked by the mount's original owner (mount_namespaces(7)).
_LOCKED_FLAGS = (
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_RDONLY, MS_RDONLY),
)


class SetupError(Exception):
    """A step of the container's filesystem setup failed; the message names the path."""


def prepare(
    spec: dict[str, Any],
    root: str,
    *,
    in_userns: bool,
    terminal: bool = False,
) -> tuple[int, int, str] | None:
    """Build the container's mounts under `root`, pivot into it and lock it down.

    With `terminal`, returns (master, slave, slave path) of a new pty from the container's
    devpts, with the slave bound at /dev/console (OCI config-linux.md, "Default Devices");
    else None.
    A missing working directory is created, owned by root as docker does. Raises
    SetupError naming the mount or path that failed.
    """
    _mount(None, "/", None, _root_propagation(spec))
    _mount(root, root, None, MS_BIND | MS_REC)

    for entry in spec.get("mounts") or []:
        mount_entry(root, entry, in_userns=in_userns)
    console = open_console(root) if terminal else None
    if _has_dev_tmpfs(spec):
        create_devices(root, spec.get("linux", {}).get("devices") or [], in_userns=in_userns)
        if console:
            _bind_file(console[2], resolve_in_root(root, "/dev/console"))
    _make_workdir(root, spec["process"].get("cwd") or "/")

    pivot(root)
    apply_sysctls(spec.get("linux", {}).get("sysctl") or {})
    if spec.get("root", {}).get("readonly"):
        remount_readonly("/", recursive=False)
    for path in spec.get("linux", {}).get("maskedPaths") or []:
        mask_path(path)
    for path in spec.get("linux", {}).get("readonlyPaths") or []:
        readonly_path(path)
    return console


def open_console(root: str) -> tuple[int, int, str]:
    """Open a pty in the devpts instance at `root`/dev/pts; return (master, slave, path).

    A root filesystem without its own devpts gets a pty of the caller's devpts instead.
    The process that calls this exits on error, which closes what it opened.
    """
    devpts = resolve_in_root(root, "/dev/pts")
    try:
        # Every devpts instance has a ptmx node; a plain directory from the image has none.
        if os.path.exists(os.path.join(devpts, "ptmx")):
            return open_pty(devpts)
        master, slave = os.openpty()
        return master, slave, os.ttyname(slave)
    except OSError as exc:
        raise SetupError(f"cannot open a terminal in {devpts}: {exc.strerror}") from exc


def _root_propagation(spec: dict[str, Any]) -> int:
    # Private by default, so no mount made here shows up on the host and no host mount
    # event reaches the container.
    name = spec.get("linux", {}).get("rootfsPropagation") or "rprivate"
    options = nsutil.parse_mount_options([name])
    if not options.propagation:
        raise SetupError(f"invalid rootfsPropagation {name!r}")
    return options.propagation[0]


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    try:
        nsutil.mount(source, target, fstype, flags, data)
    except OSError as exc:
        raise SetupError(
            f"mount {fstype or source or ''} on {target} failed: {os.strerror(exc.errno or 0)}"
        ) from exc


def _has_dev_tmpfs(spec: dict[str, Any]) -> bool:
    return any(
        m.get("destination") == "/dev" and m.get("type") == "tmpfs"
        for m in spec.get("mounts") or []
    )


# ---------------------------------------------------------------------------- mounts


def mount_entry(root: str, entry: dict[str, Any], *, in_userns: bool) -> None:
    """Mount one OCI mount entry at its destination inside `root`."""
    destination = resolve_in_root(root, entry["destination"])
    options = nsutil.parse_mount_options(entry.get("options") or [])
    fstype = entry.get("type") or ""
    source = entry.get("source") or fstype

    if fstype == "bind" or options.flags & MS_BIND:
        _mount_bind(source, destination, options)
    elif fstype == "cgroup":
        _mount_cgroups(destination, options)
    elif fstype == "sysfs" and in_userns:
        _mount_sysfs_in_userns(destination, options)
    else:
        os.makedirs(destination, exist_ok=True)
        _mount(source, destination, fstype, options.flags, options.data or None)
    for propagation in options.propagation:
        _mount(None, destination, None, propagation)


def _mount_bind(source: str, destination: str, options: nsutil.MountOptions) -> None:
    try:
        is_dir = stat.S_ISDIR(os.stat(source).st_mode)
    except OSError as exc:
        raise SetupError(
            f"bind mount source {source} is not accessible: {os.strerror(exc.errno or 0)}"
        ) from exc
    _make_target(destination, is_dir)
    _mount(source, destination, None, MS_BIND | (options.flags & MS_REC))

    # MS_BIND ignores every other flag, so ro, nosuid and the like need a remount.
    extra = options.flags & ~(MS_BIND | MS_REC)
    if extra:
        _mount(None, destination, None, MS_BIND | MS_REMOUNT | extra | _locked(destination))


def _make_target(destination: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(destination, exist_ok=True)
        return
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    if not os.path.lexists(destination):
        os.close(os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _bind_file(source: str, destination: str) -> None:
    _make_target(destination, is_dir=False)
    _mount(source, destination, None, MS_BIND)


def _locked(path: str) -> int:
    flags = os.statvfs(path).f_flag
    return sum(ms for st, ms in _LOCKED_FLAGS if flags & st and ms != MS_RDONLY)


def _mount_sysfs_in_userns(destination: str, options: nsutil.MountOptions) -> None:
    # sysfs can only be mounted by the owner of the network namespace, so a container that
    # shares the host's network gets a read-only bind of the host's /sys instead.
    os.makedirs(destination, exist_ok=True)
    try:
        nsutil.mount("sysfs", destination, "sysfs", options.flags, options.data or None)
    except OSError as exc:
        if exc.errno != errno.EPERM:
            raise SetupError(f"mount sysfs on {destination} failed: {exc.strerror}") from exc
        _mount("/sys", destination, None, MS_BIND | MS_REC)
        _mount(None, destination, None, MS_BIND | MS_REMOUNT | MS_RDONLY | _locked(destination))


def _mount_cgroups(destination: str, options: nsutil.MountOptions) -> None:
    """Show the container's own cgroups at `destination`, one read-only bind per hierarchy.

    Without a cgroup namespace a fresh cgroup mount would show the host's whole tree, so
    each hierarchy's directory of this process is bound instead, on a tmpfs for v1.
    """
    hierarchies = _own_cgroup_dirs()
    unified = [h for h in hierarchies if h[0] == ""]
    if unified and len(hierarchies) == 1:
        _make_target(destination, is_dir=True)
        _mount(unified[0][1], destination, None, MS_BIND | MS_REC)
        _mount(
            None,
            destination,
            None,
            MS_BIND | MS_REMOUNT | MS_RDONLY | options.flags | _locked(destination),
        )
        return

    os.makedirs(destination, exist_ok=True)
    _mount("tmpfs", destination, "tmpfs", options.flags & ~MS_RDONLY, "mode=755")
    for name, directory in hierarchies:
        target = os.path.join(destination, name or "unified")
        os.makedirs(target, exist_ok=True)
        _mount(directory, target, None, MS_BIND | MS_REC)
        _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | _locked(target))
    if options.flags & MS_RDONLY:
        _mount(None, destination, None, MS_REMOUNT | options.flags)


def _own_cgroup_dirs() -> list[tuple[str, str]]:
    """Return (mount name, host directory of this process's cgroup) per cgroup hierarchy.

    The name is the mount point's last component ("memory", "cpu,cpuacct") for v1 and ""
    for the v2 hierarchy.
    """
    with open("/proc/self/cgroup") as own:
        paths = {}
        for line in own.read().splitlines():
            _, controllers, path = line.split(":", 2)
            paths[controllers] = path
    result = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            fstype, super_options = fields[separator + 1], fields[separator + 3].split(",")
            if fstype not in ("cgroup", "cgroup2"):
                continue
            key = "" if fstype == "cgroup2" else _v1_key(super_options, paths)
            if key is None or key not in paths:
                continue
            name = "" if fstype == "cgroup2" else os.path.basename(fields[4])
            result.append((name, fields[4] + paths[key].rstrip("/")))
    return result


def _v1_key(super_options: list[str], paths: dict[str, str]) -> str | None:
    # /proc/self/cgroup names a v1 hierarchy by its controllers ("cpu,cpuacct") or by
    # "name=systemd"; the mount's super options list the same words.
    for key in paths:
        words = key.split(",")
        if key and all(word in super_options for word in words):
            return key
    return None


# ---------------------------------------------------------------------------- /dev


def create_devices(root: str, devices: list[dict[str, Any]], *, in_userns: bool) -> None:
    """Create the default device nodes, the spec's linux.devices and the /dev symlinks.

    In a user namespace mknod(2) is not permitted, so the host's nodes are bind-mounted.
    """
    dev = resolve_in_root(root, "/dev")
    old_umask = os.umask(0)
    try:
        for name, (major, minor) in DEFAULT_DEVICES.items():
            _create_node(os.path.join(dev, name), stat.S_IFCHR | 0o666, major, minor, in_userns)
        for device in devices:
            _create_spec_device(root, device, in_userns)
        for name, target in DEV_SYMLINKS.items():
            link = os.path.join(dev, name)
            if not os.path.lexists(link):
                os.symlink(target, link)
    finally:
        os.umask(old_umask)


def _create_spec_device(root: str, device: dict[str, Any], in_userns: bool) -> None:
    kinds = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}
    kind = kinds.get(device.get("type", ""))
    if kind is None:
        raise SetupError(f"invalid type {device.get('type')!r} of device {device.get('path')}")
    path = resolve_in_root(root, device["path"])
    mode = kind | (device.get("fileMode") or 0o666)
    _create_node(
        path,
        mode,
        device.get("major", 0),
        device.get("minor", 0),
        in_userns,
        host_path=device["path"],
    )
    os.chown(path, device.get("uid", 0), device.get("gid", 0))


def _create_node(
    path: str, mode: int, major: int, minor: int, in_userns: bool, host_path: str | None = None
) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if in_userns:
        _bind_file(host_path or "/dev/" + os.path.basename(path), path)
        return
    try:
        os.mknod(path, mode, os.makedev(major, minor))
    except OSError as exc:
        raise SetupError(f"cannot create device {path}: {exc.strerror}") from exc


def _make_workdir(root: str, cwd: str) -> None:
    path = resolve_in_root(root, cwd)
    if os.path.isdir(path):
        return
    try:
        os.makedirs(path, mode=0o755)
    except OSError as exc:
        raise SetupError(f"cannot create working directory {cwd}: {exc.strerror}") from exc


# ---------------------------------------------------------------------------- after pivot


def pivot(root: str) -> None:
    """Make `root` the root directory and detach the old root.

    pivot_root(".", ".") stacks the old root on top of the new one at "/", so it can be
    unmounted without a directory for it inside the container (pivot_root(2) NOTES).
    """
    os.chdir(root)
    try:
        nsutil.pivot_root(".", ".")
        nsutil.umount(".", MNT_DETACH)
    except OSError as exc:
        raise SetupError(f"pivot_root into {root} failed: {exc.strerror}") from exc
    os.chdir("/")


def apply_sysctls(sysctls: dict[str, str]) -> None:
    """Write each linux.sysctl entry to /proc/sys (dots become slashes)."""
    for key, value in sysctls.items():
        path = "/proc/sys/" + key.replace(".", "/")
        try:
            with open(path, "w") as setting:
                setting.write(value)
        except OSError as exc:
            raise SetupError(f"cannot set sysctl {key}={value}: {exc.strerror}") from exc


def remount_readonly(path: str, *, recursive: bool) -> None:
    """Make the mount at `path` read-only, keeping its locked flags."""
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | _locked(path)
    _mount(None, path, None, flags | (MS_REC if recursive else 0))


def mask_path(path: str) -> None:
    """Hide `path`: an empty read-only tmpfs over a directory, /dev/null over a file."""
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if is_dir:
        _mount("tmpfs", path, "tmpfs", MS_RDONLY)
    else:
        _mount("/dev/null", path, None, MS_BIND)


def readonly_path(path: str) -> None:
    """Bind `path` onto itself read-only; a missing path is skipped."""
    if not os.path.lexists(path):
        return
    _mount(path, path, None, MS_BIND | MS_REC)
    remount_readonly(path, recursive=True)
