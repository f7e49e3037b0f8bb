"""Retries of registry requests: Retry-After, backoff, fast failure and error details."""

import asyncio
import email.utils
import json
import time

import pytest
from fakeregistry import FakeRegistry, Scripted, registry_settings

from lstore.errors import NotFoundError, RegistryError
from lstore.store.reference import parse_reference
from lstore.store.registry.client import RegistryClient
from lstore.store.registry.retry import RetryPolicy, parse_retry_after

MANIFEST_PATH = "/v2/team/app/manifests/1"


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


def rate_limited(**headers: str) -> Scripted:
    return Scripted(429, headers, error_body("TOOMANYREQUESTS", "slow down"))


async def resolve_with_faults(tmp_path, *faults: Scripted, **settings) -> FakeRegistry:
    """Resolve team/app:1 after the manifest endpoint responded with `faults`."""
    async with FakeRegistry() as registry:
        registry.add_image("team/app", "1", [b"layer"])
        registry.script(MANIFEST_PATH, *faults)
        async with RegistryClient(registry_settings(tmp_path, **settings)) as client:
            await client.resolve(parse_reference(f"{registry.address}/team/app:1"))
        return registry


def waits_between(registry: FakeRegistry) -> list[float]:
    times = [r.time for r in registry.requests_to(MANIFEST_PATH)]
    return [later - earlier for earlier, later in zip(times, times[1:])]


def test_retry_after_seconds_is_honoured(tmp_path):
    registry = asyncio.run(resolve_with_faults(tmp_path, rate_limited(**{"Retry-After": "2"})))

    waits = waits_between(registry)
    assert len(waits) == 1
    assert waits[0] >= 2.0


def test_retry_after_http_date_is_honoured(tmp_path):
    when = email.utils.formatdate(time.time() + 2, usegmt=True)

    registry = asyncio.run(resolve_with_faults(tmp_path, rate_limited(**{"Retry-After": when})))

    waits = waits_between(registry)
    assert len(waits) == 1
    # HTTP-dates have whole seconds, so the wait is between 1 and 2 s.
    assert waits[0] >= 1.0


def test_rate_limit_without_retry_after_backs_off(tmp_path):
    policy = RetryPolicy(backoff_base=0.2, backoff_max=1.0)

    registry = asyncio.run(
        resolve_with_faults(tmp_path, rate_limited(), rate_limited(), retry=policy)
    )

    waits = waits_between(registry)
    assert len(waits) == 2
    assert waits[0] >= 0.2
    assert waits[1] >= 0.4


def test_long_retry_after_fails_fast(tmp_path):
    started = time.monotonic()

    with pytest.raises(RegistryError) as caught:
        asyncio.run(resolve_with_faults(tmp_path, rate_limited(**{"Retry-After": "86400"})))

    assert time.monotonic() - started < 2
    message = str(caught.value)
    assert "rate limited (429 toomanyrequests), registry asked to retry after 86400 s" in message
    assert caught.value.status == 429
    assert caught.value.codes == ("TOOMANYREQUESTS",)
    assert caught.value.temporary


def test_unavailable_with_retry_after_waits(tmp_path):
    unavailable = Scripted(503, {"Retry-After": "1"}, b"maintenance")

    registry = asyncio.run(resolve_with_faults(tmp_path, unavailable))

    waits = waits_between(registry)
    assert len(waits) == 1
    assert waits[0] >= 1.0


def test_server_errors_are_retried_then_raised(tmp_path):
    failures = [Scripted(500, body=b"boom")] * 5

    with pytest.raises(RegistryError) as caught:
        asyncio.run(resolve_with_faults(tmp_path, *failures))

    assert caught.value.status == 500
    assert caught.value.temporary
    assert "500 Internal Server Error" in str(caught.value)


def test_server_errors_then_success(tmp_path):
    registry = asyncio.run(
        resolve_with_faults(tmp_path, Scripted(502), Scripted(504), Scripted(500))
    )

    assert len(registry.requests_to(MANIFEST_PATH)) == 4


def test_missing_manifest_is_not_retried(tmp_path):
    async def scenario():
        async with FakeRegistry() as registry:
            async with RegistryClient(registry_settings(tmp_path)) as client:
                try:
                    await client.resolve(parse_reference(f"{registry.address}/team/app:9"))
                except NotFoundError as error:
                    return registry, error
        raise AssertionError("resolve found a manifest that does not exist")

    registry, error = asyncio.run(scenario())

    assert len(registry.requests) == 1
    assert isinstance(error, RegistryError)
    assert error.status == 404
    assert error.codes == ("MANIFEST_UNKNOWN",)
    assert not error.temporary
    assert "manifest 9 of" in str(error)


def test_refused_connection_is_not_retried(tmp_path):
    async def scenario():
        registry = FakeRegistry()
        await registry.start()
        address = registry.address
        await registry.close()
        async with RegistryClient(registry_settings(tmp_path)) as client:
            await client.resolve(parse_reference(f"{address}/team/app:1"))

    with pytest.raises(RegistryError) as caught:
        asyncio.run(scenario())

    assert "cannot connect to registry" in str(caught.value)
    assert "attempts" not in str(caught.value)
    assert caught.value.temporary


def test_error_urls_are_redacted(tmp_path):
    async def scenario():
        async with FakeRegistry() as registry:
            registry.add_image("team/app", "1", [b"layer"])
            registry.script(MANIFEST_PATH, Scripted(400, body=b"bad"))
            async with RegistryClient(registry_settings(tmp_path)) as client:
                await client.resolve(parse_reference(f"{registry.address}/team/app:1"))

    with pytest.raises(RegistryError) as caught:
        asyncio.run(scenario())

    assert caught.value.status == 400
    assert "?" not in str(caught.value)


@pytest.mark.parametrize(
    "value, expected",
    [("0", 0.0), ("2", 2.0), (" 120 ", 120.0), ("-1", None), ("soon", None), (None, None)],
)
def test_parse_retry_after_seconds(value, expected):
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date():
    now = 1_700_000_000.0
    later = email.utils.formatdate(now + 30, usegmt=True)
    earlier = email.utils.formatdate(now - 30, usegmt=True)

    assert parse_retry_after(later, now=now) == pytest.approx(30.0)
    assert parse_retry_after(earlier, now=now) == 0.0


def test_backoff_doubles_up_to_max():
    policy = RetryPolicy(backoff_base=1.0, backoff_max=4.0)

    assert [policy.backoff(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 4.0, 4.0]
