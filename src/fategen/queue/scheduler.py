"""The scheduler actor: hands each backend's workers their next job, in the policy's order.

A worker asks for work by sending a `WorkRequest` (its backend and a reply channel); the
scheduler holds the requests and answers each as soon as a job its backend can run is queued,
choosing at that moment (so a job that arrived while ComfyUI was busy still gets its fair
turn). Requests of backends with nothing to do are answered before those filling a prompt
ahead. Submissions and cancels of queued jobs go through the store and `wake`; changes of the
fleet (a backend up, down, checked, drained) wake it too.

The scheduler is the store's queue index (`fategen.store.jobs.QueueIndex`): the store tells
it each job that becomes queued or stops being queued, and it answers queue positions. The
order is: jobs handed to workers but not started yet, then the jobs at the front (lost by a
backend that went away, or posted to ComfyUI before a restart: they keep their places, and a
job posted to one backend waits for it unless it is gone), then the waiting jobs in the
policy's order, kept by a `FairQueue` (see there for the costs). Users take turns across the
whole fleet: one policy, one set of turns; each backend prefers its loaded checkpoint.

With several backends a queue position counts the jobs handed out before it; several run at
once, so place N on K backends starts after about N/K prompts.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NoReturn, cast

import attrs
import trio

from fategen.core.fairqueue import FairQueue
from fategen.core.policy import FairPolicy
from fategen.queue.fleet import Backend, Fleet
from fategen.store.jobs import Job, JobStatus, JobStore

if TYPE_CHECKING:
    from fategen.queue.worker import ComfyWorker

log = logging.getLogger("fategen.scheduler")


@attrs.frozen(eq=False)
class WorkRequest:
    """A worker of ``backend`` asks for its next job, to be sent on ``reply``."""

    backend: Backend
    reply: trio.MemorySendChannel[Job]


@attrs.define(eq=False)
class Scheduler:
    store: JobStore
    policy: FairPolicy
    requests: trio.MemoryReceiveChannel[WorkRequest]
    #: The backends (none given: a bare scheduler whose requests' backends are not tracked).
    fleet: Fleet = attrs.field(
        default=attrs.Factory(lambda self: Fleet({}, self.store), takes_self=True)
    )
    #: Jobs handed to a worker that have not started on ComfyUI's side yet.
    _dispatched: dict[str, Job] = attrs.field(factory=dict, init=False)
    #: Jobs handed out first, in the order they were first handed out: lost by a backend
    #: (it died or went away), or posted to ComfyUI before a restart.
    _front: list[Job] = attrs.field(factory=list, init=False)
    #: Job id -> when it was first handed out (a tick): the order of `_front`.
    _handed: dict[str, int] = attrs.field(factory=dict, init=False)
    _tick: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _pending: list[WorkRequest] = attrs.field(factory=list, init=False)
    #: Jobs posted ahead to a busy backend being taken back for an idle one.
    _taking: set[str] = attrs.field(factory=set, init=False)
    #: Jobs a take-back failed for (it started, or its backend did not answer): not tried
    #: again while they stay where they are.
    _untakeable: set[str] = attrs.field(factory=set, init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)
    _wakeup: trio.Event = attrs.field(factory=trio.Event, init=False)
    _paused: bool = attrs.field(default=False, init=False)
    #: Paused by an operator (`hold`): nothing new is handed out; unlike `pause`, undone.
    _held_back: bool = attrs.field(default=False, init=False)
    #: The queued jobs neither dispatched nor at the front, in the policy's order.
    _waiting: FairQueue = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._waiting = FairQueue(self.policy)
        self.store.use_index(self)
        self.fleet.on_change.append(self.wake)

    # -- the store's queue index -----------------------------------------------------------
    def add(self, job: Job) -> None:
        """The job became queued (submitted or queued again)."""
        if job.id not in self._dispatched and all(p.id != job.id for p in self._front):
            self._waiting.add(job)

    def discard(self, job: Job) -> None:
        """The job is no longer queued (started, cancelled, deleted)."""
        self._waiting.discard(job)
        if job.id not in self._dispatched:  # a running job keeps its tick, should it be lost
            self._handed.pop(job.id, None)

    def _ahead(self) -> list[Job]:
        """Dispatched jobs not started yet (at most each worker's prompt ahead: O(workers))."""
        return sorted(
            (j for j in self._dispatched.values() if j.status is JobStatus.QUEUED),
            key=lambda j: self._handed.get(j.id, 0),
        )

    def _front_waiting(self) -> list[Job]:
        """The front's queued jobs (those lost at once: O(backends) in practice)."""
        return [
            j for j in self._front if j.status is JobStatus.QUEUED and j.id not in self._dispatched
        ]

    def position(self, job: Job) -> int | None:
        """The job's place: O(workers) for jobs ahead, else the `FairQueue`'s cost."""
        if job.status is not JobStatus.QUEUED:
            return None
        ahead = self._ahead()
        for place, other in enumerate(ahead, start=1):
            if other.id == job.id:
                return place
        front = self._front_waiting()
        for place, other in enumerate(front, start=len(ahead) + 1):
            if other.id == job.id:
                return place
        waiting = self._waiting.position(job, trio.current_time())
        return None if waiting is None else len(ahead) + len(front) + waiting

    def ordered(self) -> list[Job]:
        waiting = cast(list[Job], self._waiting.order(trio.current_time()))
        return self._ahead() + self._front_waiting() + waiting

    def restore(self, jobs: Iterable[Job]) -> None:
        """After a restart, take up the order where it was: replay who was served last into
        the policy (turns and loaded checkpoint), and put the jobs already posted to ComfyUI
        at the front, in posting order (each waits for the backend it was posted to)."""
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
        self._front = [job for _, job in sorted(pinned, key=lambda t: t[0])]
        for job in self._front:
            self._handed[job.id] = next(self._tick)
            self._waiting.discard(job)
        self._waiting.rebuild()

    def wake(self) -> None:
        """Something was queued (or requeued), or the fleet changed."""
        self._wakeup.set()

    def done(self, job: Job, *, requeue: bool = True) -> None:
        """A worker finished with a dispatched job (any outcome). One still queued waits
        for its turn again, unless ``requeue`` is False (its cancel is being recorded)."""
        self._dispatched.pop(job.id, None)
        self._handed.pop(job.id, None)
        self._untakeable.discard(job.id)
        self._waiting.forget(job.id)
        if requeue and job.status is JobStatus.QUEUED:
            self._waiting.add(job)
        self.wake()

    def lost(self, job: Job) -> None:
        """A worker gave back a dispatched job its backend lost (or never ran): it goes to
        the front, keeping its place (it was served its turn already)."""
        self._dispatched.pop(job.id, None)
        self._untakeable.discard(job.id)
        self._waiting.discard(job)
        if job.status is JobStatus.QUEUED and all(p.id != job.id for p in self._front):
            self._handed.setdefault(job.id, next(self._tick))
            self._front.append(job)
            self._front.sort(key=lambda j: self._handed[j.id])
        self.wake()

    def unloaded(self, backend: Backend) -> None:
        """The backend dropped its models (`FairPolicy.unloaded` for a fleet of one)."""
        backend.loaded = None
        if len(self.fleet) <= 1:
            self._waiting.unloaded()

    def pause(self) -> None:
        """Hand out no more jobs (shutdown)."""
        self._paused = True

    @property
    def held_back(self) -> bool:
        """Whether an operator paused dispatching (`hold`)."""
        return self._held_back

    def hold(self, paused: bool) -> None:
        """An operator pauses (or resumes) dispatching: the running jobs finish, queued ones
        wait; submissions go on."""
        self._held_back = paused
        self.wake()

    def prioritize(self, job: Job, *, whole_queue: bool) -> int:
        """Move a queued job ahead: to the front of the whole queue (handed out first, before
        the turns), or to the front of its user's own jobs (it takes that user's next turn).
        Returns the seq the job should have (the same, or one below the user's first)."""
        if whole_queue:
            self._waiting.discard(job)
            if all(p.id != job.id for p in self._front):
                self._handed[job.id] = -next(self._tick)  # before every job at the front
                self._front.insert(0, job)
            self.wake()
            return job.seq
        first = self._waiting.first_of(self.policy.user_of(job))
        return job.seq if first is None or first.seq >= job.seq else first.seq - 1

    def set_aside(self, job: Job) -> None:
        """Out of the order while its seq changes (`add` puts it back under the new one)."""
        self._waiting.discard(job)

    def is_dispatched(self, job_id: str) -> bool:
        return job_id in self._dispatched

    # -- placement ---------------------------------------------------------------------------
    def _from_front(self, backend: Backend) -> Job | None:
        """The first job at the front this backend may take: one it can run, posted here or
        to a backend that is gone (down or drained), or never posted."""
        for index, job in enumerate(self._front):
            if job.status is not JobStatus.QUEUED or job.id in self._dispatched:
                continue
            if not backend.can_run(job):
                continue
            home = self.fleet.home(job)
            if home is not None and home is not backend and not home.gone:
                continue  # its backend may still run it (it is coming back): it waits
            del self._front[index]
            return job
        return None

    def _choose(self, backend: Backend) -> Job | None:
        self._front = [j for j in self._front if j.status is JobStatus.QUEUED]
        job = self._from_front(backend)
        if job is not None:
            return job
        if not self._waiting:
            return None
        one = len(self.fleet) <= 1
        picked = self._waiting.pick_for(
            trio.current_time(),
            loaded=backend.loaded if not one else self.policy.loaded_checkpoint,
            can_run=None if backend.runnable is None else backend.can_run,  # type: ignore[arg-type]
            elsewhere=frozenset() if one else self.fleet.loaded_elsewhere(backend),
        )
        if picked is None:
            return None
        assert isinstance(picked, Job)
        self._handed[picked.id] = next(self._tick)
        return picked

    def _serve(self) -> None:
        """Answer every request that can be answered now: backends with nothing to do first."""
        if self._paused or self._held_back or not self._pending:
            return
        pending = sorted(self._pending, key=lambda r: r.backend.busy())
        self._pending = []
        for request in pending:
            backend = request.backend
            job = self._choose(backend) if backend.accepting else None
            if job is None:
                self._pending.append(request)
                self._take_back_for(backend)
                continue
            self._dispatched[job.id] = job
            try:
                request.reply.send_nowait(job)
            except (trio.BrokenResourceError, trio.WouldBlock):
                self._dispatched.pop(job.id, None)
                if job.status is JobStatus.QUEUED:
                    self.lost(job)  # nobody took it: it goes first again
                continue
            backend.took(self.policy.checkpoint_of(job))
            log.debug("dispatched job %s (%s) to %s", job.id, job.model, backend.name)

    def _take_back_for(self, backend: Backend) -> None:
        """An idle backend has nothing it can run while another holds a job posted ahead
        that this one can run: take that job back (if it has not started) and run it here.
        One take-back at a time per job; O(backends)."""
        if backend.busy() or not backend.accepting or self._nursery is None:
            return
        for other in self.fleet:
            if other is backend or not other.session.available:
                continue  # one that is away gives its jobs back by itself
            for job in list(other.ahead.values()):
                if job.id in self._taking or job.id in self._untakeable:
                    continue
                if job.status is not JobStatus.QUEUED:
                    continue
                if not backend.can_run(job):
                    continue
                worker = self.fleet.holder(job.id)
                if worker is None:
                    continue
                self._taking.add(job.id)
                self._nursery.start_soon(self._take_back, worker, job)
                return

    async def _take_back(self, worker: ComfyWorker, job: Job) -> None:
        taken = False
        try:
            taken = await worker.take_back(job)
        finally:
            self._taking.discard(job.id)
            if not taken:
                self._untakeable.add(job.id)
            self.wake()

    async def _collect(self) -> None:
        async for request in self.requests:
            self._pending.append(request)
            self.wake()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        async with self.requests, trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._collect)
            task_status.started()
            while True:
                self._wakeup = trio.Event()
                self._serve()
                await self._wakeup.wait()


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
