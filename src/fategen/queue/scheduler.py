"""The scheduler actor: hands the comfy worker the next job, in the policy's order.

The worker asks for work by sending a reply channel; the scheduler answers as soon as a job is
queued, choosing at that moment (so a job that arrived while ComfyUI was busy still gets its
fair turn). Submissions and cancels of queued jobs go through the store and `wake`.

The scheduler is the store's queue index (`fategen.store.jobs.QueueIndex`): the store tells
it each job that becomes queued or stops being queued, and it answers queue positions. The
order is: jobs handed to the worker but not started yet, then (after a restart) the jobs
posted to ComfyUI before it, then the waiting jobs in the policy's order, kept by a
`FairQueue` (see there for the costs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, NoReturn, cast

import attrs
import trio

from fategen.core.fairqueue import FairQueue
from fategen.core.policy import FairPolicy
from fategen.store.jobs import Job, JobStatus, JobStore

log = logging.getLogger("fategen.scheduler")


@attrs.define(eq=False)
class Scheduler:
    store: JobStore
    policy: FairPolicy
    requests: trio.MemoryReceiveChannel[trio.MemorySendChannel[Job]]
    #: Jobs handed to the worker that have not started on ComfyUI's side yet.
    _dispatched: dict[str, Job] = attrs.field(factory=dict, init=False)
    #: After a restart: jobs that were posted to ComfyUI before it, in posting order. They may
    #: still be in ComfyUI's queue, so they are handed out first.
    _pinned: list[Job] = attrs.field(factory=list, init=False)
    _wakeup: trio.Event = attrs.field(factory=trio.Event, init=False)
    _paused: bool = attrs.field(default=False, init=False)
    #: The queued jobs neither dispatched nor pinned, in the policy's order.
    _waiting: FairQueue = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._waiting = FairQueue(self.policy)
        self.store.use_index(self)

    # -- the store's queue index -----------------------------------------------------------
    def add(self, job: Job) -> None:
        """The job became queued (submitted or queued again)."""
        if job.id not in self._dispatched and all(p.id != job.id for p in self._pinned):
            self._waiting.add(job)

    def discard(self, job: Job) -> None:
        """The job is no longer queued (started, cancelled, deleted)."""
        self._waiting.discard(job)

    def _ahead(self) -> list[Job]:
        """Dispatched jobs not started yet (at most the worker's prompts ahead: O(1))."""
        return sorted(
            (j for j in self._dispatched.values() if j.status is JobStatus.QUEUED),
            key=lambda j: j.seq,
        )

    def _pinned_waiting(self) -> list[Job]:
        return [
            j for j in self._pinned if j.status is JobStatus.QUEUED and j.id not in self._dispatched
        ]

    def position(self, job: Job) -> int | None:
        """The job's place: O(1) for jobs ahead, else the `FairQueue`'s cost."""
        if job.status is not JobStatus.QUEUED:
            return None
        ahead = self._ahead()
        for place, other in enumerate(ahead, start=1):
            if other.id == job.id:
                return place
        pinned = self._pinned_waiting()
        for place, other in enumerate(pinned, start=len(ahead) + 1):
            if other.id == job.id:
                return place
        waiting = self._waiting.position(job, trio.current_time())
        return None if waiting is None else len(ahead) + len(pinned) + waiting

    def ordered(self) -> list[Job]:
        waiting = cast(list[Job], self._waiting.order(trio.current_time()))
        return self._ahead() + self._pinned_waiting() + waiting

    def restore(self, jobs: Iterable[Job]) -> None:
        """After a restart, take up the order where it was: replay who was served last into
        the policy (turns and loaded checkpoint), and pin the jobs already posted to ComfyUI
        first, in posting order."""
        served: dict[str, tuple[float, Job]] = {}
        pinned: list[tuple[float, Job]] = []
        for job in jobs:
            when = job.submitted if job.submitted is not None else job.started
            if when is None:
                continue
            if job.status is JobStatus.QUEUED:
                pinned.append((when, job))
            elif when >= served.get(job.nick, (-1.0, job))[0]:
                served[job.nick] = (when, job)
        now = trio.current_time()
        history = sorted(served.values(), key=lambda t: t[0]) + sorted(pinned, key=lambda t: t[0])
        for _, job in history:
            self.policy.pick([job], now)
        self.policy.swaps = 0
        self._pinned = [job for _, job in sorted(pinned, key=lambda t: t[0])]
        for job in self._pinned:
            self._waiting.discard(job)
        self._waiting.rebuild()

    def wake(self) -> None:
        """Something was queued (or requeued)."""
        self._wakeup.set()

    def done(self, job: Job, *, requeue: bool = True) -> None:
        """The worker finished with a dispatched job (any outcome). One still queued waits
        for its turn again, unless ``requeue`` is False (its cancel is being recorded)."""
        self._dispatched.pop(job.id, None)
        self._waiting.forget(job.id)
        if requeue and job.status is JobStatus.QUEUED:
            self._waiting.add(job)

    def unloaded(self) -> None:
        """ComfyUI dropped its models (`FairPolicy.unloaded`)."""
        self._waiting.unloaded()

    def pause(self) -> None:
        """Hand out no more jobs (shutdown)."""
        self._paused = True

    def is_dispatched(self, job_id: str) -> bool:
        return job_id in self._dispatched

    async def _next(self) -> Job:
        while True:
            if not self._paused:
                while self._pinned:
                    pinned = self._pinned.pop(0)
                    if pinned.status is JobStatus.QUEUED and pinned.id not in self._dispatched:
                        return pinned  # already counted by the policy in `restore`
                if self._waiting:
                    job = self._waiting.pick(trio.current_time())
                    assert isinstance(job, Job)
                    return job
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        async with self.requests:
            task_status.started()
            async for reply in self.requests:
                job = await self._next()
                self._dispatched[job.id] = job
                try:
                    reply.send_nowait(job)
                except (trio.BrokenResourceError, trio.WouldBlock):
                    self._dispatched.pop(job.id, None)
                    if job.status is JobStatus.QUEUED:
                        self._waiting.add(job)  # nobody took it: it waits again
                    continue
                log.debug("dispatched job %s (%s) to the worker", job.id, job.model)
        raise RuntimeError("the scheduler's request channel closed")


def requeue_interrupted(job: Job) -> dict[str, Any]:
    """Changes for a job found processing after a restart: it is queued again, first.

    ComfyUI had finished it (``generated``): it is followed to its stored result and its
    image is made; it was not interrupted. Otherwise it counts one more interruption; the
    worker asks ComfyUI before it goes on (see `fategen.queue.worker`): a job ComfyUI is
    still executing after its second interruption fails, one ComfyUI finished completes.
    """
    if job.generated is not None:
        return {"status": JobStatus.QUEUED, "started": None}
    return {"status": JobStatus.QUEUED, "started": None, "interruptions": job.interruptions + 1}
