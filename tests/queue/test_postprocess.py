"""The post-processor: a bounded pool of jobs, each completed on its own.

Fetching a job's images counts against the job's time limit; a small job finishing after a
big one completes first; never more than `CONCURRENT_JOBS` at once; the worker never waits to
hand a job over while there is room; a render cancelled midway leaves no half-written file and
no completed job; one job's broken image or bug fails that job alone.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from PIL import Image

from conftest import files, png, solid
from fategen.comfy.wire import ImageRef
from fategen.core.prompt import GenerationRequest
from fategen.queue import postprocess
from fategen.queue.postprocess import CONCURRENT_JOBS, PostProcessor
from fategen.store.jobs import Job, JobStatus, JobStore
from fategen.store.sqlite import JobDB

Fetch = Callable[[Sequence[ImageRef]], Any]
Results = tuple[Job, list[ImageRef]]


def _request(count: int = 1, size: int = 256) -> GenerationRequest:
    return GenerationRequest(
        prompt="p", negative="", model="tiny", width=size, height=size, count=count, seed=1
    )


async def _processing(store: JobStore, *, count: int = 1, size: int = 256) -> Job:
    job = Job(id=Job.new_id(), nick="n", message="p", request=_request(count, size))
    await store.add(job)
    await store.update(job, status=JobStatus.PROCESSING, started=time.time())
    return job


async def _until_finished(store: JobStore, job: Job) -> None:
    while not job.status.finished:
        await store.wait_change(job.id)


@pytest.fixture
def store() -> JobStore:
    return JobStore(JobDB(None))


@asynccontextmanager
async def _running(
    store: JobStore, fetch: Fetch, out: Path, *, buffer: int = 0, **kw: Any
) -> AsyncIterator[tuple[trio.MemorySendChannel[Results], PostProcessor]]:
    """A post-processor running in a nursery; yields the worker's end of its channel."""
    tx, rx = trio.open_memory_channel[Results](buffer)
    post = PostProcessor(store, fetch, out, rx, **kw)
    async with trio.open_nursery() as nursery:
        await nursery.start(post.run)
        async with tx:
            yield tx, post
        nursery.cancel_scope.cancel()


class HeldRenders:
    """Stands in for `render_result_async`: each job's render waits until the test lets it
    go (`release`), and how many run at once is recorded."""

    def __init__(self) -> None:
        self.go: collections.defaultdict[str, trio.Event] = collections.defaultdict(trio.Event)
        self.running: set[str] = set()
        self.most = 0

    def release(self, job: Job) -> None:
        self.go[job.id].set()

    async def __call__(self, blobs: Sequence[bytes], out: Path, job_id: str, **kw: Any) -> Path:
        self.running.add(job_id)
        self.most = max(self.most, len(self.running))
        try:
            await self.go[job_id].wait()
        finally:
            self.running.discard(job_id)
        return out / f"{job_id}.webp"


async def _one_png(refs: Sequence[ImageRef]) -> list[bytes]:
    return [png(solid((200, 30, 30), (32, 32))) for _ in refs]


REF = [ImageRef("a.png")]


async def test_fetching_images_counts_against_the_job_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, store: JobStore
) -> None:
    """A job that ran 850 of its 900 s on ComfyUI has 50 s left to get its images."""
    job = await _processing(store)
    await store.update(job, started=time.time() - 850)
    fetches = 0

    async def never(refs: Sequence[ImageRef]) -> list[bytes]:
        nonlocal fetches
        fetches += 1
        await trio.sleep_forever()
        raise AssertionError

    _, results = trio.open_memory_channel[Results](0)
    post = PostProcessor(store, never, tmp_path, results, job_timeout=900)
    start = trio.current_time()
    await post.process(job, [ImageRef("a.png")])
    took = trio.current_time() - start
    assert 45 <= took <= 55, took
    assert fetches == 1
    assert job.status is JobStatus.FAILED
    assert job.error == (
        "the job ran longer than 900 s (its images could not be fetched from ComfyUI in "
        "time), so it was stopped"
    )


