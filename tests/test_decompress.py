"""Decompression of layer blobs: gzip members and padding, zstd frames, truncation, garbage."""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib

import pytest
import zstandard

from lstore.errors import IntegrityError, UnsupportedError
from lstore.store import decompress
from lstore.store.decompress import decompressed_chunks
from tests.layers import LAYER_DIGEST, TrickleReader, gzip_member

PAYLOAD = os.urandom(300_000) + b"layer text " * 200_000


def inflate(blob: bytes, compression: str, step: int | None = None) -> bytes:
    source = io.BytesIO(blob) if step is None else TrickleReader(blob, step)
    return b"".join(decompressed_chunks(source, compression, LAYER_DIGEST))


def zstd_frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def skippable_frame(data: bytes) -> bytes:
    return struct.pack("<II", 0x184D2A50, len(data)) + data


HALF = len(PAYLOAD) // 2

GOOD_STREAMS = [
    ("gzip one member", "gzip", gzip.compress(PAYLOAD)),
    (
        "gzip two members",
        "gzip",
        gzip.compress(PAYLOAD[:HALF]) + gzip.compress(PAYLOAD[HALF:]),
    ),
    (
        "gzip empty middle member",
        "gzip",
        gzip.compress(PAYLOAD[:HALF]) + gzip.compress(b"") + gzip.compress(PAYLOAD[HALF:]),
    ),
    (
        "gzip FNAME FEXTRA FHCRC",
        "gzip",
        gzip_member(PAYLOAD, name=b"layer.tar", extra=b"AB\x02\x00xy", header_crc=True),
    ),
    ("gzip NUL padding", "gzip", gzip.compress(PAYLOAD) + bytes(512)),
    ("zstd one frame", "zstd", zstd_frame(PAYLOAD)),
    ("zstd two frames", "zstd", zstd_frame(PAYLOAD[:HALF]) + zstd_frame(PAYLOAD[HALF:])),
    (
        "zstd skippable frame",
        "zstd",
        zstd_frame(PAYLOAD[:HALF]) + skippable_frame(b"meta") + zstd_frame(PAYLOAD[HALF:]),
    ),
    ("zstd NUL padding", "zstd", zstd_frame(PAYLOAD) + bytes(100)),
    ("none", "none", PAYLOAD),
]


@pytest.mark.parametrize(
    "compression, blob", [case[1:] for case in GOOD_STREAMS], ids=[c[0] for c in GOOD_STREAMS]
)
def test_stream_yields_whole_payload(compression: str, blob: bytes) -> None:
    assert inflate(blob, compression) == PAYLOAD


@pytest.mark.parametrize(
    "compression, blob", [case[1:] for case in GOOD_STREAMS], ids=[c[0] for c in GOOD_STREAMS]
)
def test_stream_survives_short_reads(compression: str, blob: bytes) -> None:
    assert inflate(blob, compression, step=1000) == PAYLOAD


BAD_STREAMS = [
    ("gzip garbage", "gzip", gzip.compress(PAYLOAD) + b"GARBAGE!GARBAGE!", "trailing garbage"),
    ("gzip NUL then garbage", "gzip", gzip.compress(PAYLOAD) + bytes(8) + b"x", "trailing garbage"),
    ("gzip lone magic byte", "gzip", gzip.compress(PAYLOAD) + b"\x1f", "trailing garbage"),
    ("gzip truncated", "gzip", gzip.compress(PAYLOAD)[:-4], "truncated"),
    ("gzip bad crc", "gzip", gzip.compress(PAYLOAD)[:-8] + b"\0" * 8, "invalid gzip stream"),
    ("gzip empty blob", "gzip", b"", "empty"),
    ("not gzip at all", "gzip", b"plain tar bytes", "invalid gzip stream"),
    (
        "gzip bad header crc",
        "gzip",
        gzip_member(PAYLOAD, header_crc=True)[:10] + b"\0\0" + gzip_member(PAYLOAD)[10:],
        "invalid gzip stream",
    ),
    ("zstd truncated", "zstd", zstd_frame(PAYLOAD)[:-3], "truncated"),
    ("zstd garbage", "zstd", zstd_frame(PAYLOAD) + b"GARBAGE!", "invalid zstd stream"),
    ("zstd NUL then garbage", "zstd", zstd_frame(PAYLOAD) + b"\0\0x", "trailing garbage"),
    ("zstd empty blob", "zstd", b"", "empty"),
]


@pytest.mark.parametrize(
    "compression, blob, message",
    [case[1:] for case in BAD_STREAMS],
    ids=[case[0] for case in BAD_STREAMS],
)
def test_corrupt_stream_raises_integrity_error(
    compression: str, blob: bytes, message: str
) -> None:
    with pytest.raises(IntegrityError, match=message) as caught:
        inflate(blob, compression)

    assert caught.value.digest == LAYER_DIGEST
    assert LAYER_DIGEST in str(caught.value)


def test_unknown_compression_is_unsupported() -> None:
    with pytest.raises(UnsupportedError, match="bzip2"):
        inflate(b"BZh9", "bzip2")


def test_gzip_output_chunks_stay_bounded() -> None:
    bomb = gzip.compress(bytes(64 << 20))
    sizes = [len(chunk) for chunk in decompressed_chunks(io.BytesIO(bomb), "gzip", LAYER_DIGEST)]

    assert sum(sizes) == 64 << 20
    assert max(sizes) <= 4 << 20


def test_source_reads_are_large() -> None:
    sizes: list[int] = []

    class Recording(io.BytesIO):
        def read(self, size: int = -1) -> bytes:
            sizes.append(size)
            return super().read(size)

    inflate_source = Recording(gzip.compress(PAYLOAD))
    b"".join(decompressed_chunks(inflate_source, "gzip", LAYER_DIGEST))

    assert min(sizes) >= 256 << 10


def test_isal_inflates_gzip() -> None:
    try:
        from isal import isal_zlib
    except ImportError:
        pytest.fail("python-isal is missing: install the isal package (a project dependency)")

    assert decompress._inflate_backend is isal_zlib


def test_zlib_fallback_reads_multi_member(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decompress, "_inflate_backend", zlib)
    blob = gzip.compress(PAYLOAD[:HALF]) + gzip.compress(b"") + gzip.compress(PAYLOAD[HALF:])

    assert inflate(blob + bytes(10), "gzip") == PAYLOAD
