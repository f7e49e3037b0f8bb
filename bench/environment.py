"""The benchmark environment: the registry, the shaping proxy and the two tools."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from lstore.bench.contenders import ContainerdTool, Contender, LstoreTool

log = logging.getLogger(__name__)

DROP_CACHES = "/proc/sys/vm/drop_caches"


@dataclass
class BenchEnv:
    """The registry (direct and through the shaping proxy) and both tools."""

    registry_host: str
    wan_host: str
    lstore: LstoreTool
    containerd: ContainerdTool

    def ref(self, image: str, host: str | None = None) -> str:
        """Return the full reference of "repository:tag" on the registry or on `host`."""
        return f"{host or self.registry_host}/{image}"

    def ordered(self, sample: int) -> list[Contender]:
        """Return both tools, lstore first on even samples, so neither always goes first."""
        tools: list[Contender] = [self.lstore, self.containerd]
        return tools if sample % 2 == 0 else tools[::-1]

    def make_cold(self) -> None:
        """Empty both stores, restart containerd and drop the page cache.

        After this, a pull reads every byte from the registry's disk and writes every file,
        and neither tool has anything cached in memory.
        """
        self.containerd.wipe()
        self.lstore.wipe()
        drop_page_cache()


def drop_page_cache() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes (needs root)."""
    os.sync()
    with open(DROP_CACHES, "w") as control:
        control.write("3\n")
