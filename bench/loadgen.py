"""The load-generating process (httpx on trio, spread over several clients: httpx issue #3215).

    python bench/loadgen.py frontend URL --clients 64 --pools 8 --duration 5 --out FILE
    python bench/loadgen.py waiters URL --ids FILE --count 1250 --pools 10 --out FILE

``frontend``: ``--clients`` tasks loop ``POST /request`` then ``GET /job/{id}`` until the
duration is up; latencies of each, in seconds. ``waiters``: ``--count`` ``GET /wait/{id}``
long-polls, waiter ``i`` on job ``ids[(offset + i) % len(ids)]``; each answer's epoch time.

Both print ``ready`` once started and write a JSON report (with this process's own CPU time,
to show it was not the bottleneck) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import trio
from common import own_cpu_seconds, raise_fd_limit


def _pool(url: str, size: int) -> list[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(None)
    return [httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) for _ in range(size)]


async def _close(pool: list[httpx.AsyncClient]) -> None:
    with trio.CancelScope(shield=True):
        for client in pool:
            await client.aclose()


async def frontend(args: argparse.Namespace) -> dict[str, Any]:
    pool = _pool(args.url, args.pools)
    posts: list[float] = []
    gets: list[float] = []
    statuses: Counter[str] = Counter()
    rng = random.Random(args.seed)
    try:

        async def worker(index: int, deadline: float) -> None:
            client = pool[index % len(pool)]
            number = 0
            while time.monotonic() < deadline:
                number += 1
                body = {
                    "message": f"front end {index}.{number} -m tiny -c 1",
                    "nick": f"nick{rng.randrange(args.nicks)}",
                }
                t0 = time.perf_counter()
                response = await client.post("/request", json=body)
                posts.append(time.perf_counter() - t0)
                statuses[f"POST {response.status_code}"] += 1
                if response.status_code != 200:
                    continue
                job_id = response.json()["job_id"]
                t0 = time.perf_counter()
                response = await client.get(f"/job/{job_id}")
                gets.append(time.perf_counter() - t0)
                statuses[f"GET {response.status_code}"] += 1

        # Warm up every connection first (not measured).
        async with trio.open_nursery() as nursery:
            for index in range(args.clients):
                nursery.start_soon(pool[index % len(pool)].get, "/health")
        print("ready", flush=True)
        cpu0, wall0 = own_cpu_seconds(), time.monotonic()
        async with trio.open_nursery() as nursery:
            deadline = time.monotonic() + args.duration
            for index in range(args.clients):
                nursery.start_soon(worker, index, deadline)
        wall = time.monotonic() - wall0
        cpu = own_cpu_seconds() - cpu0
    finally:
        await _close(pool)
    return {
        "posts": posts,
        "gets": gets,
        "statuses": dict(statuses),
        "wall": wall,
        "cpu": cpu,
    }


async def waiters(args: argparse.Namespace) -> dict[str, Any]:
    ids: list[str] = args.id_list
    pool = _pool(args.url, args.pools)
    answers: list[tuple[str, float]] = []
    statuses: Counter[int] = Counter()
    cpu0 = own_cpu_seconds()
    try:

        async def wait(client: httpx.AsyncClient, job_id: str) -> None:
            while True:
                response = await client.get(f"/wait/{job_id}", params={"timeout": args.timeout})
                statuses[response.status_code] += 1
                if response.status_code != 202:
                    answers.append((job_id, time.time()))
                    return

        async with trio.open_nursery() as nursery:
            for i in range(args.count):
                job_id = ids[(args.offset + i) % len(ids)]
                nursery.start_soon(wait, pool[i % len(pool)], job_id)
                if i % 100 == 99:
                    await trio.sleep(0.01)  # under the listen backlog: no SYN retries
            print("ready", flush=True)
    finally:
        await _close(pool)
    return {"answers": answers, "statuses": dict(statuses), "cpu": own_cpu_seconds() - cpu0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["frontend", "waiters"])
    parser.add_argument("url")
    parser.add_argument("--out", required=True)
    parser.add_argument("--pools", type=int, default=8)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--nicks", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--ids")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    raise_fd_limit()
    if args.ids:
        args.id_list = json.loads(Path(args.ids).read_text())
    report = trio.run(frontend if args.mode == "frontend" else waiters, args)
    Path(args.out).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
