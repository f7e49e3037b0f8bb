"""Resolving references to verified manifests and configs against the fake registry."""

import asyncio
import json

import pytest
from fakeregistry import (
    DOCKER_CONFIG,
    DOCKER_LAYER_TAR,
    FakeRegistry,
    registry_settings,
    sha256_digest,
)

from lstore.errors import IntegrityError, NotFoundError, RegistryError, UnsupportedError
from lstore.store.digest import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from lstore.store.platform import Platform, parse_platform
from lstore.store.reference import parse_reference
from lstore.store.registry.client import (
    RegistryClient,
    is_loopback,
    matches_registry_list,
)

CONFIG = {
    "architecture": "amd64",
    "os": "linux",
    "config": {"Cmd": ["true"]},
    "rootfs": {"type": "layers", "diff_ids": [sha256_digest(b"tar")]},
}


def image_manifest(registry: FakeRegistry, media_type: str | None) -> dict:
    body = {
        "schemaVersion": 2,
        "config": registry.add_blob(json.dumps(CONFIG).encode(), DOCKER_CONFIG),
        "layers": [registry.add_blob(b"tar", DOCKER_LAYER_TAR)],
    }
    if media_type:
        body["mediaType"] = media_type
    return body


async def resolve(tmp_path, registry: FakeRegistry, text: str, platform: Platform | None = None):
    async with RegistryClient(registry_settings(tmp_path)) as client:
        return await client.resolve(parse_reference(f"{registry.address}/{text}"), platform)


async def resolve_manifest(tmp_path, body: bytes, content_type: str):
    async with FakeRegistry() as registry:
        registry.add_manifest("team/app", "1", body, content_type)
        return await resolve(tmp_path, registry, "team/app:1")


@pytest.mark.parametrize(
    "body_type, header, expected_type",
    [
        (DOCKER_MANIFEST, "text/plain; charset=utf-8", DOCKER_MANIFEST),  # M1
        (DOCKER_MANIFEST, "application/json", DOCKER_MANIFEST),  # M2
        (None, OCI_MANIFEST, OCI_MANIFEST),  # M3: OCI without mediaType
        (None, "application/json", OCI_MANIFEST),  # decided by structure
    ],
    ids=["M1-text-plain", "M2-application-json", "M3-oci-without-media-type", "structure"],
)
def test_resolve_detects_manifest_type(tmp_path, body_type, header, expected_type):
    async def scenario():
        async with FakeRegistry() as registry:
            body = json.dumps(image_manifest(registry, body_type)).encode()
            registry.add_manifest("team/app", "1", body, header)
            return body, await resolve(tmp_path, registry, "team/app:1")

    body, resolved = asyncio.run(scenario())

    assert resolved.media_type == expected_type
    assert resolved.manifest_bytes == body
    assert resolved.digest == sha256_digest(body)
    assert resolved.config.diff_ids == (sha256_digest(b"tar"),)
    assert resolved.config_bytes == json.dumps(CONFIG).encode()
    assert resolved.index_digest is None


def test_resolve_rejects_html(tmp_path):
    page = b"<html><head><title>Login</title></head><body>proxy login</body></html>"

    with pytest.raises(RegistryError) as caught:
        asyncio.run(resolve_manifest(tmp_path, page, "text/html; charset=utf-8"))

    assert "registry returned non-manifest content (HTML)" in str(caught.value)
    assert "team/app:1" in str(caught.value)


@pytest.mark.parametrize(
    "content_type",
    [
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/json",
    ],
)
def test_resolve_rejects_schema1(tmp_path, content_type):
    body = json.dumps(
        {"schemaVersion": 1, "name": "team/app", "tag": "1", "fsLayers": [], "history": []}
    ).encode()

    with pytest.raises(UnsupportedError) as caught:
        asyncio.run(resolve_manifest(tmp_path, body, content_type))

    assert str(caught.value).startswith("schema 1 manifests are not supported; ")


def test_resolve_rejects_invalid_json(tmp_path):
    with pytest.raises(RegistryError) as caught:
        asyncio.run(resolve_manifest(tmp_path, b'{"schemaVersion": 2, "layers": [', OCI_MANIFEST))

    message = str(caught.value)
    assert "not valid JSON" in message
    assert "team/app:1" in message
    assert "\n" not in message


