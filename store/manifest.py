"""Image manifests, indexes and configs (OCI image-spec and Docker schema 2), parsed and checked.

Registries label manifests inconsistently: some send `text/plain` or `application/json`, and
OCI lets a manifest omit `mediaType`. So the type is taken from the body's `mediaType` first,
then from a specific Content-Type header, then from the body's structure.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from lstore.errors import InvalidArgumentError, RegistryError, UnsupportedError
from lstore.store.digest import (
    DOCKER_CONFIG,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Digest,
    layer_compression,
)
from lstore.store.platform import Platform

log = logging.getLogger(__name__)

# containerd reads at most 4 MiB of a manifest. A larger one comes from a broken or hostile
# registry.
MAX_MANIFEST_SIZE = 4 << 20
# The image-spec sets no limit on configs. Real ones are a few KiB to a few hundred KiB even
# with long histories, so 8 MiB leaves ample room while bounding what is held in memory.
MAX_CONFIG_SIZE = 8 << 20
# Sizes are int64 in the image-spec.
_MAX_DESCRIPTOR_SIZE = (1 << 63) - 1

SCHEMA1_TYPES = (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
# Content types that do not tell which kind of manifest the body is.
_GENERIC_TYPES = ("", "text/plain", "application/json", "application/octet-stream")


@dataclass(frozen=True)
class Descriptor:
    """A reference to content by media type, digest and size (image-spec descriptor.md)."""

    media_type: str
    digest: Digest
    size: int
    urls: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    artifact_type: str = ""

    def __hash__(self) -> int:
        return hash((self.digest, self.size, self.media_type))


@dataclass(frozen=True)
class Manifest:
    """An image manifest: one config and the layers from bottom to top."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    subject: Descriptor | None = None


@dataclass(frozen=True)
class Index:
    """An OCI image index or Docker manifest list: one manifest per platform."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config (image-spec config.md) that pull and run use.

    `config` is the runtime section (Env, Cmd, Entrypoint, WorkingDir, User, ...) as sent,
    and `raw` is the whole document.
    """

    architecture: str
    os: str
    diff_ids: tuple[Digest, ...]
    config: Mapping[str, Any]
    raw: Mapping[str, Any]
    variant: str = ""
    os_version: str = ""

    @property
    def platform(self) -> Platform:
        return Platform(self.os, self.architecture, self.variant, self.os_version)

    @property
    def env(self) -> list[str]:
        return list(self.config.get("Env") or [])

    @property
    def entrypoint(self) -> list[str]:
        return list(self.config.get("Entrypoint") or [])

    @property
    def cmd(self) -> list[str]:
        return list(self.config.get("Cmd") or [])

    @property
    def working_dir(self) -> str:
        return str(self.config.get("WorkingDir") or "")

    @property
    def user(self) -> str:
        return str(self.config.get("User") or "")


def parse_manifest(
    data: bytes,
    content_type: str | None = None,
    *,
    ref: str | None = None,
    digest: str | None = None,
) -> Manifest | Index:
    """Parse a manifest or index body and check every descriptor in it.

    Raise RegistryError for content that is not a valid manifest (HTML, invalid JSON, bad
    descriptors) and UnsupportedError for valid kinds lstore does not pull (schema 1,
    artifacts). `ref` and `digest` only name the manifest in error messages.
    """
    label = _describe("manifest", ref, digest)
    header = _bare_media_type(content_type)
    _check_manifest_size(data, label, ref, digest)
    if header in SCHEMA1_TYPES:
        _reject_schema1(label, ref, digest)
    if header == "text/html" or data.lstrip()[:1] == b"<":
        raise RegistryError(
            f"registry returned non-manifest content (HTML) for {label}; check the registry "
            "address, a proxy or login page may be answering instead",
            ref=ref,
            digest=digest,
        )

    body = _load_json_object(data, label, ref, digest)
    media_type = _media_type_of_body(body, header, label, ref, digest)
    if media_type in INDEX_TYPES:
        return _parse_index(body, media_type, _Context(label, ref, digest))
    if media_type in MANIFEST_TYPES:
        return _parse_image_manifest(body, media_type, _Context(label, ref, digest))
    raise UnsupportedError(
        f"{label} has media type {media_type!r}, which is not an image manifest or index; "
        "lstore pulls container images only",
        ref=ref,
        digest=digest,
    )


