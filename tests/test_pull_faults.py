"""Pulls that fail part-way commit nothing, and the next pull recovers."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from lstore.store.pullimage import pull_image
from lstore.store.registry.retry import RetryPolicy
from lstore.store.store import Store

from lstore.errors import IntegrityError, LstoreError
from tests.fakeregistry import FakeRegistry, registry_settings
from tests.layers import file, tar_bytes


def assert_nothing_committed(store: Store) -> None:
    assert store.images() == []
    assert store.snapshots.list() == []
    with store.meta.read() as txn:
        blobs = dict(txn.items("blobs"))
    layer_blobs = [key for key, value in blobs.items() if "rootfs" in value["media_type"]]
    assert layer_blobs == []
    assert store.check().clean


def test_blob_with_wrong_bytes_commits_nothing(tmp_path):
    store = Store(str(tmp_path / "root"))
    good = tar_bytes([file("a", b"A" * 5000)])
    bad = tar_bytes([file("b", b"B" * 5000)])

    async def scenario() -> None:
        async with FakeRegistry() as registry:
            registry.add_image("team/app", "1", [tar_bytes([file("base", b"x")]), good])
            # Serve other bytes under the second layer's digest.
            digest = next(d for d, data in registry.blobs.items() if data == good)
            registry.blobs[digest] = bad
            ref = f"{registry.address}/team/app:1"
            with pytest.raises(IntegrityError) as caught:
                await pull_image(store, ref, settings=registry_settings(tmp_path))
            assert digest in str(caught.value)

    asyncio.run(scenario())

    assert store.images() == []
    assert all(
        snapshot.diff_id != "" for snapshot in store.snapshots.list()
    )  # only the verified base layer may have committed
    assert store.check(verify_content=True).clean


def test_missing_blob_commits_no_image(tmp_path):
    store = Store(str(tmp_path / "root"))

    async def scenario() -> None:
        async with FakeRegistry() as registry:
            registry.add_image("team/app", "1", [tar_bytes([file("a", b"a")])])
            layer_digest = next(
                d for d, data in registry.blobs.items() if data.startswith(b"a\0")
            )
            del registry.blobs[layer_digest]
            ref = f"{registry.address}/team/app:1"
            with pytest.raises(LstoreError) as caught:
                await pull_image(store, ref, settings=registry_settings(tmp_path))
            assert layer_digest in str(caught.value)

    asyncio.run(scenario())

    assert_nothing_committed(store)


def test_interrupted_download_resumes(tmp_path):
    store = Store(str(tmp_path / "root"))
    big = tar_bytes([file("big", bytes(range(256)) * 8192)])

    async def scenario() -> None:
        async with FakeRegistry() as registry:
            registry.add_image("team/app", "1", [big])
            digest = next(d for d, data in registry.blobs.items() if data == big)
            registry.drop_after[f"/v2/team/app/blobs/{digest}"] = 300_000
            ref = f"{registry.address}/team/app:1"
            await pull_image(store, ref, settings=registry_settings(tmp_path))
            ranges = [
                r.headers.get("Range") for r in registry.requests
                if r.path.endswith(f"/blobs/{digest}")
            ]
            assert any(value and value.startswith("bytes=300000-") for value in ranges), ranges

    asyncio.run(scenario())

    assert len(store.images()) == 1
    assert store.check(verify_content=True).clean


def test_trace_records_every_stage(tmp_path):
    store = Store(str(tmp_path / "root"))
    trace_path = str(tmp_path / "trace.jsonl")
    layers = [tar_bytes([file("a", b"a" * 3_000_000)]), tar_bytes([file("b", b"b")])]

    async def scenario() -> list[str]:
        async with FakeRegistry() as registry:
            registry.add_image("team/app", "1", layers)
            ref = f"{registry.address}/team/app:1"
            await pull_image(
                store, ref, settings=registry_settings(tmp_path), trace_path=trace_path
            )
            return [d for d, data in registry.blobs.items() if data in layers]

    layer_digests = asyncio.run(scenario())

    with open(trace_path) as handle:
        events = [json.loads(line) for line in handle]
    for digest in layer_digests:
        stages = {(e["stage"], e["event"]) for e in events if e["blob"] == digest}
        for expected in [
            ("connect", "start"),
            ("first_byte", "end"),
            ("download", "end"),
            ("extract", "end"),
            ("commit", "end"),
        ]:
            assert expected in stages, (digest, expected)
    times = [e["t"] for e in events]
    assert times == sorted(times)
    hashed = [e["bytes"] for e in events if e["stage"] == "hash"]
    assert hashed and max(hashed) > 1_000_000


def test_refused_connection_fails_fast(tmp_path):
    store = Store(str(tmp_path / "root"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The port is closed again, so connections to it are refused.
    ref = f"127.0.0.1:{port}/team/app:1"
    settings = registry_settings(tmp_path, retry=RetryPolicy(backoff_base=1.0))
    started = time.monotonic()

    with pytest.raises(LstoreError) as caught:
        asyncio.run(pull_image(store, ref, settings=settings))

    assert time.monotonic() - started < 1.0
    assert f"cannot connect to registry 127.0.0.1:{port}" in str(caught.value)
    assert store.images() == []
