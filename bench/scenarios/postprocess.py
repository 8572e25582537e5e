"""Scenario 5: post-processing. Four 1024x1024 images into one 2x2 WebP grid.

Two figures: the grid itself (`fategen.queue.postprocess.render_result` on four simulator
PNGs, in this process, median of 5), and the service's overhead per job: from the simulator's
execution end to the job being ``completed`` in the store (fetch 4 PNGs, decode, grid, WebP,
write, save), with jobs run one at a time. Headline: that overhead over the grid's own time
(what the service adds around Pillow: fetching, decoding, writing, saving).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import trio
from common import figure, http_client, median, service, simulator

from fategen.queue.postprocess import render_result
from fategen.simulator.graph import ImageSpec
from fategen.simulator.render import render_png


def _grid_seconds(out_dir: Path, repeats: int = 5) -> list[float]:
    spec = ImageSpec(1024, 1024, 4, text="post-processing", seed=5)
    blobs = [render_png(spec, i) for i in range(4)]
    out_dir.mkdir(parents=True, exist_ok=True)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        render_result(blobs, out_dir, f"grid-{i}")
        times.append(time.perf_counter() - t0)
    shutil.rmtree(out_dir, ignore_errors=True)
    return times


async def run(workdir: Path, *, quick: bool = False) -> dict[str, Any]:
    jobs = 3 if quick else 5
    grids = await trio.to_thread.run_sync(_grid_seconds, workdir / "grid")
    grid = median(grids)
    ids = []
    async with (
        simulator(workdir, step_seconds=0.01, model_load_seconds=0.05) as sim,
        service(workdir, sim) as svc,
    ):
        async with http_client(svc.url, timeout=120) as client:
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
    figures = [
        figure(
            "grid_ms",
            "2x2 grid of 1024x1024 -> WebP, in process (ms)",
            [1000 * g for g in grids],
            digits=1,
        ),
        figure(
            "overhead_ms",
            "service overhead per 4x1024x1024 job (ms): simulator end -> job completed",
            [1000 * o for o in overheads],
            digits=1,
            note=f"{jobs} jobs, one at a time",
        ),
        figure(
            "overhead_over_grid",
            "service overhead per job / the grid's own time",
            [o / grid for o in overheads],
            target=("<=", 1.5),
            noisy=True,
        ),
    ]
    return {"figures": figures, "jobs": jobs, "grid_2x2_1024_ms": 1000 * grid}
