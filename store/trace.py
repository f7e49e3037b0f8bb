"""Per-blob, per-stage timings of a pull, written as JSON lines for `lstore pull --trace`.

Each line is {"t": seconds since the pull started, "blob": digest, "stage": name, "event":
"start" | "end" | "progress", "bytes": count}. Stages: connect, first_byte, download,
inflate, hash, extract, commit. Progress events carry the bytes a stage has handled so far,
at most one per stage every `_PROGRESS_STEP` bytes, so a trace of a large pull stays small.
"""

from __future__ import annotations

import json
import threading
import time
from typing import IO

_PROGRESS_STEP = 1 << 20


class PullTrace:
    """A trace file shared by the event loop and the unpack threads of one pull."""

    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "w", buffering=1 << 16)
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._reported: dict[tuple[str, str], int] = {}

    def event(self, blob: str, stage: str, event: str, nbytes: int = 0) -> None:
        with self._lock:
            # Timestamps are taken under the lock so that lines are in time order.
            line = {
                "t": round(time.monotonic() - self._started, 6),
                "blob": blob,
                "stage": stage,
                "event": event,
                "bytes": nbytes,
            }
            self._file.write(json.dumps(line, separators=(",", ":")) + "\n")

    def progress(self, blob: str, stage: str, total: int) -> None:
        """Record that `stage` of `blob` has handled `total` bytes, thinned to 1 MiB steps."""
        key = (blob, stage)
        if total - self._reported.get(key, -_PROGRESS_STEP) < _PROGRESS_STEP:
            return
        self._reported[key] = total
        self.event(blob, stage, "progress", total)

    def fetch_trace(self, blob: str) -> "BlobFetchTrace":
        return BlobFetchTrace(self, blob)

    def close(self) -> None:
        with self._lock:
            self._file.close()


class BlobFetchTrace:
    """Registry client hooks (see registry/ranges.py FetchTrace) for one blob's download.

    It does not subclass FetchTrace so that this module imports no HTTP client.
    """

    def __init__(self, trace: PullTrace, blob: str) -> None:
        self._trace = trace
        self._blob = blob

    def on_request(self, start: int, end: int) -> None:
        self._trace.event(self._blob, "connect", "start", start)

    def on_first_byte(self, start: int, end: int) -> None:
        self._trace.event(self._blob, "first_byte", "end", start)

    def on_done(self, start: int, end: int, received: int) -> None:
        # Download progress comes from the byte counter as a running total, so a finished
        # Range request adds no event of its own.
        return
