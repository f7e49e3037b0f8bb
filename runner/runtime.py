"""Start a container from an OCI bundle, with lstore's own runtime or with runc.

The built-in runtime forks twice. The first child (the "setup" process) stays in the
caller's PID namespace: it joins the namespaces that config.json gives by path, creates the
user namespace and waits while the caller writes its id maps, unshares the other namespaces and
then clones the container's init with CLONE_PARENT. That init is PID 1 of the new PID
namespace and a direct child of the caller, so the caller waits for it without any process
in between. The setup process exits at once.

The init waits until the caller has put it into the container's cgroup, sets up the root
filesystem (runner/rootfs.py), hostname, user and capabilities, and execs the process.
Errors before exec come back to the caller over a close-on-exec pipe and raise
ContainerError from start(). A missing or non-executable program is reported as docker
does: a one-line message on the container's stderr and exit code 127 or 126.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import resource
import signal
import socket
import termios
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lstore.errors import ContainerError, InvalidArgumentError
from lstore.runner import capabilities, devices, nsutil, rootfs, terminal

if TYPE_CHECKING:
    from lstore.runner.cgroups import Cgroup

log = logging.getLogger(__name__)

DEFAULT_RUNC_ROOT = "/run/lstore/runc"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Exit codes of a container whose program cannot be started, as docker and POSIX shells use.
EXIT_NOT_FOUND = 127
EXIT_CANNOT_EXECUTE = 126

# The order in which an exec joins a container's namespaces. The user namespace comes first,
# so that the others, which it owns, are joined with its capabilities. The rest
# follow runc's order.
_EXEC_JOIN_ORDER = ("user", "ipc", "uts", "network", "pid", "mount")

_HIGH_FD = 10  # pipes move at or above this, clear of the stdio descriptors 0-2


# ---------------------------------------------------------------------------- processes


class ContainerProcess:
    """A started container process: its host pid, its exit code and signal delivery.

    `console` is the master of the container's terminal when the runtime created one in
    the container (the built-in runtime with process.terminal); the caller owns it.
    """

    pid: int
    console: int | None = None

    def wait(self) -> int:
        """Block until the process exits; return its exit code, 128+N when signal N killed it."""
        raise NotImplementedError

    def poll(self) -> int | None:
        """Return the exit code if the process has exited, else None, without blocking."""
        raise NotImplementedError

    def signal(self, sig: int) -> None:
        """Send `sig` to the process; does nothing once it has exited."""
        raise NotImplementedError

    def terminal_resized(self) -> None:
        """Tell the runtime that the caller changed the size of the container's pty.

        Nothing to do when the pty is the container's own: the kernel sends SIGWINCH to
        its foreground process group.
        """


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class ForkedProcess(ContainerProcess):
    """A child of this process. Call wait() and poll() from one thread only.

    `on_exit` runs once, right after the process is reaped.
    """

    def __init__(self, pid: int, on_exit: Callable[[], None] | None = None) -> None:
        self.pid = pid
        self._code: int | None = None
        self._on_exit = on_exit

    def wait(self) -> int:
        if self._code is None:
            _, status = os.waitpid(self.pid, 0)
            self._reaped(status)
        return self._code  # type: ignore[return-value]

    def poll(self) -> int | None:
        if self._code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._reaped(status)
        return self._code

    def _reaped(self, status: int) -> None:
        self._code = _exit_code(status)
        if self._on_exit is not None:
            self._on_exit()

    def signal(self, sig: int) -> None:
        # Until it is reaped the pid cannot be reused, so this cannot hit another process.
        if self._code is None:
            os.kill(self.pid, sig)


# ---------------------------------------------------------------------------- public API


def load_spec(bundle_dir: str) -> dict[str, Any]:
    """Read BUNDLE/config.json; raise ContainerError naming the file when it is unusable."""
    path = os.path.join(bundle_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as config:
            spec = json.load(config)
    except (OSError, ValueError) as exc:
        raise ContainerError(f"cannot read the OCI config {path}: {exc}", path=path) from exc
    if not isinstance(spec, dict) or not spec.get("process", {}).get("args"):
        raise ContainerError(f"OCI config {path} has no process.args", path=path)
    return spec


def start(
    bundle_dir: str,
    container_id: str,
    *,
    runtime: str = "builtin",
    stdin: int = 0,
    stdout: int = 1,
    stderr: int = 2,
    cgroup: Cgroup | None = None,
    runc_root: str = DEFAULT_RUNC_ROOT,
    console_size: tuple[int, int] | None = None,
) -> ContainerProcess:
    """Start the container described by BUNDLE/config.json and return its init process.

    The root filesystem must already be mounted at root.path. With the built-in runtime the
    init joins `cgroup` before it execs, and this returns once the program has been exec'd
    or has failed to start (exit code 127 or 126). With "runc", runc creates or joins the
    cgroup at linux.cgroupsPath itself and `cgroup` is not used. Raises ContainerError when
    the container cannot be set up; the caller then owns nothing new except the mounts and
    the cgroup it made itself.

    With process.terminal, the built-in runtime opens a pty in the container's devpts, as
    runc does with --console-socket. The program gets the slave as stdin, stdout and
    stderr, so the stdio arguments are unused. The pty gets `console_size` (rows, columns)
    when given, and the returned process's `console` is the master. runc instead copies
    between its own pty and the stdio arguments. For runc, `console_size` goes into
    config.json as process.consoleSize, which runc applies before the program starts.
    """
    bundle_dir = os.path.abspath(bundle_dir)
    spec = load_spec(bundle_dir)
    stdio = (stdin, stdout, stderr)
    if console_size is not None:
        spec["process"]["consoleSize"] = {"height": console_size[0], "width": console_size[1]}
    if runtime == "runc":
        from lstore.runner import runc

        # Without a path runc would create the cgroup at the root of every hierarchy.
        if not (spec.get("linux") or {}).get("cgroupsPath"):
            raise ContainerError(
                f"config.json of container {container_id} has no "
                "linux.cgroupsPath, which runc needs",
                path=bundle_dir,
            )
        if console_size is not None:
            _write_spec(bundle_dir, spec)
        return runc.start(bundle_dir, container_id, stdio, runc_root)
    if runtime != "builtin":
        raise InvalidArgumentError(f"unknown runtime {runtime!r}: use 'builtin' or 'runc'")

    return _start_builtin(spec, bundle_dir, container_id, stdio, cgroup)


def _write_spec(bundle_dir: str, spec: dict[str, Any]) -> None:
    """Replace BUNDLE/config.json atomically (write a temporary file, then rename)."""
    path = os.path.join(bundle_dir, "config.json")
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as config:
        json.dump(spec, config, indent=2)
    os.replace(temporary, path)


def _start_builtin(
    spec: dict[str, Any],
    bundle_dir: str,
    container_id: str,
    stdio: tuple[int, int, int],
    cgroup: Cgroup | None,
) -> ContainerProcess:
    plan = _plan_start(spec, bundle_dir)
    linux = spec.get("linux") or {}
    device_cgroup = devices.create(
        linux.get("cgroupsPath") or "", (linux.get("resources") or {}).get("devices") or []
    )
    # The init sends the master of the terminal it opens over this pair (SCM_RIGHTS).
    console_ends = socket.socketpair() if spec["process"].get("terminal") else None
    plan.console_socket = console_ends[1] if console_ends else None
    try:
        process = _launch(
            lambda channel: _setup_for_start(plan, stdio, channel),
            [cgroup, device_cgroup],
            plan.id_maps,
            container_id,
            on_exit=device_cgroup.remove if device_cgroup else None,
        )
    except BaseException:
        if device_cgroup is not None:
            device_cgroup.remove()
        if console_ends is not None:
            console_ends[0].close()
        raise
    finally:
        if console_ends is not None:
            console_ends[1].close()

    if console_ends is not None:
        process.console = _receive_console(console_ends[0], process, container_id)
    return process


def _receive_console(receiver: socket.socket, process: ForkedProcess, container_id: str) -> int:
    """Take the terminal master that the init sent before its exec; closes `receiver`.

    The init sends the master before it execs, and the exec has happened once _launch
    returns, so the master is already queued and a non-blocking receive finds it.
    """
    with receiver:
        receiver.setblocking(False)
        try:
            _, fds, _, _ = socket.recv_fds(receiver, 16, 1)
        except BlockingIOError:
            fds = []
    if fds:
        return fds[0]

    process.signal(signal.SIGKILL)
    process.wait()
    raise ContainerError(f"the init of container {container_id} sent no terminal master")


def exec_process(
    container_pid: int,
    process: dict[str, Any],
    *,
    cgroup: Cgroup | None = None,
    stdin: int = 0,
    stdout: int = 1,
    stderr: int = 2,
    container: str | None = None,
) -> ContainerProcess:
    """Run `process` (an OCI process object) inside the running container `container_pid`.

    The new process joins every namespace of the container's init and `cgroup` before it
    execs, and is a child of the caller. Raises ContainerError when the container is gone
    or the process cannot start; its message names `container` (such as "web (0123abcd4567)"),
    or the pid when that is None.
    """
    namespaces = _exec_namespaces(container_pid)
    stdio = (stdin, stdout, stderr)
    label = f"container {container}" if container else f"container process {container_pid}"
    return _launch(
        lambda channel: _setup_for_exec(namespaces, process, stdio, channel),
        [cgroup, devices.of_process(container_pid)],
        None,
        f"exec in {label}",
    )


# ---------------------------------------------------------------------------- plans


@dataclass
class _StartPlan:
    spec: dict[str, Any]
    root: str
    join: list[tuple[str, str]] = field(default_factory=list)  # (type, path), user first
    unshare_flags: int = 0
    new_userns: bool = False
    new_uts: bool = False
    id_maps: tuple[str, str] | None = None  # uid_map and gid_map text for a new userns
    console_socket: socket.socket | None = None  # where the init sends its terminal master


def _plan_start(spec: dict[str, Any], bundle_dir: str) -> _StartPlan:
    linux = spec.get("linux") or {}
    root = os.path.join(bundle_dir, (spec.get("root") or {}).get("path") or "rootfs")
    plan = _StartPlan(spec, root)
    for namespace in linux.get("namespaces") or []:
        kind = namespace.get("type")
        if kind not in nsutil.NAMESPACES:
            raise ContainerError(f"unknown namespace type {kind!r} in config.json")
        if namespace.get("path"):
            plan.join.append((kind, namespace["path"]))
        elif kind == "user":
            plan.new_userns = True
        else:
            plan.unshare_flags |= nsutil.NAMESPACES[kind][0]
    plan.join.sort(key=lambda entry: entry[0] != "user")
    plan.new_uts = bool(plan.unshare_flags & nsutil.CLONE_NEWUTS)

    if not plan.unshare_flags & nsutil.CLONE_NEWNS:
        raise ContainerError(
            "config.json must ask for a new mount namespace: the built-in "
            "runtime sets up the root filesystem in one"
        )
    if plan.new_userns:
        plan.id_maps = (_id_map(linux.get("uidMappings")), _id_map(linux.get("gidMappings")))
    return plan


def _id_map(mappings: list[dict[str, int]] | None) -> str:
    if not mappings:
        raise ContainerError("config.json asks for a user namespace without uid and gid mappings")
    return "".join(f"{m['containerID']} {m['hostID']} {m['size']}\n" for m in mappings)


def _exec_namespaces(container_pid: int) -> list[tuple[str, int]]:
    """Open the namespaces of `container_pid` that differ from ours, in joining order."""
    opened: list[tuple[str, int]] = []
    try:
        for kind in _EXEC_JOIN_ORDER:
            name = nsutil.NAMESPACES[kind][1]
            theirs = f"/proc/{container_pid}/ns/{name}"
            if os.stat(theirs).st_ino == os.stat(f"/proc/self/ns/{name}").st_ino:
                continue
            opened.append((kind, os.open(theirs, os.O_RDONLY | os.O_CLOEXEC)))
    except OSError as exc:
        for _, fd in opened:
            os.close(fd)
        raise ContainerError(
            f"cannot open the namespaces of container process "
            f"{container_pid}: {exc.strerror}; is it still running?",
            path=f"/proc/{container_pid}/ns",
        ) from exc
    return opened


# ---------------------------------------------------------------------------- launching


class _Channel:
    """The two pipes between the caller and its setup and init processes.

    Children send one line per message on `status` ("userns", "pid N", "error TEXT"). The
    caller sends one byte on `go` per step it has done (id maps written, cgroup joined).
    Both ends in the children are close-on-exec, so a successful exec ends the exchange.
    """

    def __init__(self) -> None:
        self.status_read, self.status_write = os.pipe2(os.O_CLOEXEC)
        self.go_read, self.go_write = os.pipe2(os.O_CLOEXEC)

    # Child side.

    def move_high(self) -> None:
        for name in ("status_write", "go_read"):
            old = getattr(self, name)
            setattr(self, name, fcntl.fcntl(old, fcntl.F_DUPFD_CLOEXEC, _HIGH_FD))
            os.close(old)

    def send(self, message: str) -> None:
        os.write(self.status_write, (message.replace("\n", " ") + "\n").encode())

    def wait_for_parent(self) -> None:
        if os.read(self.go_read, 1) != b"g":
            os._exit(1)  # the caller gave up; nothing to report to anyone

    # Caller side.

    def close_child_ends(self) -> None:
        os.close(self.status_write)
        os.close(self.go_read)

    def release_child(self) -> None:
        os.write(self.go_write, b"g")

    def close(self) -> None:
        for fd in (self.status_read, self.go_write):
            try:
                os.close(fd)
            except OSError:
                pass


def _launch(
    setup: Any,
    groups: list[Any],
    id_maps: tuple[str, str] | None,
    label: str,
    on_exit: Callable[[], None] | None = None,
) -> ForkedProcess:
    """Fork `setup`, put the process it starts into `groups` (objects with add(pid), None
    skipped) before it execs, and return that process."""
    channel = _Channel()
    setup_pid = os.fork()
    if setup_pid == 0:
        _run_child(channel, setup)
    channel.close_child_ends()

    child_pid = 0
    try:
        with os.fdopen(channel.status_read, "rb", closefd=False) as status:
            child_pid = _handshake(status, channel, setup_pid, id_maps, label)
            for group in groups:
                if group is not None:
                    group.add(child_pid)
            channel.release_child()
            error = status.readline().decode(errors="replace").strip()
    except BaseException:
        _kill_and_reap(child_pid)
        raise
    finally:
        channel.close()

    if error:
        _kill_and_reap(child_pid)
        raise ContainerError(f"cannot start {label}: {error.removeprefix('error ')}")
    return ForkedProcess(child_pid, on_exit)


def _handshake(
    status: Any, channel: _Channel, setup_pid: int, id_maps: tuple[str, str] | None, label: str
) -> int:
    """Serve the setup process until it reports the init's pid; reap it and return the pid."""
    child_pid = 0
    try:
        for raw in status:
            message = raw.decode(errors="replace").strip()
            if message == "userns" and id_maps is not None:
                _write_id_maps(setup_pid, id_maps)
                channel.release_child()
            elif message.startswith("pid "):
                child_pid = int(message[4:])
                break
            else:
                raise ContainerError(f"cannot start {label}: {message.removeprefix('error ')}")
    finally:
        _, setup_status = os.waitpid(setup_pid, 0)
    if not child_pid:
        raise ContainerError(
            f"cannot start {label}: the setup process exited with "
            f"status {_exit_code(setup_status)} before starting the init"
        )
    return child_pid


