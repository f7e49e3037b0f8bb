"""Registry authentication: challenges, tokens, Basic auth and where credentials may go.

The integration tests run the real client against tests/fakeregistry.py on loopback
addresses; the token server of the "other host" cases listens on 127.0.0.2.
"""

import asyncio
import time

import pytest
from fakeregistry import (
    BasicAuth,
    FakeRegistry,
    FakeTokenServer,
    TokenBook,
    auth_entry,
    registry_settings,
    write_docker_config,
)
from yarl import URL

from lstore.errors import AuthError
from lstore.store.reference import parse_reference
from lstore.store.registry.auth import check_realm, may_send_credentials
from lstore.store.registry.challenge import parse_www_authenticate
from lstore.store.registry.client import RegistryClient

# Unit tests of the pure parts.

CHALLENGES = [
    # header, expected [(scheme, params)]
    (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"',
        [
            (
                "bearer",
                {
                    "realm": "https://auth.docker.io/token",
                    "service": "registry.docker.io",
                    "scope": "repository:library/busybox:pull",
                },
            )
        ],
    ),
    (
        'BEARER Realm = "https://a/t" ,  Service="s"',
        [("bearer", {"realm": "https://a/t", "service": "s"})],
    ),
    (
        'bearer realm="https://a/t?x=1,2",scope="repository:a:pull,push"',
        [("bearer", {"realm": "https://a/t?x=1,2", "scope": "repository:a:pull,push"})],
    ),
    ('Bearer realm="a \\"quoted\\" realm"', [("bearer", {"realm": 'a "quoted" realm'})]),
    ("Bearer realm=https://a/t,service=s", [("bearer", {"realm": "https://a/t", "service": "s"})]),
    ('Basic realm="r", Bearer realm="t"', [("basic", {"realm": "r"}), ("bearer", {"realm": "t"})]),
    (
        'Bearer realm="t",error="invalid_token"',
        [("bearer", {"realm": "t", "error": "invalid_token"})],
    ),
    ("Basic", [("basic", {})]),
    ("", []),
    ('Bearer realm="unterminated', [("bearer", {"realm": "unterminated"})]),
]


@pytest.mark.parametrize("header, expected", CHALLENGES)
def test_parse_www_authenticate(header, expected):
    challenges = parse_www_authenticate([header])

    assert [(c.scheme, c.params) for c in challenges] == expected


def test_parse_www_authenticate_reads_every_header():
    challenges = parse_www_authenticate(['Basic realm="r"', 'Bearer realm="t"'])

    assert [c.scheme for c in challenges] == ["basic", "bearer"]


REALMS_ALLOWED = [
    # realm host, registry api host, trusted hosts
    ("registry.example.com", "registry.example.com:5000", ()),
    ("auth.docker.io", "registry-1.docker.io", ()),
    ("gitlab.com", "registry.gitlab.com", ()),
    ("login.example.com", "registry.example.com", ()),
    ("tokens.other.org", "registry.example.com", ("tokens.other.org",)),
    ("127.0.0.1", "127.0.0.1:5000", ()),
]
REALMS_DENIED = [
    ("evil.example.net", "registry.example.com", ()),
    ("127.0.0.2", "127.0.0.1:5000", ()),
    ("auth.ghcr.io.evil.net", "ghcr.io", ()),
    ("other.co.uk", "example.co.uk", ()),
    ("example.com", "registry.example.com.attacker.net", ()),
]


@pytest.mark.parametrize("realm_host, registry_host, trusted", REALMS_ALLOWED)
def test_credentials_go_to_registry_domain(realm_host, registry_host, trusted):
    assert may_send_credentials(realm_host, registry_host, trusted)


@pytest.mark.parametrize("realm_host, registry_host, trusted", REALMS_DENIED)
def test_credentials_withheld_from_other_domains(realm_host, registry_host, trusted):
    assert not may_send_credentials(realm_host, registry_host, trusted)


@pytest.mark.parametrize(
    "realm, registry_url, problem",
    [
        ("http://auth.example.com/token", "https://registry.example.com/v2/", "plain http"),
        ("http://169.254.169.254/latest/meta-data", "http://r.example.com/", "link-local"),
        ("http://[fe80::1]/token", "http://r.example.com/", "link-local"),
        ("ftp://auth.example.com/token", "https://r.example.com/", "not an http"),
        ("/token", "https://r.example.com/", "not an http"),
    ],
)
def test_check_realm_rejects_unsafe_realms(realm, registry_url, problem):
    with pytest.raises(AuthError) as caught:
        check_realm(realm, URL(registry_url), registry="r.example.com")

    assert problem in str(caught.value)