def parse_image_config(
    data: bytes, *, ref: str | None = None, digest: str | None = None
) -> ImageConfig:
    """Parse an image config and check its rootfs section; raise RegistryError if invalid."""
    context = _Context(_describe("image config", ref, digest), ref, digest)
    body = _load_json_object(data, context.label, ref, digest)
    rootfs = body.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        context.fail('has no rootfs of type "layers"')
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        context.fail("has no rootfs.diff_ids list")

    runtime = body.get("config", {})
    if runtime is None:
        runtime = {}
    if not isinstance(runtime, dict):
        context.fail('has a "config" field that is not an object')
    return ImageConfig(
        architecture=_optional_text(body, "architecture", context),
        os=_optional_text(body, "os", context),
        diff_ids=tuple(context.parse_digest(value, "rootfs.diff_ids") for value in diff_ids),
        config=runtime,
        raw=body,
        variant=_optional_text(body, "variant", context),
        os_version=_optional_text(body, "os.version", context),
    )


def validate_image_manifest(manifest: Manifest, *, ref: str | None = None) -> None:
    """Raise UnsupportedError unless the manifest is a container image that lstore can unpack.

    OCI artifacts (Helm charts, signatures, SBOMs) use the manifest format with other config
    and layer media types.
    """
    if manifest.config.media_type not in CONFIG_TYPES:
        raise UnsupportedError(
            f"{ref or 'manifest'} is not a container image: config media type "
            f"{manifest.config.media_type!r}",
            ref=ref,
            digest=manifest.config.digest,
        )
    for layer in manifest.layers:
        if layer_compression(layer.media_type) is None:
            raise UnsupportedError(
                f"{ref or 'manifest'} has layer {layer.digest} of unsupported media type "
                f"{layer.media_type!r}",
                ref=ref,
                digest=layer.digest,
            )


# Parsing steps.


@dataclass(frozen=True)
class _Context:
    """The name of the manifest or config being parsed, and its ref and digest, for errors."""

    label: str
    ref: str | None
    digest: str | None

    def fail(self, problem: str) -> NoReturn:
        raise RegistryError(f"invalid {self.label}: {problem}", ref=self.ref, digest=self.digest)

    def parse_digest(self, value: object, field_name: str) -> Digest:
        if not isinstance(value, str):
            self.fail(f"{field_name} is not a digest string")
        try:
            return Digest(value)
        except InvalidArgumentError as error:
            raise RegistryError(
                f"invalid {self.label}: {field_name} has invalid digest {value!r}",
                ref=self.ref,
                digest=self.digest,
            ) from error


def _describe(kind: str, ref: str | None, digest: str | None) -> str:
    text = kind
    if digest:
        text += f" {digest}"
    if ref:
        text += f" of {ref}"
    return text


