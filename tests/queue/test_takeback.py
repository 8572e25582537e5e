"""A job posted ahead to a busy backend is taken back (deleted from that ComfyUI's queue) and
run on another backend that can run it and goes idle first; one that already started stays."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import trio

from conftest import make_settings
from fategen.service import Running, run_service
from fategen.simulator import Simulator, SimulatorKnobs

TINY = "-m tiny -w 256 -h 256"


@contextlib.asynccontextmanager
async def two_backends(
    tmp_path: Path, step_a: float, step_b: float
) -> AsyncIterator[tuple[Running, httpx.AsyncClient, Simulator, Simulator]]:
    sims = [
        Simulator(SimulatorKnobs(step_seconds=step, model_load_seconds=0.01))
        for step in (step_a, step_b)
    ]
    async with trio.open_nursery() as outer:
        ports = [
            await outer.start(functools.partial(sim.serve, host="127.0.0.1", port=0))
            for sim in sims
        ]
        backends = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip("ab", ports, strict=True))
        settings = make_settings(tmp_path, COMFYUI_BACKENDS=backends)
        shutdown = trio.Event()
        async with trio.open_nursery() as inner:
            running: Running = await inner.start(run_service, settings, shutdown)
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
                yield running, client, sims[0], sims[1]
            shutdown.set()
        outer.cancel_scope.cancel()


async def _submit(client: httpx.AsyncClient, text: str, nick: str) -> str:
    r = await client.post("/request", json={"message": f"{text} {TINY}", "nick": nick})
    assert r.status_code == 200, r.text
    job_id: str = r.json()["job_id"]
    return job_id


async def _until(what: str, check: object, limit: float = 10) -> None:
    with trio.fail_after(limit):
        while not check():  # type: ignore[operator]  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_the_job_ahead_moves_to_a_backend_that_goes_idle(tmp_path: Path) -> None:
    async with two_backends(tmp_path, step_a=0.05, step_b=0.002) as (running, client, a, b):
        fleet = running.service.fleet
        await running.service.wait_checked()
        fleet.drain("b")  # everything goes to a: one job running, one posted ahead
        first = await _submit(client, "first", "u1")
        second = await _submit(client, "second", "u2")
        backend_a = fleet.backends["a"]
        await _until("second ahead on a", lambda: second in backend_a.ahead)
        assert first in backend_a.running
        fleet.enable("b")  # b is idle, nothing waits: a's job ahead is taken back for it
        with trio.fail_after(20):
            for job_id in (first, second):
                r = await client.get(f"/wait/{job_id}", params={"timeout": 15})
                assert r.json()["status"] == "completed", r.text
        assert (await client.get(f"/job/{second}")).json()["backend"] == "b"
        assert [e.prompt_id for e in a.executions] == [first]  # never ran on a
        assert [e.prompt_id for e in b.executions] == [second]


async def test_a_job_that_started_is_not_taken_back(tmp_path: Path) -> None:
    async with two_backends(tmp_path, step_a=0.002, step_b=0.002) as (running, client, a, b):
        fleet = running.service.fleet
        await running.service.wait_checked()
        fleet.drain("b")
        backend_a = fleet.backends["a"]
        job_id = await _submit(client, "only", "u1")
        await _until("running on a", lambda: job_id in backend_a.running)
        worker = backend_a.workers[0]
        job = await running.store.get(job_id)
        assert job is not None
        assert not await worker.take_back(job)  # not ahead: it runs
        fleet.enable("b")
        r = await client.get(f"/wait/{job_id}", params={"timeout": 15})
        assert r.json()["status"] == "completed"
        assert [e.prompt_id for e in a.executions] == [job_id]
        assert b.executions == []
