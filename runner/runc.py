"""Run a bundle with runc instead of the built-in runtime.

`runc run` stays in the foreground with the caller's stdio, so its exit status is the
container's (runc relays it, 128+N for a signal). The container's init pid comes from
--pid-file, which runc writes once the container is created. runc writes its own errors to
a JSON log in the bundle, where a program that cannot be executed is recognised and given
docker's exit codes (127, 126), matching the built-in runtime.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time

from lstore.errors import ContainerError
from lstore.runner.runtime import EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND, ContainerProcess

log = logging.getLogger(__name__)

RUNC = "runc"
_PID_FILE = "runc.pid"
_LOG_FILE = "runc.log"
_POLL_INTERVAL_S = 0.002

# runc's error text for a program it cannot exec (runc 1.1 uses Go's exec.LookPath).
_NOT_FOUND_MARKERS = ("executable file not found", "no such file or directory")
_PERMISSION_MARKERS = ("permission denied", "exec format error")


class RuncProcess(ContainerProcess):
    """A `runc run` child; `pid` is the container's init, not runc itself."""

    def __init__(
        self,
        process: subprocess.Popen,
        pid: int,
        container_id: str,
        runc_root: str,
        code: int | None = None,
    ) -> None:
        self.pid = pid
        self._process = process
        self._container_id = container_id
        self._runc_root = runc_root
        self._code = code

    def wait(self) -> int:
        if self._code is None:
            self._code = _returncode(self._process.wait())
        return self._code

    def poll(self) -> int | None:
        if self._code is None and self._process.poll() is not None:
            self._code = _returncode(self._process.returncode)
        return self._code

    def signal(self, sig: int) -> None:
        if self.poll() is not None:
            return
        result = subprocess.run(
            [RUNC, "--root", self._runc_root, "kill", self._container_id, str(int(sig))],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            log.debug("runc kill %s %d failed: %s", self._container_id, sig, result.stderr.strip())


    def terminal_resized(self) -> None:
        # `runc run` with a terminal copies between its stdin and the container's pty, and
        # on SIGWINCH gives that pty the size of its stdin.
        if self.poll() is None:
            self._process.send_signal(signal.SIGWINCH)


def _returncode(code: int) -> int:
    return 128 - code if code < 0 else code


def start(
    bundle_dir: str, container_id: str, stdio: tuple[int, int, int], runc_root: str
) -> ContainerProcess:
    """Start `runc run` for the bundle and wait until the container's init exists.

    Raises ContainerError when runc is missing or fails before the container starts for a
    reason other than the program itself. runc keeps its state and the container's cgroup
    after the container exits, until `delete` removes them.
    """
    pid_file = os.path.join(bundle_dir, _PID_FILE)
    log_file = os.path.join(bundle_dir, _LOG_FILE)
    for stale in (pid_file, log_file):
        if os.path.exists(stale):
            os.unlink(stale)
    os.makedirs(runc_root, exist_ok=True)
    if os.path.exists(os.path.join(runc_root, container_id)):
        # A kept, stopped container of an earlier run of this bundle.
        delete(container_id, runc_root)

    command = [
        RUNC,
        "--root",
        runc_root,
        "--log",
        log_file,
        "--log-format",
        "json",
        "run",
        # Keep the stopped container, and with it its cgroup, until `delete` runs: the
        # supervisor reads the cgroup's OOM kill counter after the container exits.
        "--keep",
        "--bundle",
        bundle_dir,
        "--pid-file",
        pid_file,
        container_id,
    ]
    try:
        process = subprocess.Popen(command, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2])
    except FileNotFoundError as exc:
        raise ContainerError(
            "runc is not installed; install the runc package or use --runtime builtin"
        ) from exc

    pid = _wait_for_pid(process, pid_file)
    if pid is not None:
        return RuncProcess(process, pid, container_id, runc_root)
    return _failed_start(process, container_id, runc_root, log_file)


def _wait_for_pid(process: subprocess.Popen, pid_file: str) -> int | None:
    # runc writes the pid file by rename, so it is complete once it exists. A short-lived
    # container may have exited, and runc with it, before the first look.
    while True:
        exited = process.poll() is not None
        try:
            with open(pid_file) as pid_text:
                return int(pid_text.read())
        except FileNotFoundError:
            if exited:
                return None
        time.sleep(_POLL_INTERVAL_S)


def _failed_start(
    process: subprocess.Popen, container_id: str, runc_root: str, log_file: str
) -> ContainerProcess:
    error = _last_error(log_file)
    lowered = error.lower()
    if any(marker in lowered for marker in _NOT_FOUND_MARKERS):
        code = EXIT_NOT_FOUND
    elif any(marker in lowered for marker in _PERMISSION_MARKERS):
        code = EXIT_CANNOT_EXECUTE
    else:
        raise ContainerError(
            f"runc failed to start container {container_id} (exit status "
            f"{process.returncode}): {error or 'no error logged'}",
            path=log_file,
        )
    return RuncProcess(process, process.pid, container_id, runc_root, code=code)


def _last_error(log_file: str) -> str:
    try:
        with open(log_file, encoding="utf-8", errors="replace") as runc_log:
            lines = runc_log.read().splitlines()
    except FileNotFoundError:
        return ""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("error", "fatal"):
            return str(entry.get("msg", ""))
    return ""


def delete(container_id: str, runc_root: str) -> None:
    """Remove runc's state and cgroup of a stopped container; a no-op when it is gone."""
    result = subprocess.run(
        [RUNC, "--root", runc_root, "delete", "--force", container_id],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 and "does not exist" not in result.stderr:
        log.warning(
            "runc delete %s failed: %s", container_id, result.stderr.strip() or result.returncode
        )
