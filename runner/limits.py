"""Resource limit flags of `lstore run`, parsed and checked as docker checks them.

Each check runs before the container exists. A limit that the kernel would reject, or one
so low that the container dies before its program starts, then fails with a one-line error
naming the flag, not with a silent exit 137 or a cgroup write error. Values that docker reads as
"no limit" (`-m 0`, `--pids-limit 0` or `-1`, `--cpu-quota 0` or `-1`) become None here.
"""

from __future__ import annotations

import math
import os

from lstore.errors import InvalidArgumentError

# docker's minimum memory limit on Linux (6 MiB): below it the kernel's OOM killer ends the
# container's init before its program runs.
MIN_MEMORY = 6 * 1024 * 1024

# Bounds of the CFS quota and period in microseconds. The kernel rejects a quota or period
# under 1 ms and a period over 1 s with EINVAL (kernel/sched/core.c, tg_set_cfs_bandwidth).
MIN_CFS_MICROSECONDS = 1000
MAX_CFS_PERIOD = 1_000_000

# The smallest --cpus docker accepts.
MIN_CPUS = 0.01


def parse_memory(text: str | None) -> int | None:
    """Parse -m/--memory; "0" means no limit, as in docker."""
    from lstore.runner.cgroups import parse_bytes

    if text is None:
        return None
    try:
        memory = parse_bytes(text)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(
            f"invalid --memory {text!r}: expected a size such as 512m (units b, k, m, g, t)"
        ) from exc
    if memory == 0:
        return None
    check_memory(memory, text)
    return memory


def check_memory(memory: int, text: str | None = None) -> None:
    """Reject a memory limit under 6MB; `text` is the value as the user typed it."""
    if memory < MIN_MEMORY:
        value = repr(text) if text is not None else f"{memory} bytes"
        raise InvalidArgumentError(
            f"invalid --memory {value}: the minimum memory limit allowed is 6MB"
        )


def parse_cpus(text: str | None) -> float | None:
    """Parse --cpus, a number of CPUs from 0.01 to the CPUs this process may run on."""
    if text is None:
        return None
    try:
        cpus = float(text)
    except ValueError as exc:
        raise InvalidArgumentError(
            f"invalid --cpus {text!r}: expected a number such as 0.5"
        ) from exc
    check_cpus(cpus)
    return cpus


def check_cpus(cpus: float) -> None:
    # docker counts the CPUs in the process's affinity mask, as sched_getaffinity(2) shows.
    available = len(os.sched_getaffinity(0))
    if not (math.isfinite(cpus) and MIN_CPUS <= cpus <= available):
        raise InvalidArgumentError(
            f"invalid --cpus {cpus:g}: the range of CPUs is from {MIN_CPUS} to "
            f"{available}.00, as there are only {available} CPUs available"
        )


def parse_cpu_quota(text: str | None) -> int | None:
    """Parse --cpu-quota in microseconds; 0 or a negative value means no quota."""
    quota = _parse_integer("--cpu-quota", text)
    if quota is None or quota <= 0:
        return None
    check_cpu_quota(quota)
    return quota


def check_cpu_quota(quota: int) -> None:
    # A negative quota is the kernel's "no quota" (cpu.cfs_quota_us -1).
    if 0 <= quota < MIN_CFS_MICROSECONDS:
        raise InvalidArgumentError(
            f"invalid --cpu-quota {quota}: the CPU CFS quota cannot be less than 1ms "
            f"({MIN_CFS_MICROSECONDS} microseconds)"
        )


def parse_cpu_period(text: str | None) -> int | None:
    """Parse --cpu-period in microseconds; 0 means the default period."""
    period = _parse_integer("--cpu-period", text)
    if period is None or period == 0:
        return None
    check_cpu_period(period)
    return period


def check_cpu_period(period: int) -> None:
    if not MIN_CFS_MICROSECONDS <= period <= MAX_CFS_PERIOD:
        raise InvalidArgumentError(
            f"invalid --cpu-period {period}: the CPU CFS period must be from 1ms to 1s "
            f"({MIN_CFS_MICROSECONDS} to {MAX_CFS_PERIOD} microseconds)"
        )


def parse_pids_limit(text: str | None) -> int | None:
    """Parse --pids-limit; 0 or a negative value means no limit, as in docker."""
    limit = _parse_integer("--pids-limit", text)
    if limit is None or limit <= 0:
        return None
    return limit


def _parse_integer(flag: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError as exc:
        raise InvalidArgumentError(f"invalid {flag} {text!r}: expected an integer") from exc
