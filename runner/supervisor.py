"""The per-container supervisor: one small process that starts a container and outlives the CLI.

    python -m lstore.runner.supervisor --root ROOT --id ID --sync FD [--stdin FD] ...

The CLI forks it into a new session (runner/launch.py calls `main` with these arguments
without starting a new interpreter), and it forks once more at once, so it is
neither the CLI's child nor a session leader that could acquire a controlling terminal. It
owns the container's stdio and copies stdout and stderr (or the pty master) into the
json-file log and to the attached client's descriptors. It forwards the signals it receives
to the container's PID 1, except SIGWINCH, on which it copies the client's terminal size to
the container's pty. It runs health checks and records the exit in LMDB. Afterwards it
releases the network, the cgroup and the overlay mount, and with --rm removes the container.

The supervisor reports to the CLI on the sync descriptor, one line per event:
    started <container pid> <supervisor pid>
    error <message>            (the runtime failed; nothing runs)
    exit <code>
and reaches EOF once the supervisor has released everything, so a foreground `lstore run`
that reads it to EOF returns only after the teardown.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import selectors
import signal
import sys
import time
from typing import Any

from lstore.runner import terminal

log = logging.getLogger(__name__)

# Signals a supervisor passes on to the container's PID 1, as `docker run` does by default.
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

# SIGWINCH means that the attached client's terminal changed size. It is not forwarded: the
# size is copied to the container's pty, whose kernel side signals the program inside.
RESIZE_SIGNAL = signal.SIGWINCH

# When PID 1 exits the kernel kills the rest of its PID namespace, so the output pipes reach
# EOF almost at once. A process outside the namespace with a copy of a pipe (one passed on
# by hand) must not keep the supervisor from recording the exit, hence a cap.
DRAIN_TIMEOUT = 2.0

READ_SIZE = 65536


class Attachment:
    """The client's descriptors that output is copied to, and its stdin for a pty."""

    def __init__(self, stdin: int | None, stdout: int | None, stderr: int | None) -> None:
        self.stdin = stdin
        self.outputs = {"stdout": stdout, "stderr": stderr}

    def send(self, stream: str, data: bytes) -> None:
        fd = self.outputs.get(stream)
        if fd is None:
            return
        try:
            _write_all(fd, data)
        except OSError as exc:
            # The client went away; the container keeps running and its output is logged.
            log.info("stopped copying %s to the client: %s", stream, exc.strerror)
            self.outputs[stream] = None

    def close(self) -> None:
        for fd in {self.stdin, *self.outputs.values()} - {None}:
            os.close(fd)
        self.stdin = None
        self.outputs = {"stdout": None, "stderr": None}


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class ContainerStdio:
    """The descriptors a container gets, and the supervisor's ends of them.

    Without a tty, stdout and stderr are pipes and stdin is the client's stdin (-i), a pipe
    that stays open (-d -i, as docker keeps stdin open), or /dev/null. With a tty, all three
    are a pty's slave and the supervisor keeps the master. The built-in runtime opens that
    pty in the container's devpts and hands back the master (`adopt_console`), so the child
    ends are /dev/null until then. For runc the supervisor opens the pty itself.
    """

    def __init__(
        self, tty: bool, interactive: bool, attachment: Attachment, runtime_console: bool
    ) -> None:
        self.readers: dict[int, str] = {}  # supervisor's read end -> stream name
        self.master: int | None = None
        self.keep_open: int | None = None
        self.child: list[int] = []
        self.console_size = terminal.first_window_size(
            attachment.stdin, attachment.outputs["stdout"]
        )
        if tty and runtime_console:
            null = os.open(os.devnull, os.O_RDWR)
            self.child = [null, null, null]
        elif tty:
            self._open_pty()
        else:
            self._open_pipes(interactive, attachment)

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        if self.console_size is not None:
            terminal.set_window_size(slave, self.console_size)
        self.adopt_console(master)
        self.child = [slave, slave, slave]

    def adopt_console(self, master: int) -> None:
        """Take `master` as the container's terminal: its output is the container's stdout."""
        self.master = master
        self.readers[master] = "stdout"

    def _open_pipes(self, interactive: bool, attachment: Attachment) -> None:
        if interactive and attachment.stdin is not None:
            stdin = os.dup(attachment.stdin)
        elif interactive:
            stdin, self.keep_open = os.pipe()
        else:
            stdin = os.open(os.devnull, os.O_RDONLY)
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        self.readers = {out_read: "stdout", err_read: "stderr"}
        self.child = [stdin, out_write, err_write]

    def close_child_ends(self) -> None:
        """Close the container's ends here, so its exit brings EOF on ours."""
        for fd in set(self.child):
            os.close(fd)
        self.child = []


