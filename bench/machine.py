"""Describe the machine and software a benchmark ran on, for the results page."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    memory_gib: float
    kernel: str
    filesystem: str
    python: str
    containerd: str
    runc: str
    lstore_commit: str

    def lines(self) -> list[tuple[str, str]]:
        return [
            ("CPU", f"{self.cpu}, {self.cores} cores"),
            ("Memory", f"{self.memory_gib:.1f} GiB"),
            ("Kernel", self.kernel),
            ("Filesystem of the stores", self.filesystem),
            ("Python", self.python),
            ("containerd", self.containerd),
            ("runc", self.runc),
            ("lstore commit", self.lstore_commit),
        ]


def describe_machine(work_dir: str, containerd_version: str) -> Machine:
    """Collect the facts that affect benchmark numbers. `work_dir` contains both stores."""
    return Machine(
        cpu=_cpu_model(),
        cores=os.cpu_count() or 0,
        memory_gib=_memory_kib() / (1 << 20),
        kernel=platform.release(),
        filesystem=filesystem_of(work_dir),
        python=platform.python_version(),
        containerd=containerd_version,
        runc=_first_line(["runc", "--version"]),
        lstore_commit=lstore_commit(),
    )


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_kib() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 0


def filesystem_of(path: str, mountinfo: str | None = None) -> str:
    """Return "TYPE on DEVICE" of the mount that contains `path` (the longest mount point
    that is a prefix of it)."""
    if mountinfo is None:
        with open("/proc/self/mountinfo") as mountinfo_file:
            mountinfo = mountinfo_file.read()
    target = os.path.realpath(path)
    best = ("", "unknown", "")
    for line in mountinfo.splitlines():
        # Fields after " - " are the filesystem type, the source and the super options.
        before, _, after = line.partition(" - ")
        point = before.split()[4]
        fstype, source = (after.split() + ["", ""])[:2]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fstype, source)
    return f"{best[1]} on {best[2]}" if best[2] else best[1]


def lstore_commit() -> str:
    """Return the checkout's commit, with "+changes" when files differ from it."""
    commit = _first_line(["git", "-C", _REPO, "rev-parse", "--short=12", "HEAD"])
    status = subprocess.run(["git", "-C", _REPO, "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, check=False)
    return f"{commit}+changes" if status.stdout.strip() else commit


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return f"{argv[0]} not found"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"
