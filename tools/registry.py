"""Start and stop the distribution registry (Debian package `docker-registry`) on loopback.

Tests and benchmarks pull from this real registry rather than from a fake, so lstore meets
the same HTTP behaviour it meets in production: blob redirects are off, but chunked uploads,
Range requests, Docker-Content-Digest headers and the error bodies are the real ones.

    python -m lstore.tools.registry --port 5000 --data /tmp/reg
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from lstore.tools.command import ToolError, read_log_tail, require_tool

log = logging.getLogger(__name__)

REGISTRY_BINARY = "/usr/bin/docker-registry"
LOOPBACK = "127.0.0.1"

# The registry opens its storage and listener in well under a second; the cap leaves room for
# a loaded machine running several test sessions at once.
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


@dataclass
class RegistryProcess:
    """A running registry that this process started; `stop()` ends it by its pid."""

    process: subprocess.Popen[bytes]
    port: int
    data_dir: str
    log_path: str
    host: str = field(init=False)
    url: str = field(init=False)

    def __post_init__(self) -> None:
        self.host = f"{LOOPBACK}:{self.port}"
        self.url = f"http://{self.host}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """Stop the registry with SIGTERM, then SIGKILL if it has not exited in time."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("registry pid %d ignored SIGTERM; killing it", self.pid)
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> RegistryProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def registry_config(data_dir: str, port: int) -> dict[str, object]:
    """Build the registry configuration: filesystem storage, no auth, deletes allowed.

    JSON is valid YAML, so the dict is written with `json` and read by the registry as is.
    """
    return {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": data_dir},
            "delete": {"enabled": True},
            # Upload purging runs a background sweep that only matters for long-lived servers.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        # A fixed secret per process silences the registry's warning about a generated one;
        # it only signs upload state, and one instance serves every upload.
        "http": {"addr": f"{LOOPBACK}:{port}", "secret": secrets.token_hex(16)},
    }


def start_registry(data_dir: str, port: int = 0) -> RegistryProcess:
    """Start the registry on 127.0.0.1:`port` (a free port when 0) storing blobs in `data_dir`.

    Returns once GET /v2/ returns 200. On failure the process is stopped and ToolError carries
    the registry's log.
    """
    require_tool(REGISTRY_BINARY)
    os.makedirs(data_dir, exist_ok=True)
    port = port or free_port()
    config_path, log_path = _write_config(data_dir, port)

    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [REGISTRY_BINARY, "serve", config_path],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        )
    registry = RegistryProcess(process, port, data_dir, log_path)

    try:
        _wait_until_ready(registry)
    except BaseException:
        registry.stop()
        raise
    log.info("registry pid %d serving %s from %s", registry.pid, registry.url, data_dir)
    return registry


def _write_config(data_dir: str, port: int) -> tuple[str, str]:
    # The config and log sit beside the storage directory, so they never appear as
    # repositories inside it.
    base = os.path.abspath(data_dir).rstrip("/")
    config_path = f"{base}.config.json"
    with open(config_path, "w") as config_file:
        json.dump(registry_config(os.path.abspath(data_dir), port), config_file)
    return config_path, f"{base}.log"


def _wait_until_ready(registry: RegistryProcess) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if registry.process.poll() is not None:
            raise ToolError(
                f"registry exited with code {registry.process.returncode} on {registry.host}",
                output=read_log_tail(registry.log_path), path=registry.data_dir,
            )
        if _answers_v2(registry.url):
            return
        time.sleep(0.05)
    raise ToolError(f"registry on {registry.host} did not respond to /v2/ within {_START_TIMEOUT} s",
                    output=read_log_tail(registry.log_path), path=registry.data_dir)


def _answers_v2(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstore.tools.registry",
                                     description="Run the distribution registry on loopback.")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    parser.add_argument("--data", required=True, help="storage directory for blobs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        registry = start_registry(args.data, args.port)
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(registry.host, flush=True)

    # Serve until SIGINT or SIGTERM, then stop the child before exiting. A registry that
    # exits on its own is a failure.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        code = registry.process.wait()
    except (KeyboardInterrupt, SystemExit):
        code = 0
    finally:
        registry.stop()
    return 0 if code == 0 else 1

if __name__ == "__main__":
    sys.exit(main())
