"""Run the external tools (umoci, skopeo, debootstrap, apt) that build and serve test images."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from lstore.errors import LstoreError

log = logging.getLogger(__name__)

# Enough of a failed command's output to show the cause without flooding a test report.
_OUTPUT_TAIL = 4000


class ToolError(LstoreError):
    """An external tool is missing or exited with an error.

    `output` contains the end of the tool's combined stdout and stderr, so a test fixture can
    show the cause without rerunning it.
    """

    def __init__(self, message: str, *, output: str = "", **context: object) -> None:
        super().__init__(message, **context)  # type: ignore[arg-type]
        self.output = output

    def __str__(self) -> str:
        if not self.output:
            return self.message
        return f"{self.message}\n--- output ---\n{self.output}"


def require_tool(name: str) -> str:
    """Return the path of the program `name`, or raise ToolError saying how to install it."""
    path = shutil.which(name)
    if path is None:
        raise ToolError(f"required program {name!r} not found: run tools/setup.sh as root")
    return path


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
) -> str:
    """Run `argv` to completion and return its stdout; raise ToolError when it fails.

    Stderr is captured too and becomes part of the error, never of the returned text.
    """
    require_tool(argv[0])
    log.debug("running %s", " ".join(argv))
    try:
        done = subprocess.run(
            list(argv), env=env, cwd=cwd, timeout=timeout, text=True,
            stdin=subprocess.DEVNULL, capture_output=True, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"{argv[0]} timed out after {timeout} s", output=_tail(exc)) from exc

    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-_OUTPUT_TAIL:]
        command = " ".join(argv)
        raise ToolError(f"command failed with exit code {done.returncode}: {command}",
                        output=output)
    return done.stdout


def _tail(exc: subprocess.TimeoutExpired) -> str:
    parts = [p for p in (exc.stdout, exc.stderr) if p]
    text = "".join(p if isinstance(p, str) else p.decode(errors="replace") for p in parts)
    return text[-_OUTPUT_TAIL:]


def read_log_tail(path: str) -> str:
    """Return the end of a tool's log file for an error message, or "" when it is unreadable."""
    try:
        with open(path, errors="replace") as log_file:
            return log_file.read()[-_OUTPUT_TAIL:]
    except OSError:
        return ""
