"""Scenario ``fleet``: four ComfyUI backends of unequal speed, each with its own checkpoints.

The fleet (one ``python -m fategen.simulator`` process each, fresh for every measured run):

    gpu-a     1x speed    anime, paint, lumina
    gpu-b     1x speed    paint, lumina, tiny
    gpu-slow  2x slower   anime, tiny
    gpu-fast  2x faster   anime, lumina, tiny

Speed is the simulator's ``--step-seconds`` (and ``--model-load-seconds``) times the backend's
slowness; every checkpoint is installed on two backends or more, none has all four. A model
load costs one prompt of that backend (4 steps), as an SDXL reload costs about one generation.

Eight users submit 200 one-image jobs at once (each user mostly asks for a favourite model),
and the same jobs run three ways, each on fresh simulators:

- fategen (``python -m fategen serve`` with ``COMFYUI_BACKENDS``): first submit to last job
  ``completed`` in its store;
- round-robin: a lean dispatcher in this process, like ComfyUI-Distributed's, that posts the
  workflow fategen would build (`workload.workflows`) to the next backend in turn that has the
  job's checkpoint, and follows every backend on its WebSocket; first post to last image
  fetched;
- least-queue: the same, to the backend (with the checkpoint) with the fewest prompts
  outstanding (posted, not ended). The jobs arrive at once, so it balances counts; it is
  blind to speed and to the loaded model, as round-robin is.

Computed from the simulators' ``/sim/executions`` (wall clock) and the nominal timings:

- the lower bound: the work (steps x step seconds of each job, at 1x) plus one load per
  backend used (at least one per checkpoint), divided over the fleet's speed; the best over
  the subsets of backends that cover every checkpoint (a fluid bound: not always reachable);
- idle while runnable: the seconds a backend runs nothing while a job it has the checkpoint
  for waits (from its submit, i.e. its POST answered, until it starts anywhere), over the
  makespan: the worst backend (the sum over the fleet, and the part in stretches longer
  than a hand-over between two prompts, in the note);
- the worst extra wait vs plain fair turns: each job's end minus its end in a reference
  schedule (the jobs in user round-robin order, each to the backend that can run it and is
  free first, nominal timings, a swap when the checkpoint changes, no per-prompt overhead),
  in prompt-times of a 1x backend.

A fategen run that fails (a 500 from ``POST /request``, or the service crashing) is counted in
a figure of its own (target: 0) with the error the service logged, and measured again on
fresh simulators and a fresh service (`FATEGEN_ATTEMPTS` times at most), so one bug does not
hide the other figures. Each run's executions (and the service's and simulators' logs) are
kept in the work folder (``--keep``): ``fleet-*/executions.json``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import random
import re
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import trio_websocket
import workload
from common import MODEL_CONFIG, PYTHON, child, figure, http_client, median, ratio, service

from fategen.core.modelconfig import load_model_config

#: Seconds of one sampler step on a 1x backend: a 4-step prompt is 0.3 s, long next to the
#: simulator's own ~15 ms per prompt (PNG, messages), which the lower bound leaves out.
STEP_SECONDS = 0.075
USERS = 8
MODELS = ("anime", "paint", "lumina", "tiny")
_RUNNING = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")


@attrs.frozen
class BackendSetup:
    """One simulated backend: ``slowness`` multiplies its step and load seconds."""

    name: str
    slowness: float
    models: tuple[str, ...]


FLEET = (
    BackendSetup("gpu-a", 1.0, ("anime", "paint", "lumina")),
    BackendSetup("gpu-b", 1.0, ("paint", "lumina", "tiny")),
    BackendSetup("gpu-slow", 2.0, ("anime", "tiny")),
    BackendSetup("gpu-fast", 0.5, ("anime", "lumina", "tiny")),
)


@attrs.frozen
class Job:
    """One chat line and what the bound and the reference schedule need of it."""

    line: workload.Line
    checkpoint: str
    steps: int


@functools.cache
def _models() -> dict[str, tuple[str, int]]:
    """Model -> (checkpoint, steps), from the bench's model configuration (read once)."""
    config = load_model_config(MODEL_CONFIG)
    return {m: (spec.checkpoint_name, spec.steps) for m, spec in config.models.items()}


