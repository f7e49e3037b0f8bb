"""Container commands: run, ps, logs, stop, kill, rm, wait, inspect, exec, stats, volume.

Flags and output follow docker's where lstore has the feature. `run` exits with the
container's exit code, or 125 when lstore itself fails, as `docker run` does. Handlers
import the runner lazily, so building the parser stays cheap for the store commands.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lstore.errors import InvalidArgumentError, LstoreError

# `docker run` exits 125 when the daemon fails, so scripts tell that from the command's code.
RUN_ERROR_EXIT = 125

# Signals `run` passes on to the container while attached (docker's --sig-proxy default).
PROXIED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

# `stats` takes two samples this far apart to compute CPU percent.
STATS_INTERVAL = 1.0


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_run(subparsers)

    ps = subparsers.add_parser("ps", help="list containers")
    ps.add_argument("-a", "--all", action="store_true", help="show stopped containers too")
    ps.add_argument("-q", "--quiet", action="store_true", help="print only container IDs")
    ps.add_argument("--no-trunc", action="store_true", help="print full IDs and commands")
    ps.set_defaults(handler=_ps)

    logs = subparsers.add_parser("logs", help="print a container's output")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    logs.add_argument("-t", "--timestamps", action="store_true", help="prefix each line's time")
    logs.add_argument("--tail", default="all", help="print only the last N lines")
    logs.add_argument("container")
    logs.set_defaults(handler=_logs)

    stop = subparsers.add_parser("stop", help="stop running containers")
    stop.add_argument("-t", "--time", type=float, default=None,
                      help="seconds to wait before SIGKILL (default: --stop-timeout or 10)")
    stop.add_argument("containers", nargs="+")
    stop.set_defaults(handler=_stop)

    kill = subparsers.add_parser("kill", help="send a signal to running containers")
    kill.add_argument("-s", "--signal", default="SIGKILL", help="signal (default: SIGKILL)")
    kill.add_argument("containers", nargs="+")
    kill.set_defaults(handler=_kill)

    rm = subparsers.add_parser("rm", help="remove containers")
    rm.add_argument("-f", "--force", action="store_true", help="kill running containers first")
    rm.add_argument("-v", "--volumes", action="store_true", help="remove anonymous volumes too")
    rm.add_argument("containers", nargs="+")
    rm.set_defaults(handler=_rm)

    wait = subparsers.add_parser("wait", help="wait for containers to exit; print exit codes")
    wait.add_argument("containers", nargs="+")
    wait.set_defaults(handler=_wait)

    _register_inspect(subparsers)
    _register_exec(subparsers)

    stats = subparsers.add_parser("stats", help="show CPU, memory, network and I/O usage")
    stats.add_argument("--no-stream", action="store_true", help="print one sample and exit")
    stats.add_argument("containers", nargs="*", help="containers (default: all running)")
    stats.set_defaults(handler=_stats)

    volume = subparsers.add_parser("volume", help="manage named volumes")
    volume_commands = volume.add_subparsers(dest="volume_command", required=True)
    volume_ls = volume_commands.add_parser("ls", help="list volumes")
    volume_ls.add_argument("-q", "--quiet", action="store_true", help="print only names")
    volume_ls.set_defaults(handler=_volume_ls)
    volume_rm = volume_commands.add_parser("rm", help="remove volumes")
    volume_rm.add_argument("names", nargs="+")
    volume_rm.set_defaults(handler=_volume_rm)


def _register_run(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="run a command in a new container")
    add = run.add_argument
    add("-d", "--detach", action="store_true", help="run in the background, print the ID")
    add("-i", "--interactive", action="store_true", help="keep stdin open and pass it on")
    add("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    add("--rm", action="store_true", help="remove the container when it exits")
    add("--name", help="container name (default: generated)")
    add("-e", "--env", action="append", default=[], help="set KEY=VALUE (or pass KEY on)")
    add("--env-file", action="append", default=[], help="read KEY=VALUE lines from a file")
    add("-w", "--workdir", help="working directory inside the container")
    add("-u", "--user", help="uid[:gid] or name[:group]")
    add("--hostname", help="container host name (default: the short ID)")
    add("--entrypoint", help="override the image's entrypoint ('' clears it)")

    add("--network", "--net", default="bridge", choices=["bridge", "none", "host"],
        help="network mode (default: bridge)")
    add("-p", "--publish", action="append", default=[],
        help="publish a port: [ip:]hostPort:containerPort[/proto]")
    add("--subnet", help="join the bridge network with this IPv4 subnet, such as "
        "198.18.7.0/24; each new subnet gets its own bridge (lstore1, lstore2, ...), "
        "which stays for later runs")
    add("-v", "--volume", action="append", default=[], help="name:/path[:ro] or /host:/path[:ro]")
    add("--tmpfs", action="append", default=[], help="mount a tmpfs: /path[:options]")
    add("--read-only", action="store_true", help="mount the root filesystem read-only")
    add("--userns", action="store_true", help="map container root to an unprivileged uid range")

    # Limits are parsed as text by runner/limits.py, so a malformed value is a one-line
    # error with exit code 125, as docker reports it, not argparse's usage message.
    add("-m", "--memory", help="memory limit with unit b, k, m or g (1024-based), 6m or more; "
        "0 means no limit")
    add("--cpus", help="number of CPUs, such as 0.5, from 0.01 to the host's CPU count")
    add("--cpu-quota", help="CFS quota in microseconds per period, 1000 or more")
    add("--cpu-period", help="CFS period in microseconds, from 1000 to 1000000")
    add("--pids-limit", help="maximum number of processes; 0 or -1 means no limit")
    add("--device-write-bps", action="append", default=[], help="limit writes: /dev/path:rate")
    add("--cgroup-parent", help="cgroup to create the container's cgroup under")

    add("--runtime", default="builtin", choices=["builtin", "runc"], help="OCI runtime")
    add("--init", action="store_true", help="run an init as PID 1 that forwards signals")
    add("--health-cmd", help="shell command that checks the container's health")
    add("--health-interval", help="time between health checks, such as 30s (default 30s)")
    add("--stop-signal", help="signal that stops the container (default: image's or SIGTERM)")
    add("--stop-timeout", type=float, help="seconds between stop signal and SIGKILL (default 10)")

    add("--platform", help="os/arch[/variant] to pull when the image is missing")
    add("--plain-http", action="store_true", help="pull over HTTP when the image is missing")
    add("image")
    add("command", nargs=argparse.REMAINDER)
    run.set_defaults(handler=_run)


def _register_inspect(subparsers: argparse._SubParsersAction) -> None:
    # `docker inspect` takes containers and images alike. When the store commands have
    # registered an image `inspect`, containers are tried first and names that are not
    # containers go to the image handler.
    existing = subparsers.choices.get("inspect")
    if existing is not None:
        image_handler = existing.get_default("handler")
        existing.set_defaults(handler=_inspect_any(image_handler))
        return
    inspect = subparsers.add_parser("inspect", help="show containers as JSON")
    inspect.add_argument("ref", nargs="+", help="container name or ID")
    inspect.set_defaults(handler=_inspect)


def _register_exec(subparsers: argparse._SubParsersAction) -> None:
    execute = subparsers.add_parser("exec", help="run a command in a running container")
    execute.add_argument("-i", "--interactive", action="store_true", help="pass stdin on")
    execute.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    execute.add_argument("-e", "--env", action="append", default=[], help="set KEY=VALUE")
    execute.add_argument("-u", "--user", help="uid[:gid] or name[:group]")
    execute.add_argument("-w", "--workdir", help="working directory")
    execute.add_argument("container")
    execute.add_argument("command", nargs=argparse.REMAINDER)
    execute.set_defaults(handler=_exec)


# ---------------------------------------------------------------------------- helpers


def _open_store(args: argparse.Namespace) -> Any:
    from lstore.store.store import Store

    return Store(args.root)


def _error(message: str) -> None:
    print(f"lstore: error: {message}", file=sys.stderr)


def _each(names: list[str], action: Callable[[str], None]) -> int:
    """Apply `action` to every name, as docker's multi-container commands do: report each
    failure and go on, then exit 1 if any failed."""
    status = 0
    for name in names:
        try:
            action(name)
        except LstoreError as exc:
            _error(str(exc))
            status = 1
    return status


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Parse a Go-style duration ("1m30s", "500ms", "2s") or plain seconds; return seconds."""
    value = text.strip()
    try:
        return float(value)
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts or "".join(number + unit for number, unit in parts) != value:
        raise InvalidArgumentError(f"invalid duration {text!r}: expected such as 30s or 1m30s")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


