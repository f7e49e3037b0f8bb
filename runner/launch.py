"""Start a container's supervisor by forking the CLI process.

A new Python interpreter for every supervisor costs its start-up and the imports of the
runtime modules, which is most of a short container's run time. A fork of the CLI starts
with all of that already loaded. The child detaches into a new session, drops what it
inherited from the CLI (the LMDB handle, other descriptors) and runs the supervisor's `main`,
which forks once more so that the supervisor is not the CLI's child.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

log = logging.getLogger(__name__)


def spawn_supervisor(argv: list[str], keep_fds: list[int], log_path: str) -> None:
    """Run `supervisor.main(argv)` in a detached grandchild; return once it is detached.

    `keep_fds` are the descriptors named in `argv` (sync pipe, attached stdio); the child
    closes every other descriptor above stderr. The supervisor's stdout and stderr go to
    `log_path`.
    """
    from lstore.runner import supervisor
    from lstore.store import meta

    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setsid()
            # LMDB closes its own descriptors, so it goes before the sweep of the others.
            meta.forget_environments()
            _redirect_stdio(log_fd)
            _close_fds_except(keep_fds)
            code = supervisor.main(argv)
        except BaseException:  # noqa: BLE001 - the child must never return into the CLI
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(log_fd)
    os.waitpid(pid, 0)


def _redirect_stdio(log_fd: int) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null)


def _close_fds_except(keep_fds: list[int]) -> None:
    start = 3
    for fd in sorted(keep_fds):
        if fd >= start:
            os.closerange(start, fd)
            start = fd + 1
    os.closerange(start, os.sysconf("SC_OPEN_MAX"))