async def test_a_small_job_after_a_big_one_completes_first(
    tmp_path: Path, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The big job's grid is still being made (its render is held) when the small job,
    handed over after it, completes: nothing waits for the big one."""
    renders = HeldRenders()
    monkeypatch.setattr(postprocess, "render_result_async", renders)
    big = await _processing(store, count=4, size=1024)
    small = await _processing(store)
    renders.release(small)
    with trio.fail_after(10):
        async with _running(store, _one_png, tmp_path) as (tx, _):
            await tx.send((big, REF * 4))
            await tx.send((small, REF))
            await _until_finished(store, small)
            assert small.status is JobStatus.COMPLETED
            assert big.status is JobStatus.PROCESSING and renders.running == {big.id}
            renders.release(big)
            await _until_finished(store, big)
    assert big.status is JobStatus.COMPLETED


async def test_a_real_small_grid_completes_before_a_real_big_one(
    tmp_path: Path, store: JobStore
) -> None:
    """The same with real renders: a 4 x 1024x1024 grid handed over first, a 32x32 image
    just after it; the small one's file is written and recorded first."""
    noise = png(Image.effect_noise((1024, 1024), 64).convert("RGB"))
    big = await _processing(store, count=4, size=1024)
    small = await _processing(store)
    order: list[str] = []

    async def fetch(refs: Sequence[ImageRef]) -> list[bytes]:
        return [noise] * 4 if len(refs) == 4 else await _one_png(refs)

    async def record(job: Job) -> None:
        await _until_finished(store, job)
        order.append(job.id)

    with trio.fail_after(30):
        async with _running(store, fetch, tmp_path) as (tx, _), trio.open_nursery() as watch:
            watch.start_soon(record, big)
            watch.start_soon(record, small)
            await tx.send((big, REF * 4))
            await tx.send((small, REF))
    assert order == [small.id, big.id]
    assert (big.status, small.status) == (JobStatus.COMPLETED, JobStatus.COMPLETED)
    with Image.open(tmp_path / f"{big.id}.webp") as image:
        assert image.size == (2048, 2048)


async def test_never_more_than_the_pool_at_once_and_the_worker_never_waits_for_room(
    tmp_path: Path, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    renders = HeldRenders()
    monkeypatch.setattr(postprocess, "render_result_async", renders)
    fetching = 0
    most_fetching = 0

    async def fetch(refs: Sequence[ImageRef]) -> list[bytes]:
        nonlocal fetching, most_fetching
        fetching += 1
        most_fetching = max(most_fetching, fetching)
        await trio.lowlevel.checkpoint()
        fetching -= 1
        return [b"image"]

    jobs = [await _processing(store) for _ in range(CONCURRENT_JOBS + 4)]
    with trio.fail_after(10):
        # An unbuffered channel: a hand-over succeeds at once only if the pool is waiting.
        async with _running(store, fetch, tmp_path, buffer=0) as (tx, post):
            for job in jobs[:CONCURRENT_JOBS]:
                await trio.testing.wait_all_tasks_blocked()
                tx.send_nowait((job, REF))  # raises WouldBlock if the pool were not waiting
            await trio.testing.wait_all_tasks_blocked()
            assert renders.running == {j.id for j in jobs[:CONCURRENT_JOBS]} == post.in_flight
            assert post.busy
            with pytest.raises(trio.WouldBlock):  # full: the next one waits for room
                tx.send_nowait((jobs[CONCURRENT_JOBS], REF))
            for job in jobs[CONCURRENT_JOBS:]:
                # Each hand-over is taken once a job ahead has been recorded.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(tx.send, (job, REF))
                    await trio.testing.wait_all_tasks_blocked()
                    oldest = next(j for j in jobs if j.id in renders.running)
                    renders.release(oldest)
                await trio.testing.wait_all_tasks_blocked()
                assert len(renders.running) == CONCURRENT_JOBS and job.id in renders.running
            for job in jobs:
                renders.release(job)
            for job in jobs:
                await _until_finished(store, job)
            await trio.testing.wait_all_tasks_blocked()
            assert not post.busy and not post.in_flight
    assert renders.most == CONCURRENT_JOBS
    assert most_fetching <= CONCURRENT_JOBS
    assert [j.status for j in jobs] == [JobStatus.COMPLETED] * len(jobs)


async def test_a_cancelled_render_leaves_no_partial_file_and_no_completed_job(
    tmp_path: Path, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled (the service stops) while its grid is being encoded in a thread: the thread
    is waited for, so the file is whole or absent, and the job is not recorded completed (a
    restart finds the file and uses it)."""
    started = trio.Event()
    go = threading.Event()
    real = postprocess.render_result

    def held_render(*args: Any, **kwargs: Any) -> Path:
        trio.from_thread.run_sync(started.set)
        go.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(postprocess, "render_result", held_render)
    job = await _processing(store)
    other = await _processing(store)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            tx, rx = trio.open_memory_channel[Results](2)
            post = PostProcessor(store, _one_png, tmp_path, rx)
            await nursery.start(post.run)
            await tx.send((job, REF))
            await started.wait()
            nursery.cancel_scope.cancel()
            go.set()
    assert job.status is JobStatus.PROCESSING
    assert other.status is JobStatus.PROCESSING
    assert [f for f in files(tmp_path) if f.endswith(".tmp")] == []
    for name in files(tmp_path):  # whole, if there
        with Image.open(tmp_path / name) as image:
            image.load()


async def test_one_broken_job_does_not_affect_the_others(tmp_path: Path, store: JobStore) -> None:
    """Three jobs post-processed together: one whose image does not decode and one whose
    fetch hits a bug fail, each with its one line; the third completes; the pool goes on."""
    broken, buggy, fine, later = [await _processing(store) for _ in range(4)]
    all_fetching = trio.Event()
    fetching = 0

    async def fetch(refs: Sequence[ImageRef]) -> list[bytes]:
        nonlocal fetching
        fetching += 1
        if fetching == 3:
            all_fetching.set()
        await all_fetching.wait()  # the three are in flight together
        name = refs[0].filename
        if name == "broken.png":
            return [b"not an image"]
        if name == "buggy.png":
            raise RuntimeError("a bug")
        return await _one_png(refs)

    with trio.fail_after(20):
        async with _running(store, fetch, tmp_path) as (tx, _):
            await tx.send((broken, [ImageRef("broken.png")]))
            await tx.send((buggy, [ImageRef("buggy.png")]))
            await tx.send((fine, [ImageRef("fine.png")]))
            for job in (broken, buggy, fine):
                await _until_finished(store, job)
            await tx.send((later, [ImageRef("later.png")]))
            await _until_finished(store, later)
    assert (broken.status, broken.error) == (
        JobStatus.FAILED,
        "ComfyUI returned an image that cannot be decoded",
    )
    assert (buggy.status, buggy.error) == (
        JobStatus.FAILED,
        "making the image failed unexpectedly; it has been logged",
    )
    assert (fine.status, later.status) == (JobStatus.COMPLETED, JobStatus.COMPLETED)
    assert files(tmp_path) == sorted([f"{fine.id}.webp", f"{later.id}.webp"])
