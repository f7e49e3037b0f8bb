"""Container records in LMDB: the `containers` database (id -> record) and `names` (name -> id).

A record is written when a container is created and changed by one write transaction per
state transition, so every process (the CLI, the supervisor, a second CLI running `rm -f`)
sees either the old or the new state, never half of one. A record outlives a crash of the
process that wrote it: `ps -a` shows such a container and `rm -f` tears it down.
"""

from __future__ import annotations

import datetime
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lstore.errors import AlreadyExistsError, ContainerError, InvalidArgumentError, NotFoundError
from lstore.store.meta import Meta

# Docker's states (`docker inspect` State.Status). lstore never pauses or restarts.
CREATED = "created"
RUNNING = "running"
EXITED = "exited"
REMOVING = "removing"
# Computed, never stored: a running record whose supervisor is gone.
DEAD = "dead"

# docker's rule for container names. The name becomes an LMDB key and appears in paths and
# messages, so no "/" and no leading "." or "-".
NAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
# docker sets no maximum; this one keeps names readable in `ps` and well under LMDB's
# 511-byte key limit.
MAX_NAME_LENGTH = 128

# The zero time that docker prints for StartedAt/FinishedAt of a container that never ran.
ZERO_TIME = "0001-01-01T00:00:00Z"


@dataclass
class Container:
    """One container's record; `options` is RunOptions as a dict, the rest is runtime state."""

    id: str
    name: str
    image: str
    image_digest: str
    created: str
    path: str
    options: dict[str, Any]
    state: str = CREATED
    pid: int = 0
    pid_start: int = 0
    supervisor_pid: int = 0
    supervisor_start: int = 0
    exit_code: int | None = None
    oom_killed: bool = False
    oom_kill_count: int = 0
    # The image config's digest, which docker shows as the image ID.
    image_id: str = ""
    error: str = ""
    started_at: str = ZERO_TIME
    finished_at: str = ZERO_TIME
    stop_signal: int = 15
    stop_timeout: float = 10.0
    args: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    mounted: bool = False
    # The image's snapshots, which gc keeps while this record exists, even after rmi -f.
    chain_ids: list[str] = field(default_factory=list)
    cgroup: dict[str, Any] | None = None
    network: dict[str, Any] | None = None
    mounts: list[dict[str, Any]] = field(default_factory=list)
    health: dict[str, Any] | None = None

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def bundle(self) -> str:
        return os.path.join(self.path, "bundle")

    @property
    def rootfs(self) -> str:
        return os.path.join(self.path, "bundle", "rootfs")

    @property
    def log_path(self) -> str:
        return os.path.join(self.path, "log")

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Container":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in known})

    def status(self) -> str:
        """Return the state, with `dead` for a running record whose supervisor has gone."""
        if self.state in (RUNNING, CREATED) and self.supervisor_pid:
            if not process_alive(self.supervisor_pid, self.supervisor_start):
                return DEAD
        return self.state


def new_id() -> str:
    """Return a random container id: 64 hex digits, like docker's."""
    return secrets.token_hex(32)


def rfc3339_nano(ns: int | None = None) -> str:
    """Format a time in ns since the epoch as RFC 3339 in UTC with up to 9 fraction digits.

    Trailing zeros of the fraction are dropped, as Go's time.RFC3339Nano does, so the log
    and inspect output match docker's byte for byte in form.
    """
    if ns is None:
        ns = time.time_ns()
    seconds, fraction = divmod(ns, 1_000_000_000)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    digits = f"{fraction:09d}".rstrip("0")
    suffix = f".{digits}" if digits else ""
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + suffix + "Z"


def parse_rfc3339(text: str) -> float:
    """Return seconds since the epoch for a time that rfc3339_nano formatted."""
    main, _, fraction = text.rstrip("Z").partition(".")
    moment = datetime.datetime.strptime(main, "%Y-%m-%dT%H:%M:%S")
    seconds = moment.replace(tzinfo=datetime.timezone.utc).timestamp()
    return seconds + (float("0." + fraction) if fraction else 0.0)


def process_start_ticks(pid: int) -> int | None:
    """Return the start time of a process (clock ticks since boot), or None if it is gone.

    Stored next to a pid, it distinguishes a live process from a later one reusing the pid.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None

    # Field 2 (comm) may contain spaces and parentheses, so count fields after its last ")".
    after_comm = data[data.rindex(b")") + 2 :].split()
    if after_comm[0] == b"Z":
        return None
    return int(after_comm[19])


def process_alive(pid: int, start_ticks: int) -> bool:
    return pid > 0 and process_start_ticks(pid) == start_ticks


# Storage. Each function is one LMDB transaction.


def check_name(name: str) -> None:
    """Raise InvalidArgumentError unless `name` follows docker's rule and MAX_NAME_LENGTH."""
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgumentError(
            f"invalid container name ({name[:20]}...): it has {len(name)} characters, "
            f"and at most {MAX_NAME_LENGTH} are allowed",
            ref=name,
        )
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgumentError(
            f"invalid container name ({name}): only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed "
            "(at least 2 characters)",
            ref=name,
        )


