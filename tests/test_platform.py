"""Platform normalisation and the choice of a manifest from an index."""

import json
import os

import pytest

from lstore.errors import InvalidArgumentError, NotFoundError
from lstore.store.digest import OCI_INDEX, OCI_MANIFEST
from lstore.store.manifest import parse_manifest
from lstore.store.platform import Platform, host_platform, parse_platform, select_manifest


def entry(number: int, platform: dict | None, annotations: dict | None = None) -> dict:
    descriptor = {"mediaType": OCI_MANIFEST, "digest": f"sha256:{number:064x}", "size": 500}
    if platform is not None:
        descriptor["platform"] = platform
    if annotations:
        descriptor["annotations"] = annotations
    return descriptor


def make_index(*entries: dict) -> list:
    body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": list(entries)}
    return list(parse_manifest(json.dumps(body).encode()).manifests)


AMD64 = entry(1, {"os": "linux", "architecture": "amd64"})
ARM_V5 = entry(2, {"os": "linux", "architecture": "arm", "variant": "v5"})
ARM_V7 = entry(3, {"os": "linux", "architecture": "arm", "variant": "v7"})
ARM64 = entry(4, {"os": "linux", "architecture": "arm64"})
ARM_V6 = entry(5, {"os": "linux", "architecture": "arm", "variant": "v6"})
WINDOWS = entry(6, {"os": "windows", "architecture": "amd64", "os.version": "10.0.17763.1"})
ATTESTATION = entry(
    7,
    {"os": "unknown", "architecture": "unknown"},
    {"vnd.docker.reference.type": "attestation-manifest"},
)

FULL_INDEX = make_index(AMD64, ARM_V5, ARM_V7, ARM64, ARM_V6, WINDOWS, ATTESTATION)
INDEX_WITHOUT_V7 = make_index(AMD64, ARM_V5, ARM64, ARM_V6, WINDOWS, ATTESTATION)


@pytest.mark.parametrize(
    "request_text, expected_number",
    [
        ("linux/arm/v7", 3),
        ("linux/arm", 3),
        ("linux/arm64/v8", 4),
        ("linux/arm64", 4),
        ("linux/arm/v6", 5),
        ("linux/arm/v5", 2),
        ("linux/amd64", 1),
        ("linux/x86_64", 1),
        ("linux/aarch64", 4),
    ],
)
def test_select_manifest_full_index(request_text, expected_number):
    chosen = select_manifest(FULL_INDEX, parse_platform(request_text))

    assert chosen.digest == f"sha256:{expected_number:064x}"


def test_select_manifest_rejects_missing_platform():
    with pytest.raises(NotFoundError) as caught:
        select_manifest(FULL_INDEX, parse_platform("linux/386"), ref="example.com/app:1")

    message = str(caught.value)
    assert "linux/386" in message
    assert "example.com/app:1" in message
    assert "linux/amd64, linux/arm/v5, linux/arm/v7, linux/arm64, linux/arm/v6" in message
    assert "windows/amd64 10.0.17763.1" in message
    assert "unknown" not in message


@pytest.mark.parametrize(
    "request_text, expected_number",
    [("linux/arm/v7", 5), ("linux/arm", 5), ("linux/arm/v6", 5), ("linux/arm/v5", 2)],
)
def test_select_manifest_falls_back_to_lower_variant(request_text, expected_number):
    chosen = select_manifest(INDEX_WITHOUT_V7, parse_platform(request_text))

    assert chosen.digest == f"sha256:{expected_number:064x}"


def test_select_manifest_never_takes_higher_variant():
    index = make_index(ARM_V7, ARM64)

    with pytest.raises(NotFoundError):
        select_manifest(index, parse_platform("linux/arm/v6"))


def test_select_manifest_never_takes_windows_or_attestation():
    with pytest.raises(NotFoundError):
        select_manifest(make_index(WINDOWS), parse_platform("windows/amd64"))
    with pytest.raises(NotFoundError):
        select_manifest(make_index(ATTESTATION), Platform("unknown", "unknown"))


