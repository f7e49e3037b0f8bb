"""A blob download in progress: written at offsets by fetchers, read in order by one consumer.

Fetchers (the registry client, on the event loop) write byte ranges with `write_at`, possibly
several ranges at once and out of order. The consumer (the unpack thread) reads the blob from
the start through `reader()`, which blocks until the contiguous prefix covers the requested
bytes. So unpacking overlaps the download, and the digest is computed by the consumer over the
exact bytes that end up in the file.

Bytes below the contiguous prefix are never written again: the consumer may already have hashed
them, so a retry that re-sends them (a server that ignored a Range header) is clipped instead
of overwriting data that was read. The final digest check catches any server that sent wrong
bytes the first time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from typing import BinaryIO

from lstore.errors import IntegrityError, LstoreError

log = logging.getLogger(__name__)

# The progress file is rewritten after at least this many new bytes, so an interrupted pull
# can resume without rewriting it on every network read.
_PROGRESS_INTERVAL = 8 << 20


class DownloadCancelled(LstoreError):
    """The download of a blob stopped before it was complete."""


class IngestFile:
    """One partial blob under ROOT/ingest/, with the byte ranges already written.

    Safe for one writer thread (or event loop) and one reader thread at a time. The progress
    sidecar `<path>.ranges` lets a later pull resume; its ranges are trusted only because the
    final digest check covers every byte.
    """

    def __init__(self, path: str, size: int, digest: str) -> None:
        self.path = path
        self.size = size
        self.digest = digest
        self._ranges: list[list[int]] = []
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._unsaved = 0
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._load_progress()
        os.ftruncate(self._fd, size)

    # Writer side.

    @property
    def prefix(self) -> int:
        """Length of the contiguous range of written bytes that starts at offset 0."""
        with self._cond:
            return self._prefix_locked()

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Return the [start, end) ranges not yet written, in order."""
        with self._cond:
            gaps: list[tuple[int, int]] = []
            position = 0
            for start, end in self._ranges:
                if start > position:
                    gaps.append((position, start))
                position = max(position, end)
            if position < self.size:
                gaps.append((position, self.size))
            return gaps

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Write `data` at `offset`, dropping any part that lies inside the contiguous prefix."""
        end = offset + len(data)
        if offset < 0 or end > self.size:
            raise IntegrityError(
                f"blob {self.digest}: registry sent bytes {offset}-{end} past the declared "
                f"size {self.size}",
                digest=self.digest,
            )
        with self._cond:
            skip = max(0, self._prefix_locked() - offset)
        if skip >= len(data):
            return
        view = memoryview(data)[skip:]
        written = os.pwrite(self._fd, view, offset + skip)
        if written != len(view):
            raise OSError(f"short write to {self.path}")
        with self._cond:
            self._add_range(offset + skip, end)
            self._unsaved += len(view)
            if self._unsaved >= _PROGRESS_INTERVAL:
                self._save_progress()
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """Wake the reader with `error`; the download will not complete."""
        with self._cond:
            if self._error is None:
                self._error = error
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            if self._unsaved:
                self._save_progress()
        os.close(self._fd)

    def discard(self) -> None:
        """Delete the partial file and its progress record, for a blob that failed its check."""
        for name in (self.path, self._progress_path):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass

    # Reader side.

    def reader(self) -> BinaryIO:
        """Return a file-like object that reads the whole blob in order, waiting for bytes."""
        return _PrefixReader(self)  # type: ignore[return-value]

    def _wait_for(self, position: int, want: int) -> int:
        """Block until bytes past `position` exist; return how many may be read now."""
        with self._cond:
            while True:
                if self._error is not None:
                    raise DownloadCancelled(
                        f"download of blob {self.digest} failed: {self._error}",
                        digest=self.digest,
                    ) from self._error
                available = self._prefix_locked() - position
                if available > 0 or position >= self.size:
                    return min(available, want)
                self._cond.wait()

    # Internals.

    @property
    def _progress_path(self) -> str:
        return self.path + ".ranges"

    def _prefix_locked(self) -> int:
        if self._ranges and self._ranges[0][0] == 0:
            return self._ranges[0][1]
        return 0

    def _add_range(self, start: int, end: int) -> None:
        merged: list[list[int]] = []
        for current in sorted(self._ranges + [[start, end]]):
            if merged and current[0] <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], current[1])
            else:
                merged.append(list(current))
        self._ranges = merged

    def _save_progress(self) -> None:
        # fdatasync first: a recorded range must never describe bytes that a crash can lose.
        os.fdatasync(self._fd)
        temporary = self._progress_path + ".tmp"
        try:
            with open(temporary, "w") as handle:
                json.dump({"size": self.size, "ranges": self._ranges}, handle)
            os.replace(temporary, self._progress_path)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        self._unsaved = 0

    def _load_progress(self) -> None:
        try:
            with open(self._progress_path) as handle:
                record = json.load(handle)
        except (FileNotFoundError, ValueError):
            return
        if record.get("size") != self.size:
            return
        self._ranges = [list(r) for r in record.get("ranges", [])]
        if self._ranges:
            log.debug("resuming blob %s with ranges %s", self.digest, self._ranges)


class ReadIntoMixin:
    """`readinto` and `readable` for a reader class that defines `read`, as decoders expect."""

    def read(self, size: int = -1) -> bytes:
        raise NotImplementedError

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True


class _PrefixReader(ReadIntoMixin):
    """Sequential reader over an IngestFile's contiguous prefix."""

    def __init__(self, ingest: IngestFile) -> None:
        self._ingest = ingest
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self._ingest.size - self._position
        count = self._ingest._wait_for(self._position, size)
        if count <= 0:
            return b""
        data = os.pread(self._ingest._fd, count, self._position)
        self._position += len(data)
        return data