def _bare_media_type(content_type: str | None) -> str:
    """Return the media type of a Content-Type header without parameters, in lowercase."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _check_manifest_size(data: bytes, label: str, ref: str | None, digest: str | None) -> None:
    if len(data) > MAX_MANIFEST_SIZE:
        raise RegistryError(
            f"{label} is {len(data)} bytes, more than the {MAX_MANIFEST_SIZE >> 20} MiB limit "
            "for manifests",
            ref=ref,
            digest=digest,
        )


def _reject_schema1(label: str, ref: str | None, digest: str | None) -> NoReturn:
    raise UnsupportedError(
        f"schema 1 manifests are not supported; {label} must be pushed again with a current "
        "docker or buildkit, which write schema 2 or OCI manifests",
        ref=ref,
        digest=digest,
    )


def _load_json_object(
    data: bytes, label: str, ref: str | None, digest: str | None
) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise RegistryError(
            f"{label} is not valid JSON ({error}); the registry sent broken content",
            ref=ref,
            digest=digest,
        ) from error
    if not isinstance(body, dict):
        raise RegistryError(f"{label} is not a JSON object", ref=ref, digest=digest)
    return body


def _media_type_of_body(
    body: dict[str, Any], header: str, label: str, ref: str | None, digest: str | None
) -> str:
    """Decide the manifest type: body mediaType, then a specific header, then the structure."""
    media_type = body.get("mediaType")
    if media_type in SCHEMA1_TYPES or body.get("schemaVersion") == 1:
        _reject_schema1(label, ref, digest)
    if body.get("schemaVersion") != 2:
        raise RegistryError(
            f"invalid {label}: schemaVersion is {body.get('schemaVersion')!r}, expected 2",
            ref=ref,
            digest=digest,
        )
    if media_type is not None and not isinstance(media_type, str):
        raise RegistryError(f"invalid {label}: mediaType is not a string", ref=ref, digest=digest)

    if media_type:
        if header not in _GENERIC_TYPES and header != media_type:
            # The digest covers the body, not the header, so the body wins.
            log.debug("%s: Content-Type %s differs from mediaType %s", label, header, media_type)
        return media_type
    if header not in _GENERIC_TYPES:
        return header
    if "manifests" in body:
        return OCI_INDEX
    if "config" in body and "layers" in body:
        return OCI_MANIFEST
    raise RegistryError(
        f"{label} has no mediaType and neither manifests nor config and layers",
        ref=ref,
        digest=digest,
    )


def _parse_index(body: dict[str, Any], media_type: str, context: _Context) -> Index:
    entries = body.get("manifests")
    if not isinstance(entries, list):
        context.fail("manifests is not a list")
    manifests = tuple(
        _parse_descriptor(entry, f"manifests[{i}]", context) for i, entry in enumerate(entries)
    )
    return Index(media_type, manifests, _annotations(body, "annotations", context))


def _parse_image_manifest(body: dict[str, Any], media_type: str, context: _Context) -> Manifest:
    config = _parse_descriptor(body.get("config"), "config", context)
    if config.size > MAX_CONFIG_SIZE:
        context.fail(
            f"config {config.digest} is {config.size} bytes, more than the "
            f"{MAX_CONFIG_SIZE >> 20} MiB limit for image configs"
        )
    entries = body.get("layers")
    if not isinstance(entries, list):
        context.fail("layers is not a list")
    layers = tuple(
        _parse_descriptor(entry, f"layers[{i}]", context) for i, entry in enumerate(entries)
    )

    subject = None
    if body.get("subject") is not None:
        subject = _parse_descriptor(body["subject"], "subject", context)
    return Manifest(media_type, config, layers, _annotations(body, "annotations", context), subject)


def _parse_descriptor(value: object, where: str, context: _Context) -> Descriptor:
    if not isinstance(value, dict):
        context.fail(f"{where} is not a descriptor object")
    media_type = value.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        context.fail(f"{where} has no mediaType")
    size = value.get("size")
    if type(size) is not int or not 0 <= size <= _MAX_DESCRIPTOR_SIZE:
        context.fail(f"{where} has invalid size {size!r}")

    urls = value.get("urls", [])
    if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
        context.fail(f"{where} has urls that are not a list of strings")
    artifact_type = value.get("artifactType", "")
    if not isinstance(artifact_type, str):
        context.fail(f"{where} has an artifactType that is not a string")
    return Descriptor(
        media_type=media_type,
        digest=context.parse_digest(value.get("digest"), f"{where}.digest"),
        size=size,
        urls=tuple(urls),
        annotations=_annotations(value, f"{where}.annotations", context),
        platform=_parse_platform(value.get("platform"), where, context),
        artifact_type=artifact_type,
    )


def _parse_platform(value: object, where: str, context: _Context) -> Platform | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        context.fail(f"{where}.platform is not an object")
    os_name = value.get("os")
    architecture = value.get("architecture")
    if not isinstance(os_name, str) or not isinstance(architecture, str):
        context.fail(f"{where}.platform needs os and architecture strings")
    variant = value.get("variant", "")
    os_version = value.get("os.version", "")
    if not isinstance(variant, str) or not isinstance(os_version, str):
        context.fail(f"{where}.platform has a variant or os.version that is not a string")
    return Platform(os_name, architecture, variant, os_version)


def _annotations(body: dict[str, Any], where: str, context: _Context) -> dict[str, str]:
    value = body.get("annotations")
    if value is None:
        return {}
    valid = isinstance(value, dict) and all(
        isinstance(key, str) and isinstance(text, str) for key, text in value.items()
    )
    if not valid:
        context.fail(f"{where} is not a map of strings")
    return value


def _optional_text(body: dict[str, Any], key: str, context: _Context) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        context.fail(f"{key} is not a string")
    return value
