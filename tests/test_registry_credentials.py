"""Credentials from docker's config.json, and that secrets never reach the logs."""

import asyncio
import base64
import json
import logging

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

from lstore.errors import InvalidArgumentError
from lstore.store.reference import parse_reference
from lstore.store.registry.client import RegistryClient
from lstore.store.registry.credentials import (
    CredentialStore,
    Credentials,
    default_config_path,
    registry_key,
)


@pytest.mark.parametrize(
    "key, registry",
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("index.docker.io", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("docker.io", "docker.io"),
        ("https://ghcr.io", "ghcr.io"),
        ("http://localhost:5000/v2/", "localhost:5000"),
        ("Registry.Example.com:443", "registry.example.com:443"),
    ],
)
def test_config_keys_match_reference_registries(tmp_path, key, registry):
    path = write_docker_config(str(tmp_path / "config.json"), {key: auth_entry("u", "p:w")})

    found = CredentialStore.load(path).lookup(registry)

    assert found == Credentials("u", "p:w")
    assert registry_key(key) == registry_key(registry)


def test_username_password_entry(tmp_path):
    entry = {"username": "alice", "password": "secret"}
    path = write_docker_config(str(tmp_path / "config.json"), {"reg.local": entry})

    assert CredentialStore.load(path).lookup("reg.local") == Credentials("alice", "secret")


def test_unknown_registry_has_no_credentials(tmp_path):
    path = write_docker_config(str(tmp_path / "config.json"), {"reg.local": auth_entry("a", "b")})

    assert CredentialStore.load(path).lookup("other.local") is None


def test_missing_config_means_no_credentials(tmp_path):
    store = CredentialStore.load(str(tmp_path / "absent.json"))

    assert store.lookup("docker.io") is None


def test_default_config_follows_docker_config_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))

    assert default_config_path() == str(tmp_path / "config.json")


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        ("[]", "not a JSON object"),
        (json.dumps({"auths": []}), "auths is not an object"),
        (json.dumps({"auths": {"r": {"auth": "***"}}}), "not valid base64"),
        (
            json.dumps({"auths": {"r": {"auth": base64.b64encode(b"nocolon").decode()}}}),
            "user:password",
        ),
    ],
)
def test_invalid_config_names_file(tmp_path, content, problem):
    path = tmp_path / "config.json"
    path.write_text(content)

    with pytest.raises(InvalidArgumentError) as caught:
        CredentialStore.load(str(path))

    assert problem in str(caught.value)
    assert str(path) in str(caught.value)
    assert caught.value.path == str(path)


def test_credential_helper_is_reported_once(tmp_path, caplog):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {}, "credsStore": "desktop"}))
    store = CredentialStore.load(str(path))

    with caplog.at_level(logging.WARNING):
        assert store.lookup("ghcr.io") is None
        assert store.lookup("ghcr.io") is None

    warnings = [r for r in caplog.records if "credential helper" in r.getMessage()]
    assert len(warnings) == 1
    assert "'desktop'" in warnings[0].getMessage()


def test_credentials_repr_hides_password():
    assert "hunter2" not in repr(Credentials("alice", "hunter2"))


def test_logs_never_contain_tokens_or_credentials(tmp_path, caplog):
    async def scenario():
        book = TokenBook()
        async with FakeTokenServer(book) as tokens, FakeRegistry() as registry:
            tokens.credentials = BasicAuth("alice", "hunter2")
            tokens.anonymous = False
            registry.use_bearer(tokens, f'Bearer realm="{tokens.url}/token",scope="{{scope}}"')
            registry.add_image("team/app", "1", [b"layer"])
            config = write_docker_config(
                str(tmp_path / "config.json"), {registry.address: auth_entry("alice", "hunter2")}
            )
            async with RegistryClient(registry_settings(tmp_path, docker_config=config)) as client:
                await client.resolve(parse_reference(f"{registry.address}/team/app:1"))
                book.revoke_all()
                await client.resolve(parse_reference(f"{registry.address}/team/app:1"))
            return book.issued

    with caplog.at_level(logging.DEBUG):
        issued = asyncio.run(scenario())

    text = "\n".join(record.getMessage() for record in caplog.records)
    assert len(issued) == 2
    assert "hunter2" not in text
    assert base64.b64encode(b"alice:hunter2").decode() not in text
    assert "Bearer " not in text
    for token in issued:
        assert token not in text
