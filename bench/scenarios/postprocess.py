"""Scenario 5: post-processing. Four 1024x1024 images into one 2x2 WebP grid.

Two figures: the grid itself (`fategen.queue.postprocess.render_result` on four simulator
PNGs, in this process, median of 5), and the service's overhead per job: from the simulator's
execution end to the job being ``completed`` in the store (fetch 4 PNGs, decode, grid, WebP,
write, save), with jobs run one at a time.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from common import median, service, simulator

from fategen.queue.postprocess import render_result
from fategen.simulator.graph import ImageSpec
from fategen.simulator.render import render_png


def _grid_seconds(out_dir: Path, repeats: int = 5) -> float:
    spec = ImageSpec(1024, 1024, 4, text="post-processing", seed=5)
    blobs = [render_png(spec, i) for i in range(4)]
    out_dir.mkdir(parents=True, exist_ok=True)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        render_result(blobs, out_dir, f"grid-{i}")
        times.append(time.perf_counter() - t0)
    shutil.rmtree(out_dir, ignore_errors=True)
    return median(times)


async def run(workdir: Path, *, jobs: int = 5) -> dict[str, Any]:
    grid = await trio.to_thread.run_sync(_grid_seconds, workdir / "grid")
    ids = []
    async with (
        simulator(workdir, step_seconds=0.01, model_load_seconds=0.05) as sim,
        service(workdir, sim) as svc,
    ):
        async with httpx.AsyncClient(base_url=svc.url, timeout=120) as client:
            for i in range(jobs):
                body = {"message": f"grid {i} -m tiny -w 1024 -h 1024 -c 4", "nick": "grid"}
                response = await client.post("/request", json=body)
                response.raise_for_status()
                job_id = response.json()["job_id"]
                response = await client.get(f"/wait/{job_id}", params={"timeout": 60})
                assert response.json()["status"] == "completed", response.text
                ids.append(job_id)
        finished = svc.finished_times()
        executions = {e["prompt_id"]: e for e in (await sim.dump())["executions"]}
    overheads = [finished[i] - executions[i]["finished_wall"] for i in ids]
    return {
        "jobs": jobs,
        "grid_2x2_1024_ms": 1000 * grid,
        "overhead_median_ms": 1000 * median(overheads),
        "overhead_max_ms": 1000 * max(overheads),
    }