class Supervisor:
    """Runs one container from start to teardown; see the module docstring."""

    def __init__(self, root: str, container_id: str, sync_fd: int, attachment: Attachment):
        from lstore.runner import containers
        from lstore.store.meta import Meta

        self.root = root
        self.meta = Meta(os.path.join(root, "meta"))
        self.container = containers.load(self.meta, container_id)
        self.options = self.container.options
        self.sync_fd: int | None = sync_fd
        self.attachment = attachment
        self.selector = selectors.DefaultSelector()
        self.signal_read, self.signal_write = os.pipe()

    def run(self) -> int:
        """Run the container to its end and release it; return the supervisor's exit status."""
        from lstore.runner import containers

        self.container = containers.update(
            self.meta,
            self.container.id,
            expect=(containers.CREATED,),
            supervisor_pid=os.getpid(),
            supervisor_start=containers.process_start_ticks(os.getpid()),
        )
        try:
            exit_code = self._run_container()
        finally:
            self.attachment.close()
            self._release()
            self._close_sync()
        return 0 if exit_code is not None else 1

    def _run_container(self) -> int | None:
        from lstore.runner import cgroups, containers
        from lstore.runner.logs import LogWriter

        stdio = ContainerStdio(
            bool(self.options["tty"]),
            bool(self.options["interactive"]),
            self.attachment,
            runtime_console=self.options["runtime"] == "builtin",
        )
        cgroup = cgroups.open(self.container.cgroup) if self.container.cgroup else None
        self._install_signal_forwarding()

        process = self._start(stdio, cgroup)
        stdio.close_child_ends()
        if process is None:
            return None
        if process.console is not None:
            stdio.adopt_console(process.console)

        writer = LogWriter(self.container.log_path)
        try:
            exit_code = self._copy_until_exit(process, stdio, writer)
        finally:
            writer.close()

        oom_kills = self._oom_kill_count(cgroup)
        # As docker reports it: the container was OOM killed when its init died of SIGKILL
        # and the OOM killer did kill in its cgroup. A child killed while the init lives on
        # only shows in the count, and a plain `kill -9` is not an OOM kill.
        oom_killed = exit_code == 128 + signal.SIGKILL and oom_kills > 0
        self.container = containers.update(
            self.meta,
            self.container.id,
            state=containers.EXITED,
            exit_code=exit_code,
            oom_killed=oom_killed,
            oom_kill_count=oom_kills,
            finished_at=containers.rfc3339_nano(),
        )
        log.info(
            "container %s exited with %d (OOM killed: %s)",
            self.container.short_id,
            exit_code,
            oom_killed,
        )
        self._sync(f"exit {exit_code}")
        return exit_code

    def _oom_kill_count(self, cgroup: Any) -> int:
        if cgroup is None:
            return 0
        try:
            return cgroup.oom_kill_count()
        except FileNotFoundError:
            log.warning("cgroup of container %s is gone; cannot tell whether it was OOM "
                        "killed", self.container.short_id)
            return 0

    def _start(self, stdio: ContainerStdio, cgroup: Any) -> Any:
        from lstore.errors import LstoreError
        from lstore.runner import containers, runtime

        stdin, stdout, stderr = stdio.child
        try:
            process = runtime.start(
                self.container.bundle,
                self.container.id,
                runtime=self.options["runtime"],
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                cgroup=cgroup,
                console_size=stdio.console_size,
            )
        except (LstoreError, OSError) as exc:
            log.error("container %s failed to start: %s", self.container.short_id, exc)
            self.container = containers.update(
                self.meta,
                self.container.id,
                state=containers.EXITED,
                exit_code=128,
                error=str(exc),
                finished_at=containers.rfc3339_nano(),
            )
            self._sync(f"error {exc}")
            return None

        self.container = containers.update(
            self.meta,
            self.container.id,
            state=containers.RUNNING,
            pid=process.pid,
            pid_start=containers.process_start_ticks(process.pid) or 0,
            started_at=containers.rfc3339_nano(),
        )
        self._sync(f"started {process.pid} {os.getpid()}")
        return process

    def _copy_until_exit(self, process: Any, stdio: ContainerStdio, writer: Any) -> int:
        from lstore.runner.health import HealthMonitor

        for fd in stdio.readers:
            self.selector.register(fd, selectors.EVENT_READ, "output")
        self.selector.register(self.signal_read, selectors.EVENT_READ, "signal")
        if stdio.master is not None and self.attachment.stdin is not None:
            self.selector.register(self.attachment.stdin, selectors.EVENT_READ, "input")
        exited_fd = _pidfd_or_none(process.pid)
        if exited_fd is not None:
            self.selector.register(exited_fd, selectors.EVENT_READ, "exited")
        health = HealthMonitor.for_container(self.meta, self.container, self.selector)

        while exited_fd is not None:
            timeout = health.timeout() if health else None
            events = self.selector.select(timeout)
            if self._handle(events, process, stdio, writer, health):
                break
            if health:
                health.tick()

        if health:
            health.stop()
        exit_code = process.wait()
        self._drain(stdio, writer)
        return exit_code

    def _handle(
        self, events: list, process: Any, stdio: ContainerStdio, writer: Any, health: Any
    ) -> bool:
        """Handle ready descriptors; return True once the container's PID 1 has exited."""
        exited = False
        for key, _mask in events:
            kind = key.data
            if kind == "output":
                self._copy_output(key.fd, stdio, writer)
            elif kind == "signal":
                self._forward_signals(process, stdio)
            elif kind == "input":
                self._copy_input(stdio)
            elif kind == "exited":
                exited = True
            elif callable(kind):
                kind()
        return exited

    def _copy_output(self, fd: int, stdio: ContainerStdio, writer: Any) -> bool:
        """Copy one read of a stream; return False at EOF (the fd is then unregistered)."""
        try:
            data = os.read(fd, READ_SIZE)
        except OSError as exc:
            # A pty master reads EIO once every slave descriptor is closed.
            if exc.errno != errno.EIO:
                raise
            data = b""
        if not data:
            self.selector.unregister(fd)
            os.close(fd)
            del stdio.readers[fd]
            return False

        stream = stdio.readers[fd]
        writer.write(stream, data)
        self.attachment.send(stream, data)
        return True

    def _copy_input(self, stdio: ContainerStdio) -> None:
        stdin = self.attachment.stdin
        data = os.read(stdin, READ_SIZE) if stdin is not None else b""
        if data:
            _write_all(stdio.master, data)
            return

        # The client's stdin ended: pass an end-of-file character to the terminal, as a
        # user typing Ctrl-D would, and stop reading.
        self.selector.unregister(stdin)
        os.write(stdio.master, b"\x04")

    def _drain(self, stdio: ContainerStdio, writer: Any) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while stdio.readers and time.monotonic() < deadline:
            remaining = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select(list(stdio.readers), [], [], remaining)
            for fd in ready:
                self._copy_output(fd, stdio, writer)
        for fd in list(stdio.readers):
            log.warning(
                "output %s of container %s still open after exit; closing it",
                stdio.readers[fd],
                self.container.short_id,
            )
            os.close(fd)
        writer.flush()

    def _install_signal_forwarding(self) -> None:
        os.set_blocking(self.signal_write, False)
        signal.set_wakeup_fd(self.signal_write, warn_on_full_buffer=False)
        for signum in (*FORWARDED_SIGNALS, RESIZE_SIGNAL):
            # A Python-level handler is needed for the wakeup fd to receive the number.
            signal.signal(signum, lambda *_: None)

    def _forward_signals(self, process: Any, stdio: ContainerStdio) -> None:
        for signum in os.read(self.signal_read, 64):
            if signum == RESIZE_SIGNAL:
                self._resize(process, stdio)
                continue
            log.info("forwarding signal %d to container %s", signum, self.container.short_id)
            try:
                process.signal(signum)
            except ProcessLookupError:
                pass

    def _resize(self, process: Any, stdio: ContainerStdio) -> None:
        """Give the container's pty the current size of the client's terminal."""
        size = terminal.first_window_size(self.attachment.stdin, self.attachment.outputs["stdout"])
        if stdio.master is None or size is None:
            return
        try:
            terminal.set_window_size(stdio.master, size)
        except OSError as exc:
            log.info("cannot resize the terminal of %s: %s", self.container.short_id, exc)
            return
        process.terminal_resized()

    def _release(self) -> None:
        from lstore.runner import lifecycle

        try:
            if self.options["rm"]:
                lifecycle.remove_resources(self.meta, self.container)
            else:
                lifecycle.release(self.meta, self.container)
        except Exception:
            # Logged for the operator: `lstore rm -f` retries every step.
            log.exception("releasing container %s failed", self.container.short_id)

    def _sync(self, line: str) -> None:
        if self.sync_fd is None:
            return
        try:
            _write_all(self.sync_fd, (line.replace("\n", " ") + "\n").encode())
        except OSError:
            self._close_sync()  # the CLI has exited, so no process reads the result

    def _close_sync(self) -> None:
        if self.sync_fd is not None:
            os.close(self.sync_fd)
            self.sync_fd = None


def _pidfd_or_none(pid: int) -> int | None:
    """Open a pidfd, which becomes readable when the process exits; None if already gone."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lstore-supervisor")
    parser.add_argument("--root", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--sync", type=int, required=True)
    for name in ("stdin", "stdout", "stderr"):
        parser.add_argument(f"--{name}", type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)

    # The second fork: the CLI reaps the first child at once, and this one is re-parented
    # to init (or the nearest subreaper), outside the CLI's process tree.
    if os.fork() > 0:
        os._exit(0)

    # force: a supervisor forked from the CLI inherits the CLI's logging set-up.
    logging.basicConfig(
        force=True,
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s supervisor[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    attachment = Attachment(args.stdin, args.stdout, args.stderr)
    return Supervisor(args.root, args.id, args.sync, attachment).run()


if __name__ == "__main__":
    sys.exit(main())
