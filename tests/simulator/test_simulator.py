"""The simulator's knobs, faults, queue control and lifecycle, over real sockets."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import uuid
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from PIL import Image
from simulator_fixtures import (
    TINY_CKPT,
    Running,
    emptyimage_prompt,
    recorder,
    running_simulator,
    txt2img_prompt,
)

from fategen.simulator import DEFAULT_CHECKPOINTS, Simulator, SimulatorKnobs


async def images_of(running: Running, prompt_id: str, node: str = "9") -> list[bytes]:
    entry = (await running.http.get(f"/history/{prompt_id}")).json()[prompt_id]
    return [
        (await running.http.get("/view", params=image)).content
        for image in entry["outputs"][node]["images"]
    ]


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def status_of(entry: dict[str, Any]) -> tuple[str, bool, str]:
    status = entry["status"]
    return status["status_str"], status["completed"], status["messages"][-1][0]


async def test_default_checkpoints_cover_fategen_and_recordings() -> None:
    assert TINY_CKPT in DEFAULT_CHECKPOINTS
    assert "illustriousXL_v01.safetensors" in DEFAULT_CHECKPOINTS
    assert SimulatorKnobs().checkpoints == list(DEFAULT_CHECKPOINTS)
    with trio.fail_after(5):
        async with running_simulator() as running:
            assert (await running.http.get("/models/checkpoints")).json() == list(
                DEFAULT_CHECKPOINTS
            )


async def test_checkpoints_knob_drives_lists_and_validation() -> None:
    with trio.fail_after(5):
        async with running_simulator() as running:
            running.sim.knobs.checkpoints = ["only.safetensors"]
            assert (await running.http.get("/api/models/checkpoints")).json() == [
                "only.safetensors"
            ]
            info = (await running.http.get("/object_info/CheckpointLoaderSimple")).json()
            assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [
                "only.safetensors"
            ]
            refused = await running.http.post("/prompt", json={"prompt": txt2img_prompt()})
            assert refused.status_code == 400
            assert refused.json()["node_errors"]["4"]["errors"][0]["type"] == "value_not_in_list"
            accepted = await running.http.post(
                "/prompt", json={"prompt": txt2img_prompt(ckpt="only.safetensors")}
            )
            assert accepted.status_code == 200


async def test_step_seconds_paces_progress() -> None:
    knobs = SimulatorKnobs(step_seconds=0.05, model_load_seconds=0)
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs) as running:
            client_id = str(uuid.uuid4())
            async with recorder(running.ws_url(client_id)) as rec:
                body = {"prompt": txt2img_prompt(steps=4), "client_id": client_id}
                prompt_id = (await running.post_prompt(body))["prompt_id"]
                await rec.wait_type("executing", node=None, prompt_id=prompt_id)
    progress = [f["data"] for f in rec.texts() if f["type"] == "progress"]
    assert progress == [
        {"value": step, "max": 4, "prompt_id": prompt_id, "node": "3"} for step in range(1, 5)
    ]
    (record,) = running.sim.executions
    assert record.status == "success"
    assert 0.2 <= record.duration < 1.0
    assert record.finished_monotonic - record.started_monotonic >= 0.2


async def test_model_load_charged_when_checkpoint_changes() -> None:
    knobs = SimulatorKnobs(step_seconds=0.001, model_load_seconds=0.15)
    other = "lumina_2.safetensors"
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs) as running:
            await running.run_prompt({"prompt": txt2img_prompt(seed=1)})
            await running.run_prompt({"prompt": txt2img_prompt(seed=2)})
            await running.run_prompt({"prompt": txt2img_prompt(ckpt=other, seed=3)})
    sim = running.sim
    cold, warm, swapped = sim.executions
    assert cold.duration >= 0.15
    assert warm.duration < 0.1
    assert swapped.duration >= 0.15
    assert [e.checkpoint for e in sim.executions] == [TINY_CKPT, TINY_CKPT, other]
    assert (sim.model_loads, sim.model_swaps, sim.loaded_checkpoint) == (2, 1, other)
    assert cold.finished <= warm.started and warm.finished <= swapped.started


async def test_free_is_recorded_and_unloads_the_model() -> None:
    knobs = SimulatorKnobs(step_seconds=0.001, model_load_seconds=0.1)
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs) as running:
            client_id = str(uuid.uuid4())
            await running.run_prompt({"prompt": txt2img_prompt()})
            assert running.sim.loaded_checkpoint == TINY_CKPT
            body = {"unload_models": True, "free_memory": True}
            response = await running.http.post("/free", json=body)
            assert (response.status_code, response.content) == (200, b"")
            assert running.sim.free_requests == [body]
            assert running.sim.loaded_checkpoint is None
            async with recorder(running.ws_url(client_id)) as rec:
                prompt_id = await running.run_prompt(
                    {"prompt": txt2img_prompt(), "client_id": client_id}
                )
                await rec.wait_type("executing", node=None, prompt_id=prompt_id)
    cached = next(f for f in rec.texts() if f["type"] == "execution_cached")
    assert cached["data"]["nodes"] == []
    assert running.sim.model_loads == 2
    assert running.sim.executions[-1].duration >= 0.1


async def test_http_500_fault_is_persistent_until_reset() -> None:
    with trio.fail_after(5):
        async with running_simulator(knobs=SimulatorKnobs(http_500=True)) as running:
            for _ in range(2):
                response = await running.http.post("/prompt", json={"prompt": emptyimage_prompt()})
                assert response.status_code == 500
                assert response.headers["content-type"] == "text/plain; charset=utf-8"
            assert running.sim.queue.history == {}
            running.sim.knobs.http_500 = False
            assert (
                await running.http.post("/prompt", json={"prompt": emptyimage_prompt()})
            ).is_success


async def test_drop_ws_mid_job_closes_sockets_once_and_the_job_completes() -> None:
    knobs = SimulatorKnobs(step_seconds=0.02, drop_ws_mid_job=True)
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs) as running:
            client_id = str(uuid.uuid4())
            async with recorder(running.ws_url(client_id)) as rec:
                body = {"prompt": txt2img_prompt(steps=5), "client_id": client_id}
                prompt_id = (await running.post_prompt(body))["prompt_id"]
                closed = await rec.wait_closed()
                assert closed.reason is not None and closed.reason.code == 1011
                assert running.sim.knobs.drop_ws_mid_job == 0
                async with recorder(running.ws_url(client_id)) as again:
                    await running.sim.wait_idle()
                    await again.wait_type("executing", node=None, prompt_id=prompt_id)
                    entry = (await running.http.get(f"/history/{prompt_id}")).json()[prompt_id]
                    assert status_of(entry) == ("success", True, "execution_success")
                    second = await running.run_prompt({**body, "prompt": txt2img_prompt(seed=9)})
                    await again.wait_type("executing", node=None, prompt_id=second)
                    assert again.closed is None
    assert [t["type"] for t in rec.texts()][-1] in ("progress", "progress_state")


async def test_hang_until_interrupted_then_next_job_runs() -> None:
    with trio.fail_after(10):
        async with running_simulator(knobs=SimulatorKnobs(hang=True)) as running:
            client_id = str(uuid.uuid4())
            async with recorder(running.ws_url(client_id)) as rec:
                body = {"prompt": txt2img_prompt(steps=5), "client_id": client_id}
                prompt_id = (await running.post_prompt(body))["prompt_id"]
                await rec.wait_type("progress", value=1, prompt_id=prompt_id)
                with trio.move_on_after(0.3):
                    await running.sim.wait_idle()
                    pytest.fail("a hung job finished")
                assert [f for f in rec.texts() if f["type"] == "progress"][-1]["data"]["value"] == 1
                # reconnecting during the job: ComfyUI repeats the executing node
                async with recorder(running.ws_url(client_id)) as again:
                    await again.wait_type("executing", node="3")
                await running.http.post("/interrupt")
                await rec.wait_type("execution_interrupted", prompt_id=prompt_id, node_id="3")
                await rec.wait_type("executing", node=None, prompt_id=prompt_id)
                second = await running.run_prompt({**body, "prompt": txt2img_prompt(seed=5)})
    history = running.sim.history
    assert status_of(history[prompt_id]) == ("error", False, "execution_interrupted")
    assert status_of(history[second]) == ("success", True, "execution_success")
    assert [e.status for e in running.sim.executions] == ["interrupted", "success"]


async def test_execution_error_fault_fails_one_job() -> None:
    with trio.fail_after(10):
        async with running_simulator(knobs=SimulatorKnobs(execution_error=1)) as running:
            client_id = str(uuid.uuid4())
            async with recorder(running.ws_url(client_id)) as rec:
                body = {"prompt": txt2img_prompt(), "client_id": client_id}
                failed = await running.run_prompt(body)
                index = await rec.wait_type("execution_error", prompt_id=failed)
                ok = await running.run_prompt({**body, "prompt": txt2img_prompt(seed=2)})
    error = rec.frames[index]
    assert isinstance(error, dict)
    assert error["data"]["node_type"] == "KSampler"
    assert status_of(running.sim.history[failed]) == ("error", False, "execution_error")
    assert status_of(running.sim.history[ok]) == ("success", True, "execution_success")
    assert [e.status for e in running.sim.executions] == ["error", "success"]


async def test_corrupt_image_fault() -> None:
    with trio.fail_after(5):
        async with running_simulator(knobs=SimulatorKnobs(corrupt_image=True)) as running:
            prompt_id = await running.run_prompt({"prompt": emptyimage_prompt()})
            (bad,) = await images_of(running, prompt_id, node="2")
            assert bad.startswith(b"\x89PNG")
            with pytest.raises(Exception):  # noqa: B017 - Pillow raises several kinds
                Image.open(io.BytesIO(bad)).load()
            running.sim.knobs.corrupt_image = False
            (good,) = await images_of(running, prompt_id, node="2")
            assert size_of(good) == (64, 64)


async def test_image_sizes_follow_the_latent_and_batches_differ() -> None:
    with trio.fail_after(10):
        async with running_simulator() as running:
            sdxl = await running.run_prompt(
                {"prompt": txt2img_prompt(width=96, height=64, batch=3)}
            )
            lumina = txt2img_prompt(
                ckpt="lumina_2.safetensors", latent="EmptySD3LatentImage", width=128, height=64
            )
            lumina["10"] = {
                "class_type": "ModelSamplingAuraFlow",
                "inputs": {"model": ["4", 0], "shift": 6.0},
            }
            lumina["3"]["inputs"]["model"] = ["10", 0]
            sd3 = await running.run_prompt({"prompt": lumina})
            plain = await running.run_prompt({"prompt": emptyimage_prompt(40, 30, batch=2)})
            other_text = await running.run_prompt(
                {"prompt": txt2img_prompt(width=96, height=64, batch=1, text="a dog")}
            )
            sdxl_images = await images_of(running, sdxl)
            assert [size_of(i) for i in sdxl_images] == [(96, 64)] * 3
            assert len(set(sdxl_images)) == 3
            assert [size_of(i) for i in await images_of(running, sd3)] == [(128, 64)]
            plain_images = await images_of(running, plain, node="2")
            assert [size_of(i) for i in plain_images] == [(40, 30)] * 2
            assert plain_images[0] != plain_images[1]
            assert (await images_of(running, other_text))[0] != sdxl_images[0]


async def test_save_image_names_subfolders_and_refuses_escapes() -> None:
    with trio.fail_after(5):
        async with running_simulator() as running:
            first = await running.run_prompt({"prompt": emptyimage_prompt(prefix="pics/cat")})
            second = await running.run_prompt(
                {"prompt": emptyimage_prompt(prefix="pics/cat", color=1)}
            )
            names = [running.sim.history[p]["outputs"]["2"]["images"][0] for p in (first, second)]
            assert names == [
                {"filename": "cat_00001_.png", "subfolder": "pics", "type": "output"},
                {"filename": "cat_00002_.png", "subfolder": "pics", "type": "output"},
            ]
            escaped = await running.run_prompt({"prompt": emptyimage_prompt(prefix="../../x")})
            assert status_of(running.sim.history[escaped])[2] == "execution_error"


async def test_preview_image_is_temp() -> None:
    prompt = emptyimage_prompt()
    prompt["2"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    with trio.fail_after(5):
        async with running_simulator() as running:
            prompt_id = await running.run_prompt({"prompt": prompt})
            (image,) = running.sim.history[prompt_id]["outputs"]["2"]["images"]
            assert image["type"] == "temp"
            assert image["filename"].startswith("ComfyUI_temp_")
            assert (await running.http.get("/view", params=image)).status_code == 200


async def test_identical_resubmission_is_cached_unless_caching_is_off() -> None:
    with trio.fail_after(10):
        async with running_simulator() as running:
            body = {"prompt": txt2img_prompt()}
            first = await running.run_prompt(body)
            stored = len(running.sim.store)
            again = await running.run_prompt(body)
            history = running.sim.history
            assert history[again]["outputs"] == history[first]["outputs"]
            assert len(running.sim.store) == stored
            running.sim.knobs.caching = False
            third = await running.run_prompt(body)
            assert history[third]["outputs"] != history[first]["outputs"]
            assert len(running.sim.store) == stored + 1


async def test_queue_delete_and_clear() -> None:
    with trio.fail_after(10):
        async with running_simulator(knobs=SimulatorKnobs(hang=True)) as running:
            ids = [
                (await running.post_prompt({"prompt": emptyimage_prompt(color=i)}))["prompt_id"]
                for i in range(4)
            ]
            await running.sim.wait_running(ids[0])
            await running.http.post("/api/queue", json={"delete": [ids[2]]})
            queue = (await running.http.get("/queue")).json()
            assert [i[1] for i in queue["queue_running"]] == [ids[0]]
            assert [i[1] for i in queue["queue_pending"]] == [ids[1], ids[3]]
            assert (await running.http.get("/prompt")).json() == {
                "exec_info": {"queue_remaining": 3}
            }
            await running.http.post("/queue", json={"clear": True})
            assert (await running.http.get("/queue")).json()["queue_pending"] == []
            await running.http.post("/interrupt")
            await running.sim.wait_idle()
            assert (await running.http.get(f"/history/{ids[2]}")).json() == {}
    assert [e.prompt_id for e in running.sim.executions] == [ids[0]]


async def test_interrupt_with_and_without_prompt_id() -> None:
    with trio.fail_after(10):
        async with running_simulator(knobs=SimulatorKnobs(hang=2)) as running:
            first, second = [
                (await running.post_prompt({"prompt": emptyimage_prompt(color=i)}))["prompt_id"]
                for i in range(2)
            ]
            await running.sim.wait_running(first)
            await running.http.post("/interrupt", json={"prompt_id": second})  # not running
            await trio.sleep(0.1)
            assert running.sim.queue.running is not None
            assert running.sim.queue.running.prompt_id == first
            await running.http.post("/interrupt", json={"prompt_id": first})
            await running.sim.wait_running(second)
            await running.http.post("/interrupt")
            await running.sim.wait_idle()
            await running.http.post("/interrupt")  # idle: nothing happens
    assert [(e.prompt_id, e.status) for e in running.sim.executions] == [
        (first, "interrupted"),
        (second, "interrupted"),
    ]


async def test_front_number_partial_outputs_and_own_prompt_id() -> None:
    with trio.fail_after(5):
        async with running_simulator(knobs=SimulatorKnobs(hang=True)) as running:
            blocker = (await running.post_prompt({"prompt": emptyimage_prompt()}))["prompt_id"]
            await running.sim.wait_running(blocker)
            late = await running.post_prompt({"prompt": emptyimage_prompt(color=1)})
            front = await running.post_prompt({"prompt": emptyimage_prompt(color=2), "front": True})
            own_id = str(uuid.uuid4())
            own = await running.post_prompt(
                {"prompt": emptyimage_prompt(color=3), "prompt_id": own_id}
            )
            assert own["prompt_id"] == own_id
            assert front["number"] == -2
            pending = (await running.http.get("/queue")).json()["queue_pending"]
            assert [i[1] for i in pending] == [front["prompt_id"], late["prompt_id"], own_id]
            bad_output = emptyimage_prompt(color=4)
            bad_output["3"] = {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}
            bad_output["3"]["inputs"]["filename_prefix"] = "x"
            bad_output["4"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "y"}}
            partial = await running.post_prompt({"prompt": bad_output})
            assert list(partial["node_errors"]) == ["4"]
            assert running.sim.queue.pending[-1].outputs == ["2", "3"]
            await running.http.post("/interrupt")


async def test_executions_record_idle_gaps() -> None:
    with trio.fail_after(5):
        async with running_simulator() as running:
            await running.run_prompt({"prompt": emptyimage_prompt(color=1)})
            await trio.sleep(0.1)
            await running.run_prompt({"prompt": emptyimage_prompt(color=2)})
    first, second = running.sim.executions
    assert first.started <= first.finished < second.started <= second.finished
    assert second.started - first.finished >= 0.1
    assert first.started_wall <= first.finished_wall
    assert (first.status, second.status) == ("success", "success")


async def test_stop_and_restart_on_the_same_port_keeps_state() -> None:
    sim = Simulator(SimulatorKnobs(step_seconds=0.001))
    stop = trio.Event()
    stopped = trio.Event()

    async def serve_until_stopped(*, task_status: trio.TaskStatus[int]) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started(await nursery.start(sim.serve))
            await stop.wait()
            nursery.cancel_scope.cancel()
        stopped.set()

    with trio.fail_after(15):
        async with trio.open_nursery() as outer, httpx.AsyncClient() as http:
            port = await outer.start(serve_until_stopped)
            base = f"http://127.0.0.1:{port}"
            prompt_id = await http.post(f"{base}/prompt", json={"prompt": emptyimage_prompt()})
            prompt_id = prompt_id.json()["prompt_id"]
            await sim.wait_idle()
            async with recorder(f"ws://127.0.0.1:{port}/ws?clientId=watcher") as rec:
                stop.set()
                closed = await rec.wait_closed()
            await stopped.wait()
            assert closed.reason is not None and closed.reason.code == 1001
            with pytest.raises(httpx.ConnectError):
                await http.get(f"{base}/prompt")
            # ComfyUI is "back": same port, state kept
            assert await outer.start(partial(sim.serve, port=port)) == port
            entry = (await http.get(f"{base}/history/{prompt_id}")).json()
            assert status_of(entry[prompt_id]) == ("success", True, "execution_success")
            second = await http.post(f"{base}/prompt", json={"prompt": emptyimage_prompt(color=5)})
            assert second.status_code == 200
            await sim.wait_idle()
            outer.cancel_scope.cancel()
    assert len(sim.executions) == 2


async def test_main_module_serves() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "fategen.simulator",
        "--port",
        str(port),
        "--step-seconds",
        "0",
    ]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery, httpx.AsyncClient() as http:
            nursery.start_soon(
                partial(trio.run_process, command, check=False, stderr=subprocess.DEVNULL)
            )
            while True:
                try:
                    response = await http.get(f"http://127.0.0.1:{port}/system_stats")
                    break
                except httpx.ConnectError:
                    await trio.sleep(0.05)
            assert response.json()["system"]["comfyui_version"] == "0.33.0"
            nursery.cancel_scope.cancel()
