"""Blob downloads into IngestFiles: Range handling, resume after drops, redirects, failures.

Every download is checked by hashing the ingest file, as the pull's consumer does. The server
variants are the ones real registries and object stores show:
- S1 honours Range.
- S2 ignores Range and sends 200 with the whole body.
- S3 rejects open ranges (bytes=N-) with 416.
- S4 sends a Content-Range other than the one requested.
- S5 honours Range without sending Accept-Ranges.
- "416-all" rejects every range.
"""

import asyncio
import hashlib
import random
import threading

import pytest
from fakeregistry import (
    HONOUR_RANGE,
    IGNORE_RANGE,
    LYING_RANGE,
    NO_ACCEPT_RANGES,
    RANGE_MODES,
    REJECT_OPEN_RANGE,
    REJECT_RANGE,
    FakeRegistry,
    FakeTokenServer,
    Scripted,
    TokenBook,
    registry_settings,
)

from lstore.errors import IntegrityError, NotFoundError
from lstore.store.digest import Digest
from lstore.store.ingest import DownloadCancelled, IngestFile
from lstore.store.manifest import Descriptor
from lstore.store.reference import parse_reference
from lstore.store.registry.client import RegistryClient
from lstore.store.registry.ranges import FetchTrace

BLOB = random.Random(7).randbytes(1 << 20)
BLOB_DIGEST = Digest.of_bytes(BLOB)
BLOB_PATH = f"/v2/team/app/blobs/{BLOB_DIGEST}"
DROP_AT = 300_000

# Small range settings so that the 1 MiB blob is fetched as 8 parallel ranges of 128 KiB.
PARALLEL = {"range_threshold": 256 << 10, "range_chunk_size": 128 << 10, "range_connections": 4}


def descriptor(size: int = len(BLOB), digest: Digest = BLOB_DIGEST) -> Descriptor:
    return Descriptor("application/vnd.docker.image.rootfs.diff.tar", digest, size)


