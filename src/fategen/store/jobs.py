"""The job store: the one source of truth for job state (the types are in `model`).

Every change goes through `JobStore`, which writes it to SQLite (in a worker thread) before it
becomes visible, then wakes whoever waits on that job. Readers (the HTTP front end) get frozen
`JobView` snapshots and never touch the mutable `Job`.

Memory is bounded by the queue, not by retention: queued and processing jobs are held for
their whole life; a finished job stays only while it is among the `RECENT_FINISHED` finished
jobs used last (finished, or read), and is read from SQLite when asked for after that.
"""

from __future__ import annotations

import collections
import json
import logging
import time
import uuid
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio
from sortedcontainers import SortedKeyList

from fategen.core.webhooks import DeliveryState
from fategen.store.events import EventFeed
from fategen.store.locks import KeyedLocks
from fategen.store.model import Job, JobStatus, JobView, job_payload, user_of
from fategen.store.sqlite import JobDB, Outgoing
from fategen.store.waiters import JobWaiters

__all__ = [
    "RECENT_FINISHED",
    "Job",
    "JobStatus",
    "JobStore",
    "JobView",
    "QueueIndex",
    "SubmissionOrder",
    "result_path",
]

log = logging.getLogger("fategen.jobs")

#: How many finished jobs the store keeps in memory (those finished or read last); the others
#: are read from SQLite when asked for.
RECENT_FINISHED = 1000
#: Jobs whose webhook delivery states are kept in memory (the others are read from disk).
DELIVERIES_HELD = 4096


class QueueIndex(Protocol):
    """Keeps the queued jobs in the order they will run; the store tells it each job that
    becomes queued (`add`) and each that stops being queued (`discard`), in step with the
    job's status. The scheduler installs its own (`JobStore.use_index`)."""

    def add(self, job: Job) -> None: ...

    def discard(self, job: Job) -> None: ...

    def position(self, job: Job) -> int | None:
        """1 for the next to run, ...; None if the job is not queued."""
        ...

    def ordered(self) -> list[Job]:
        """Every queued job, in order (O(n): for listings, not for one job's answer)."""
        ...


class SubmissionOrder:
    """Queued jobs in submission order (no scheduler installed): O(log n) each way."""

    def __init__(self) -> None:
        self._jobs: SortedKeyList[Job, int] = SortedKeyList(key=lambda job: job.seq)

    def add(self, job: Job) -> None:
        self._jobs.add(job)

    def discard(self, job: Job) -> None:
        self._jobs.discard(job)

    def position(self, job: Job) -> int | None:
        try:
            return int(self._jobs.index(job)) + 1
        except ValueError:
            return None

    def ordered(self) -> list[Job]:
        return list(self._jobs)


