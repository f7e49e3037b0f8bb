"""Container logs in docker's json-file format: one JSON object per line.

Each entry is {"log": text, "stream": "stdout" | "stderr", "time": RFC 3339 with ns}. As in
docker, a line keeps its trailing newline in "log", and a line longer than MAX_LINE bytes is
split into several entries, so `logs` reproduces the output byte for byte (for UTF-8 output).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from lstore.runner.containers import rfc3339_nano

# Docker's json-file driver splits lines at 16 KiB; a longer line without a newline would
# otherwise grow the supervisor's buffer without bound.
MAX_LINE = 16 * 1024

# How often `logs -f` looks for new entries.
FOLLOW_INTERVAL = 0.05


class LogWriter:
    """Appends container output to a log file, one entry per line of each stream.

    Each entry is written with one write(2) on an O_APPEND descriptor, so a concurrent reader
    sees whole entries except possibly a last one still being written.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._partial: dict[str, bytes] = {"stdout": b"", "stderr": b""}

    def write(self, stream: str, data: bytes) -> None:
        buffered = self._partial[stream] + data
        lines = buffered.split(b"\n")
        self._partial[stream] = lines.pop()
        for line in lines:
            self._append_chunked(stream, line + b"\n")

        while len(self._partial[stream]) >= MAX_LINE:
            chunk = self._partial[stream][:MAX_LINE]
            self._partial[stream] = self._partial[stream][MAX_LINE:]
            self._append(stream, chunk)

    def flush(self) -> None:
        """Write out the partial last lines, once the streams have ended."""
        for stream, rest in self._partial.items():
            if rest:
                self._append(stream, rest)
            self._partial[stream] = b""

    def close(self) -> None:
        self.flush()
        os.close(self._fd)

    def _append_chunked(self, stream: str, line: bytes) -> None:
        for start in range(0, len(line), MAX_LINE):
            self._append(stream, line[start : start + MAX_LINE])

    def _append(self, stream: str, data: bytes) -> None:
        entry = {"log": data.decode("utf-8", "replace"), "stream": stream, "time": rfc3339_nano()}
        os.write(self._fd, json.dumps(entry, ensure_ascii=False).encode() + b"\n")


def read_entries(
    path: str, *, follow: bool = False, finished: Callable[[], bool] = lambda: True
) -> Iterator[dict[str, Any]]:
    """Yield the log entries of a file in order.

    With `follow`, keep waiting for new entries until `finished()` returns true and the file
    has been read to its end. A missing file yields nothing.
    """
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return
    with handle:
        pending = b""
        last_pass = not follow
        while True:
            chunk = handle.read(1 << 16)
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                yield from (json.loads(line) for line in lines if line)
                continue
            if last_pass:
                return

            # Entries written just before the writer finished must still be read, so one
            # more pass follows once finished() is true.
            if finished():
                last_pass = True
            else:
                time.sleep(FOLLOW_INTERVAL)
