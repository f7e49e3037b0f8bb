"""Health checks: the image's Healthcheck or --health-cmd, run inside the container.

The supervisor runs one probe at a time with the container's namespaces, cgroup and
environment. Status follows docker: "starting" until the first success or until `retries`
consecutive failures after the start period, then "healthy" or "unhealthy". The state is
stored in the container record as docker's State.Health: {Status, FailingStreak, Log}.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import time
from dataclasses import dataclass
from typing import Any

from lstore.errors import InvalidArgumentError

log = logging.getLogger(__name__)

STARTING = "starting"
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"

# Docker's defaults for a Healthcheck without these fields (seconds, count).
DEFAULT_INTERVAL = 30.0
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 3

# Docker keeps the last 5 results and the first 4096 bytes of each probe's output.
MAX_LOG_ENTRIES = 5
MAX_OUTPUT = 4096

_NS_PER_SECOND = 1_000_000_000


@dataclass(frozen=True)
class HealthConfig:
    """A health check: the argv run in the container and its timing in seconds."""

    args: list[str]
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    start_period: float = 0.0
    retries: int = DEFAULT_RETRIES


def health_config(
    healthcheck: dict[str, Any] | None, options: dict[str, Any]
) -> HealthConfig | None:
    """Combine an image config's Healthcheck with --health-cmd and --health-interval.

    Durations in the image config are nanoseconds (docker's Go time.Duration); 0 means the
    default. Returns None when there is no check or its test is ["NONE"].
    """
    check = dict(healthcheck or {})
    if options.get("health_cmd"):
        check["Test"] = ["CMD-SHELL", options["health_cmd"]]
    args = _test_args(check.get("Test") or [])
    if args is None:
        return None

    interval = options.get("health_interval") or _seconds(check.get("Interval"))
    return HealthConfig(
        args=args,
        interval=interval or DEFAULT_INTERVAL,
        timeout=_seconds(check.get("Timeout")) or DEFAULT_TIMEOUT,
        start_period=_seconds(check.get("StartPeriod")) or 0.0,
        retries=int(check.get("Retries") or DEFAULT_RETRIES),
    )


def _test_args(test: list[str]) -> list[str] | None:
    if not test or test[0] == "NONE":
        return None
    if test[0] == "CMD-SHELL" and len(test) == 2:
        return ["/bin/sh", "-c", test[1]]
    if test[0] == "CMD" and len(test) > 1:
        return list(test[1:])
    raise InvalidArgumentError(f"invalid health check test {test!r}: expected CMD or CMD-SHELL")


def _seconds(nanoseconds: int | None) -> float:
    return (nanoseconds or 0) / _NS_PER_SECOND


def initial_state() -> dict[str, Any]:
    return {"Status": STARTING, "FailingStreak": 0, "Log": []}


def apply_result(
    state: dict[str, Any], result: dict[str, Any], config: HealthConfig, in_start_period: bool
) -> dict[str, Any]:
    """Return the health state after one probe result {Start, End, ExitCode, Output}.

    A failure inside the start period does not count towards `retries`, as in docker.
    """
    entries = (state["Log"] + [result])[-MAX_LOG_ENTRIES:]
    if result["ExitCode"] == 0:
        return {"Status": HEALTHY, "FailingStreak": 0, "Log": entries}
    if in_start_period and state["Status"] == STARTING:
        return {"Status": STARTING, "FailingStreak": state["FailingStreak"], "Log": entries}

    streak = state["FailingStreak"] + 1
    status = UNHEALTHY if streak >= config.retries else state["Status"]
    return {"Status": status, "FailingStreak": streak, "Log": entries}


class _Probe:
    """One running check: its process, output pipe and deadline."""

    def __init__(self, process: Any, output: int, deadline: float, started: str) -> None:
        self.process = process
        self.output = output
        self.exited = os.pidfd_open(process.pid)
        self.deadline = deadline
        self.started = started
        self.data = b""
        self.timed_out = False


class HealthMonitor:
    """Schedules probes inside the supervisor's event loop and stores each result.

    Not thread-safe: the supervisor calls timeout() and tick() from its single loop, and the
    probe's descriptors are registered with the loop's selector.
    """

    def __init__(self, meta: Any, container: Any, selector: selectors.BaseSelector,
                 config: HealthConfig) -> None:
        self.meta = meta
        self.container = container
        self.selector = selector
        self.config = config
        self.started = time.monotonic()
        self.next_run = self.started + config.interval
        self.probe: _Probe | None = None
        self.state = initial_state()
        self._store()

    @classmethod
    def for_container(cls, meta: Any, container: Any, selector: selectors.BaseSelector
                      ) -> "HealthMonitor | None":
        config = health_config(container.config.get("Healthcheck"), container.options)
        if config is None:
            return None
        return cls(meta, container, selector, config)

    def timeout(self) -> float:
        """Return the seconds until tick() has something to do."""
        due = self.probe.deadline if self.probe else self.next_run
        return max(0.0, due - time.monotonic())

    def tick(self) -> None:
        now = time.monotonic()
        if self.probe and now >= self.probe.deadline and not self.probe.timed_out:
            self.probe.timed_out = True
            self.probe.process.signal(signal.SIGKILL)
        if self.probe is None and now >= self.next_run:
            self._start_probe()

    def stop(self) -> None:
        """Kill a running probe when the container exits; its result is not stored."""
        if self.probe is not None:
            try:
                self.probe.process.signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.probe.process.wait()
            self._close_probe()

    def _start_probe(self) -> None:
        from lstore.runner import lifecycle, runtime
        from lstore.runner.containers import rfc3339_nano

        read_end, write_end = os.pipe()
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            process = runtime.exec_process(
                self.container.pid,
                lifecycle.exec_spec(self.container, self.config.args),
                cgroup=lifecycle.open_cgroup(self.container),
                stdin=null,
                stdout=write_end,
                stderr=write_end,
                container=f"{self.container.name} ({self.container.short_id})",
            )
        except Exception as exc:
            log.warning("health check of %s failed to start: %s", self.container.short_id, exc)
            os.close(read_end)
            self._record(rfc3339_nano(), -1, f"failed to start the check: {exc}")
            return
        finally:
            os.close(write_end)
            os.close(null)

        deadline = time.monotonic() + self.config.timeout
        self.probe = _Probe(process, read_end, deadline, rfc3339_nano())
        self.selector.register(read_end, selectors.EVENT_READ, self._read_output)
        self.selector.register(self.probe.exited, selectors.EVENT_READ, self._finish)

    def _read_output(self) -> None:
        assert self.probe is not None
        data = os.read(self.probe.output, 65536)
        if not data:
            self.selector.unregister(self.probe.output)
            return
        self.probe.data = (self.probe.data + data)[:MAX_OUTPUT]

    def _finish(self) -> None:
        probe = self.probe
        assert probe is not None
        exit_code = probe.process.wait()
        self._drain_output(probe)
        self._close_probe()
        output = probe.data.decode("utf-8", "replace")
        if probe.timed_out:
            exit_code = -1
            output = f"Health check exceeded timeout ({self.config.timeout:g}s)"
        self._record(probe.started, exit_code, output)

    def _drain_output(self, probe: _Probe) -> None:
        os.set_blocking(probe.output, False)
        try:
            while data := os.read(probe.output, 65536):
                probe.data = (probe.data + data)[:MAX_OUTPUT]
        except BlockingIOError:
            pass  # a process the check left behind keeps the pipe open

    def _close_probe(self) -> None:
        probe = self.probe
        assert probe is not None
        for fd in (probe.output, probe.exited):
            try:
                self.selector.unregister(fd)
            except KeyError:
                pass
            os.close(fd)
        self.probe = None

    def _record(self, started: str, exit_code: int, output: str) -> None:
        from lstore.runner.containers import rfc3339_nano

        result = {"Start": started, "End": rfc3339_nano(), "ExitCode": exit_code,
                  "Output": output}
        in_start_period = time.monotonic() - self.started < self.config.start_period
        self.state = apply_result(self.state, result, self.config, in_start_period)
        self.next_run = time.monotonic() + self.config.interval
        log.info("health check of %s: exit %d, status %s",
                 self.container.short_id, exit_code, self.state["Status"])
        self._store()

    def _store(self) -> None:
        from lstore.runner import containers

        containers.update(self.meta, self.container.id, health=self.state)
