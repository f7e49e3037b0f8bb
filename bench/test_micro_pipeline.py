"""Microbenchmark: the CPU path of a layer without extraction: hash the compressed blob,
inflate it and hash the uncompressed stream (the diffID), as a pull does for every layer.

    python -m pytest bench/ --benchmark-only
"""

from __future__ import annotations

import hashlib
import io

import pytest

from lstore.bench.synthetic import SyntheticLayer, build_layer
from lstore.store.decompress import decompressed_chunks
from lstore.store.digest import Digest
from lstore.store.layerjob import HashingReader


@pytest.fixture(scope="module")
def layer() -> SyntheticLayer:
    return build_layer()


def inflate_and_hash(blob: bytes, compression: str, blob_digest: str) -> tuple[Digest, Digest]:
    """Return the blob digest and the diffID, computed in one streaming pass."""
    reader = HashingReader(io.BytesIO(blob))
    diff_hash = hashlib.sha256()
    for chunk in decompressed_chunks(reader, compression, blob_digest):  # type: ignore[arg-type]
        diff_hash.update(chunk)
    reader.drain()
    return Digest.from_hash(reader.hasher), Digest.from_hash(diff_hash)


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_inflate_and_hash(benchmark, layer, compression):
    blob = layer.blobs[compression]
    blob_digest = layer.blob_digest(compression)
    benchmark.extra_info["compressed_bytes"] = len(blob)
    benchmark.extra_info["uncompressed_bytes"] = len(layer.tar)

    computed_blob, diff_id = benchmark(inflate_and_hash, blob, compression, blob_digest)

    assert computed_blob == blob_digest
    assert diff_id == layer.diff_id