def _write_id_maps(pid: int, id_maps: tuple[str, str]) -> None:
    # Written by this (privileged) process, so the maps may name any host ids and the
    # container keeps setgroups(2) (user_namespaces(7), "Defining user and group ID mappings").
    for name, text in zip(("uid_map", "gid_map"), id_maps):
        path = f"/proc/{pid}/{name}"
        try:
            with open(path, "w") as id_map:
                id_map.write(text)
        except OSError as exc:
            raise ContainerError(f"cannot write {path}: {exc.strerror}", path=path) from exc


def _kill_and_reap(pid: int) -> None:
    if pid <= 0:
        return
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _run_child(channel: _Channel, setup: Any) -> None:
    """Run `setup` in a forked child and never return into the caller's stack."""
    code = 1
    try:
        setup(channel)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then _exit
        try:
            channel.send(f"error {_describe(exc)}")
        except OSError:
            pass
    finally:
        os._exit(code)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------- setup process


def _setup_for_start(plan: _StartPlan, stdio: tuple[int, int, int], channel: _Channel) -> None:
    _prepare_child(channel, stdio)
    _apply_rlimits(plan.spec["process"].get("rlimits") or [])
    _join_by_path(plan.join)
    if plan.new_userns:
        nsutil.unshare(nsutil.CLONE_NEWUSER)
        channel.send("userns")
        channel.wait_for_parent()
        _become_root()
    nsutil.unshare(plan.unshare_flags)
    if plan.unshare_flags & nsutil.CLONE_NEWNET:
        nsutil.bring_loopback_up()

    pid = nsutil.clone_sibling()
    if pid:
        channel.send(f"pid {pid}")
        return
    try:
        _container_init(plan, channel)
    except BaseException as exc:  # noqa: BLE001 - the init must never return
        channel.send(f"error {_describe(exc)}")
    os._exit(1)


