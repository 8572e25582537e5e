"""Scenario ``frontend``: what a request costs at fixed queue sizes, against bare endpoints.

Every service here runs against one held simulator (it takes prompts, runs none), so its queue
stays where it was put: each starts on a job database made beforehand (`prefill`) with the
store's own code, and loads it as after a restart. The shapes (jobs, users):

- queued 1k / 20k / 100k at 10 jobs per user (100 / 2,000 / 10,000 users: a community whose
  users each queue a few, the per-user cap's default), and 1k / 100k over 10 users (few
  users with long queues of their own);
- fresh (no job at all) and 100k retained: 100,000 completed jobs of the last hours, none
  queued.

Latency (`rawload.py pairs`: one client, one keep-alive connection, ``POST /request``, then
``DELETE`` of the job made before (so the queue keeps its size), then ``GET /job/{id}`` of the
job just made: the first read after a change it did not cause), in rounds: each
round visits every service in turn, so the ratios (20k / 1k, ...) compare figures taken
seconds apart, and the rounds give the spread. Throughput (`rawload.py closed`: 64 keep-alive
connections looping ``POST /request``, in its own process) of fategen (1k queued, growing by
what the rounds add) against a bare quart-trio endpoint and a bare ASGI endpoint served by the
same `serve_http` (`bare.py`), in alternating rounds. Memory: each service's RSS once
started and quiet, less the fresh service's, per job held.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import attrs
import prefill
import trio
from common import bare, figure, median, percentile, rawload, service, simulator, wait_quiet


@attrs.frozen
class Shape:
    name: str
    jobs: int
    nicks: int
    status: str = "queued"

    @property
    def label(self) -> str:
        if self.jobs == 0:
            return "fresh"
        kind = "retained finished" if self.status == "completed" else "queued"
        return f"{_k(self.jobs)} {kind}, {_k(self.nicks)} users"


def _k(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"{n:,}"


def shapes(quick: bool) -> dict[str, Shape]:
    small, mid, big = (1000, 5000, 20000) if quick else (1000, 20000, 100000)
    return {
        "small": Shape("small", small, small // 10),
        "mid": Shape("mid", mid, mid // 10),
        "big": Shape("big", big, big // 10),
        "small_few": Shape("small_few", small, 10),
        "big_few": Shape("big_few", big, 10),
        "fresh": Shape("fresh", 0, 100),
        "retained": Shape("retained", big, big // 10, status="completed"),
    }


async def _pairs(workdir: Path, url: str, nicks: int, name: str, quick: bool) -> dict[str, Any]:
    options = [
        f"--nicks={nicks}",
        f"--count={30 if quick else 60}",
        f"--min-count={10 if quick else 15}",
        f"--max-seconds={1.5 if quick else 4}",
    ]
    async with rawload(workdir, "pairs", url, *options, name=name) as gen:
        await gen.go()
        report = await gen.result()
    return {
        "post_p50_ms": 1000 * percentile(report["posts"], 50),
        "post_p90_ms": 1000 * percentile(report["posts"], 90),
        "get_p50_ms": 1000 * percentile(report["gets"], 50),
        "get_p90_ms": 1000 * percentile(report["gets"], 90),
        "requests": len(report["posts"]),
        "statuses": report["statuses"],
    }


async def _closed(
    workdir: Path, target: Any, name: str, duration: float, connections: int = 64
) -> dict[str, Any]:
    options = [f"--connections={connections}", f"--duration={duration}", "--nicks=100"]
    async with rawload(workdir, "closed", target.url, *options, name=name) as gen:
        cpu0 = target.cpu_seconds()
        await gen.go()
        report = await gen.result()
        cpu = target.cpu_seconds() - cpu0
    done = len(report["latencies"])
    return {
        "requests_per_second": done / report["wall"],
        "ok": report["statuses"].get("200", 0),
        "statuses": report["statuses"],
        "p50_ms": 1000 * percentile(report["latencies"], 50),
        "p99_ms": 1000 * percentile(report["latencies"], 99),
        "cpu_per_request_ms": 1000 * cpu / max(done, 1),
        "server_cpu_share": cpu / report["wall"],
        "loadgen_cpu_share": report["cpu"] / report["wall"],
        "retries": report.get("retries", 0),
    }


async def run(workdir: Path, *, quick: bool = False, profile: Path | None = None) -> dict[str, Any]:
    rounds = 1 if quick else 3
    duration = 1.5 if quick else 3.0
    by_name = shapes(quick)
    templates = {}
    for shape in by_name.values():
        if shape.jobs:
            templates[shape.name] = await trio.to_thread.run_sync(
                lambda s=shape: prefill.template(
                    workdir, jobs=s.jobs, nicks=s.nicks, status=s.status
                )
            )
    latency: dict[str, list[dict[str, Any]]] = {name: [] for name in by_name}
    throughput: dict[str, list[dict[str, Any]]] = {"fategen": [], "quart": [], "asgi": []}
    rss: dict[str, int] = {}
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(
            simulator(workdir, step_seconds=0.01, model_load_seconds=0.05, held=True)
        )
        services = {}
        for name in by_name:
            services[name] = await stack.enter_async_context(
                service(
                    workdir,
                    sim,
                    database=templates.get(name),
                    ready_timeout=300,
                    profile=profile if name == "big" else None,
                )
            )
        for name, svc in services.items():
            await wait_quiet(svc.pid)
            rss[name] = svc.memory()["rss"]
        for r in range(rounds):
            for name, svc in services.items():
                latency[name].append(
                    await _pairs(workdir, svc.url, by_name[name].nicks, f"pairs-{name}-{r}", quick)
                )
        quart = await stack.enter_async_context(bare(workdir, "quart"))
        asgi = await stack.enter_async_context(bare(workdir, "asgi"))
        targets = {"fategen": services["small"], "quart": quart, "asgi": asgi}
        for r in range(rounds):
            for name, target in targets.items():
                await wait_quiet(target.pid)
                throughput[name].append(
                    await _closed(workdir, target, f"closed-{name}-{r}", duration)
                )
    return _report(by_name, latency, throughput, rss, duration)


def _report(
    by_name: dict[str, Shape],
    latency: dict[str, list[dict[str, Any]]],
    throughput: dict[str, list[dict[str, Any]]],
    rss: dict[str, int],
    duration: float,
) -> dict[str, Any]:
    def p50(name: str, key: str = "post_p50_ms") -> list[float]:
        return [r[key] for r in latency[name]]

    def ratio(a: str, b: str, key: str = "post_p50_ms") -> list[float]:
        return [x / y for x, y in zip(p50(a, key), p50(b, key), strict=True)]

    def label(name: str) -> str:
        return by_name[name].label

    def rps(name: str) -> list[float]:
        return [r["requests_per_second"] for r in throughput[name]]

    small, mid, big = by_name["small"], by_name["mid"], by_name["big"]
    flat = ("<=", 1.5)
    figures = [
        figure(
            "post_p50_small_ms",
            f"POST /request p50 (ms), one client, {label('small')}",
            p50("small"),
            digits=1,
        ),
        figure(
            "post_mid_over_small",
            f"POST p50, {_k(mid.jobs)} / {_k(small.jobs)} queued (10 jobs per user)",
            ratio("mid", "small"),
            target=flat,
            note=f"p50 at {_k(mid.jobs)}: " + ", ".join(f"{v:.1f}" for v in p50("mid")) + " ms",
        ),
        figure(
            "post_big_over_small",
            f"POST p50, {_k(big.jobs)} / {_k(small.jobs)} queued (10 jobs per user)",
            ratio("big", "small"),
            target=flat,
            note=f"p50 at {_k(big.jobs)}: " + ", ".join(f"{v:.1f}" for v in p50("big")) + " ms",
        ),
        figure(
            "post_big_few_over_small_few",
            f"POST p50, {_k(big.jobs)} / {_k(small.jobs)} queued over 10 users",
            ratio("big_few", "small_few"),
            target=flat,
            note=f"p50 at {_k(big.jobs)}: " + ", ".join(f"{v:.1f}" for v in p50("big_few")) + " ms",
        ),
        figure(
            "post_retained_over_fresh",
            f"POST p50, {label('retained')} and none queued / fresh",
            ratio("retained", "fresh"),
            target=flat,
            note="p50 fresh: " + ", ".join(f"{v:.1f}" for v in p50("fresh")) + " ms",
        ),
        figure(
            "get_after_change_mid_ms",
            f"GET /job p50 right after a change (ms), {label('mid')}",
            p50("mid", "get_p50_ms"),
            target=("<", 2.0),
            noisy=True,
            note=f"at {_k(big.jobs)}: "
            + ", ".join(f"{v:.1f}" for v in p50("big", "get_p50_ms"))
            + " ms",
        ),
        figure(
            "post_rps_over_quart",
            "POST req/s at 64 connections, fategen / bare quart-trio endpoint",
            [f / q for f, q in zip(rps("fategen"), rps("quart"), strict=True)],
            target=(">=", 0.5),
            digits=3,
            noisy=True,
            note=f"fategen with {label('small')} at the start, growing by what it accepts",
        ),
        figure(
            "quart_rps_over_asgi",
            "bare quart-trio / bare ASGI endpoint req/s (what the framework costs)",
            [q / a for q, a in zip(rps("quart"), rps("asgi"), strict=True)],
            digits=3,
            noisy=True,
        ),
        figure(
            "post_rps",
            "fategen POST req/s at 64 connections",
            rps("fategen"),
            digits=0,
            noisy=True,
            note="bare quart / ASGI: "
            + f"{median(rps('quart')):,.0f} / {median(rps('asgi')):,.0f} req/s, "
            + f"{duration:g} s per round",
        ),
        figure(
            "post_cpu_ms",
            "service CPU per POST (ms) at 64 connections",
            [r["cpu_per_request_ms"] for r in throughput["fategen"]],
            digits=2,
            note="bare quart: "
            + f"{median([r['cpu_per_request_ms'] for r in throughput['quart']]):.2f} ms",
        ),
        figure(
            "kib_per_queued_job",
            f"service RSS per queued job (KiB), {label('mid')}, less fresh",
            [(rss["mid"] - rss["fresh"]) / mid.jobs / 1024],
            target=("<=", 1.0),
            note=f"{label('big')}: {(rss['big'] - rss['fresh']) / big.jobs / 1024:.2f} KiB",
        ),
        figure(
            "kib_per_retained_job",
            f"service RSS per retained finished job (KiB), {label('retained')}, less fresh",
            [(rss["retained"] - rss["fresh"]) / by_name["retained"].jobs / 1024],
            target=("<=", 0.25),
            note="bounded: recent finished jobs in memory, the rest read from SQLite",
        ),
    ]
    return {
        "figures": figures,
        "shapes": {name: attrs.asdict(shape) for name, shape in by_name.items()},
        "latency": latency,
        "throughput": throughput,
        "rss_mib": {name: value / 2**20 for name, value in rss.items()},
    }
