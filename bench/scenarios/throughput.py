"""Scenario ``throughput``: does fategen keep the GPU busy, and what does each job cost it?

The same one-image 256x256 jobs through fategen and straight to the simulator
(`workload.run_direct`: one websocket, every prompt posted in a tight loop, images fetched as
each prompt ends), in alternating runs against one simulator process (reset in between).
Makespan: first submit to last result ready. Three cases, one parameter changed at a time:

- overhead-bound: 200 jobs of ~8 ms prompts (steps of 0 s: only the simulator's own work on
  the image), shorter than the service's CPU per job, so the service's own cost shows;
- GPU-bound: the same 200 jobs, ~70 ms prompts (4 steps of 15.5 ms), like a slow GPU;
- growth: 50 jobs of ~8 ms prompts, next to the 200 (only the number of jobs changes).

Service CPU per job is the service process's CPU time (/proc) over the fategen run, divided
by the jobs. Gaps are the simulator's idle time between one prompt's end and the next start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
import workload
from common import figure, median, service, simulator

OVERHEAD_STEP = 0.0  # the simulator's own work on a 256x256 image: ~8 ms
GPU_STEP = 0.0155  # 4 steps and the image: ~70 ms


async def measure(
    workdir: Path, *, jobs: int, repeats: int, step_seconds: float, nicks: int = 20
) -> dict[str, Any]:
    """``repeats`` alternating runs, direct then fategen; every run's figures."""
    lines = workload.mixed_lines(jobs, nicks=nicks, counts=(1, 1))
    graphs = workload.workflows(lines)
    runs: list[dict[str, Any]] = []
    async with simulator(workdir, step_seconds=step_seconds, model_load_seconds=0.05) as sim:
        for _ in range(repeats):
            await sim.reset()
            direct = await workload.run_direct(sim.url, graphs)
            direct_sim = workload.sim_span_and_gaps(
                (await sim.dump())["executions"], direct["start"]
            )
            await sim.reset()
            async with service(workdir, sim) as svc:
                cpu_before = svc.cpu_seconds()
                via = await workload.run_fategen(svc.url, lines)
                cpu = svc.cpu_seconds() - cpu_before
                memory = svc.memory()
                finished = svc.finished_times()
            fategen_sim = workload.sim_span_and_gaps((await sim.dump())["executions"], via["start"])
            direct_end = max(direct["done"].values())
            fategen_end = max(finished[i] for i in via["ids"])
            direct_makespan = direct_end - direct["start"]
            fategen_makespan = fategen_end - via["start"]
            runs.append(
                {
                    "direct_makespan": direct_makespan,
                    "fategen_makespan": fategen_makespan,
                    "ratio": fategen_makespan / direct_makespan,
                    "sim_span_ratio": fategen_sim["span"] / direct_sim["span"],
                    "direct_execution_ms": direct_sim["mean_execution_ms"],
                    "fategen_execution_ms": fategen_sim["mean_execution_ms"],
                    "gap_ms_median": median(fategen_sim["gaps_ms"]),
                    "gap_ms_max": max(fategen_sim["gaps_ms"], default=float("nan")),
                    "direct_gap_ms_median": median(direct_sim["gaps_ms"]),
                    "lead_ms": fategen_sim["lead_ms"],
                    "tail_ms": 1000 * (fategen_end - fategen_sim["last_end"]),
                    "cpu_per_job_ms": 1000 * cpu / jobs,
                    "rss_peak_mib": memory["hwm"] / 2**20,
                }
            )
            await trio.sleep(0.2)
    return {"jobs": jobs, "step_seconds": step_seconds, "runs": runs}


def _column(case: dict[str, Any], key: str) -> list[float]:
    return [r[key] for r in case["runs"]]


async def run(workdir: Path, *, quick: bool = False) -> dict[str, Any]:
    repeats = 1 if quick else 3
    jobs = 60 if quick else 200
    small = 20 if quick else 50
    overhead = await measure(workdir, jobs=jobs, repeats=repeats, step_seconds=OVERHEAD_STEP)
    gpu = await measure(workdir, jobs=jobs, repeats=repeats, step_seconds=GPU_STEP)
    growth = await measure(workdir, jobs=small, repeats=repeats, step_seconds=OVERHEAD_STEP)
    prompt_fast = median(_column(overhead, "direct_execution_ms"))
    prompt_slow = median(_column(gpu, "direct_execution_ms"))
    figures = [
        figure(
            "makespan_ratio_overhead",
            f"makespan fategen / direct, {jobs} jobs of {prompt_fast:.0f} ms prompts "
            "(overhead-bound)",
            _column(overhead, "ratio"),
            target=("<=", 1.25),
            digits=3,
            noisy=True,
            note="the service and the simulator share 2 cores",
        ),
        figure(
            "makespan_ratio_gpu",
            f"makespan fategen / direct, {jobs} jobs of {prompt_slow:.0f} ms prompts (GPU-bound)",
            _column(gpu, "ratio"),
            target=("<=", 1.05),
            digits=3,
        ),
        figure(
            "cpu_per_job_ms",
            "service CPU per one-image 256x256 job (ms), overhead-bound run",
            _column(overhead, "cpu_per_job_ms"),
            target=("<=", 6.0),
            digits=1,
            note="/proc of the service process over the run, divided by the jobs",
        ),
        figure(
            "gap_ms_median_overhead",
            "simulator idle between prompts, median (ms), overhead-bound",
            _column(overhead, "gap_ms_median"),
            target=("<", 5.0),
            note="direct: "
            + ", ".join(f"{v:.2f}" for v in _column(overhead, "direct_gap_ms_median")),
        ),
        figure(
            "gap_ms_max_overhead",
            "simulator idle between prompts, max (ms), overhead-bound",
            _column(overhead, "gap_ms_max"),
            noisy=True,
        ),
        figure(
            "makespan_ratio_growth",
            f"growth: makespan ratio at {jobs} / at {small} jobs, "
            f"same {prompt_fast:.0f} ms prompts",
            [
                big / little
                for big, little in zip(
                    _column(overhead, "ratio"), _column(growth, "ratio"), strict=True
                )
            ],
            target=("<=", 1.1),
            digits=3,
            noisy=True,
            note=f"ratio at {small} jobs: "
            + ", ".join(f"{v:.3f}" for v in _column(growth, "ratio")),
        ),
        figure(
            "cpu_per_job_growth",
            f"growth: CPU per job at {jobs} / at {small} jobs",
            [
                big / little
                for big, little in zip(
                    _column(overhead, "cpu_per_job_ms"),
                    _column(growth, "cpu_per_job_ms"),
                    strict=True,
                )
            ],
            target=("<=", 1.2),
            noisy=True,
            note=f"CPU per job at {small} jobs (ms): "
            + ", ".join(f"{v:.1f}" for v in _column(growth, "cpu_per_job_ms")),
        ),
    ]
    return {
        "figures": figures,
        "overhead_bound": overhead,
        "gpu_bound": gpu,
        "growth_small": growth,
        "prompt_ms": {"overhead_bound": prompt_fast, "gpu_bound": prompt_slow},
    }
