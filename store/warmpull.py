"""The warm-pull shortcut: one manifest request with the standard library, and no more
when the store already holds the image that the reference names.

A full pull imports aiohttp and uvloop, which costs far more than the request itself.
Docker and containerd also re-resolve a tag on every pull, so this path does the same, but
with http.client. It handles registries without auth and anonymous bearer tokens. Anything
else (credentials, redirects, errors) returns None, and the caller runs the full pull, which
then reports the error properly.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import ssl
import urllib.parse
from dataclasses import replace

from lstore.errors import InvalidArgumentError, NotFoundError
from lstore.store.digest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Digest,
)
from lstore.store.images import ImageRecord, now
from lstore.store.platform import Platform, host_platform, parse_platform
from lstore.store.reference import Reference, parse_reference
from lstore.store.registry.challenge import parse_www_authenticate
from lstore.store.registry.credentials import CredentialStore
from lstore.store.registry.settings import RegistrySettings, is_loopback, matches_registry_list
from lstore.store.registry.settings import split_host_port

log = logging.getLogger(__name__)

_ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
_TIMEOUT = 10.0
# Manifests are capped at 4 MiB by the full client too; a larger body is not read here.
_MAX_BODY = 4 << 20


class _Fallback(Exception):
    """The shortcut cannot decide; the full pull must run."""


def warm_pull(store, text: str, *, platform: str | None, settings: RegistrySettings) -> str | None:
    """Record `text` and return its name when the store already has all its content.

    Returns None when anything is missing or the registry needs more than this path does.
    """
    ref = parse_reference(text)
    requested = parse_platform(platform) if platform else host_platform()
    if not store.images():
        return None  # an empty store cannot have the image, so the request would be wasted
    try:
        if ref.digest is not None:
            # Content addressing makes the manifest certain, but only a record of the same
            # repository proves that the registry serves this digest under that name.
            record = _find_by_digest(store, ref.digest, None, requested, repository=ref.name)
        else:
            record = _find_for_tag(store, ref, requested, settings)
    except (_Fallback, OSError, http.client.HTTPException, ValueError) as exc:
        log.debug("warm pull of %s falls back to a full pull: %s", ref, exc)
        return None
    if record is None:
        return None
    if platform and not _same_platform(record.platform, requested):
        return None  # the full pull checks an explicit --platform and reports a mismatch

    name = str(ref)
    store.record_image(replace(record, name=name, pulled=now()))
    return name


def _find_for_tag(
    store, ref: Reference, requested: Platform, settings: RegistrySettings
) -> ImageRecord | None:
    if CredentialStore.load(settings.docker_config).lookup(ref.registry) is not None:
        raise _Fallback("credentials are configured for this registry")
    body, content_type = _fetch_manifest(ref, settings)
    digest = Digest("sha256:" + hashlib.sha256(body).hexdigest())
    return _find_by_digest(store, digest, (body, content_type), requested)


def _find_by_digest(
    store,
    digest: str,
    fetched: tuple[bytes, str] | None,
    requested: Platform,
    repository: str | None = None,
) -> ImageRecord | None:
    """Find a complete image whose manifest, or whose index for `requested`, is `digest`.

    With `repository`, only images recorded under that repository count.
    """
    for record in store.images():
        if repository is not None and _repository_of(record.name) != repository:
            continue
        if record.digest == digest or (
            record.index_digest == digest and _same_platform(record.platform, requested)
        ):
            return _complete(store, record)
    if fetched is not None and _is_index(*fetched):
        child = _select_child(fetched[0], requested)
        if child is None:
            return None
        return _find_by_digest(store, child, None, requested)
    return None


def _repository_of(name: str) -> str:
    return parse_reference(name).name


def _complete(store, record: ImageRecord) -> ImageRecord | None:
    for digest in record.referenced_blobs():
        if not store.content.has(Digest(digest)):
            return None
    if store.find_image(record.name) is None:
        return None
    return record


def _same_platform(recorded: str, requested: Platform) -> bool:
    try:
        return bool(recorded) and parse_platform(recorded) == requested
    except InvalidArgumentError:
        return False


def _is_index(body: bytes, content_type: str) -> bool:
    if content_type.split(";")[0].strip() in INDEX_TYPES:
        return True
    return b'"manifests"' in body


def _select_child(body: bytes, requested: Platform) -> str | None:
    from lstore.store.manifest import Index, parse_manifest
    from lstore.store.platform import select_manifest

    index = parse_manifest(body, OCI_INDEX)
    if not isinstance(index, Index):
        return None
    try:
        return select_manifest(index.manifests, requested).digest
    except NotFoundError:
        return None


def _fetch_manifest(ref: Reference, settings: RegistrySettings) -> tuple[bytes, str]:
    path = f"/v2/{ref.repository}/manifests/{urllib.parse.quote(ref.tag_or_digest)}"
    for scheme, verify in _schemes(ref.api_host, settings):
        try:
            return _get_with_token(scheme, verify, ref, path)
        except (ssl.SSLError, ConnectionResetError, http.client.BadStatusLine) as exc:
            log.debug("warm pull: %s://%s failed: %s", scheme, ref.api_host, exc)
    raise _Fallback("no scheme worked")


def _schemes(host_port: str, settings: RegistrySettings) -> list[tuple[str, bool]]:
    """Return (scheme, verify TLS) pairs to try in order, as the full client chooses them."""
    if settings.plain_http:
        return [("http", False)]
    host, port = split_host_port(host_port)
    if is_loopback(host) or matches_registry_list(host, port, settings.insecure_registries):
        return [("https", False), ("http", False)]
    return [("https", True)]


def _get_with_token(scheme: str, verify: bool, ref: Reference, path: str) -> tuple[bytes, str]:
    accept = {"Accept": _ACCEPT}
    status, headers, body = _request(scheme, verify, ref.api_host, path, accept)
    if status == 401:
        token = _anonymous_token(scheme, ref, headers)
        auth = {**accept, "Authorization": f"Bearer {token}"}
        status, headers, body = _request(scheme, verify, ref.api_host, path, auth)
    if status != 200:
        raise _Fallback(f"manifest request returned {status}")
    return body, headers.get("content-type", "")


def _anonymous_token(scheme: str, ref: Reference, headers: dict[str, str]) -> str:
    challenges = [c for c in parse_www_authenticate([headers.get("www-authenticate", "")])]
    bearer = next((c for c in challenges if c.scheme == "bearer"), None)
    if bearer is None or "realm" not in bearer.params:
        raise _Fallback("no bearer challenge")
    realm = urllib.parse.urlsplit(bearer.params["realm"])
    # Only the simple, safe case: the full client checks other realms properly.
    if realm.scheme != "https" and not (realm.scheme == "http" and scheme == "http"):
        raise _Fallback("realm scheme")
    if not realm.hostname or realm.hostname.startswith(("169.254.", "fe80:")):
        raise _Fallback("realm host")
    query = urllib.parse.parse_qsl(realm.query)
    for key in ("service", "scope"):
        if bearer.params.get(key):
            query.append((key, bearer.params[key]))
    if not bearer.params.get("scope"):
        query.append(("scope", f"repository:{ref.repository}:pull"))
    target = realm.path + "?" + urllib.parse.urlencode(query)
    status, _headers, body = _request(realm.scheme, True, realm.netloc, target, {})
    if status != 200:
        raise _Fallback(f"token request returned {status}")
    answer = json.loads(body)
    token = answer.get("token") or answer.get("access_token")
    if not token:
        raise _Fallback("token response without a token")
    return str(token)


def _request(
    scheme: str, verify: bool, host: str, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    if scheme == "https":
        if verify:
            context = ssl.create_default_context()
        else:
            # A bare context skips loading the CA bundle, which no unverified request needs.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, timeout=_TIMEOUT, context=context
        )
    else:
        connection = http.client.HTTPConnection(host, timeout=_TIMEOUT)
    try:
        connection.request("GET", path, headers={"User-Agent": "lstore/0.1", **headers})
        response = connection.getresponse()
        body = response.read(_MAX_BODY + 1)
        if len(body) > _MAX_BODY:
            raise _Fallback("manifest larger than the cap")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        connection.close()
