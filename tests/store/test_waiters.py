"""Waiting for a job: waiters are woken a batch at a time (the event loop is never held for
all of them at once), a long-poll for the job's end is not woken by its progress, and nothing
stays registered once the waiters are gone."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator

import pytest
import trio
import trio.abc
import trio.testing

from fategen.core.prompt import GenerationRequest
from fategen.store.jobs import Job, JobStatus, JobStore
from fategen.store.sqlite import JobDB
from fategen.store.waiters import WAKE_BATCH, JobWaiters


class Rounds(trio.abc.Instrument):
    """Counts the scheduler's rounds: one per look at I/O, then a batch of task steps."""

    def __init__(self) -> None:
        self.round = 0

    def after_io_wait(self, timeout: float) -> None:
        self.round += 1


@pytest.fixture
async def rounds() -> AsyncIterator[Rounds]:
    instrument = Rounds()
    trio.lowlevel.add_instrument(instrument)
    yield instrument
    trio.lowlevel.remove_instrument(instrument)


@pytest.fixture
def store() -> JobStore:
    return JobStore(JobDB(None))


def _job() -> Job:
    request = GenerationRequest(
        prompt="p", negative="", model="tiny", width=256, height=256, count=1, seed=1
    )
    return Job(id=Job.new_id(), nick="n", message="p", request=request)


async def test_a_change_wakes_its_waiters_a_batch_per_round(rounds: Rounds) -> None:
    waiters = JobWaiters()
    woken_in: list[int] = []

    async def wait() -> None:
        await waiters.wait()
        woken_in.append(rounds.round)

    count = 10 * WAKE_BATCH + 5
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert waiters.statistics().tasks_waiting == count
            waiters.wake()
            assert waiters.statistics().tasks_waiting == 0  # later waits wait for the next
    per_round = collections.Counter(woken_in)
    assert len(woken_in) == count
    assert max(per_round.values()) == WAKE_BATCH
    assert len(per_round) >= count // WAKE_BATCH


async def test_waiters_cancelled_mid_relay_do_not_stop_it() -> None:
    waiters = JobWaiters()
    woken: set[int] = set()
    scopes: list[trio.CancelScope] = []

    async def wait(n: int) -> None:
        with trio.CancelScope() as scope:
            scopes.append(scope)
            await waiters.wait()
            woken.add(n)

    count = 4 * WAKE_BATCH
    cancelled = set(range(WAKE_BATCH, 3 * WAKE_BATCH, 2))  # parked still, behind the first batch
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for n in range(count):
                nursery.start_soon(wait, n)
                await trio.testing.wait_all_tasks_blocked()  # parked in this order
            waiters.wake()
            for n in cancelled:
                scopes[n].cancel()
    assert woken == set(range(count)) - cancelled


async def test_progress_wakes_only_the_waiters_that_count_it(store: JobStore) -> None:
    job = _job()
    await store.add(job)
    woken: list[str] = []

    async def wait(kind: str, *, progress: bool) -> None:
        await store.wait_change(job.id, progress=progress)
        woken.append(kind)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(lambda: wait("end", progress=False))
            nursery.start_soon(lambda: wait("step", progress=True))
            await trio.testing.wait_all_tasks_blocked()
            entry = store._changed[job.id]
            store.set_progress(job, 1, 10)
            await trio.testing.wait_all_tasks_blocked()
            assert woken == ["step"]
            assert store._changed[job.id] is entry  # the others still wait, untouched
            assert entry.statistics().tasks_waiting == 3
            store.set_progress(job, 2, 10)  # nobody counts progress now: nothing happens
            await trio.testing.wait_all_tasks_blocked()
            assert woken == ["step"]
            await store.update(job, status=JobStatus.PROCESSING)
    assert woken == ["step", "end", "end", "end"]
    assert store._changed == {}


async def test_a_progress_wake_with_no_state_waiter_drops_the_entry(store: JobStore) -> None:
    job = _job()
    await store.add(job)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.wait_change, job.id)
            await trio.testing.wait_all_tasks_blocked()
            store.set_progress(job, 1, 10)
    assert store._changed == {}


async def test_a_timed_out_state_waiter_leaves_nothing(store: JobStore) -> None:
    job = _job()
    await store.add(job)
    with trio.move_on_after(0.01):
        await store.wait_change(job.id, progress=False)
    assert store._changed == {}
