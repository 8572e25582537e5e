"""Jobs a backend loses go back to the front of the queue in the order they were first handed
out (the running one before the one posted ahead), wait for the backend they were posted to
unless it is gone, and go only to a backend that can run them."""

from __future__ import annotations

import attrs
import trio

from conftest import ready_backend
from fategen.core.policy import FairPolicy
from fategen.core.prompt import GenerationRequest
from fategen.queue.fleet import Fleet
from fategen.queue.scheduler import Scheduler, WorkRequest
from fategen.store.jobs import Job, JobStatus, JobStore
from fategen.store.sqlite import JobDB

REQUEST = GenerationRequest(
    prompt="p", negative="", model="X", width=256, height=256, count=1, seed=1
)


def new_job(nick: str, model: str = "X") -> Job:
    return Job(id=Job.new_id(), nick=nick, message="p", request=attrs.evolve(REQUEST, model=model))


async def ask(tx: trio.MemorySendChannel[WorkRequest], backend: object) -> Job:
    reply_tx, reply_rx = trio.open_memory_channel[Job](1)
    await tx.send(WorkRequest(backend, reply_tx))  # type: ignore[arg-type]
    with trio.fail_after(5):
        return await reply_rx.receive()


async def test_lost_jobs_keep_their_places_in_front_of_the_queue() -> None:
    store = JobStore(JobDB(None))
    a, b = ready_backend("a"), ready_backend("b")
    fleet = Fleet({"a": a, "b": b}, store)
    tx, rx = trio.open_memory_channel[WorkRequest](0)
    scheduler = Scheduler(store, FairPolicy(), rx, fleet)
    jobs = [new_job(n) for n in "pqrs"]
    for job in jobs:
        await store.add(job)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        fleet.drain("b")
        running = await ask(tx, a)
        ahead = await ask(tx, a)
        assert [running.id, ahead.id] == [jobs[0].id, jobs[1].id]
        await store.update(running, status=JobStatus.PROCESSING, started=1.0, backend="a")
        await store.update(ahead, submitted=1.0, backend="a")
        # a goes away: the job posted ahead is given back first, then the running one.
        a.enabled = False
        await store.update(ahead, status=JobStatus.QUEUED)
        scheduler.lost(ahead)
        await store.update(running, status=JobStatus.QUEUED, started=None)
        scheduler.lost(running)
        positions = [store.queue_position(j) for j in jobs]
        assert positions == [1, 2, 3, 4]  # the running one first, as first handed out
        fleet.enable("b")
        assert (await ask(tx, b)).id == jobs[0].id
        assert (await ask(tx, b)).id == jobs[1].id
        nursery.cancel_scope.cancel()


async def test_a_lost_job_waits_for_its_backend_unless_it_is_gone() -> None:
    store = JobStore(JobDB(None))
    a, b = ready_backend("a"), ready_backend("b")
    fleet = Fleet({"a": a, "b": b}, store)
    tx, rx = trio.open_memory_channel[WorkRequest](0)
    scheduler = Scheduler(store, FairPolicy(), rx, fleet)
    job, other = new_job("p"), new_job("q")
    await store.add(job)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        fleet.drain("b")
        assert (await ask(tx, a)).id == job.id
        await store.update(job, submitted=1.0, backend="a")
        scheduler.lost(job)  # a's connection blinked: a may still have it in its queue
        await store.add(other)
        fleet.enable("b")
        assert (await ask(tx, b)).id == other.id  # b does not take a's job while a may run it
        a.enabled = False  # a is gone (drained): now b may
        fleet.changed()
        assert (await ask(tx, b)).id == job.id
        nursery.cancel_scope.cancel()


async def test_a_backend_gets_only_jobs_it_can_run() -> None:
    store = JobStore(JobDB(None))
    a = ready_backend("a", runnable=frozenset({"X"}))
    b = ready_backend("b", runnable=frozenset({"X", "Y"}))
    fleet = Fleet({"a": a, "b": b}, store)
    tx, rx = trio.open_memory_channel[WorkRequest](0)
    scheduler = Scheduler(store, FairPolicy(), rx, fleet)
    y, x = new_job("p", "Y"), new_job("q", "X")
    await store.add(y)
    await store.add(x)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        assert (await ask(tx, a)).id == x.id  # the fair head is Y's, which a cannot run
        assert (await ask(tx, b)).id == y.id
        nursery.cancel_scope.cancel()
