"""Blob downloads into an IngestFile: parallel Range requests, redirects and resume.

Registries usually respond to a blob GET with a redirect (307) to object storage. The first
request follows it, and later requests for the same blob go straight to the final URL until it
stops working (pre-signed URLs expire), when the registry is asked again.

Servers differ in how they treat Range (RFC 9110 section 14): some ignore it and send 200 with
the whole body, some respond with 416, some send a Content-Range other than the one requested. Only
a 206 whose Content-Range matches the request is written at the requested offset. Anything
else switches the download to one whole-body stream from byte 0, and IngestFile.write_at skips
the bytes it already has. A body that breaks off is resumed from the last byte written.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from lstore.errors import IntegrityError, RegistryError
from lstore.store.ingest import IngestFile
from lstore.store.manifest import Descriptor
from lstore.store.reference import Reference
from lstore.store.registry.errors import redact_url

if TYPE_CHECKING:
    from lstore.store.registry.client import RegistryClient

log = logging.getLogger(__name__)

# Network reads are taken in pieces of up to 1 MiB, so per-chunk Python work (one pwrite and
# one progress call) stays small next to the bytes moved.
READ_CHUNK = 1 << 20
# A blob whose connection breaks this many times in total fails even if each attempt made
# progress, because a server that drops every few KiB is not worth waiting for.
MAX_INTERRUPTIONS = 100
# Statuses from a redirect target that mean its URL is no longer valid.
_EXPIRED_LOCATION = frozenset({401, 403, 404, 410})
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)


class FetchTrace:
    """Hooks called while a blob downloads, for timing. Override the ones you need.

    A span is the byte range [start, end) that one request covers.
    """

    def on_request(self, start: int, end: int) -> None:
        """Called before a request for the span is sent."""

    def on_first_byte(self, start: int, end: int) -> None:
        """Called when the first body bytes of the span arrive."""

    def on_done(self, start: int, end: int, received: int) -> None:
        """Called when the span's body is complete; `received` counts its bytes."""


class _Interrupted(Exception):
    """A response body that ended before its last byte; `position` is the next byte needed."""

    def __init__(self, position: int, cause: BaseException | None) -> None:
        detail = f": {cause}" if cause else ""
        super().__init__(f"connection closed at byte {position}{detail}")
        self.position = position


