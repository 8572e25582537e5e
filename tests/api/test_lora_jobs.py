"""LoRAs through the service, over real sockets: a job with a LoRA runs with it on the
simulator (which validates LoraLoader as ComfyUI does); an unknown LoRA is refused at submit
with the closest names; in a fleet, a LoRA job goes only to a backend that has its LoRAs."""

from __future__ import annotations

import functools
from pathlib import Path

import httpx
import trio

from conftest import make_settings, open_stack
from fategen.service import Running, run_service
from fategen.simulator import Simulator, SimulatorKnobs

TINY = "-m tiny -w 256 -h 256"


async def test_a_job_runs_with_its_loras(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        job = await stack.submit(f"a cat <lora:detail-tweaker:0.7> --lora anime-style {TINY}")
        done = await stack.wait(job["job_id"])
        assert done["status"] == "completed", done
        assert done["prompt"] == "a cat"
        (record,) = stack.sim.executions
        assert set(record.loras) == {
            "detail-tweaker.safetensors",
            "anime-style.safetensors",
        }


async def test_an_unknown_lora_is_refused_with_the_closest_names(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        r = await stack.client.post(
            "/request", json={"message": f"a cat <lora:detail-tweakr> {TINY}", "nick": "al"}
        )
        assert r.status_code == 400
        error = r.json()["error"]
        assert "detail-tweaker" in error and "\n" not in error
        assert stack.running.store.count_queued() == 0


async def test_in_a_fleet_a_lora_job_goes_where_its_lora_is(tmp_path: Path) -> None:
    plain = Simulator(SimulatorKnobs(step_seconds=0.002, model_load_seconds=0.0, loras=[]))
    styled = Simulator(SimulatorKnobs(step_seconds=0.002, model_load_seconds=0.0))
    async with trio.open_nursery() as outer:
        ports = [
            await outer.start(functools.partial(sim.serve, host="127.0.0.1", port=0))
            for sim in (plain, styled)
        ]
        backends = f"plain=http://127.0.0.1:{ports[0]},styled=http://127.0.0.1:{ports[1]}"
        settings = make_settings(tmp_path, COMFYUI_BACKENDS=backends)
        shutdown = trio.Event()
        async with trio.open_nursery() as inner:
            running: Running = await inner.start(run_service, settings, shutdown)
            await running.service.wait_checked()
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
                ids = []
                for i in range(4):
                    r = await client.post(
                        "/request",
                        json={"message": f"s{i} <lora:anime-style> {TINY}", "nick": f"u{i}"},
                    )
                    assert r.status_code == 200, r.text
                    ids.append(r.json()["job_id"])
                for job_id in ids:
                    r = await client.get(f"/wait/{job_id}", params={"timeout": 20})
                    assert r.json()["status"] == "completed"
                    assert r.json()["backend"] == "styled"
            shutdown.set()
        outer.cancel_scope.cancel()
    assert plain.executions == []
    assert sorted(e.prompt_id for e in styled.executions) == sorted(ids)