def make_jobs(n: int, *, seed: int = 14) -> list[Job]:
    """``n`` one-image jobs of ``USERS`` users, interleaved; each user asks for a favourite
    model 70% of the time."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        user = rng.randrange(USERS)
        model = MODELS[user % len(MODELS)] if rng.random() < 0.7 else rng.choice(MODELS)
        message = f"fleet job {i} -m {model} -w 256 -h 256 -c 1 -s {rng.randrange(2**32)}"
        checkpoint, steps = _models()[model]
        jobs.append(Job(workload.Line(f"user{user}", message, model), checkpoint, steps))
    return jobs


def installed(setup: BackendSetup) -> frozenset[str]:
    """The checkpoints the backend has."""
    return frozenset(_models()[m][0] for m in setup.models)


# -- the simulators ---------------------------------------------------------------------------


@attrs.frozen
class FleetSim:
    """A running simulator of the fleet (``port`` also lets `common.service` use it)."""

    setup: BackendSetup
    port: int
    checkpoints: frozenset[str]
    log: Path

    @property
    def name(self) -> str:
        return self.setup.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _command(setup: BackendSetup, load_seconds: float) -> list[str]:
    command = [
        PYTHON,
        "-m",
        "fategen.simulator",
        "--port=0",
        f"--step-seconds={STEP_SECONDS * setup.slowness}",
        f"--model-load-seconds={load_seconds * setup.slowness}",
        f"--name={setup.name}",
    ]
    return command + [f"--checkpoint={c}" for c in sorted(installed(setup))]


async def _port(process: trio.Process, log: Path) -> int:
    """The port the simulator logged it serves on (its log is polled: no event to wait on)."""
    while True:
        if match := _RUNNING.search(await trio.Path(log).read_text()):
            return int(match.group(1))
        if process.returncode is not None:
            raise RuntimeError(f"a simulator exited with status {process.returncode}: see {log}")
        await trio.sleep(0.05)


@contextlib.asynccontextmanager
async def simulators(workdir: Path, load_seconds: float) -> AsyncIterator[list[FleetSim]]:
    """The four simulators, started at once, in a fresh folder; stopped on the way out."""
    run_dir = Path(tempfile.mkdtemp(prefix="fleet-", dir=workdir))
    async with contextlib.AsyncExitStack() as stack:
        started = []
        for setup in FLEET:
            log = run_dir / f"{setup.name}.log"
            command = _command(setup, load_seconds)
            process, _ = await stack.enter_async_context(child(command, log=log, cwd=run_dir))
            started.append((setup, process, log))
        sims = []
        with trio.fail_after(60):
            for setup, process, log in started:
                sims.append(FleetSim(setup, await _port(process, log), installed(setup), log))
        yield sims


async def executions(sims: Sequence[FleetSim]) -> dict[str, list[dict[str, Any]]]:
    """Backend name -> its finished executions, in order (``/sim/executions``)."""
    found = {}
    for sim in sims:
        async with http_client(sim.url) as client:
            response = await client.get("/sim/executions")
            response.raise_for_status()
            found[sim.name] = response.json()["executions"]
    return found


# -- fategen -----------------------------------------------------------------------------------


async def _wait_checked(client: httpx.AsyncClient, backends: int) -> None:
    """Until every backend is up and checked (what it can run is known)."""
    with trio.fail_after(30):
        while True:  # polling another process: no event to wait on
            views = (await client.get("/backends")).json()["backends"]
            if len(views) == backends and all(
                v["state"] == "up" and v["models"] is not None for v in views
            ):
                return
            await trio.sleep(0.05)


async def _snapshots(url: str, start: float, into: list[dict[str, Any]]) -> None:
    """``/backends`` and the queued count every half second (the evidence of what it did)."""
    async with http_client(url) as client:
        while True:
            backends = (await client.get("/backends")).json()["backends"]
            health = (await client.get("/health")).json()
            into.append(
                {
                    "t": round(time.time() - start, 3),
                    "queued": health["queued"],
                    "processing": health["processing"],
                    "backends": {
                        b["name"]: {
                            "loaded": b["loaded_checkpoint"],
                            "running": len(b["running"]),
                            "ahead": len(b["ahead"]),
                            "comfy_queue": b["comfy_queue"],
                            "jobs_done": b["jobs_done"],
                            "model_loads": b["model_loads"],
                        }
                        for b in backends
                    },
                }
            )
            await trio.sleep(0.5)


async def _submit_and_wait(url: str, jobs: Sequence[Job]) -> dict[str, Any]:
    """Each user posts their jobs in a tight loop (all users at once), and every job is
    long-polled to its end. ``accepted``: when each POST was answered (epoch)."""
    ids = [""] * len(jobs)
    accepted = [float("nan")] * len(jobs)
    by_user: dict[str, list[int]] = {}
    for index, job in enumerate(jobs):
        by_user.setdefault(job.line.nick, []).append(index)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    run_key = uuid.uuid4().hex[:12]
    async with contextlib.AsyncExitStack() as stack:
        clients = {
            nick: await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=url,
                    transport=httpx.AsyncHTTPTransport(retries=3, limits=limits),
                    timeout=600,
                )
            )
            for nick in by_user
        }

        async def post(nick: str, nursery: trio.Nursery) -> None:
            client = clients[nick]
            for index in by_user[nick]:
                body = {"message": jobs[index].line.message, "nick": nick}
                response = await workload.post_once(client, body, key=f"{run_key}-{index}")
                accepted[index] = time.time()
                ids[index] = response.json()["job_id"]
                nursery.start_soon(workload.wait_completed, client, ids[index])

        async with trio.open_nursery() as nursery:
            start = time.time()
            for nick in by_user:
                nursery.start_soon(post, nick, nursery)
    return {"start": start, "ids": ids, "accepted": accepted}


async def run_fategen(
    workdir: Path, sims: Sequence[FleetSim], jobs: Sequence[Job]
) -> dict[str, Any]:
    backends = ",".join(f"{sim.name}={sim.url}" for sim in sims)
    snapshots: list[dict[str, Any]] = []
    async with service(workdir, sims[0], COMFYUI_BACKENDS=backends) as svc:
        async with http_client(svc.url) as client:
            await _wait_checked(client, len(sims))
        async with trio.open_nursery() as nursery:
            start = time.time()
            nursery.start_soon(_snapshots, svc.url, start, snapshots)
            via = await _submit_and_wait(svc.url, jobs)
            nursery.cancel_scope.cancel()
        async with http_client(svc.url) as client:
            final = (await client.get("/backends")).json()["backends"]
        finished = svc.finished_times()
    end = max(finished[i] for i in via["ids"])
    return {
        "start": via["start"],
        "end": end,
        "ids": via["ids"],
        "submitted": via["accepted"],
        "snapshots": snapshots,
        "backends_at_end": final,
    }


# -- the model-blind dispatchers ---------------------------------------------------------------


def round_robin(checkpoints: Sequence[frozenset[str]]) -> Callable[[str, Sequence[int]], int]:
    """The next backend in turn that has the checkpoint."""
    turn = itertools.count()

    def choose(checkpoint: str, outstanding: Sequence[int]) -> int:
        while True:
            index = next(turn) % len(checkpoints)
            if checkpoint in checkpoints[index]:
                return index

    return choose


def least_queue(checkpoints: Sequence[frozenset[str]]) -> Callable[[str, Sequence[int]], int]:
    """The backend with the checkpoint and the fewest prompts outstanding; ties go round in
    turn (not always to the first listed, which would favour the fleet's order)."""
    after = [len(checkpoints) - 1]  # the last one chosen

    def choose(checkpoint: str, outstanding: Sequence[int]) -> int:
        n = len(checkpoints)
        able = [i for i, have in enumerate(checkpoints) if checkpoint in have]
        index = min(able, key=lambda i: (outstanding[i], (i - after[0] - 1) % n))
        after[0] = index
        return index

    return choose


async def run_dispatcher(
    sims: Sequence[FleetSim],
    jobs: Sequence[Job],
    graphs: Sequence[dict[str, Any]],
    choose: Callable[[str, Sequence[int]], int],
) -> dict[str, Any]:
    """Post every workflow where ``choose`` says, follow each backend on one WebSocket, fetch
    each prompt's images as it ends. ``start``: first post; ``end``: last image in hand."""
    client_id = uuid.uuid4().hex
    ids = [str(uuid.uuid4()) for _ in jobs]
    outstanding = [0] * len(sims)
    mine: list[set[str]] = [set() for _ in sims]
    done: dict[str, float] = {}
    all_done = trio.Event()
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    async with contextlib.AsyncExitStack() as stack:
        https = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=sim.url,
                    transport=httpx.AsyncHTTPTransport(retries=3, limits=limits),
                    timeout=60,
                )
            )
            for sim in sims
        ]
        sockets = [
            await stack.enter_async_context(
                trio_websocket.open_websocket_url(
                    sim.url.replace("http://", "ws://") + f"/ws?clientId={client_id}",
                    max_message_size=64 * 2**20,
                )
            )
            for sim in sims
        ]

        async def fetch(index: int, prompt_id: str) -> None:
            http = https[index]
            entry = (await http.get(f"/history/{prompt_id}")).json()[prompt_id]
            assert entry["status"]["completed"], entry["status"]
            for output in entry["outputs"].values():
                for image in output.get("images", []):
                    (await http.get("/view", params=image)).raise_for_status()
            done[prompt_id] = time.time()
            if len(done) == len(ids):
                all_done.set()

        async def listen(index: int, nursery: trio.Nursery) -> None:
            ws = sockets[index]
            while True:
                message = await ws.get_message()
                if isinstance(message, bytes):
                    continue
                event = json.loads(message)
                data = event.get("data") or {}
                if event.get("type") == "executing" and data.get("node") is None:
                    prompt_id = data.get("prompt_id")
                    if prompt_id in mine[index]:
                        mine[index].discard(prompt_id)
                        outstanding[index] -= 1
                        nursery.start_soon(fetch, index, prompt_id)

        async with trio.open_nursery() as nursery:
            for index in range(len(sims)):
                nursery.start_soon(listen, index, nursery)
            start = time.time()
            for job, graph, prompt_id in zip(jobs, graphs, ids, strict=True):
                index = choose(job.checkpoint, outstanding)
                outstanding[index] += 1
                mine[index].add(prompt_id)
                body = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
                (await https[index].post("/prompt", json=body)).raise_for_status()
            await all_done.wait()
            nursery.cancel_scope.cancel()
    return {"start": start, "end": max(done.values()), "ids": ids, "submitted": [start] * len(ids)}


