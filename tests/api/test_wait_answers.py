"""Answering many long-polls of one job: one body per state of the job, shared by its waiters
and identical to ``GET /job``'s; and a batch at a time, even when thousands of timeouts end at
the same instant. Through the app's test client (no sockets: the clock may be a fake one)."""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.abc
import trio.testing

from conftest import make_settings
from fategen.api import jobs as job_routes
from fategen.api.answers import ANSWER_BATCH, JobAnswers
from fategen.core.prompt import GenerationRequest
from fategen.service import Service, build_service
from fategen.store.jobs import Job, JobStatus


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    built = build_service(make_settings(tmp_path))
    try:
        yield built
    finally:
        built.db.close()


async def _job(service: Service, status: JobStatus = JobStatus.QUEUED) -> Job:
    request = GenerationRequest(
        prompt="p", negative="", model="tiny", width=256, height=256, count=1, seed=1
    )
    job = Job(id=Job.new_id(), nick="n", message="p", request=request)
    await service.store.add(job)
    if status is not JobStatus.QUEUED:
        await service.store.update(job, status=status, started=time.time())
    return job


def _answers(service: Service) -> JobAnswers:
    answers = service.app.extensions["fategen.answers"]
    assert isinstance(answers, JobAnswers)
    return answers


async def test_the_waiters_of_a_job_share_one_body_equal_to_get_job(service: Service) -> None:
    job = await _job(service, JobStatus.PROCESSING)
    client = service.app.test_client()
    got: list[tuple[int, bytes, str | None]] = []

    async def wait() -> None:
        r = await client.get(f"/wait/{job.id}?timeout=60")
        got.append((r.status_code, await r.get_data(), r.headers.get("Content-Type")))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert service.store._changed[job.id].statistics().tasks_waiting == 200
            await service.store.update(
                job, status=JobStatus.COMPLETED, result=f"{job.id}.webp", finished=time.time()
            )
        plain = await client.get(f"/job/{job.id}")
    assert {(status, body) for status, body, _ in got} == {(200, await plain.get_data())}
    assert {kind for _, _, kind in got} == {plain.headers["Content-Type"]}
    assert (_answers(service).built, _answers(service).reused) == (1, 199)


async def test_a_timed_out_wait_answers_202_with_the_same_body_as_get_job(
    service: Service,
) -> None:
    job = await _job(service)
    client = service.app.test_client()
    with trio.fail_after(20):
        waited = await client.get(f"/wait/{job.id}?timeout=0")
        plain = await client.get(f"/job/{job.id}")
    assert waited.status_code == 202
    assert await waited.get_data() == await plain.get_data()
    assert (await waited.get_json())["queue_position"] == 1


async def test_a_new_state_gets_a_new_body(service: Service) -> None:
    job = await _job(service)
    client = service.app.test_client()
    with trio.fail_after(20):
        queued = await (await client.get(f"/wait/{job.id}?timeout=0")).get_json()
        await service.store.update(job, status=JobStatus.PROCESSING, started=time.time())
        processing = await (await client.get(f"/wait/{job.id}?timeout=0")).get_json()
        service.store.set_progress(job, 3, 10)
        stepped = await (await client.get(f"/wait/{job.id}?timeout=0")).get_json()
    assert (queued["status"], processing["status"]) == ("queued", "processing")
    assert stepped["progress"] == {"step": 3, "of": 10}
    assert _answers(service).built == 3


class Rounds(trio.abc.Instrument):
    def __init__(self) -> None:
        self.round = 0

    def after_io_wait(self, timeout: float) -> None:
        self.round += 1


async def test_timeouts_ending_together_answer_a_batch_per_round(
    service: Service, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every waiter of a job that does not finish times out at the same instant: their
    answers are built at most `ANSWER_BATCH` per scheduler round."""
    job = await _job(service)
    rounds = Rounds()
    built_in: list[int] = []
    answer = job_routes.job_answer

    async def counted(*args: Any) -> Any:
        built_in.append(rounds.round)
        return await answer(*args)

    monkeypatch.setattr(job_routes, "job_answer", counted)
    client = service.app.test_client()
    statuses: collections.Counter[int] = collections.Counter()

    async def wait() -> None:
        statuses[(await client.get(f"/wait/{job.id}?timeout=5")).status_code] += 1

    count = 8 * ANSWER_BATCH
    trio.lowlevel.add_instrument(rounds)
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(wait)
    finally:
        trio.lowlevel.remove_instrument(rounds)
    assert statuses == {202: count}
    per_round = collections.Counter(built_in)
    assert max(per_round.values()) <= ANSWER_BATCH
    assert len(per_round) >= count // ANSWER_BATCH