# ---------------------------------------------------------------------------- run


def run_options(args: argparse.Namespace) -> Any:
    """Turn `run` flags into RunOptions, converting sizes and durations."""
    from lstore.runner import limits
    from lstore.runner.options import RunOptions

    entrypoint = None
    if args.entrypoint is not None:
        entrypoint = [args.entrypoint] if args.entrypoint else []
    health_interval = parse_duration(args.health_interval) if args.health_interval else None
    return RunOptions(
        image=args.image, command=list(args.command), entrypoint=entrypoint, env=args.env,
        env_files=args.env_file, workdir=args.workdir, user=args.user, name=args.name,
        hostname=args.hostname, network=args.network, publish=args.publish,
        volumes=args.volume, tmpfs=args.tmpfs, read_only=args.read_only, rm=args.rm,
        detach=args.detach, interactive=args.interactive, tty=args.tty, userns=args.userns,
        memory=limits.parse_memory(args.memory), cpus=limits.parse_cpus(args.cpus),
        cpu_quota=limits.parse_cpu_quota(args.cpu_quota),
        cpu_period=limits.parse_cpu_period(args.cpu_period),
        pids_limit=limits.parse_pids_limit(args.pids_limit),
        device_write_bps=args.device_write_bps, cgroup_parent=args.cgroup_parent,
        runtime=args.runtime, init=args.init, health_cmd=args.health_cmd,
        health_interval=health_interval, stop_signal=args.stop_signal,
        stop_timeout=args.stop_timeout, subnet=args.subnet,
    )


