"""Content-addressed blobs on disk, recorded in LMDB only after verification.

Commit order for a blob: bytes land in ingest/, size and digest are checked, the file becomes
read-only and is renamed into blobs/sha256/, the directory is fsynced, and only then is the
record written, so lstore never records a blob whose file is not in place. A file without a
record (a crash between rename and record) is garbage that `gc` removes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from lstore.errors import IntegrityError, NotFoundError
from lstore.store.digest import Digest
from lstore.store.ingest import IngestFile
from lstore.store.meta import Meta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlobInfo:
    digest: Digest
    size: int
    media_type: str


class ContentStore:
    """Blobs under ROOT/blobs and partial downloads under ROOT/ingest.

    Methods are safe to call from several threads and processes at once. Writers of the same
    blob are serialised by the caller's blob lock (see store/locks.py). A commit is a rename,
    so readers see either no blob or the whole verified one.
    """

    def __init__(self, root: str, meta: Meta) -> None:
        self.blobs_dir = os.path.join(root, "blobs")
        self.ingest_dir = os.path.join(root, "ingest")
        self.meta = meta
        for path in (os.path.join(self.blobs_dir, "sha256"), self.ingest_dir):
            os.makedirs(path, exist_ok=True)

    def blob_path(self, digest: Digest) -> str:
        return os.path.join(self.blobs_dir, digest.algorithm, digest.hex)

    def info(self, digest: Digest) -> BlobInfo | None:
        """Return the record of a committed blob, or None when it is absent."""
        with self.meta.read() as txn:
            record = txn.get("blobs", digest)
        if record is None:
            return None
        return BlobInfo(digest, record["size"], record.get("media_type", ""))

    def has(self, digest: Digest) -> bool:
        return self.info(digest) is not None and os.path.exists(self.blob_path(digest))

    def read(self, digest: Digest) -> bytes:
        try:
            with open(self.blob_path(digest), "rb") as handle:
                return handle.read()
        except FileNotFoundError as exc:
            raise NotFoundError(
                f"blob {digest} is not in the store; pull the image again",
                digest=digest,
                path=self.blob_path(digest),
            ) from exc

    def open_ingest(self, digest: Digest, size: int) -> IngestFile:
        """Open the partial file for a blob, resuming what an earlier pull left behind."""
        return IngestFile(os.path.join(self.ingest_dir, digest.hex), size, digest)

    def commit_ingest(self, ingest: IngestFile, computed: Digest, media_type: str) -> None:
        """Commit a complete download whose digest the consumer computed.

        On a digest mismatch the partial file is deleted, so the next pull starts afresh,
        and IntegrityError names the expected and the computed digest.
        """
        if computed != ingest.digest:
            ingest.discard()
            raise IntegrityError(
                f"blob {ingest.digest} failed verification: registry sent content with "
                f"digest {computed}; nothing was stored, retry the pull or check the registry",
                digest=ingest.digest,
                expected=ingest.digest,
                actual=computed,
            )
        self._publish(ingest.path, Digest(ingest.digest), ingest.size, media_type)
        ingest.discard()

    def write(self, data: bytes, digest: Digest, media_type: str) -> None:
        """Verify and commit a small blob held in memory (a manifest, index or config)."""
        computed = Digest.of_bytes(data)
        if computed != digest:
            raise IntegrityError(
                f"blob {digest} failed verification: content has digest {computed}",
                digest=digest,
                expected=digest,
                actual=computed,
            )
        if self.has(digest):
            return
        temporary = os.path.join(self.ingest_dir, f"{digest.hex}.{os.getpid()}.small")
        with open(temporary, "wb") as handle:
            handle.write(data)
            os.fdatasync(handle.fileno())
        self._publish(temporary, digest, len(data), media_type)

    def delete(self, digest: Digest) -> None:
        """Remove a blob's record, then its file; used by rmi and gc under the gc lock."""
        with self.meta.write() as txn:
            txn.delete("blobs", digest)
        try:
            os.unlink(self.blob_path(digest))
        except FileNotFoundError:
            pass

    def _publish(self, source: str, digest: Digest, size: int, media_type: str) -> None:
        target = self.blob_path(digest)
        actual_size = os.stat(source).st_size
        if actual_size != size:
            raise IntegrityError(
                f"blob {digest} has {actual_size} bytes, but its descriptor expects {size}",
                digest=digest,
                expected=str(size),
                actual=str(actual_size),
                path=source,
            )
        os.chmod(source, 0o444)
        os.rename(source, target)
        _fsync_dir(os.path.dirname(target))

        # Point of no return: the verified file is in place, so record it.
        with self.meta.write() as txn:
            txn.put("blobs", digest, {"size": size, "media_type": media_type})
        log.debug("committed blob %s (%d bytes)", digest, size)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
