"""Overlay snapshots: one directory per layer, keyed by chain ID.

A layer unpacks into its own empty directory, independent of its parent's content (overlay
merges them at mount time), so layers of one image unpack in parallel. Each snapshot is built
under snapshots/tmp-<pid>-<n>/, made durable, renamed to snapshots/<id>/ and only then
recorded. Numeric ids keep overlay mount options short.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import shutil
from dataclasses import dataclass

from lstore.store.digest import Digest
from lstore.store.meta import Meta

log = logging.getLogger(__name__)

_TMP_PREFIX = "tmp-"
_tmp_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Snapshot:
    chain_id: Digest
    id: int
    parent: str
    diff_id: str
    size: int
    path: str


class SnapshotStore:
    """Snapshot directories under ROOT/snapshots and their records.

    `prepare` and `commit` are safe to run concurrently for different chain IDs; callers
    serialise work on one chain ID with its lock (store/locks.py).
    """

    def __init__(self, root: str, meta: Meta) -> None:
        self.dir = os.path.join(root, "snapshots")
        self.meta = meta
        os.makedirs(self.dir, exist_ok=True)

    def path(self, snapshot_id: int) -> str:
        return os.path.join(self.dir, str(snapshot_id))

    def get(self, chain_id: str) -> Snapshot | None:
        with self.meta.read() as txn:
            record = txn.get("snapshots", chain_id)
        if record is None:
            return None
        return self._from_record(chain_id, record)

    def list(self) -> list[Snapshot]:
        with self.meta.read() as txn:
            return [self._from_record(key, value) for key, value in txn.items("snapshots")]

    def prepare(self) -> str:
        """Create an empty temporary directory for a layer to unpack into."""
        name = f"{_TMP_PREFIX}{os.getpid()}-{next(_tmp_counter)}"
        path = os.path.join(self.dir, name)
        os.mkdir(path, 0o755)
        return path

    def commit(
        self, temporary: str, chain_id: Digest, parent: str, diff_id: Digest, size: int
    ) -> Snapshot:
        """Make an unpacked layer durable, move it to its numbered place and record it.

        A crash before the record leaves a numbered directory without a record, which
        `cleanup_orphans` removes; the record is never written before the directory is
        complete.
        """
        _syncfs(temporary)
        with self.meta.write() as txn:
            snapshot_id = txn.next_counter("snapshot")
        target = self.path(snapshot_id)
        os.rename(temporary, target)

        # Point of no return: the directory is in place under its id.
        record = {
            "id": snapshot_id,
            "parent": parent,
            "diff_id": diff_id,
            "size": size,
            "state": "committed",
        }
        with self.meta.write() as txn:
            txn.put("snapshots", chain_id, record)
        log.debug("committed snapshot %s as %s", chain_id, target)
        return self._from_record(chain_id, record)

    def remove(self, chain_id: str) -> None:
        """Delete a snapshot's record, then its directory; callers hold the gc lock."""
        snapshot = self.get(chain_id)
        if snapshot is None:
            return
        with self.meta.write() as txn:
            txn.delete("snapshots", chain_id)
        remove_tree(snapshot.path)

    def cleanup_orphans(self, *, include_numbered: bool) -> int:
        """Remove temporary dirs of dead processes and, when asked, unrecorded numbered dirs.

        Numbered dirs without a record can also belong to a commit in progress, so only gc,
        which holds the gc lock exclusively, passes include_numbered=True.
        """
        known = {str(s.id) for s in self.list()}
        removed = 0
        for name in os.listdir(self.dir):
            if name.startswith(_TMP_PREFIX):
                if _owner_alive(name):
                    continue
            elif not include_numbered or name in known:
                continue
            log.info("removing leftover snapshot directory %s", os.path.join(self.dir, name))
            remove_tree(os.path.join(self.dir, name))
            removed += 1
        return removed

    def _from_record(self, chain_id: str, record: dict) -> Snapshot:
        return Snapshot(
            chain_id=Digest(chain_id),
            id=record["id"],
            parent=record.get("parent", ""),
            diff_id=record.get("diff_id", ""),
            size=record.get("size", 0),
            path=self.path(record["id"]),
        )


def _owner_alive(name: str) -> bool:
    try:
        pid = int(name[len(_TMP_PREFIX) :].split("-")[0])
    except ValueError:
        return False
    if pid == os.getpid():
        return True
    return os.path.exists(f"/proc/{pid}")


def _syncfs(path: str) -> None:
    # One syncfs(2) flushes every file of the layer; an fsync per file costs far more.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), path)
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    """Delete a directory tree that may contain read-only dirs and whiteout devices."""

    def make_writable(function, failed_path, _exc_info) -> None:  # type: ignore[no-untyped-def]
        parent = os.path.dirname(failed_path)
        os.chmod(parent, 0o700)
        function(failed_path)

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=make_writable)