# -- what the executions say -------------------------------------------------------------------

Intervals = list[tuple[float, float]]


def merged(intervals: Iterable[tuple[float, float]]) -> Intervals:
    out: Intervals = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def subtract(minuend: Intervals, subtrahend: Intervals) -> Intervals:
    """The parts of ``minuend`` not covered by ``subtrahend`` (both merged)."""
    out: Intervals = []
    j = 0
    for a, b in minuend:
        while j < len(subtrahend) and subtrahend[j][1] <= a:
            j += 1
        k = j
        cursor = a
        while k < len(subtrahend) and subtrahend[k][0] < b:
            if subtrahend[k][0] > cursor:
                out.append((cursor, subtrahend[k][0]))
            cursor = max(cursor, subtrahend[k][1])
            k += 1
        if cursor < b:
            out.append((cursor, b))
    return out


def lower_bound(jobs: Sequence[Job], load_seconds: float) -> dict[str, float]:
    """The fluid bound (seconds): ``T * speed(U) >= work + loads(U) * load`` for the backends
    ``U`` used, every one loading once and every checkpoint loaded somewhere; the best ``U``
    among those that cover the checkpoints. Speeds and loads at 1x (a load costs a backend
    the same share of its speed whatever that speed)."""
    needed = {job.checkpoint for job in jobs}
    work = sum(job.steps * STEP_SECONDS for job in jobs)
    best = (float("inf"), 0)
    for size in range(1, len(FLEET) + 1):
        for used in itertools.combinations(FLEET, size):
            if not needed <= set().union(*(installed(s) for s in used)):
                continue
            speed = sum(1 / s.slowness for s in used)
            loads = max(len(used), len(needed))
            best = min(best, ((work + loads * load_seconds) / speed, loads))
    return {"seconds": best[0], "work": work, "loads": float(best[1])}


