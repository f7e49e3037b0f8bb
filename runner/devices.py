"""Device access rules of the built-in runtime, through the cgroup v1 devices controller.

A container keeps CAP_MKNOD, so without these rules its root could create a node for a
host disk and read it. The rules come from linux.resources.devices in config.json
(OCI config-linux.md "Device allowlist") and go into the devices hierarchy at
linux.cgroupsPath, as runc does. lstore's other cgroup code leaves this controller to the
runtime. The directory is created only inside the caller's own devices cgroup.

NOTE: on a cgroup v2 only host, device rules need an eBPF program attached to the cgroup,
which the built-in runtime does not load, so there the rules are not enforced.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any

from lstore.errors import ContainerError

log = logging.getLogger(__name__)

_REMOVE_TIMEOUT_S = 2.0  # the kernel kills the rest of a PID namespace when PID 1 exits


def _devices_mount() -> str | None:
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            if fields[separator + 1] == "cgroup" and "devices" in fields[-1].split(","):
                return fields[4]
    return None


def _devices_path(proc_cgroup: str) -> str:
    with open(proc_cgroup) as own:
        for line in own:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "devices" in controllers.split(","):
                return path
    return "/"


def rule_lines(rules: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Return (file, line) writes for OCI device rules, such as ("devices.allow", "c 1:3 rwm")."""
    writes = []
    for rule in rules:
        kind = rule.get("type") or "a"
        major = "*" if rule.get("major") is None else str(rule["major"])
        minor = "*" if rule.get("minor") is None else str(rule["minor"])
        target = "a" if kind == "a" else f"{kind} {major}:{minor}"
        line = f"{target} {rule.get('access') or 'rwm'}"
        writes.append(("devices.allow" if rule.get("allow") else "devices.deny", line))
    return writes


class DeviceCgroup:
    """A devices cgroup directory that contains one container's processes."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def add(self, pid: int) -> None:
        """Move `pid` into the cgroup; it must not have exec'd the container program yet."""
        _write(os.path.join(self.directory, "cgroup.procs"), str(pid))

    def remove(self) -> None:
        """Remove the directory once its processes are gone; log when they outlive the wait."""
        deadline = time.monotonic() + _REMOVE_TIMEOUT_S
        while True:
            try:
                os.rmdir(self.directory)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    log.warning("cannot remove devices cgroup %s: %s", self.directory, exc)
                    return
            time.sleep(0.01)


def create(cgroups_path: str, rules: list[dict[str, Any]]) -> DeviceCgroup | None:
    """Create the devices cgroup at `cgroups_path` with `rules`; None without a v1 devices
    hierarchy or without rules.

    Raises ContainerError when the path is outside the caller's devices cgroup or the
    kernel rejects a rule. The directory is removed again on error.
    """
    mount = _devices_mount()
    if mount is None or not rules or not cgroups_path:
        return None
    own = _devices_path("/proc/self/cgroup").rstrip("/")
    path = os.path.normpath(cgroups_path)
    if not path.startswith(own + "/") or ".." in path.split("/"):
        raise ContainerError(
            f"cgroup {cgroups_path} is outside this process's devices cgroup {own or '/'}",
            path=cgroups_path,
        )

    directory = mount + path
    os.makedirs(directory, exist_ok=True)
    cgroup = DeviceCgroup(directory)
    try:
        for name, line in rule_lines(rules):
            _write(os.path.join(directory, name), line)
    except ContainerError:
        cgroup.remove()
        raise
    return cgroup


def of_process(pid: int) -> DeviceCgroup | None:
    """Return the devices cgroup of `pid` when it differs from the caller's, else None."""
    mount = _devices_mount()
    if mount is None:
        return None
    theirs = _devices_path(f"/proc/{pid}/cgroup")
    if theirs == _devices_path("/proc/self/cgroup"):
        return None
    return DeviceCgroup(mount + theirs)


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as control:
            control.write(value)
    except OSError as exc:
        raise ContainerError(
            f"cannot write {value!r} to {path}: {exc.strerror}", path=path
        ) from exc
