"""The registry client against the real distribution registry seeded with the test images."""

import asyncio
import hashlib

import pytest
from fakeregistry import registry_settings

from lstore.errors import NotFoundError
from lstore.store.digest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    layer_compression,
)
from lstore.store.ingest import IngestFile
from lstore.store.platform import parse_platform
from lstore.store.reference import parse_reference
from lstore.store.registry.client import RegistryClient

pytestmark = pytest.mark.registry

# Fetch layers above 64 KiB as parallel ranges of 64 KiB, so the registry's Range support
# is exercised on the small test images.
SMALL_RANGES = {"range_threshold": 64 << 10, "range_chunk_size": 64 << 10}


def resolve(registry, tmp_path, name: str, platform: str = "linux/amd64", **settings):
    async def scenario():
        async with RegistryClient(registry_settings(tmp_path, **settings)) as client:
            return await client.resolve(
                parse_reference(registry.ref(name)), parse_platform(platform)
            )

    return asyncio.run(scenario())


@pytest.mark.parametrize(
    "platform, architecture", [("linux/amd64", "amd64"), ("linux/arm64", "arm64")]
)
def test_resolve_index_per_platform(registry, tmp_path, platform, architecture):
    resolved = resolve(registry, tmp_path, "busybox:latest", platform)

    assert resolved.index_digest == registry.digests["busybox:latest"]
    assert resolved.index_media_type == OCI_INDEX
    assert resolved.media_type == OCI_MANIFEST
    assert resolved.config.architecture == architecture
    assert resolved.platform == parse_platform(platform)
    assert len(resolved.config.diff_ids) == len(resolved.manifest.layers)
    assert hashlib.sha256(resolved.manifest_bytes).hexdigest() == resolved.digest.hex


def test_resolve_docker_schema2_list(registry, tmp_path):
    resolved = resolve(registry, tmp_path, "busybox:v2s2")

    assert resolved.index_media_type == DOCKER_MANIFEST_LIST
    assert resolved.media_type == DOCKER_MANIFEST


def test_resolve_zstd_image(registry, tmp_path):
    resolved = resolve(registry, tmp_path, "debian-nginx:zstd")

    compressions = {layer_compression(layer.media_type) for layer in resolved.manifest.layers}
    assert compressions == {"zstd"}


def test_resolve_by_digest(registry, tmp_path):
    digest = registry.digests["debian-nginx:oci"]

    resolved = resolve(registry, tmp_path, f"debian-nginx@{digest}")

    assert resolved.digest == digest
    assert resolved.index_digest is None


def test_resolve_over_loopback_fallback(registry, tmp_path):
    resolved = resolve(registry, tmp_path, "debian-nginx:oci", plain_http=False)

    assert resolved.digest == registry.digests["debian-nginx:oci"]


def test_resolve_unknown_tag_raises(registry, tmp_path):
    with pytest.raises(NotFoundError) as caught:
        resolve(registry, tmp_path, "debian-nginx:no-such-tag")

    assert caught.value.codes == ("MANIFEST_UNKNOWN",)
    assert caught.value.status == 404


@pytest.mark.parametrize("settings", [{}, SMALL_RANGES], ids=["whole", "parallel-ranges"])
def test_fetch_every_layer_matches_digest(registry, tmp_path, settings):
    async def scenario():
        ref = parse_reference(registry.ref("debian-nginx:oci"))
        async with RegistryClient(registry_settings(tmp_path, **settings)) as client:
            resolved = await client.resolve(ref, parse_platform("linux/amd64"))
            paths = []
            for number, layer in enumerate(resolved.manifest.layers):
                path = tmp_path / f"layer-{number}"
                ingest = IngestFile(str(path), layer.size, layer.digest)
                try:
                    await client.fetch_blob(ref, layer, ingest)
                finally:
                    ingest.close()
                paths.append((path, layer.digest))
            return paths

    paths = asyncio.run(scenario())

    assert len(paths) == 3
    for path, digest in paths:
        assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == digest