def fair_reference(jobs: Sequence[Job], load_seconds: float) -> list[float]:
    """Each job's end (seconds from the start) under plain fair turns over the fleet: jobs in
    user round-robin order (users in order of their first job), each to the backend that can
    run it and is free first (the faster on a tie), nominal timings, no overhead."""
    per_user: dict[str, list[int]] = {}
    for index, job in enumerate(jobs):
        per_user.setdefault(job.line.nick, []).append(index)
    order = [i for turn in itertools.zip_longest(*per_user.values()) for i in turn if i is not None]
    free = [0.0] * len(FLEET)
    loaded: list[str | None] = [None] * len(FLEET)
    ends = [0.0] * len(jobs)
    for index in order:
        job = jobs[index]
        able = [b for b, s in enumerate(FLEET) if job.checkpoint in installed(s)]
        b = min(able, key=lambda b: (free[b], FLEET[b].slowness))
        slowness = FLEET[b].slowness
        cost = job.steps * STEP_SECONDS * slowness
        if loaded[b] != job.checkpoint:
            cost += load_seconds * slowness
        free[b] += cost
        loaded[b] = job.checkpoint
        ends[index] = free[b]
    return ends


#: Shorter idle stretches are hand-overs between two prompts (shown apart in the notes).
HANDOVER_SECONDS = 0.005