def reserve(meta: Meta, container: Container) -> None:
    """Store a new record and claim its name, atomically.

    Raises InvalidArgumentError for a malformed name and AlreadyExistsError if the name is
    taken; nothing is written then.
    """
    check_name(container.name)
    with meta.write() as txn:
        owner = txn.get("names", container.name)
        if owner is not None:
            raise AlreadyExistsError(
                f"container name {container.name!r} is already used by container "
                f"{owner['id'][:12]}; remove that container or choose another --name",
                ref=container.name,
            )
        txn.put("names", container.name, {"id": container.id})
        txn.put("containers", container.id, container.to_record())


def load(meta: Meta, container_id: str) -> Container:
    with meta.read() as txn:
        record = txn.get("containers", container_id)
    if record is None:
        raise NotFoundError(f"no such container: {container_id}", ref=container_id)
    return Container.from_record(record)


def update(
    meta: Meta, container_id: str, *, expect: tuple[str, ...] = (), **changes: Any
) -> Container:
    """Apply `changes` to a record in one write transaction and return the new record.

    With `expect`, the change happens only if the stored state is one of those states;
    otherwise ContainerError is raised and nothing changes.
    """
    with meta.write() as txn:
        record = txn.get("containers", container_id)
        if record is None:
            raise NotFoundError(f"no such container: {container_id}", ref=container_id)
        if expect and record["state"] not in expect:
            raise ContainerError(
                f"container {container_id[:12]} is {record['state']}, not {' or '.join(expect)}",
                ref=container_id,
            )
        record.update(changes)
        txn.put("containers", container_id, record)
    return Container.from_record(record)


def delete(meta: Meta, container: Container) -> None:
    """Remove a record and its name in one transaction; a missing record is not an error."""
    with meta.write() as txn:
        txn.delete("containers", container.id)
        owner = txn.get("names", container.name)
        if owner is not None and owner["id"] == container.id:
            txn.delete("names", container.name)


def list_all(meta: Meta) -> list[Container]:
    """Return every record, newest first."""
    with meta.read() as txn:
        records = [Container.from_record(value) for _, value in txn.items("containers")]
    return sorted(records, key=lambda container: container.created, reverse=True)


def resolve(meta: Meta, text: str) -> Container:
    """Find a container by name, full id or unique id prefix, as docker does."""
    if not text:
        raise InvalidArgumentError("container name or id is empty")
    with meta.read() as txn:
        owner = txn.get("names", text.lstrip("/"))
        record = txn.get("containers", owner["id"]) if owner else txn.get("containers", text)
        if record is None:
            record = _unique_prefix(txn, text)
    return Container.from_record(record)


def _unique_prefix(txn: Any, prefix: str) -> dict[str, Any]:
    matches = [value for _, value in txn.items("containers", prefix.lower())]
    if not matches:
        raise NotFoundError(f"no such container: {prefix}", ref=prefix)
    if len(matches) > 1:
        raise InvalidArgumentError(
            f"container id prefix {prefix!r} matches {len(matches)} containers; "
            "give more digits or the name",
            ref=prefix,
        )
    return matches[0]


# Generated names: an adjective and an animal, with a number added on a clash.
_ADJECTIVES = (
    "brave calm eager fond gentle happy keen lively merry nimble proud quiet "
    "rapid sharp steady swift tidy vivid warm witty bold clever jolly quick"
).split()
_ANIMALS = (
    "badger beaver bison crane dingo eagle ferret gecko heron ibis jackal koala "
    "lemur marten newt otter panda quail raven salmon tapir urchin walrus yak"
).split()


def generate_name(meta: Meta) -> str:
    """Return a name such as "keen_otter" that no container uses yet."""
    with meta.read() as txn:
        for attempt in range(100):
            name = f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_ANIMALS)}"
            if attempt >= 10:
                name += str(secrets.randbelow(1000))
            if txn.get("names", name) is None:
                return name
    raise ContainerError("cannot find a free container name; pass --name")


# Views: `inspect` and `ps` show records the way docker shows containers.


