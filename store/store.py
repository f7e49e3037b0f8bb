"""The store facade that the CLI and the runner use: images, pull, rmi, gc, df, check.

Opening a store imports nothing heavy: the registry client (aiohttp) is imported only when a
pull has to contact a registry.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from lstore.errors import (
    AlreadyExistsError,
    IntegrityError,
    InvalidReferenceError,
    LstoreError,
    NotFoundError,
    StoreError,
)
from lstore.store import locks
from lstore.store.content import ContentStore
from lstore.store.digest import Digest
from lstore.store.images import (
    GC_LOCK,
    GcReport,
    ImageRecord,
    collect_garbage,
    disk_usage,
    list_images,
    load_details,
)
from lstore.store.meta import Meta
from lstore.store.reference import parse_reference
from lstore.store.snapshots import SnapshotStore

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/var/lib/lstore"


def default_root() -> str:
    return os.environ.get("LSTORE_ROOT") or DEFAULT_ROOT


@dataclass
class CheckReport:
    problems: list[str]

    @property
    def clean(self) -> bool:
        return not self.problems


class Store:
    """One store root on disk. Safe to use from several processes at once."""

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or default_root())
        self.locks_dir = os.path.join(self.root, "locks")
        self.containers_dir = os.path.join(self.root, "containers")
        self.volumes_dir = os.path.join(self.root, "volumes")
        for path in (self.locks_dir, self.containers_dir, self.volumes_dir):
            os.makedirs(path, exist_ok=True)
        self.meta = Meta(os.path.join(self.root, "meta"))
        self.content = ContentStore(self.root, self.meta)
        self.snapshots = SnapshotStore(self.root, self.meta)

    # Images.

    def lookup_image(self, text: str) -> ImageRecord:
        """Find a pulled image by reference, or by a prefix (12+ hex) of its ID or digest."""
        record = self._find_record(text)
        if record is None:
            raise NotFoundError(
                f"image {text!r} is not in the store at {self.root}; run 'lstore pull {text}'",
                ref=text,
                path=self.root,
            )
        return self._with_details(record)

    def find_image(self, text: str) -> ImageRecord | None:
        """Like lookup_image, but returns None when the image or its content is missing."""
        record = self._find_record(text)
        if record is None:
            return None
        try:
            return self._with_details(record)
        except StoreError:
            return None

    def _with_details(self, record: ImageRecord) -> ImageRecord:
        """Load an image's config and snapshot directories; StoreError when any is missing."""
        try:
            load_details(record, self.content, self.snapshots)
        except (FileNotFoundError, NotFoundError) as exc:
            raise StoreError(
                f"image {record.name} is incomplete in {self.root} ({exc}); run "
                f"'lstore check', then 'lstore rmi {record.name}' and pull it again",
                ref=record.name,
                path=self.root,
            ) from exc
        missing = [path for path in record.layer_dirs if not os.path.isdir(path)]
        if missing:
            raise StoreError(
                f"image {record.name} is incomplete: snapshot directory {missing[0]} is "
                f"missing; run 'lstore rmi {record.name}' and pull it again",
                ref=record.name,
                path=missing[0],
            )
        return record

    def images(self) -> list[ImageRecord]:
        return list_images(self.meta)

    def record_image(self, record: ImageRecord) -> None:
        """Commit an image record; the caller has committed all content it references."""
        with self.meta.write() as txn:
            txn.put("images", record.name, record.to_record())

    def pull(self, text: str, **options: Any) -> ImageRecord:
        """Pull an image, then return its record with details; see store/pullimage.py."""
        from lstore.store.pullimage import run_pull

        name = run_pull(self, text, **options)
        return self.lookup_image(name)

    def pull_many(
        self, texts: list[str], **options: Any
    ) -> dict[str, ImageRecord | LstoreError]:
        """Pull several images concurrently; return each record, or its error, by text."""
        from lstore.store.pullimage import run_pulls

        results: dict[str, ImageRecord | LstoreError] = {}
        for text, outcome in run_pulls(self, texts, **options).items():
            if isinstance(outcome, LstoreError):
                results[text] = outcome
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                results[text] = self.lookup_image(outcome)
        return results

    def remove_image(self, text: str, *, force: bool = False) -> list[str]:
        """Remove image names, then the content no other image or container references.

        Returns the names removed. An image used by a container is refused unless `force`,
        as docker does.
        """
        record = self._find_record(text)
        if record is None:
            raise NotFoundError(f"image {text!r} not found in {self.root}", ref=text)
        removed = self._names_for(text, record)
        other_names = [
            image.name
            for image in self.images()
            if image.digest == record.digest and image.name not in removed
        ]
        # With another name left, removing this one only untags, as docker does, so the
        # content stays and its users are no obstacle.
        users = [] if other_names else self._containers_using(record.digest)
        if users and not force:
            raise AlreadyExistsError(
                f"image {record.name} is used by container {users[0][:12]}; "
                "remove the container first or use --force",
                ref=record.name,
            )
        mounts = [] if other_names else self._mounts_using(record.digest)
        if mounts and not force:
            raise AlreadyExistsError(
                f"image {record.name} is mounted at {mounts[0]}; run 'lstore umount "
                f"{mounts[0]}' first or use --force",
                ref=record.name,
            )
        with locks.hold(self.locks_dir, GC_LOCK):
            with self.meta.write() as txn:
                for name in removed:
                    txn.delete("images", name)
            collect_garbage(self.meta, self.content, self.snapshots)
        return removed

    def mount_image(self, text: str, target: str) -> ImageRecord:
        """Mount an image's layers read-only at `target` and record the mount point.

        The record comes first, so gc keeps the layers from the moment the mount exists;
        a failed mount removes it again.
        """
        from lstore.store.overlay import mount_overlay

        target = os.path.realpath(target)
        _check_mount_point(target)
        image = self.lookup_image(text)
        record = {"image": image.name, "digest": image.digest, "chain_ids": image.chain_ids}
        with self.meta.write() as txn:
            if txn.get("mounts", target) is not None:
                raise AlreadyExistsError(
                    f"{target} is already an lstore mount; run 'lstore umount {target}' first",
                    path=target,
                )
            txn.put("mounts", target, record)
        try:
            mount_overlay(target, image.layer_dirs, readonly=True)
        except BaseException:
            with self.meta.write() as txn:
                txn.delete("mounts", target)
            raise
        return image

    def unmount_image(self, target: str) -> None:
        """Unmount a mount point made by `mount_image`; other mounts are refused."""
        from lstore.store.overlay import unmount

        target = os.path.realpath(target)
        with self.meta.read() as txn:
            record = txn.get("mounts", target)
        if record is None:
            raise NotFoundError(
                f"{target} was not mounted by 'lstore mount' with store {self.root}",
                path=target,
            )
        if is_mount_point(target):
            unmount(target)
        with self.meta.write() as txn:
            txn.delete("mounts", target)

    def gc(self) -> GcReport:
        """Remove unreferenced blobs, snapshots and partial downloads.

        Waits for running pulls to finish, since they hold the gc lock shared.
        """
        with locks.hold(self.locks_dir, GC_LOCK):
            return collect_garbage(self.meta, self.content, self.snapshots)

    def df(self) -> dict[str, Any]:
        return disk_usage(self.meta, self.content, self.snapshots)

    def check(self, *, verify_content: bool = False) -> CheckReport:
        """Check that every record has its file and every image its content.

        With `verify_content`, blobs are hashed again as well. Leftover files without records
        are reported too; `gc` removes them.
        """
        problems: list[str] = []
        with self.meta.read() as txn:
            blobs = dict(txn.items("blobs"))
        for digest, record in blobs.items():
            problems += self._check_blob(Digest(digest), record, verify_content)
        chains = {str(s.chain_id): s for s in self.snapshots.list()}
        for snapshot in chains.values():
            if not os.path.isdir(snapshot.path):
                problems.append(f"snapshot {snapshot.chain_id}: directory {snapshot.path} missing")
        for image in self.images():
            for digest in image.referenced_blobs():
                if digest not in blobs:
                    problems.append(f"image {image.name}: blob {digest} not recorded")
            for chain_id in image.chain_ids:
                if chain_id not in chains:
                    problems.append(f"image {image.name}: snapshot {chain_id} not recorded")
        return CheckReport(problems)

    # Internals.

    def _check_blob(self, digest: Digest, record: dict[str, Any], verify: bool) -> list[str]:
        path = self.content.blob_path(digest)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return [f"blob {digest}: file {path} missing"]
        if size != record.get("size"):
            return [f"blob {digest}: file has {size} bytes, record says {record.get('size')}"]
        if verify:
            hasher = digest.new_hash()
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    hasher.update(chunk)
            if Digest.from_hash(hasher) != digest:
                return [f"blob {digest}: content does not match its digest"]
        return []

    def _find_record(self, text: str) -> ImageRecord | None:
        with self.meta.read() as txn:
            try:
                name = str(parse_reference(text))
            except InvalidReferenceError:  # not a reference: it may be an ID prefix
                name = None
            if name is not None:
                record = txn.get("images", name)
                if record is not None:
                    return ImageRecord.from_record(name, record)
            prefix = text.removeprefix("sha256:")
            if len(prefix) < 12:
                return None
            for key, value in txn.items("images"):
                for digest in (value["digest"], value["config_digest"]):
                    if digest.removeprefix("sha256:").startswith(prefix):
                        return ImageRecord.from_record(key, value)
        return None

    def _names_for(self, text: str, record: ImageRecord) -> list[str]:
        # An ID or digest removes every name of that image; a name removes only itself.
        try:
            if str(parse_reference(text)) == record.name:
                return [record.name]
        except InvalidReferenceError:
            pass
        return [image.name for image in self.images() if image.digest == record.digest]

    def _mounts_using(self, manifest_digest: str) -> list[str]:
        with self.meta.read() as txn:
            return [
                key for key, value in txn.items("mounts") if value["digest"] == manifest_digest
            ]

    def _containers_using(self, manifest_digest: str) -> list[str]:
        with self.meta.read() as txn:
            return [
                key
                for key, value in txn.items("containers")
                if value.get("image_digest") == manifest_digest
            ]


def is_mount_point(path: str) -> bool:
    """Tell whether `path` is a mount point, bind mounts of the same filesystem included.

    os.path.ismount compares device numbers, so it misses a read-only bind mount of a
    snapshot directory, which is what a one-layer image mounts as.
    """
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            field = line.split(" ", 5)[4]
            # mountinfo escapes space, tab, newline and backslash as octal.
            decoded = field.encode().decode("unicode_escape").encode("latin-1").decode()
            if decoded == path:
                return True
    return False


def _check_mount_point(target: str) -> None:
    if not os.path.isdir(target):
        raise NotFoundError(
            f"mount point {target} does not exist or is not a directory; create it first",
            path=target,
        )
    if is_mount_point(target):
        raise AlreadyExistsError(
            f"{target} is already a mount point; choose an empty directory", path=target
        )


def read_json_blob(store: Store, digest: str) -> dict[str, Any]:
    data = store.content.read(Digest(digest))
    try:
        return json.loads(data)
    except ValueError as exc:
        raise IntegrityError(
            f"stored blob {digest} is not valid JSON", digest=digest
        ) from exc
