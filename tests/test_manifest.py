"""Manifest, index and config parsing: type detection, validation and limits."""

import json

import pytest

from lstore.errors import RegistryError, UnsupportedError
from lstore.store.digest import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
)
from lstore.store.manifest import (
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    Index,
    Manifest,
    parse_image_config,
    parse_manifest,
    validate_image_manifest,
)
from lstore.store.platform import Platform

REF = "127.0.0.1:5000/app:1"
DIGEST = "sha256:" + "e" * 64


def blob(number: int, media_type: str, size: int = 100) -> dict:
    return {"mediaType": media_type, "digest": f"sha256:{number:064x}", "size": size}


def manifest_body(media_type: str | None = DOCKER_MANIFEST, **changes) -> dict:
    body = {
        "schemaVersion": 2,
        "config": blob(1, DOCKER_CONFIG),
        "layers": [blob(2, DOCKER_LAYER_GZIP), blob(3, DOCKER_LAYER_GZIP, 0)],
    }
    if media_type:
        body["mediaType"] = media_type
    body.update(changes)
    return body


def index_body(media_type: str | None = OCI_INDEX) -> dict:
    entry = blob(4, OCI_MANIFEST)
    entry["platform"] = {"os": "linux", "architecture": "arm", "variant": "v6"}
    body = {"schemaVersion": 2, "manifests": [entry]}
    if media_type:
        body["mediaType"] = media_type
    return body


def encode(body: dict) -> bytes:
    return json.dumps(body).encode()


DETECTION = [
    # case, body, Content-Type header, expected class, expected media type
    ("M1 text/plain", manifest_body(), "text/plain; charset=utf-8", Manifest, DOCKER_MANIFEST),
    ("M2 application/json", manifest_body(), "application/json", Manifest, DOCKER_MANIFEST),
    ("M3 OCI without mediaType", manifest_body(None), OCI_MANIFEST, Manifest, OCI_MANIFEST),
    ("no header", manifest_body(OCI_MANIFEST), None, Manifest, OCI_MANIFEST),
    ("structure, manifest", manifest_body(None), "text/plain", Manifest, OCI_MANIFEST),
    ("structure, index", index_body(None), "application/json", Index, OCI_INDEX),
    ("index header only", index_body(None), OCI_INDEX, Index, OCI_INDEX),
    ("docker list", index_body(DOCKER_MANIFEST_LIST), None, Index, DOCKER_MANIFEST_LIST),
    ("body wins over header", manifest_body(OCI_MANIFEST), OCI_INDEX, Manifest, OCI_MANIFEST),
]


@pytest.mark.parametrize(
    "body, header, expected_class, expected_type",
    [case[1:] for case in DETECTION],
    ids=[case[0] for case in DETECTION],
)
def test_parse_manifest_detects_type(body, header, expected_class, expected_type):
    parsed = parse_manifest(encode(body), header, ref=REF)

    assert isinstance(parsed, expected_class)
    assert parsed.media_type == expected_type


def test_parse_manifest_reads_descriptors():
    manifest = parse_manifest(encode(manifest_body()), DOCKER_MANIFEST)

    assert manifest.config.digest == f"sha256:{1:064x}"
    assert manifest.config.media_type == DOCKER_CONFIG
    assert [layer.size for layer in manifest.layers] == [100, 0]
    assert manifest.layers[0].digest.hex == f"{2:064x}"


def test_parse_index_reads_platforms():
    index = parse_manifest(encode(index_body()), OCI_INDEX)

    assert index.manifests[0].platform == Platform("linux", "arm", "v6")


def test_parse_manifest_rejects_html():
    page = b"<!DOCTYPE html><html><body>Sign in</body></html>"

    for header in ("text/html", "text/plain", None):
        with pytest.raises(RegistryError) as caught:
            parse_manifest(page, header, ref=REF)
        assert "registry returned non-manifest content (HTML)" in str(caught.value)
        assert REF in str(caught.value)


@pytest.mark.parametrize(
    "body, header",
    [
        (manifest_body(None), DOCKER_SCHEMA1),
        (manifest_body(None), DOCKER_SCHEMA1_SIGNED + "; charset=utf-8"),
        ({"schemaVersion": 1, "name": "app", "fsLayers": []}, "application/json"),
        ({"schemaVersion": 1, "mediaType": DOCKER_SCHEMA1}, None),
    ],
)
def test_parse_manifest_rejects_schema1(body, header):
    with pytest.raises(UnsupportedError) as caught:
        parse_manifest(encode(body), header, ref=REF)

    assert str(caught.value).startswith("schema 1 manifests are not supported; ")
    assert REF in str(caught.value)


def test_parse_manifest_rejects_invalid_json():
    with pytest.raises(RegistryError) as caught:
        parse_manifest(b'{"schemaVersion": 2,', "application/json", ref=REF, digest=DIGEST)

    message = str(caught.value)
    assert "not valid JSON" in message
    assert REF in message
    assert DIGEST in message
    assert "\n" not in message
    assert caught.value.digest == DIGEST