def test_check_realm_accepts_https_and_http_for_http_registry():
    https = check_realm("https://a.example.com/t?x=1", URL("https://r/"), registry="r")
    http = check_realm("http://127.0.0.1:9/t", URL("http://127.0.0.1:5000/"), registry="r")

    assert https == URL("https://a.example.com/t?x=1")
    assert http == URL("http://127.0.0.1:9/t")


# Integration tests against the fake registry.

IMAGE_LAYER = b"layer bytes " * 100


async def pull_manifest_twice(registry: FakeRegistry, settings) -> None:
    ref = parse_reference(f"{registry.address}/team/app:1")
    async with RegistryClient(settings) as client:
        await client.resolve(ref)
        await client.resolve(ref)


async def with_bearer_registry(token_host: str = "127.0.0.1"):
    book = TokenBook()
    tokens = FakeTokenServer(book, host=token_host)
    registry = FakeRegistry()
    await tokens.start()
    await registry.start()
    registry.add_image("team/app", "1", [IMAGE_LAYER])
    return registry, tokens


def challenge_for(tokens: FakeTokenServer, realm_query: str = "", service: bool = True) -> str:
    text = f'Bearer realm="{tokens.url}/token{realm_query}"'
    if service:
        text += ',service="fake-registry"'
    return text + ',scope="{scope}"'


def token_requests(tokens: FakeTokenServer) -> list:
    return tokens.requests_to("/token")


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.mark.parametrize(
    "token_fields, empty_fields",
    [(("token",), ()), (("access_token",), ()), (("access_token",), ("token",))],
)
def test_bearer_token_from_token_or_access_token(tmp_path, token_fields, empty_fields):
    async def scenario():
        registry, tokens = await with_bearer_registry()
        tokens.token_fields = token_fields
        tokens.empty_fields = empty_fields
        registry.use_bearer(tokens, challenge_for(tokens))
        try:
            await pull_manifest_twice(registry, registry_settings(tmp_path))
        finally:
            await registry.close()
            await tokens.close()
        return registry, tokens

    registry, tokens = run(scenario())

    requests = token_requests(tokens)
    assert len(requests) == 1
    assert requests[0].query.getall("scope") == ["repository:team/app:pull"]
    assert requests[0].query.get("service") == "fake-registry"
    assert "Authorization" not in requests[0].headers
    unauthorized = [r for r in registry.requests if "Authorization" not in r.headers]
    assert len(unauthorized) == 1


def test_bearer_realm_only_challenge_sends_no_service(tmp_path):
    async def scenario():
        registry, tokens = await with_bearer_registry()
        registry.use_bearer(tokens, f'Bearer realm="{tokens.url}/token"')
        try:
            await pull_manifest_twice(registry, registry_settings(tmp_path))
        finally:
            await registry.close()
            await tokens.close()
        return tokens

    tokens = run(scenario())

    query = token_requests(tokens)[0].query
    assert "service" not in query
    assert query.getall("scope") == ["repository:team/app:pull"]
    assert "None" not in str(query)


def test_bearer_realm_with_query_keeps_it(tmp_path):
    async def scenario():
        registry, tokens = await with_bearer_registry()
        registry.use_bearer(tokens, challenge_for(tokens, realm_query="?client=lstore&v=2"))
        try:
            await pull_manifest_twice(registry, registry_settings(tmp_path))
        finally:
            await registry.close()
            await tokens.close()
        return tokens

    tokens = run(scenario())

    query = token_requests(tokens)[0].query
    assert query.get("client") == "lstore"
    assert query.get("v") == "2"
    assert query.get("service") == "fake-registry"
    assert query.getall("scope") == ["repository:team/app:pull"]