class JobStore:
    """Holds the queued and processing jobs and the ``recent`` finished ones used last,
    persists each change, and wakes waiters on change.

    Only the scheduler (and the actors it hands jobs to) mutate jobs, through the methods here.
    """

    def __init__(self, db: JobDB, *, recent: int = RECENT_FINISHED) -> None:
        self._db = db
        #: The queued and processing jobs: every one of them, always.
        self._jobs: dict[str, Job] = {}
        #: Finished jobs held, least recently used first; at most ``recent`` of them.
        self._recent: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._recent_max = recent
        self._changed: dict[str, JobWaiters] = {}
        self._idempotency: dict[tuple[str, str], str] = {}
        self._seq = 0
        #: Orders the queued jobs; the scheduler installs its own (`use_index`).
        self._index: QueueIndex = SubmissionOrder()
        #: Called with the number of queued + processing jobs when it goes from 0 to more or
        #: back to 0 (not on every change: the watchdog only cares about idle vs busy).
        self.on_activity: Callable[[int], None] = lambda active: None
        #: Every change a user would care about, for the event streams.
        self.events = EventFeed()
        #: Called as ``(job, status before)`` on each change of a job's status once it is
        #: committed (``None`` before: just submitted); quick, and must not raise.
        self.on_transition: list[Callable[[Job, JobStatus | None], None]] = []
        #: Called with each webhook delivery's state after an attempt is recorded.
        self.on_delivery: list[Callable[[DeliveryState], None]] = []
        #: The base URL of links in webhook payloads (the service's public URL).
        self.public_base = ""
        #: The wall clock of the outbox's times (tests give trio's mock clock).
        self.clock: Callable[[], float] = time.time
        #: Webhook delivery states by job (the last `DELIVERIES_HELD` jobs'; others on disk).
        self._deliveries: collections.OrderedDict[str, list[DeliveryState]] = (
            collections.OrderedDict()
        )
        self._deliveries_due = trio.lowlevel.ParkingLot()
        #: The latest sampler preview of each running job that asked for them.
        self._previews: dict[str, tuple[bytes, str]] = {}
        self._active = 0
        #: Jobs by status, and queued jobs by user: kept up to date on every change, so
        #: counting (the caps on each submit, activity on each write, /health) is O(1)
        #: instead of a scan of every job held, finished ones included.
        self._by_status: collections.Counter[JobStatus] = collections.Counter()
        self._queued_by_user: collections.Counter[str] = collections.Counter()
        #: The queued jobs themselves (the index is told of each as it comes and goes).
        self._queued: dict[str, Job] = {}
        self._any_change = trio.Event()
        #: Bumped on every change of a job's state.
        self._version = 0
        #: One lock per job being updated: each write of a job starts from the state the
        #: previous one left (writes of different jobs go together into one commit).
        self._job_locks: KeyedLocks[str] = KeyedLocks()
        #: Bumped when a job not in memory changes, or jobs are deleted: a read from disk
        #: that overlapped such a write may be stale, so its job is not kept.
        self._cold_writes = 0
        #: Jobs loaded from disk that may already be known to ComfyUI (looked up before submit).
        self.recovered: set[str] = set()

    # -- loading -------------------------------------------------------------------------
    async def load(self) -> list[Job]:
        """Load the queued and processing jobs and the ``recent`` finished ones that finished
        last (the others stay on disk); returns those that were processing when we stopped."""
        unfinished, finished, seq = await self._db.run(self._db.load_held, self._recent_max)
        self._seq = max(self._seq, seq)
        for job in finished:
            self._hold(job)
        for job in unfinished:
            self._hold(job)
        self._note_activity()
        return [job for job in unfinished if job.status is JobStatus.PROCESSING]

    # -- reading -------------------------------------------------------------------------
    def held(self, job_id: str) -> Job | None:
        """The job if it is in memory: every queued or processing job is; a finished one
        only if it is recent. None does not mean there is no such job (`get` reads disk)."""
        job = self._jobs.get(job_id)
        if job is None:
            job = self._recent.get(job_id)
            if job is not None:
                self._recent.move_to_end(job_id)
        return job

    async def get(self, job_id: str) -> Job | None:
        """The job, from memory or else (a finished one) from SQLite; None if there is none."""
        job = self.held(job_id)
        if job is not None:
            return job
        cold = self._cold_writes
        return self._adopt(await self._db.run(self._db.get, job_id), cold)

    async def view(self, job_id: str) -> JobView | None:
        """A snapshot of the job (read from SQLite if it is not held); None if there is none."""
        job = await self.get(job_id)
        if job is None:
            return None
        if job.webhook_url is not None and job.id not in self._deliveries:
            for state in await self._db.run(self._db.deliveries_of, job.id):
                self._note_delivery(state)
        return self.view_of(job)

    def view_of(self, job: Job) -> JobView:
        """A snapshot of a job the caller has (one it just added, say), at once."""
        return self._view(job, self.queue_position(job))

    def held_jobs(self) -> list[Job]:
        """Every job in memory: the queued and processing ones, and the recent finished ones
        (for diagnostics and tests; finished jobs not held are only on disk)."""
        return [*self._jobs.values(), *self._recent.values()]

    def active_jobs(self) -> list[Job]:
        """The queued and processing jobs (all held in memory), in no particular order."""
        return list(self._jobs.values())

    async def last_served(self) -> list[Job]:
        """For each nick, the finished job it was last served with (submitted to ComfyUI or
        started), read from SQLite: with `active_jobs`, what the scheduler's turns need
        after a restart. Copies, not held: for reading only."""
        return await self._db.run(self._db.last_served)

    async def finished_before(self, before: float, limit: int) -> list[str]:
        """Up to ``limit`` ids of jobs that finished before ``before`` (wall clock), oldest
        first, from SQLite (an index range, whatever the number of jobs)."""
        return await self._db.run(self._db.expired, before, limit)

    def _adopt(self, found: Job | None, cold: int) -> Job | None:
        """A job read from disk: the one in memory if it came in meanwhile; a finished one is
        then held as recent, unless a job not in memory changed while it was read (it may be
        stale, or deleted: returned, but not kept)."""
        if found is None:
            return None
        held = self.held(found.id)
        if held is not None:
            return held
        if found.status.finished and cold == self._cold_writes:
            self._hold(found)
        return found

    def _held_object(self, job_id: str) -> Job | None:
        """The job object in memory, if any (without touching the recent order)."""
        job = self._jobs.get(job_id)
        return self._recent.get(job_id) if job is None else job

    def _hold(self, job: Job) -> None:
        """A job comes into memory (added, loaded, or read from disk)."""
        self._count(job, 1)
        if job.idempotency_key:
            self._idempotency[(job.user, job.idempotency_key)] = job.id
        if job.status.finished:
            self._remember(job)
        else:
            self._jobs[job.id] = job

    def _remember(self, job: Job) -> None:
        """Hold a finished job as the most recent; the least recent beyond the bound go."""
        self._recent[job.id] = job
        self._recent.move_to_end(job.id)
        while len(self._recent) > self._recent_max:
            _, old = self._recent.popitem(last=False)
            self._release(old)

    def _release(self, job: Job) -> None:
        """A job leaves memory (deleted, or a finished one no longer recent)."""
        self._count(job, -1)
        if job.idempotency_key and self._idempotency.get((job.user, job.idempotency_key)) == (
            job.id
        ):
            del self._idempotency[(job.user, job.idempotency_key)]

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
            backend=job.backend,
            webhooks=tuple(self._deliveries.get(job.id, ())),
            retry_of=job.retry_of,
        )

    def use_index(self, index: QueueIndex) -> None:
        """Order the queued jobs with ``index`` from now on (told of those queued now)."""
        self._index = index
        for job in sorted(self._queued.values(), key=lambda j: j.seq):
            index.add(job)

    def queued(self) -> list[Job]:
        """Queued jobs in the order they will run (O(n): for listings)."""
        return self._index.ordered()

    async def list_page(
        self,
        status: JobStatus,
        *,
        before_seq: int | None,
        limit: int,
        nick: str | None = None,
        model: str | None = None,
    ) -> list[tuple[JobView, int]]:
        """A page of jobs in ``status`` (not queued: those are in queue order, `queued`),
        newest first, each with its seq (the next page's cursor): read from SQLite."""
        found = await self._db.run(self._db.list_ids, status.value, before_seq, limit, nick, model)
        page: list[tuple[JobView, int]] = []
        for job_id, seq in found:
            view = await self.view(job_id)
            if view is not None:
                page.append((view, seq))
        return page

    async def get_meta(self, key: str) -> str | None:
        return await self._db.run(self._db.get_meta, key)

    async def set_meta(self, key: str, value: str) -> None:
        await self._db.run(self._db.set_meta, key, value)

    def processing(self) -> list[Job]:
        return [j for j in self._jobs.values() if j.status is JobStatus.PROCESSING]

    def queue_position(self, job: Job) -> int | None:
        """0 while processing, 1 for the next to run, ...; None once finished (the index's
        cost: O(log n) for `SubmissionOrder`; see the scheduler's for its own)."""
        if job.status is JobStatus.PROCESSING:
            return 0
        if job.status is not JobStatus.QUEUED:
            return None
        return self._index.position(job)

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
                self._index.add(job)
            elif self._queued.pop(job.id, None) is not None:
                self._index.discard(job)

    async def forget_idempotency_key(self, job: Job) -> None:
        """The job's Idempotency-Key expired: a new request may use it."""
        if job.idempotency_key is not None:
            await self.update(job, idempotency_key=None)

    async def by_idempotency_key(
        self, nick: str, key: str, *, key_name: str | None = None
    ) -> Job | None:
        """The job ``nick`` sent through API key ``key_name`` with Idempotency-Key ``key``:
        from memory, or else from SQLite (its unique index)."""
        job_id = self._idempotency.get((user_of(key_name, nick), key))
        if job_id is not None:
            job = self.held(job_id)
            if job is not None:
                return job
        cold = self._cold_writes
        found = await self._db.run(self._db.by_idempotency_key, nick, key_name, key)
        return self._adopt(found, cold)

    async def wait_change(self, job_id: str, *, progress: bool = True) -> None:
        """Block until the job changes; with ``progress=False``, until its state does (a
        change of its progress alone does not count). Cheap: the waiters of a job share one
        `JobWaiters`, which wakes them a batch at a time so thousands do not hold the loop."""
        waiters = self._changed.get(job_id)
        if waiters is None:
            waiters = self._changed[job_id] = JobWaiters()
        try:
            await waiters.wait(progress=progress)
        finally:
            # The last waiter gave up (a timed-out long-poll): do not keep the entry forever.
            if not waiters.statistics().tasks_waiting and self._changed.get(job_id) is waiters:
                del self._changed[job_id]

    def wake_all(self) -> None:
        """Wake every waiter (used at shutdown so long-polls answer at once)."""
        for waiters in self._changed.values():
            waiters.wake()
        self._changed.clear()

    # -- writing -------------------------------------------------------------------------
    async def add(self, job: Job) -> None:
        """Persist a new job, then make it visible: it is on disk (fsynced) when this
        returns. Concurrent adds and updates share one commit."""
        self._seq += 1
        job.seq = self._seq
        await self._db.write(self._db.insert, job, then=lambda: self._added(job))

    def _added(self, job: Job) -> None:
        self._hold(job)
        self._changed_now(job)
        self.events.record("queued", job.id, job.key_name, job.nick)
        self.events.queue_moved()
        for observe in self.on_transition:
            observe(job, None)

    async def update(
        self, job: Job, *, expect: Collection[JobStatus] | None = None, **changes: Any
    ) -> bool:
        """Apply ``changes`` to the job, persist, then make them visible and wake waiters.

        The one place a job's state changes. A finished job's status never changes again,
        and with ``expect`` the update happens only if the job's status is one of those, so
        a job cancelled meanwhile cannot be started or completed. Returns whether the
        changes were applied.
        """
        async with self._job_locks.hold(job.id):
            # The job in memory is the latest state (the caller's may be an older copy of a
            # finished job that left memory and was read again since).
            held = self._held_object(job.id)
            base = job if held is None else held
            if expect is not None and base.status not in expect:
                return False
            if "status" in changes and base.status.finished:
                return False
            # Built under the lock: a concurrent update of the same job must not be
            # overwritten on disk by a copy taken before it was applied.
            candidate = attrs.evolve(base, **changes)
            outgoing = self._deliveries_for(base, candidate)
            if outgoing:
                # The deliveries telling of the change commit with it: a crash loses none.
                await self._db.write(
                    self._db.save_with_deliveries,
                    candidate,
                    outgoing,
                    then=lambda: self._apply(job, changes, outgoing),
                )
            else:
                await self._db.write(
                    self._db.save, candidate, then=lambda: self._apply(job, changes)
                )
        return True

    def _deliveries_for(self, before: Job, after: Job) -> list[Outgoing]:
        """The webhook deliveries a change of status makes (its end; its start if asked)."""
        if after.webhook_url is None or after.status is before.status:
            return []
        if after.status.finished:
            event = f"job.{after.status.value}"
        elif after.status is JobStatus.PROCESSING and after.webhook_started:
            if any(d.event == "job.started" for d in self._deliveries.get(after.id, ())):
                return []  # once, not again when it runs again after a loss
            event = "job.started"
        else:
            return []
        state = DeliveryState(
            id=f"msg_{uuid.uuid4().hex}",
            job_id=after.id,
            event=event,
            url=after.webhook_url,
            state="pending",
            attempts=0,
            next_at=self.clock(),
        )
        body = json.dumps(job_payload(after, event, self.public_base), ensure_ascii=False)
        return [Outgoing(state, after.key_name, body)]

    def _queued_deliveries(self, outgoing: list[Outgoing]) -> None:
        for delivery in outgoing:
            self._note_delivery(delivery.state)
        self._deliveries_due.unpark_all()

    def _note_delivery(self, state: DeliveryState) -> None:
        """Keep a delivery's state for the job's view (the jobs of the last few thousand)."""
        states = self._deliveries.setdefault(state.job_id, [])
        for index, known in enumerate(states):
            if known.id == state.id:
                states[index] = state
                break
        else:
            states.append(state)
        self._deliveries.move_to_end(state.job_id)
        while len(self._deliveries) > DELIVERIES_HELD:
            self._deliveries.popitem(last=False)

    # -- webhook deliveries (the outbox) ---------------------------------------------------
    async def due_deliveries(self, before: float, limit: int) -> list[Outgoing]:
        """Pending deliveries due before ``before`` (wall clock), soonest first."""
        return await self._db.run(self._db.due_deliveries, before, limit)

    async def next_delivery_due(self) -> float | None:
        return await self._db.run(self._db.next_due)

    async def record_attempt(self, state: DeliveryState) -> None:
        """A delivery's attempt (on disk first), and what is next."""
        await self._db.run(self._db.record_attempt, state)
        self._note_delivery(state)
        for observe in self.on_delivery:
            observe(state)
        self._deliveries_due.unpark_all()  # the sender's next wake-up may have moved

    async def wait_deliveries(self) -> None:
        """Until a delivery is queued or its attempt recorded."""
        await self._deliveries_due.park()

    def _apply(
        self, job: Job, changes: dict[str, Any], outgoing: list[Outgoing] | None = None
    ) -> None:
        """Make committed changes visible (in commit order), to the caller's job and to the
        one in memory if that is another object; and the webhook deliveries they made."""
        if outgoing:
            self._queued_deliveries(outgoing)
        held = self._held_object(job.id)
        before = (job if held is None else held).status
        if held is job and not changes.keys() & {"status", "idempotency_key"}:
            # Neither its counters nor its place in the queue change (the queue's index is
            # not told, so its order is not made again for, say, a job's `submitted`).
            for name, value in changes.items():
                setattr(job, name, value)
            self._changed_now(job)
            return
        if held is not None:
            # Out of the counters and maps under its old state, back in under the new one.
            self._jobs.pop(held.id, None)
            self._recent.pop(held.id, None)
            self._release(held)
        for target in (job,) if held is None or held is job else (held, job):
            for name, value in changes.items():
                setattr(target, name, value)
        if held is not None:
            self._hold(held)
        else:
            self._cold_writes += 1
        self._changed_now(job)
        if job.status is not before:
            if job.status is not JobStatus.PROCESSING:
                self._previews.pop(job.id, None)
            self._record_transition(job, before)

    def _record_transition(self, job: Job, before: JobStatus) -> None:
        """The event of a change of status (one source: the change itself), and the
        observers told (metrics)."""
        for observe in self.on_transition:
            observe(job, before)
        status = job.status
        if status is JobStatus.PROCESSING:
            kind = "started"
        elif status is JobStatus.QUEUED:
            kind = "queued"  # queued again: its backend lost it, or fategen restarted
        else:
            kind = status.value  # completed, failed, cancelled
        self.events.record(kind, job.id, job.key_name, job.nick)
        if JobStatus.QUEUED in (before, status):
            self.events.queue_moved()

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
        self._wake(job.id, progress_only=True)
        self.events.progress(job.id, job.key_name, job.nick, value, maximum)

    def set_preview(self, job: Job, image: bytes, mime: str) -> None:
        """The job's latest sampler preview (in memory while it runs; not persisted)."""
        self._previews[job.id] = (image, mime)
        self.events.preview(job.id, job.key_name, job.nick)

    def preview(self, job_id: str) -> tuple[bytes, str] | None:
        """The latest preview of a running job (image, MIME type), if ComfyUI sent one."""
        return self._previews.get(job_id)

    async def delete(self, job_ids: Collection[str]) -> None:
        """Delete jobs from disk (in one commit), then from memory; wakes their waiters."""
        doomed = list(job_ids)
        await self._db.write(self._db.delete, doomed, then=lambda: self._deleted(doomed))

    def _deleted(self, job_ids: list[str]) -> None:
        self._cold_writes += 1
        for job_id in job_ids:
            job = self._jobs.pop(job_id, None)
            if job is None:
                job = self._recent.pop(job_id, None)
            if job is not None:
                self._release(job)
            self._wake(job_id)
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

    def _wake(self, job_id: str, *, progress_only: bool = False) -> None:
        waiters = self._changed.get(job_id)
        if waiters is None:
            return
        if not (progress_only and waiters.waiting_for_state):
            del self._changed[job_id]
        waiters.wake(progress_only=progress_only)

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
