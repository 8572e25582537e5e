"""Pipelining: ComfyUI never waits for fategen.

The next prompt is posted while the current one runs, and fetching images, making the grid and
encoding the WebP of one job overlap the next generation. Measured on the simulator's execution
log (its trio clock: the service and the simulator share the test's event loop).
"""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

import trio

from conftest import open_stack
from fategen.simulator import SimulatorKnobs

JOBS = 10


async def test_back_to_back_jobs_leave_no_gap_on_comfyui(tmp_path: Path) -> None:
    knobs = SimulatorKnobs(step_seconds=0.03, model_load_seconds=0.01)
    async with open_stack(tmp_path, knobs) as stack:
        with trio.fail_after(30):
            ids = [
                (await stack.submit(f"frame {i} -m tiny -w 512 -h 512 -c 4", f"u{i % 3}"))["job_id"]
                for i in range(JOBS)
            ]
            done = [await stack.wait(job_id) for job_id in ids]
    assert [d["status"] for d in done] == ["completed"] * JOBS
    runs = stack.sim.executions
    assert len(runs) == JOBS
    gaps = [b.started - a.finished for a, b in itertools.pairwise(runs)]
    print(
        f"gaps between prompts: median {statistics.median(gaps) * 1000:.1f} ms, "
        f"max {max(gaps) * 1000:.1f} ms; generation {runs[0].duration * 1000:.0f} ms per job"
    )
    assert statistics.median(gaps) < 0.020
    assert max(gaps) < 0.100

    store = stack.running.store
    by_id = {r.prompt_id: r for r in runs}
    overlapped = 0
    post: list[float] = []
    for current, following in itertools.pairwise(runs):
        job = await store.get(current.prompt_id)
        assert job is not None and job.finished is not None and job.started is not None
        # Post-processing (after ComfyUI finished it) ran while the next prompt executed.
        if job.finished > following.started_wall:
            overlapped += 1
        post.append(job.finished - current.finished_wall)
    print(f"post-processing after ComfyUI: median {statistics.median(post) * 1000:.0f} ms")
    assert overlapped >= JOBS // 2, overlapped
    for job_id in ids:
        job = await store.get(job_id)
        assert job is not None and job.started is not None
        # "processing" means executing: never before ComfyUI started it, and soon after.
        run = by_id[job_id]
        assert run.started_wall - 0.005 <= job.started <= run.started_wall + 0.5