def _run(args: argparse.Namespace) -> int:
    from lstore.runner import lifecycle

    try:
        options = run_options(args)
        store = _open_store(args)
        image = _find_or_pull(store, args)
        container = lifecycle.create(store, options, image)
    except LstoreError as exc:
        _error(str(exc))
        return RUN_ERROR_EXIT
    try:
        if options.detach:
            lifecycle.start(store.root, container, attach=False).sync.close()
            print(container.id)
            return 0
        # Raw before the start, so the container's first output is not cooked by this
        # terminal; restored before an error is printed.
        with _raw_terminal(options.tty and options.interactive):
            return _run_attached(store.root, container, options.tty)
    except LstoreError as exc:
        _error(str(exc))
        if options.rm:
            _remove_after_failed_start(store.meta, container)
        return RUN_ERROR_EXIT


def _remove_after_failed_start(meta: Any, container: Any) -> None:
    """Remove a --rm container whose supervisor ended before it could clean up."""
    from lstore.runner import containers, lifecycle

    try:
        current = containers.load(meta, container.id)
    except LstoreError:
        return  # the supervisor already removed it
    try:
        lifecycle.remove(meta, current, force=True)
    except LstoreError as exc:
        _error(f"cannot remove container {container.short_id}: {exc}")


def _run_attached(root: str, container: Any, tty: bool) -> int:
    from lstore.runner import lifecycle

    # The proxy is in place before the start: a signal that arrives once the container
    # runs, before start() returns, is held and then sent instead of ending this process.
    with _proxy_signals(tty) as proxy:
        started = lifecycle.start(root, container, attach=True)
        proxy.attach(started.supervisor_pid)
        return started.finish()


def _find_or_pull(store: Any, args: argparse.Namespace) -> Any:
    image = store.find_image(args.image)
    if image is not None:
        return image
    options: dict[str, Any] = {"platform": args.platform}
    if args.plain_http:
        from lstore.store.registry.settings import RegistrySettings

        options["settings"] = RegistrySettings.from_environment(plain_http=True)
    print(f"Unable to find image '{args.image}' locally; pulling it", file=sys.stderr)
    return store.pull(args.image, **options)


@contextmanager
def _raw_terminal(wanted: bool) -> Iterator[None]:
    """Put the caller's terminal in raw mode, so keys reach the container's pty unchanged."""
    if not wanted or not os.isatty(0):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


class _SignalProxy:
    """Sends the signals this process receives to the container's supervisor.

    Signals that arrive before `attach` names the supervisor are held and sent then.
    """

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.pidfd: int | None = None
        self.held: list[int] = []

    def handle(self, signum: int, _frame: Any) -> None:
        if self.pidfd is None:
            self.held.append(signum)
        else:
            self._send(signum)

    def attach(self, supervisor_pid: int) -> None:
        """Send the held signals to `supervisor_pid` and every later one as it arrives."""
        try:
            self.pidfd = os.pidfd_open(supervisor_pid)
        except ProcessLookupError:
            return
        for signum in self.held:
            self._send(signum)
        self.held.clear()
        if self.tty:
            # The size may have changed since the supervisor read it; an unchanged size
            # sends the container no SIGWINCH.
            self._send(signal.SIGWINCH)

    def _send(self, signum: int) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


