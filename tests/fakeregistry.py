"""An in-process aiohttp registry for tests, with faults a test can script per path.

It serves manifests and blobs from dicts over plain HTTP on a loopback address at a free port,
records every request, and can:
- respond with scripted responses before serving normally (`script`),
- require Basic auth or bearer tokens from a `FakeTokenServer`,
- redirect blob GETs to `/storage/<digest>` on itself or another instance,
- treat Range like a particular kind of server (`range_mode`),
- close the connection after a number of body bytes, once per path (`drop_after`).

Use it as `async with FakeRegistry() as registry:` inside a running event loop.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from aiohttp import web
from multidict import MultiDict

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

# How the blob endpoint treats a Range header.
HONOUR_RANGE = "honour"  # 206 with the requested bytes and Accept-Ranges: bytes
IGNORE_RANGE = "ignore"  # 200 with the whole body, no Accept-Ranges
REJECT_OPEN_RANGE = "416-open"  # 416 for "bytes=N-", closed ranges honoured (some S3 setups)
REJECT_RANGE = "416-all"  # 416 for every Range header
LYING_RANGE = "lie"  # 206 with the whole body and a Content-Range of 0-(size-1)
NO_ACCEPT_RANGES = "no-accept-ranges"  # honours Range but never advertises it
RANGE_MODES = (
    HONOUR_RANGE,
    IGNORE_RANGE,
    REJECT_OPEN_RANGE,
    REJECT_RANGE,
    LYING_RANGE,
    NO_ACCEPT_RANGES,
)

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Scripted:
    """One scripted response: status, headers and body. Status 0 serves the request normally."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class Recorded:
    """One request the server received."""

    method: str
    path: str
    query: MultiDict
    headers: dict[str, str]
    time: float


@dataclass
class BasicAuth:
    """Require HTTP Basic auth with these credentials."""

    username: str
    password: str


class TokenBook:
    """Tokens a token server issued and a registry accepts, with their expiry."""

    def __init__(self) -> None:
        self.expiry: dict[str, float] = {}
        self.issued: list[str] = []

    def issue(self, lifetime: float) -> str:
        token = secrets.token_hex(16)
        self.expiry[token] = time.monotonic() + lifetime
        self.issued.append(token)
        return token

    def is_valid(self, token: str) -> bool:
        return self.expiry.get(token, 0.0) > time.monotonic()

    def revoke_all(self) -> None:
        self.expiry.clear()


