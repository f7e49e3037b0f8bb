"""The pull scheduler: resolve, then fetch and unpack every missing layer, then commit.

One place decides what runs at once. Each missing layer is one task: its download fills an
IngestFile on the event loop while a worker thread hashes, inflates and extracts the bytes
already there. A bounded number of layers run together. Blobs and snapshots commit as they
are verified; the image record commits last, so an image is visible only when all its
content is. A failed pull leaves no image record and no unverified blob or snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lstore.errors import IntegrityError, LstoreError
from lstore.store import locks
from lstore.store.content import ContentStore
from lstore.store.digest import Digest, chain_ids, layer_compression
from lstore.store.ingest import IngestFile
from lstore.store.layerjob import LayerOutcome, process_layer
from lstore.store.progress import LayerProgress, PullProgress
from lstore.store.snapshots import SnapshotStore, remove_tree
from lstore.store.trace import PullTrace

log = logging.getLogger(__name__)

# Layers processed at once. Each needs one worker thread for inflate and extract; more than
# the core count mostly adds contention, but downloads of the next layers should overlap.
DEFAULT_LAYER_CONCURRENCY = 4


@dataclass(frozen=True)
class LayerPlan:
    index: int
    descriptor: object  # lstore.store.manifest.Descriptor
    diff_id: Digest
    chain_id: Digest
    parent: str


class Puller:
    """Pulls layers of one resolved image into the content and snapshot stores."""

    def __init__(
        self,
        client: object,  # lstore.store.registry.client.RegistryClient
        content: ContentStore,
        snapshots: SnapshotStore,
        locks_dir: str,
        *,
        layer_concurrency: int = DEFAULT_LAYER_CONCURRENCY,
        progress: PullProgress | None = None,
        trace: PullTrace | None = None,
    ) -> None:
        self.client = client
        self.content = content
        self.snapshots = snapshots
        self.locks_dir = locks_dir
        self.progress = progress or PullProgress()
        self.trace = trace
        self._slots = asyncio.Semaphore(layer_concurrency)
        self._executor = ThreadPoolExecutor(
            max_workers=layer_concurrency, thread_name_prefix="lstore-unpack"
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def plan(self, layers: list, diff_ids: list[Digest]) -> list[LayerPlan]:
        chains = chain_ids(diff_ids)
        plans = []
        for index, descriptor in enumerate(layers):
            parent = str(chains[index - 1]) if index else ""
            plans.append(LayerPlan(index, descriptor, diff_ids[index], chains[index], parent))
            self.progress.layers.setdefault(
                descriptor.digest, LayerProgress(descriptor.digest, descriptor.size)
            )
        return plans

    async def pull_layers(self, ref: object, plans: list[LayerPlan]) -> None:
        """Fetch and unpack every layer that is missing; the first failure cancels the rest."""
        try:
            async with asyncio.TaskGroup() as group:
                for plan in plans:
                    group.create_task(self._pull_layer(ref, plan))
        except BaseExceptionGroup as group_error:
            raise _first_cause(group_error) from None

    async def _pull_layer(self, ref: object, plan: LayerPlan) -> None:
        digest = plan.descriptor.digest
        async with self._slots:
            async with locks.hold_async(self.locks_dir, "snapshot-" + plan.chain_id):
                need_snapshot = self.snapshots.get(plan.chain_id) is None
                async with locks.hold_async(self.locks_dir, "blob-" + digest):
                    need_blob = not self.content.has(digest)
                    if not need_blob and not need_snapshot:
                        self.progress.update(digest, state="present")
                        return
                    await self._fetch_and_unpack(ref, plan, need_blob, need_snapshot)
        self.progress.update(digest, state="done")

    async def _fetch_and_unpack(
        self, ref: object, plan: LayerPlan, need_blob: bool, need_snapshot: bool
    ) -> None:
        descriptor = plan.descriptor
        digest = Digest(descriptor.digest)
        compression = layer_compression(descriptor.media_type)
        if compression is None:
            raise LstoreError(
                f"layer {digest} has unsupported media type {descriptor.media_type}",
                digest=digest,
            )
        dest = self.snapshots.prepare() if need_snapshot else None
        try:
            if need_blob:
                outcome = await self._download(ref, descriptor, compression, dest, plan)
            else:
                outcome = await self._unpack_present(digest, compression, dest, plan)
            if dest is not None:
                self._event(digest, "commit", "start")
                self.snapshots.commit(dest, plan.chain_id, plan.parent, plan.diff_id, outcome.size)
                self._event(digest, "commit", "end")
                dest = None
        finally:
            if dest is not None:
                remove_tree(dest)

    async def _download(
        self, ref: object, descriptor, compression: str, dest: str | None, plan: LayerPlan
    ) -> LayerOutcome:
        digest = Digest(descriptor.digest)
        ingest = self.content.open_ingest(digest, descriptor.size)
        self.progress.update(digest, state="downloading")
        job = self._start_job(ingest.reader(), digest, compression, dest, plan)
        try:
            await self.client.fetch_blob(
                ref,
                descriptor,
                ingest,
                progress=self._download_progress(digest),
                trace=self.trace.fetch_trace(digest) if self.trace else None,
            )
            self._event(digest, "download", "end", descriptor.size)
            # shield: cancelling this task must not mark the worker's future done while
            # the thread still writes into the snapshot directory.
            outcome = await asyncio.shield(job)
        except BaseException as exc:
            ingest.fail(exc)
            await _settle(job)
            ingest.close()
            if isinstance(exc, IntegrityError):
                ingest.discard()
            raise
        ingest.close()
        self._event(digest, "commit", "start")
        self.content.commit_ingest(ingest, outcome.blob_digest, descriptor.media_type)
        self._event(digest, "commit", "end")
        return outcome

    def _download_progress(self, digest: Digest) -> Callable[[int], None]:
        received = 0
        self._event(digest, "download", "start")

        def update(nbytes: int) -> None:
            nonlocal received
            received += nbytes
            self.progress.update(digest, nbytes)
            if self.trace is not None:
                self.trace.progress(digest, "download", received)

        return update

    def _event(self, digest: str, stage: str, event: str, nbytes: int = 0) -> None:
        if self.trace is not None:
            self.trace.event(digest, stage, event, nbytes)

    async def _unpack_present(
        self, digest: Digest, compression: str, dest: str | None, plan: LayerPlan
    ) -> LayerOutcome:
        with open(self.content.blob_path(digest), "rb") as source:
            job = self._start_job(source, digest, compression, dest, plan)
            try:
                outcome = await asyncio.shield(job)
            except BaseException:
                await _settle(job)
                raise
        if outcome.blob_digest != digest:
            raise IntegrityError(
                f"stored blob {digest} is corrupt (content hashes to {outcome.blob_digest}); "
                "run 'lstore rmi' on the image and pull again",
                digest=digest,
                path=self.content.blob_path(digest),
            )
        return outcome

    def _start_job(
        self, source, digest: Digest, compression: str, dest: str | None, plan: LayerPlan
    ) -> asyncio.Future[LayerOutcome]:
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(
            self._executor,
            lambda: process_layer(
                source,
                layer_digest=digest,
                compression=compression,
                dest=dest,
                expected_diff_id=plan.diff_id,
                trace=self.trace,
            ),
        )


def _first_cause(group_error: BaseExceptionGroup) -> BaseException:
    # Report the failure that started the cancellation, not the cancellations it caused.
    errors = list(group_error.exceptions)
    for error in errors:
        if isinstance(error, BaseExceptionGroup):
            return _first_cause(error)
        if not isinstance(error, asyncio.CancelledError):
            return error
    return errors[0]


async def _settle(job: asyncio.Future) -> None:
    """Wait until the worker has stopped, before its snapshot directory is removed.

    Its own error is a consequence of the failure being raised, so it is retrieved here
    and not reported again.
    """
    await asyncio.wait([job])
    if not job.cancelled():
        job.exception()


def ingest_leftovers(ingest_dir: str) -> list[str]:
    """List partial downloads kept for resume (used by df)."""
    return [name for name in os.listdir(ingest_dir) if not name.endswith(".ranges")]


__all__ = ["Puller", "PullProgress", "LayerPlan", "IngestFile"]
