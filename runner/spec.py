"""Build the OCI runtime config.json of a container from its image config and `lstore run` flags.

The result follows the OCI runtime specification 1.0 (config.md and config-linux.md), so the
built-in runtime and runc read the same file. Defaults copy what docker gives a
container: the same capability set, masked and read-only /proc and /sys paths, device rules
and standard mounts. Building a spec changes nothing on disk. It reads the --env-file files,
the caller's environment for "-e KEY" entries, and /etc/passwd and /etc/group of the image.
"""

from __future__ import annotations

import os
import posixpath
import resource
import stat
from dataclasses import dataclass, field
from typing import Any

from lstore.errors import InvalidArgumentError
from lstore.runner.options import RunOptions

OCI_VERSION = "1.0.2"

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# docker's default capabilities for a container that is not --privileged.
DEFAULT_CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

# Kernel interfaces that leak host information or allow host changes. docker hides them.
MASKED_PATHS = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

# Device cgroup rules: deny everything, then allow creating nodes and using the standard ones
# (major:minor from the kernel's Documentation/admin-guide/devices.txt).
DEFAULT_DEVICE_RULES: list[dict[str, Any]] = [
    {"allow": False, "access": "rwm"},
    {"allow": True, "type": "c", "access": "m"},
    {"allow": True, "type": "b", "access": "m"},
    *(
        {"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"}
        for major, minor in ((1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2))
    ),
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},  # /dev/pts/*
]

# A container in its own network namespace may bind ports below 1024 and send ICMP echo
# without capabilities, as docker 20.10 and later allow.
NETNS_SYSCTLS = {
    "net.ipv4.ip_unprivileged_port_start": "0",
    "net.ipv4.ping_group_range": "0 2147483647",
}

# docker's RLIMIT_NOFILE under systemd (LimitNOFILE=infinity gives fs.nr_open, 1048576).
MAX_NOFILE = 1048576

# Subordinate id range that container root maps to with --userns: uid 0 in the container is
# uid 100000 on the host, and 65536 ids are mapped.
DEFAULT_USERNS_RANGE = (100000, 65536)


def default_mounts() -> list[dict[str, Any]]:
    """Return the mounts every container gets, in mount order (docker's defaults)."""

    def mount(destination: str, fstype: str, source: str, options: list[str]) -> dict:
        return {"destination": destination, "type": fstype, "source": source, "options": options}

    return [
        mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        ),
        mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
        mount(
            "/sys/fs/cgroup", "cgroup", "cgroup", ["nosuid", "noexec", "nodev", "relatime", "ro"]
        ),
        mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        mount(
            "/dev/shm", "tmpfs", "shm", ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
        ),
    ]


def build_spec(
    image_config: dict[str, Any],
    opts: RunOptions,
    *,
    rootfs: str,
    hostname: str,
    mounts: list[dict[str, Any]],
    netns_path: str | None,
    cgroups_path: str,
    resources: dict[str, Any],
    layer_dirs: list[str] | None = None,
    userns_range: tuple[int, int] = DEFAULT_USERNS_RANGE,
) -> dict[str, Any]:
    """Return the OCI config.json (as a dict) for one container.

    `image_config` is the full OCI image config JSON, `rootfs` the value of root.path and
    `mounts` the volume, tmpfs and /etc file mounts in OCI form. A given mount replaces the
    default mount at the same destination. /etc/passwd and /etc/group are read from
    `layer_dirs` (the image layers, bottom first) when given, else from `rootfs`. Raises
    InvalidArgumentError naming the value when a flag cannot be applied to this image.
    """
    config = image_config.get("config") or {}
    user = resolve_user(opts.user or config.get("User") or "", layer_dirs or [rootfs])
    return {
        "ociVersion": OCI_VERSION,
        "process": _process(config, opts, hostname, user),
        "root": {"path": rootfs, "readonly": opts.read_only},
        "hostname": hostname,
        "mounts": _mounts(mounts),
        "linux": _linux(opts, netns_path, cgroups_path, resources, userns_range),
    }


