"""Container cgroups: one interface over the kernel's v1 and v2 cgroup file interfaces.

Layout. On v1 every controller (or group of co-mounted controllers) has its own hierarchy,
and the calling process sits at its own path in each one (`/proc/self/cgroup`). On v2 one
unified hierarchy carries all controllers. A container cgroup gets the same relative path
on every hierarchy lstore uses, so one `cgroupsPath` in config.json describes it for runc:
`<own cgroup>/lstore/<name>` by default, `<--cgroup-parent>/<name>` when a parent is given.

Safety. lstore writes only inside the caller's own subtree on each hierarchy: every
directory is checked against the caller's cgroup of that hierarchy before it is created,
and a path outside it is rejected with ContainerError. The caller's own cgroup is written
only on v2, to delegate controllers to children through cgroup.subtree_control.

References: the kernel's Documentation/admin-guide/cgroup-v1/{memory,pids,blkio-controller}.rst
and Documentation/admin-guide/cgroup-v2.rst.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import logging
import os
import posixpath
import re
import signal
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lstore.errors import ContainerError, InvalidArgumentError, UnsupportedError

log = logging.getLogger(__name__)

# v1 controllers a container cgroup joins. cpuset and devices are left out: cpuset needs
# cpuset.cpus/mems copied into every new directory before a task may join, and device
# access is enforced by the runtime's device rules.
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio")
V1_REQUIRED = ("memory", "cpu", "cpuacct", "pids")
V2_CONTROLLERS = ("memory", "cpu", "pids", "io")
V2_REQUIRED = ("memory", "cpu", "pids")

DEFAULT_CPU_PERIOD_US = 100_000  # CFS period used for --cpus, as docker and runc do
CONTAINER_SUBDIR = "lstore"

# How long destroy() waits for killed processes to leave the cgroup. SIGKILLed tasks exit
# within milliseconds unless they sit in uninterruptible sleep (D state) on slow I/O.
DESTROY_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.01
MKDIR_ATTEMPTS = 5

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# ---------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy and the caller's cgroup in it.

    `root` is the hierarchy path of the mount's root directory (mountinfo field 4); it is
    not "/" when a subtree is bind-mounted, as inside containers without a cgroup namespace.
    """

    version: int
    controllers: frozenset[str]
    mountpoint: str
    root: str
    own: str

    def directory(self, cgroup_path: str) -> str:
        """Return the directory of `cgroup_path`, which must lie under the mount's root."""
        relative = posixpath.relpath(cgroup_path, self.root)
        if relative == ".":
            return self.mountpoint
        return posixpath.join(self.mountpoint, relative)


@dataclass(frozen=True)
class Layout:
    """The hierarchies lstore uses: one per v1 controller, or the v2 one for all."""

    version: int
    hierarchies: dict[str, Hierarchy]  # controller -> hierarchy

    def unique(self) -> list[Hierarchy]:
        seen: dict[str, Hierarchy] = {}
        for hierarchy in self.hierarchies.values():
            seen.setdefault(hierarchy.mountpoint, hierarchy)
        return list(seen.values())


