"""The registry client: resolve a reference to a manifest and config, and fetch blobs.

One `RegistryClient` owns one aiohttp session, so connections, the scheme chosen for each
registry and bearer tokens are shared by every request of a pull. Requests are retried for
temporary failures (connection errors, 408, 429, 5xx) with Retry-After honoured, and 401s go
through the registry's challenge once before they become an AuthError.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from lstore.store.digest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Digest,
)
from lstore.store.ingest import IngestFile
from lstore.store.manifest import (
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    parse_image_config,
    parse_manifest,
    validate_image_manifest,
)
from lstore.store.platform import Platform, host_platform, select_manifest
from lstore.store.reference import Reference
from lstore.store.registry.auth import (
    MAX_TOKEN_RESPONSE,
    RegistryAuth,
    TokenRequest,
)
from lstore.store.registry.challenge import parse_www_authenticate
from lstore.store.registry.credentials import CredentialStore, default_config_path
from lstore.store.registry.errors import (
    MAX_ERROR_BODY,
    TEMPORARY_STATUSES,
    ResponseTooLargeError,
    error_for_status,
    parse_error_body,
    redact_url,
)
from lstore.store.registry.ranges import BlobDownload, FetchTrace
from lstore.store.registry.retry import parse_retry_after
from lstore.store.registry.settings import (
    RegistrySettings,
    is_loopback,
    matches_registry_list,
)
from yarl import URL

from lstore.errors import (
    AuthError,
    IntegrityError,
    NotFoundError,
    RegistryError,
    UnsupportedError,
)

log = logging.getLogger(__name__)

USER_AGENT = "lstore/0.1"
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
# An index may point at another index (OCI image-spec image-index.md allows nesting).
MAX_INDEX_DEPTH = 4
# A request is repeated after a 401 at most this many times: once for the first challenge,
# then once more for a token refresh after error="invalid_token".
_MAX_AUTH_ROUNDS = 2
# Errors that mean the connection failed or broke before a response was complete.
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)
# Errors of a TLS attempt on a server that speaks plain HTTP, or that is not listening on TLS.
_TLS_FALLBACK_ERRORS = (
    aiohttp.ClientConnectorError,
    aiohttp.ClientOSError,
    aiohttp.ServerDisconnectedError,
)


@dataclass(frozen=True)
class ResolvedImage:
    """An image manifest chosen for one platform, with its config, verified byte for byte.

    `digest` is the digest of `manifest_bytes` exactly as received. When the reference named
    an index, `index_digest`, `index_bytes` and `index_media_type` describe that index.
    """

    ref: Reference
    digest: Digest
    media_type: str
    manifest: Manifest
    manifest_bytes: bytes = field(repr=False)
    config: ImageConfig = field(repr=False)
    config_bytes: bytes = field(repr=False)
    platform: Platform
    index_digest: Digest | None = None
    index_bytes: bytes | None = field(default=None, repr=False)
    index_media_type: str | None = None


@dataclass(frozen=True)
class _Fetched:
    """A manifest or index as received, with the platform of the index entry that led to it."""

    digest: Digest
    data: bytes
    parsed: Manifest | Index
    platform: Platform | None = None


class RegistryClient:
    """An HTTP client for OCI distribution registries.

    Create it inside a running event loop and use it as `async with RegistryClient(...)`.
    All methods may run concurrently on that loop.
    """

    def __init__(self, settings: RegistrySettings | None = None) -> None:
        asyncio.get_running_loop()  # aiohttp binds its session to the running loop
        self.settings = settings or RegistrySettings()
        self._credentials = CredentialStore.load(self.settings.docker_config)
        self._config_path = self.settings.docker_config or default_config_path()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, limit_per_host=self.settings.max_connections_per_host, ttl_dns_cache=300
            ),
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.settings.connect_timeout,
                sock_read=self.settings.read_timeout,
            ),
            headers={"User-Agent": USER_AGENT},
            # Blobs must arrive as stored: a Content-Encoding a proxy adds must not be undone.
            auto_decompress=False,
        )
        self._schemes: dict[str, str] = {}
        self._auth: dict[str, RegistryAuth] = {}

    async def __aenter__(self) -> "RegistryClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    # Public operations.

    async def resolve(
        self, ref: Reference, platform: Platform | None = None, *, strict: bool = False
    ) -> ResolvedImage:
        """Fetch the manifest for `ref` and `platform` (default: this host) and its config.

        Manifests are fetched with GET so that the body decides their type. A digest in the
        reference, an index entry's digest and size, and the config's digest and size are all
        checked against the bytes received. Raises NotFoundError when the index has no
        manifest for the platform, and RegistryError, AuthError, IntegrityError or
        UnsupportedError for the other failures.
        """
        platform = platform or host_platform()
        data, content_type = await self._get_manifest(ref, ref.tag_or_digest, ref.digest)
        digest = ref.digest or Digest.of_bytes(data)
        parsed = parse_manifest(data, content_type, ref=str(ref), digest=digest)
        top = _Fetched(digest, data, parsed)
        chosen = await self._follow_indexes(ref, top, platform)
        manifest = chosen.parsed
        assert isinstance(manifest, Manifest)  # _follow_indexes returns a manifest

        validate_image_manifest(manifest, ref=str(ref))
        config_bytes = await self.get_blob_bytes(ref, manifest.config, MAX_CONFIG_SIZE)
        config = parse_image_config(config_bytes, ref=str(ref), digest=manifest.config.digest)
        self._check_config(ref, chosen.digest, manifest, config, platform, chosen is top, strict)
        index = top if isinstance(top.parsed, Index) else None
        return ResolvedImage(
            ref=ref,
            digest=chosen.digest,
            media_type=manifest.media_type,
            manifest=manifest,
            manifest_bytes=chosen.data,
            config=config,
            config_bytes=config_bytes,
            platform=chosen.platform or config.platform,
            index_digest=index.digest if index else None,
            index_bytes=index.data if index else None,
            index_media_type=index.parsed.media_type if index else None,
        )

    async def get_blob_bytes(
        self, ref: Reference, descriptor: Descriptor, limit: int = MAX_CONFIG_SIZE
    ) -> bytes:
        """Fetch a small blob into memory and verify its size and digest.

        Raises RegistryError before fetching when the descriptor's size exceeds `limit`
        bytes, and IntegrityError when the bytes do not match the descriptor.
        """
        if descriptor.size > limit:
            raise RegistryError(
                f"blob {descriptor.digest} of {ref} is {descriptor.size} bytes, more than the "
                f"{limit} byte limit for blobs read into memory",
                ref=str(ref),
                digest=descriptor.digest,
            )
        try:
            data, _ = await self._get_small(
                ref,
                self.blob_path(ref, descriptor.digest),
                accept=None,
                limit=descriptor.size,
                action=f"GET blob {descriptor.digest} of {ref}",
                digest=descriptor.digest,
            )
        except ResponseTooLargeError as error:
            raise _size_mismatch(ref, descriptor, f"more than {descriptor.size}") from error
        if len(data) != descriptor.size:
            raise _size_mismatch(ref, descriptor, str(len(data)))
        verify_digest(data, descriptor.digest, ref=ref, what="blob")
        return data

    async def fetch_blob(
        self,
        ref: Reference,
        descriptor: Descriptor,
        ingest: IngestFile,
        progress: Callable[[int], None] | None = None,
        trace: FetchTrace | None = None,
    ) -> None:
        """Download the ranges `ingest` is missing, resuming after dropped connections.

        Blobs above the range threshold are fetched as parallel Range requests. The bytes are
        not verified here: the consumer of `ingest` computes the digest. On failure or
        cancellation `ingest.fail()` is called and the error is raised; bytes already written
        stay in the ingest file for a later resume.
        """
        download = BlobDownload(self, ref, descriptor, ingest, progress, trace)
        try:
            await download.run()
        except BaseException as error:
            ingest.fail(error)
            raise

    @staticmethod
    def blob_path(ref: Reference, digest: str) -> str:
        return f"/v2/{ref.repository}/blobs/{digest}"

    # Manifests.

    async def _get_manifest(
        self, ref: Reference, reference: str, expected: Digest | None
    ) -> tuple[bytes, str]:
        data, content_type = await self._get_small(
            ref,
            f"/v2/{ref.repository}/manifests/{reference}",
            accept=MANIFEST_ACCEPT,
            limit=MAX_MANIFEST_SIZE,
            action=f"GET manifest {reference} of {ref.name}",
            digest=expected,
        )
        if expected is not None:
            verify_digest(data, expected, ref=ref, what="manifest")
        return data, content_type

    async def _follow_indexes(
        self, ref: Reference, fetched: "_Fetched", platform: Platform
    ) -> "_Fetched":
        """Walk from an index to the manifest for `platform`; return a manifest unchanged."""
        for _ in range(MAX_INDEX_DEPTH):
            if not isinstance(fetched.parsed, Index):
                return fetched
            entry = select_manifest(fetched.parsed.manifests, platform, ref=str(ref))
            data, digest, parsed = await self._get_index_entry(ref, entry)
            fetched = _Fetched(digest, data, parsed, entry.platform or fetched.platform)
        if isinstance(fetched.parsed, Index):
            raise UnsupportedError(
                f"{ref}: indexes nested more than {MAX_INDEX_DEPTH} deep", ref=str(ref)
            )
        return fetched

    async def _get_index_entry(
        self, ref: Reference, entry: Descriptor
    ) -> tuple[bytes, Digest, Manifest | Index]:
        data, content_type = await self._get_manifest(ref, entry.digest, entry.digest)
        if len(data) != entry.size:
            raise IntegrityError(
                f"manifest {entry.digest} of {ref} is {len(data)} bytes, but the index "
                f"says {entry.size}",
                expected=str(entry.size),
                actual=str(len(data)),
                ref=str(ref),
                digest=entry.digest,
            )
        # The index entry's media type is the best hint when the header says nothing.
        hint = content_type if _is_specific(content_type) else entry.media_type
        parsed = parse_manifest(data, hint, ref=str(ref), digest=entry.digest)
        return data, entry.digest, parsed

    def _check_config(
        self,
        ref: Reference,
        digest: Digest,
        manifest: Manifest,
        config: ImageConfig,
        platform: Platform,
        direct: bool,
        strict: bool = False,
    ) -> None:
        if len(config.diff_ids) != len(manifest.layers):
            raise RegistryError(
                f"manifest {digest} of {ref} lists {len(manifest.layers)} layers but its config "
                f"lists {len(config.diff_ids)} diff_ids",
                ref=str(ref),
                digest=digest,
            )
        wrong_platform = (config.os, config.architecture) != (platform.os, platform.architecture)
        if direct and config.os and wrong_platform and strict:
            # An explicit --platform is a requirement, as for docker pull --platform.
            raise NotFoundError(
                f"image {ref} was found but does not match the requested platform: wanted "
                f"{platform}, image is {config.platform}",
                ref=str(ref),
                digest=digest,
            )
        if direct and config.os and wrong_platform:
            # A tag without an index has one platform. Docker pulls it when that differs from
            # the host's and only warns, so lstore does the same.
            log.warning(
                "image %s is for %s, not the requested platform %s",
                ref,
                config.platform,
                platform,
            )

    # Requests.

    async def _get_small(
        self,
        ref: Reference,
        path: str,
        *,
        accept: str | None,
        limit: int,
        action: str,
        digest: str | None,
    ) -> tuple[bytes, str]:
        """GET a small body, retrying the whole exchange when the body breaks off."""
        headers = {"Accept": accept} if accept else {}
        failures = 0
        while True:
            response = await self.exchange(ref, path, headers=headers, action=action, digest=digest)
            try:
                if response.status != 200:
                    raise await self.status_error(response, action, ref=ref, digest=digest)
                body = await read_capped(response, limit, action, ref=ref, digest=digest)
                return body, response.headers.get("Content-Type", "")
            except CONNECTION_ERRORS as error:
                failures += 1
                await self.pause_after_failure(failures, action, error, ref=ref)
            finally:
                response.release()

    async def exchange(
        self,
        ref: Reference,
        target: str | URL,
        *,
        headers: dict[str, str] | None = None,
        authenticate: bool = True,
        allow_redirects: bool = True,
        action: str,
        digest: str | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a GET and return the response once it is not a retryable failure.

        `target` is a path on the registry of `ref`, or an absolute URL (a blob's location
        after a redirect). With `authenticate`, the registry's auth scheme is applied and
        401 challenges are handled. The caller must release the response.
        """
        registry_auth = self._registry_auth(ref) if authenticate else None
        scope = _pull_scope(ref)
        failures = 0
        auth_rounds = 0
        while True:
            request_headers = dict(headers or {})
            sent = await registry_auth.authorization(scope) if registry_auth else None
            if sent:
                request_headers["Authorization"] = sent
            try:
                response = await self._send(ref, target, request_headers, allow_redirects)
            except CONNECTION_ERRORS as error:
                if _is_unreachable(error):
                    raise self._unreachable_error(ref, error) from error
                failures += 1
                await self.pause_after_failure(failures, action, error, ref=ref)
                continue

            if response.status == 401 and registry_auth is not None:
                may_retry = auth_rounds < _MAX_AUTH_ROUNDS
                await self._answer_challenge(response, registry_auth, sent, may_retry, ref, action)
                auth_rounds += 1
                continue

            if response.status in TEMPORARY_STATUSES:
                failures += 1
                delay = await self._temporary_status_delay(response, failures, action, ref, digest)
                await asyncio.sleep(delay)
                continue
            return response

    def _unreachable_error(self, ref: Reference, error: BaseException) -> RegistryError:
        # A refused connection or an unknown host does not heal within a retry's backoff,
        # so it fails at once, as docker and containerd do.
        schemes = " and ".join(self._candidate_schemes(ref.api_host))
        return RegistryError(
            f"cannot connect to registry {ref.api_host} for {ref} (tried {schemes}): "
            f"{_describe_error(error)}; check that the registry runs at that address",
            ref=str(ref),
            temporary=True,
        )

    async def _answer_challenge(
        self,
        response: aiohttp.ClientResponse,
        registry_auth: RegistryAuth,
        sent: str | None,
        may_retry: bool,
        ref: Reference,
        action: str,
    ) -> None:
        """Prepare new auth after a 401, or raise AuthError when repeating cannot help."""
        body = await _read_error_body(response)
        response.release()
        challenges = parse_www_authenticate(response.headers.getall("WWW-Authenticate", ()))
        scope = _pull_scope(ref)
        if may_retry and await registry_auth.handle_unauthorized(
            response.url, challenges, scope, sent
        ):
            return
        raise self._unauthorized_error(ref, registry_auth, body, action)

    async def status_error(
        self,
        response: aiohttp.ClientResponse,
        action: str,
        *,
        ref: Reference,
        digest: str | None = None,
    ) -> RegistryError:
        """Build the error for a response whose status the caller cannot use."""
        body = await _read_error_body(response)
        return error_for_status(
            response.status,
            response.reason or "",
            body,
            action=action,
            url=response.url,
            ref=str(ref),
            digest=digest,
        )

    async def pause_after_failure(
        self, failures: int, action: str, error: BaseException, *, ref: Reference
    ) -> None:
        """Sleep before the next attempt, or raise a temporary RegistryError after the last."""
        policy = self.settings.retry
        if failures >= policy.attempts:
            raise RegistryError(
                f"{action} failed after {failures} attempts: {_describe_error(error)}",
                ref=str(ref),
                temporary=True,
            ) from error
        delay = policy.backoff(failures)
        log.warning("%s failed (%s), retrying in %.1f s", action, _describe_error(error), delay)
        await asyncio.sleep(delay)

    async def _temporary_status_delay(
        self,
        response: aiohttp.ClientResponse,
        failures: int,
        action: str,
        ref: Reference,
        digest: str | None,
    ) -> float:
        """Return how long to wait after a 408/429/5xx, or raise when waiting is pointless."""
        policy = self.settings.retry
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        error = await self.status_error(response, action, ref=ref, digest=digest)
        response.release()
        if retry_after is not None and retry_after > policy.retry_after_max:
            kind = "rate limited" if response.status == 429 else "unavailable"
            codes = " ".join(code.lower() for code in error.codes) or (response.reason or "")
            raise RegistryError(
                f"{action}: {kind} ({response.status} {codes.lower()}), registry asked to "
                f"retry after {retry_after:.0f} s; try again later",
                status=response.status,
                codes=error.codes,
                ref=str(ref),
                digest=digest,
                temporary=True,
            )
        if failures >= policy.attempts:
            raise error
        delay = retry_after if retry_after is not None else policy.backoff(failures)
        log.warning("%s: %s, retrying in %.1f s", action, error.message, delay)
        return delay

    async def _send(
        self, ref: Reference, target: str | URL, headers: dict[str, str], allow_redirects: bool
    ) -> aiohttp.ClientResponse:
        if isinstance(target, URL):
            return await self._session.get(
                target, headers=headers, allow_redirects=allow_redirects, ssl=self._ssl_for(target)
            )

        host = ref.api_host
        known = self._schemes.get(host)
        schemes = [known] if known else self._candidate_schemes(host)
        for scheme in schemes:
            url = URL(f"{scheme}://{host}{target}")
            try:
                response = await self._session.get(
                    url, headers=headers, allow_redirects=allow_redirects, ssl=self._ssl_for(url)
                )
            except _TLS_FALLBACK_ERRORS as error:
                if scheme == schemes[-1]:
                    raise
                log.info("registry %s: HTTPS failed (%s), trying plain HTTP", host, error)
                continue
            self._schemes[host] = scheme
            return response
        raise AssertionError("unreachable: the loop returns or raises")

    def _candidate_schemes(self, host: str) -> list[str]:
        if self.settings.plain_http:
            return ["http"]
        if self._is_insecure(URL(f"https://{host}")):
            return ["https", "http"]
        return ["https"]

    def _ssl_for(self, url: URL) -> bool:
        """Return aiohttp's `ssl` argument: False skips certificate checks."""
        return url.scheme != "https" or not self._is_insecure(url)

    def _is_insecure(self, url: URL) -> bool:
        host = url.host or ""
        port = url.explicit_port
        return is_loopback(host) or matches_registry_list(
            host, port, self.settings.insecure_registries
        )

    def _registry_auth(self, ref: Reference) -> RegistryAuth:
        registry_auth = self._auth.get(ref.registry)
        if registry_auth is None:
            registry_auth = RegistryAuth(
                ref.registry,
                ref.api_host,
                self._credentials.lookup(ref.registry),
                self._token_request(ref),
                trusted_realm_hosts=self.settings.trusted_realm_hosts,
            )
            self._auth[ref.registry] = registry_auth
        return registry_auth

    def _token_request(self, ref: Reference) -> TokenRequest:
        async def request(
            url: URL, headers: dict[str, str], allow_redirects: bool
        ) -> tuple[int, str, bytes]:
            return await self._request_token(ref, url, headers, allow_redirects)

        return request

    async def _request_token(
        self, ref: Reference, url: URL, headers: dict[str, str], allow_redirects: bool
    ) -> tuple[int, str, bytes]:
        """GET a token URL with retries; return status, reason and body (capped)."""
        action = f"token request for {ref.registry} to {redact_url(url)}"
        response = await self.exchange(
            ref,
            url,
            headers=headers,
            authenticate=False,
            allow_redirects=allow_redirects,
            action=action,
        )
        try:
            body = await read_capped(response, MAX_TOKEN_RESPONSE, action, ref=ref)
        finally:
            response.release()
        return response.status, response.reason or "", body

    def _unauthorized_error(
        self, ref: Reference, registry_auth: RegistryAuth, body: bytes, action: str
    ) -> AuthError:
        codes, detail = parse_error_body(body)
        reason = f"401 {', '.join(codes)}".strip() if codes else "401 Unauthorized"
        if registry_auth.credentials is None:
            advice = (
                f"registry {ref.registry} requires authentication for {ref.repository} "
                f"({reason}): add credentials for {ref.registry} to {self._config_path} "
                f"(docker login {ref.registry}), or check that the repository exists"
            )
        else:
            advice = (
                f"registry {ref.registry} denied access to {ref.repository} with the "
                f"credentials from {self._config_path} ({reason}): check that the repository "
                "exists and that the account may pull it"
            )
        return AuthError(f"{action}: {advice}", status=401, codes=codes, ref=str(ref))