class _Server:
    """An aiohttp application on a free port of a loopback address, recording requests."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0
        self.requests: list[Recorded] = []
        self.faults: dict[str, deque[Scripted]] = defaultdict(deque)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def script(self, path: str, *responses: Scripted) -> None:
        """Respond to the next requests to `path` with `responses`, in order."""
        self.faults[path].extend(responses)

    def requests_to(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record])
        self._add_routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> "_Server":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    @web.middleware
    async def _record(self, request: web.Request, handler) -> web.StreamResponse:
        self.requests.append(
            Recorded(
                request.method,
                request.path,
                MultiDict(request.query),
                dict(request.headers),
                time.monotonic(),
            )
        )
        queued = self.faults.get(request.path)
        scripted = queued.popleft() if queued else None
        if scripted is not None and scripted.status != 0:
            return web.Response(
                status=scripted.status, headers=scripted.headers, body=scripted.body
            )
        return await handler(request)


class FakeTokenServer(_Server):
    """A token server (docker token protocol) at `/token`.

    `credentials` (if set) must be sent as Basic auth unless `anonymous` is true.
    `token_fields` names the JSON fields that carry the token, and `empty_fields` those sent
    as empty strings. `expires_in` and `issued_at` are sent when not None.
    """

    def __init__(self, book: TokenBook, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.book = book
        self.credentials: BasicAuth | None = None
        self.anonymous = True
        self.token_fields: tuple[str, ...] = ("token",)
        self.empty_fields: tuple[str, ...] = ()
        self.expires_in: float | None = None
        self.issued_at: str | None = None

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_get("/token", self._token)

    async def _token(self, request: web.Request) -> web.Response:
        sent = request.headers.get("Authorization")
        if sent is not None and self.credentials is not None:
            if sent != _basic_value(self.credentials):
                return web.json_response({"details": "bad credentials"}, status=401)
        elif not self.anonymous:
            return web.json_response({"details": "credentials required"}, status=401)

        lifetime = self.expires_in if self.expires_in is not None else 60.0
        token = self.book.issue(lifetime)
        document: dict[str, object] = {name: "" for name in self.empty_fields}
        document.update({name: token for name in self.token_fields})
        if self.expires_in is not None:
            document["expires_in"] = self.expires_in
        if self.issued_at is not None:
            document["issued_at"] = self.issued_at
        return web.json_response(document)


class FakeRegistry(_Server):
    """A registry serving `manifests[(repository, tag or digest)]` and `blobs[digest]`."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.blobs: dict[str, bytes] = {}
        self.auth: BasicAuth | None = None
        self.token_book: TokenBook | None = None
        self.challenge: str = ""
        self.range_mode = HONOUR_RANGE
        self.drop_after: dict[str, int] = {}
        self.redirect_blobs_to: _Server | None = None

    # Content.

    def add_blob(self, data: bytes, media_type: str = DOCKER_LAYER_TAR) -> dict:
        digest = sha256_digest(data)
        self.blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def add_manifest(self, repository: str, tag: str | None, body: bytes, content_type: str) -> str:
        digest = sha256_digest(body)
        self.manifests[(repository, digest)] = (body, content_type)
        if tag is not None:
            self.manifests[(repository, tag)] = (body, content_type)
        return digest

    def add_image(
        self,
        repository: str,
        tag: str | None,
        layers: list[bytes],
        *,
        os: str = "linux",
        architecture: str = "amd64",
    ) -> dict:
        """Store an uncompressed-layer image; return its manifest descriptor."""
        config = {
            "architecture": architecture,
            "os": os,
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer) for layer in layers]},
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": self.add_blob(json.dumps(config).encode(), DOCKER_CONFIG),
            "layers": [self.add_blob(layer) for layer in layers],
        }
        body = json.dumps(manifest, indent=2).encode()
        digest = self.add_manifest(repository, tag, body, DOCKER_MANIFEST)
        return {"mediaType": DOCKER_MANIFEST, "digest": digest, "size": len(body)}

    def add_index(self, repository: str, tag: str, entries: list[tuple[dict, dict]]) -> str:
        """Store an OCI index of (manifest descriptor, platform) entries under `tag`."""
        manifests = [dict(descriptor, platform=platform) for descriptor, platform in entries]
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
        return self.add_manifest(repository, tag, body.encode(), OCI_INDEX)

    def use_bearer(self, token_server: FakeTokenServer, challenge: str) -> None:
        """Require tokens from `token_server`; `challenge` is the WWW-Authenticate value,
        where {scope} is replaced by the request's scope."""
        self.token_book = token_server.book
        self.challenge = challenge

    # Routes.

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v2/", self._ping)
        app.router.add_get("/v2/{name:.+}/manifests/{reference}", self._manifest)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_get("/storage/{digest}", self._storage)

    async def _ping(self, request: web.Request) -> web.StreamResponse:
        denied = self._check_auth(request, "")
        return denied or web.json_response({})

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        denied = self._check_auth(request, f"repository:{name}:pull")
        if denied is not None:
            return denied
        found = self.manifests.get((name, request.match_info["reference"]))
        if found is None:
            return _error(404, "MANIFEST_UNKNOWN", "manifest unknown")
        body, content_type = found
        headers = {"Content-Type": content_type, "Docker-Content-Digest": sha256_digest(body)}
        return web.Response(body=body, headers=headers)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        denied = self._check_auth(request, f"repository:{name}:pull")
        if denied is not None:
            return denied
        digest = request.match_info["digest"]
        if self.redirect_blobs_to is not None:
            location = f"{self.redirect_blobs_to.url}/storage/{digest}?signature=secret"
            return web.Response(status=307, headers={"Location": location})
        return await self._serve_blob(request, digest)

    async def _storage(self, request: web.Request) -> web.StreamResponse:
        return await self._serve_blob(request, request.match_info["digest"])

    async def _serve_blob(self, request: web.Request, digest: str) -> web.StreamResponse:
        data = self.blobs.get(digest)
        if data is None:
            return _error(404, "BLOB_UNKNOWN", "blob unknown to registry")
        status, headers, start, end = self._plan_range(request.headers.get("Range"), len(data))
        if status == 416:
            return web.Response(status=416, headers=headers)

        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        await response.prepare(request)
        limit = self.drop_after.pop(request.path, None)
        if limit is not None and limit < end - start:
            await response.write(data[start : start + limit])
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(data[start:end])
        return response

    def _plan_range(self, header: str | None, size: int) -> tuple[int, dict, int, int]:
        """Return status, headers and the [start, end) slice to send for a Range header."""
        headers = {"Content-Type": "application/octet-stream"}
        if self.range_mode not in (IGNORE_RANGE, NO_ACCEPT_RANGES):
            headers["Accept-Ranges"] = "bytes"
        match = _RANGE.fullmatch(header or "")
        if match is None or self.range_mode == IGNORE_RANGE:
            return 200, headers, 0, size

        start = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else size - 1
        open_ended = not match.group(2)
        rejected = self.range_mode == REJECT_RANGE or (
            open_ended and self.range_mode == REJECT_OPEN_RANGE
        )
        if start >= size or rejected:
            return 416, {"Content-Range": f"bytes */{size}"}, 0, 0
        if self.range_mode == LYING_RANGE:
            headers["Content-Range"] = f"bytes 0-{size - 1}/{size}"
            return 206, headers, 0, size
        end = min(last + 1, size)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        return 206, headers, start, end

    def _check_auth(self, request: web.Request, scope: str) -> web.Response | None:
        sent = request.headers.get("Authorization", "")
        if self.auth is not None:
            if sent == _basic_value(self.auth):
                return None
            headers = {"WWW-Authenticate": 'Basic realm="fake registry"'}
            return _error(401, "UNAUTHORIZED", "authentication required", headers)
        if self.token_book is None:
            return None

        token = sent.removeprefix("Bearer ") if sent.startswith("Bearer ") else None
        if token is not None and self.token_book.is_valid(token):
            return None
        challenge = self.challenge.replace("{scope}", scope)
        if token is not None:
            challenge += ',error="invalid_token"'
        return _error(
            401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": challenge}
        )


def _basic_value(credentials: BasicAuth) -> str:
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode()


def _error(status: int, code: str, message: str, headers: dict | None = None) -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    merged = {"Content-Type": "application/json", **(headers or {})}
    return web.Response(status=status, body=body, headers=merged)


def write_docker_config(path: str, auths: dict[str, dict]) -> str:
    """Write a docker config.json with `auths` and return its path."""
    with open(path, "w") as handle:
        json.dump({"auths": auths}, handle)
    return path


def auth_entry(username: str, password: str) -> dict:
    """Return a config.json `auths` entry in the base64 form `docker login` writes."""
    return {"auth": base64.b64encode(f"{username}:{password}".encode()).decode()}


def registry_settings(tmp_path, **overrides):
    """Return RegistrySettings for tests: plain HTTP, a private docker config, short backoff."""
    from lstore.store.registry.settings import RegistrySettings
    from lstore.store.registry.retry import RetryPolicy

    values = {
        "plain_http": True,
        "docker_config": str(tmp_path / "docker-config.json"),
        "retry": RetryPolicy(backoff_base=0.01, backoff_max=0.05),
    }
    values.update(overrides)
    return RegistrySettings(**values)
