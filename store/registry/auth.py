"""Registry authentication: WWW-Authenticate challenges, bearer tokens and Basic auth.

The bearer flow is docker's token protocol (distribution docs, "Token Authentication
Specification"): a 401 names a token server (`realm`), the client fetches a token for the
repository scope there, with Basic credentials when it has some, and sends it as
`Authorization: Bearer <token>`. Tokens and credentials are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from yarl import URL

from lstore.errors import AuthError
from lstore.store.registry.challenge import Challenge
from lstore.store.registry.credentials import Credentials
from lstore.store.registry.errors import error_for_status, redact_url

log = logging.getLogger(__name__)

# The token spec's default lifetime when the server sends no expires_in.
DEFAULT_TOKEN_LIFETIME = 60.0
# A token is renewed after this fraction of its lifetime, so it does not expire in flight.
_RENEW_AFTER_FRACTION = 0.9
# Token responses are small JSON documents, so a larger body is not from a token server.
MAX_TOKEN_RESPONSE = 1 << 20

# Cloud metadata services live on link-local addresses. A realm there would leak credentials
# or tokens to the host's metadata endpoint.
_LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
# Second-level labels under which anyone can register a domain (example.co.uk), so a parent
# domain made of one of these and a country code is never trusted as a registry's own domain.
# NOTE: a heuristic, not the public suffix list.
_SHARED_SECOND_LEVEL = frozenset({"ac", "co", "com", "edu", "gov", "net", "org"})

# (url, headers, allow_redirects) -> (status, reason, body), with retries already applied.
TokenRequest = Callable[[URL, dict[str, str], bool], Awaitable[tuple[int, str, bytes]]]


@dataclass(frozen=True)
class Token:
    """A bearer token and the monotonic time after which it is renewed."""

    value: str = field(repr=False)
    renew_at: float


def basic_authorization(credentials: Credentials) -> str:
    """Return the Authorization header value for HTTP Basic auth (RFC 7617)."""
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode()


def check_realm(realm: str, registry_url: URL, *, registry: str) -> URL:
    """Return the realm as a URL, or raise AuthError if fetching a token there is unsafe.

    Unsafe means: not http(s), http for a registry reached over https (a downgrade that
    exposes credentials and tokens), or a link-local address such as a cloud metadata service.
    """
    url = URL(realm)
    if url.scheme not in ("http", "https") or not url.host:
        raise _realm_error(registry, realm, "is not an http or https URL")
    if registry_url.scheme == "https" and url.scheme == "http":
        raise _realm_error(registry, realm, "is plain http for a registry reached over https")

    try:
        address = ipaddress.ip_address(url.host)
    except ValueError:
        return url
    if any(address in network for network in _LINK_LOCAL):
        raise _realm_error(registry, realm, "is a link-local address")
    return url


def _realm_error(registry: str, realm: str, problem: str) -> AuthError:
    return AuthError(
        f"registry {registry} sent token server {redact_url(realm)}, which {problem}; "
        "lstore does not fetch tokens there",
        ref=registry,
    )


def may_send_credentials(realm_host: str, registry_host: str, trusted: Iterable[str]) -> bool:
    """Tell whether the registry's credentials may go to a token server at `realm_host`.

    Allowed: the registry's own host, a host under the registry's own domain (auth.docker.io
    for registry-1.docker.io), or a host listed as trusted. Ports are ignored.
    """
    realm_host = realm_host.lower()
    registry_host = _strip_port(registry_host).lower()
    if realm_host == registry_host or realm_host in {_strip_port(t).lower() for t in trusted}:
        return True
    domain = _own_domain(registry_host)
    return domain is not None and (realm_host == domain or realm_host.endswith("." + domain))


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.index("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _own_domain(host: str) -> str | None:
    """Return the domain a registry host belongs to: its parent for hosts of 3+ labels."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    labels = host.split(".")
    if len(labels) < 3:
        return host
    parent = labels[1:]
    if len(parent) == 2 and parent[0] in _SHARED_SECOND_LEVEL and len(parent[1]) == 2:
        return host
    return ".".join(parent)