def port_bindings(container: Container) -> dict[str, list[dict[str, str]]]:
    """Return docker's NetworkSettings.Ports: {"80/tcp": [{"HostIp", "HostPort"}]}."""
    bindings: dict[str, list[dict[str, str]]] = {}
    for port in (container.network or {}).get("ports", []):
        key = f"{port['container_port']}/{port.get('protocol', 'tcp')}"
        host = {"HostIp": port.get("host_ip") or "0.0.0.0", "HostPort": str(port["host_port"])}
        bindings.setdefault(key, []).append(host)
    return bindings


def ports_text(container: Container) -> str:
    """Return the PORTS column of `ps`, such as "127.0.0.1:8080->80/tcp".

    Only a running container has its ports published, so others show none, as in docker.
    """
    if container.status() != RUNNING:
        return ""
    entries = []
    for key, hosts in port_bindings(container).items():
        entries += [f"{host['HostIp']}:{host['HostPort']}->{key}" for host in hosts]
    return ", ".join(entries)


def inspect_view(container: Container) -> dict[str, Any]:
    """Return the container as docker's `inspect` JSON shows it (the fields lstore has)."""
    status = container.status()
    network = container.network or {}
    return {
        "Id": container.id,
        "Created": container.created,
        "Path": container.args[0] if container.args else "",
        "Args": container.args[1:],
        "State": _state_view(container, status),
        "Image": container.image_id or container.image_digest,
        "Name": "/" + container.name,
        "ResolvConfPath": os.path.join(container.path, "resolv.conf"),
        "HostnamePath": os.path.join(container.path, "hostname"),
        "HostsPath": os.path.join(container.path, "hosts"),
        "LogPath": container.log_path,
        "Driver": "overlay",
        "HostConfig": _host_config_view(container),
        "Mounts": [_mount_view(mount) for mount in container.mounts if _user_mount(mount)],
        "Config": container.config,
        "NetworkSettings": {
            "SandboxKey": network.get("netns_path") or "",
            "IPAddress": network.get("address") or "",
            "IPPrefixLen": network.get("prefix_len") or 0,
            "Gateway": network.get("gateway") or "",
            "Ports": port_bindings(container),
        },
    }


def _state_view(container: Container, status: str) -> dict[str, Any]:
    state = {
        "Status": status,
        "Running": status == RUNNING,
        "Paused": False,
        "Restarting": False,
        "OOMKilled": container.oom_killed,
        "OOMKillCount": container.oom_kill_count,
        "Dead": status == DEAD,
        "Pid": container.pid if status == RUNNING else 0,
        "ExitCode": container.exit_code or 0,
        "Error": container.error,
        "StartedAt": container.started_at,
        "FinishedAt": container.finished_at,
    }
    if container.health is not None:
        state["Health"] = container.health
    return state


def _host_config_view(container: Container) -> dict[str, Any]:
    options = container.options
    return {
        "NetworkMode": options.get("network", "bridge"),
        "AutoRemove": bool(options.get("rm")),
        "Runtime": options.get("runtime", "builtin"),
        "Init": bool(options.get("init")),
        "ReadonlyRootfs": bool(options.get("read_only")),
        "Memory": options.get("memory") or 0,
        "NanoCpus": int((options.get("cpus") or 0) * 1e9),
        "CpuQuota": options.get("cpu_quota") or 0,
        "CpuPeriod": options.get("cpu_period") or 0,
        "PidsLimit": options.get("pids_limit"),
        "CgroupParent": options.get("cgroup_parent") or "",
        "Binds": options.get("volumes") or [],
        "PortBindings": port_bindings(container),
    }


# Mounts lstore adds itself; `inspect` lists only those the user asked for, as docker does.
_INTERNAL_DESTINATIONS = {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/sbin/lstore-init"}


def _user_mount(mount: dict[str, Any]) -> bool:
    return mount.get("destination") not in _INTERNAL_DESTINATIONS


def _mount_view(mount: dict[str, Any]) -> dict[str, Any]:
    options = mount.get("options") or []
    source = mount.get("source", "")
    kind = mount.get("type", "bind")
    name = ""
    if source.endswith("/_data") and "/volumes/" in source:
        kind = "volume"
        name = os.path.basename(os.path.dirname(source))
    return {
        "Type": kind,
        "Name": name,
        "Source": source,
        "Destination": mount.get("destination", ""),
        "Mode": "ro" if "ro" in options else "",
        "RW": "ro" not in options,
    }


def volume_names(container: Container, volumes_dir: str) -> list[str]:
    """Return the names of the volumes (named and anonymous) that a container mounts."""
    prefix = volumes_dir.rstrip("/") + "/"
    names = []
    for mount in container.mounts:
        source = mount.get("source", "")
        if source.startswith(prefix) and source.endswith("/_data"):
            names.append(source[len(prefix) : -len("/_data")])
    return names