class BlobDownload:
    """One call of RegistryClient.fetch_blob: fills the missing ranges of an IngestFile.

    Writes only through `ingest.write_at`, never past the descriptor's size, and leaves the
    digest check to the ingest file's consumer.
    """

    def __init__(
        self,
        client: "RegistryClient",
        ref: Reference,
        descriptor: Descriptor,
        ingest: IngestFile,
        progress: Callable[[int], None] | None,
        trace: FetchTrace | None,
    ) -> None:
        self._client = client
        self._settings = client.settings
        self._ref = ref
        self._digest = descriptor.digest
        self._size = descriptor.size
        self._ingest = ingest
        self._progress = progress
        self._trace = trace or FetchTrace()
        self._path = client.blob_path(ref, descriptor.digest)
        self._action = f"GET blob {descriptor.digest} of {ref}"

        self._location: URL | None = None
        self._location_on_registry = False
        self._ranges_supported = True
        self._whole_lock = asyncio.Lock()
        self._first_response = asyncio.Event()
        self._interruptions = 0

    async def run(self) -> None:
        """Download every missing range; raise if the blob is still incomplete afterwards."""
        missing = self._ingest.missing_ranges()
        if not missing:
            return
        spans = deque(self._plan(missing))
        first = spans.popleft()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._fetch_then_take(first, spans))
                if spans:
                    await self._start_workers(group, spans)
        except BaseExceptionGroup as errors:
            raise _first_error(errors) from None
        await self._fill_gaps()

    def _plan(self, missing: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Split the missing ranges into request spans; small blobs keep one span per gap."""
        if self._size <= self._settings.range_threshold:
            return list(missing)
        chunk = self._settings.range_chunk_size
        spans: list[tuple[int, int]] = []
        for start, end in missing:
            spans.extend((offset, min(offset + chunk, end)) for offset in range(start, end, chunk))
        return spans

    async def _start_workers(self, group: asyncio.TaskGroup, spans: deque[tuple[int, int]]) -> None:
        # The first response shows whether the server honours Range and where the blob lives
        # after redirects, so the other connections start only once its headers arrived.
        await self._first_response.wait()
        if not self._ranges_supported:
            return
        for _ in range(min(self._settings.range_connections - 1, len(spans))):
            group.create_task(self._take_spans(spans))

    async def _fetch_then_take(self, first: tuple[int, int], spans: deque[tuple[int, int]]) -> None:
        try:
            await self._fetch_span(*first)
        finally:
            self._first_response.set()
        await self._take_spans(spans)

    async def _take_spans(self, spans: deque[tuple[int, int]]) -> None:
        while spans and self._ranges_supported:
            start, end = spans.popleft()
            await self._fetch_span(start, end)

    async def _fill_gaps(self) -> None:
        """Fetch what parallel workers left, such as spans skipped after Range stopped working."""
        for start, end in self._ingest.missing_ranges():
            await self._fetch_span(start, end)
        remaining = self._ingest.missing_ranges()
        if remaining:
            raise RegistryError(
                f"{self._action}: download incomplete, missing byte ranges {remaining}",
                ref=str(self._ref),
                digest=self._digest,
                temporary=True,
            )

    # One span.

    async def _fetch_span(self, start: int, end: int) -> None:
        """Write [start, end), resuming after a broken body from the last byte received."""
        position = start
        failures = 0
        while position < end:
            if not self._ranges_supported:
                await self._fetch_whole()
                return
            try:
                position = await self._fetch_once(position, end)
            except _Interrupted as interrupted:
                failures = 0 if interrupted.position > position else failures + 1
                position = max(position, interrupted.position)
                await self._pause_after_interruption(failures, interrupted)

    async def _fetch_once(self, position: int, end: int) -> int:
        """Send one request for [position, end) and return the next byte still needed."""
        ranged = not (position == 0 and end == self._size)
        headers = {"Range": f"bytes={position}-{end - 1}"} if ranged else {}
        self._trace.on_request(position, end)
        response = await self._open(headers)
        try:
            self._first_response.set()
            if response.status == 206:
                return await self._read_partial(response, position, end)
            if response.status == 200:
                return await self._read_whole_response(response, position, end, ranged)
            if response.status == 416 and ranged:
                log.info("%s: Range request got 416, fetching the whole blob", self._action)
                self._ranges_supported = False
                return position
            raise await self._client.status_error(
                response, self._action, ref=self._ref, digest=self._digest
            )
        finally:
            response.release()

    async def _read_partial(self, response: aiohttp.ClientResponse, position: int, end: int) -> int:
        content_range = response.headers.get("Content-Range", "")
        if not _range_matches(content_range, position, end, self._size):
            log.warning(
                "%s: requested bytes %d-%d but got Content-Range %r, fetching the whole blob",
                self._action,
                position,
                end - 1,
                content_range,
            )
            self._ranges_supported = False
            return position
        return await self._stream(response, position, end)

    async def _read_whole_response(
        self, response: aiohttp.ClientResponse, position: int, end: int, ranged: bool
    ) -> int:
        """Use a 200 response: the whole blob from byte 0, even when a range was requested."""
        self._check_whole_length(response)
        if ranged and self._ranges_supported:
            log.info("%s: server ignores Range, streaming the whole blob", self._action)
            self._ranges_supported = False
        if self._whole_lock.locked():
            # Another task is already streaming the whole blob, so this body would duplicate it.
            return position
        async with self._whole_lock:
            await self._stream(response, 0, self._size)
        return end

    async def _fetch_whole(self) -> None:
        """Stream the whole blob from byte 0 until nothing is missing; one task at a time."""
        async with self._whole_lock:
            failures = 0
            while self._ingest.missing_ranges():
                self._trace.on_request(0, self._size)
                response = await self._open({})
                try:
                    if response.status != 200:
                        raise await self._client.status_error(
                            response, self._action, ref=self._ref, digest=self._digest
                        )
                    self._check_whole_length(response)
                    await self._stream(response, 0, self._size)
                except _Interrupted as interrupted:
                    failures += 1
                    await self._pause_after_interruption(failures, interrupted)
                finally:
                    response.release()

    async def _stream(self, response: aiohttp.ClientResponse, offset: int, end: int) -> int:
        """Write the body at `offset`, stopping at `end`; raise _Interrupted if it breaks off."""
        position = offset
        first = True
        try:
            async for chunk in response.content.iter_chunked(READ_CHUNK):
                if first:
                    self._trace.on_first_byte(offset, end)
                    first = False
                room = end - position
                data = chunk if len(chunk) <= room else memoryview(chunk)[:room]
                self._ingest.write_at(position, data)
                position += len(data)
                if self._progress is not None:
                    self._progress(len(data))
                if position >= end:
                    break
        except _CONNECTION_ERRORS as error:
            raise _Interrupted(position, error) from error
        if position < end:
            raise _Interrupted(position, None)
        self._trace.on_done(offset, end, position - offset)
        return position

    # Requests and checks.

    async def _open(self, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """GET the blob from its last known location, or from the registry."""
        if self._location is not None:
            response = await self._client.exchange(
                self._ref,
                self._location,
                headers=headers,
                authenticate=self._location_on_registry,
                action=self._action,
                digest=self._digest,
            )
            if response.status not in _EXPIRED_LOCATION:
                return response
            log.info(
                "%s: %s returned %d, asking the registry for a new location",
                self._action,
                redact_url(self._location),
                response.status,
            )
            response.release()
            self._location = None

        response = await self._client.exchange(
            self._ref, self._path, headers=headers, action=self._action, digest=self._digest
        )
        if response.history:
            self._location = response.url
            self._location_on_registry = response.url.origin() == response.history[0].url.origin()
        return response

    def _check_whole_length(self, response: aiohttp.ClientResponse) -> None:
        declared = response.content_length
        if declared is not None and declared != self._size:
            raise IntegrityError(
                f"{self._action}: registry sent Content-Length {declared}, but the descriptor "
                f"says {self._size} bytes",
                expected=str(self._size),
                actual=str(declared),
                ref=str(self._ref),
                digest=self._digest,
            )

    async def _pause_after_interruption(self, failures: int, interrupted: _Interrupted) -> None:
        self._interruptions += 1
        if self._interruptions > MAX_INTERRUPTIONS:
            raise RegistryError(
                f"{self._action}: connection broke {self._interruptions} times, giving up",
                ref=str(self._ref),
                digest=self._digest,
                temporary=True,
            ) from interrupted
        if failures == 0:
            log.info("%s: %s, resuming", self._action, interrupted)
            return
        await self._client.pause_after_failure(failures, self._action, interrupted, ref=self._ref)


def _range_matches(content_range: str, start: int, end: int, size: int) -> bool:
    match = _CONTENT_RANGE.fullmatch(content_range.strip())
    if match is None:
        return False
    first, last, total = match.groups()
    return int(first) == start and int(last) == end - 1 and total in ("*", str(size))


def _first_error(errors: BaseExceptionGroup) -> BaseException:
    """Return the first error of a task group that is not the cancellation of a sibling."""
    for error in errors.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return _first_error(error)
        if not isinstance(error, asyncio.CancelledError):
            return error
    return errors.exceptions[0]
