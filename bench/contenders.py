"""The two tools compared, behind one interface: pull an image, run a container, wipe."""

from __future__ import annotations

import json
import os
import shutil
import sys

from lstore.bench.containerd import ContainerdDaemon
from lstore.bench.mounts import unmount_below
from lstore.bench.procs import SampleError, Timed, run_timed
from lstore.bench.results import CONTAINERD, LSTORE


class LstoreTool:
    """The lstore CLI, run as `python -m lstore.cli --root ROOT` with this interpreter."""

    name = LSTORE

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "lstore.cli", "--root", self.root, *args]

    def pull(self, ref: str, trace: str | None = None) -> Timed:
        """Pull `ref` over plain HTTP, timed; raise SampleError when lstore fails."""
        options = ["--trace", trace] if trace else []
        timed = run_timed(self.command("pull", "--plain-http", "--json", *options, ref))
        return timed.check(f"lstore pull {ref}")

    def describe_pull(self, timed: Timed) -> str:
        """Summarize what a pull fetched, from the JSON line `lstore pull --json` printed."""
        try:
            summary = json.loads(timed.stdout.splitlines()[-1])
            layers, fetched = int(summary["layers"]), int(summary["bytes_fetched"])
        except (IndexError, KeyError, TypeError, ValueError) as error:
            raise SampleError(f"lstore pull --json printed no summary: {error}") from error
        return f"lstore fetched {fetched / 1e6:.1f} MB and unpacked {layers} layers"

    def run(self, ref: str, container_name: str) -> Timed:
        """Run `true` in a new container of `ref` without networking and remove it, timed."""
        argv = self.command("run", "--rm", "--network", "none", "--name", container_name,
                            ref, "true")
        return run_timed(argv).check(f"lstore run {ref}")

    def wipe(self) -> None:
        """Delete the whole store and create it empty."""
        unmount_below(self.root)
        shutil.rmtree(self.root)
        os.makedirs(self.root)


class ContainerdTool:
    """containerd driven by ctr, with a daemon of its own."""

    name = CONTAINERD

    def __init__(self, daemon: ContainerdDaemon) -> None:
        self.daemon = daemon

    def pull(self, ref: str, trace: str | None = None) -> Timed:
        return self.daemon.pull(ref)

    def run(self, ref: str, container_name: str) -> Timed:
        return self.daemon.run(ref, container_name)

    def wipe(self) -> None:
        """Stop the daemon, delete its root and state, and start it again."""
        self.daemon.restart_empty()


Contender = LstoreTool | ContainerdTool
