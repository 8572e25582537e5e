"""The scheduler actor: hands the comfy worker the next job, in the policy's order.

The worker asks for work by sending a reply channel; the scheduler answers as soon as a job is
queued, choosing at that moment (so a job that arrived while ComfyUI was busy still gets its
fair turn). Submissions and cancels of queued jobs go through the store and `wake`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, NoReturn, cast

import attrs
import trio

from fategen.core.policy import FairPolicy
from fategen.store.jobs import Job, JobStatus, JobStore

log = logging.getLogger("fategen.scheduler")


@attrs.define(eq=False)
class Scheduler:
    store: JobStore
    policy: FairPolicy
    requests: trio.MemoryReceiveChannel[trio.MemorySendChannel[Job]]
    #: Jobs handed to the worker that have not started on ComfyUI's side yet.
    _dispatched: set[str] = attrs.field(factory=set, init=False)
    #: After a restart: jobs that were posted to ComfyUI before it, in posting order. They may
    #: still be in ComfyUI's queue, so they are handed out first.
    _pinned: list[Job] = attrs.field(factory=list, init=False)
    _wakeup: trio.Event = attrs.field(factory=trio.Event, init=False)
    _paused: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self.store.order_queued = self._order

    def _order(self, jobs: list[Job]) -> list[Job]:
        ahead = sorted((j for j in jobs if j.id in self._dispatched), key=lambda j: j.seq)
        pinned_ids = {j.id for j in self._pinned}
        pinned = [j for j in self._pinned if j.status is JobStatus.QUEUED]
        waiting = [j for j in jobs if j.id not in self._dispatched and j.id not in pinned_ids]
        ordered = cast(list[Job], self.policy.order(waiting, trio.current_time()))
        return ahead + [j for j in pinned if j.id not in self._dispatched] + ordered

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

    def wake(self) -> None:
        """Something was queued (or requeued)."""
        self._wakeup.set()

    def done(self, job: Job) -> None:
        """The worker finished with a dispatched job (any outcome)."""
        self._dispatched.discard(job.id)
        self.policy.forget(job.id)

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
            waiting = [j for j in self.store.queued() if j.id not in self._dispatched]
            if waiting and not self._paused:
                job = self.policy.pick(waiting, trio.current_time())
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
                self._dispatched.add(job.id)
                try:
                    reply.send_nowait(job)
                except (trio.BrokenResourceError, trio.WouldBlock):
                    self._dispatched.discard(job.id)
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
