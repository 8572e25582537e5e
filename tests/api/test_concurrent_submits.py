"""Submissions do not wait for each other's commit (they share one), yet concurrent ones
cannot overshoot a queue cap or make two jobs of one Idempotency-Key."""

from __future__ import annotations

from pathlib import Path

import trio

from conftest import open_stack
from fategen.simulator import SimulatorKnobs

TINY = "-m tiny -w 256 -h 256"


async def test_concurrent_submissions_keep_the_caps_and_the_keys(tmp_path: Path) -> None:
    knobs = SimulatorKnobs(step_seconds=0.002, model_load_seconds=0.0, hang=1)
    env = {
        "FATEGEN_MAX_QUEUE_PER_USER": "3",
        "FATEGEN_MAX_QUEUE": "8",
        "FATEGEN_SHUTDOWN_GRACE": "0",
    }
    async with open_stack(tmp_path, knobs, **env) as stack:
        c = stack.client
        with trio.fail_after(30):
            blocker = await stack.submit(f"hangs on ComfyUI {TINY}", "ops")
            await stack.sim.wait_running(blocker["job_id"])
            answers: list[tuple[str, int, str | None]] = []

            async def submit(nick: str, n: int, key: str | None = None) -> None:
                headers = {} if key is None else {"Idempotency-Key": key}
                r = await c.post(
                    "/request",
                    json={"message": f"job {n} {TINY}", "nick": nick},
                    headers=headers,
                )
                answers.append((nick, r.status_code, r.json().get("job_id")))

            async with trio.open_nursery() as nursery:
                for n in range(10):
                    nursery.start_soon(submit, "bob", n)
            codes = sorted(code for _, code, _ in answers)
            assert codes == [200] * 3 + [429] * 7, answers  # bob's cap, exactly

            answers.clear()
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(submit, "carol", 0, "same-key")
            ids = {job_id for _, code, job_id in answers if code == 200}
            assert len(ids) == 1 and len(answers) == 8, answers  # one job, told eight times

            answers.clear()
            async with trio.open_nursery() as nursery:
                for n in range(12):
                    nursery.start_soon(submit, f"user{n}", n)
            accepted = sum(1 for _, code, _ in answers if code == 200)
            # The whole queue's cap: bob's 3 and carol's 1 were queued already.
            assert accepted == 8 - 4, answers
            assert stack.running.store.count_queued() == 8
