"""A TCP proxy on loopback that adds latency and caps each connection's rate.

It simulates a wide-area path to a registry. Each direction's bytes are delivered
`round_trip / 2` seconds after they arrive, and each connection gets its own token bucket per
direction, the way CDNs and object stores cap a single connection. Clients that open several
connections (parallel Range requests, one connection per layer) therefore get more total
bandwidth, exactly as they would from such a server.

    python -m lstore.bench.shaper --target 127.0.0.1:5000 [--rtt-ms 40] [--rate-mb 20]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

# Reads of 64 KiB keep per-chunk overhead low at 20 MB/s (about 300 chunks a second).
_CHUNK = 64 << 10
# Chunks held per direction while they wait out the delay or the rate cap: 2 MiB. The bound
# makes a slow receiver push back on the sender, as a TCP window does.
_QUEUED_CHUNKS = 32
_START_TIMEOUT = 10.0


@dataclass(frozen=True)
class LinkProfile:
    """A simulated network path: added round-trip time in seconds and a per-connection cap.

    `rate` is in bytes per second for each direction of each connection. `burst` is the
    token bucket's depth in bytes, the most a connection sends at once after being idle.
    """

    round_trip: float = 0.040
    rate: float = 20e6
    burst: int = 64 << 10

    def describe(self) -> str:
        return (f"{self.round_trip * 1000:.0f} ms round trip, "
                f"{self.rate / 1e6:.0f} MB/s per connection")


class TokenBucket:
    """A rate limiter that lets `burst` bytes through at once and `rate` bytes per second."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = float(burst)
        self._updated = time.monotonic()

    async def take(self, nbytes: int) -> None:
        """Wait until `nbytes` may be sent. A request larger than the burst runs into debt,
        which the next calls pay off, so the long-run rate still holds."""
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now

        self._tokens -= nbytes
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self._rate)


class ShapingProxy:
    """The proxy's server: accepts on 127.0.0.1 and forwards to one loopback target."""

    def __init__(self, target: str, profile: LinkProfile) -> None:
        self.target_host, self.target_port = _split_loopback_address(target)
        self.profile = profile
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> str:
        """Start listening and return "127.0.0.1:PORT"."""
        self._server = await asyncio.start_server(self._accept, LOOPBACK, port)
        bound = self._server.sockets[0].getsockname()[1]
        log.info("shaping proxy on %s:%d -> %s:%d (%s)", LOOPBACK, bound, self.target_host,
                 self.target_port, self.profile.describe())
        return f"{LOOPBACK}:{bound}"

    async def close(self) -> None:
        """Stop accepting and cut every open connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # start_server runs each callback in a task
        self._connections.add(task)
        try:
            await self._forward(client_reader, client_writer)
        finally:
            self._connections.discard(task)

    async def _forward(self, client_reader: asyncio.StreamReader,
                       client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.target_host, self.target_port)
        except OSError as error:
            log.warning("shaping proxy cannot reach %s:%d: %s", self.target_host,
                        self.target_port, error)
            client_writer.close()
            return

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(_pump(client_reader, upstream_writer, self.profile))
                group.create_task(_pump(upstream_reader, client_writer, self.profile))
        except* (ConnectionError, OSError) as errors:
            log.debug("shaped connection ended: %s", errors.exceptions[0])
        finally:
            for writer in (client_writer, upstream_writer):
                writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                profile: LinkProfile) -> None:
    """Copy one direction: each chunk leaves half a round trip after it arrived, at most at
    the profile's rate. EOF is passed on the same way, as a half-close."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUED_CHUNKS)
    async with asyncio.TaskGroup() as group:
        group.create_task(_receive(reader, queue, profile.round_trip / 2))
        group.create_task(_deliver(queue, writer, TokenBucket(profile.rate, profile.burst)))


async def _receive(reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]],
                   delay: float) -> None:
    while True:
        data = await reader.read(_CHUNK)
        await queue.put((time.monotonic() + delay, data))
        if not data:
            return


async def _deliver(queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter,
                   bucket: TokenBucket) -> None:
    while True:
        due, data = await queue.get()
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

        if not data:
            if writer.can_write_eof():
                writer.write_eof()
            return
        await bucket.take(len(data))
        writer.write(data)
        await writer.drain()


def _split_loopback_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback or not port.isdigit():
        # Benchmarks must never send traffic to another host.
        raise ValueError(f"shaping proxy target {address!r} is not a loopback IP:PORT, "
                         "such as 127.0.0.1:5000")
    return host, int(port)


class ShaperThread:
    """A ShapingProxy running on its own event loop in a background thread.

    `host` is its "127.0.0.1:PORT". Use as a context manager, or call `stop()`.
    """

    def __init__(self, target: str, profile: LinkProfile | None = None) -> None:
        self.proxy = ShapingProxy(target, profile or LinkProfile())
        self.host = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="shaping-proxy", daemon=True)

    def start(self) -> ShaperThread:
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT) or not self.host:
            raise RuntimeError(f"shaping proxy for {self.proxy.target_host}:"
                               f"{self.proxy.target_port} did not start")
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self.proxy.close(), self._loop)
            future.result(_START_TIMEOUT)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_START_TIMEOUT)
        self._loop.close()

    def __enter__(self) -> ShaperThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.host = self._loop.run_until_complete(self.proxy.start())
        finally:
            self._ready.set()
        if self.host:
            self._loop.run_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstore.bench.shaper",
                                     description="Forward 127.0.0.1:PORT to a loopback target "
                                                 "with added latency and a rate cap.")
    parser.add_argument("--target", required=True, help="loopback IP:PORT to forward to")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: free)")
    parser.add_argument("--rtt-ms", type=float, default=40.0,
                        help="added round-trip time in milliseconds (default: 40)")
    parser.add_argument("--rate-mb", type=float, default=20.0,
                        help="cap per connection and direction in MB/s (default: 20)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    profile = LinkProfile(round_trip=args.rtt_ms / 1000, rate=args.rate_mb * 1e6)
    try:
        asyncio.run(_serve_forever(args.target, args.port, profile))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


async def _serve_forever(target: str, port: int, profile: LinkProfile) -> None:
    proxy = ShapingProxy(target, profile)
    print(await proxy.start(port), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await proxy.close()


if __name__ == "__main__":
    sys.exit(main())
