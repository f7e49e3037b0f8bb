"""IngestFile: out-of-order writes, the blocking prefix reader, clipping and resume."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from lstore.store.digest import Digest
from lstore.store.ingest import DownloadCancelled, IngestFile

DATA = os.urandom(3 * 1024 * 1024 + 17)
DIGEST = Digest("sha256:" + hashlib.sha256(DATA).hexdigest())


def _read_all(ingest: IngestFile) -> bytes:
    reader = ingest.reader()
    parts = []
    while chunk := reader.read(65536):
        parts.append(chunk)
    return b"".join(parts)


def test_out_of_order_writes_read_in_order(tmp_path):
    ingest = IngestFile(str(tmp_path / "blob"), len(DATA), DIGEST)
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(_read_all(ingest)))
    reader.start()

    chunk = 1 << 20
    offsets = list(range(0, len(DATA), chunk))
    for offset in reversed(offsets):
        ingest.write_at(offset, DATA[offset : offset + chunk])
    reader.join(timeout=10)

    assert not reader.is_alive()
    assert result[0] == DATA
    assert ingest.missing_ranges() == []
    ingest.close()


def test_rewrite_below_prefix_is_clipped(tmp_path):
    ingest = IngestFile(str(tmp_path / "blob"), len(DATA), DIGEST)
    ingest.write_at(0, DATA[:1000])

    # A server that ignores Range resends from zero with different bytes up front; the bytes
    # below the prefix may already be hashed, so they must stay as first written.
    ingest.write_at(0, b"X" * 1000 + DATA[1000:])

    assert _read_all(ingest) == DATA
    ingest.close()


def test_missing_ranges_lists_gaps(tmp_path):
    ingest = IngestFile(str(tmp_path / "blob"), 100, DIGEST)
    ingest.write_at(10, b"a" * 10)
    ingest.write_at(50, b"b" * 50)

    assert ingest.missing_ranges() == [(0, 10), (20, 50)]
    assert ingest.prefix == 0
    ingest.close()


def test_write_past_size_is_rejected(tmp_path):
    ingest = IngestFile(str(tmp_path / "blob"), 10, DIGEST)

    with pytest.raises(Exception) as info:
        ingest.write_at(5, b"0123456789")

    assert DIGEST in str(info.value)
    ingest.close()


def test_fail_wakes_reader(tmp_path):
    ingest = IngestFile(str(tmp_path / "blob"), 100, DIGEST)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            ingest.reader().read(10)
        except DownloadCancelled as exc:
            errors.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    ingest.fail(ConnectionResetError("reset by peer"))
    thread.join(timeout=5)

    assert not thread.is_alive()
    assert DIGEST in str(errors[0])
    ingest.close()


def test_progress_survives_reopen(tmp_path, monkeypatch):
    monkeypatch.setattr("lstore.store.ingest._PROGRESS_INTERVAL", 1)
    path = str(tmp_path / "blob")
    first = IngestFile(path, len(DATA), DIGEST)
    first.write_at(0, DATA[:500_000])
    first.close()

    second = IngestFile(path, len(DATA), DIGEST)

    assert second.missing_ranges() == [(500_000, len(DATA))]
    second.write_at(500_000, DATA[500_000:])
    assert _read_all(second) == DATA
    second.close()
