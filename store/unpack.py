"""Unpacking of one image layer into its own snapshot directory.

`unpack_layer` decompresses the blob, extracts the tar safely (see extract.py, safepath.py and
whiteouts.py) and computes the diffID: the sha256 of the whole uncompressed stream (OCI
image-spec config.md, "layer DiffID"), in the same pass.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from lstore.errors import IntegrityError
from lstore.store.decompress import decompressed_chunks
from lstore.store.digest import Digest
from lstore.store.extract import LayerExtractor
from lstore.store.tarstream import TarReader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnpackResult:
    """The outcome of unpacking a layer.

    `size` counts the uncompressed bytes, padding after the tar end included. `entries` counts
    tar members, whiteouts and the ignored root entry included, but not pax or GNU long-name
    headers.
    """

    diff_id: Digest
    size: int
    entries: int


# Decompressed chunks a worker thread may keep ready for the extractor. Chunks are at most about
# 1 MiB, so one unpack keeps at most about 2 MiB of them waiting. With several layers in
# flight, more read-ahead raised the peak memory of a pull without making it faster.
_READ_AHEAD_CHUNKS = 2

# How often a worker blocked on a full queue checks whether the extractor stopped.
_STOP_POLL_SECONDS = 0.1


class _HashedChunks:
    """Passes chunks through while hashing and counting them."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self.hasher = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.hasher.update(chunk)
            self.size += len(chunk)
            yield chunk


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class _ReadAhead:
    """Runs an iterable of chunks in a worker thread, a few chunks ahead of the consumer.

    Reading the source, decompressing and hashing then overlap with extraction on another
    core: zlib, isal, zstandard and hashlib release the GIL while they work. An error of the
    worker is raised by the consumer's iteration.
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._queue: queue.Queue[object] = queue.Queue(_READ_AHEAD_CHUNKS)
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(chunks,), name="lstore-unpack-read", daemon=True
        )
        self._thread.start()

    def __iter__(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]

    def close(self) -> None:
        """Stop the worker and wait for it, so that nothing reads the source afterwards.

        The wait lasts until a `source.read()` in progress returns.
        """
        self._stopped.set()
        self._thread.join()

    def _produce(self, chunks: Iterable[bytes]) -> None:
        try:
            for chunk in chunks:
                if not self._put(chunk):
                    return
            self._put(_END)
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(_Failure(error))

    def _put(self, item: object) -> bool:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=_STOP_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False


def unpack_layer(
    source: BinaryIO,
    compression: str,
    dest: str,
    *,
    layer_digest: str,
    expected_diff_id: str | None = None,
) -> UnpackResult:
    """Extract the layer blob read from `source` into the empty directory `dest`.

    `compression` is "gzip", "zstd" or "none" (see digest.layer_compression). Whiteouts become
    OverlayFS whiteouts, so `dest` can serve as a lower directory of an overlay mount. The
    diffID covers every uncompressed byte, including any after the tar end-of-archive marker,
    and is compared with `expected_diff_id` when given.

    Raises IntegrityError for a corrupt stream or a diffID mismatch, UnsafeLayerError for an
    entry that would reach outside `dest`, UnsupportedError for entry types lstore does not
    extract, and StoreError when the filesystem fails. Not atomic: on error `dest` contains
    part of the layer, and the caller deletes it. Safe to run concurrently for different
    destinations.
    """
    started = time.monotonic()
    chunks = _HashedChunks(decompressed_chunks(source, compression, layer_digest))
    read_ahead = _ReadAhead(chunks)
    reader = TarReader(iter(read_ahead), layer_digest)
    try:
        with LayerExtractor(dest, layer_digest) as extractor:
            entries = extractor.extract(reader)
        # Tar readers stop at the end-of-archive marker, but the diffID covers the whole
        # stream: builders may append padding blocks after it.
        trailing = reader.drain()
    finally:
        read_ahead.close()

    diff_id = Digest.from_hash(chunks.hasher)
    if expected_diff_id is not None and diff_id != expected_diff_id:
        raise IntegrityError(
            f"layer {layer_digest}: diffID mismatch: the image config expects "
            f"{expected_diff_id}, the unpacked layer has {diff_id}; the image is inconsistent, "
            "pull it again or rebuild it",
            digest=layer_digest,
            expected=expected_diff_id,
            actual=diff_id,
        )

    log.info(
        "unpacked layer %s: %d entries, %d bytes (%d after the tar end) in %.2f s",
        layer_digest,
        entries,
        chunks.size,
        trailing,
        time.monotonic() - started,
    )
    return UnpackResult(diff_id=diff_id, size=chunks.size, entries=entries)
