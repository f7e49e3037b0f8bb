"""The warm-pull shortcut: no HTTP client import, tags re-resolved, tokens, and fallbacks."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from lstore.store.pullimage import pull_image
from lstore.store.store import Store
from lstore.store.warmpull import warm_pull

from tests.fakeregistry import (
    FakeRegistry,
    FakeTokenServer,
    TokenBook,
    registry_settings,
)
from tests.layers import file, tar_bytes

CHECK_NO_AIOHTTP = """
import sys
import lstore.cli
code = lstore.cli.main(sys.argv[1:])
assert "aiohttp" not in sys.modules, "the warm pull imported aiohttp"
sys.exit(code)
"""


def test_warm_pull_skips_http_client(registry, store_root):
    ref = registry.ref("busybox:latest")
    subprocess.run(
        [sys.executable, "-m", "lstore.cli", "--root", store_root, "pull", ref], check=True
    )

    done = subprocess.run(
        [sys.executable, "-c", CHECK_NO_AIOHTTP, "--root", store_root, "pull", "--json", ref],
        capture_output=True,
        text=True,
    )

    assert done.returncode == 0, done.stderr
    assert '"bytes_fetched": 0' in done.stdout


def test_warm_pull_follows_moved_tag(tmp_path):
    store = Store(str(tmp_path / "root"))
    settings = registry_settings(tmp_path)

    async def scenario() -> tuple[str | None, str | None, str | None]:
        async with FakeRegistry() as registry:
            first = registry.add_image("team/app", "1", [tar_bytes([file("a", b"1")])])
            second = registry.add_image("team/app", "2", [tar_bytes([file("a", b"2")])])
            base = f"{registry.address}/team/app"
            await pull_image(store, f"{base}:1", settings=settings)
            await pull_image(store, f"{base}:2", settings=settings)

            # Point tag 1 at the second image: the shortcut must see the move.
            registry.manifests[("team/app", "1")] = registry.manifests[("team/app", "2")]
            moved = await asyncio.to_thread(
                warm_pull, store, f"{base}:1", platform=None, settings=settings
            )
            unknown = await asyncio.to_thread(
                warm_pull, store, f"{base}:missing", platform=None, settings=settings
            )
            return moved, first["digest"], second["digest"], unknown

    moved, first_digest, second_digest, unknown = asyncio.run(scenario())

    assert moved is not None
    assert store.lookup_image(moved).digest == second_digest
    assert store.lookup_image(moved).digest != first_digest
    assert unknown is None


def test_warm_pull_uses_anonymous_token(tmp_path):
    store = Store(str(tmp_path / "root"))
    settings = registry_settings(tmp_path)
    book = TokenBook()

    async def scenario() -> tuple[str | None, int]:
        async with FakeTokenServer(book) as tokens, FakeRegistry() as registry:
            registry.use_bearer(
                tokens, f'Bearer realm="{tokens.url}/token",service="reg",scope="{{scope}}"'
            )
            registry.add_image("team/app", "1", [tar_bytes([file("a", b"x")])])
            ref = f"{registry.address}/team/app:1"
            await pull_image(store, ref, settings=settings)
            before = len(tokens.requests)
            name = await asyncio.to_thread(
                warm_pull, store, ref, platform=None, settings=settings
            )
            return name, len(tokens.requests) - before

    name, token_requests = asyncio.run(scenario())

    assert name is not None
    assert token_requests == 1


def test_warm_pull_needs_complete_content(tmp_path):
    store = Store(str(tmp_path / "root"))
    settings = registry_settings(tmp_path)

    async def scenario() -> str | None:
        async with FakeRegistry() as registry:
            registry.add_image("team/app", "1", [tar_bytes([file("a", b"x")])])
            ref = f"{registry.address}/team/app:1"
            await pull_image(store, ref, settings=settings)
            image = store.lookup_image(ref)
            store.snapshots.remove(image.chain_ids[0])
            return await asyncio.to_thread(
                warm_pull, store, ref, platform=None, settings=settings
            )

    assert asyncio.run(scenario()) is None


def test_digest_shortcut_needs_same_repository(tmp_path):
    store = Store(str(tmp_path / "root"))
    settings = registry_settings(tmp_path)

    async def scenario() -> tuple[str | None, str | None]:
        async with FakeRegistry() as registry:
            image = registry.add_image("team/app", "1", [tar_bytes([file("a", b"x")])])
            await pull_image(store, f"{registry.address}/team/app:1", settings=settings)
            same = await asyncio.to_thread(
                warm_pull,
                store,
                f"{registry.address}/team/app@{image['digest']}",
                platform=None,
                settings=settings,
            )
            other = await asyncio.to_thread(
                warm_pull,
                store,
                f"{registry.address}/team/other@{image['digest']}",
                platform=None,
                settings=settings,
            )
            return same, other

    same, other = asyncio.run(scenario())

    assert same is not None
    assert other is None
