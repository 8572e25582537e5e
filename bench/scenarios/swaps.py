"""Scenario ``swaps``: six users, three models, every swap costs about one prompt.

The same jobs, submitted in the same order, run three ways against one simulator (reset in
between): FIFO (posted straight to the simulator in submission order), fategen with fair turns
only (``max_passes=0``: no model affinity), and fategen as shipped (fair turns + affinity).
For each: swaps, makespan, and the worst extra wait: how much later than under FIFO a job (and a
user's last job) finished, counted from the first submission, as the simulator recorded it,
in seconds and in prompt-times (the median time of a prompt that did not swap).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import workload
from common import SimProcess, figure, median, service, simulator

MODELS = ("anime", "paint", "lumina")


def lines(n: int = 36, users: int = 6, seed: int = 2) -> list[workload.Line]:
    """Each user mostly (70%) asks for their favourite model; submissions interleave."""
    rng = random.Random(seed)
    result = []
    for i in range(n):
        user = rng.randrange(users)
        model = MODELS[user % 3] if rng.random() < 0.7 else rng.choice(MODELS)
        count = rng.randint(1, 4)
        message = f"swap job {i} -m {model} -w 256 -h 256 -c {count} -s {rng.randrange(2**32)}"
        result.append(workload.Line(f"user{user}", message, model))
    return result


def _outcome(
    ids: list[str], nicks: list[str], start: float, end: float, sim: dict[str, Any]
) -> dict[str, Any]:
    finished = {e["prompt_id"]: e["finished_wall"] - start for e in sim["executions"]}
    return {
        "swaps": sim["model_swaps"],
        "makespan": end - start,
        "done": [finished[i] for i in ids],
        "nicks": nicks,
    }


def _extra_wait(variant: dict[str, Any], fifo: dict[str, Any]) -> dict[str, float]:
    per_job = [v - f for v, f in zip(variant["done"], fifo["done"], strict=True)]
    last: dict[str, tuple[float, float]] = {}
    for nick, v, f in zip(variant["nicks"], variant["done"], fifo["done"], strict=True):
        old_v, old_f = last.get(nick, (0.0, 0.0))
        last[nick] = (max(old_v, v), max(old_f, f))
    per_user = [v - f for v, f in last.values()]
    return {"worst_job_extra_s": max(per_job), "worst_user_extra_s": max(per_user)}


def _prompt_seconds(executions: list[dict[str, Any]]) -> float:
    """The median time of a prompt that did not swap checkpoints."""
    runs = sorted(executions, key=lambda e: e["started_monotonic"])
    plain = [
        b["finished_monotonic"] - b["started_monotonic"]
        for a, b in itertools.pairwise(runs)
        if a["checkpoint"] == b["checkpoint"]
    ]
    return median(plain)


def _extra_vs(variant: dict[str, Any], base: dict[str, Any]) -> float:
    return max(v - f for v, f in zip(variant["done"], base["done"], strict=True))


async def repeat_once(
    workdir: Path, sim: SimProcess, jobs: list[workload.Line], graphs: list[dict[str, Any]]
) -> dict[str, Any]:
    nicks = [line.nick for line in jobs]
    results: dict[str, Any] = {}
    await sim.reset()
    direct = await workload.run_direct(sim.url, graphs)
    dump = await sim.dump()
    prompt = _prompt_seconds(dump["executions"])
    results["fifo"] = _outcome(
        direct["ids"], nicks, direct["start"], max(direct["done"].values()), dump
    )
    for name, max_passes in (("fair", 0), ("fair_affinity", None)):
        await sim.reset()
        async with service(workdir, sim, max_passes=max_passes) as svc:
            via = await workload.run_fategen(svc.url, jobs)
            finished = svc.finished_times()
        end = max(finished[i] for i in via["ids"])
        results[name] = _outcome(via["ids"], nicks, via["start"], end, await sim.dump())
    summary: dict[str, Any] = {"prompt_seconds": prompt}
    for name, outcome in results.items():
        summary[name] = {"swaps": outcome["swaps"], "makespan": outcome["makespan"]}
        if name != "fifo":
            summary[name].update(_extra_wait(outcome, results["fifo"]))
    summary["fair_affinity"]["worst_job_extra_vs_fair_s"] = _extra_vs(
        results["fair_affinity"], results["fair"]
    )
    return summary


async def run(
    workdir: Path,
    *,
    quick: bool = False,
    step_seconds: float = 0.015,
    model_load_seconds: float = 0.065,
) -> dict[str, Any]:
    """Swaps cost about one prompt (4 steps of 15 ms and the image: ~65 ms), as an SDXL
    checkpoint reload costs about one generation on a real GPU."""
    repeats = 1 if quick else 3
    jobs = lines()
    graphs = workload.workflows(jobs)
    runs = []
    async with simulator(
        workdir, step_seconds=step_seconds, model_load_seconds=model_load_seconds
    ) as sim:
        for _ in range(repeats):
            runs.append(await repeat_once(workdir, sim, jobs, graphs))
    prompt = median([r["prompt_seconds"] for r in runs])

    def col(name: str, key: str) -> list[float]:
        return [r[name][key] for r in runs]

    def in_prompts(name: str, key: str) -> list[float]:
        return [r[name][key] / r["prompt_seconds"] for r in runs]

    fa, fair, fifo = "fair_affinity", "fair", "fifo"
    figures = [
        figure(
            "swaps_affinity_over_fair",
            "swaps: fair + affinity / fair turns only",
            [a / f for a, f in zip(col(fa, "swaps"), col(fair, "swaps"), strict=True)],
            target=("<=", 0.6),
            note=f"swaps FIFO / fair / fair + affinity: {col(fifo, 'swaps')[0]:.0f} / "
            f"{col(fair, 'swaps')[0]:.0f} / {col(fa, 'swaps')[0]:.0f}",
        ),
        figure(
            "makespan_affinity_over_fifo",
            "makespan fair + affinity / FIFO",
            [a / f for a, f in zip(col(fa, "makespan"), col(fifo, "makespan"), strict=True)],
            target=("<=", 1.0),
            digits=3,
            noisy=True,
            note=f"FIFO makespan {median(col(fifo, 'makespan')):.2f} s; a swap costs "
            f"{model_load_seconds / prompt:.2f} prompt-times ({1000 * prompt:.0f} ms)",
        ),
        figure(
            "makespan_fair_over_fifo",
            "makespan fair turns only / FIFO",
            [a / f for a, f in zip(col(fair, "makespan"), col(fifo, "makespan"), strict=True)],
            digits=3,
        ),
        figure(
            "affinity_extra_vs_fair_prompts",
            "worst job's extra wait, fair + affinity vs fair turns only (prompt-times)",
            [r[fa]["worst_job_extra_vs_fair_s"] / r["prompt_seconds"] for r in runs],
            target=("<=", 5.0),
            digits=1,
            note="a job is passed over at most 3 times; 3 four-image jobs and a swap: ~5",
        ),
        figure(
            "fair_extra_vs_fifo_prompts",
            "worst job's extra wait vs FIFO, fair turns only (prompt-times)",
            in_prompts(fair, "worst_job_extra_s"),
            digits=1,
            note="s: " + ", ".join(f"{v:.2f}" for v in col(fair, "worst_job_extra_s")),
        ),
        figure(
            "affinity_extra_vs_fifo_prompts",
            "worst job's extra wait vs FIFO, fair + affinity (prompt-times)",
            in_prompts(fa, "worst_job_extra_s"),
            digits=1,
            note="s: " + ", ".join(f"{v:.2f}" for v in col(fa, "worst_job_extra_s")),
        ),
        figure(
            "affinity_user_extra_vs_fifo_prompts",
            "worst user's last job, extra wait vs FIFO, fair + affinity (prompt-times)",
            in_prompts(fa, "worst_user_extra_s"),
            digits=1,
            note="negative: earlier than under FIFO",
        ),
    ]
    return {
        "figures": figures,
        "jobs": len(jobs),
        "users": len({line.nick for line in jobs}),
        "model_load_seconds": model_load_seconds,
        "prompt_seconds": prompt,
        "swap_in_prompts": model_load_seconds / prompt,
        "runs": runs,
    }
