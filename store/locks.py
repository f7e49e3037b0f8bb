"""Cross-process locks on files under ROOT/locks/.

flock(2) locks belong to an open file description, so two opens in one process exclude each
other just as two processes do: the same lock serves threads, tasks and other lstore
processes alike. The kernel drops a lock when its holder dies, so a crash never leaves a
lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager


def _lock_path(locks_dir: str, name: str) -> str:
    # Digests contain ':' and chain IDs are digests too; keep file names plain.
    return os.path.join(locks_dir, name.replace(":", "-").replace("/", "_") + ".lock")


def _open(locks_dir: str, name: str) -> int:
    return os.open(_lock_path(locks_dir, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


@contextmanager
def hold(locks_dir: str, name: str, *, shared: bool = False) -> Iterator[None]:
    """Hold the named lock for the block, blocking the calling thread until it is free."""
    fd = _open(locks_dir, name)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@asynccontextmanager
async def hold_async(locks_dir: str, name: str, *, shared: bool = False) -> AsyncIterator[bool]:
    """Hold the named lock for the block without blocking the event loop.

    Yields True when the lock was free at once and False when another holder had to finish
    first, so the caller knows to check whether that holder already did the work.
    """
    fd = _open(locks_dir, name)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
            await _wait_for_lock(fd, mode)
        yield free
    finally:
        os.close(fd)


async def _wait_for_lock(fd: int, mode: int) -> None:
    import asyncio  # here, so that the synchronous users of this module do not load asyncio

    # Poll instead of a blocking flock in a thread: a cancelled pull must not leave a thread
    # behind that later takes the lock and never releases it.
    delay = 0.005
    while True:
        await asyncio.sleep(delay)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            delay = min(delay * 2, 0.1)