def test_parse_manifest_rejects_oversized_body():
    padding = " " * MAX_MANIFEST_SIZE
    data = encode(manifest_body())[:-1] + padding.encode() + b"}"

    with pytest.raises(RegistryError) as caught:
        parse_manifest(data, DOCKER_MANIFEST, ref=REF)

    assert "4 MiB limit" in str(caught.value)


def test_parse_manifest_rejects_oversized_config():
    body = manifest_body(config=blob(1, DOCKER_CONFIG, MAX_CONFIG_SIZE + 1))

    with pytest.raises(RegistryError) as caught:
        parse_manifest(encode(body), DOCKER_MANIFEST, ref=REF)

    assert "limit for image configs" in str(caught.value)


def layer_with(**fields) -> dict:
    layer = blob(2, DOCKER_LAYER_GZIP)
    layer.update(fields)
    return layer


@pytest.mark.parametrize(
    "body, problem",
    [
        (manifest_body(layers=[layer_with(digest="sha256:12")]), "invalid digest"),
        (manifest_body(layers=[layer_with(digest=5)]), "not a digest string"),
        (manifest_body(layers=[layer_with(size=-1)]), "invalid size"),
        (manifest_body(layers=[layer_with(size=True)]), "invalid size"),
        (manifest_body(layers=[layer_with(size="10")]), "invalid size"),
        (manifest_body(layers=[layer_with(size=1 << 63)]), "invalid size"),
        (manifest_body(layers=[layer_with(mediaType="")]), "no mediaType"),
        (manifest_body(layers=[layer_with(urls="http://x")]), "urls"),
        (manifest_body(layers=[layer_with(annotations={"a": 1})]), "not a map of strings"),
        (manifest_body(layers=["sha256:00"]), "not a descriptor object"),
        (manifest_body(layers={}), "layers is not a list"),
        (manifest_body(config=None), "config is not a descriptor"),
        (manifest_body(schemaVersion=3), "expected 2"),
        (manifest_body(mediaType=7), "mediaType is not a string"),
        ({"schemaVersion": 2}, "neither manifests nor config and layers"),
        ({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": {}}, "not a list"),
    ],
)
def test_parse_manifest_rejects_invalid_descriptors(body, problem):
    with pytest.raises(RegistryError) as caught:
        parse_manifest(encode(body), "application/json", ref=REF)

    assert problem in str(caught.value)
    assert REF in str(caught.value)


def test_parse_manifest_rejects_index_platform_without_architecture():
    body = index_body()
    body["manifests"][0]["platform"] = {"os": "linux"}

    with pytest.raises(RegistryError) as caught:
        parse_manifest(encode(body), OCI_INDEX)

    assert "needs os and architecture" in str(caught.value)


def test_parse_manifest_rejects_artifact_manifest():
    body = {"mediaType": "application/vnd.oci.artifact.manifest.v1+json", "schemaVersion": 2}

    with pytest.raises(UnsupportedError) as caught:
        parse_manifest(encode(body), None, ref=REF)

    assert "not an image manifest or index" in str(caught.value)


def test_validate_image_manifest_rejects_artifacts():
    helm = manifest_body(OCI_MANIFEST, config=blob(1, "application/vnd.cncf.helm.config.v1+json"))
    odd_layer = manifest_body(OCI_MANIFEST, layers=[blob(2, "application/octet-stream")])

    for body, problem in ((helm, "not a container image"), (odd_layer, "unsupported media")):
        with pytest.raises(UnsupportedError) as caught:
            validate_image_manifest(parse_manifest(encode(body)), ref=REF)
        assert problem in str(caught.value)


def test_validate_image_manifest_accepts_images():
    body = manifest_body(OCI_MANIFEST, config=blob(1, OCI_CONFIG), layers=[blob(2, OCI_LAYER_ZSTD)])

    validate_image_manifest(parse_manifest(encode(body)), ref=REF)


def config_body(**changes) -> dict:
    body = {
        "architecture": "arm64",
        "os": "linux",
        "variant": "v8",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/w", "User": "1:1"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{5:064x}"]},
    }
    body.update(changes)
    return body


def test_parse_image_config_reads_runtime_fields():
    config = parse_image_config(encode(config_body()), ref=REF)

    assert config.diff_ids == (f"sha256:{5:064x}",)
    assert config.platform == Platform("linux", "arm64")
    assert config.env == ["PATH=/bin"]
    assert config.cmd == ["sh"]
    assert config.entrypoint == []
    assert config.working_dir == "/w"
    assert config.user == "1:1"
    assert config.raw["os"] == "linux"


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"rootfs": {"type": "other", "diff_ids": []}}, 'rootfs of type "layers"'),
        ({"rootfs": {"type": "layers"}}, "no rootfs.diff_ids"),
        ({"rootfs": {"type": "layers", "diff_ids": ["md5:1"]}}, "invalid digest"),
        ({"config": []}, '"config" field that is not an object'),
        ({"os": 1}, "os is not a string"),
    ],
)
def test_parse_image_config_rejects(changes, problem):
    with pytest.raises(RegistryError) as caught:
        parse_image_config(encode(config_body(**changes)), ref=REF, digest=DIGEST)

    assert problem in str(caught.value)
    assert DIGEST in str(caught.value)
