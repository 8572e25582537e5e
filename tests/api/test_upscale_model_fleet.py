"""Upscales with an upscale model (``DEFAULTS.upscaleMethod`` "model"), in a fleet of
simulator processes' worth of servers on 127.0.0.1: the upscale runs only where the model is
installed (read from ``UpscaleModelLoader`` in /object_info, as ComfyUI 0.33 lists it), and is
refused at submit, naming what each backend lacks, when no backend has it."""

from __future__ import annotations

import contextlib
import functools
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import trio
from PIL import Image

from conftest import make_settings
from fategen.service import Running, run_service
from fategen.simulator import Simulator, SimulatorKnobs

ROOT = Path(__file__).resolve().parents[2]
TINY = "-m tiny -w 256 -h 256"


def model_config(tmp_path: Path) -> Path:
    data = json.loads((ROOT / "config" / "modelConfiguration.json").read_text(encoding="utf-8"))
    data["DEFAULTS"].update({"upscaleMethod": "model", "upscaleModel": "2x-ESRGAN.pth"})
    path = tmp_path / "models.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@contextlib.asynccontextmanager
async def fleet(
    tmp_path: Path, **sims: Simulator
) -> AsyncIterator[tuple[Running, httpx.AsyncClient]]:
    async with trio.open_nursery() as outer:
        urls = []
        for name, sim in sims.items():
            port = await outer.start(functools.partial(sim.serve, host="127.0.0.1", port=0))
            urls.append(f"{name}=http://127.0.0.1:{port}")
        settings = make_settings(
            tmp_path,
            COMFYUI_BACKENDS=",".join(urls),
            FATEGEN_MODEL_CONFIG=str(model_config(tmp_path)),
        )
        shutdown = trio.Event()
        async with trio.open_nursery() as inner:
            running: Running = await inner.start(run_service, settings, shutdown)
            await running.service.wait_checked()
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
                yield running, client
            shutdown.set()
        outer.cancel_scope.cancel()


def knobs(**changes: object) -> SimulatorKnobs:
    return SimulatorKnobs(step_seconds=0.002, model_load_seconds=0.0, **changes)  # type: ignore[arg-type]


async def finished(client: httpx.AsyncClient, message: str, nick: str = "al") -> dict[str, object]:
    r = await client.post("/request", json={"message": message, "nick": nick})
    assert r.status_code == 200, r.text
    r = await client.get(f"/wait/{r.json()['job_id']}", params={"timeout": 20})
    body: dict[str, object] = r.json()
    assert body["status"] == "completed", body
    return body


async def test_a_model_upscale_runs_where_the_model_is(tmp_path: Path) -> None:
    bare = Simulator(knobs(upscale_models=[]))
    equipped = Simulator(knobs())
    async with fleet(tmp_path, bare=bare, equipped=equipped) as (_, client):
        base = await finished(client, f"a fox {TINY}")
        ids = []
        for nick in ("al", "bo", "cy"):
            r = await client.post(
                "/request", json={"message": f"--upscale {base['job_id']}", "nick": nick}
            )
            assert r.status_code == 200, r.text
            ids.append(r.json()["job_id"])
        for job_id in ids:
            done = (await client.get(f"/wait/{job_id}", params={"timeout": 20})).json()
            assert done["status"] == "completed", done
            assert done["backend"] == "equipped"
            assert done["kind"] == "upscale" and (done["width"], done["height"]) == (512, 512)
            image = (await client.get(done["image_url"])).content
            with Image.open(io.BytesIO(image)) as picture:
                assert picture.size == (512, 512)
    ran = {e.prompt_id for e in equipped.executions}
    assert set(ids) <= ran
    assert not set(ids) & {e.prompt_id for e in bare.executions}


async def test_a_model_upscale_no_backend_can_run_is_refused(tmp_path: Path) -> None:
    async with fleet(tmp_path, gpu0=Simulator(knobs(upscale_models=["4x-Other.pth"]))) as (
        running,
        client,
    ):
        base = await finished(client, f"a fox {TINY}")
        r = await client.post(
            "/request", json={"message": f"--upscale {base['job_id']}", "nick": "al"}
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert 'has no upscale model "2x-ESRGAN.pth"' in error and "\n" not in error
        assert running.service.store.count_queued() == 0
        tiny = next(m for m in (await client.get("/models")).json()["models"] if m["id"] == "tiny")
        assert tiny["kinds"] == ["txt2img", "img2img"]  # no upscale anywhere
