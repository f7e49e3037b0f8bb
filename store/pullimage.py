"""`lstore pull` end to end: resolve the reference, pull missing layers, commit the image.

The event loop is uvloop when installed. Pulls hold the gc lock shared for their whole run, so
`gc` never removes content between a layer's commit and the image record's.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from lstore.errors import IntegrityError
from lstore.store import locks
from lstore.store.digest import Digest
from lstore.store.images import GC_LOCK, ImageRecord
from lstore.store.progress import PullProgress
from lstore.store.reference import Reference, parse_reference
from lstore.store.trace import PullTrace

log = logging.getLogger(__name__)


def run_pull(store: Any, text: str, **options: Any) -> str:
    """Pull `text` into `store` and return the name under which the image was recorded.

    An image whose content is all present is recorded by the warm-pull shortcut, without
    importing the HTTP client. A traced pull always takes the full path.
    """
    result = run_pulls(store, [text], progress={text: options.pop("progress", None)}, **options)
    outcome = result[text]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def run_pulls(
    store: Any, texts: list[str], *, progress: dict[str, Any] | None = None, **options: Any
) -> dict[str, str | BaseException]:
    """Pull several images at once in one event loop; return each name or error by text.

    Layers that two images share are fetched and unpacked once: the second pull waits on
    the first one's blob and snapshot locks. Raises KeyboardInterrupt on SIGINT or SIGTERM.
    """
    from lstore.store.registry.settings import RegistrySettings
    from lstore.store.warmpull import warm_pull

    options["settings"] = options.get("settings") or RegistrySettings.from_environment()
    progress = progress or {}
    results: dict[str, str | BaseException] = {}
    remaining = []
    for text in texts:
        name = None
        if not options.get("trace_path"):
            name = warm_pull(
                store, text, platform=options.get("platform"), settings=options["settings"]
            )
        if name is None:
            remaining.append(text)
        else:
            results[text] = name
    if remaining:
        results.update(_run_loop(_pull_all(store, remaining, progress, options)))
    return results


def _run_loop(main: Any) -> dict[str, str | BaseException]:
    import asyncio

    try:
        import uvloop
    except ImportError:  # uvloop is optional: the default loop works, only slower
        outcome = asyncio.run(_interruptible(main))
    else:
        outcome = uvloop.run(_interruptible(main))
    if outcome is None:
        raise KeyboardInterrupt
    return outcome


async def _pull_all(
    store: Any, texts: list[str], progress: dict[str, Any], options: dict[str, Any]
) -> dict[str, str | BaseException]:
    import asyncio

    pulls = [pull_image(store, text, progress=progress.get(text), **options) for text in texts]
    outcomes = await asyncio.gather(*pulls, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, asyncio.CancelledError):
            raise outcome
    return dict(zip(texts, outcomes))


async def _interruptible(pull: Any) -> Any:
    """Run pulls that SIGINT and SIGTERM cancel cleanly; return None when interrupted.

    Cancellation unwinds every layer task, so workers stop and temporary snapshot
    directories are removed before the process exits.
    """
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(pull)
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
        return None
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def pull_image(
    store: Any,
    text: str,
    *,
    platform: str | None = None,
    settings: Any = None,
    progress: PullProgress | None = None,
    layer_concurrency: int | None = None,
    trace_path: str | None = None,
) -> str:
    """Pull one image; on any error nothing new is recorded except verified content."""
    from lstore.store.platform import host_platform, parse_platform
    from lstore.store.registry.client import RegistryClient
    from lstore.store.registry.settings import RegistrySettings

    ref = parse_reference(text)
    requested = parse_platform(platform) if platform else host_platform()
    settings = settings or RegistrySettings.from_environment()
    progress = progress or PullProgress()

    async with locks.hold_async(store.locks_dir, GC_LOCK, shared=True):
        store.snapshots.cleanup_orphans(include_numbered=False)
        async with RegistryClient(settings) as client:
            resolved = await client.resolve(ref, requested, strict=platform is not None)
            record = _image_record(ref, resolved)
            _store_small_blobs(store, resolved)
            trace = PullTrace(trace_path) if trace_path else None
            try:
                await _pull_layers(
                    store, client, ref, resolved, progress, layer_concurrency, trace
                )
            finally:
                if trace is not None:
                    trace.close()
        store.record_image(record)
    log.info("pulled %s (%s)", record.name, record.digest)
    return record.name


async def _pull_layers(
    store: Any,
    client: Any,
    ref: Reference,
    resolved: Any,
    progress: PullProgress,
    layer_concurrency: int | None,
    trace: PullTrace | None,
) -> None:
    from lstore.store.pull import Puller

    extra = {} if layer_concurrency is None else {"layer_concurrency": layer_concurrency}
    puller = Puller(
        client,
        store.content,
        store.snapshots,
        store.locks_dir,
        progress=progress,
        trace=trace,
        **extra,
    )
    try:
        plans = puller.plan(resolved.manifest.layers, resolved.config.diff_ids)
        await puller.pull_layers(ref, plans)
    finally:
        puller.close()


def _image_record(ref: Reference, resolved: Any) -> ImageRecord:
    layers = resolved.manifest.layers
    diff_ids = [Digest(d) for d in resolved.config.diff_ids]
    if len(layers) != len(diff_ids):
        raise IntegrityError(
            f"image {ref}: manifest {resolved.digest} lists {len(layers)} layers but its "
            f"config lists {len(diff_ids)} diff_ids",
            ref=str(ref),
            digest=resolved.digest,
        )
    from lstore.store.digest import chain_ids

    config_raw = resolved.config.raw if hasattr(resolved.config, "raw") else {}
    return ImageRecord(
        name=str(ref),
        digest=resolved.digest,
        media_type=resolved.media_type,
        config_digest=resolved.manifest.config.digest,
        index_digest=resolved.index_digest or "",
        platform=str(resolved.platform) if getattr(resolved, "platform", None) else "",
        layers=[
            {"digest": d.digest, "size": d.size, "media_type": d.media_type} for d in layers
        ],
        diff_ids=diff_ids,
        chain_ids=chain_ids(diff_ids),
        created=config_raw.get("created", "") if isinstance(config_raw, dict) else "",
        pulled=time.time(),
    )


def _store_small_blobs(store: Any, resolved: Any) -> None:
    store.content.write(resolved.manifest_bytes, Digest(resolved.digest), resolved.media_type)
    if resolved.index_digest:
        store.content.write(
            resolved.index_bytes, Digest(resolved.index_digest), resolved.index_media_type
        )
    config = resolved.manifest.config
    store.content.write(resolved.config_bytes, Digest(config.digest), config.media_type)
