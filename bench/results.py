"""Benchmark results: the samples of each tool per row, with median, spread and ratio."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

LSTORE = "lstore"
CONTAINERD = "containerd"
TOOLS = (LSTORE, CONTAINERD)


@dataclass
class Series:
    """The samples one tool produced for one row, or the reason it has none.

    A tool is `unavailable` when one of its samples failed. The row then shows the reason
    instead of numbers from the runs that happened to work.
    """

    values: list[float] = field(default_factory=list)
    unavailable: str | None = None

    def add(self, value: float) -> None:
        self.values.append(value)

    def fail(self, reason: str) -> None:
        if self.unavailable is None:
            self.unavailable = reason

    @property
    def ok(self) -> bool:
        return self.unavailable is None and bool(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)


@dataclass
class Row:
    """One measured operation, timed for both tools in the same run.

    `unit` is "s" for durations and "MiB" for memory; lower is better for both. `notes` are
    facts checked during the run (such as how many snapshots containerd unpacked).
    """

    name: str
    title: str
    unit: str = "s"
    series: dict[str, Series] = field(default_factory=lambda: {t: Series() for t in TOOLS})
    notes: list[str] = field(default_factory=list)

    @property
    def lstore(self) -> Series:
        return self.series[LSTORE]

    @property
    def containerd(self) -> Series:
        return self.series[CONTAINERD]

    @property
    def ratio(self) -> float | None:
        """Return lstore's median over containerd's: below 1 means lstore is faster or
        smaller. None when either tool has no result."""
        if not (self.lstore.ok and self.containerd.ok) or self.containerd.median == 0:
            return None
        return self.lstore.median / self.containerd.median

    def fail(self, reason: str) -> None:
        """Mark both tools unavailable, for a failure in the row's own setup."""
        for series in self.series.values():
            series.fail(reason)
