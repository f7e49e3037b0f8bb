"""A private containerd daemon for benchmarks: own root, state, socket and config.

It is the Debian package's containerd (1.6 on Debian 12) with the CRI plugin and every
plugin that needs extra setup disabled, and the overlayfs snapshotter (the default). Nothing
is shared with a containerd the host may run, except the shim socket directory
/run/containerd/s, which containerd 1.6 does not let a config move. The socket names in it
are hashes that include our daemon's socket path, so they cannot collide with the host's,
and `stop()` removes the directory again when this daemon created it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

from lstore.bench.mounts import unmount_below
from lstore.bench.procs import SampleError, Timed, run_timed
from lstore.tools.command import ToolError, read_log_tail, require_tool

log = logging.getLogger(__name__)

NAMESPACE = "bench"
SNAPSHOTTER = "overlayfs"

# Plugins that fail or touch host paths without configuration this benchmark does not need:
# CRI (Kubernetes), snapshotters for other filesystems, /opt installs and tracing exporters.
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
)

# containerd 1.6 creates its shim socket directory here, whatever its config sets.
SHIM_RUN_DIR = "/run/containerd"

# containerd opens its socket within a second; the cap allows for a loaded machine.
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class ContainerdPaths:
    """Every path the daemon and ctr use, all below `base`."""

    base: str

    @property
    def root(self) -> str:
        return os.path.join(self.base, "root")

    @property
    def state(self) -> str:
        return os.path.join(self.base, "state")

    @property
    def socket(self) -> str:
        return os.path.join(self.base, "containerd.sock")

    @property
    def config(self) -> str:
        return os.path.join(self.base, "config.toml")

    @property
    def log(self) -> str:
        return os.path.join(self.base, "containerd.log")

    @property
    def fifo_dir(self) -> str:
        return os.path.join(self.base, "fifo")

    @property
    def runc_root(self) -> str:
        return os.path.join(self.base, "runc")


def containerd_config(paths: ContainerdPaths) -> str:
    """Build the daemon's TOML config (version 2, as containerd 1.6 reads it).

    JSON string syntax is valid for TOML basic strings, so values are quoted with json.dumps.
    Debug and metrics listeners stay off; only the unix socket below `paths.base` listens.
    """
    disabled = ", ".join(json.dumps(name) for name in DISABLED_PLUGINS)
    return "\n".join([
        "version = 2",
        f"root = {json.dumps(paths.root)}",
        f"state = {json.dumps(paths.state)}",
        f"disabled_plugins = [{disabled}]",
        "",
        "[grpc]",
        f"  address = {json.dumps(paths.socket)}",
        "",
        "[ttrpc]",
        f"  address = {json.dumps(paths.socket + '.ttrpc')}",
        "",
    ])


class ContainerdDaemon:
    """A containerd process this benchmark started, stopped only by its own pid."""

    def __init__(self, base: str) -> None:
        self.paths = ContainerdPaths(os.path.abspath(base))
        self.binary = require_tool("containerd")
        self.ctr_binary = require_tool("ctr")
        self._process: subprocess.Popen[bytes] | None = None
        self._created_run_dir = not os.path.exists(SHIM_RUN_DIR)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        """Start the daemon and return once ctr can talk to it; raise ToolError otherwise."""
        os.makedirs(self.paths.base, exist_ok=True)
        with open(self.paths.config, "w") as config_file:
            config_file.write(containerd_config(self.paths))
        with open(self.paths.log, "ab") as log_file:
            self._process = subprocess.Popen(
                [self.binary, "--config", self.paths.config],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            )
        try:
            self._wait_until_serving()
        except BaseException:
            self.stop()
            raise
        log.info("containerd pid %d serving %s", self._process.pid, self.paths.socket)

    def stop(self) -> None:
        """Stop the daemon with SIGTERM, then SIGKILL if it has not exited in time.

        The shim socket directory is removed too when it did not exist before this daemon
        and is empty, so a benchmark leaves nothing in /run.
        """
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("containerd pid %d ignored SIGTERM; killing it", process.pid)
            process.kill()
            process.wait()
        if self._created_run_dir:
            _remove_empty_directories(SHIM_RUN_DIR)

    def wipe(self) -> None:
        """Delete all content, snapshots and metadata. The daemon must be stopped."""
        if self._process is not None:
            raise RuntimeError("wipe() needs the containerd daemon stopped")
        unmount_below(self.paths.base)
        for path in (self.paths.root, self.paths.state, self.paths.fifo_dir, self.paths.runc_root):
            if os.path.exists(path):
                shutil.rmtree(path)

    def restart_empty(self) -> None:
        """Stop, wipe and start again: the state of a machine that never pulled anything."""
        self.stop()
        self.wipe()
        self.start()

    def ctr(self, *args: str) -> list[str]:
        """Build a ctr command line aimed at this daemon and the benchmark namespace."""
        return [self.ctr_binary, "--address", self.paths.socket, "--namespace", NAMESPACE, *args]

    def pull(self, ref: str) -> Timed:
        """Pull and unpack `ref` over plain HTTP, timed; raise SampleError when ctr fails."""
        argv = self.ctr("images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref)
        return run_timed(argv).check(f"ctr images pull {ref}")

    def run(self, ref: str, container_id: str) -> Timed:
        """Run `true` in a new container of `ref` and remove it, timed."""
        return run_timed(self.run_argv(ref, container_id, ["true"])).check(f"ctr run {ref}")

    def run_argv(self, ref: str, container_id: str, command: list[str]) -> list[str]:
        """Build the `ctr run --rm` command line for `command` in a new container of `ref`.

        `--cgroup ""` leaves the spec without a cgroups path, so runc places the container's
        cgroup, named after the container, below runc's own cgroup in each hierarchy, which is
        this process's. Without it, containerd sets /<namespace>/<id>, a path from each
        hierarchy's root and outside our subtree. The default network is a new namespace with
        only loopback, like `lstore run --network none`.
        """
        return self.ctr("run", "--rm", "--cgroup", "", "--snapshotter", SNAPSHOTTER,
                        "--fifo-dir", self.paths.fifo_dir, "--runc-root", self.paths.runc_root,
                        ref, container_id, *command)

    def committed_snapshots(self) -> int:
        """Count the committed snapshots, which an unpacked image leaves one per layer."""
        listing = self._query("snapshots", "--snapshotter", SNAPSHOTTER, "ls")
        return sum(1 for line in listing.splitlines()[1:] if line.rstrip().endswith("Committed"))

    def peak_rss_kib(self) -> int:
        """Return the daemon's peak RSS since it started (VmHWM), in KiB."""
        if self._process is None:
            raise RuntimeError("containerd is not running")
        with open(f"/proc/{self._process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise SampleError(f"no VmHWM in /proc/{self._process.pid}/status")

    def version(self) -> str:
        done = subprocess.run([self.binary, "--version"], capture_output=True, text=True,
                              check=False)
        return done.stdout.strip() or done.stderr.strip()

    def _query(self, *args: str) -> str:
        done = run_timed(self.ctr(*args), timeout=60)
        return done.check(f"ctr {' '.join(args)}").stdout

    def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise ToolError(f"containerd exited with code {self._process.returncode}",
                                output=read_log_tail(self.paths.log), path=self.paths.config)
            if os.path.exists(self.paths.socket) and self._answers():
                return
            time.sleep(0.05)
        raise ToolError(f"containerd did not respond on {self.paths.socket} in "
                        f"{_START_TIMEOUT:.0f} s", output=read_log_tail(self.paths.log),
                        path=self.paths.config)

    def _answers(self) -> bool:
        done = subprocess.run(self.ctr("version"), capture_output=True, check=False, timeout=10)
        return done.returncode == 0

    def __enter__(self) -> ContainerdDaemon:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _remove_empty_directories(path: str) -> None:
    for directory, _, _ in sorted(os.walk(path), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(directory)
        except OSError:  # not empty: a shim or another containerd still uses it
            pass