def file_digest(path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


async def fetch(registry, tmp_path, ingest: IngestFile, **settings) -> None:
    ref = parse_reference(f"{registry.address}/team/app:1")
    async with RegistryClient(registry_settings(tmp_path, **settings)) as client:
        await client.fetch_blob(ref, descriptor(ingest.size, Digest(ingest.digest)), ingest)


def download(tmp_path, mode: str, drop_at: int | None, **settings) -> tuple[FakeRegistry, str]:
    """Fetch BLOB from a registry in `mode`, dropping the first body after `drop_at` bytes."""
    path = tmp_path / "ingest"

    async def scenario():
        async with FakeRegistry() as registry:
            registry.blobs[BLOB_DIGEST] = BLOB
            registry.range_mode = mode
            if drop_at is not None:
                registry.drop_after[BLOB_PATH] = drop_at
            ingest = IngestFile(str(path), len(BLOB), BLOB_DIGEST)
            try:
                await fetch(registry, tmp_path, ingest, **settings)
                assert ingest.missing_ranges() == []
            finally:
                ingest.close()
            return registry

    registry = asyncio.run(scenario())
    return registry, file_digest(path)


def ranges_sent(registry: FakeRegistry) -> list[str | None]:
    return [r.headers.get("Range") for r in registry.requests_to(BLOB_PATH)]


@pytest.mark.parametrize("mode", RANGE_MODES)
def test_resume_after_drop_yields_exact_bytes(tmp_path, mode):
    registry, digest = download(tmp_path, mode, DROP_AT)

    assert digest == BLOB_DIGEST
    sent = ranges_sent(registry)
    assert sent[0] is None
    assert sent[1] == f"bytes={DROP_AT}-{len(BLOB) - 1}"


@pytest.mark.parametrize("mode", RANGE_MODES)
def test_parallel_ranges_yield_exact_bytes(tmp_path, mode):
    registry, digest = download(tmp_path, mode, DROP_AT, **PARALLEL)

    assert digest == BLOB_DIGEST
    sent = ranges_sent(registry)
    assert sent[0] == f"bytes=0-{(128 << 10) - 1}"
    assert all(value is None or not value.endswith("-") for value in sent)


@pytest.mark.parametrize("mode", [HONOUR_RANGE, NO_ACCEPT_RANGES, REJECT_OPEN_RANGE])
def test_resume_with_range_requests_only_missing_bytes(tmp_path, mode):
    registry, digest = download(tmp_path, mode, DROP_AT)

    assert digest == BLOB_DIGEST
    assert len(registry.requests_to(BLOB_PATH)) == 2


def test_parallel_ranges_cover_blob_once(tmp_path):
    registry, digest = download(tmp_path, HONOUR_RANGE, None, **PARALLEL)

    assert digest == BLOB_DIGEST
    chunk = 128 << 10
    expected = {f"bytes={start}-{start + chunk - 1}" for start in range(0, len(BLOB), chunk)}
    assert set(ranges_sent(registry)) == expected
    assert len(ranges_sent(registry)) == len(expected)


@pytest.mark.parametrize("mode", [IGNORE_RANGE, REJECT_RANGE, LYING_RANGE])
def test_range_fallback_streams_whole_blob_once(tmp_path, mode):
    registry, digest = download(tmp_path, mode, None, **PARALLEL)

    assert digest == BLOB_DIGEST
    sent = ranges_sent(registry)
    assert sent[0] == f"bytes=0-{(128 << 10) - 1}"
    # An IGNORE_RANGE server sends the whole body for the first range, and the client keeps it.
    whole_requests = 1 if mode == IGNORE_RANGE else 2
    assert len(sent) == whole_requests


def test_resume_from_saved_progress(tmp_path):
    path = tmp_path / "ingest"
    ingest = IngestFile(str(path), len(BLOB), BLOB_DIGEST)
    ingest.write_at(0, BLOB[:DROP_AT])
    ingest.close()

    async def scenario():
        async with FakeRegistry() as registry:
            registry.blobs[BLOB_DIGEST] = BLOB
            resumed = IngestFile(str(path), len(BLOB), BLOB_DIGEST)
            try:
                await fetch(registry, tmp_path, resumed)
            finally:
                resumed.close()
            return registry

    registry = asyncio.run(scenario())

    assert file_digest(path) == BLOB_DIGEST
    assert ranges_sent(registry) == [f"bytes={DROP_AT}-{len(BLOB) - 1}"]


def test_wrong_bytes_are_caught_by_digest(tmp_path):
    corrupted = bytearray(BLOB)
    corrupted[500_000] ^= 0xFF
    path = tmp_path / "ingest"

    async def scenario():
        async with FakeRegistry() as registry:
            registry.blobs[BLOB_DIGEST] = bytes(corrupted)
            ingest = IngestFile(str(path), len(BLOB), BLOB_DIGEST)
            try:
                await fetch(registry, tmp_path, ingest, **PARALLEL)
            finally:
                ingest.close()

    asyncio.run(scenario())

    assert file_digest(path) != BLOB_DIGEST
    assert file_digest(path) == Digest.of_bytes(bytes(corrupted))


def test_wrong_content_length_fails_ingest(tmp_path):
    longer = descriptor(size=len(BLOB) + 10)

    async def scenario():
        async with FakeRegistry() as registry:
            registry.blobs[BLOB_DIGEST] = BLOB
            ingest = IngestFile(str(tmp_path / "ingest"), longer.size, BLOB_DIGEST)
            ref = parse_reference(f"{registry.address}/team/app:1")
            try:
                async with RegistryClient(registry_settings(tmp_path)) as client:
                    await client.fetch_blob(ref, longer, ingest)
            except IntegrityError as error:
                return ingest, error
            finally:
                ingest.close()
        raise AssertionError("fetch_blob accepted a body of the wrong length")

    ingest, error = asyncio.run(scenario())

    assert "Content-Length 1048576" in str(error)
    assert error.digest == BLOB_DIGEST
    with pytest.raises(DownloadCancelled):
        ingest.reader().read()


def test_missing_blob_fails_ingest(tmp_path):
    async def scenario():
        async with FakeRegistry() as registry:
            ingest = IngestFile(str(tmp_path / "ingest"), len(BLOB), BLOB_DIGEST)
            try:
                await fetch(registry, tmp_path, ingest)
            except NotFoundError as error:
                return ingest, error
            finally:
                ingest.close()
        raise AssertionError("fetch_blob found a blob that does not exist")

    ingest, error = asyncio.run(scenario())

    assert error.codes == ("BLOB_UNKNOWN",)
    with pytest.raises(DownloadCancelled):
        ingest.reader().read()


def test_cancelled_fetch_fails_ingest(tmp_path):
    async def scenario():
        async with FakeRegistry() as registry:
            registry.blobs[BLOB_DIGEST] = BLOB
            ingest = IngestFile(str(tmp_path / "ingest"), len(BLOB), BLOB_DIGEST)
            ref = parse_reference(f"{registry.address}/team/app:1")
            started = asyncio.Event()
            async with RegistryClient(registry_settings(tmp_path, **PARALLEL)) as client:
                fetching = asyncio.create_task(
                    client.fetch_blob(ref, descriptor(), ingest, progress=lambda n: started.set())
                )
                await started.wait()
                fetching.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await fetching
            ingest.close()
            return ingest

    ingest = asyncio.run(scenario())

    with pytest.raises(DownloadCancelled):
        ingest.reader().read()


def test_redirected_blob_reuses_location_without_credentials(tmp_path):
    async def scenario():
        book = TokenBook()
        async with FakeTokenServer(book) as tokens, FakeRegistry() as registry:
            async with FakeRegistry(host="127.0.0.2") as storage:
                storage.blobs[BLOB_DIGEST] = BLOB
                registry.redirect_blobs_to = storage
                registry.use_bearer(tokens, f'Bearer realm="{tokens.url}/token",scope="{{scope}}"')
                ingest = IngestFile(str(tmp_path / "ingest"), len(BLOB), BLOB_DIGEST)
                try:
                    await fetch(registry, tmp_path, ingest, **PARALLEL)
                finally:
                    ingest.close()
                return registry, storage

    registry, storage = asyncio.run(scenario())

    assert file_digest(tmp_path / "ingest") == BLOB_DIGEST
    assert len(registry.requests_to(BLOB_PATH)) == 2  # the 401 challenge, then the redirect
    storage_requests = storage.requests_to(f"/storage/{BLOB_DIGEST}")
    assert len(storage_requests) == 8
    assert all("Authorization" not in r.headers for r in storage_requests)
    assert all(r.query.get("signature") == "secret" for r in storage_requests)


def test_expired_location_asks_registry_again(tmp_path):
    async def scenario():
        async with FakeRegistry() as registry, FakeRegistry(host="127.0.0.2") as storage:
            storage.blobs[BLOB_DIGEST] = BLOB
            registry.redirect_blobs_to = storage
            # The second request to the signed URL finds it expired.
            storage.script(f"/storage/{BLOB_DIGEST}", Scripted(0), Scripted(403))
            ingest = IngestFile(str(tmp_path / "ingest"), len(BLOB), BLOB_DIGEST)
            try:
                await fetch(registry, tmp_path, ingest, **dict(PARALLEL, range_connections=1))
            finally:
                ingest.close()
            return registry

    registry = asyncio.run(scenario())

    assert file_digest(tmp_path / "ingest") == BLOB_DIGEST
    assert len(registry.requests_to(BLOB_PATH)) == 2


def test_consumer_reads_while_parallel_ranges_arrive(tmp_path):
    path = tmp_path / "ingest"
    results: dict[str, str] = {}

    def consume(ingest: IngestFile) -> None:
        hasher = hashlib.sha256()
        reader = ingest.reader()
        while chunk := reader.read(64 << 10):
            hasher.update(chunk)
        results["digest"] = "sha256:" + hasher.hexdigest()

    async def scenario():
        async with FakeRegistry() as registry:
            registry.blobs[BLOB_DIGEST] = BLOB
            registry.drop_after[BLOB_PATH] = 50_000
            ingest = IngestFile(str(path), len(BLOB), BLOB_DIGEST)
            consumer = threading.Thread(target=consume, args=(ingest,))
            consumer.start()
            try:
                await fetch(registry, tmp_path, ingest, **PARALLEL)
            finally:
                await asyncio.to_thread(consumer.join, 10)
                ingest.close()

    asyncio.run(scenario())

    assert results["digest"] == BLOB_DIGEST


class RecordingTrace(FetchTrace):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_request(self, start: int, end: int) -> None:
        self.events.append(("request", start, end))

    def on_first_byte(self, start: int, end: int) -> None:
        self.events.append(("first byte", start, end))

    def on_done(self, start: int, end: int, received: int) -> None:
        self.events.append(("done", start, end, received))


def test_progress_and_trace_report_each_span(tmp_path):
    trace = RecordingTrace()
    received: list[int] = []

    async def scenario():
        async with FakeRegistry() as registry:
            registry.blobs[BLOB_DIGEST] = BLOB
            ingest = IngestFile(str(tmp_path / "ingest"), len(BLOB), BLOB_DIGEST)
            ref = parse_reference(f"{registry.address}/team/app:1")
            try:
                async with RegistryClient(registry_settings(tmp_path, **PARALLEL)) as client:
                    await client.fetch_blob(ref, descriptor(), ingest, received.append, trace)
            finally:
                ingest.close()

    asyncio.run(scenario())

    assert sum(received) == len(BLOB)
    done = [event for event in trace.events if event[0] == "done"]
    assert len(done) == 8
    assert sum(event[3] for event in done) == len(BLOB)
    assert len([event for event in trace.events if event[0] == "request"]) == 8
    assert len([event for event in trace.events if event[0] == "first byte"]) == 8


def test_complete_ingest_sends_no_request(tmp_path):
    path = tmp_path / "ingest"
    ingest = IngestFile(str(path), len(BLOB), BLOB_DIGEST)
    ingest.write_at(0, BLOB)

    async def scenario():
        async with FakeRegistry() as registry:
            await fetch(registry, tmp_path, ingest)
            return registry

    registry = asyncio.run(scenario())
    ingest.close()

    assert registry.requests == []
    assert file_digest(path) == BLOB_DIGEST
