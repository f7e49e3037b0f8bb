"""Image reference parsing and normalisation, compared with what docker does."""

import pytest

from lstore.errors import InvalidReferenceError
from lstore.store.reference import Reference, parse_reference

DIGEST = "sha256:" + "ab" * 32

VALID = [
    # input, registry, repository, tag, digest
    ("busybox", "docker.io", "library/busybox", "latest", None),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
    ("library/busybox", "docker.io", "library/busybox", "latest", None),
    ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
    ("index.docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
    ("org/app", "docker.io", "org/app", "latest", None),
    ("ghcr.io/org/team/app:v1.2.3", "ghcr.io", "org/team/app", "v1.2.3", None),
    ("registry.example.com:5000/app", "registry.example.com:5000", "app", "latest", None),
    ("localhost/app", "localhost", "app", "latest", None),
    ("localhost:5000/app:dev", "localhost:5000", "app", "dev", None),
    ("127.0.0.1:5000/a/b", "127.0.0.1:5000", "a/b", "latest", None),
    ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
    ("Registry/app", "Registry", "app", "latest", None),
    ("app@" + DIGEST, "docker.io", "library/app", None, DIGEST),
    ("app:1@" + DIGEST, "docker.io", "library/app", "1", DIGEST),
    ("host:5000/app:1@" + DIGEST, "host:5000", "app", "1", DIGEST),
    ("a_b__c-d---e/f.g", "docker.io", "a_b__c-d---e/f.g", "latest", None),
    ("app:_Tag.1-x", "docker.io", "library/app", "_Tag.1-x", None),
]


@pytest.mark.parametrize("text, registry, repository, tag, digest", VALID)
def test_parse_reference_normalises(text, registry, repository, tag, digest):
    ref = parse_reference(text)

    assert ref.registry == registry
    assert ref.repository == repository
    assert ref.tag == tag
    assert ref.digest == digest


INVALID = [
    # input, part of the reason
    ("", "empty name"),
    ("Busybox", "must be lowercase"),
    ("org/App", "must be lowercase"),
    ("app:", "empty tag"),
    ("app:bad/tag", "invalid"),
    ("app:" + "t" * 129, "invalid tag"),
    ("app:-dash", "invalid tag"),
    ("app@sha256:1234", "invalid digest"),
    ("app@md5:" + "0" * 32, "invalid digest"),
    ("app@", "invalid digest"),
    ("a" * 64, "image ID"),
    ("app//x", "invalid repository name"),
    ("app-/x", "invalid repository name"),
    ("-host.io/app", "invalid registry"),
    ("x y", "invalid repository name"),
    ("host.io/" + "a" * 250, "longer than 255"),
    (":tag", "missing repository name before the tag"),
    ("host:5000/:tag", "missing repository name before the tag"),
    (" ", "missing repository name"),
]


@pytest.mark.parametrize("text, reason", INVALID)
def test_parse_reference_rejects(text, reason):
    with pytest.raises(InvalidReferenceError) as caught:
        parse_reference(text)

    message = str(caught.value)
    assert reason in message
    assert repr(text) in message
    assert "expected [registry[:port]/]repository[:tag]" in message
    assert "\n" not in message
    assert caught.value.ref == text


CANONICAL = [
    # input, str(ref), ref.name, ref.familiar(), ref.api_host
    (
        "busybox",
        "docker.io/library/busybox:latest",
        "docker.io/library/busybox",
        "busybox:latest",
        "registry-1.docker.io",
    ),
    ("org/app:1", "docker.io/org/app:1", "docker.io/org/app", "org/app:1", "registry-1.docker.io"),
    (
        "library/a/b",
        "docker.io/library/a/b:latest",
        "docker.io/library/a/b",
        "library/a/b:latest",
        "registry-1.docker.io",
    ),
    (
        "localhost:5000/app@" + DIGEST,
        "localhost:5000/app@" + DIGEST,
        "localhost:5000/app",
        "localhost:5000/app@" + DIGEST,
        "localhost:5000",
    ),
    (
        "quay.io/org/app:2@" + DIGEST,
        "quay.io/org/app:2@" + DIGEST,
        "quay.io/org/app",
        "quay.io/org/app:2@" + DIGEST,
        "quay.io",
    ),
]


@pytest.mark.parametrize("text, canonical, name, familiar, api_host", CANONICAL)
def test_reference_forms(text, canonical, name, familiar, api_host):
    ref = parse_reference(text)

    assert str(ref) == canonical
    assert ref.name == name
    assert ref.familiar() == familiar
    assert ref.api_host == api_host


def test_canonical_form_parses_back_to_same_reference():
    for text, *_ in VALID:
        ref = parse_reference(text)
        assert parse_reference(str(ref)) == ref


def test_tag_or_digest_prefers_digest():
    assert parse_reference("app:1").tag_or_digest == "1"
    assert parse_reference("app:1@" + DIGEST).tag_or_digest == DIGEST


def test_with_digest_keeps_tag():
    ref = parse_reference("app:1").with_digest(DIGEST)

    assert ref == Reference("docker.io", "library/app", "1", DIGEST)
