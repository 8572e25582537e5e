"""A bounded soak: 20 clients submit and wait against the simulator while faults switch on and off.

    python bench/soak.py            # SOAK_SECONDS (default 120), SOAK_CLIENTS (default 20)

Every submitted job must reach a final state that ``GET /job`` agrees with (``lost`` must be 0).
Prints a small table and writes ``bench/soak-results.json``. `run_soak` is also used by
``tests/test_soak.py`` for a short version.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import trio

from fategen.service import Running, run_service
from fategen.settings import Settings
from fategen.simulator import Simulator, SimulatorKnobs

ROOT = Path(__file__).resolve().parent.parent
FINAL = {"completed", "failed", "cancelled"}


def rss_kib() -> int:
    """This process's resident set size (VmRSS), in KiB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def _toggle_faults(knobs: SimulatorKnobs, rng: random.Random, stop: trio.Event) -> None:
    with trio.move_on_after(float("inf")) as scope:
        while not stop.is_set():
            fault = rng.choice(
                ["none", "drop_ws", "hang", "execution_error", "http_500", "corrupt_image"]
            )
            if fault == "drop_ws":
                knobs.drop_ws_mid_job = 1
            elif fault == "hang":
                knobs.hang = 1
            elif fault == "execution_error":
                knobs.execution_error = 1
            elif fault in ("http_500", "corrupt_image"):
                setattr(knobs, fault, True)
                await trio.sleep(rng.uniform(0.05, 0.3))
                setattr(knobs, fault, False)
            with trio.move_on_after(rng.uniform(0.3, 1.5)):
                await stop.wait()
    del scope
    knobs.http_500 = knobs.corrupt_image = False
    knobs.hang = knobs.drop_ws_mid_job = knobs.execution_error = 0


async def _client(
    index: int,
    url: str,
    stop: trio.Event,
    rng: random.Random,
    results: dict[str, Any],
) -> None:
    nick = f"soak{index:02d}"
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        while not stop.is_set():
            size = rng.choice([256, 320])
            count = rng.choice([1, 1, 2])
            message = f"soak {index} {rng.random():.6f} -m tiny -w {size} -h 256 -c {count}"
            r = await client.post("/request", json={"message": message, "nick": nick})
            if r.status_code != 200:
                results["refused"][str(r.status_code)] += 1
                await trio.sleep(0.1)
                continue
            job_id = r.json()["job_id"]
            results["submitted"].append(job_id)
            while True:
                r = await client.get(f"/wait/{job_id}", params={"timeout": 10})
                if r.status_code == 200:
                    break
            body = r.json()
            results["final"][job_id] = (body["status"], body["error"])


async def run_soak(seconds: float, clients: int = 20, *, seed: int | None = None) -> dict[str, Any]:
    """Run the soak for ``seconds`` and return its figures (see the module docstring)."""
    rng = random.Random(seed)
    knobs = SimulatorKnobs(step_seconds=0.005, model_load_seconds=0.01)
    sim = Simulator(knobs)
    results: dict[str, Any] = {
        "submitted": [],
        "final": {},
        "refused": collections.Counter(),
    }
    rss_start = rss_kib()
    with tempfile.TemporaryDirectory(prefix="fategen-soak-") as tmp:
        async with trio.open_nursery() as outer:
            sim_port = await outer.start(functools.partial(sim.serve, host="127.0.0.1", port=0))
            settings = Settings.from_env(
                {
                    "FATEGEN_HOST": "127.0.0.1",
                    "FATEGEN_PORT": "0",
                    "COMFYUI_PORT": str(sim_port),
                    "FATEGEN_OUTPUT_DIR": str(Path(tmp) / "output"),
                    "FATEGEN_DATA_DIR": str(Path(tmp) / "data"),
                    "FATEGEN_MODEL_CONFIG": str(ROOT / "config" / "modelConfiguration.json"),
                    "FATEGEN_WORKFLOWS_DIR": str(ROOT / "workflows"),
                    "FATEGEN_STALL_TIMEOUT": "1",
                    "FATEGEN_SHUTDOWN_GRACE": "5",
                    "FATEGEN_CONNECT_TIMEOUT": "2",
                    "LOG_LEVEL": "WARNING",
                }
            )
            shutdown = trio.Event()
            async with trio.open_nursery() as inner:
                running: Running = await inner.start(run_service, settings, shutdown)
                rss_ready = rss_kib()
                stop = trio.Event()
                async with trio.open_nursery() as load:
                    load.start_soon(_toggle_faults, knobs, rng, stop)
                    for i in range(clients):
                        load.start_soon(_client, i, running.url, stop, rng, results)
                    await trio.sleep(seconds)
                    stop.set()  # clients finish waiting for their last job, then return
                # Does /job agree with what /wait said, and is every job final?
                lost: list[str] = []
                async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
                    for job_id in results["submitted"]:
                        body = (await client.get(f"/job/{job_id}")).json()
                        final = results["final"].get(job_id)
                        status = body.get("status")
                        if status not in FINAL or final is None or final[0] != status:
                            lost.append(job_id)
                stuck = [j.id for j in running.store.active_jobs()]
                rss_end = rss_kib()
                shutdown.set()
            outer.cancel_scope.cancel()
    statuses = collections.Counter(status for status, _ in results["final"].values())
    reasons = collections.Counter(
        _reason(error) for status, error in results["final"].values() if status == "failed"
    )
    return {
        "seconds": seconds,
        "clients": clients,
        "submitted": len(results["submitted"]),
        "completed": statuses.get("completed", 0),
        "failed": statuses.get("failed", 0),
        "cancelled": statuses.get("cancelled", 0),
        "failed_reasons": dict(reasons.most_common()),
        "refused": dict(results["refused"]),
        "lost": len(lost) + len(stuck),
        "lost_ids": sorted(set(lost) | set(stuck)),
        "executions_on_comfyui": len(sim.executions),
        "rss_kib_start": rss_start,
        "rss_kib_ready": rss_ready,
        "rss_kib_end": rss_end,
    }


def _reason(error: str | None) -> str:
    """A failure's sentence without its job-specific parts (for counting)."""
    if not error:
        return "(no reason given)"
    for marker in ("reported nothing", "answered 500", "cannot be decoded", "failed in node"):
        if marker in error:
            return error.split(";")[0]
    return error[:120]


def print_table(figures: dict[str, Any]) -> None:
    rows = [
        ("duration (s)", figures["seconds"]),
        ("clients", figures["clients"]),
        ("submitted", figures["submitted"]),
        ("completed", figures["completed"]),
        ("failed", figures["failed"]),
        ("cancelled", figures["cancelled"]),
        ("lost", figures["lost"]),
        ("RSS at start (MiB)", f"{figures['rss_kib_ready'] / 1024:.1f}"),
        ("RSS at end (MiB)", f"{figures['rss_kib_end'] / 1024:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10}")
    for reason, count in figures["failed_reasons"].items():
        print(f"  failed x{count}: {reason}")
    if figures["refused"]:
        print(f"  refused submissions: {figures['refused']}")


def main() -> int:
    seconds = float(os.environ.get("SOAK_SECONDS", "120"))
    clients = int(os.environ.get("SOAK_CLIENTS", "20"))
    figures = trio.run(run_soak, seconds, clients)
    print_table(figures)
    out = Path(__file__).resolve().parent / "soak-results.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written to {out}")
    return 1 if figures["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
