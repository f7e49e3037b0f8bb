"""Run a benchmarked command and measure its wall time and peak memory.

The child is reaped with wait4(2), so its max RSS is its own, not the maximum over every child
this process has had, as getrusage(RUSAGE_CHILDREN) would report.
"""

from __future__ import annotations

import logging
import os
import resource
import select
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

log = logging.getLogger(__name__)

# Far longer than any pull of the benchmark images (the largest is 333 MB compressed, 1 GB
# unpacked) should take, so a command still running then is treated as hung.
DEFAULT_TIMEOUT = 600.0
# Enough of a failed command's stderr to show why it failed.
_OUTPUT_TAIL = 2000


class SampleError(Exception):
    """A timed command failed, so its row has no value for that tool. The message gives the
    reason."""


@dataclass(frozen=True)
class Timed:
    """One finished command: exit code, wall seconds, peak RSS (KiB) and its output."""

    argv: tuple[str, ...]
    returncode: int
    seconds: float
    max_rss_kib: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def reason(self) -> str:
        """Describe in one line why the command failed."""
        if self.timed_out:
            return f"{self.argv[0]} timed out after {self.seconds:.1f} s"
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        detail = lines[-1] if lines else "no output"
        return f"exit code {self.returncode}: {detail}"

    def check(self, action: str) -> Timed:
        """Return self, or raise SampleError naming `action` when the command failed."""
        if not self.ok:
            raise SampleError(f"{action}: {self.reason()}")
        return self


def run_timed(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              timeout: float = DEFAULT_TIMEOUT) -> Timed:
    """Run `argv` to completion; kill it after `timeout` seconds.

    The time covers fork, exec and exit, the same for every tool. Output goes to temporary
    files, so a chatty child never blocks on a full pipe.
    """
    log.debug("timing %s", " ".join(argv))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(list(argv), env=dict(env) if env is not None else None,
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        status, usage, timed_out = _wait(process, timeout)
        seconds = time.perf_counter() - started
        return Timed(tuple(argv), os.waitstatus_to_exitcode(status), seconds,
                     usage.ru_maxrss, _read_tail(out), _read_tail(err), timed_out)


def _wait(process: subprocess.Popen[bytes],
          timeout: float) -> tuple[int, resource.struct_rusage, bool]:
    """Reap `process` with wait4 and return its wait status, rusage and whether it timed out.

    A pidfd refers to this very process, so the kill after a timeout cannot hit a recycled pid.
    """
    pidfd = os.pidfd_open(process.pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            log.warning("killing %s (pid %d) after %.0f s", process.args, process.pid, timeout)
            process.kill()
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        os.close(pidfd)

    # Tell Popen the child is reaped, so it never waits for or signals that pid again.
    process.returncode = os.waitstatus_to_exitcode(status)
    return status, usage, not ready


def _read_tail(file: IO[bytes]) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")[-_OUTPUT_TAIL:]
