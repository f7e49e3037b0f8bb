"""Container lifecycle: create, start, stop, kill, wait, remove, and the release of resources.

Creating a container reserves its name and record first and saves each resource in the
record as soon as it exists, so a crash at any point leaves a record that `rm -f` can tear
down. Starting hands the container to its supervisor (runner/supervisor.py), which records
the exit and releases the network, cgroup and mount. `remove_resources` repeats every step
idempotently, so it also cleans up after a supervisor that died.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import time
from dataclasses import asdict, dataclass, replace
from typing import IO, Any

from lstore.errors import ContainerError, InvalidArgumentError, LstoreError, StoreError
from lstore.runner import containers
from lstore.runner.containers import Container
from lstore.runner.options import RunOptions
from lstore.runner.spec import DEFAULT_USERNS_RANGE

log = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT = 10.0

# Static init that --init runs as PID 1 (Debian package tini; docker ships the same program
# as docker-init). It forwards signals to its child, reaps orphans and exits with the
# child's status, 128+N when a signal N killed the child.
INIT_BINARY = "/usr/bin/tini-static"
INIT_PATH = "/sbin/lstore-init"

# After SIGKILL, PID 1 is gone within milliseconds unless it sits in uninterruptible sleep.
KILL_WAIT = 10.0
# The supervisor releases network, cgroup and mount after the exit. Removing a veth and NAT
# rules takes well under a second, so the cap leaves room for a loaded machine.
TEARDOWN_WAIT = 30.0
# How often `wait` reads the record while the container runs.
POLL_INTERVAL = 0.02

# Host ids of container uid and gid 0 with --userns, and how many ids are mapped.
USERNS_RANGE = DEFAULT_USERNS_RANGE


# ---------------------------------------------------------------------------- signals


def parse_signal(text: str | int) -> int:
    """Parse a signal as docker accepts it: "SIGUSR1", "USR1", "usr1" or "10"."""
    value = str(text).strip()
    if value.isdigit():
        number = int(value)
        if 0 < number < signal.NSIG:
            return number
    else:
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        member = getattr(signal.Signals, name, None) if name.isidentifier() else None
        if isinstance(member, signal.Signals):
            return int(member)
    raise InvalidArgumentError(f"invalid signal {text!r}: use a name such as SIGTERM or a number")


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


# ---------------------------------------------------------------------------- create


def create(store: Any, options: RunOptions, image: Any) -> Container:
    """Create a container from an image: record, overlay rootfs, cgroup, network, config.json.

    The name is reserved atomically with the record. On error everything made so far is
    released and the record removed, so a failed create leaves nothing behind.
    """
    from lstore.runner import network

    stop_signal = parse_signal(_stop_signal_text(options, image.config))
    if options.init and not os.path.exists(INIT_BINARY):
        raise ContainerError(
            f"--init needs {INIT_BINARY}; install it with 'apt-get install tini'", path=INIT_BINARY
        )
    network.check_ports(options.publish)

    container = _new_record(store, options, image, stop_signal)
    containers.reserve(store.meta, container)
    try:
        return _prepare(store, container, options, image)
    except BaseException:
        remove_resources(store.meta, containers.load(store.meta, container.id))
        raise


def _stop_signal_text(options: RunOptions, image_config: dict[str, Any]) -> str:
    return options.stop_signal or (image_config.get("config") or {}).get("StopSignal") or "SIGTERM"


def _new_record(store: Any, options: RunOptions, image: Any, stop_signal: int) -> Container:
    container_id = containers.new_id()
    stop_timeout = DEFAULT_STOP_TIMEOUT if options.stop_timeout is None else options.stop_timeout
    return Container(
        id=container_id,
        name=options.name or containers.generate_name(store.meta),
        image=image.name,
        image_digest=image.digest,
        image_id=image.config_digest,
        chain_ids=list(image.chain_ids),
        created=containers.rfc3339_nano(),
        path=os.path.join(store.containers_dir, container_id),
        options=asdict(options),
        stop_signal=stop_signal,
        stop_timeout=stop_timeout,
    )


def _prepare(store: Any, container: Container, options: RunOptions, image: Any) -> Container:
    from lstore.runner import cgroups, network, volumes
    from lstore.runner.spec import build_spec

    meta = store.meta
    _mount_rootfs(store, container, options, image.layer_dirs)
    container = containers.update(meta, container.id, mounted=True)

    resources = cgroups.resources_from_options(
        memory=options.memory,
        cpus=options.cpus,
        cpu_quota=options.cpu_quota,
        cpu_period=options.cpu_period,
        pids_limit=options.pids_limit,
        device_write_bps=options.device_write_bps,
    )
    cgroup = cgroups.create(container.id, options.cgroup_parent, resources)
    container = containers.update(meta, container.id, cgroup=cgroup.to_record())

    attachment = network.attach(
        meta, container.id, options.network, options.publish, options.subnet
    )
    container = containers.update(meta, container.id, network=_network_record(attachment))

    hostname = options.hostname or container.short_id
    owner = _mapped_root(options)
    mounts = volumes.prepare_mounts(
        meta, store.volumes_dir, options.volumes, options.tmpfs, container.rootfs, owner=owner
    )
    mounts += _etc_mounts(container, options, hostname, attachment, owner)
    if options.init:
        mounts.append(_bind(INIT_BINARY, INIT_PATH, readonly=True))

    spec = build_spec(
        image.config,
        options,
        rootfs=container.rootfs,
        hostname=hostname,
        mounts=mounts,
        netns_path=attachment.netns_path,
        cgroups_path=cgroup.spec_path,
        resources=resources,
        layer_dirs=image.layer_dirs,
        userns_range=USERNS_RANGE,
    )
    # ps and inspect show the user's command, as docker does, not the init wrapping it.
    command = list(spec["process"]["args"])
    if options.init:
        spec["process"]["args"] = [INIT_PATH, "--", *command]
    _write_json(os.path.join(container.bundle, "config.json"), spec)

    return containers.update(
        meta,
        container.id,
        mounts=mounts,
        args=command,
        config=_inspect_config(options, image.config, spec, hostname, container.stop_signal),
    )


def _mount_rootfs(store: Any, container: Container, options: RunOptions,
                  layer_dirs: list[str]) -> None:
    """Mount the container's overlay; with --userns, on idmapped layers (runner/idmap.py)."""
    from lstore.store.overlay import mount_overlay

    for sub in ("work", "bundle/rootfs"):
        os.makedirs(os.path.join(container.path, sub), mode=0o700)

    # The overlay's root directory takes the upper directory's mode, and a container user
    # other than root must be able to traverse "/".
    upper = os.path.join(container.path, "upper")
    work = os.path.join(container.path, "work")
    os.mkdir(upper)
    os.chmod(upper, 0o755)
    if not options.userns:
        mount_overlay(container.rootfs, layer_dirs, upper, work)
        return

    idmapped = _prepare_userns_layers(store, container, upper, work, layer_dirs)
    try:
        mount_overlay(container.rootfs, idmapped, upper, work)
    except StoreError as exc:
        raise ContainerError(
            f"{exc}; --userns needs overlayfs that takes idmapped lower layers "
            "(Linux 5.19 or later)",
            path=container.rootfs,
        ) from exc


