"""Retention: old finished jobs and their images go; queued and running jobs never do."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from conftest import open_stack
from fategen.core.prompt import GenerationRequest
from fategen.simulator import SimulatorKnobs
from fategen.store.jobs import Job, JobStatus, JobStore, result_path
from fategen.store.retention import Pruner, prune
from fategen.store.sqlite import JobDB

HOUR = 3600.0
NOW = 1_800_000_000.0  # a fake "now" (wall clock)


def make_job(
    status: JobStatus, *, finished_hours_ago: float | None, created_hours_ago: float
) -> Job:
    request = GenerationRequest(
        prompt="a fox", negative="", model="tiny", width=256, height=256, count=1, seed=1
    )
    return Job(
        id=Job.new_id(),
        nick="fate",
        message="a fox",
        request=request,
        status=status,
        created=NOW - created_hours_ago * HOUR,
        finished=None if finished_hours_ago is None else NOW - finished_hours_ago * HOUR,
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[JobStore]:
    db = JobDB(tmp_path / "jobs.sqlite3")
    try:
        yield JobStore(db)
    finally:
        db.close()


async def fill(store: JobStore, output: Path) -> dict[str, Job]:
    await trio.Path(output).mkdir(exist_ok=True)
    jobs = {
        "old completed": make_job(
            JobStatus.COMPLETED, finished_hours_ago=200, created_hours_ago=201
        ),
        "old failed": make_job(JobStatus.FAILED, finished_hours_ago=170, created_hours_ago=300),
        "old cancelled": make_job(
            JobStatus.CANCELLED, finished_hours_ago=169, created_hours_ago=169
        ),
        "new completed": make_job(JobStatus.COMPLETED, finished_hours_ago=1, created_hours_ago=500),
        # Old by creation, but not finished: never pruned.
        "old queued": make_job(JobStatus.QUEUED, finished_hours_ago=None, created_hours_ago=900),
        "old running": make_job(
            JobStatus.PROCESSING, finished_hours_ago=None, created_hours_ago=900
        ),
    }
    for job in jobs.values():
        await store.add(job)
        await trio.Path(result_path(output, job.id)).write_bytes(b"RIFF")
    return jobs


async def test_prune_removes_only_old_finished_jobs_and_their_images(
    store: JobStore, tmp_path: Path
) -> None:
    output = tmp_path / "output"
    jobs = await fill(store, output)
    with trio.fail_after(5):
        assert await prune(store, output, max_age=168 * HOUR, now=NOW) == 3
    gone = {"old completed", "old failed", "old cancelled"}
    for name, job in jobs.items():
        assert (await store.get(job.id) is None) == (name in gone), name
        assert result_path(output, job.id).exists() == (name not in gone), name
    # And on disk: a reload finds the same.
    db = JobDB(tmp_path / "jobs.sqlite3")
    try:
        on_disk = {j.id for j in await db.run(db.load_all)}
    finally:
        db.close()
    assert on_disk == {j.id for n, j in jobs.items() if n not in gone}
    with trio.fail_after(5):
        assert await prune(store, output, max_age=168 * HOUR, now=NOW) == 0


async def test_a_missing_image_does_not_stop_pruning(store: JobStore, tmp_path: Path) -> None:
    output = tmp_path / "output"
    jobs = await fill(store, output)
    result_path(output, jobs["old completed"].id).unlink()
    with trio.fail_after(5):
        assert await prune(store, output, max_age=168 * HOUR, now=NOW) == 3


async def test_pruner_runs_periodically_on_its_clock(store: JobStore, tmp_path: Path) -> None:
    output = tmp_path / "output"
    jobs = await fill(store, output)
    now = [NOW - 100 * HOUR]  # at first nothing is old enough
    pruner = Pruner(store, output, max_age=168 * HOUR, every=0.01, clock=lambda: now[0])
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(pruner.run)
            await trio.sleep(0.05)
            assert len(store.held_jobs()) == len(jobs)
            now[0] = NOW
            while await store.get(jobs["old failed"].id) is not None:
                await store.wait_any_change()
            nursery.cancel_scope.cancel()
    assert len(store.held_jobs()) == 3


async def test_service_prunes_finished_jobs_but_not_queued_ones(tmp_path: Path) -> None:
    env = {
        "FATEGEN_RETENTION_HOURS": str(0.5 / HOUR),  # half a second
        "FATEGEN_PRUNE_INTERVAL": "0.05",
        "FATEGEN_SHUTDOWN_GRACE": "0",
    }
    async with open_stack(tmp_path, SimulatorKnobs(step_seconds=0.002), **env) as stack:
        with trio.fail_after(10):
            done = await stack.wait((await stack.submit("old -m tiny -w 256 -h 256"))["job_id"])
            assert done["status"] == "completed"
            image = trio.Path(done["result"])
            assert await image.is_file()
            stack.sim.knobs.hang = 1
            stuck = (await stack.submit("stuck -m tiny -w 256 -h 256"))["job_id"]
            waiting = (await stack.submit("waiting -m tiny -w 256 -h 256"))["job_id"]
            store = stack.running.store
            while await store.get(done["job_id"]) is not None:
                await store.wait_any_change()
            assert not await image.exists()
            assert (await stack.client.get(f"/job/{done['job_id']}")).status_code == 404
            await trio.sleep(1)  # well past the retention age, many prunings later
            assert (await stack.client.get(f"/job/{stuck}")).json()["status"] == "processing"
            assert (await stack.client.get(f"/job/{waiting}")).json()["status"] == "queued"