def _unescape(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[tuple[str, str, str, set[str]]]:
    """Return (fstype, root, mountpoint, super options) of each cgroup and cgroup2 mount."""
    mounts = []
    for line in text.splitlines():
        before, _, after = line.partition(" - ")
        fields = before.split()
        fstype, _source, super_options = (after.split() + ["", "", ""])[:3]
        if fstype in ("cgroup", "cgroup2"):
            options = set(super_options.split(","))
            mounts.append((fstype, _unescape(fields[3]), _unescape(fields[4]), options))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Map each v1 controller, and "" for the v2 hierarchy, to the caller's cgroup path."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        _hierarchy_id, controllers, path = line.split(":", 2)
        if controllers == "":
            paths[""] = path
        for controller in controllers.split(","):
            if controller:
                paths[controller] = path
    return paths


def _v1_hierarchies(mounts: list, own: dict[str, str]) -> dict[str, Hierarchy]:
    found: dict[str, Hierarchy] = {}
    for fstype, root, mountpoint, options in mounts:
        controllers = frozenset(options & set(V1_CONTROLLERS))
        if fstype != "cgroup" or not controllers:
            continue
        own_path = own.get(next(iter(controllers)))
        if own_path is None or not _inside(own_path, root):
            continue  # a bind mount of another subtree: the caller's cgroup is not in it
        hierarchy = Hierarchy(1, controllers, mountpoint, root, own_path)
        for controller in controllers:
            found.setdefault(controller, hierarchy)
    return found


def _v2_hierarchy(mounts: list, own: dict[str, str]) -> Hierarchy | None:
    own_path = own.get("")
    for fstype, root, mountpoint, _options in mounts:
        if fstype == "cgroup2" and own_path is not None and _inside(own_path, root):
            hierarchy = Hierarchy(2, frozenset(), mountpoint, root, own_path)
            return Hierarchy(2, _v2_controllers(hierarchy), mountpoint, root, own_path)
    return None


def _v2_controllers(hierarchy: Hierarchy) -> frozenset[str]:
    path = posixpath.join(hierarchy.directory(hierarchy.own), "cgroup.controllers")
    try:
        return frozenset(_read(path).split())
    except FileNotFoundError:
        return frozenset()


def detect_layout(
    mountinfo_path: str = "/proc/self/mountinfo", cgroup_path: str = "/proc/self/cgroup"
) -> Layout:
    """Choose v1 when the memory controller is bound to a v1 hierarchy, else v2.

    A controller is bound to one hierarchy at a time, so on hybrid hosts (v1 hierarchies
    plus an empty cgroup2 mount) v1 wins, and on unified hosts v2 does.
    """
    mounts = parse_mountinfo(_read(mountinfo_path))
    own = parse_proc_cgroup(_read(cgroup_path))

    v1 = _v1_hierarchies(mounts, own)
    if "memory" in v1:
        missing = [c for c in V1_REQUIRED if c not in v1]
        if missing:
            raise UnsupportedError(f"cgroup v1 controllers not mounted: {', '.join(missing)}")
        return Layout(1, v1)

    v2 = _v2_hierarchy(mounts, own)
    if v2 is not None and "memory" in v2.controllers:
        return Layout(2, {c: v2 for c in V2_CONTROLLERS if c in v2.controllers})
    raise UnsupportedError(
        "no usable cgroup hierarchy: the memory controller is neither mounted as cgroup v1 "
        "nor enabled in this process's cgroup v2 (cgroup.controllers)"
    )


def own_cgroup(layout: Layout | None = None) -> dict[str, str]:
    """Return the caller's cgroup path per controller (on v2 every controller maps to one)."""
    layout = layout or detect_layout()
    return {controller: h.own for controller, h in layout.hierarchies.items()}


# ---------------------------------------------------------------------------- paths


def _inside(path: str, ancestor: str) -> bool:
    if ancestor == "/":
        return path.startswith("/")
    return path == ancestor or path.startswith(ancestor + "/")


def _normalize(path: str) -> str:
    if ".." in path.split("/"):
        raise InvalidArgumentError(f"invalid cgroup path {path!r}: '..' is not allowed")
    return posixpath.normpath(path)


def container_cgroup_path(name: str, parent: str | None, layout: Layout) -> str:
    """Return `<parent>/<name>` (default parent: `<own>/lstore`), checked on every hierarchy.

    A relative parent is taken relative to the caller's own cgroup. Raises ContainerError
    when the path leaves the caller's subtree on any hierarchy.
    """
    if not _NAME.fullmatch(name):
        raise InvalidArgumentError(f"invalid cgroup name {name!r}: use letters, digits, _.-")

    base = _deepest_own(layout)
    if parent is None:
        parent = posixpath.join(base, CONTAINER_SUBDIR)
    elif not parent.startswith("/"):
        parent = posixpath.join(base, parent)
    path = _normalize(posixpath.join(parent, name))

    for controller, hierarchy in sorted(layout.hierarchies.items()):
        _check_inside(path, hierarchy, controller)
    return path


def _deepest_own(layout: Layout) -> str:
    # One relative path must sit under the caller's cgroup on every hierarchy, so the
    # deepest own path is the base, and each other own path must be one of its ancestors.
    owns = sorted({h.own for h in layout.hierarchies.values()}, key=len)
    deepest = owns[-1]
    for own in owns:
        if not _inside(deepest, own):
            raise ContainerError(
                f"this process is in unrelated cgroups ({own} and {deepest}) on different "
                "hierarchies, so no container path fits under both; pass --cgroup-parent"
            )
    return deepest


def _check_inside(path: str, hierarchy: Hierarchy, controller: str) -> None:
    if path == hierarchy.own or not _inside(path, hierarchy.own):
        raise ContainerError(
            f"cgroup {path} is outside this process's cgroup {hierarchy.own} on the "
            f"{controller} hierarchy; pass a --cgroup-parent below {hierarchy.own}",
            path=path,
        )


def _make_dirs(
    directory: str, own_directory: str, before_mkdir: Callable[[str], None] | None = None
) -> list[str]:
    """Create `directory` and missing ancestors below `own_directory`; return those created.

    `before_mkdir(parent)` runs before each level is created, with the parent directory.
    """
    created: list[str] = []
    for _attempt in range(MKDIR_ATTEMPTS):
        current = own_directory
        try:
            for part in posixpath.relpath(directory, own_directory).split("/"):
                if before_mkdir is not None:
                    before_mkdir(current)
                current = posixpath.join(current, part)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(current)
                    created.append(current)
            return created
        except FileNotFoundError:
            continue  # a concurrent destroy() removed an empty parent: start again
    raise ContainerError(f"failed to create cgroup {directory}: parents keep vanishing")


# ---------------------------------------------------------------------------- files


def _read(path: str) -> str:
    # builtins.open: this module defines open() itself, the agreed name for re-opening.
    with builtins.open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    # One write(2) per value: cgroup files act on each write call separately. No O_CREAT:
    # a missing file means the controller is not enabled, and that must fail.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise ContainerError(
            f"failed to write {value!r} to {path}: {exc.strerror}", path=path
        ) from exc


