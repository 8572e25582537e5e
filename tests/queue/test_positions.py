"""Queue positions from the scheduler's incremental order equal a full replay of the policy,
through the store, after random submits, dispatches, starts, requeues, cancels, completions
and unloads."""

from __future__ import annotations

import random

import attrs
import pytest
import trio
import trio.testing

from conftest import ready_backend
from fategen.core.policy import FairPolicy
from fategen.core.prompt import GenerationRequest
from fategen.queue.scheduler import Scheduler, WorkRequest
from fategen.store.jobs import Job, JobStatus, JobStore
from fategen.store.sqlite import JobDB

REQUEST = GenerationRequest(
    prompt="p", negative="", model="X", width=256, height=256, count=1, seed=1
)


def expected_positions(
    store: JobStore, scheduler: Scheduler, queued: list[Job], dispatched: list[Job]
) -> list[int]:
    """Jobs handed to the worker first (in the order handed), then the policy's full replay
    of the rest."""
    ahead = [j for j in dispatched if j in queued]
    waiting = [j for j in queued if not scheduler.is_dispatched(j.id)]
    order = ahead + list(scheduler.policy.order(waiting, trio.current_time()))
    ids = [j.id for j in order]
    return [ids.index(j.id) + 1 for j in queued]


@pytest.mark.parametrize("seed", range(12))
async def test_positions_equal_the_full_replay_after_random_changes(
    seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    rng = random.Random(seed)
    store = JobStore(JobDB(None))
    policy = FairPolicy(max_passes=rng.choice([0, 2, 3]), max_delay=rng.choice([5.0, 120.0]))
    requests_tx, requests_rx = trio.open_memory_channel[WorkRequest](0)
    scheduler = Scheduler(store, policy, requests_rx)
    backend = ready_backend()
    models = ["X"] if seed % 4 == 0 else ["X", "Y", "Z"]
    dispatched: list[Job] = []  # handed to the worker, not started
    processing: list[Job] = []
    submitted: list[Job] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        for _ in range(250):
            queued = [j for j in submitted if j.status is JobStatus.QUEUED]
            waiting = [j for j in queued if not scheduler.is_dispatched(j.id)]
            action = rng.random()
            if action < 0.4 or not queued:
                job = Job(
                    id=Job.new_id(),
                    nick=rng.choice("abcdefg"),
                    message="p",
                    request=attrs.evolve(REQUEST, model=rng.choice(models)),
                )
                await store.add(job)
                submitted.append(job)
                scheduler.wake()
            elif action < 0.55 and waiting and len(dispatched) < 2:
                reply_tx, reply_rx = trio.open_memory_channel[Job](1)
                await requests_tx.send(WorkRequest(backend, reply_tx))
                dispatched.append(await reply_rx.receive())
            elif action < 0.65 and dispatched:
                job = dispatched.pop(0)
                await store.update(job, status=JobStatus.PROCESSING, started=1.0)
                processing.append(job)
            elif action < 0.7 and processing:
                job = processing.pop(0)  # the worker gives it back: queued again
                await store.update(job, status=JobStatus.QUEUED, started=None)
                scheduler.done(job)
                scheduler.wake()
            elif action < 0.8 and processing:
                job = processing.pop(0)
                await store.update(job, status=JobStatus.COMPLETED, finished=2.0)
                scheduler.done(job)
            elif action < 0.9 and queued:
                job = rng.choice(queued)
                assert await store.cancel_queued(job, "test")
                if job in dispatched:
                    dispatched.remove(job)
                    scheduler.done(job)
            elif action < 0.93:
                scheduler.unloaded(backend)
            else:
                await trio.sleep(rng.choice([1.0, 6.0]))  # passes run out of max_delay
            queued = [j for j in submitted if j.status is JobStatus.QUEUED]
            assert sorted(j.id for j in store.queued()) == sorted(j.id for j in queued)
            # Asked in a random order: the lazy replay must not depend on who asks first.
            by_id = {j.id: store.queue_position(j) for j in rng.sample(queued, len(queued))}
            assert [by_id[j.id] for j in queued] == expected_positions(
                store, scheduler, queued, dispatched
            )
            assert sorted(by_id.values()) == list(range(1, len(queued) + 1))
        nursery.cancel_scope.cancel()
