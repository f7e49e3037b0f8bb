"""Metadata in one LMDB environment with a named database per record kind.

Values are JSON objects keyed by text. LMDB allows one write transaction at a time across all
processes that open the environment, which is what makes allocation (snapshot ids, IP
addresses) race-free without other locks. Write transactions must stay short: never hold one
across network I/O, bulk disk I/O or an `await`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lmdb

from lstore.errors import StoreError

# Named databases. Each value is a JSON object; see docs/design.md for the fields.
DATABASES = (
    "images",  # image name (e.g. docker.io/library/busybox:latest) -> image record
    "blobs",  # digest -> {size, media_type}
    "snapshots",  # chain ID -> {id, parent, diff_id, size, state}
    "containers",  # container id -> container record
    "names",  # container name -> container id
    "ipam",  # "<network>/<address>" -> {container}
    "networks",  # network name -> {subnet, gateway, bridge}
    "volumes",  # volume name -> {created, path}
    "mounts",  # mount point of `lstore mount` -> {image, digest, chain_ids}
    "counters",  # counter name -> {value}
)

# LMDB reserves address space, not disk, for the map: a large value costs nothing until used.
MAP_SIZE = 8 << 30

_environments: dict[str, lmdb.Environment] = {}
_environments_lock = threading.Lock()


def _open_environment(path: str) -> lmdb.Environment:
    # LMDB forbids opening one environment twice in a process, so share one handle per path.
    real = os.path.realpath(path)
    with _environments_lock:
        env = _environments.get(real)
        if env is None:
            os.makedirs(real, exist_ok=True)
            try:
                env = lmdb.open(
                    real, map_size=MAP_SIZE, max_dbs=len(DATABASES) + 1, max_readers=512
                )
            except lmdb.Error as exc:
                raise StoreError(
                    f"cannot open metadata database {real}: {exc}; check the store root",
                    path=real,
                ) from exc
            _environments[real] = env
        return env


def forget_environments() -> None:
    """Close the LMDB handles inherited from the parent; call first thing in a forked child.

    LMDB forbids using a handle across fork(), and py-lmdb refuses to open an environment
    that is still open in the process. Closing in the child is safe for the parent. LMDB
    clears only the reader slots of the closing pid, and the parent keeps its fcntl locks.
    The shared mutexes are destroyed only by an exclusive holder, which the child cannot be
    while the parent has the environment open.
    """
    with _environments_lock:
        for env in _environments.values():
            env.close()
        _environments.clear()


class Transaction:
    """A read or write transaction over the named databases, with JSON values."""

    def __init__(self, txn: lmdb.Transaction, handles: dict[str, Any]) -> None:
        self._txn = txn
        self._handles = handles

    def get(self, db: str, key: str) -> dict[str, Any] | None:
        raw = self._txn.get(key.encode(), db=self._handles[db])
        if raw is None:
            return None
        return json.loads(raw)

    def put(self, db: str, key: str, value: dict[str, Any]) -> None:
        data = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
        self._txn.put(key.encode(), data, db=self._handles[db])

    def delete(self, db: str, key: str) -> bool:
        return self._txn.delete(key.encode(), db=self._handles[db])

    def items(self, db: str, prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (key, value) pairs in key order, only those whose key starts with `prefix`."""
        cursor = self._txn.cursor(db=self._handles[db])
        start = prefix.encode()
        if not cursor.set_range(start):
            return
        for raw_key, raw_value in cursor:
            if not raw_key.startswith(start):
                break
            yield raw_key.decode(), json.loads(raw_value)

    def next_counter(self, name: str) -> int:
        """Increment and return a counter; only valid inside a write transaction."""
        record = self.get("counters", name) or {"value": 0}
        record["value"] += 1
        self.put("counters", name, record)
        return int(record["value"])


class Meta:
    """The metadata environment of one store root; safe to share between threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._env = _open_environment(path)
        self._handles: dict[str, Any] = {}
        with self._env.begin(write=True) as txn:
            for name in DATABASES:
                self._handles[name] = self._env.open_db(name.encode(), txn=txn)

    @contextmanager
    def read(self) -> Iterator[Transaction]:
        with self._env.begin(write=False, buffers=False) as txn:
            yield Transaction(txn, self._handles)

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        """Open a write transaction; it commits when the block ends without an exception."""
        try:
            with self._env.begin(write=True) as txn:
                yield Transaction(txn, self._handles)
        except lmdb.MapFullError as exc:
            raise StoreError(
                f"metadata database {self.path} is full; run 'lstore gc'", path=self.path
            ) from exc

    def sync(self) -> None:
        self._env.sync(True)
