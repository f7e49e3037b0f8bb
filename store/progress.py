"""Byte counts of a pull in progress, shared by the scheduler and the CLI's printer."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LayerProgress:
    digest: str
    size: int
    fetched: int = 0
    state: str = "waiting"  # waiting, downloading, present, done


@dataclass
class PullProgress:
    """Per-layer byte counts, updated on the event loop and read by the progress printer."""

    layers: dict[str, LayerProgress] = field(default_factory=dict)
    fetched_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    listener: Callable[["PullProgress"], None] | None = None

    def update(self, digest: str, nbytes: int = 0, state: str | None = None) -> None:
        layer = self.layers[digest]
        layer.fetched += nbytes
        self.fetched_bytes += nbytes
        if state is not None:
            layer.state = state
        if self.listener is not None:
            self.listener(self)
