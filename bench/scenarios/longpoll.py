"""Scenario ``longpoll``: 10,000 parked ``GET /wait`` long-polls, and what they cost the jobs.

A fresh service for each round (memory freed by an earlier round would be reused, hiding what
waiters cost), against a simulator that is held between runs. Each round runs a warm-up batch
of 10 jobs, then the same batch of jobs (100 jobs of ~70 ms prompts, 50 users) twice, each
submitted with the simulator held:

- without waiters: let the simulator go; makespan from then to the last job's ``finished``
  time in the store;
- with waiters: first park 10,000 long-polls over the batch (100 per job) from two
  `rawload.py waiters` processes, connecting as fast as they can (up to 1,000 connects in
  flight each). The clock of the connect time runs until the service holds them all (its open
  file count) -- before the jobs' clock starts. RSS is read once the service is quiet, then
  the simulator goes; makespan as above, and each waiter's answer time minus its job's
  ``finished`` time.

Growth (one parameter: the number of waiters): a round with 1,000 waiters on the same batch.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import trio
from common import (
    ServiceProcess,
    SimProcess,
    figure,
    http_client,
    percentile,
    ratio,
    rawload,
    service,
    simulator,
    wait_quiet,
)

STEP = 0.0155  # 4 steps and the image: ~70 ms prompts, GPU-bound


async def _submit(svc: ServiceProcess, jobs: int, tag: str) -> list[str]:
    ids = []
    async with http_client(svc.url) as client:
        for i in range(jobs):
            body = {"message": f"long poll {tag} {i} -m tiny -c 1", "nick": f"poller{i % 50}"}
            response = await client.post("/request", json=body)
            response.raise_for_status()
            ids.append(response.json()["job_id"])
    await wait_quiet(svc.pid)
    return ids


async def _wait_finished(svc: ServiceProcess, ids: list[str]) -> dict[str, float]:
    """Wait (by long-polling each job) until every job has finished; their finished times."""
    async with http_client(svc.url, timeout=600) as client:

        async def wait(job_id: str) -> None:
            while (await client.get(f"/wait/{job_id}", params={"timeout": 300})).status_code == 202:
                pass

        async with trio.open_nursery() as nursery:
            for job_id in ids:
                nursery.start_soon(wait, job_id)
    finished = svc.finished_times()
    return {i: finished[i] for i in ids}


async def _without(svc: ServiceProcess, sim: SimProcess, jobs: int, tag: str) -> dict[str, Any]:
    ids = await _submit(svc, jobs, tag)
    started = time.time()
    await sim.go()
    finished = await _wait_finished(svc, ids)
    await sim.hold()
    return {"makespan": max(finished.values()) - started}


async def _with(
    workdir: Path,
    svc: ServiceProcess,
    sim: SimProcess,
    *,
    jobs: int,
    waiters: int,
    tag: str,
    processes: int = 2,
) -> dict[str, Any]:
    ids = await _submit(svc, jobs, tag)
    ids_file = workdir / f"ids-{tag}.json"
    ids_file.write_text(json.dumps(ids))
    rss_before = svc.memory()["rss"]
    fds_before = svc.fd_count()
    share = waiters // processes
    async with contextlib.AsyncExitStack() as stack:
        connect_started = time.monotonic()
        generators = []
        for k in range(processes):
            options = [
                f"--ids={ids_file}",
                f"--count={share}",
                f"--offset={k * share}",
                "--timeout=300",
            ]
            generators.append(
                await stack.enter_async_context(
                    rawload(workdir, "waiters", svc.url, *options, name=f"waiters-{tag}-{k}")
                )
            )
        with trio.fail_after(300):
            while True:  # polling another process: no event to wait on
                if svc.fd_count() >= fds_before + share * processes:
                    break
                await trio.sleep(0.02)
        connect_seconds = time.monotonic() - connect_started
        await wait_quiet(svc.pid)
        rss_holding = svc.memory()["rss"]
        cpu0 = svc.cpu_seconds()
        started = time.time()
        await sim.go()
        finished = await _wait_finished(svc, ids)
        reports = [await gen.result() for gen in generators]
        release_cpu = svc.cpu_seconds() - cpu0
        await sim.hold()
    latencies = [
        answered - finished[job_id] for report in reports for job_id, answered in report["answers"]
    ]
    statuses: dict[str, int] = {}
    for report in reports:
        for status, count in report["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    held = share * processes
    return {
        "waiters": held,
        "makespan": max(finished.values()) - started,
        "connect_seconds": connect_seconds,
        "kib_per_waiter": (rss_holding - rss_before) / held / 1024,
        "rss_before_mib": rss_before / 2**20,
        "rss_holding_mib": rss_holding / 2**20,
        "answer_p50_ms": 1000 * percentile(latencies, 50),
        "answer_p99_ms": 1000 * percentile(latencies, 99),
        "answered": len(latencies),
        "statuses": statuses,
        "retries": sum(r.get("retries", 0) for r in reports),
        "service_cpu_release_s": release_cpu,
        "loadgen_cpu_s": sum(r["cpu"] for r in reports),
    }


async def run(workdir: Path, *, quick: bool = False, profile: Path | None = None) -> dict[str, Any]:
    rounds = 1 if quick else 3
    waiters = 1000 if quick else 10_000
    jobs = 30 if quick else 100
    small = 250 if quick else 1000
    plain: list[dict[str, Any]] = []
    parked: list[dict[str, Any]] = []
    async with simulator(workdir, step_seconds=STEP, model_load_seconds=0.05, held=True) as sim:

        async def one_round(count: int, tag: str) -> None:
            # A fresh service each time: memory freed by an earlier round would be reused.
            async with service(
                workdir,
                sim,
                profile=profile if tag == "0" else None,
                FATEGEN_MAX_CONNECTIONS=str(count + 2000),
            ) as svc:
                await _without(svc, sim, 10, f"warm-up-{tag}")  # model loaded, paths warm
                plain.append(await _without(svc, sim, jobs, f"plain-{tag}"))
                parked.append(
                    await _with(workdir, svc, sim, jobs=jobs, waiters=count, tag=f"parked-{tag}")
                )

        await one_round(small, "few")
        few = parked.pop()
        plain.pop()
        for r in range(rounds):
            await one_round(waiters, str(r))
    ratios = [p["makespan"] / q["makespan"] for p, q in zip(parked, plain, strict=True)]
    figures = [
        figure(
            "connect_seconds",
            f"{waiters:,} /wait connecting at once: until all are held (s)",
            [p["connect_seconds"] for p in parked],
            target=("<", 5.0),
            digits=1,
            noisy=True,
            note=f"{small:,} waiters: {few['connect_seconds']:.1f} s",
        ),
        figure(
            "kib_per_waiter",
            f"service RSS per parked waiter (KiB), {waiters:,} held",
            [p["kib_per_waiter"] for p in parked],
            target=("<=", 24.0),
            digits=1,
        ),
        figure(
            "makespan_with_over_without",
            f"makespan of {jobs} jobs (~70 ms prompts), {waiters:,} waiters on them / none",
            ratios,
            target=("<=", 1.2),
            digits=3,
            noisy=True,
            note="without: " + ", ".join(f"{p['makespan']:.2f}" for p in plain) + " s",
        ),
        figure(
            "answer_p50_ms",
            "job finished -> its waiter answered, p50 (ms)",
            [p["answer_p50_ms"] for p in parked],
            digits=1,
            noisy=True,
            note="p99: " + ", ".join(f"{p['answer_p99_ms']:.0f}" for p in parked) + " ms",
        ),
        figure(
            "kib_per_waiter_growth",
            f"growth: RSS per waiter at {waiters:,} / at {small:,} waiters",
            [ratio(p["kib_per_waiter"], few["kib_per_waiter"]) for p in parked],
            target=("<=", 1.2),
            noisy=True,
            note=f"at {small:,}: {few['kib_per_waiter']:.1f} KiB",
        ),
        figure(
            "answer_p50_growth",
            f"growth: answer p50 at {waiters:,} / at {small:,} waiters",
            [ratio(p["answer_p50_ms"], few["answer_p50_ms"]) for p in parked],
            noisy=True,
            note=f"at {small:,}: {few['answer_p50_ms']:.1f} ms",
        ),
    ]
    return {"figures": figures, "without": plain, "with": parked, "growth_small": few}
