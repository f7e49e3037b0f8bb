"""A synthetic image layer for microbenchmarks: the mix of entries a Debian layer has."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
from dataclasses import dataclass

import zstandard

from lstore.store.digest import Digest

# Many small files (like /usr/share/doc and /usr/lib), a few large ones (shared libraries
# and binaries), directories and symlinks. About 20 MB uncompressed.
SMALL_FILES = 2000
SMALL_SIZES = (512, 8192)
LARGE_FILES = 4
LARGE_SIZE = 3 << 20
DIRECTORIES = 40
SYMLINKS = 200
MTIME = 1_700_000_000
_SEED = 20240101


@dataclass(frozen=True)
class SyntheticLayer:
    """One layer as an uncompressed tar and as gzip and zstd blobs, with their digests."""

    tar: bytes
    diff_id: Digest
    blobs: dict[str, bytes]

    def blob_digest(self, compression: str) -> Digest:
        return Digest.of_bytes(self.blobs[compression])


def build_layer() -> SyntheticLayer:
    """Build the layer; the same bytes every time, so runs are comparable."""
    rng = random.Random(_SEED)
    output = io.BytesIO()
    with tarfile.open(fileobj=output, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directories = _add_directories(tar)
        for index in range(SMALL_FILES):
            size = rng.randint(*SMALL_SIZES)
            _add_file(tar, f"{rng.choice(directories)}/file{index}", _content(rng, size))
        for index in range(LARGE_FILES):
            _add_file(tar, f"usr/lib/large{index}.so", _content(rng, LARGE_SIZE))
        for index in range(SYMLINKS):
            _add_symlink(tar, f"usr/bin/link{index}", f"../lib/large{index % LARGE_FILES}.so")
    data = output.getvalue()
    blobs = {
        "none": data,
        "gzip": gzip.compress(data, compresslevel=6, mtime=0),
        "zstd": zstandard.ZstdCompressor(level=3).compress(data),
    }
    return SyntheticLayer(data, Digest("sha256:" + hashlib.sha256(data).hexdigest()), blobs)


def _content(rng: random.Random, size: int) -> bytes:
    # A third random bytes and the rest words from a small vocabulary: gzip then compresses
    # the layer about as much as the base layer of the debian-nginx test image (2.4:1).
    noise = rng.randbytes(size // 3)
    words = [rng.choice(_WORDS) for _ in range(size // 6 + 1)]
    return noise + " ".join(words).encode()[: size - len(noise)]


_WORDS = ["lib", "usr", "share", "config", "error", "return", "value", "static", "const",
          "struct", "buffer", "0x7f", "ELF", "main", "init", "debian", "nginx", "module"]


def _add_directories(tar: tarfile.TarFile) -> list[str]:
    names = ["usr", "usr/lib", "usr/bin", "usr/share"]
    names += [f"usr/share/pkg{index}" for index in range(DIRECTORIES)]
    for name in names:
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        info.mtime = MTIME
        tar.addfile(info)
    return names[3:]


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = MTIME
    tar.addfile(info, io.BytesIO(data))


def _add_symlink(tar: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mtime = MTIME
    tar.addfile(info)