def _setup_for_exec(
    namespaces: list[tuple[str, int]],
    process: dict[str, Any],
    stdio: tuple[int, int, int],
    channel: _Channel,
) -> None:
    _prepare_child(channel, stdio)
    _apply_rlimits(process.get("rlimits") or [])
    for kind, fd in namespaces:
        nsutil.setns(fd, nsutil.NAMESPACES[kind][0], kind)
        if kind == "user":
            _become_root()

    pid = nsutil.clone_sibling()
    if pid:
        channel.send(f"pid {pid}")
        return
    try:
        channel.wait_for_parent()
        _start_session(controlling_terminal=bool(process.get("terminal")))
        _enter_workdir(process.get("cwd") or "/")
        _run_process(process)
    except BaseException as exc:  # noqa: BLE001 - the process must never return
        channel.send(f"error {_describe(exc)}")
    os._exit(1)


def _prepare_child(channel: _Channel, stdio: tuple[int, int, int]) -> None:
    # Handlers and the mask come from the caller: a SIG_IGN would survive exec, and a
    # Python handler would run the caller's code in the container.
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass  # only the main thread has a wakeup fd
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])

    channel.move_high()
    copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _HIGH_FD) for fd in stdio]
    for target, copy in enumerate(copies):
        os.dup2(copy, target, inheritable=True)
        os.close(copy)


