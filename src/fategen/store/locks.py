"""`KeyedLocks`: one `trio.Lock` per key (a job id, an Idempotency-Key), for as long as needed.

Writes of one job must follow each other (each starts from the state the previous one left),
but writes of different jobs should not wait for each other: they share a commit.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Hashable
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)


class KeyedLocks(Generic[K]):
    """A lock per key, made on first use and dropped once no task holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[K, trio.Lock] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: K) -> AsyncIterator[None]:
        """Hold the lock of ``key`` (``async with locks.hold(key):``)."""
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = trio.Lock()
        try:
            async with lock:
                yield
        finally:
            # Released to nobody (a waiter would own it now): nothing refers to it any more.
            if (
                not lock.locked()
                and not lock.statistics().tasks_waiting
                and self._locks.get(key) is lock
            ):
                del self._locks[key]

    def __len__(self) -> int:
        """How many keys have a lock now (held or awaited)."""
        return len(self._locks)
