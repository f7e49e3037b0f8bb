"""Image references (`busybox`, `ghcr.io/org/app:1.2`, `name@sha256:...`) as docker parses them.

The grammar is the one of the distribution project's `reference` package:

    reference  := name [":" tag] ["@" digest]
    name       := [domain "/"] path
    domain     := host [":" port]
    path       := component ("/" component)*, lowercase letters and digits joined by
                  ".", "_", "__" or runs of "-"
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}

Normalisation follows docker: the first path component is a registry only when it contains
"." or ":", is `localhost`, or has uppercase letters. Otherwise the registry is docker.io, and
one-component names on docker.io live under `library/`. A reference with neither tag nor
digest gets the tag `latest`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NoReturn

from lstore.errors import InvalidArgumentError, InvalidReferenceError
from lstore.store.digest import Digest

DOCKER_HUB = "docker.io"
# Docker Hub serves the registry API on a different host than its name.
DOCKER_HUB_API_HOST = "registry-1.docker.io"
# Older clients name Docker Hub this way, and docker normalises it to docker.io.
_DOCKER_HUB_LEGACY = "index.docker.io"
DEFAULT_TAG = "latest"

# Distribution's reference package rejects full names longer than this.
MAX_NAME_LENGTH = 255

_EXPECTED_FORM = "expected [registry[:port]/]repository[:tag][@sha256:<64 hex digits>]"

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:.]+\])"
_DOMAIN = re.compile(rf"{_HOST}(?::[0-9]+)?")
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_HEX64 = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class Reference:
    """A parsed, normalised image reference.

    `tag` and `digest` may both be set (`name:tag@sha256:...`). The digest then decides what
    is pulled, and the tag is kept for the image's name.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text

    @property
    def name(self) -> str:
        """The repository with its registry, such as `docker.io/library/busybox`."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host (and port) that serves the registry API for this reference."""
        if self.registry == DOCKER_HUB:
            return DOCKER_HUB_API_HOST
        return self.registry

    @property
    def tag_or_digest(self) -> str:
        """The `<reference>` part of a manifest URL: the digest when present, else the tag."""
        if self.digest:
            return self.digest
        return self.tag or DEFAULT_TAG

    def familiar(self) -> str:
        """Return the short form docker shows, such as `busybox:latest` or `org/app@sha256:...`."""
        name = self.name
        if self.registry == DOCKER_HUB:
            name = self.repository.removeprefix("library/")
            if "/" in name:
                name = self.repository
        text = name
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text

    def with_digest(self, digest: Digest) -> "Reference":
        """Return this reference pinned to `digest`, keeping its tag."""
        return Reference(self.registry, self.repository, self.tag, digest)


def parse_reference(text: str) -> Reference:
    """Parse and normalise an image reference, raising InvalidReferenceError if it is invalid."""
    name, digest = _split_digest(text)
    name, tag = _split_tag(text, name)
    registry, repository = _split_registry(name)

    _validate_registry(text, registry)
    _validate_repository(text, repository, name)
    if tag is not None and not _TAG.fullmatch(tag):
        _fail(text, f"invalid tag {tag!r}")
    if len(f"{registry}/{repository}") > MAX_NAME_LENGTH:
        _fail(text, f"name longer than {MAX_NAME_LENGTH} characters")

    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, repository, tag, digest)


def _fail(text: str, reason: str) -> NoReturn:
    raise InvalidReferenceError(f"invalid reference {text!r}: {reason}; {_EXPECTED_FORM}", ref=text)


def _split_digest(text: str) -> tuple[str, Digest | None]:
    name, separator, digest_text = text.partition("@")
    if not name:
        _fail(text, "empty name")
    if not separator:
        return name, None
    try:
        return name, Digest(digest_text)
    except InvalidArgumentError as error:
        raise InvalidReferenceError(
            f"invalid reference {text!r}: invalid digest {digest_text!r}; {_EXPECTED_FORM}",
            ref=text,
        ) from error


def _split_tag(text: str, name: str) -> tuple[str, str | None]:
    # A ":" after the last "/" starts the tag, and one before it belongs to a registry port.
    colon = name.rfind(":")
    if colon <= name.rfind("/"):
        return name, None
    if colon == len(name) - 1:
        _fail(text, "empty tag")
    if colon == 0 or name[colon - 1] == "/":
        _fail(text, "missing repository name before the tag")
    return name[:colon], name[colon + 1 :]


def _split_registry(name: str) -> tuple[str, str]:
    first, separator, rest = name.partition("/")
    is_registry = "." in first or ":" in first or first == "localhost" or first != first.lower()
    if not separator or not is_registry:
        registry, repository = DOCKER_HUB, name
    else:
        registry, repository = first, rest

    if registry == _DOCKER_HUB_LEGACY:
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repository:
        repository = "library/" + repository
    return registry, repository


def _validate_registry(text: str, registry: str) -> None:
    if not _DOMAIN.fullmatch(registry):
        _fail(text, f"invalid registry {registry!r}")


def _validate_repository(text: str, repository: str, name: str) -> None:
    if not name.strip():
        _fail(text, "missing repository name")
    if _PATH.fullmatch(repository):
        # Docker rejects a bare 64-hex name because it reads like an image ID.
        if _HEX64.fullmatch(name):
            _fail(text, "a 64-character hex string is an image ID, not a repository name")
        return
    if _PATH.fullmatch(repository.lower()):
        _fail(text, "repository name must be lowercase")
    _fail(text, f"invalid repository name {repository!r}")