def _keyed_values(text: str) -> dict[str, int]:
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[key] = int(value)
    return values


def _read_int(path: str) -> int | None:
    try:
        text = _read(path).strip()
    except FileNotFoundError:
        return None
    return None if text == "max" else int(text)


def _read_procs(directory: str) -> list[int]:
    try:
        return [int(line) for line in _read(posixpath.join(directory, "cgroup.procs")).split()]
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------- resources


def parse_bytes(text: str) -> int:
    """Parse a size such as `512`, `64k`, `1.5mb` or `2G`; units are powers of 1024."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?", text.strip().lower())
    if not match:
        raise InvalidArgumentError(f"invalid size {text!r}: expected a number with b/k/m/g/t")
    scale = 1024 ** "bkmgtp".index(match.group(2) or "b")
    return int(float(match.group(1)) * scale)


def parse_device_rate(text: str) -> dict[str, int]:
    """Parse `--device-write-bps /dev/vda:1mb` into an OCI throttle entry."""
    device, sep, rate = text.rpartition(":")
    if not sep or not device:
        raise InvalidArgumentError(f"invalid device rate {text!r}: expected DEVICE:RATE")
    try:
        st = os.stat(device)
    except FileNotFoundError as exc:
        raise InvalidArgumentError(f"device {device} not found", path=device) from exc
    if not stat.S_ISBLK(st.st_mode):
        raise InvalidArgumentError(f"{device} is not a block device", path=device)
    return {"major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev), "rate": parse_bytes(rate)}


def resources_from_options(
    *,
    memory: int | None = None,
    cpus: float | None = None,
    cpu_quota: int | None = None,
    cpu_period: int | None = None,
    pids_limit: int | None = None,
    device_write_bps: Iterable[str] = (),
) -> dict[str, Any]:
    """Build OCI `linux.resources` from docker-style run flags.

    `--cpus N` becomes a CFS quota of N periods of 100 ms, as docker computes it; it cannot
    be combined with --cpu-quota or --cpu-period. Values out of docker's ranges raise
    InvalidArgumentError (runner/limits.py).
    """
    from lstore.runner import limits

    resources: dict[str, Any] = {}
    if memory is not None:
        limits.check_memory(memory)
        resources["memory"] = {"limit": memory}

    if cpus is not None and (cpu_quota is not None or cpu_period is not None):
        raise InvalidArgumentError("--cpus cannot be combined with --cpu-quota or --cpu-period")
    if cpu_quota is not None:
        limits.check_cpu_quota(cpu_quota)
    if cpu_period is not None:
        limits.check_cpu_period(cpu_period)
    if cpus is not None:
        limits.check_cpus(cpus)
        cpu_quota, cpu_period = round(cpus * DEFAULT_CPU_PERIOD_US), DEFAULT_CPU_PERIOD_US
    if cpu_quota is not None or cpu_period is not None:
        resources["cpu"] = {"quota": cpu_quota, "period": cpu_period or DEFAULT_CPU_PERIOD_US}

    if pids_limit is not None:
        resources["pids"] = {"limit": pids_limit}
    rates = [parse_device_rate(text) for text in device_write_bps]
    if rates:
        resources["blockIO"] = {"throttleWriteBpsDevice": rates}
    return resources


def _v1_memory_files(memory: dict[str, Any], has_memsw: bool) -> list[tuple[str, str]]:
    limit = memory.get("limit")
    if limit is None:
        return []
    files = [("memory", f"memory.limit_in_bytes:{limit}")]
    if has_memsw:
        # memsw counts memory plus swap: the same value as the limit leaves no swap. The
        # kernel requires memsw >= limit at every step, and both start at "unlimited".
        files.append(("memory", f"memory.memsw.limit_in_bytes:{memory.get('swap') or limit}"))
    return files


def _v1_files(resources: dict[str, Any], has_memsw: bool) -> list[tuple[str, str]]:
    """Return (controller, "file:value") writes in the order the kernel accepts them."""
    files = _v1_memory_files(resources.get("memory") or {}, has_memsw)

    cpu = resources.get("cpu") or {}
    if cpu.get("period"):
        files.append(("cpu", f"cpu.cfs_period_us:{cpu['period']}"))
    if cpu.get("quota") is not None:
        files.append(("cpu", f"cpu.cfs_quota_us:{cpu['quota']}"))

    pids = resources.get("pids") or {}
    if pids.get("limit") is not None:
        limit = pids["limit"]
        files.append(("pids", f"pids.max:{limit if limit > 0 else 'max'}"))

    block_io = resources.get("blockIO") or {}
    for key, name in (("throttleReadBpsDevice", "read"), ("throttleWriteBpsDevice", "write")):
        for entry in block_io.get(key) or []:
            value = f"{entry['major']}:{entry['minor']} {entry['rate']}"
            files.append(("blkio", f"blkio.throttle.{name}_bps_device:{value}"))
    return files


def _v2_files(resources: dict[str, Any], has_swap: bool) -> list[tuple[str, str]]:
    memory = resources.get("memory") or {}
    files = []
    if memory.get("limit") is not None:
        files.append(("memory", f"memory.max:{memory['limit']}"))
        if has_swap:
            # OCI swap is memory plus swap; memory.swap.max counts swap alone.
            swap = max((memory.get("swap") or memory["limit"]) - memory["limit"], 0)
            files.append(("memory", f"memory.swap.max:{swap}"))

    cpu = resources.get("cpu") or {}
    if cpu.get("quota") is not None or cpu.get("period"):
        quota = cpu.get("quota")
        quota_text = "max" if quota is None or quota < 0 else str(quota)
        files.append(("cpu", f"cpu.max:{quota_text} {cpu.get('period') or DEFAULT_CPU_PERIOD_US}"))

    pids = resources.get("pids") or {}
    if pids.get("limit") is not None:
        files.append(("pids", f"pids.max:{pids['limit'] if pids['limit'] > 0 else 'max'}"))

    block_io = resources.get("blockIO") or {}
    for key, name in (("throttleReadBpsDevice", "rbps"), ("throttleWriteBpsDevice", "wbps")):
        for entry in block_io.get(key) or []:
            files.append(("io", f"io.max:{entry['major']}:{entry['minor']} {name}={entry['rate']}"))
    return files


# ---------------------------------------------------------------------------- cgroups


@dataclass
class Cgroup:
    """A container cgroup on every hierarchy of a layout.

    `directories` maps each controller to its directory. `created` lists the directories
    create() made, parents first. `parents` lists the directories between the caller's
    cgroup and the container's that lstore chose itself (the default `lstore` parent and
    its ancestors mirrored from other hierarchies), which destroy() removes once empty.
    """

    version: int
    spec_path: str
    directories: dict[str, str]
    created: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "spec_path": self.spec_path,
            "directories": dict(self.directories),
            "created": list(self.created),
            "parents": list(self.parents),
        }

    def _unique_dirs(self) -> list[str]:
        return sorted(set(self.directories.values()))

    def _file(self, controller: str, name: str) -> str:
        return posixpath.join(self.directories[controller], name)

    def add(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the cgroup on every hierarchy."""
        for directory in self._unique_dirs():
            _write(posixpath.join(directory, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        return _read_procs(self.directories["memory"])

    def oom_killed(self) -> bool:
        """Tell whether the kernel OOM killer has killed a process of this cgroup."""
        return self.oom_kill_count() > 0

    def oom_kill_count(self) -> int:
        raise NotImplementedError

    def stats(self) -> dict[str, int | None]:
        raise NotImplementedError

    def apply(self, resources: dict[str, Any]) -> None:
        raise NotImplementedError

    def destroy(self) -> None:
        """Kill every process left in the cgroup, wait until it is empty, remove its dirs.

        Idempotent: missing directories count as removed. Parent directories that another
        container still uses are kept. Raises ContainerError when processes survive
        DESTROY_TIMEOUT_S; the directories are then left in place.
        """
        self._kill_all()
        self._wait_empty()
        for directory in reversed(self._removal_order()):
            _remove_dir(directory, leaf=directory in self.directories.values())

    def _removal_order(self) -> list[str]:
        # Parents another container still uses fail rmdir with EBUSY and are kept.
        leaves = self._unique_dirs()
        parents = sorted(set(self.created + self.parents) - set(leaves), key=len)
        return parents + leaves

    def _kill_all(self) -> None:
        for pid in self._all_pids():
            _kill(pid)

    def _all_pids(self) -> set[int]:
        found: set[int] = set()
        for directory in self._unique_dirs():
            found.update(_read_procs(directory))
        return found

    def _wait_empty(self) -> None:
        # Tasks forked between reading cgroup.procs and the kill appear in the next read,
        # so keep killing until a read comes back empty.
        deadline = time.monotonic() + DESTROY_TIMEOUT_S
        while True:
            remaining = self._all_pids()
            if not remaining:
                return
            if time.monotonic() > deadline:
                raise ContainerError(
                    f"processes {sorted(remaining)} survived SIGKILL in cgroup {self.spec_path}",
                    path=self.spec_path,
                )
            for pid in remaining:
                _kill(pid)
            time.sleep(_POLL_INTERVAL_S)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _remove_dir(directory: str, *, leaf: bool) -> None:
    """Remove one cgroup directory; a missing one counts as removed.

    A leaf loses the child cgroups its processes made first. It may still hold exiting
    tasks for a moment after cgroup.procs reads empty, so rmdir is retried on EBUSY. A
    parent that another container still uses is kept.
    """
    if leaf:
        for below, subdirs, _files in os.walk(directory, topdown=False):
            for subdir in subdirs:
                _remove_dir(posixpath.join(below, subdir), leaf=True)

    deadline = time.monotonic() + DESTROY_TIMEOUT_S
    while True:
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            in_use = exc.errno in (errno.EBUSY, errno.ENOTEMPTY)
            if in_use and not leaf:
                return
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise ContainerError(
                    f"failed to remove cgroup {directory}: {exc.strerror}", path=directory
                ) from exc
        time.sleep(_POLL_INTERVAL_S)


class CgroupV1(Cgroup):
    """A container cgroup with one directory per v1 hierarchy."""

    def apply(self, resources: dict[str, Any]) -> None:
        has_memsw = os.path.exists(self._file("memory", "memory.memsw.limit_in_bytes"))
        for controller, assignment in _v1_files(resources, has_memsw):
            if controller not in self.directories:
                raise UnsupportedError(f"the {controller} cgroup controller is not mounted")
            name, _, value = assignment.partition(":")
            _write(self._file(controller, name), value)

    def oom_kill_count(self) -> int:
        # memory.oom_control has carried an `oom_kill` counter since Linux 4.13.
        values = _keyed_values(_read(self._file("memory", "memory.oom_control")))
        if "oom_kill" in values:
            return values["oom_kill"]
        # NOTE: older kernels only count limit hits, an upper bound on OOM kills.
        return 1 if (_read_int(self._file("memory", "memory.failcnt")) or 0) > 0 else 0

    def stats(self) -> dict[str, int | None]:
        read_bytes, write_bytes = self._io_bytes()
        limit = _read_int(self._file("memory", "memory.limit_in_bytes"))
        return {
            "cpu_usage_ns": _read_int(self._file("cpuacct", "cpuacct.usage")),
            "memory_bytes": _read_int(self._file("memory", "memory.usage_in_bytes")),
            # The kernel reports "unlimited" as PAGE_COUNTER_MAX pages, about 2**63.
            "memory_limit_bytes": None if limit is None or limit >= 1 << 62 else limit,
            "memory_failcnt": _read_int(self._file("memory", "memory.failcnt")),
            "pids": _read_int(self._file("pids", "pids.current")),
            "io_read_bytes": read_bytes,
            "io_write_bytes": write_bytes,
        }

    def _io_bytes(self) -> tuple[int | None, int | None]:
        if "blkio" not in self.directories:
            return None, None
        read_total = write_total = 0
        text = _read(self._file("blkio", "blkio.throttle.io_service_bytes"))
        for line in text.splitlines():
            parts = line.split()  # "MAJ:MIN Read|Write|... BYTES" and a final "Total BYTES"
            if len(parts) == 3 and parts[1] == "Read":
                read_total += int(parts[2])
            elif len(parts) == 3 and parts[1] == "Write":
                write_total += int(parts[2])
        return read_total, write_total


class CgroupV2(Cgroup):
    """A container cgroup in the unified v2 hierarchy (one directory for all controllers)."""

    @property
    def directory(self) -> str:
        return next(iter(self.directories.values()))

    def apply(self, resources: dict[str, Any]) -> None:
        has_swap = os.path.exists(posixpath.join(self.directory, "memory.swap.max"))
        for controller, assignment in _v2_files(resources, has_swap):
            if controller not in self.directories:
                raise UnsupportedError(f"the {controller} controller is not enabled in cgroup v2")
            name, _, value = assignment.partition(":")
            _write(posixpath.join(self.directory, name), value)

    def pids(self) -> list[int]:
        return _read_procs(self.directory)

    def oom_kill_count(self) -> int:
        # memory.events of this cgroup itself: the parent's file also counts its siblings.
        events = _keyed_values(_read(posixpath.join(self.directory, "memory.events")))
        return events.get("oom_kill", 0)

    def stats(self) -> dict[str, int | None]:
        cpu = _keyed_values(_read(posixpath.join(self.directory, "cpu.stat")))
        read_bytes, write_bytes = self._io_bytes()
        usage_usec = cpu.get("usage_usec")
        return {
            "cpu_usage_ns": None if usage_usec is None else usage_usec * 1000,
            "memory_bytes": _read_int(posixpath.join(self.directory, "memory.current")),
            "memory_limit_bytes": _read_int(posixpath.join(self.directory, "memory.max")),
            "memory_failcnt": None,
            "pids": _read_int(posixpath.join(self.directory, "pids.current")),
            "io_read_bytes": read_bytes,
            "io_write_bytes": write_bytes,
        }

    def _io_bytes(self) -> tuple[int | None, int | None]:
        try:
            text = _read(posixpath.join(self.directory, "io.stat"))
        except FileNotFoundError:
            return None, None
        read_total = write_total = 0
        for line in text.splitlines():  # "MAJ:MIN rbytes=N wbytes=N rios=N wios=N ..."
            fields = dict(item.split("=", 1) for item in line.split()[1:] if "=" in item)
            read_total += int(fields.get("rbytes", 0))
            write_total += int(fields.get("wbytes", 0))
        return read_total, write_total

    def _kill_all(self) -> None:
        # cgroup.kill (Linux 5.14) kills the whole subtree atomically, racing no fork.
        kill_file = posixpath.join(self.directory, "cgroup.kill")
        if os.path.exists(kill_file) and _read_procs(self.directory):
            _write(kill_file, "1")
        super()._kill_all()


def _v2_delegation(hierarchy: Hierarchy) -> Callable[[str], None]:
    """Return a hook that enables the v2 controllers in a directory's subtree_control.

    Each level from the caller's cgroup down to the container's parent must list the
    controllers there before the child gets their interface files. cgroup-v2.rst "No
    Internal Process Constraint": a non-root cgroup with processes cannot do this, so the
    caller must run in the root cgroup or in a cgroup that already delegates them.
    """
    wanted = [c for c in V2_CONTROLLERS if c in hierarchy.controllers]
    mount_relative = len(hierarchy.mountpoint.rstrip("/"))

    def enable(directory: str) -> None:
        cgroup_path = posixpath.join(hierarchy.root, directory[mount_relative:].lstrip("/"))
        _enable_in(posixpath.join(directory, "cgroup.subtree_control"), wanted, cgroup_path)

    return enable


def _enable_in(control: str, wanted: list[str], cgroup_path: str) -> None:
    try:
        enabled = set(_read(control).split())
    except FileNotFoundError:
        enabled = set()
    missing = [c for c in wanted if c not in enabled]
    if not missing:
        return
    try:
        _write(control, " ".join("+" + c for c in missing))
    except ContainerError as exc:
        raise ContainerError(
            f"failed to enable {', '.join(missing)} for children of cgroup {cgroup_path}: "
            f"{exc.__cause__}; a cgroup v2 that contains processes cannot delegate "
            "controllers, so run lstore in a cgroup with those controllers in "
            "cgroup.subtree_control or pass --cgroup-parent",
            path=cgroup_path,
        ) from exc


def create(
    name: str,
    parent: str | None = None,
    resources: dict[str, Any] | None = None,
    *,
    layout: Layout | None = None,
) -> Cgroup:
    """Create the container cgroup `name` and apply OCI `linux.resources` to it.

    Directories are created only inside the caller's subtree on each hierarchy (see the
    module docstring). On error every directory created here is removed again. Safe to run
    concurrently for different names; an existing cgroup of the same name is reused.
    """
    layout = layout or detect_layout()
    path = container_cgroup_path(name, parent, layout)
    cgroup_class = CgroupV1 if layout.version == 1 else CgroupV2
    cgroup = cgroup_class(layout.version, path, {})

    try:
        _create_dirs(cgroup, layout, path, own_parent=parent is None)
        cgroup.apply(resources or {})
    except BaseException:
        _remove_created(cgroup)
        raise
    log.debug("created cgroup %s (v%d)", path, layout.version)
    return cgroup


def _remove_created(cgroup: Cgroup) -> None:
    # No process has joined yet, so removing the new directories leaf first is enough.
    # A directory that existed before create() is left alone.
    for directory in reversed(cgroup.created):
        try:
            _remove_dir(directory, leaf=False)
        except ContainerError as exc:
            log.warning("failed to remove cgroup %s after a failed create: %s", directory, exc)


def _between(ancestor: str, leaf: str) -> list[str]:
    parents = []
    current = posixpath.dirname(leaf)
    while current != ancestor and _inside(current, ancestor):
        parents.append(current)
        current = posixpath.dirname(current)
    return parents


def _create_dirs(cgroup: Cgroup, layout: Layout, path: str, own_parent: bool) -> None:
    for hierarchy in layout.unique():
        hook = _v2_delegation(hierarchy) if layout.version == 2 else None
        own_directory = hierarchy.directory(hierarchy.own)
        leaf = hierarchy.directory(path)
        cgroup.created.extend(_make_dirs(leaf, own_directory, hook))
        if own_parent:
            cgroup.parents.extend(_between(own_directory, leaf))
    for controller, hierarchy in layout.hierarchies.items():
        cgroup.directories[controller] = hierarchy.directory(path)


def open(record: dict[str, Any]) -> Cgroup:
    """Re-open a cgroup from what Cgroup.to_record() returned; nothing is checked on disk."""
    cgroup_class = CgroupV1 if record["version"] == 1 else CgroupV2
    return cgroup_class(
        record["version"],
        record["spec_path"],
        dict(record["directories"]),
        list(record.get("created", [])),
        list(record.get("parents", [])),
    )