def _apply_rlimits(rlimits: list[dict[str, Any]]) -> None:
    for limit in rlimits:
        name = limit.get("type", "")
        number = getattr(resource, name, None)
        if number is None:
            raise ContainerError(f"unknown rlimit {name!r} in config.json")
        try:
            resource.setrlimit(number, (limit["soft"], limit["hard"]))
        except (OSError, ValueError) as exc:
            raise ContainerError(
                f"cannot set {name} to {limit['soft']}:{limit['hard']}: {exc}"
            ) from exc


def _join_by_path(join: list[tuple[str, str]]) -> None:
    for kind, path in join:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ContainerError(
                f"cannot open {kind} namespace {path}: {exc.strerror}", path=path
            ) from exc
        try:
            nsutil.setns(fd, nsutil.NAMESPACES[kind][0], path)
        finally:
            os.close(fd)


def _become_root() -> None:
    # After unshare or setns into a user namespace the process still has host uid 0, which
    # is not mapped there. Switching to the namespace's uid 0 keeps the capabilities.
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


# ---------------------------------------------------------------------------- container init


def _container_init(plan: _StartPlan, channel: _Channel) -> None:
    channel.wait_for_parent()
    process = plan.spec["process"]
    _start_session(controlling_terminal=False)

    terminal_wanted = bool(process.get("terminal"))
    try:
        console = rootfs.prepare(
            plan.spec, plan.root, in_userns=plan.new_userns, terminal=terminal_wanted
        )
    except rootfs.SetupError as exc:
        raise ContainerError(str(exc)) from exc
    if console is not None:
        _attach_console(console, process, plan.console_socket)
    if plan.new_uts and plan.spec.get("hostname"):
        nsutil.sethostname(plan.spec["hostname"])

    _enter_workdir(process.get("cwd") or "/")
    _run_process(process)


