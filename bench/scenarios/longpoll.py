"""Scenario 4 (and 6): many long-poll clients held open, then released by their jobs finishing.

The simulator starts held (it takes prompts but runs none). Jobs are queued, then several
`loadgen.py waiters` processes open ``GET /wait/{id}`` requests spread over the jobs. Once the
service holds them all (its open file count says so) and is quiet, its RSS is read and the
simulator is let go. Latency: a waiter's answer time minus its job's ``finished`` time in the
job store (read from the job database afterwards).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from common import BENCH, PYTHON, child, percentile, service, simulator, wait_quiet


async def run(
    workdir: Path,
    *,
    waiters: int = 5000,
    jobs: int = 100,
    processes: int = 4,
    pools: int = 10,
    profile: Path | None = None,
) -> dict[str, Any]:
    ids_file = workdir / f"longpoll-ids-{waiters}.json"
    async with (
        simulator(workdir, step_seconds=0.002, model_load_seconds=0.05, held=True) as sim,
        service(workdir, sim, profile=profile) as svc,
    ):
        async with httpx.AsyncClient(base_url=svc.url) as client:
            ids = []
            for i in range(jobs):
                body = {"message": f"long poll {i} -m tiny -c 1", "nick": f"poller{i % 50}"}
                response = await client.post("/request", json=body)
                response.raise_for_status()
                ids.append(response.json()["job_id"])
        ids_file.write_text(json.dumps(ids))
        await wait_quiet(svc.pid)
        memory_before = svc.memory()["rss"]
        fds_before = svc.fd_count()
        share = waiters // processes
        outs = [workdir / f"waiters-{waiters}-{k}.json" for k in range(processes)]
        async with contextlib.AsyncExitStack() as stack:
            started = time.monotonic()
            generators = []
            for k in range(processes):
                command = [
                    PYTHON,
                    str(BENCH / "loadgen.py"),
                    "waiters",
                    svc.url,
                    f"--ids={ids_file}",
                    f"--count={share}",
                    f"--offset={k * share}",
                    f"--pools={pools}",
                    f"--out={outs[k]}",
                    # Under hypercorn's 30 s read timeout, which also cuts a quiet long-poll.
                    "--timeout=25",
                ]
                generators.append(
                    await stack.enter_async_context(
                        child(command, log=workdir / "loadgen.log", cwd=workdir)
                    )
                )
            with trio.fail_after(150):
                for _, lines in generators:
                    await lines.readline()
                while True:  # polling another process: no event to wait on
                    if svc.fd_count() >= fds_before + share * processes:
                        break
                    await trio.sleep(0.05)
                await wait_quiet(svc.pid)
            connect_seconds = time.monotonic() - started
            memory_holding = svc.memory()["rss"]
            cpu0 = svc.cpu_seconds()
            await sim.go()
            with trio.fail_after(300):
                for process, _ in generators:
                    await process.wait()
            release_cpu = svc.cpu_seconds() - cpu0
        finished = svc.finished_times()
    latencies: list[float] = []
    loadgen_cpu = 0.0
    statuses: dict[str, int] = {}
    for out in outs:
        report = json.loads(out.read_text())
        loadgen_cpu += report["cpu"]
        for status, count in report["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
        latencies += [answered - finished[job_id] for job_id, answered in report["answers"]]
    held = share * processes
    return {
        "waiters": held,
        "jobs": jobs,
        "statuses": statuses,
        "connect_seconds": connect_seconds,
        "rss_before_mib": memory_before / 2**20,
        "rss_holding_mib": memory_holding / 2**20,
        "kib_per_waiter": (memory_holding - memory_before) / held / 1024,
        "answer_p50_ms": 1000 * percentile(latencies, 50),
        "answer_p99_ms": 1000 * percentile(latencies, 99),
        "answer_max_ms": 1000 * max(latencies),
        "service_cpu_release_s": release_cpu,
        "loadgen_cpu_s": loadgen_cpu,
    }
