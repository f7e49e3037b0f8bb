"""Registry credentials from docker's config.json (`auths`), as written by `docker login`.

Docker keys Docker Hub as `https://index.docker.io/v1/`. Other registries appear as `host`,
`host:port` or with a scheme and path, so keys are reduced to the bare host before lookup.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from dataclasses import dataclass, field

from lstore.errors import InvalidArgumentError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or personal access token) for one registry."""

    username: str
    password: str = field(repr=False)


def default_config_path() -> str:
    """Return the config.json that docker reads: $DOCKER_CONFIG, else ~/.docker."""
    directory = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(directory, CONFIG_FILE)


def registry_key(text: str) -> str:
    """Reduce a config.json key or registry name to the lowercase host[:port] used for lookup."""
    host = text.strip().lower()
    for scheme in ("https://", "http://"):
        host = host.removeprefix(scheme)
    host = host.split("/", 1)[0]
    if host in _DOCKER_HUB_ALIASES:
        return "docker.io"
    return host


class CredentialStore:
    """The credentials of a docker config.json, by registry. Read once, immutable afterwards."""

    def __init__(
        self,
        entries: dict[str, Credentials],
        helpers: dict[str, str] | None = None,
        default_helper: str | None = None,
    ) -> None:
        self._entries = entries
        self._helpers = helpers or {}
        self._default_helper = default_helper
        self._warned: set[str] = set()

    @classmethod
    def load(cls, path: str | None = None) -> "CredentialStore":
        """Read `path` (default: docker's config.json). A missing file means no credentials.

        Raise InvalidArgumentError naming the file when it is not valid JSON or has an
        `auth` value that is not base64 of `user:password`.
        """
        path = path or default_config_path()
        try:
            with open(path, "rb") as handle:
                document = json.load(handle)
        except FileNotFoundError:
            return cls({})
        except (ValueError, UnicodeDecodeError) as error:
            raise InvalidArgumentError(
                f"docker config {path} is not valid JSON ({error}); fix or remove it",
                path=path,
            ) from error
        if not isinstance(document, dict):
            raise InvalidArgumentError(f"docker config {path} is not a JSON object", path=path)
        return cls(
            _read_auths(document, path),
            _read_helpers(document),
            _read_default_helper(document),
        )

    def lookup(self, registry: str) -> Credentials | None:
        """Return the credentials stored for `registry` (a reference's registry), if any."""
        key = registry_key(registry)
        found = self._entries.get(key)
        helper = self._helpers.get(key, self._default_helper)
        if found is None and helper and key not in self._warned:
            # NOTE: credential helpers (credsStore, credHelpers) are not run. Only inline
            # `auths` entries are used.
            self._warned.add(key)
            log.warning(
                "docker config names credential helper %r for %s, which lstore does not run; "
                "pulling anonymously",
                helper,
                key,
            )
        return found


def _read_auths(document: dict, path: str) -> dict[str, Credentials]:
    auths = document.get("auths", {})
    if auths is None:
        return {}
    if not isinstance(auths, dict):
        raise InvalidArgumentError(f"docker config {path}: auths is not an object", path=path)

    entries: dict[str, Credentials] = {}
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            continue
        credentials = _entry_credentials(entry, key, path)
        if credentials is not None:
            entries.setdefault(registry_key(key), credentials)
    return entries


def _entry_credentials(entry: dict, key: str, path: str) -> Credentials | None:
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        return _decode_auth(encoded, key, path)
    username = entry.get("username")
    password = entry.get("password")
    if isinstance(username, str) and isinstance(password, str) and username:
        return Credentials(username, password)
    return None


def _decode_auth(encoded: str, key: str, path: str) -> Credentials:
    try:
        text = base64.b64decode(encoded, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as error:
        raise InvalidArgumentError(
            f"docker config {path}: auth for {key!r} is not valid base64; run docker login again",
            path=path,
        ) from error
    username, separator, password = text.partition(":")
    if not separator or not username:
        raise InvalidArgumentError(
            f"docker config {path}: auth for {key!r} is not of the form user:password",
            path=path,
        )
    return Credentials(username, password)


def _read_helpers(document: dict) -> dict[str, str]:
    helpers: dict[str, str] = {}
    per_registry = document.get("credHelpers")
    if isinstance(per_registry, dict):
        for key, helper in per_registry.items():
            helpers[registry_key(key)] = str(helper)
    return helpers


def _read_default_helper(document: dict) -> str | None:
    default = document.get("credsStore")
    return default if isinstance(default, str) and default else None
