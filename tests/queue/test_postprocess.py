"""The post-processor: fetching a job's images counts against the job's time limit."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import trio
import trio.testing

from fategen.comfy.wire import ImageRef
from fategen.core.prompt import GenerationRequest
from fategen.queue.postprocess import PostProcessor
from fategen.store.jobs import Job, JobStatus, JobStore
from fategen.store.sqlite import JobDB


async def test_fetching_images_counts_against_the_job_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A job that ran 850 of its 900 s on ComfyUI has 50 s left to get its images."""
    db = JobDB(None)
    store = JobStore(db)
    request = GenerationRequest(
        prompt="p", negative="", model="tiny", width=256, height=256, count=1, seed=1
    )
    job = Job(id=Job.new_id(), nick="n", message="p", request=request)
    await store.add(job)
    await store.update(job, status=JobStatus.PROCESSING, started=time.time() - 850)
    fetches = 0

    async def never(refs: Sequence[ImageRef]) -> list[bytes]:
        nonlocal fetches
        fetches += 1
        await trio.sleep_forever()
        raise AssertionError

    _, results = trio.open_memory_channel[tuple[Job, list[ImageRef]]](0)
    post = PostProcessor(store, never, tmp_path, results, job_timeout=900)
    start = trio.current_time()
    await post.process(job, [ImageRef("a.png")])
    took = trio.current_time() - start
    db.close()
    assert 45 <= took <= 55, took
    assert fetches == 1
    assert job.status is JobStatus.FAILED
    assert job.error == (
        "the job ran longer than 900 s (its images could not be fetched from ComfyUI in "
        "time), so it was stopped"
    )
