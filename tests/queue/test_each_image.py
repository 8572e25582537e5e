"""Each image of a job, besides its grid (issue 17): ``<id>-<n>.webp`` for n from 1, written
atomically in the render thread; crash leftovers removed at start-up; pruned with the grid."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from PIL import Image

from conftest import files, png, solid
from fategen.comfy.wire import ImageRef
from fategen.core.prompt import GenerationRequest
from fategen.queue.postprocess import PostProcessor, remove_partial_results, render_result
from fategen.store.jobs import Job, JobStatus, JobStore, result_path
from fategen.store.retention import image_path, prune
from fategen.store.sqlite import JobDB

SIZES = [(64, 48), (32, 32), (48, 64), (16, 24)]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


@pytest.fixture
def store() -> JobStore:
    return JobStore(JobDB(None))


async def _processing(store: JobStore, count: int) -> Job:
    request = GenerationRequest(
        prompt="p", negative="", model="tiny", width=64, height=64, count=count, seed=1
    )
    job = Job(id=Job.new_id(), nick="n", message="p", request=request)
    await store.add(job)
    await store.update(job, status=JobStatus.PROCESSING, started=time.time())
    return job


async def _four(refs: Sequence[ImageRef]) -> list[bytes]:
    return [png(solid(c, s)) for c, s in zip(COLOURS, SIZES, strict=True)]


def _decoded(path: Path) -> tuple[str | None, tuple[int, int], tuple[int, ...]]:
    with Image.open(path) as image:
        image.load()
        return image.format, image.size, image.convert("RGB").getpixel((0, 0))  # type: ignore[return-value]


async def test_a_four_image_job_writes_its_grid_and_each_image(
    tmp_path: Path, store: JobStore
) -> None:
    job = await _processing(store, 4)
    tx, rx = trio.open_memory_channel[tuple[Job, list[ImageRef]]](0)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(PostProcessor(store, _four, tmp_path, rx).run)
            await tx.send((job, [ImageRef(f"{n}.png") for n in range(4)]))
            while not job.status.finished:
                await store.wait_change(job.id)
            nursery.cancel_scope.cancel()
    assert job.status is JobStatus.COMPLETED and job.result == f"{job.id}.webp"
    assert files(tmp_path) == sorted(
        [f"{job.id}.webp", *(f"{job.id}-{n}.webp" for n in range(1, 5))]
    )
    assert _decoded(result_path(tmp_path, job.id))[:2] == ("WEBP", (128, 128))  # 2x2 of 64x64
    for n, (size, colour) in enumerate(zip(SIZES, COLOURS, strict=True), 1):
        kind, got, pixel = _decoded(image_path(tmp_path, job.id, n))
        assert (kind, got) == ("WEBP", size), n
        assert all(abs(a - b) < 16 for a, b in zip(pixel, colour, strict=True)), (n, pixel)


def test_one_image_writes_only_the_grid(tmp_path: Path) -> None:
    render_result([png(solid(COLOURS[0], (40, 30)))], tmp_path, "solo")
    assert files(tmp_path) == ["solo.webp"]


def test_a_whole_image_from_a_crash_is_kept_and_a_broken_one_replaced(tmp_path: Path) -> None:
    blobs = [png(solid(c, (32, 32))) for c in COLOURS[:2]]
    render_result(blobs, tmp_path, "job")
    first = image_path(tmp_path, "job", 1).read_bytes()
    result_path(tmp_path, "job").unlink()  # died before the grid was written
    image_path(tmp_path, "job", 2).write_bytes(b"RIFF broken")
    render_result(blobs, tmp_path, "job")
    assert image_path(tmp_path, "job", 1).read_bytes() == first
    assert _decoded(image_path(tmp_path, "job", 2))[:2] == ("WEBP", (32, 32))
    assert files(tmp_path) == ["job-1.webp", "job-2.webp", "job.webp"]


def test_a_partial_image_file_from_a_crash_is_removed_at_start_up(tmp_path: Path) -> None:
    job_id = Job.new_id()
    render_result([png(solid(c, (16, 16))) for c in COLOURS[:2]], tmp_path, job_id)
    (tmp_path / f".{job_id}-3.webp.0123456789abcdef.tmp").write_bytes(b"RIFF half")
    assert remove_partial_results(tmp_path) == 1
    assert files(tmp_path) == sorted([f"{job_id}.webp", f"{job_id}-1.webp", f"{job_id}-2.webp"])


async def test_retention_removes_the_grid_and_each_image(tmp_path: Path, store: JobStore) -> None:
    old, kept = await _processing(store, 4), await _processing(store, 3)
    for job, finished in ((old, 1000.0), (kept, 9000.0)):
        await store.update(job, status=JobStatus.COMPLETED, finished=finished)
        blobs = [png(solid(c, (16, 16))) for c in COLOURS[: job.request.count]]
        await trio.to_thread.run_sync(render_result, blobs, tmp_path, job.id)
    image_path(tmp_path, old.id, 4).unlink()  # a pass cut short deletes from the last image
    with trio.fail_after(10):
        assert await prune(store, tmp_path, max_age=1000.0, now=5000.0) == 1
    assert files(tmp_path) == sorted(
        [f"{kept.id}.webp", *(f"{kept.id}-{n}.webp" for n in (1, 2, 3))]
    )
    assert await store.get(old.id) is None
