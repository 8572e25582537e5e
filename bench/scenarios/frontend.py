"""Scenario 3: the front end under 64 concurrent clients.

A separate load-generating process (`loadgen.py frontend`) runs 64 tasks over 8 httpx clients,
each looping ``POST /request`` then ``GET /job/{id}`` for a fixed time, with 1,000 nicks and the
queue caps raised. The queue grows while the simulator works through it, so ``GET /job`` of a
queued job also shows what computing its queue position costs on a long queue.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import trio
from common import BENCH, PYTHON, child, percentile, service, simulator


async def run(
    workdir: Path,
    *,
    clients: int = 64,
    pools: int = 8,
    duration: float = 5.0,
    profile: Path | None = None,
) -> dict[str, Any]:
    out = workdir / "frontend.json"
    async with (
        simulator(workdir, step_seconds=0.015, model_load_seconds=0.05) as sim,
        service(workdir, sim, profile=profile) as svc,
    ):
        command = [
            PYTHON,
            str(BENCH / "loadgen.py"),
            "frontend",
            svc.url,
            f"--clients={clients}",
            f"--pools={pools}",
            f"--duration={duration}",
            f"--out={out}",
        ]
        async with child(command, log=workdir / "loadgen.log", cwd=workdir) as (process, lines):
            with trio.fail_after(30):
                await lines.readline()
            cpu0 = svc.cpu_seconds()
            with trio.fail_after(duration + 120):
                await process.wait()
            service_cpu = svc.cpu_seconds() - cpu0
        memory = svc.memory()
        async with httpx.AsyncClient(base_url=svc.url) as client:
            queued = (await client.get("/health")).json()["queued"]
    report = json.loads(out.read_text())
    posts, gets = report["posts"], report["gets"]
    wall = report["wall"]
    return {
        "clients": clients,
        "duration": wall,
        "requests_per_second": (len(posts) + len(gets)) / wall,
        "post_per_second": len(posts) / wall,
        "post_p50_ms": 1000 * percentile(posts, 50),
        "post_p99_ms": 1000 * percentile(posts, 99),
        "get_p50_ms": 1000 * percentile(gets, 50),
        "get_p99_ms": 1000 * percentile(gets, 99),
        "statuses": report["statuses"],
        "queued_at_end": queued,
        "service_cpu_share": service_cpu / wall,
        "loadgen_cpu_share": report["cpu"] / wall,
        "service_rss_mib": memory["rss"] / 2**20,
    }