def test_bearer_sends_credentials_to_same_host_realm(tmp_path):
    async def scenario():
        registry, tokens = await with_bearer_registry()
        tokens.credentials = BasicAuth("alice", "s3cret")
        tokens.anonymous = False
        registry.use_bearer(tokens, challenge_for(tokens))
        config = write_docker_config(
            str(tmp_path / "config.json"), {registry.address: auth_entry("alice", "s3cret")}
        )
        try:
            await pull_manifest_twice(registry, registry_settings(tmp_path, docker_config=config))
        finally:
            await registry.close()
            await tokens.close()
        return tokens

    tokens = run(scenario())

    sent = token_requests(tokens)[0].headers.get("Authorization", "")
    assert sent.startswith("Basic ")


def test_bearer_withholds_credentials_from_other_host_realm(tmp_path):
    async def scenario(trusted: tuple[str, ...]):
        registry, tokens = await with_bearer_registry(token_host="127.0.0.2")
        registry.use_bearer(tokens, challenge_for(tokens))
        config = write_docker_config(
            str(tmp_path / "config.json"), {registry.address: auth_entry("alice", "s3cret")}
        )
        settings = registry_settings(tmp_path, docker_config=config, trusted_realm_hosts=trusted)
        try:
            await pull_manifest_twice(registry, settings)
        finally:
            await registry.close()
            await tokens.close()
        return tokens

    untrusted = run(scenario(()))
    trusted = run(scenario(("127.0.0.2",)))

    assert "Authorization" not in token_requests(untrusted)[0].headers
    assert token_requests(trusted)[0].headers["Authorization"].startswith("Basic ")


def test_bearer_rejects_link_local_realm_without_request(tmp_path):
    async def scenario():
        registry = FakeRegistry()
        async with registry:
            registry.add_image("team/app", "1", [IMAGE_LAYER])
            registry.use_bearer(
                FakeTokenServer(TokenBook()), 'Bearer realm="http://169.254.169.254/t"'
            )
            async with RegistryClient(registry_settings(tmp_path)) as client:
                await client.resolve(parse_reference(f"{registry.address}/team/app:1"))

    started = time.monotonic()
    with pytest.raises(AuthError) as caught:
        run(scenario())

    assert "link-local" in str(caught.value)
    assert time.monotonic() - started < 5


def test_bearer_token_renewed_after_expiry(tmp_path):
    async def scenario():
        registry, tokens = await with_bearer_registry()
        tokens.expires_in = 1
        registry.use_bearer(tokens, challenge_for(tokens))
        ref = parse_reference(f"{registry.address}/team/app:1")
        try:
            async with RegistryClient(registry_settings(tmp_path)) as client:
                await client.resolve(ref)
                await asyncio.sleep(1.1)
                await client.resolve(ref)
        finally:
            await registry.close()
            await tokens.close()
        return registry, tokens

    registry, tokens = run(scenario())

    assert len(token_requests(tokens)) == 2
    manifest_requests = [r for r in registry.requests if r.path.endswith("/manifests/1")]
    # One unauthenticated first request, then one request per resolve with a valid token.
    assert len(manifest_requests) == 3


def test_bearer_token_lifetime_ignores_stale_issued_at(tmp_path):
    async def scenario():
        registry, tokens = await with_bearer_registry()
        tokens.expires_in = 300
        tokens.issued_at = "2001-01-01T00:00:00Z"
        registry.use_bearer(tokens, challenge_for(tokens))
        try:
            await pull_manifest_twice(registry, registry_settings(tmp_path))
        finally:
            await registry.close()
            await tokens.close()
        return tokens

    tokens = run(scenario())

    assert len(token_requests(tokens)) == 1


def test_bearer_invalid_token_fetches_new_token_once(tmp_path):
    async def scenario():
        registry, tokens = await with_bearer_registry()
        registry.use_bearer(tokens, challenge_for(tokens))
        ref = parse_reference(f"{registry.address}/team/app:1")
        try:
            async with RegistryClient(registry_settings(tmp_path)) as client:
                await client.resolve(ref)
                tokens.book.revoke_all()
                await client.resolve(ref)
        finally:
            await registry.close()
            await tokens.close()
        return tokens

    tokens = run(scenario())

    assert len(token_requests(tokens)) == 2


def test_bearer_invalid_token_twice_raises(tmp_path):
    async def scenario():
        registry, tokens = await with_bearer_registry()
        # A token server whose tokens the registry never accepts.
        registry.use_bearer(tokens, challenge_for(tokens))
        registry.token_book = TokenBook()
        try:
            async with RegistryClient(registry_settings(tmp_path)) as client:
                await client.resolve(parse_reference(f"{registry.address}/team/app:1"))
        finally:
            await registry.close()
            await tokens.close()

    with pytest.raises(AuthError) as caught:
        run(scenario())

    assert "requires authentication for team/app" in str(caught.value)