def _attach_console(
    console: tuple[int, int, str], process: dict[str, Any], sender: socket.socket | None
) -> None:
    """Make the pty slave stdio and controlling terminal; send the master to the caller."""
    master, slave, _ = console
    size = process.get("consoleSize")
    if size:
        terminal.set_window_size(slave, (size["height"], size["width"]))
    for target in (0, 1, 2):
        os.dup2(slave, target)
    os.close(slave)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    if sender is None:
        raise ContainerError("process.terminal is set but no console socket was given")
    socket.send_fds(sender, [b"m"], [master])
    os.close(master)


def _start_session(*, controlling_terminal: bool) -> None:
    nsutil.set_cloexec_from(3)
    os.setsid()
    if controlling_terminal:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _enter_workdir(cwd: str) -> None:
    try:
        os.chdir(cwd)
    except OSError as exc:
        raise ContainerError(f"cannot change to working directory {cwd}: {exc.strerror}") from exc


def _run_process(process: dict[str, Any]) -> None:
    """Switch to the process's user and capabilities and exec it; never returns."""
    _switch_user(process)
    os.umask(0o022)

    args = process["args"]
    env = dict(entry.split("=", 1) for entry in process.get("env") or [] if "=" in entry)
    program = _find_program(args[0], env.get("PATH", DEFAULT_PATH))
    if program is None:
        _fail_exec(args[0], "not found in $PATH", EXIT_NOT_FOUND)
    try:
        os.execve(program, args, env)
    except OSError as exc:
        missing = exc.errno in (errno.ENOENT, errno.ENOTDIR)
        _fail_exec(
            args[0],
            (exc.strerror or "exec failed").lower(),
            EXIT_NOT_FOUND if missing else EXIT_CANNOT_EXECUTE,
        )


