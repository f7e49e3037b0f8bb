"""The options of `lstore run`, shared by the spec builder, the runtime and the lifecycle code.

Values keep the form the user gave where a later module parses them (ports, volumes, device
limits), and are already converted where the unit matters to every reader (bytes, seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RunOptions:
    """The settings of one container, as `lstore run` parsed them from its flags."""

    image: str = ""
    """Image reference as typed, such as "busybox" or "registry.host/debian-nginx:oci"."""

    command: list[str] = field(default_factory=list)
    """Arguments after the image; empty means the image's Cmd."""

    entrypoint: list[str] | None = None
    """--entrypoint: None keeps the image's Entrypoint, [] clears it (docker semantics)."""

    env: list[str] = field(default_factory=list)
    """-e entries, "KEY=VALUE", or "KEY" alone to copy the value from the caller's environment."""

    env_files: list[str] = field(default_factory=list)
    """--env-file paths of files with KEY=VALUE lines, read in order before `env`."""

    workdir: str | None = None
    """-w: absolute working directory inside the container; None keeps the image's."""

    user: str | None = None
    """-u: "uid[:gid]" or "name[:group]" resolved in the image; None keeps the image's."""

    name: str | None = None
    """--name: unique container name; None lets lstore generate one."""

    hostname: str | None = None
    """--hostname; None means the first 12 hex digits of the container id."""

    network: str = "bridge"
    """--network: "bridge" (lstore0 with NAT), "none" (loopback only) or "host"."""

    publish: list[str] = field(default_factory=list)
    """-p entries as typed: "[ip:]hostPort:containerPort[/proto]"."""

    volumes: list[str] = field(default_factory=list)
    """-v entries as typed: "name:/path[:ro]" (named volume) or "/host:/path[:ro]" (bind)."""

    tmpfs: list[str] = field(default_factory=list)
    """--tmpfs entries: "/path[:options]"."""

    read_only: bool = False
    """--read-only: mount the root filesystem read-only."""

    rm: bool = False
    """--rm: remove the container and everything it owns once it exits."""

    detach: bool = False
    """-d: print the container id and return instead of attaching."""

    interactive: bool = False
    """-i: keep stdin open and pass the caller's stdin to the container."""

    tty: bool = False
    """-t: give the container a pseudo-terminal as stdin, stdout and stderr."""

    userns: bool = False
    """--userns: run in a new user namespace mapping container root to an unprivileged range."""

    memory: int | None = None
    """--memory in bytes; None means no limit."""

    cpus: float | None = None
    """--cpus: number of CPUs, such as 0.5; converted to a CFS quota per period."""

    cpu_quota: int | None = None
    """--cpu-quota in microseconds of CPU time per period; None means no quota."""

    cpu_period: int | None = None
    """--cpu-period in microseconds; None means the kernel default (100000)."""

    pids_limit: int | None = None
    """--pids-limit: maximum number of tasks in the container; None means no limit."""

    device_write_bps: list[str] = field(default_factory=list)
    """--device-write-bps entries as typed: "/dev/path:rate", rate in bytes with k/m/g suffix."""

    cgroup_parent: str | None = None
    """--cgroup-parent: cgroup path to create the container's cgroup under; None means the
    caller's own cgroup."""

    runtime: str = "builtin"
    """--runtime: "builtin" (lstore's own) or "runc"."""

    init: bool = False
    """--init: run a small init as PID 1 that forwards signals and reaps zombies."""

    health_cmd: str | None = None
    """--health-cmd: shell command run inside the container; None keeps the image's check."""

    health_interval: float | None = None
    """--health-interval in seconds; None means the image's value or 30."""

    stop_signal: str | None = None
    """--stop-signal as typed ("SIGUSR1", "USR1" or "10"); None means the image's or SIGTERM."""

    stop_timeout: float | None = None
    """--stop-timeout in seconds before SIGKILL follows the stop signal; None means 10."""

    subnet: str | None = None
    """--subnet: CIDR of the bridge network to join. Each subnet has its own network and bridge
    (lstore1, lstore2, ...), created on first use and kept. None means the default network
    lstore0, with a free subnet from 198.18.0.0/15."""
