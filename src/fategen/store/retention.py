"""Retention: finished jobs and their images are deleted once older than a configured age.

`prune` does one pass, `BATCH` jobs at a time: it asks SQLite for the expired ids (finished
jobs are not all in memory), deletes their images in a worker thread, then their rows in one
transaction. `Pruner.run` is the actor that calls it at start-up and then every ``every``
seconds. Queued and running jobs are never touched: only jobs whose status is finished and
whose ``finished`` time is old enough.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import attrs
import trio

from fategen.store.jobs import JobStore, result_path

log = logging.getLogger("fategen.retention")

#: Jobs deleted per transaction (and image files per thread call).
BATCH = 500


def _delete_files(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not delete %s: %s", path, exc.strerror)


async def prune(
    store: JobStore, output_dir: Path, *, max_age: float, now: float, batch: int = BATCH
) -> int:
    """Delete the jobs that finished more than ``max_age`` seconds before ``now``, ``batch``
    at a time: images first (in a thread), then rows (one commit). Returns how many went.

    An image is deleted before its row: a pass cut short leaves rows whose images are gone
    (deleted by the next pass), never images no row points to."""
    before = now - max_age
    total = 0
    while True:
        doomed = await store.finished_before(before, batch)
        if not doomed:
            break
        await trio.to_thread.run_sync(
            _delete_files, [result_path(output_dir, job_id) for job_id in doomed]
        )
        await store.delete(doomed)
        total += len(doomed)
        if len(doomed) < batch:
            break
    if total:
        log.info("pruned %d finished job(s) older than %.0f hours", total, max_age / 3600)
    return total


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