def _fail_exec(name: str, reason: str, code: int) -> None:
    os.write(2, f"lstore: exec {name}: {reason}\n".encode(errors="replace"))
    os._exit(code)


def _find_program(name: str, search_path: str) -> str | None:
    """Look `name` up in PATH as execvp(3) does; a name with a slash is used as it is."""
    if "/" in name:
        return name
    for directory in search_path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _switch_user(process: dict[str, Any]) -> None:
    """Set groups, gid, uid and the capability sets in the order runc uses.

    The bounding set shrinks while still root (it needs CAP_SETPCAP). PR_SET_KEEPCAPS keeps
    the permitted set across setuid to a non-root user, and capset then restores the
    effective set from it.
    """
    caps = process.get("capabilities")
    user = process.get("user") or {}
    if caps is not None:
        capabilities.prctl(capabilities.PR_SET_KEEPCAPS, 1)
        capabilities.drop_bounding(capabilities.mask(caps.get("bounding") or []))

    os.setgroups(user.get("additionalGids") or [])
    gid, uid = user.get("gid", 0), user.get("uid", 0)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)

    if caps is not None:
        capabilities.prctl(capabilities.PR_SET_KEEPCAPS, 0)
        capabilities.set_capabilities(
            capabilities.mask(caps.get("effective") or []),
            capabilities.mask(caps.get("permitted") or []),
            capabilities.mask(caps.get("inheritable") or []),
        )
        capabilities.raise_ambient(capabilities.mask(caps.get("ambient") or []))
    if process.get("noNewPrivileges"):
        capabilities.prctl(capabilities.PR_SET_NO_NEW_PRIVS, 1)
