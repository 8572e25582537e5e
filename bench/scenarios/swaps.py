"""Scenario 2: model swaps. Six users, three models, every swap costs ``model_load_seconds``.

The same jobs, submitted in the same order, run three ways against one simulator (reset in
between): FIFO (posted straight to the simulator in submission order), fategen with fair turns
only (``max_passes=0``: no model affinity), and fategen as shipped (fair turns + affinity).
For each: swaps, makespan, and the worst extra wait: how much later than under FIFO a job (and a
user's last job) finished, counted from the first submission, as the simulator recorded it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import workload
from common import service, simulator

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


async def run(
    workdir: Path, *, step_seconds: float = 0.015, model_load_seconds: float = 0.3
) -> dict[str, Any]:
    jobs = lines()
    nicks = [line.nick for line in jobs]
    graphs = workload.workflows(jobs)
    results: dict[str, Any] = {}
    async with simulator(
        workdir, step_seconds=step_seconds, model_load_seconds=model_load_seconds
    ) as sim:
        await sim.reset()
        direct = await workload.run_direct(sim.url, graphs)
        results["fifo"] = _outcome(
            direct["ids"], nicks, direct["start"], max(direct["done"].values()), await sim.dump()
        )
        for name, max_passes in (("fair", 0), ("fair_affinity", None)):
            await sim.reset()
            async with service(workdir, sim, max_passes=max_passes) as svc:
                via = await workload.run_fategen(svc.url, jobs)
                finished = svc.finished_times()
            end = max(finished[i] for i in via["ids"])
            results[name] = _outcome(via["ids"], nicks, via["start"], end, await sim.dump())
    summary: dict[str, Any] = {
        "jobs": len(jobs),
        "users": len(set(nicks)),
        "model_load_seconds": model_load_seconds,
    }
    for name, outcome in results.items():
        summary[name] = {"swaps": outcome["swaps"], "makespan": outcome["makespan"]}
        if name != "fifo":
            summary[name].update(_extra_wait(outcome, results["fifo"]))
    return summary
