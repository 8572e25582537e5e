"""The queue end to end: its order (turns, model affinity), caps over HTTP, and cancel.

Jobs pile up behind a first job that runs slowly (or hangs) on the simulator; the order the
simulator then executes them in is compared with what the service said beforehand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from conftest import Stack, open_stack
from fategen.simulator import SimulatorKnobs

SIZE = "-w 256 -h 256"


async def positions(stack: Stack, ids: list[str]) -> dict[str, int]:
    found = {}
    for job_id in ids:
        found[job_id] = (await stack.client.get(f"/job/{job_id}")).json()["queue_position"]
    return found


async def wait_executing(stack: Stack, job_id: str) -> None:
    await stack.sim.wait_running(job_id)
    store = stack.running.store
    job = await store.get(job_id)
    assert job is not None
    while job.status.value != "processing":
        await store.wait_change(job_id)


async def test_execution_order_is_the_reported_queue_order(tmp_path: Path) -> None:
    knobs = SimulatorKnobs(step_seconds=0.15, model_load_seconds=0.02)
    plan = [
        ("alice", "tiny"),
        ("alice", "tiny"),
        ("alice", "lumina2"),
        ("bob", "lumina2"),
        ("alice", "tiny"),
        ("bob", "lumina2"),
        ("carol", "illustriousXL"),
        ("carol", "tiny"),
        ("dave", "tiny"),
        ("bob", "tiny"),
    ]
    async with open_stack(tmp_path, knobs, FATEGEN_SHUTDOWN_GRACE="0") as stack:
        with trio.fail_after(20):
            ids = [
                (await stack.submit(f"job {i} -m {model} {SIZE}", nick))["job_id"]
                for i, (nick, model) in enumerate(plan)
            ]
            reported = await positions(stack, ids)
            stack.sim.knobs.step_seconds = 0.002
            assert sorted(reported.values()) == list(range(len(ids))), reported
            for job_id in ids:
                assert (await stack.wait(job_id))["status"] == "completed"
    predicted = sorted(ids, key=reported.__getitem__)
    assert [e.prompt_id for e in stack.sim.executions] == predicted
    # alice's first job runs, her second was posted ahead; then the users who have not had a
    # turn go first, but jobs for the loaded "tiny" jump ahead until bob's and carol's first
    # jobs have been passed over three times (the bound); then they run, whatever it loads.
    ran = [plan[ids.index(i)] for i in predicted]
    assert ran == [
        ("alice", "tiny"),
        ("alice", "tiny"),
        ("dave", "tiny"),
        ("carol", "tiny"),
        ("alice", "tiny"),
        ("bob", "lumina2"),
        ("carol", "illustriousXL"),
        ("alice", "lumina2"),
        ("bob", "lumina2"),
        ("bob", "tiny"),
    ]


async def test_positions_count_down_to_zero_in_steps_of_one(tmp_path: Path) -> None:
    knobs = SimulatorKnobs(step_seconds=0.05, model_load_seconds=0.01)
    async with open_stack(tmp_path, knobs, FATEGEN_SHUTDOWN_GRACE="0") as stack:
        with trio.fail_after(20):
            ids = [(await stack.submit(f"n{i} -m tiny {SIZE}", "x"))["job_id"] for i in range(5)]
            last = await stack.running.store.get(ids[-1])
            assert last is not None
            seen = []
            while not last.status.finished:
                position = stack.running.store.queue_position(last)
                if position is not None and (not seen or seen[-1] != position):
                    seen.append(position)
                await stack.running.store.wait_any_change()
    assert seen == [4, 3, 2, 1, 0]


# alice's jobs use "tiny", bob's "lumina2"; submitted alternately behind a slow first job
# (alice's, on tiny) with bob's first job posted ahead: lumina2 is loaded next.
AFFINITY_CASES = [
    pytest.param({}, "ab" + "bbb" + "aaa", 2, id="affinity (3 passes)"),
    pytest.param({"FATEGEN_AFFINITY_MAX_PASSES": "1"}, "abbaabba", 4, id="1 pass"),
    pytest.param({"FATEGEN_AFFINITY_MAX_PASSES": "0"}, "ab" * 4, 7, id="no affinity"),
    pytest.param({"FATEGEN_AFFINITY_MAX_DELAY": "0"}, "ab" * 4, 7, id="no delay"),
]


@pytest.mark.parametrize(("env", "expected", "swaps"), AFFINITY_CASES)
async def test_model_affinity_within_bounds(
    tmp_path: Path, env: dict[str, str], expected: str, swaps: int
) -> None:
    knobs = SimulatorKnobs(step_seconds=0.1, model_load_seconds=0.05)
    async with open_stack(tmp_path, knobs, FATEGEN_SHUTDOWN_GRACE="0", **env) as stack:
        with trio.fail_after(20):
            ids = []
            for i in range(4):
                ids.append((await stack.submit(f"a{i} -m tiny {SIZE}", "alice"))["job_id"])
                ids.append((await stack.submit(f"b{i} -m lumina2 {SIZE}", "bob"))["job_id"])
            reported = await positions(stack, ids)
            stack.sim.knobs.step_seconds = 0.002
            for job_id in ids:
                assert (await stack.wait(job_id))["status"] == "completed"
    order = [e.prompt_id for e in stack.sim.executions]
    assert order == sorted(ids, key=reported.__getitem__)
    assert "".join("ab"[ids.index(i) % 2] for i in order) == expected
    assert stack.sim.model_swaps == swaps
    assert stack.running.service.policy.swaps == swaps


async def test_queue_caps_answer_429_with_retry_after(tmp_path: Path) -> None:
    knobs = SimulatorKnobs(hang=1)  # the first job holds the GPU
    env = {
        "FATEGEN_MAX_QUEUE_PER_USER": "2",
        "FATEGEN_MAX_QUEUE": "3",
        "FATEGEN_SHUTDOWN_GRACE": "0",
    }
    async with open_stack(tmp_path, knobs, **env) as stack:
        with trio.fail_after(10):
            first = await stack.submit(f"hold -m tiny {SIZE}", "alice")
            await wait_executing(stack, first["job_id"])
            await stack.submit(f"one -m tiny {SIZE}", "alice")
            await stack.submit(f"two -m tiny {SIZE}", "alice")

            async def post(nick: str) -> httpx.Response:
                body = {"message": f"more -m tiny {SIZE}", "nick": nick}
                return await stack.client.post("/request", json=body)

            mine = await post("alice")
            assert mine.status_code == 429
            assert "alice already has 2 jobs queued" in mine.json()["error"]
            assert int(mine.headers["Retry-After"]) > 0
            assert (await post("bob")).status_code == 200
            full = await post("carol")
            assert full.status_code == 429
            assert "the queue is full (3 jobs)" in full.json()["error"]
            assert int(full.headers["Retry-After"]) > 0
            r = await stack.client.delete(f"/job/{first['job_id']}", params={"nick": "alice"})
            assert r.json()["status"] == "cancelled"


async def test_cancel_queued_posted_ahead_and_executing(tmp_path: Path) -> None:
    knobs = SimulatorKnobs(step_seconds=0.002, hang=1)  # the first job runs until interrupted
    async with open_stack(tmp_path, knobs, FATEGEN_SHUTDOWN_GRACE="0") as stack:
        with trio.fail_after(10):
            running, ahead, queued, last = [
                (await stack.submit(f"{name} -m tiny {SIZE}", "judy"))["job_id"]
                for name in ("running", "ahead", "queued", "last")
            ]
            await wait_executing(stack, running)
            assert [i.prompt_id for i in stack.sim.queue.pending] == [ahead]
            assert stack.running.service.scheduler.is_dispatched(ahead)
            woken: list[dict[str, Any]] = []

            async def waiter(job_id: str) -> None:
                async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
                    woken.append((await client.get(f"/wait/{job_id}")).json())

            async def cancel(job_id: str) -> dict[str, Any]:
                r = await stack.client.delete(f"/job/{job_id}", params={"nick": "judy"})
                assert r.status_code == 200, r.text
                body: dict[str, Any] = r.json()
                assert (body["status"], body["cancelled_by"]) == ("cancelled", "judy")
                return body

            async with trio.open_nursery() as nursery:
                for job_id in (queued, ahead, running):
                    nursery.start_soon(waiter, job_id)
                await trio.sleep(0.1)
                await cancel(queued)
                # Out of ComfyUI's queue at once, without waiting for the running job.
                with trio.fail_after(1):
                    await cancel(ahead)
                assert stack.sim.queue.pending == []
                assert stack.sim.queue.running is not None
                await cancel(running)
            assert sorted(w["job_id"] for w in woken) == sorted([queued, ahead, running])
            assert {w["status"] for w in woken} == {"cancelled"}
            assert (await stack.wait(last))["status"] == "completed"
            # Nothing of the cancelled prompts stays tracked in the ComfyUI session.
            assert stack.running.session.statistics().tracked_prompts == 0
    ran = [(e.prompt_id, e.status) for e in stack.sim.executions]
    assert ran == [(running, "interrupted"), (last, "success")]
