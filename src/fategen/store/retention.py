"""Retention: finished jobs and their images are deleted once older than a configured age.

A job's images are its grid (``<id>.webp``) and, when it made more than one, each image
(``<id>-<n>.webp``, n from 1; `image_path`); a job that started from an image also has that
image (``<id>-input.png``; `input_path`).

`prune` does one pass, `BATCH` jobs at a time: it asks SQLite for the expired ids (finished
jobs are not all in memory), deletes their images in a worker thread, then their rows in one
transaction. `Pruner.run` is the actor that calls it at start-up and then every ``every``
seconds. Queued and running jobs are never touched: only jobs whose status is finished and
whose ``finished`` time is old enough.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import attrs
import trio

from fategen.store.jobs import JobStore, result_path

log = logging.getLogger("fategen.retention")

_JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

#: Jobs deleted per transaction (and image files per thread call).
BATCH = 500


def image_path(output_dir: Path, job_id: str, n: int) -> Path:
    """The file of image ``n`` (1-based) of a job of more than one image."""
    return output_dir / f"{job_id}-{n}.webp"


def input_path(output_dir: Path, job_id: str) -> Path:
    """The image a job starts from, as fategen keeps it (a PNG, written when it was accepted)."""
    return output_dir / f"{job_id}-input.png"


def remove_orphan_inputs(output_dir: Path, has: Callable[[str], bool]) -> int:
    """Delete the input images no stored job has (blocking: run at start-up). An input image
    is written before its job's row is committed: a crash between the two leaves one. O(input
    images kept), one primary-key probe each."""
    removed = 0
    for path in output_dir.glob("*-input.png"):
        job_id = path.name.removesuffix("-input.png")
        if not _JOB_ID.fullmatch(job_id) or has(job_id):
            continue  # another file of the operator's, or a job's
        try:
            path.unlink()
            removed += 1
        except OSError as exc:
            log.warning("could not remove %s: %s", path, exc.strerror)
    if removed:
        log.info("removed %d input image(s) of jobs that were never added", removed)
    return removed


def result_files(output_dir: Path, job_id: str) -> list[Path]:
    """A job's files, to delete in this order (blocking): its input image, its images last to
    first, then its grid. They are written first to last, grid last, and deleted from the
    end, so a pass cut short leaves images 1 to k, all found by the next pass."""
    paths: list[Path] = []
    n = 1
    while (path := image_path(output_dir, job_id, n)).exists():
        paths.append(path)
        n += 1
    return [input_path(output_dir, job_id), *reversed(paths), result_path(output_dir, job_id)]


def _delete_files(output_dir: Path, job_ids: list[str]) -> None:
    """Delete the jobs' files (blocking: one thread call per batch)."""
    for job_id in job_ids:
        for path in result_files(output_dir, job_id):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not delete %s: %s", path, exc.strerror)


async def prune(
    store: JobStore, output_dir: Path, *, max_age: float, now: float, batch: int = BATCH
) -> int:
    """Delete the jobs that finished more than ``max_age`` seconds before ``now``, ``batch``
    at a time: files first (grids and each image, in a thread), then rows (one commit).
    Returns how many went.

    An image is deleted before its row: a pass cut short leaves rows whose images are gone
    (deleted by the next pass), never images no row points to."""
    before = now - max_age
    total = 0
    while True:
        doomed = await store.finished_before(before, batch)
        if not doomed:
            break
        await trio.to_thread.run_sync(_delete_files, output_dir, doomed)
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