def _nominal(steps: int, slowness: float, load_seconds: float, loads: bool) -> float:
    """What the simulator's knobs make an execution last (its steps, a load if it swapped)."""
    return slowness * (steps * STEP_SECONDS + (load_seconds if loads else 0.0))


def analyse(
    outcome: dict[str, Any],
    found: dict[str, list[dict[str, Any]]],
    jobs: Sequence[Job],
    sims: Sequence[FleetSim],
    reference: Sequence[float],
    load_seconds: float,
    prompt_seconds: float,
) -> dict[str, Any]:
    """Makespan, loads, idle while runnable and the worst extra wait (in ``prompt_seconds``)
    of one run."""
    start, end = outcome["start"], outcome["end"]
    makespan = end - start
    runs = [e for ex in found.values() for e in ex]
    bad = [e for e in runs if e["status"] != "success"]
    assert not bad, f"{len(bad)} executions did not succeed: {bad[:3]}"
    first_start: dict[str, float] = {}
    ended: dict[str, float] = {}
    ran_on: dict[str, str] = {}
    for name, ex in found.items():
        for e in ex:
            if e["started"] < first_start.get(e["prompt_id"], float("inf")):
                first_start[e["prompt_id"]] = e["started"]
            ended[e["prompt_id"]] = max(e["ended"], ended.get(e["prompt_id"], 0.0))
            ran_on[e["prompt_id"]] = name
    missing = [i for i in outcome["ids"] if i not in first_start]
    assert not missing, f"{len(missing)} jobs never ran"
    waiting = [
        (job.checkpoint, max(submitted, start), first_start[job_id])
        for job, job_id, submitted in zip(jobs, outcome["ids"], outcome["submitted"], strict=True)
    ]
    steps = {job_id: job.steps for job, job_id in zip(jobs, outcome["ids"], strict=True)}
    backends: dict[str, dict[str, Any]] = {}
    excess: list[float] = []
    for sim in sims:
        ex = found[sim.name]
        busy = merged((e["started"], e["ended"]) for e in ex)
        runnable = merged((a, b) for c, a, b in waiting if c in sim.checkpoints)
        idle = subtract(runnable, busy)
        longest = max(idle, key=lambda i: i[1] - i[0], default=(start, start))
        swapped = [a != b for a, b in itertools.pairwise([None, *[e["checkpoint"] for e in ex]])]
        for e, loads in zip(ex, swapped, strict=True):
            nominal = _nominal(steps[e["prompt_id"]], sim.setup.slowness, load_seconds, loads)
            excess.append(e["ended"] - e["started"] - nominal)
        backends[sim.name] = {
            "jobs": len(ex),
            "loads": sum(swapped),
            "busy_fraction": sum(b - a for a, b in busy) / makespan,
            "last_end_s": max((e["ended"] for e in ex), default=start) - start,
            "idle_runnable_s": sum(b - a for a, b in idle),
            "idle_runnable_fraction": sum(b - a for a, b in idle) / makespan,
            "idle_runnable_stretches": len(idle),
            "idle_runnable_beyond_handover_s": sum(
                b - a for a, b in idle if b - a >= HANDOVER_SECONDS
            ),
            "longest_idle_runnable": {
                "from_s": longest[0] - start,
                "seconds": longest[1] - longest[0],
                "jobs_waiting": sum(
                    1 for c, a, b in waiting if c in sim.checkpoints and a <= longest[0] < b
                ),
            },
        }
    extra = [
        (ended[job_id] - start) - ref for job_id, ref in zip(outcome["ids"], reference, strict=True)
    ]
    worst = max(range(len(extra)), key=extra.__getitem__)
    worst_id = outcome["ids"][worst]
    return {
        "makespan": makespan,
        "executions": len(runs),
        "loads": sum(b["loads"] for b in backends.values()),
        "idle_runnable_worst": max(b["idle_runnable_fraction"] for b in backends.values()),
        "idle_runnable_sum": sum(b["idle_runnable_s"] for b in backends.values()) / makespan,
        "idle_runnable_beyond_handover_sum": sum(
            b["idle_runnable_beyond_handover_s"] for b in backends.values()
        )
        / makespan,
        "excess_ms_per_prompt": 1000 * sum(excess) / len(excess),
        "worst_extra_prompts": extra[worst] / prompt_seconds,
        "worst_job": {
            "index": worst,
            "nick": jobs[worst].line.nick,
            "model": jobs[worst].line.model,
            "backend": ran_on[worst_id],
            "submitted_s": waiting[worst][1] - start,
            "started_s": first_start[worst_id] - start,
            "ended_s": ended[worst_id] - start,
            "fair_ended_s": reference[worst],
        },
        "backends": backends,
    }


