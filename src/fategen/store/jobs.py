"""The job store: the one source of truth for job state (the types are in `model`).

Every change goes through `JobStore`, which writes it to SQLite (in a worker thread) before it
becomes visible, then wakes whoever waits on that job. Readers (the HTTP front end) get frozen
`JobView` snapshots and never touch the mutable `Job`.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import attrs
import trio

from fategen.store.model import Job, JobStatus, JobView
from fategen.store.sqlite import JobDB

__all__ = ["POSITIONS_MAX_AGE", "Job", "JobStatus", "JobStore", "JobView", "result_path"]

log = logging.getLogger("fategen.jobs")


#: The longest queue positions are reused without a change (the policy's order also moves with
#: time: a job passed over for too long may no longer be passed over).
POSITIONS_MAX_AGE = 0.5


class JobStore:
    """Holds every known job, persists each change, and wakes waiters on change.

    Only the scheduler (and the actors it hands jobs to) mutate jobs, through the methods here.
    """

    def __init__(self, db: JobDB) -> None:
        self._db = db
        self._jobs: dict[str, Job] = {}
        self._changed: dict[str, trio.Event] = {}
        self._idempotency: dict[tuple[str, str], str] = {}
        self._seq = 0
        #: Orders queued jobs; the scheduler installs its policy here.
        self.order_queued: Callable[[list[Job]], list[Job]] = lambda jobs: sorted(
            jobs, key=lambda j: j.seq
        )
        #: Called with the number of queued + processing jobs when it goes from 0 to more or
        #: back to 0 (not on every change: the watchdog only cares about idle vs busy).
        self.on_activity: Callable[[int], None] = lambda active: None
        self._active = 0
        #: Jobs by status, and queued jobs by user: kept up to date on every change, so
        #: counting (the caps on each submit, activity on each write, /health) is O(1)
        #: instead of a scan of every job held, finished ones included.
        self._by_status: collections.Counter[JobStatus] = collections.Counter()
        self._queued_by_user: collections.Counter[str] = collections.Counter()
        #: The queued jobs themselves: ordering the queue reads these, not every job held.
        self._queued: dict[str, Job] = {}
        self._any_change = trio.Event()
        #: Bumped on every change of a job's state; keys the cached queue positions.
        self._version = 0
        self._positions_cache: dict[str, int] = {}
        self._positions_key = -1
        self._positions_at = 0.0
        #: Serializes `update`: each write starts from the state the previous one left.
        self._write_lock = trio.Lock()
        #: Jobs loaded from disk that may already be known to ComfyUI (looked up before submit).
        self.recovered: set[str] = set()

    # -- loading -------------------------------------------------------------------------
    async def load(self) -> list[Job]:
        """Load every job from disk; returns those that were processing when we stopped."""
        jobs = await self._db.run(self._db.load_all)
        interrupted = []
        for job in jobs:
            self._jobs[job.id] = job
            self._count(job, 1)
            self._seq = max(self._seq, job.seq)
            if job.idempotency_key:
                self._idempotency[(job.user, job.idempotency_key)] = job.id
            if job.status is JobStatus.PROCESSING:
                interrupted.append(job)
        self._note_activity()
        return interrupted

    # -- reading -------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def view(self, job_id: str) -> JobView | None:
        job = self._jobs.get(job_id)
        if job is None:
            return None
        return self._view(job, self.queue_position(job))

    def _view(self, job: Job, position: int | None) -> JobView:
        return JobView(
            id=job.id,
            nick=job.nick,
            status=job.status,
            queue_position=position,
            request=job.request,
            created=job.created,
            started=job.started,
            finished=job.finished,
            progress_value=job.progress_value,
            progress_max=job.progress_max,
            result=job.result,
            error=job.error,
            cancelled_by=job.cancelled_by,
            key_name=job.key_name,
        )

    def queued(self) -> list[Job]:
        """Queued jobs in the order they will run."""
        return self.order_queued(list(self._queued.values()))

    def processing(self) -> list[Job]:
        return [j for j in self._jobs.values() if j.status is JobStatus.PROCESSING]

    def queue_position(self, job: Job) -> int | None:
        """0 while processing, 1 for the next to run, ...; None once finished."""
        if job.status is JobStatus.PROCESSING:
            return 0
        if job.status is not JobStatus.QUEUED:
            return None
        return self._positions().get(job.id)

    def _positions(self) -> dict[str, int]:
        """Queue positions by job id, computed once per change (not once per reader: each
        computation orders the whole queue), and at most `POSITIONS_MAX_AGE` seconds old."""
        now = time.monotonic()
        if self._positions_key != self._version or now - self._positions_at >= POSITIONS_MAX_AGE:
            self._positions_cache = {j.id: i for i, j in enumerate(self.queued(), start=1)}
            self._positions_key, self._positions_at = self._version, now
        return self._positions_cache

    def count_queued(self, user: str | None = None) -> int:
        """Queued jobs, of one user (`Job.user`) or of everyone (O(1))."""
        if user is None:
            return self._by_status[JobStatus.QUEUED]
        return self._queued_by_user[user]

    def count_processing(self) -> int:
        """Jobs processing now (O(1))."""
        return self._by_status[JobStatus.PROCESSING]

    def _count(self, job: Job, delta: int) -> None:
        """Count the job in (``delta`` 1) or out (-1) of the counters and the queued set."""
        self._by_status[job.status] += delta
        if job.status is JobStatus.QUEUED:
            self._queued_by_user[job.user] += delta
            if not self._queued_by_user[job.user]:
                del self._queued_by_user[job.user]
            if delta > 0:
                self._queued[job.id] = job
            else:
                self._queued.pop(job.id, None)

    async def forget_idempotency_key(self, job: Job) -> None:
        """The job's Idempotency-Key expired: a new request may use it."""
        key = job.idempotency_key
        if key is None:
            return
        await self.update(job, idempotency_key=None)
        if self._idempotency.get((job.user, key)) == job.id:
            del self._idempotency[(job.user, key)]

    def by_idempotency_key(self, user: str, key: str) -> Job | None:
        """The job ``user`` (a nick, within its key: `Job.user`) sent with ``key``."""
        job_id = self._idempotency.get((user, key))
        return None if job_id is None else self._jobs.get(job_id)

    def all_jobs(self) -> Iterable[Job]:
        return self._jobs.values()

    async def wait_change(self, job_id: str) -> None:
        """Block until the job changes (cheap: one Event shared by every waiter of the job)."""
        event = self._changed.get(job_id)
        if event is None:
            event = self._changed[job_id] = trio.Event()
        try:
            await event.wait()
        finally:
            # The last waiter gave up (a timed-out long-poll): do not keep the event forever.
            if (
                not event.is_set()
                and not event.statistics().tasks_waiting
                and self._changed.get(job_id) is event
            ):
                del self._changed[job_id]

    def wake_all(self) -> None:
        """Wake every waiter (used at shutdown so long-polls answer at once)."""
        for event in self._changed.values():
            event.set()
        self._changed.clear()

    # -- writing -------------------------------------------------------------------------
    async def add(self, job: Job) -> None:
        self._seq += 1
        job.seq = self._seq
        await self._db.run(self._db.insert, job)
        self._jobs[job.id] = job
        self._count(job, 1)
        if job.idempotency_key:
            self._idempotency[(job.user, job.idempotency_key)] = job.id
        self._changed_now(job)

    async def update(
        self, job: Job, *, expect: Collection[JobStatus] | None = None, **changes: Any
    ) -> bool:
        """Apply ``changes`` to the job, persist, then make them visible and wake waiters.

        The one place a job's state changes. A finished job's status never changes again,
        and with ``expect`` the update happens only if the job's status is one of those, so
        a job cancelled meanwhile cannot be started or completed. Returns whether the
        changes were applied.
        """
        async with self._write_lock:
            if expect is not None and job.status not in expect:
                return False
            if "status" in changes and job.status.finished:
                return False
            # Built under the lock: a concurrent update of the same job must not be
            # overwritten on disk by a copy taken before it was applied.
            candidate = attrs.evolve(job, **changes)
            await self._db.run(self._db.save, candidate)
            self._count(job, -1)
            for name, value in changes.items():
                setattr(job, name, value)
            self._count(job, 1)
        self._changed_now(job)
        return True

    async def cancel_queued(self, job: Job, by: str) -> bool:
        """Cancel a job that has not started (queued, dispatched or not): the one transition
        from queued to cancelled. False if it was no longer queued."""
        return await self.update(
            job,
            expect=(JobStatus.QUEUED,),
            status=JobStatus.CANCELLED,
            cancelled_by=by,
            finished=time.time(),
        )

    def set_progress(self, job: Job, value: int, maximum: int) -> None:
        """Progress is not persisted (it is meaningless after a restart)."""
        job.progress_value, job.progress_max = value, maximum
        self._wake(job.id)

    async def delete(self, jobs: list[Job]) -> None:
        await self._db.run(self._db.delete, [j.id for j in jobs])
        for job in jobs:
            if self._jobs.pop(job.id, None) is not None:
                self._count(job, -1)
            if job.idempotency_key:
                self._idempotency.pop((job.user, job.idempotency_key), None)
            self._wake(job.id)
        self._version += 1
        self._note_activity()
        self._any_change.set()
        self._any_change = trio.Event()

    def _changed_now(self, job: Job) -> None:
        self._version += 1
        self._wake(job.id)
        self._note_activity()
        self._any_change.set()
        self._any_change = trio.Event()

    async def wait_any_change(self) -> None:
        """Block until any job changes state."""
        await self._any_change.wait()

    def _wake(self, job_id: str) -> None:
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()

    def _note_activity(self) -> None:
        active = self._by_status[JobStatus.QUEUED] + self._by_status[JobStatus.PROCESSING]
        was_busy = self._active > 0
        self._active = active
        if (active > 0) != was_busy:
            self.on_activity(active)

    @property
    def active(self) -> int:
        return self._active


def result_path(output_dir: Path, job_id: str) -> Path:
    return output_dir / f"{job_id}.webp"