def test_basic_auth_with_docker_config_forms(tmp_path):
    async def scenario(entry_key: str, entry: dict):
        async with FakeRegistry() as registry:
            registry.auth = BasicAuth("bob", "pa:ss")
            registry.add_image("team/app", "1", [IMAGE_LAYER])
            config = write_docker_config(
                str(tmp_path / "config.json"), {entry_key.format(registry.address): entry}
            )
            await pull_manifest_twice(registry, registry_settings(tmp_path, docker_config=config))
            return registry

    forms = [
        ("{}", auth_entry("bob", "pa:ss")),
        ("http://{}", {"username": "bob", "password": "pa:ss"}),
        ("https://{}/v2/", auth_entry("bob", "pa:ss")),
    ]
    for key, entry in forms:
        registry = run(scenario(key, entry))
        sent = [r.headers.get("Authorization", "") for r in registry.requests]
        assert sent[0] == ""
        assert all(value.startswith("Basic ") for value in sent[1:])


def test_unauthorized_without_credentials_names_registry_and_config(tmp_path):
    async def scenario():
        async with FakeRegistry() as registry:
            registry.auth = BasicAuth("bob", "pw")
            registry.add_image("team/app", "1", [IMAGE_LAYER])
            async with RegistryClient(registry_settings(tmp_path)) as client:
                try:
                    await client.resolve(parse_reference(f"{registry.address}/team/app:1"))
                except AuthError as error:
                    return registry.address, error
        raise AssertionError("resolve succeeded without credentials")

    address, error = run(scenario())

    message = str(error)
    assert f"registry {address} requires authentication" in message
    assert "docker-config.json" in message
    assert f"docker login {address}" in message
    assert error.status == 401
    assert "\n" not in message


def test_basic_auth_wrong_password_raises(tmp_path):
    async def scenario():
        async with FakeRegistry() as registry:
            registry.auth = BasicAuth("bob", "right")
            registry.add_image("team/app", "1", [IMAGE_LAYER])
            config = write_docker_config(
                str(tmp_path / "config.json"), {registry.address: auth_entry("bob", "wrong")}
            )
            async with RegistryClient(registry_settings(tmp_path, docker_config=config)) as client:
                await client.resolve(parse_reference(f"{registry.address}/team/app:1"))

    with pytest.raises(AuthError) as caught:
        run(scenario())

    assert "denied access to team/app with the credentials" in str(caught.value)


def test_token_server_rejecting_credentials_raises(tmp_path):
    async def scenario():
        registry, tokens = await with_bearer_registry()
        tokens.credentials = BasicAuth("alice", "right")
        registry.use_bearer(tokens, challenge_for(tokens))
        config = write_docker_config(
            str(tmp_path / "config.json"), {registry.address: auth_entry("alice", "wrong")}
        )
        try:
            await pull_manifest_twice(registry, registry_settings(tmp_path, docker_config=config))
        finally:
            await registry.close()
            await tokens.close()

    with pytest.raises(AuthError) as caught:
        run(scenario())

    assert "rejected the credentials" in str(caught.value)
    assert caught.value.status == 401


def test_concurrent_requests_share_one_token(tmp_path):
    layers = [bytes([number]) * 1000 for number in range(6)]

    async def scenario():
        registry, tokens = await with_bearer_registry()
        registry.add_image("team/many", "1", layers)
        registry.use_bearer(tokens, challenge_for(tokens))
        ref = parse_reference(f"{registry.address}/team/many:1")
        try:
            async with RegistryClient(registry_settings(tmp_path)) as client:
                resolved = await client.resolve(ref)
            # A new client meets the first challenge with all requests in flight at once.
            async with RegistryClient(registry_settings(tmp_path)) as client:
                blobs = await asyncio.gather(
                    *(client.get_blob_bytes(ref, layer) for layer in resolved.manifest.layers)
                )
        finally:
            await registry.close()
            await tokens.close()
        return tokens, blobs

    tokens, blobs = run(scenario())

    assert blobs == layers
    # One token for each client, however many requests each one sent.
    assert len(token_requests(tokens)) == 2