def add_platform_images(registry: FakeRegistry) -> dict[str, dict]:
    amd64 = registry.add_image("team/app", None, [b"amd64 layer"], architecture="amd64")
    arm64 = registry.add_image("team/app", None, [b"arm64 layer"], architecture="arm64")
    registry.add_index(
        "team/app",
        "multi",
        [
            (amd64, {"os": "linux", "architecture": "amd64"}),
            (arm64, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
        ],
    )
    return {"amd64": amd64, "arm64": arm64}


def test_resolve_index_selects_platform(tmp_path):
    async def scenario():
        async with FakeRegistry() as registry:
            images = add_platform_images(registry)
            index_body = registry.manifests[("team/app", "multi")][0]
            resolved = await resolve(
                tmp_path, registry, "team/app:multi", parse_platform("linux/arm64")
            )
            return images, index_body, resolved

    images, index_body, resolved = asyncio.run(scenario())

    assert resolved.digest == images["arm64"]["digest"]
    assert resolved.platform == Platform("linux", "arm64")
    assert resolved.config.architecture == "arm64"
    assert resolved.index_digest == sha256_digest(index_body)
    assert resolved.index_bytes == index_body
    assert resolved.index_media_type == OCI_INDEX


def test_resolve_index_without_platform_lists_available(tmp_path):
    async def scenario():
        async with FakeRegistry() as registry:
            add_platform_images(registry)
            await resolve(tmp_path, registry, "team/app:multi", parse_platform("linux/s390x"))

    with pytest.raises(NotFoundError) as caught:
        asyncio.run(scenario())

    assert "available platforms are linux/amd64, linux/arm64" in str(caught.value)


def test_resolve_by_digest_verifies_body(tmp_path):
    async def scenario():
        async with FakeRegistry() as registry:
            image = registry.add_image("team/app", "1", [b"layer"])
            other = registry.add_image("team/app", "2", [b"other layer"])
            # The registry serves another manifest under the requested digest.
            registry.manifests[("team/app", image["digest"])] = registry.manifests[
                ("team/app", other["digest"])
            ]
            await resolve(tmp_path, registry, f"team/app@{image['digest']}")

    with pytest.raises(IntegrityError) as caught:
        asyncio.run(scenario())

    assert "hashes to" in str(caught.value)


def test_resolve_by_digest_succeeds(tmp_path):
    async def scenario():
        async with FakeRegistry() as registry:
            image = registry.add_image("team/app", "1", [b"layer"])
            return image, await resolve(tmp_path, registry, f"team/app:1@{image['digest']}")

    image, resolved = asyncio.run(scenario())

    assert resolved.digest == image["digest"]
    assert resolved.ref.tag == "1"


def test_resolve_verifies_config_digest(tmp_path):
    async def scenario():
        async with FakeRegistry() as registry:
            registry.add_image("team/app", "1", [b"layer"])
            manifest = json.loads(registry.manifests[("team/app", "1")][0])
            config = manifest["config"]
            original = registry.blobs[config["digest"]]
            registry.blobs[config["digest"]] = original.replace(b"linux", b"LINUX")
            await resolve(tmp_path, registry, "team/app:1")

    with pytest.raises(IntegrityError) as caught:
        asyncio.run(scenario())

    assert "blob sha256:" in str(caught.value)


def test_resolve_verifies_config_size(tmp_path):
    async def scenario():
        async with FakeRegistry() as registry:
            registry.add_image("team/app", "1", [b"layer"])
            manifest = json.loads(registry.manifests[("team/app", "1")][0])
            registry.blobs[manifest["config"]["digest"]] += b" "
            await resolve(tmp_path, registry, "team/app:1")

    with pytest.raises(IntegrityError) as caught:
        asyncio.run(scenario())

    assert "registry sent more than" in str(caught.value)


def test_resolve_verifies_index_entry_size(tmp_path):
    async def scenario():
        async with FakeRegistry() as registry:
            image = registry.add_image("team/app", None, [b"layer"])
            wrong = dict(image, size=image["size"] + 1)
            registry.add_index("team/app", "1", [(wrong, {"os": "linux", "architecture": "amd64"})])
            await resolve(tmp_path, registry, "team/app:1", parse_platform("linux/amd64"))

    with pytest.raises(IntegrityError) as caught:
        asyncio.run(scenario())

    assert "but the index says" in str(caught.value)


def test_resolve_rejects_layer_count_mismatch(tmp_path):
    async def scenario():
        async with FakeRegistry() as registry:
            body = image_manifest(registry, DOCKER_MANIFEST)
            body["layers"].append(registry.add_blob(b"extra"))
            registry.add_manifest("team/app", "1", json.dumps(body).encode(), DOCKER_MANIFEST)
            await resolve(tmp_path, registry, "team/app:1")

    with pytest.raises(RegistryError) as caught:
        asyncio.run(scenario())

    assert "lists 2 layers but its config lists 1 diff_ids" in str(caught.value)


def test_loopback_registry_falls_back_to_plain_http(tmp_path):
    async def scenario():
        async with FakeRegistry() as registry:
            registry.add_image("team/app", "1", [b"layer"])
            settings = registry_settings(tmp_path, plain_http=False)
            async with RegistryClient(settings) as client:
                return await client.resolve(parse_reference(f"{registry.address}/team/app:1"))

    resolved = asyncio.run(scenario())

    assert resolved.config.os == "linux"


@pytest.mark.parametrize(
    "host, expected",
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("10.0.0.1", False),
        ("registry.example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


@pytest.mark.parametrize(
    "host, port, entries, expected",
    [
        ("reg.local", 5000, ("reg.local:5000",), True),
        ("reg.local", 5001, ("reg.local:5000",), False),
        ("reg.local", 443, ("reg.local",), True),
        ("10.1.2.3", 5000, ("10.0.0.0/8",), True),
        ("11.1.2.3", 5000, ("10.0.0.0/8",), False),
        ("reg.local", None, ("other.local",), False),
        ("REG.local", None, ("reg.LOCAL",), True),
    ],
)
def test_matches_registry_list(host, port, entries, expected):
    assert matches_registry_list(host.lower(), port, entries) is expected
