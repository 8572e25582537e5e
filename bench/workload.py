"""Workloads (chat lines) and the two ways to run them: through fategen, or straight to ComfyUI.

`run_direct` is the best a hand-written client can do: connect one websocket, post every
prompt in a tight loop, and fetch each prompt's images as soon as the websocket says it ended.
`run_fategen` posts the same chat lines to ``POST /request`` in a tight loop and long-polls
each job. Both build identical workflows (same model, size, count and seed), through
`fategen.workflow.build_workflow`.
"""

from __future__ import annotations

import itertools
import json
import random
import time
import uuid
from collections.abc import Sequence
from typing import Any

import attrs
import httpx
import trio
import trio_websocket
from common import MODEL_CONFIG, WORKFLOWS

from fategen.core.modelconfig import load_model_config
from fategen.core.prompt import parse_request
from fategen.core.workflow import build_workflow, load_templates


@attrs.frozen
class Line:
    """One chat line from one user."""

    nick: str
    message: str
    model: str


def mixed_lines(
    n: int,
    *,
    nicks: int,
    models: Sequence[str] = ("tiny",),
    seed: int = 6,
    counts: tuple[int, int] = (1, 4),
) -> list[Line]:
    """``n`` lines, 256x256, ``counts`` images (from, to), fixed seeds, nicks and models drawn
    at random."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        model = rng.choice(models)
        count = rng.randint(*counts)
        message = f"bench job {i} -m {model} -w 256 -h 256 -c {count} -s {rng.randrange(2**32)}"
        lines.append(Line(f"user{rng.randrange(nicks)}", message, model))
    return lines


def workflows(lines: Sequence[Line]) -> list[dict[str, Any]]:
    """The ComfyUI workflow fategen builds for each line."""
    templates = load_templates(WORKFLOWS)
    config = load_model_config(MODEL_CONFIG, templates=frozenset(templates))
    graphs = []
    for line in lines:
        request = parse_request(line.message, config)
        spec = config.models[request.model]
        graphs.append(
            build_workflow(templates[spec.workflow], spec, request, filename_prefix="fategen")
        )
    return graphs


async def run_direct(sim_url: str, graphs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Post every workflow to the simulator, wait on one websocket, fetch every image.

    Returns ``start`` (first post, epoch), ``done`` (prompt id -> images in hand, epoch),
    ``ids`` in submission order.
    """
    client_id = uuid.uuid4().hex
    ids = [str(uuid.uuid4()) for _ in graphs]
    done: dict[str, float] = {}
    ws_url = sim_url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
    transport = httpx.AsyncHTTPTransport(retries=3, limits=limits)
    async with httpx.AsyncClient(base_url=sim_url, transport=transport, timeout=60) as http:

        async def fetch(prompt_id: str) -> None:
            entry = (await http.get(f"/history/{prompt_id}")).json()[prompt_id]
            for output in entry["outputs"].values():
                for image in output.get("images", []):
                    response = await http.get("/view", params=image)
                    response.raise_for_status()
            done[prompt_id] = time.time()

        async def post_all() -> None:
            for prompt_id, graph in zip(ids, graphs, strict=True):
                body = {"prompt": graph, "client_id": client_id, "prompt_id": prompt_id}
                (await http.post("/prompt", json=body)).raise_for_status()

        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.connect_websocket_url(
                nursery, ws_url, max_message_size=64 * 2**20
            )
            start = time.time()
            nursery.start_soon(post_all)
            pending = set(ids)
            while pending:
                message = await ws.get_message()
                if isinstance(message, bytes):
                    continue
                event = json.loads(message)
                data = event.get("data") or {}
                if event.get("type") == "executing" and data.get("node") is None:
                    prompt_id = data.get("prompt_id")
                    if prompt_id in pending:
                        pending.discard(prompt_id)
                        nursery.start_soon(fetch, prompt_id)
            await ws.aclose()
    return {"start": start, "done": done, "ids": ids}


async def wait_completed(client: httpx.AsyncClient, job_id: str) -> None:
    """Long-poll ``/wait`` until the job ends, which must be ``completed``; a connection
    reset is asked again (three times)."""
    failures = 0
    while True:
        try:
            response = await client.get(f"/wait/{job_id}", params={"timeout": 300})
        except httpx.TransportError:
            failures += 1  # a connection reset: ask again
            if failures > 3:
                raise
            continue
        if response.status_code == 200:
            assert response.json()["status"] == "completed", response.text
            return


async def post_once(
    client: httpx.AsyncClient, body: dict[str, Any], *, key: str, attempts: int = 4
) -> httpx.Response:
    """``POST /request`` with an Idempotency-Key, sent again if the connection fails (the key
    makes a second send return the first job); asserts a 200."""
    for attempt in range(attempts):
        try:
            response = await client.post("/request", json=body, headers={"Idempotency-Key": key})
        except httpx.TransportError:
            if attempt == attempts - 1:
                raise
            await trio.sleep(0.1)
            continue
        assert response.status_code == 200, response.text
        return response
    raise AssertionError("unreachable")


async def run_fategen(url: str, lines: Sequence[Line], *, clients: int = 4) -> dict[str, Any]:
    """Post every line to ``/request`` in a tight loop and long-poll each job.

    Returns ``start`` (first post, epoch), ``answered`` (job id -> /wait answered, epoch),
    ``ids`` in submission order.
    """
    answered: dict[str, float] = {}
    ids: list[str] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    pool = [
        httpx.AsyncClient(
            base_url=url,
            transport=httpx.AsyncHTTPTransport(retries=3, limits=limits),
            timeout=600,
        )
        for _ in range(clients)
    ]
    try:

        async def wait(client: httpx.AsyncClient, job_id: str) -> None:
            await wait_completed(client, job_id)
            answered[job_id] = time.time()

        async with trio.open_nursery() as nursery:
            start = time.time()
            run_key = uuid.uuid4().hex[:12]
            for index, line in enumerate(lines):
                client = pool[index % clients]
                response = await post_once(
                    client,
                    {"message": line.message, "nick": line.nick},
                    key=f"{run_key}-{index}",
                )
                job_id = response.json()["job_id"]
                ids.append(job_id)
                nursery.start_soon(wait, client, job_id)
    finally:
        with trio.CancelScope(shield=True):
            for client in pool:
                await client.aclose()
    return {"start": start, "answered": answered, "ids": ids}


def sim_span_and_gaps(executions: Sequence[dict[str, Any]], start: float) -> dict[str, Any]:
    """What the simulator recorded: first execution start to last end (``span``), the gaps
    between one end and the next start (ms), the mean execution time, and (epoch) the first
    start and last end (``start`` is when the client posted the first job)."""
    runs = sorted(executions, key=lambda e: e["started_monotonic"])
    gaps = [
        (b["started_monotonic"] - a["finished_monotonic"]) * 1000
        for a, b in itertools.pairwise(runs)
    ]
    durations = [e["finished_monotonic"] - e["started_monotonic"] for e in runs]
    return {
        "span": runs[-1]["finished_monotonic"] - runs[0]["started_monotonic"],
        "gaps_ms": gaps,
        "mean_execution_ms": 1000 * sum(durations) / len(durations),
        "lead_ms": 1000 * (runs[0]["started_wall"] - start),
        "last_end": max(e["finished_wall"] for e in runs),
    }
