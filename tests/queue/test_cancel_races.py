"""A cancel answered ``cancelled`` stays cancelled, whatever the instant it lands; a cancel that
lands once ComfyUI has finished the job answers 409; and neither leaves anything behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from conftest import open_stack
from fategen.simulator import SimulatorKnobs
from fategen.store.model import Job
from fategen.store.sqlite import JobDB

TINY = "-m tiny -w 256 -h 256"
TRIES = 48


async def test_cancel_at_the_hand_over_to_the_follower_is_final(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job posted ahead is cancelled around the moment its predecessor ends, when the
    follower takes it: before the fix, such cancels could answer ``cancelled`` and the job
    then ran to ``completed`` (the cancel was recorded while the follower started it).

    Each write to the database is slowed a little to widen the windows between the
    awaits of the cancel and of the follower, and the cancel is landed at a sweep of
    offsets around the predecessor's end.
    """
    real_save = JobDB.save

    def slow_save(self: JobDB, job: Job) -> None:
        time.sleep(0.003)
        real_save(self, job)

    monkeypatch.setattr(JobDB, "save", slow_save)
    knobs = SimulatorKnobs(step_seconds=0.01, model_load_seconds=0.0)
    answered_cancelled = 0
    async with open_stack(tmp_path, knobs) as stack:
        with trio.fail_after(120):
            for attempt in range(TRIES):
                first = (await stack.submit(f"first {attempt} {TINY}", "a"))["job_id"]
                ahead = (await stack.submit(f"ahead {attempt} {TINY}", "b"))["job_id"]
                await stack.sim.wait_running(first)
                # The first job takes 4 steps of 10 ms: land the cancel from 10 ms before its
                # end to 13 ms after, a millisecond later each try.
                await trio.sleep(0.030 + (attempt % 24) * 0.001)
                r = await stack.client.delete(f"/job/{ahead}", params={"nick": "b"})
                assert r.status_code in (200, 409), r.text
                final = await stack.wait(ahead)
                if r.status_code == 200:
                    answered_cancelled += 1
                    assert r.json()["status"] == "cancelled", r.text
                    assert final["status"] == "cancelled", (attempt, final)
                    assert final["cancelled_by"] == "b"
                else:
                    assert final["status"] == "completed", final
                assert (await stack.wait(first))["status"] == "completed"
        worker = stack.running.service.worker
        assert not worker._cancels and not worker._held and not worker._scopes
        assert stack.running.session.statistics().tracked_prompts == 0
        # No prompt that was answered "cancelled" ran to success on ComfyUI afterwards.
        states = {j.id: j.status.value for j in stack.running.store.held_jobs()}
        for record in stack.sim.executions:
            if states.get(record.prompt_id) == "cancelled":
                assert record.status != "success", record
    assert answered_cancelled >= TRIES // 2  # most land before ComfyUI is done with it


async def test_cancel_during_post_processing_is_409_and_leaks_nothing(tmp_path: Path) -> None:
    """Once ComfyUI has finished the job (its image is being made) a cancel is too late: 409,
    every time, and no entry is kept for it (before: 200 with ``completed``, and a leak)."""
    knobs = SimulatorKnobs(step_seconds=0.002, model_load_seconds=0.0)
    async with open_stack(tmp_path, knobs) as stack:
        post = stack.running.service.post
        entered = trio.Event()
        release = trio.Event()
        real_fetch = post.fetch

        async def slow_fetch(refs: object) -> list[bytes]:
            entered.set()
            await release.wait()
            return await real_fetch(refs)  # type: ignore[arg-type]

        post.fetch = slow_fetch  # holds the job in post-processing
        post.fetch_for = None  # a fleet of one: the one backend's fetch is `post.fetch`
        with trio.fail_after(30):
            job_id = (await stack.submit(f"post {TINY} -c 2"))["job_id"]
            await entered.wait()
            for _ in range(3):
                r = await stack.client.delete(f"/job/{job_id}", params={"nick": "alice"})
                assert r.status_code == 409, r.text
                assert "can no longer be cancelled" in r.json()["error"]
            release.set()
            final = await stack.wait(job_id)
        assert final["status"] == "completed"
        worker = stack.running.service.worker
        assert not worker._cancels and not worker._held