async def _analysed(
    outcome: dict[str, Any],
    sims: Sequence[FleetSim],
    jobs: Sequence[Job],
    reference: Sequence[float],
    load_seconds: float,
    save: Path,
) -> dict[str, Any]:
    """`analyse` on the simulators' executions, which are kept in ``save`` (the work folder).
    A load costs one prompt: ``load_seconds`` is the prompt-time too."""
    found = await executions(sims)
    kept = {key: outcome[key] for key in ("start", "end", "ids", "submitted")}
    text = json.dumps({**kept, "executions": found})
    await trio.Path(save).write_text(text)
    return analyse(outcome, found, jobs, sims, reference, load_seconds, load_seconds)


# -- the scenario ------------------------------------------------------------------------------


#: Fresh starts of fategen (and its simulators) for one measured run before giving up.
FATEGEN_ATTEMPTS = 3
_ERROR_LINE = re.compile(r"(\w+(?:Error|Exception)): (.*)")


def _failure(exc: BaseException, run_dir: Path) -> str:
    """One sentence for a fategen run that failed: the bench's error, and the last error the
    service logged (a 500 or a crash), with where its log is."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    text = f"{type(exc).__name__}: {str(exc)[:200]}"
    for log in run_dir.glob("service-*/service.log"):
        found = _ERROR_LINE.findall(log.read_text(errors="replace"))
        if found:
            text += f"; the service logged {found[-1][0]}: {found[-1][1][:200]} ({log})"
    return text


async def measure_fategen(
    workdir: Path, jobs: Sequence[Job], load_seconds: float, reference: Sequence[float]
) -> tuple[dict[str, Any], list[str]]:
    """One measured fategen run, and the sentences of the attempts that failed before it (each
    on fresh simulators and a fresh service): a failure is a finding, counted in a figure."""
    failures: list[str] = []
    for _ in range(FATEGEN_ATTEMPTS):
        async with simulators(workdir, load_seconds) as sims:
            run_dir = sims[0].log.parent
            try:
                outcome = await run_fategen(run_dir, sims, jobs)
            except Exception as exc:
                failures.append(await trio.to_thread.run_sync(_failure, exc, run_dir))
                print(f"   fleet: fategen run failed: {failures[-1]}", file=sys.stderr)
                continue
            save = run_dir / "executions.json"
            result = await _analysed(outcome, sims, jobs, reference, load_seconds, save)
            result["snapshots"] = outcome["snapshots"]
            result["backends_at_end"] = outcome["backends_at_end"]
            return result, failures
    raise RuntimeError(f"fategen failed {len(failures)} runs in a row; the last: {failures[-1]}")


async def repeat_once(
    workdir: Path,
    jobs: Sequence[Job],
    graphs: Sequence[dict[str, Any]],
    load_seconds: float,
    reference: Sequence[float],
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    result["fategen"], result["fategen_failures"] = await measure_fategen(
        workdir, jobs, load_seconds, reference
    )
    for name, policy in (("round_robin", round_robin), ("least_queue", least_queue)):
        async with simulators(workdir, load_seconds) as sims:
            choose = policy([sim.checkpoints for sim in sims])
            outcome = await run_dispatcher(sims, jobs, graphs, choose)
            save = sims[0].log.with_name("executions.json")
            result[name] = await _analysed(outcome, sims, jobs, reference, load_seconds, save)
    return result


async def run(workdir: Path, *, quick: bool = False) -> dict[str, Any]:
    repeats = 1 if quick else 3
    jobs = make_jobs(60 if quick else 200)
    graphs = workload.workflows([job.line for job in jobs])
    # A load costs one prompt (of the backend that loads): the median job's steps at 1x.
    load_seconds = STEP_SECONDS * median([job.steps for job in jobs])
    reference = fair_reference(jobs, load_seconds)
    bound = lower_bound(jobs, load_seconds)
    runs = [
        await repeat_once(workdir, jobs, graphs, load_seconds, reference) for _ in range(repeats)
    ]

    def col(name: str, key: str) -> list[float]:
        return [r[name][key] for r in runs]

    fg, rr, lq = "fategen", "round_robin", "least_queue"
    prompt_ms = 1000 * load_seconds

    def idle_s(name: str) -> float:
        return median([r[fg]["backends"][name]["idle_runnable_s"] for r in runs])

    per_backend = ", ".join(f"{s.name} {1000 * idle_s(s.name):.0f}" for s in FLEET)
    worst = runs[0][fg]["worst_job"]
    failures = [f for r in runs for f in r["fategen_failures"]]
    speed = sum(1 / s.slowness for s in FLEET)
    extra_loads = (median(col(fg, "loads")) - bound["loads"]) * load_seconds / speed
    started = len(failures) + len(runs)
    figures = [
        figure(
            "makespan_over_bound",
            f"makespan fategen / lower bound, {len(jobs)} jobs on 4 unequal backends",
            [m / bound["seconds"] for m in col(fg, "makespan")],
            target=("<=", 1.15),
            digits=3,
            note=f"bound {bound['seconds']:.2f} s (the steps and {bound['loads']:.0f} loads "
            f"over the fleet's speed); fategen {median(col(fg, 'makespan')):.2f} s, of which "
            f"~{extra_loads:.1f} s its loads beyond the fewest (over the fleet's speed); a prompt "
            f"ran {median(col(fg, 'excess_ms_per_prompt')):.0f} ms over its nominal time on "
            "average (the simulator's own work, not in the bound)",
        ),
        figure(
            "round_robin_over_fategen",
            "makespan round-robin dispatcher / fategen",
            [ratio(a, b) for a, b in zip(col(rr, "makespan"), col(fg, "makespan"), strict=True)],
            target=(">=", 1.3),
            note=f"round-robin {median(col(rr, 'makespan')):.2f} s",
        ),
        figure(
            "least_queue_over_fategen",
            "makespan least-queue dispatcher / fategen",
            [ratio(a, b) for a, b in zip(col(lq, "makespan"), col(fg, "makespan"), strict=True)],
            target=(">=", 1.3),
            note=f"least-queue {median(col(lq, 'makespan')):.2f} s",
        ),
        figure(
            "idle_while_runnable",
            "fategen: a backend idle while a job it could run waits / makespan (worst backend)",
            col(fg, "idle_runnable_worst"),
            target=("<", 0.01),
            digits=4,
            noisy=True,
            note=f"ms per backend: {per_backend}; summed over the fleet "
            f"{median(col(fg, 'idle_runnable_sum')):.4f} of the makespan, "
            f"{median(col(fg, 'idle_runnable_beyond_handover_sum')):.4f} in stretches over "
            f"{1000 * HANDOVER_SECONDS:.0f} ms; worst backend under least-queue "
            f"{median(col(lq, 'idle_runnable_worst')):.3f}, round-robin "
            f"{median(col(rr, 'idle_runnable_worst')):.3f}",
        ),
        figure(
            "fategen_failures",
            f"fategen runs that failed (a 500 or a crash), of {started} started",
            [float(len(failures))],
            target=("<=", 0.0),
            digits=0,
            note="each measured again on fresh simulators and service; first: "
            + (failures[0] if failures else "none"),
        ),
        figure(
            "loads",
            "fategen: checkpoint loads over the fleet",
            col(fg, "loads"),
            digits=0,
            note=f"fewest: {bound['loads']:.0f}; round-robin {median(col(rr, 'loads')):.0f}, "
            f"least-queue {median(col(lq, 'loads')):.0f}",
        ),
        figure(
            "worst_extra_wait_prompts",
            "fategen: worst job's extra wait vs plain fair turns (prompt-times)",
            col(fg, "worst_extra_prompts"),
            target=("<=", 20.0),
            digits=1,
            note="loose, against starvation; reference: user round-robin order, each job to "
            "the first free backend that "
            f"can run it, nominal timings without overhead; a prompt-time is {prompt_ms:.0f} ms "
            f"(1x); worst (run 1): {worst['nick']}'s {worst['model']} job on "
            f"{worst['backend']}, done at {worst['ended_s']:.2f} s, fair "
            f"{worst['fair_ended_s']:.2f} s; least-queue "
            f"{median(col(lq, 'worst_extra_prompts')):.1f}, round-robin "
            f"{median(col(rr, 'worst_extra_prompts')):.1f}",
        ),
    ]
    return {
        "figures": figures,
        "jobs": len(jobs),
        "users": USERS,
        "fleet": [attrs.asdict(s) for s in FLEET],
        "step_seconds_1x": STEP_SECONDS,
        "model_load_seconds_1x": load_seconds,
        "lower_bound": bound,
        "fair_reference_makespan": max(reference),
        "runs": runs,
    }
