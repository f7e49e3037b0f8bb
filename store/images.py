"""Image records, and the garbage collection and disk usage built on them.

An image record names everything the image needs: its manifest, optional index and config
blobs, its layer blobs and the chain IDs of its snapshots. gc keeps exactly what image and
container records reference and removes the rest, under the exclusive gc lock so that it never
races a pull (pulls hold the same lock shared).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from lstore.store.content import ContentStore
from lstore.store.digest import Digest
from lstore.store.meta import Meta
from lstore.store.snapshots import SnapshotStore, remove_tree

log = logging.getLogger(__name__)

GC_LOCK = "gc"


@dataclass
class ImageRecord:
    name: str
    digest: str  # manifest digest
    media_type: str
    config_digest: str
    index_digest: str
    platform: str
    layers: list[dict[str, Any]]  # {digest, size, media_type}
    diff_ids: list[str]
    chain_ids: list[str]
    created: str
    pulled: float
    layer_dirs: list[str] = field(default_factory=list)  # bottom layer first
    config: dict[str, Any] = field(default_factory=dict)  # full image config JSON

    @property
    def size(self) -> int:
        """Compressed size of the layers, as registries and `docker images` report it."""
        return sum(layer["size"] for layer in self.layers)

    @property
    def image_id(self) -> str:
        """The config digest, which docker and containerd show as the image ID."""
        return self.config_digest

    def to_record(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "media_type": self.media_type,
            "config_digest": self.config_digest,
            "index_digest": self.index_digest,
            "platform": self.platform,
            "layers": self.layers,
            "diff_ids": self.diff_ids,
            "chain_ids": self.chain_ids,
            "created": self.created,
            "pulled": self.pulled,
        }

    @classmethod
    def from_record(cls, name: str, record: dict[str, Any]) -> "ImageRecord":
        return cls(
            name=name,
            digest=record["digest"],
            media_type=record.get("media_type", ""),
            config_digest=record["config_digest"],
            index_digest=record.get("index_digest", ""),
            platform=record.get("platform", ""),
            layers=record.get("layers", []),
            diff_ids=record.get("diff_ids", []),
            chain_ids=record.get("chain_ids", []),
            created=record.get("created", ""),
            pulled=record.get("pulled", 0.0),
        )

    def referenced_blobs(self) -> set[str]:
        blobs = {self.digest, self.config_digest}
        if self.index_digest:
            blobs.add(self.index_digest)
        blobs.update(layer["digest"] for layer in self.layers)
        return blobs


def list_images(meta: Meta) -> list[ImageRecord]:
    with meta.read() as txn:
        return [ImageRecord.from_record(key, value) for key, value in txn.items("images")]


def load_details(record: ImageRecord, content: ContentStore, snapshots: SnapshotStore) -> None:
    """Fill in the image config and the snapshot directories of an image record."""
    record.config = json.loads(content.read(Digest(record.config_digest)))
    dirs = []
    for chain_id in record.chain_ids:
        snapshot = snapshots.get(chain_id)
        if snapshot is None:
            raise FileNotFoundError(f"snapshot {chain_id} of image {record.name} is missing")
        dirs.append(snapshot.path)
    record.layer_dirs = dirs


@dataclass
class GcReport:
    blobs: int = 0
    snapshots: int = 0
    ingest: int = 0
    bytes_freed: int = 0


def collect_garbage(
    meta: Meta, content: ContentStore, snapshots: SnapshotStore
) -> GcReport:
    """Remove blobs and snapshots that no image or container references.

    The caller holds the gc lock exclusively. Records are deleted before files, so a crash
    part-way leaves only unrecorded files, which the next gc removes.
    """
    report = GcReport()
    keep_blobs, keep_chains = _referenced(meta)

    with meta.read() as txn:
        blob_records = dict(txn.items("blobs"))
    for digest, record in blob_records.items():
        if digest not in keep_blobs:
            content.delete(Digest(digest))
            report.blobs += 1
            report.bytes_freed += record.get("size", 0)

    for snapshot in snapshots.list():
        if snapshot.chain_id not in keep_chains:
            snapshots.remove(snapshot.chain_id)
            report.snapshots += 1
            report.bytes_freed += snapshot.size

    report.snapshots += snapshots.cleanup_orphans(include_numbered=True)
    report.blobs += _remove_unrecorded_blobs(content, set(blob_records) & keep_blobs)
    ingest_bytes = _ingest_bytes(content)
    report.ingest += _remove_ingest(content)
    report.bytes_freed += ingest_bytes
    return report


def _referenced(meta: Meta) -> tuple[set[str], set[str]]:
    blobs: set[str] = set()
    chains: set[str] = set()
    for image in list_images(meta):
        blobs |= image.referenced_blobs()
        chains.update(image.chain_ids)
    with meta.read() as txn:
        for _key, container in txn.items("containers"):
            chains.update(container.get("chain_ids", []))
        for _key, mount in txn.items("mounts"):
            chains.update(mount.get("chain_ids", []))
    return blobs, chains


def _remove_unrecorded_blobs(content: ContentStore, recorded: set[str]) -> int:
    removed = 0
    directory = os.path.join(content.blobs_dir, "sha256")
    for name in os.listdir(directory):
        if f"sha256:{name}" not in recorded:
            log.info("removing unrecorded blob file %s", os.path.join(directory, name))
            os.unlink(os.path.join(directory, name))
            removed += 1
    return removed


def _remove_ingest(content: ContentStore) -> int:
    # Partial downloads are kept for resume, but gc runs with no pull in progress (it holds
    # the gc lock exclusively), so every partial file is abandoned by now.
    removed = 0
    for name in os.listdir(content.ingest_dir):
        path = os.path.join(content.ingest_dir, name)
        if os.path.isdir(path):
            remove_tree(path)
        else:
            os.unlink(path)
        removed += 1
    return removed


def _ingest_bytes(content: ContentStore) -> int:
    # Allocated blocks, not sizes: partial downloads are sparse files of the full size.
    total = 0
    for name in os.listdir(content.ingest_dir):
        try:
            total += os.lstat(os.path.join(content.ingest_dir, name)).st_blocks * 512
        except FileNotFoundError:
            continue
    return total


def disk_usage(meta: Meta, content: ContentStore, snapshots: SnapshotStore) -> dict[str, Any]:
    """Return counts and sizes per kind of content, as `lstore df` shows them."""
    images = list_images(meta)
    keep_blobs, keep_chains = _referenced(meta)
    with meta.read() as txn:
        blob_sizes = {key: value.get("size", 0) for key, value in txn.items("blobs")}
        containers = sum(1 for _ in txn.items("containers"))
        volumes = sum(1 for _ in txn.items("volumes"))
    snapshot_list = snapshots.list()
    ingest_bytes = _ingest_bytes(content)
    return {
        # Images are counted by ID, as docker does, not once per name.
        "images": len({image.config_digest for image in images}),
        "blobs": len(blob_sizes),
        "blob_bytes": sum(blob_sizes.values()),
        "reclaimable_blob_bytes": sum(
            size for key, size in blob_sizes.items() if key not in keep_blobs
        ),
        "snapshots": len(snapshot_list),
        "snapshot_bytes": sum(s.size for s in snapshot_list),
        "reclaimable_snapshot_bytes": sum(
            s.size for s in snapshot_list if s.chain_id not in keep_chains
        ),
        "containers": containers,
        "volumes": volumes,
        "ingest_bytes": ingest_bytes,
    }


def now() -> float:
    return time.time()