def _process(
    config: dict[str, Any], opts: RunOptions, hostname: str, user: ExecUser
) -> dict[str, Any]:
    # Raising the hard limit needs CAP_SYS_RESOURCE, which lstore itself may lack, so the
    # container gets lstore's own hard limit, up to docker's value.
    nofile = min(MAX_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    process_user: dict[str, Any] = {"uid": user.uid, "gid": user.gid}
    if user.additional_gids:
        process_user["additionalGids"] = user.additional_gids
    return {
        "terminal": opts.tty,
        "user": process_user,
        "args": command_args(config, opts),
        "env": environment(config, opts, hostname, user.home),
        "cwd": working_dir(config, opts),
        "capabilities": {
            key: list(DEFAULT_CAPABILITIES) for key in ("bounding", "effective", "permitted")
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
        "noNewPrivileges": True,
    }


def command_args(config: dict[str, Any], opts: RunOptions) -> list[str]:
    """Combine Entrypoint and Cmd as docker does.

    Arguments after the image replace the image's Cmd. --entrypoint replaces the image's
    Entrypoint and also drops the image's Cmd, and an empty --entrypoint clears it.
    """
    if opts.entrypoint is not None:
        cleared = opts.entrypoint in ([], [""])
        entrypoint = [] if cleared else list(opts.entrypoint)
        cmd = list(opts.command)
    else:
        entrypoint = list(config.get("Entrypoint") or [])
        cmd = list(opts.command) or list(config.get("Cmd") or [])

    args = entrypoint + cmd
    if not args:
        raise InvalidArgumentError(
            f"no command specified for image {opts.image}: the image has no Entrypoint or "
            "Cmd, so give a command after the image name",
            ref=opts.image or None,
        )
    return args


def environment(config: dict[str, Any], opts: RunOptions, hostname: str, home: str) -> list[str]:
    """Merge the environment as docker does; a later entry for a name replaces an earlier one.

    Order: PATH default, HOSTNAME, TERM=xterm with a tty, the image's Env, --env-file lines,
    then -e entries. HOME comes from the user's passwd entry unless set.
    """
    merged: dict[str, str] = {"PATH": DEFAULT_PATH, "HOSTNAME": hostname}
    if opts.tty:
        merged["TERM"] = "xterm"

    entries = list(config.get("Env") or [])
    for path in opts.env_files:
        entries += read_env_file(path)
    entries += opts.env
    for entry in entries:
        name, value = _split_env(entry)
        if value is not None:
            merged[name] = value

    merged.setdefault("HOME", home)
    return [f"{name}={value}" for name, value in merged.items()]


def _split_env(entry: str) -> tuple[str, str | None]:
    # "NAME" alone copies the caller's value and is dropped when the caller has none, as the
    # docker CLI does for -e and --env-file.
    name, sep, value = entry.partition("=")
    if not name.strip():
        raise InvalidArgumentError(f"invalid environment variable {entry!r}: the name is empty")
    if not sep:
        return name, os.environ.get(name)
    return name, value


def read_env_file(path: str) -> list[str]:
    """Read an --env-file: one NAME=VALUE or NAME per line, '#' comments and blank lines skipped.

    Values are taken literally, quotes included, as docker does. Raises InvalidArgumentError
    naming the file and line for unreadable files and lines with an empty name.
    """
    try:
        with open(path, encoding="utf-8") as env_file:
            lines = env_file.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"cannot read env file {path}: {exc}", path=path) from exc

    entries = []
    for number, line in enumerate(lines, start=1):
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("="):
            raise InvalidArgumentError(
                f"invalid line {number} in env file {path}: the variable name is empty", path=path
            )
        name = stripped.split("=", 1)[0]
        if any(character.isspace() for character in name):
            raise InvalidArgumentError(
                f"invalid line {number} in env file {path}: variable {name!r} contains "
                "whitespace",
                path=path,
            )
        entries.append(stripped)
    return entries


def working_dir(config: dict[str, Any], opts: RunOptions) -> str:
    """Return -w, else the image's WorkingDir, else "/". Raises InvalidArgumentError if -w is
    relative."""
    if opts.workdir:
        if not opts.workdir.startswith("/"):
            raise InvalidArgumentError(
                f"invalid working directory {opts.workdir!r}: it must be an absolute path"
            )
        return posixpath.normpath(opts.workdir)
    image_dir = config.get("WorkingDir") or "/"
    return posixpath.normpath(posixpath.join("/", image_dir))


def _mounts(given: list[dict[str, Any]]) -> list[dict[str, Any]]:
    replaced = {posixpath.normpath(m["destination"]) for m in given}
    defaults = [m for m in default_mounts() if m["destination"] not in replaced]
    # Parents before children, so that /data is mounted before /data/cache.
    ordered = sorted(given, key=lambda m: posixpath.normpath(m["destination"]).count("/"))
    return defaults + ordered


def _linux(
    opts: RunOptions,
    netns_path: str | None,
    cgroups_path: str,
    resources: dict[str, Any],
    userns_range: tuple[int, int],
) -> dict[str, Any]:
    linux: dict[str, Any] = {
        "namespaces": _namespaces(opts, netns_path),
        "resources": {"devices": list(DEFAULT_DEVICE_RULES), **resources},
        "cgroupsPath": cgroups_path,
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if opts.network != "host":
        linux["sysctl"] = dict(NETNS_SYSCTLS)
        if opts.userns:
            # The kernel accepts only groups mapped in the user namespace (EINVAL otherwise).
            del linux["sysctl"]["net.ipv4.ping_group_range"]
    if opts.userns:
        host_id, size = userns_range
        mapping = [{"containerID": 0, "hostID": host_id, "size": size}]
        linux["uidMappings"] = mapping
        linux["gidMappings"] = [dict(m) for m in mapping]
    return linux


def _namespaces(opts: RunOptions, netns_path: str | None) -> list[dict[str, str]]:
    namespaces = [{"type": kind} for kind in ("pid", "ipc", "uts", "mount")]
    if opts.network != "host":
        network = {"type": "network"}
        if netns_path:
            network["path"] = netns_path
        namespaces.append(network)
    if opts.userns:
        namespaces.append({"type": "user"})
    return namespaces


# ---------------------------------------------------------------------------- users


@dataclass(frozen=True)
class ExecUser:
    """The ids and home directory a container process runs with."""

    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = field(default_factory=list)
    home: str = "/"


def resolve_user(spec: str, root_dirs: list[str]) -> ExecUser:
    """Resolve a -u value ("uid[:gid]", "name[:group]" or empty for root) against the image.

    `root_dirs` are the image layers bottom first, or one root filesystem. The rules are
    runc's. A name must exist in /etc/passwd, but a number need not. The user's primary
    group applies unless a group is given. Without an explicit group, the groups that list
    the user in /etc/group become additional groups. Raises InvalidArgumentError for
    unknown names.
    """
    user_part, _, group_part = spec.partition(":")
    passwd = _parse_db(read_image_file(root_dirs, "/etc/passwd"), 7)
    entry = _find_entry(passwd, user_part or "0")
    if entry is None and not _is_id(user_part or "0"):
        raise InvalidArgumentError(
            f"unable to find user {user_part}: no matching entries in passwd file"
        )

    if entry is not None:
        name, uid, gid, home = entry[0], _id(entry[2]), _id(entry[3]), entry[5] or "/"
    else:
        name, uid, gid, home = "", _id(user_part or "0"), 0, "/"
    groups = _parse_db(read_image_file(root_dirs, "/etc/group"), 4)

    if group_part:
        return ExecUser(uid, _resolve_group(groups, group_part), [], home)
    members = [_id(g[2]) for g in groups if name and name in g[3].split(",")]
    return ExecUser(uid, gid, members, home)


def _resolve_group(groups: list[list[str]], group_part: str) -> int:
    entry = _find_entry(groups, group_part)
    if entry is not None:
        return _id(entry[2])
    if _is_id(group_part):
        return _id(group_part)
    raise InvalidArgumentError(
        f"unable to find group {group_part}: no matching entries in group file"
    )


def _find_entry(entries: list[list[str]], name_or_id: str) -> list[str] | None:
    for entry in entries:
        if name_or_id in (entry[0], entry[2]):
            return entry
    return None


def _is_id(text: str) -> bool:
    return text.isdigit() and int(text) < 2**31


def _id(text: str) -> int:
    if not _is_id(text):
        raise InvalidArgumentError(f"invalid user or group id {text!r}: expected 0 to 2^31-1")
    return int(text)


def _parse_db(text: str | None, field_count: int) -> list[list[str]]:
    # Malformed lines (too few fields, a non-numeric id) and comments are skipped.
    entries = []
    for line in (text or "").splitlines():
        fields = line.split(":")
        if line.startswith("#") or len(fields) < field_count or not fields[2].isdigit():
            continue
        entries.append(fields[:field_count])
    return entries


# ---------------------------------------------------------------------------- image files

_WHITEOUT_DEVICE = 0  # overlayfs whiteouts are character devices 0:0
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
_MAX_SYMLINKS = 40


def read_image_file(root_dirs: list[str], path: str, _depth: int = 0) -> str | None:
    """Return the text of `path` in the union of `root_dirs` (bottom first), None if absent.

    Follows overlayfs rules: the topmost layer with the entry wins, and a whiteout or an
    opaque directory on the way hides the lower layers. A symlink resolves inside the union,
    never outside it. NOTE: a symlink in place of a parent directory is not followed, and
    the file then counts as absent.
    """
    if _depth > _MAX_SYMLINKS:
        return None
    relative = posixpath.normpath(posixpath.join("/", path)).lstrip("/")
    for layer in reversed(root_dirs):
        found = _lookup(layer, relative)
        if found is _HIDDEN:
            return None
        if found is None:
            continue
        mode, full = found
        if stat.S_ISLNK(mode):
            target = posixpath.join(posixpath.dirname("/" + relative), os.readlink(full))
            return read_image_file(root_dirs, target, _depth + 1)
        if not stat.S_ISREG(mode):
            return None
        with open(full, encoding="utf-8", errors="replace") as image_file:
            return image_file.read()
    return None


_HIDDEN = object()  # a whiteout or opaque directory in this layer hides the lower ones


def _lookup(layer: str, relative: str) -> tuple[int, str] | object | None:
    current = layer
    opaque = False
    parts = relative.split("/")
    for index, part in enumerate(parts):
        current = os.path.join(current, part)
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return _HIDDEN if opaque else None
        if stat.S_ISCHR(info.st_mode) and info.st_rdev == _WHITEOUT_DEVICE:
            return _HIDDEN
        if index == len(parts) - 1:
            return info.st_mode, current
        if not stat.S_ISDIR(info.st_mode):
            return _HIDDEN
        opaque = opaque or _is_opaque(current)
    return None


def _is_opaque(directory: str) -> bool:
    for name in _OPAQUE_XATTRS:
        try:
            if os.getxattr(directory, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False