@pytest.mark.parametrize("text", ["junk", "linux/junk", "plan10/amd64", "unknown/unknown"])
def test_parse_platform_rejects_unknown_names(text):
    with pytest.raises(InvalidArgumentError) as caught:
        parse_platform(text)

    assert repr(text) in str(caught.value)


def test_select_manifest_skips_unknown_platform_without_annotation():
    bare_attestation = entry(8, {"os": "unknown", "architecture": "unknown"})

    with pytest.raises(NotFoundError):
        select_manifest(make_index(bare_attestation), parse_platform("linux/amd64"))


def test_select_manifest_takes_entry_without_platform_last():
    unlabelled = entry(9, None)

    assert (
        select_manifest(make_index(unlabelled, AMD64), parse_platform("linux/amd64"))
        == (make_index(AMD64)[0])
    )
    chosen = select_manifest(make_index(unlabelled, ARM64), parse_platform("linux/amd64"))
    assert chosen.digest == f"sha256:{9:064x}"


def test_select_manifest_prefers_first_of_equals():
    second_amd64 = entry(10, {"os": "linux", "architecture": "x86_64"})

    chosen = select_manifest(make_index(AMD64, second_amd64), parse_platform("linux/amd64"))

    assert chosen.digest == f"sha256:{1:064x}"


def test_select_manifest_amd64_microarchitecture_levels():
    v2 = entry(11, {"os": "linux", "architecture": "amd64", "variant": "v2"})
    v3 = entry(12, {"os": "linux", "architecture": "amd64", "variant": "v3"})
    index = make_index(AMD64, v2, v3)

    assert select_manifest(index, parse_platform("linux/amd64/v3")).digest.endswith("c")
    assert select_manifest(index, parse_platform("linux/amd64/v2")).digest.endswith("b")
    assert select_manifest(index, parse_platform("linux/amd64")).digest.endswith("1")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("linux/amd64", Platform("linux", "amd64")),
        ("linux/x86_64", Platform("linux", "amd64")),
        ("linux/amd64/v1", Platform("linux", "amd64")),
        ("Linux/AMD64", Platform("linux", "amd64")),
        ("linux/aarch64", Platform("linux", "arm64")),
        ("linux/arm64/v8", Platform("linux", "arm64")),
        ("linux/arm64/8", Platform("linux", "arm64")),
        ("linux/arm", Platform("linux", "arm", "v7")),
        ("linux/armhf", Platform("linux", "arm", "v7")),
        ("linux/armel", Platform("linux", "arm", "v6")),
        ("linux/arm/6", Platform("linux", "arm", "v6")),
        ("linux/i686", Platform("linux", "386")),
        ("linux/riscv64", Platform("linux", "riscv64")),
        ("macos/arm64", Platform("darwin", "arm64")),
    ],
)
def test_parse_platform_normalises(text, expected):
    assert parse_platform(text) == expected


def test_platform_constructor_normalises():
    assert Platform("linux", "aarch64", "v8") == Platform("linux", "arm64")
    assert Platform("linux", "arm").variant == "v7"
    assert str(Platform("linux", "arm")) == "linux/arm/v7"


def test_parse_platform_lone_architecture_uses_host_os():
    assert parse_platform("arm64") == Platform(host_platform().os, "arm64")


def test_parse_platform_lone_os_uses_host_architecture():
    host = host_platform()

    assert parse_platform("linux") == Platform("linux", host.architecture, host.variant)


@pytest.mark.parametrize("text", ["", "linux/", "/amd64", "linux/arm/v7/extra", "linux//v7"])
def test_parse_platform_rejects(text):
    with pytest.raises(InvalidArgumentError) as caught:
        parse_platform(text)

    assert repr(text) in str(caught.value)
    assert "os/architecture[/variant]" in str(caught.value)


def test_host_platform_follows_uname():
    machine = os.uname().machine
    expected = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine)

    host = host_platform()

    assert host.os == "linux"
    if expected is not None:
        assert host.architecture == expected
        assert host.variant == ""
