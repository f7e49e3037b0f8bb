"""Content digests and the OCI and Docker media types lstore understands."""

from __future__ import annotations

import hashlib
import re

from lstore.errors import InvalidArgumentError

# OCI image-spec descriptor.md: algorithm ":" encoded, sha256 encoded as 64 lowercase hex.
_SHA256_HEX = re.compile(r"[a-f0-9]{64}")
_SHA512_HEX = re.compile(r"[a-f0-9]{128}")


class Digest(str):
    """A content digest such as `sha256:<64 hex>`; only sha256 and sha512 are accepted."""

    __slots__ = ()

    def __new__(cls, value: str) -> "Digest":
        algorithm, _, encoded = value.partition(":")
        pattern = {"sha256": _SHA256_HEX, "sha512": _SHA512_HEX}.get(algorithm)
        if pattern is None or not pattern.fullmatch(encoded):
            raise InvalidArgumentError(
                f"invalid digest {value!r}: expected sha256:<64 lowercase hex digits>"
            )
        return super().__new__(cls, value)

    @property
    def algorithm(self) -> str:
        return self.partition(":")[0]

    @property
    def hex(self) -> str:
        return self.partition(":")[2]

    def new_hash(self) -> "hashlib._Hash":
        return hashlib.new(self.algorithm)

    @classmethod
    def of_bytes(cls, data: bytes) -> "Digest":
        return cls("sha256:" + hashlib.sha256(data).hexdigest())

    @classmethod
    def from_hash(cls, hasher: "hashlib._Hash") -> "Digest":
        return cls(f"{hasher.name}:{hasher.hexdigest()}")


# Manifests and indexes.
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)

# Image configs.
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

# Layers, by compression.
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

COMPRESSION_NONE = "none"
COMPRESSION_GZIP = "gzip"
COMPRESSION_ZSTD = "zstd"

_LAYER_COMPRESSION = {
    OCI_LAYER_TAR: COMPRESSION_NONE,
    OCI_LAYER_NONDIST_TAR: COMPRESSION_NONE,
    DOCKER_LAYER_TAR: COMPRESSION_NONE,
    OCI_LAYER_GZIP: COMPRESSION_GZIP,
    OCI_LAYER_NONDIST_GZIP: COMPRESSION_GZIP,
    DOCKER_LAYER_GZIP: COMPRESSION_GZIP,
    DOCKER_LAYER_FOREIGN_GZIP: COMPRESSION_GZIP,
    OCI_LAYER_ZSTD: COMPRESSION_ZSTD,
    OCI_LAYER_NONDIST_ZSTD: COMPRESSION_ZSTD,
}


def layer_compression(media_type: str) -> str | None:
    """Return the compression of a layer media type, or None when it is not a layer type."""
    return _LAYER_COMPRESSION.get(media_type)


def chain_ids(diff_ids: list[Digest]) -> list[Digest]:
    """Compute the chain ID of each layer (OCI image-spec config.md, "Layer ChainID").

    ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)).
    """
    result: list[Digest] = []
    for diff_id in diff_ids:
        if not result:
            result.append(diff_id)
            continue
        text = f"{result[-1]} {diff_id}".encode()
        result.append(Digest.of_bytes(text))
    return result