@contextmanager
def _proxy_signals(tty: bool) -> Iterator[_SignalProxy]:
    """Pass signals this process receives to the supervisor, which passes them on.

    With a tty, SIGWINCH goes too: the supervisor then copies this terminal's new size to
    the container's pty.
    """
    proxy = _SignalProxy(tty)
    proxied = PROXIED_SIGNALS + ((signal.SIGWINCH,) if tty else ())
    previous = {signum: signal.signal(signum, proxy.handle) for signum in proxied}
    try:
        yield proxy
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        proxy.close()


# ---------------------------------------------------------------------------- ps


def _ps(args: argparse.Namespace) -> int:
    from lstore.runner import containers

    store = _open_store(args)
    shown = [c for c in containers.list_all(store.meta)
             if args.all or c.status() == containers.RUNNING]
    if args.quiet:
        for container in shown:
            print(container.id if args.no_trunc else container.short_id)
        return 0

    rows = [["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]]
    for container in shown:
        command = " ".join(container.args)
        if not args.no_trunc and len(command) > 20:
            command = command[:19] + "…"
        rows.append([
            container.id if args.no_trunc else container.short_id,
            container.image,
            f'"{command}"',
            _ago(containers.parse_rfc3339(container.created)),
            _status_text(container),
            containers.ports_text(container),
            container.name,
        ])
    _print_table(rows)
    return 0


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        print("   ".join(cells).rstrip())


def _status_text(container: Any) -> str:
    from lstore.runner import containers

    status = container.status()
    if status == containers.RUNNING:
        text = "Up " + _human_duration(time.time() - containers.parse_rfc3339(container.started_at))
        health = (container.health or {}).get("Status")
        if health == "starting":
            text += " (health: starting)"
        elif health:
            text += f" ({health})"
        return text
    if status == containers.EXITED:
        finished = containers.parse_rfc3339(container.finished_at)
        return f"Exited ({container.exit_code}) {_ago(finished)}"
    return status.capitalize()


def _ago(moment: float) -> str:
    return _human_duration(time.time() - moment) + " ago"


def _human_duration(seconds: float) -> str:
    """Format a duration roughly, in docker's words ("5 seconds", "About a minute")."""
    if seconds < 1:
        return "Less than a second"
    if seconds < 60:
        return f"{int(seconds)} second{'s' if int(seconds) != 1 else ''}"
    minutes = round(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    return f"{round(seconds / 86400)} days"


# ---------------------------------------------------------------------------- logs


def _logs(args: argparse.Namespace) -> int:
    from lstore.runner import containers
    from lstore.runner.logs import read_entries

    store = _open_store(args)
    container = containers.resolve(store.meta, args.container)

    def finished() -> bool:
        try:
            current = containers.load(store.meta, container.id)
        except LstoreError:
            return True
        return current.status() != containers.RUNNING

    entries = read_entries(container.log_path, follow=args.follow, finished=finished)
    if args.tail != "all":
        entries = _last_lines(entries, args.tail, args.follow)
    for entry in entries:
        _print_entry(entry, args.timestamps)
    return 0


def _last_lines(entries: Iterator[dict], tail: str, follow: bool) -> Iterator[dict]:
    try:
        count = int(tail)
    except ValueError as exc:
        raise InvalidArgumentError(f"invalid --tail {tail!r}: expected a number or 'all'") from exc
    if follow:
        # The backlog is read up to the end of the file before new entries appear.
        raise InvalidArgumentError("--tail with --follow is not supported; use one of them")
    kept = list(entries)
    return iter(kept[-count:] if count > 0 else [])


def _print_entry(entry: dict[str, Any], timestamps: bool) -> None:
    stream = sys.stderr if entry.get("stream") == "stderr" else sys.stdout
    text = entry.get("log", "")
    if timestamps:
        text = f"{entry.get('time', '')} {text}"
    stream.buffer.write(text.encode())
    stream.flush()


# ---------------------------------------------------------------------------- stop, kill, rm, wait


def _stop(args: argparse.Namespace) -> int:
    from lstore.runner import containers, lifecycle

    store = _open_store(args)
    if args.time is not None and args.time < 0:
        raise InvalidArgumentError(f"invalid --time {args.time:g}: must be 0 or more seconds")

    def stop_one(name: str) -> None:
        lifecycle.stop(store.meta, containers.resolve(store.meta, name), args.time)
        print(name)

    return _each(args.containers, stop_one)


def _kill(args: argparse.Namespace) -> int:
    from lstore.runner import containers, lifecycle

    store = _open_store(args)
    signum = lifecycle.parse_signal(args.signal)

    def kill_one(name: str) -> None:
        lifecycle.kill(store.meta, containers.resolve(store.meta, name), signum)
        print(name)

    return _each(args.containers, kill_one)


def _rm(args: argparse.Namespace) -> int:
    from lstore.runner import containers, lifecycle

    store = _open_store(args)

    def remove_one(name: str) -> None:
        container = containers.resolve(store.meta, name)
        lifecycle.remove(store.meta, container, force=args.force, volumes=args.volumes)
        print(name)

    return _each(args.containers, remove_one)


def _wait(args: argparse.Namespace) -> int:
    from lstore.runner import containers, lifecycle

    store = _open_store(args)

    def wait_one(name: str) -> None:
        exit_code = lifecycle.wait(store.meta, containers.resolve(store.meta, name))
        print(exit_code if exit_code is not None else "removed")

    return _each(args.containers, wait_one)


# ---------------------------------------------------------------------------- inspect


def _inspect(args: argparse.Namespace) -> int:
    from lstore.runner import containers

    store = _open_store(args)
    names = args.ref if isinstance(args.ref, list) else [args.ref]
    views = []
    status = 0
    for name in names:
        try:
            views.append(containers.inspect_view(containers.resolve(store.meta, name)))
        except LstoreError as exc:
            _error(str(exc))
            status = 1
    print(json.dumps(views, indent=4))
    return status


def _inspect_any(image_handler: Callable[[argparse.Namespace], int]
                 ) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        from lstore.errors import NotFoundError
        from lstore.runner import containers

        store = _open_store(args)
        try:
            containers.resolve(store.meta, args.ref)
        except NotFoundError:
            if store.find_image(args.ref) is None:
                raise NotFoundError(
                    f"no such image or container: {args.ref}", ref=args.ref
                ) from None
            return image_handler(args)
        return _inspect(args)

    return handler


# ---------------------------------------------------------------------------- exec


def _exec(args: argparse.Namespace) -> int:
    from lstore.runner import containers, lifecycle, runtime

    if not args.command:
        raise InvalidArgumentError("exec needs a command to run")
    store = _open_store(args)
    container = containers.resolve(store.meta, args.container)
    if container.status() != containers.RUNNING:
        raise InvalidArgumentError(f"container {args.container} is not running",
                                   ref=container.id)
    process = lifecycle.exec_spec(container, args.command, env=args.env, user=args.user,
                                  workdir=args.workdir, tty=args.tty)
    if args.tty and not any(entry.startswith("TERM=") for entry in process.get("env", [])):
        # As docker exec -t does; the container's own TERM (image or run -e) wins.
        process["env"] = [*process.get("env", []), "TERM=xterm"]
    cgroup = lifecycle.open_cgroup(container)

    if args.tty:
        return _exec_with_pty(container, process, cgroup, args.interactive)
    stdin = 0 if args.interactive else os.open(os.devnull, os.O_RDONLY)
    child = runtime.exec_process(container.pid, process, cgroup=cgroup, stdin=stdin,
                                 stdout=1, stderr=2, container=_label(container))
    return child.wait()


def _label(container: Any) -> str:
    return f"{container.name} ({container.short_id})"


def _exec_with_pty(container: Any, process: dict, cgroup: Any, interactive: bool) -> int:
    from lstore.runner import runtime, terminal

    master, slave = _open_container_pty(container.pid)
    size = terminal.first_window_size(0, 1)
    if size is not None:
        terminal.set_window_size(slave, size)
    try:
        child = runtime.exec_process(container.pid, process, cgroup=cgroup, stdin=slave,
                                     stdout=slave, stderr=slave, container=_label(container))
    finally:
        os.close(slave)
    with _raw_terminal(interactive), _resize_on_sigwinch(master):
        _copy_pty(master, 0 if interactive else None)
    os.close(master)
    return child.wait()


def _open_container_pty(pid: int) -> tuple[int, int]:
    """Open a pty pair in the container's own devpts, so `tty` inside names it correctly.

    A pty from the host's devpts works as a terminal too, but ttyname() inside the container
    cannot find its /dev/pts entry, so that is the fallback only.
    """
    from lstore.runner import terminal

    try:
        master, slave, _ = terminal.open_pty(f"/proc/{pid}/root/dev/pts")
    except OSError:
        return os.openpty()
    return master, slave


@contextmanager
def _resize_on_sigwinch(master: int) -> Iterator[None]:
    """Copy this terminal's size to the pty at `master` whenever it changes."""
    from lstore.runner import terminal

    def resize(_signum: int, _frame: Any) -> None:
        size = terminal.first_window_size(0, 1)
        if size is not None:
            terminal.set_window_size(master, size)

    previous = signal.signal(signal.SIGWINCH, resize)
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)


def _copy_pty(master: int, stdin: int | None) -> None:
    """Copy the pty's output to stdout and stdin to the pty until the pty closes."""
    import select

    watched = [master] + ([stdin] if stdin is not None else [])
    while True:
        ready, _, _ = select.select(watched, [], [])
        if master in ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every slave descriptor is closed
                return
            if not data:
                return
            os.write(1, data)
        if stdin is not None and stdin in ready:
            data = os.read(stdin, 65536)
            if data:
                os.write(master, data)
            else:
                watched.remove(stdin)
                os.write(master, b"\x04")  # end of input, as Ctrl-D typed at the terminal


# ---------------------------------------------------------------------------- stats


def _stats(args: argparse.Namespace) -> int:
    from lstore.runner import containers, stats

    store = _open_store(args)
    if args.containers:
        chosen = [containers.resolve(store.meta, name) for name in args.containers]
    else:
        chosen = [c for c in containers.list_all(store.meta)
                  if c.status() == containers.RUNNING]
    for container in chosen:
        if container.status() != containers.RUNNING:
            raise InvalidArgumentError(f"container {container.name} is not running",
                                       ref=container.id)
    previous = _samples(chosen)
    while True:
        time.sleep(STATS_INTERVAL)
        current = _samples(chosen)
        chosen = [c for c in chosen if c.id in current and c.id in previous]
        if not chosen and args.containers:
            return 0  # every container named on the command line has exited
        rows = [stats.stats_row(c, previous[c.id], current[c.id]) for c in chosen]
        if not args.no_stream and sys.stdout.isatty():
            print("\033[2J\033[H", end="")
        _print_table(_stats_table(rows))
        sys.stdout.flush()
        if args.no_stream:
            return 0
        previous = current


def _samples(chosen: list[Any]) -> dict[str, Any]:
    """Sample each container; one that exited in the meantime is left out."""
    from lstore.runner import stats

    samples = {}
    for container in chosen:
        try:
            samples[container.id] = stats.take_sample(container)
        except OSError:
            continue  # its cgroup is gone: the container has exited
    return samples


def _stats_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    table = [["CONTAINER ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "NET I/O",
              "BLOCK I/O", "PIDS"]]
    for row in rows:
        table.append([
            row["id"],
            row["name"],
            f"{row['cpu_percent']:.2f}%",
            f"{_size(row['memory_bytes'])} / {_size(row['memory_limit_bytes'])}",
            f"{row['memory_percent']:.2f}%",
            f"{_size(row['net_rx_bytes'])} / {_size(row['net_tx_bytes'])}",
            f"{_size(row['io_read_bytes'])} / {_size(row['io_write_bytes'])}",
            str(row["pids"]),
        ])
    return table


def _size(count: float) -> str:
    """Format bytes with 1024-based units, as docker's stats does ("1.5MiB")."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.4g}{unit}"
        count /= 1024
    return f"{count:.4g}TiB"


# ---------------------------------------------------------------------------- volumes


def _volume_ls(args: argparse.Namespace) -> int:
    from lstore.runner import volumes

    store = _open_store(args)
    names = [volume if isinstance(volume, str) else volume["name"]
             for volume in volumes.list_volumes(store.meta)]
    if args.quiet:
        for name in names:
            print(name)
        return 0
    _print_table([["DRIVER", "VOLUME NAME"]] + [["local", name] for name in names])
    return 0


def _volume_rm(args: argparse.Namespace) -> int:
    from lstore.runner import containers, volumes

    store = _open_store(args)

    in_use = {name for container in containers.list_all(store.meta)
              for name in containers.volume_names(container, store.volumes_dir)}

    def remove_one(name: str) -> None:
        volumes.remove_volume(store.meta, store.volumes_dir, name, in_use)
        print(name)

    return _each(args.names, remove_one)


def main(argv: list[str] | None = None) -> int:
    """Run only the container commands; `lstore` (lstore/cli.py) includes them too."""
    parser = argparse.ArgumentParser(prog="lstore")
    parser.add_argument("--root", default=None)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except LstoreError as exc:
        _error(str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
