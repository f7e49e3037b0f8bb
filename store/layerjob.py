"""The CPU side of one layer: hash the compressed bytes, inflate, extract, hash the diffID.

Runs in a worker thread while the event loop downloads into the same IngestFile, so
extraction of a layer starts with its first downloaded bytes. The blob digest is computed
here, over exactly the bytes the file holds, and both checks happen before anything commits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from lstore.store.digest import Digest
from lstore.store.ingest import ReadIntoMixin
from lstore.store.trace import PullTrace
from lstore.store.unpack import unpack_layer

from lstore.errors import IntegrityError, UnsafeLayerError

# Reads of 1 MiB keep the per-call overhead of hashing and inflating negligible.
_READ_SIZE = 1 << 20


class HashingReader(ReadIntoMixin):
    """A reader that feeds every byte it returns into a hash."""

    def __init__(
        self,
        source: BinaryIO,
        algorithm: str = "sha256",
        on_read: Callable[[int], None] | None = None,
    ) -> None:
        self._source = source
        self.hasher = hashlib.new(algorithm)
        self.count = 0
        self._on_read = on_read

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.hasher.update(data)
        self.count += len(data)
        if self._on_read is not None:
            self._on_read(self.count)
        return data

    def drain(self) -> None:
        """Hash whatever the consumer left unread, so the digest covers the whole blob."""
        while self.read(_READ_SIZE):
            pass


@dataclass(frozen=True)
class LayerOutcome:
    blob_digest: Digest
    diff_id: Digest | None
    size: int


def process_layer(
    source: BinaryIO,
    *,
    layer_digest: str,
    compression: str,
    dest: str | None,
    expected_diff_id: str,
    trace: PullTrace | None = None,
) -> LayerOutcome:
    """Hash a layer blob and, when `dest` is given, unpack it there and check its diffID.

    Raises IntegrityError from the unpacker on a diffID mismatch; the caller compares the
    returned blob digest with the descriptor before committing anything.
    """
    on_read = None
    if trace is not None:
        on_read = lambda total: trace.progress(layer_digest, "hash", total)  # noqa: E731
        trace.event(layer_digest, "extract", "start")
    reader = HashingReader(source, on_read=on_read)
    diff_id: Digest | None = None
    size = 0
    if dest is not None:
        try:
            result = unpack_layer(
                reader,  # type: ignore[arg-type]
                compression,
                dest,
                layer_digest=layer_digest,
                expected_diff_id=expected_diff_id,
            )
        except (IntegrityError, UnsafeLayerError) as exc:
            _raise_if_blob_corrupt(reader, layer_digest, exc)
            raise
        diff_id = result.diff_id
        size = result.size
    reader.drain()
    if trace is not None:
        trace.event(layer_digest, "extract", "end", size)
    return LayerOutcome(Digest.from_hash(reader.hasher), diff_id, size)


def _raise_if_blob_corrupt(reader: HashingReader, layer_digest: str, cause: Exception) -> None:
    # Bytes that do not match the blob digest explain any unpack failure, and the registry,
    # not the image, is then at fault: report that instead of the diffID or tar error.
    try:
        reader.drain()
    except OSError:
        return
    computed = Digest.from_hash(reader.hasher)
    if computed != layer_digest:
        raise IntegrityError(
            f"blob {layer_digest} failed verification: registry sent content with digest "
            f"{computed}; nothing was stored, retry the pull or check the registry",
            digest=layer_digest,
            expected=layer_digest,
            actual=computed,
        ) from cause