def _prepare_userns_layers(store: Any, container: Container, upper: str, work: str,
                           layer_dirs: list[str]) -> list[str]:
    """Give the mapped root the container's directories; return idmapped layer mounts."""
    from lstore.runner import idmap

    # The runtime looks up the rootfs path as the mapped root, inside the user namespace.
    idmap.make_searchable([store.containers_dir, container.path, container.bundle])
    idmap.check_searchable(store.containers_dir, USERNS_RANGE)

    host_id = USERNS_RANGE[0]
    for directory in (upper, work):
        os.chown(directory, host_id, host_id)
    return idmap.mount_layers(container.path, layer_dirs, USERNS_RANGE)


def _mapped_root(options: RunOptions) -> tuple[int, int] | None:
    """Return the host uid and gid of container root with --userns, else None."""
    return (USERNS_RANGE[0], USERNS_RANGE[0]) if options.userns else None


def _network_record(attachment: Any) -> dict[str, Any]:
    ports = [
        asdict(port) if hasattr(port, "__dataclass_fields__") else port
        for port in (attachment.ports or [])
    ]
    return {
        "netns_path": attachment.netns_path,
        "address": attachment.address,
        "gateway": attachment.gateway,
        "prefix_len": attachment.prefix_len,
        "ports": ports,
    }


