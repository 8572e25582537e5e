"""Retention: finished jobs and their images are deleted once older than a configured age.

`prune` does one pass (files first, in a worker thread, then rows); `Pruner.run` is the actor
that calls it at start-up and then every ``every`` seconds. Queued and running jobs are never
touched: only jobs whose status is finished and whose ``finished`` time is old enough.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import attrs
import trio

from fategen.store.jobs import Job, JobStore, result_path

log = logging.getLogger("fategen.retention")


def expired(store: JobStore, *, max_age: float, now: float) -> list[Job]:
    """Finished jobs that finished more than ``max_age`` seconds before ``now``."""
    limit = now - max_age
    return [
        j
        for j in store.all_jobs()
        if j.status.finished and j.finished is not None and j.finished < limit
    ]


def _delete_files(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not delete %s: %s", path, exc.strerror)


async def prune(store: JobStore, output_dir: Path, *, max_age: float, now: float) -> int:
    """Delete the expired jobs' images (in a thread), then their rows; how many went."""
    doomed = expired(store, max_age=max_age, now=now)
    if not doomed:
        return 0
    await trio.to_thread.run_sync(_delete_files, [result_path(output_dir, j.id) for j in doomed])
    # A job cannot come back to life, but check again after the thread: only finished ones go.
    await store.delete([j for j in doomed if j.status.finished])
    log.info("pruned %d finished job(s) older than %.0f hours", len(doomed), max_age / 3600)
    return len(doomed)


@attrs.define(eq=False)
class Pruner:
    """Prunes every ``every`` seconds (wall-clock ``now`` from ``clock``: tests pass a fake)."""

    store: JobStore
    output_dir: Path
    max_age: float
    every: float
    clock: Callable[[], float] = time.time

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        task_status.started()
        while True:
            try:
                await prune(self.store, self.output_dir, max_age=self.max_age, now=self.clock())
            except Exception:  # a failed pass (disk, database) is retried next time
                log.exception("pruning old jobs failed")
            await trio.sleep(self.every)
