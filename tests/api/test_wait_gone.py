"""A /wait whose job is removed (retention) while it is waited on answers 404 with a sentence."""

from __future__ import annotations

from pathlib import Path

import trio

from conftest import open_stack
from fategen.simulator import SimulatorKnobs

TINY = "-m tiny -w 256 -h 256"


async def test_wait_on_a_job_removed_meanwhile_is_404(tmp_path: Path) -> None:
    knobs = SimulatorKnobs(step_seconds=0.5, model_load_seconds=0.0)  # the job stays a while
    async with open_stack(tmp_path, knobs) as stack:
        with trio.fail_after(20):
            job_id = (await stack.submit(f"slow {TINY}", "a"))["job_id"]
            answer: dict[str, object] = {}

            async def wait() -> None:
                r = await stack.client.get(f"/wait/{job_id}", params={"timeout": 15})
                answer["status"], answer["body"] = r.status_code, r.json()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await trio.sleep(0.3)  # parked
                await stack.running.store.delete([job_id])
    assert answer["status"] == 404, answer
    assert answer["body"] == {"error": f"job {job_id} is no longer kept (it finished too long ago)"}