def _etc_mounts(
    container: Container,
    options: RunOptions,
    hostname: str,
    attachment: Any,
    owner: tuple[int, int] | None,
) -> list[dict[str, Any]]:
    """Write /etc/hosts, /etc/hostname and /etc/resolv.conf into the container directory.

    `owner` (the mapped root with --userns) gets the files, so container root may edit them.
    """
    from lstore.runner import etcfiles, resolvconf

    if options.network == "host":
        hosts = _read_text("/etc/hosts")
    else:
        hosts = etcfiles.hosts_file(hostname, attachment.address)
    files = {
        "hosts": hosts,
        "hostname": etcfiles.hostname_file(hostname),
        "resolv.conf": resolvconf.resolv_conf(options.network),
    }
    mounts = []
    for name, text in files.items():
        path = os.path.join(container.path, name)
        with open(path, "w") as handle:
            handle.write(text)
        if owner is not None:
            os.chown(path, *owner)
        mounts.append(_bind(path, "/etc/" + name, readonly=options.read_only))
    return mounts


def _read_text(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def _bind(source: str, destination: str, *, readonly: bool) -> dict[str, Any]:
    options = ["rbind", "rprivate"] + (["ro"] if readonly else [])
    return {"destination": destination, "type": "bind", "source": source, "options": options}


def _write_json(path: str, value: dict[str, Any]) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(value, handle, indent=1)
    os.replace(temporary, path)


def _inspect_config(
    options: RunOptions,
    image_config: dict[str, Any],
    spec: dict[str, Any],
    hostname: str,
    stop_signal: int,
) -> dict[str, Any]:
    """Return docker's Config section of `inspect`: the settings as the user sees them."""
    image = image_config.get("config") or {}
    entrypoint = image.get("Entrypoint") if options.entrypoint is None else options.entrypoint
    if options.command:
        command = options.command
    else:
        command = image.get("Cmd") if options.entrypoint is None else None
    process = spec["process"]
    healthcheck = dict(image.get("Healthcheck") or {})
    if options.health_cmd:
        healthcheck["Test"] = ["CMD-SHELL", options.health_cmd]
    return {
        "Hostname": hostname,
        "User": options.user or image.get("User", ""),
        "Env": process.get("env", []),
        "Cmd": command,
        "Entrypoint": entrypoint,
        "Image": options.image,
        "WorkingDir": process.get("cwd", "/"),
        "Tty": options.tty,
        "OpenStdin": options.interactive,
        "Labels": image.get("Labels") or {},
        "StopSignal": signal_name(stop_signal),
        "Healthcheck": healthcheck or None,
        "ExposedPorts": image.get("ExposedPorts") or {},
    }


# ---------------------------------------------------------------------------- start


@dataclass
class Started:
    """A container that its supervisor has started; `sync` reports its exit and teardown."""

    container: Container
    supervisor_pid: int
    sync: IO[bytes]

    def finish(self) -> int:
        """Wait for the exit and the supervisor's teardown; return the container's exit code.

        Raises ContainerError when the supervisor ended without recording an exit.
        """
        exit_code = None
        for line in self.sync:
            kind, _, rest = line.decode().rstrip("\n").partition(" ")
            if kind == "exit":
                exit_code = int(rest)
        self.sync.close()
        if exit_code is not None:
            return exit_code
        raise ContainerError(
            f"the supervisor of container {self.container.short_id} ended without recording "
            f"an exit; see {self.container.path}/supervisor.log",
            ref=self.container.id,
        )


def start(root: str, container: Container, *, attach: bool) -> Started:
    """Start a created container under a new supervisor and wait until it runs.

    With `attach`, the supervisor copies the output to this process's stdout and stderr and
    gives the container this process's stdin (with -i). Raises ContainerError when the
    runtime fails; the supervisor then releases the container's resources.
    """
    from lstore.runner.launch import spawn_supervisor

    read_end, write_end = os.pipe()
    passed = {"--sync": write_end}
    if attach:
        passed.update(_attached_fds(container.options))
    argv = ["--root", root, "--id", container.id]
    for flag, fd in passed.items():
        argv += [flag, str(fd)]

    spawn_supervisor(argv, list(passed.values()), os.path.join(container.path, "supervisor.log"))
    for fd in passed.values():
        os.close(fd)

    sync = os.fdopen(read_end, "rb")
    return _read_started(container, sync)


def _attached_fds(options: dict[str, Any]) -> dict[str, int]:
    # Duplicates: the supervisor's stdio are /dev/null and its log, so the client's
    # descriptors travel under other numbers.
    fds = {"--stdout": os.dup(1)}
    if options["interactive"]:
        fds["--stdin"] = os.dup(0)
    if not options["tty"]:
        fds["--stderr"] = os.dup(2)
    return fds


def _read_started(container: Container, sync: IO[bytes]) -> Started:
    line = sync.readline().decode().rstrip("\n")
    kind, _, rest = line.partition(" ")
    if kind == "started":
        container_pid, supervisor_pid = (int(value) for value in rest.split())
        container = replace(
            container, state=containers.RUNNING, pid=container_pid, supervisor_pid=supervisor_pid
        )
        return Started(container, supervisor_pid, sync)

    sync.read()  # EOF comes once the supervisor has released the container
    sync.close()
    if kind == "error":
        raise ContainerError(
            f"container {container.short_id} failed to start: {rest}", ref=container.id
        )
    raise ContainerError(
        f"the supervisor of container {container.short_id} exited before starting it; "
        f"see {container.path}/supervisor.log",
        ref=container.id,
    )


# ---------------------------------------------------------------------------- signals, stop


def _open_pidfd(pid: int, start_ticks: int) -> int | None:
    """Open a pidfd for `pid` if it is still the process started at `start_ticks`."""
    if not containers.process_alive(pid, start_ticks):
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None

    # The pid may have been reused between the check and the open; the pidfd is stable.
    if not containers.process_alive(pid, start_ticks):
        os.close(pidfd)
        return None
    return pidfd


def _wait_pidfd(pidfd: int, timeout: float | None) -> bool:
    """Wait until the process exits; return False if `timeout` seconds passed first."""
    ready, _, _ = select.select([pidfd], [], [], timeout)
    return bool(ready)


def kill(meta: Any, container: Container, signum: int) -> None:
    """Send a signal to the container's PID 1. Raises ContainerError if it is not running."""
    pidfd = _open_pidfd(container.pid, container.pid_start) if container.pid else None
    if container.status() != containers.RUNNING or pidfd is None:
        raise ContainerError(f"container {container.name} is not running", ref=container.id)
    try:
        signal.pidfd_send_signal(pidfd, signum)
    finally:
        os.close(pidfd)
    log.info("sent %s to container %s", signal_name(signum), container.short_id)


def stop(meta: Any, container: Container, timeout: float | None = None) -> Container:
    """Stop a container: its stop signal, then SIGKILL after `timeout` seconds.

    Returns once the supervisor has recorded the exit and released the container (or, for
    --rm, removed it). A container that is not running is left as it is.
    """
    timeout = container.stop_timeout if timeout is None else timeout
    pidfd = _open_pidfd(container.pid, container.pid_start) if container.pid else None
    if pidfd is not None:
        try:
            _stop_process(container, pidfd, timeout)
        finally:
            os.close(pidfd)
    return _wait_released(meta, container)


def _stop_process(container: Container, pidfd: int, timeout: float) -> None:
    signal.pidfd_send_signal(pidfd, container.stop_signal)
    if _wait_pidfd(pidfd, timeout):
        return
    log.info(
        "container %s did not stop within %gs after %s; sending SIGKILL",
        container.short_id,
        timeout,
        signal_name(container.stop_signal),
    )
    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    if not _wait_pidfd(pidfd, KILL_WAIT):
        raise ContainerError(
            f"container {container.short_id} survived SIGKILL for "
            f"{KILL_WAIT:g}s; its process may be stuck in the kernel",
            ref=container.id,
        )


def _wait_released(meta: Any, container: Container) -> Container:
    """Wait for the supervisor to finish; mark the record exited if it died without that."""
    pidfd = None
    if container.supervisor_pid:
        pidfd = _open_pidfd(container.supervisor_pid, container.supervisor_start)
    if pidfd is not None:
        try:
            if not _wait_pidfd(pidfd, TEARDOWN_WAIT):
                raise ContainerError(
                    f"the supervisor of container {container.short_id} did "
                    f"not finish within {TEARDOWN_WAIT:g}s",
                    ref=container.id,
                )
        finally:
            os.close(pidfd)
    try:
        current = containers.load(meta, container.id)
    except LstoreError:
        return container  # removed by its supervisor (--rm)
    if current.state in (containers.RUNNING, containers.CREATED) and current.supervisor_pid:
        return _mark_dead_exited(meta, current)
    return current


def _mark_dead_exited(meta: Any, container: Container) -> Container:
    log.warning(
        "the supervisor of container %s is gone; recording the container as exited",
        container.short_id,
    )
    release(meta, container)
    return containers.update(
        meta,
        container.id,
        state=containers.EXITED,
        exit_code=255,
        error="the supervisor exited without recording the container's exit",
        finished_at=containers.rfc3339_nano(),
    )


def wait(meta: Any, container: Container) -> int | None:
    """Block until the container exits; return its exit code.

    Returns None when the container was removed (--rm) before its exit code was seen.
    """
    while True:
        try:
            container = containers.load(meta, container.id)
        except LstoreError:
            return None
        status = container.status()
        if status == containers.EXITED:
            return container.exit_code
        if status == containers.DEAD:
            return _mark_dead_exited(meta, container).exit_code
        time.sleep(POLL_INTERVAL)


# ---------------------------------------------------------------------------- remove


def remove(meta: Any, container: Container, *, force: bool = False,
           volumes: bool = False) -> None:
    """Remove a container and everything it owns; with `force`, kill it first if running.

    `volumes` removes its anonymous volumes too. Idempotent per step, so it also cleans
    records left by a crashed CLI or supervisor.
    """
    status = container.status()
    if status == containers.RUNNING and not force:
        raise ContainerError(
            f"container {container.name} is running; stop it first or use 'rm -f'", ref=container.id
        )
    if status in (containers.RUNNING, containers.CREATED) and container.supervisor_pid:
        stop(meta, container, timeout=0)
    try:
        container = containers.update(meta, container.id, state=containers.REMOVING)
    except LstoreError:
        return  # its supervisor removed it (--rm)
    remove_resources(meta, container, volumes=volumes)


def release(meta: Any, container: Container) -> None:
    """Release what a stopped container holds: network, cgroup, overlay and idmapped mounts.

    Idempotent: each step skips what is already gone. Raises on the first failing step;
    running it again retries that step.
    """
    from lstore.runner import idmap, network
    from lstore.store.overlay import unmount

    network.detach(meta, container.id)
    if container.options.get("runtime") == "runc":
        from lstore.runner import runc
        from lstore.runner.runtime import DEFAULT_RUNC_ROOT

        runc.delete(container.id, DEFAULT_RUNC_ROOT)
    cgroup = open_cgroup(container)
    if cgroup is not None:
        cgroup.destroy()
    unmount(container.rootfs)
    idmap.unmount_layers(container.path)  # after the overlay, which keeps them busy
    if container.mounted:
        try:
            containers.update(meta, container.id, mounted=False)
        except LstoreError:
            pass  # removed concurrently by `rm -f`


def remove_resources(meta: Any, container: Container, *, volumes: bool = False) -> None:
    """Release the container, delete its directory, then its record and name.

    With `volumes` (or for a --rm container), its anonymous volumes go too, as with
    docker's `rm -v`; named volumes always stay.
    """
    release(meta, container)
    _check_nothing_mounted(container.path)
    shutil.rmtree(container.path, ignore_errors=False, onerror=_ignore_missing)
    containers.delete(meta, container)
    if volumes or container.options.get("rm"):
        _remove_anonymous_volumes(meta, container)
    log.info("removed container %s", container.short_id)


def _remove_anonymous_volumes(meta: Any, container: Container) -> None:
    from lstore.runner import volumes

    volumes_dir = os.path.join(os.path.dirname(os.path.dirname(container.path)), "volumes")
    with meta.read() as txn:
        records = {name: txn.get("volumes", name)
                   for name in containers.volume_names(container, volumes_dir)}
    for name, record in records.items():
        if record is not None and record.get("anonymous"):
            volumes.remove_volume(meta, volumes_dir, name)


def _ignore_missing(function: Any, path: str, exc_info: Any) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def _check_nothing_mounted(path: str) -> None:
    # rmtree would descend into a mount and delete what it shows (an image layer, a bind
    # mounted host directory), so refuse while anything below `path` is still mounted.
    prefix = path.rstrip("/") + "/"
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            mount_point = line.split()[4].replace("\\040", " ")
            if mount_point.startswith(prefix):
                raise ContainerError(
                    f"{mount_point} is still mounted; unmount it and retry", path=mount_point
                )


# ---------------------------------------------------------------------------- exec


def open_cgroup(container: Container) -> Any:
    from lstore.runner import cgroups

    return cgroups.open(container.cgroup) if container.cgroup else None


def exec_spec(
    container: Container,
    args: list[str],
    *,
    env: list[str] | None = None,
    user: str | None = None,
    workdir: str | None = None,
    tty: bool = False,
) -> dict[str, Any]:
    """Return the OCI process for a command run in a running container.

    It starts from the container's own process (env, user, capabilities, rlimits) and
    replaces the arguments; `env` entries override variables of the same name.
    """
    with open(os.path.join(container.bundle, "config.json")) as handle:
        process = dict(json.load(handle)["process"])
    process["args"] = list(args)
    process["terminal"] = tty
    process.pop("consoleSize", None)
    if env:
        process["env"] = _merge_env(process.get("env", []), env)
    if workdir:
        process["cwd"] = workdir
    if user:
        process["user"] = _exec_user(container, user)
    return process


def _merge_env(base: list[str], extra: list[str]) -> list[str]:
    merged = {entry.partition("=")[0]: entry for entry in base}
    for entry in extra:
        key, sep, _ = entry.partition("=")
        merged[key] = entry if sep else f"{key}={os.environ.get(key, '')}"
    return list(merged.values())


def _exec_user(container: Container, user: str) -> dict[str, Any]:
    from lstore.runner.spec import resolve_user

    resolved = resolve_user(user, [container.rootfs])
    process_user: dict[str, Any] = {"uid": resolved.uid, "gid": resolved.gid}
    if resolved.additional_gids:
        process_user["additionalGids"] = resolved.additional_gids
    return process_user