def _pull_scope(ref: Reference) -> str:
    # Token scope grammar of the distribution token spec: resource type, name, actions.
    return f"repository:{ref.repository}:pull"


def verify_digest(data: bytes, expected: Digest, *, ref: Reference, what: str) -> None:
    """Raise IntegrityError unless `data` hashes to `expected`."""
    hasher = expected.new_hash()
    hasher.update(data)
    actual = Digest.from_hash(hasher)
    if actual != expected:
        raise IntegrityError(
            f"{what} {expected} of {ref} hashes to {actual}; the registry or a proxy sent "
            "wrong content",
            expected=expected,
            actual=actual,
            ref=str(ref),
            digest=expected,
        )


async def read_capped(
    response: aiohttp.ClientResponse,
    limit: int,
    action: str,
    *,
    ref: Reference,
    digest: str | None = None,
) -> bytes:
    """Read a whole body, raising ResponseTooLargeError as soon as it exceeds `limit` bytes."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise _too_large(action, limit, ref, digest)
    chunks: list[bytes] = []
    received = 0
    async for chunk in response.content.iter_chunked(1 << 20):
        received += len(chunk)
        if received > limit:
            raise _too_large(action, limit, ref, digest)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(
    action: str, limit: int, ref: Reference, digest: str | None
) -> ResponseTooLargeError:
    return ResponseTooLargeError(
        f"{action}: response is larger than the {limit} byte limit", ref=str(ref), digest=digest
    )


def _size_mismatch(ref: Reference, descriptor: Descriptor, sent: str) -> IntegrityError:
    return IntegrityError(
        f"blob {descriptor.digest} of {ref}: registry sent {sent} bytes where the descriptor "
        f"says {descriptor.size}",
        expected=str(descriptor.size),
        actual=sent,
        ref=str(ref),
        digest=descriptor.digest,
    )


async def _read_error_body(response: aiohttp.ClientResponse) -> bytes:
    try:
        return await response.content.read(MAX_ERROR_BODY)
    except CONNECTION_ERRORS:
        return b""


def _describe_error(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return " ".join(text.split())


def _is_specific(content_type: str) -> bool:
    bare = content_type.split(";", 1)[0].strip().lower()
    return bare not in ("", "text/plain", "application/json", "application/octet-stream")


def _is_unreachable(error: BaseException) -> bool:
    """Tell whether a connection error is a refused connection or a failed name lookup."""
    if not isinstance(error, aiohttp.ClientConnectorError):
        return False
    cause = error.os_error
    if isinstance(cause, socket.gaierror):
        return True
    return cause.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)