class RegistryAuth:
    """The authentication state of one registry for one client: its scheme and tokens.

    Safe for concurrent use by tasks of one event loop. Each scope's token is fetched by one
    task while the others wait, and it is reused until it is due for renewal.
    """

    def __init__(
        self,
        registry: str,
        api_host: str,
        credentials: Credentials | None,
        request_token: TokenRequest,
        *,
        trusted_realm_hosts: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.api_host = api_host
        self.credentials = credentials
        self._request_token = request_token
        self._trusted = tuple(trusted_realm_hosts)
        self._clock = clock
        self.scheme: str | None = None
        self._challenge: Challenge | None = None
        self._registry_url = URL(f"https://{api_host}/")
        self._tokens: dict[str, Token] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._warned_untrusted = False

    async def authorization(self, scope: str) -> str | None:
        """Return the Authorization value for a request in `scope`, once a challenge is known."""
        if self.scheme == "basic" and self.credentials is not None:
            return basic_authorization(self.credentials)
        if self.scheme != "bearer":
            return None
        token = await self._token(scope, stale=None)
        return "Bearer " + token.value

    async def handle_unauthorized(
        self, request_url: URL, challenges: list[Challenge], scope: str, sent: str | None
    ) -> bool:
        """Learn from a 401 and return True when the request should be repeated with new auth.

        `sent` is the Authorization value the rejected request carried. A bearer token is
        replaced only when the registry reports it as invalid (error="invalid_token"), because
        any other 401 to a fresh token means access is denied.
        """
        bearer = _first(challenges, "bearer")
        basic = _first(challenges, "basic")
        if bearer is not None:
            return await self._handle_bearer(request_url, bearer, scope, sent)
        if basic is not None and self.credentials is not None:
            if sent is not None and sent.startswith("Basic "):
                return False
            self.scheme = "basic"
            return True
        return False

    async def _handle_bearer(
        self, request_url: URL, challenge: Challenge, scope: str, sent: str | None
    ) -> bool:
        stale = None
        if sent is not None and sent.startswith("Bearer "):
            if challenge.params.get("error") != "invalid_token":
                return False
            stale = sent.removeprefix("Bearer ")
            log.info("registry %s rejected a token as invalid; fetching a new one", self.registry)

        self._challenge = challenge
        self._registry_url = request_url
        self.scheme = "bearer"
        await self._token(scope, stale=stale, challenge_scope=challenge.params.get("scope"))
        return True

    async def _token(
        self, scope: str, *, stale: str | None, challenge_scope: str | None = None
    ) -> Token:
        """Return a usable token for `scope`, fetching one if none is cached or it is `stale`."""
        lock = self._locks.setdefault(scope, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(scope)
            usable = cached is not None and cached.renew_at > self._clock()
            if usable and cached.value != stale:
                return cached
            token = await self._fetch_token(scope, challenge_scope)
            self._tokens[scope] = token
            return token

    async def _fetch_token(self, scope: str, challenge_scope: str | None) -> Token:
        assert self._challenge is not None  # set before the scheme becomes "bearer"
        realm = self._challenge.params.get("realm", "")
        if not realm:
            raise AuthError(
                f"registry {self.registry} sent a bearer challenge without a realm",
                ref=self.registry,
            )
        url = check_realm(realm, self._registry_url, registry=self.registry)
        url = url.extend_query(self._token_query(scope, challenge_scope))
        headers = self._token_headers(url)

        received = self._clock()
        status, reason, body = await self._request_token(url, headers, not headers)
        if status != 200:
            raise self._token_error(status, reason, body, url, bool(headers))
        return self._parse_token(body, url, received)

    def _token_query(self, scope: str, challenge_scope: str | None) -> list[tuple[str, str]]:
        # Parameters absent from the challenge are left out rather than sent empty.
        query: list[tuple[str, str]] = []
        service = self._challenge.params.get("service") if self._challenge else None
        if service:
            query.append(("service", service))
        query.append(("scope", scope))
        if challenge_scope and challenge_scope != scope:
            query.append(("scope", challenge_scope))
        return query

    def _token_headers(self, url: URL) -> dict[str, str]:
        if self.credentials is None:
            return {}
        if may_send_credentials(url.host or "", self.api_host, self._trusted):
            return {"Authorization": basic_authorization(self.credentials)}
        if not self._warned_untrusted:
            self._warned_untrusted = True
            log.warning(
                "not sending credentials for %s to token server %s on another domain; "
                "add that host to the trusted realm hosts if it belongs to the registry",
                self.registry,
                url.host,
            )
        return {}

    def _parse_token(self, body: bytes, url: URL, received: float) -> Token:
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            document = None
        if not isinstance(document, dict):
            raise AuthError(
                f"token server {redact_url(url)} for {self.registry} returned a body that is "
                "not a JSON object",
                ref=self.registry,
            )
        value = next(
            (document[key] for key in ("token", "access_token") if document.get(key)), None
        )
        if not isinstance(value, str):
            raise AuthError(
                f"token server {redact_url(url)} for {self.registry} returned no token",
                ref=self.registry,
            )
        lifetime = _lifetime(document.get("expires_in"))
        log.debug("fetched a token for %s from %s, valid %.0f s", self.registry, url.host, lifetime)
        # Measured from receipt: issued_at comes from the server's clock, which may be off.
        return Token(value, received + lifetime * _RENEW_AFTER_FRACTION)

    def _token_error(
        self, status: int, reason: str, body: bytes, url: URL, sent_credentials: bool
    ) -> AuthError:
        if status in (401, 403) and sent_credentials:
            problem = "rejected the credentials from docker config.json; run docker login again"
        elif status in (401, 403):
            problem = "requires credentials; add them to docker config.json (docker login)"
        else:
            error = error_for_status(
                status, reason, body, action=f"token request for {self.registry}", url=url
            )
            return AuthError(
                error.message, status=status, codes=error.codes, temporary=error.temporary
            )
        return AuthError(
            f"token server {redact_url(url)} for registry {self.registry} {problem} "
            f"({status} {reason})",
            status=status,
            ref=self.registry,
        )


def _first(challenges: list[Challenge], scheme: str) -> Challenge | None:
    return next((c for c in challenges if c.scheme == scheme), None)


def _lifetime(value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return DEFAULT_TOKEN_LIFETIME
