"""Resource usage of running containers, from their cgroup and network namespace.

CPU percent is measured as docker does: CPU time used between two samples divided by the
wall-clock time between them, so 100% is one CPU fully busy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from lstore.runner.containers import Container


@dataclass
class Sample:
    """One reading of a container's counters; byte counts, ns of CPU time, monotonic s."""

    taken: float
    cpu_usage_ns: int
    memory_bytes: int
    memory_limit_bytes: int
    pids: int
    io_read_bytes: int
    io_write_bytes: int
    net_rx_bytes: int
    net_tx_bytes: int


def take_sample(container: Container) -> Sample:
    """Read the counters of a running container. Raises OSError once its cgroup is gone."""
    from lstore.runner import cgroups

    values = cgroups.open(container.cgroup).stats() if container.cgroup else {}
    rx, tx = network_bytes(container.pid)
    return Sample(
        taken=time.monotonic(),
        cpu_usage_ns=values.get("cpu_usage_ns") or 0,
        memory_bytes=values.get("memory_bytes") or 0,
        memory_limit_bytes=values.get("memory_limit_bytes") or host_memory_bytes(),
        pids=values.get("pids") or 0,
        io_read_bytes=values.get("io_read_bytes") or 0,
        io_write_bytes=values.get("io_write_bytes") or 0,
        net_rx_bytes=rx,
        net_tx_bytes=tx,
    )


def cpu_percent(previous: Sample, current: Sample) -> float:
    elapsed_ns = (current.taken - previous.taken) * 1e9
    if elapsed_ns <= 0:
        return 0.0
    return max(0, current.cpu_usage_ns - previous.cpu_usage_ns) / elapsed_ns * 100.0


def network_bytes(pid: int) -> tuple[int, int]:
    """Return bytes received and sent on the interfaces of a process's network namespace.

    /proc/PID/net/dev shows the namespace of that process; loopback traffic is left out,
    as docker leaves it out. A process that is gone reads as (0, 0).
    """
    try:
        with open(f"/proc/{pid}/net/dev") as handle:
            lines = handle.readlines()[2:]
    except (FileNotFoundError, ProcessLookupError):
        return 0, 0
    received = sent = 0
    for line in lines:
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            continue
        fields = counters.split()
        received += int(fields[0])
        sent += int(fields[8])
    return received, sent


def host_memory_bytes() -> int:
    """Return MemTotal, which docker shows as the limit of a container without one."""
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def stats_row(container: Container, previous: Sample, current: Sample) -> dict[str, Any]:
    """Return one line of `lstore stats` as values (percent, bytes, count)."""
    limit = current.memory_limit_bytes
    return {
        "id": container.short_id,
        "name": container.name,
        "cpu_percent": cpu_percent(previous, current),
        "memory_bytes": current.memory_bytes,
        "memory_limit_bytes": limit,
        "memory_percent": current.memory_bytes / limit * 100.0 if limit else 0.0,
        "net_rx_bytes": current.net_rx_bytes,
        "net_tx_bytes": current.net_tx_bytes,
        "io_read_bytes": current.io_read_bytes,
        "io_write_bytes": current.io_write_bytes,
        "pids": current.pids,
    }
