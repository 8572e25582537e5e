"""ComfySession: recorded WebSocket traces replayed by a small fake over a real socket.

The fake serves the WebSocket on 127.0.0.1:0 with trio-websocket and answers REST through
``httpx.MockTransport``; it replays the ``ws-messages-*.json`` recordings with our prompt id.
Tests against the full simulator come after.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from conftest import free_port
from fategen.comfy.session import ComfySession, ImageRef
from fategen.errors import ComfyError, ComfyUnavailable, ImageError, JobTimeout

PROTOCOL = Path("/work/shared/comfyui-protocol")
PNG = (PROTOCOL / "emptyimage-64x64-red.png").read_bytes()


def trace(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((PROTOCOL / f"ws-messages-{name}.json").read_text())
    return data


def script(name: str, prompt_id: str) -> list[dict[str, Any]]:
    """The recorded frames after the prompt was posted, re-addressed to ``prompt_id``."""
    recorded = trace(name)
    old = recorded["prompt_response"]["prompt_id"]
    frames = [
        m["data"]
        for m in recorded["messages"]
        if m["kind"] == "text" and m.get("direction") != "client->server"
    ][1:]  # the first frame is the greeting status with our sid
    text = json.dumps(frames).replace(old, prompt_id)
    result: list[dict[str, Any]] = json.loads(text)
    return result


def history_entry(name: str, prompt_id: str) -> dict[str, Any]:
    recorded = trace(name)
    old = recorded["prompt_response"]["prompt_id"]
    entry = recorded["history_after"][old]
    result: dict[str, Any] = json.loads(json.dumps(entry).replace(old, prompt_id))
    return result


def success_entry(prompt_id: str, count: int) -> dict[str, Any]:
    images = [
        {"filename": f"fake_{i:05}_.png", "subfolder": "", "type": "output"} for i in range(count)
    ]
    return {
        "prompt": [0, prompt_id, {}, {}, ["2"]],
        "outputs": {"2": {"images": images}},
        "status": {"status_str": "success", "completed": True, "messages": []},
        "meta": {},
    }


class FakeComfy:
    """A WebSocket server plus a MockTransport handler; the test drives what they say."""

    def __init__(self) -> None:
        self.sockets: list[trio_websocket.WebSocketConnection] = []
        self.requests: list[tuple[str, str, Any]] = []
        self.history: dict[str, dict[str, Any]] = {}
        self.history_misses = 0  # answer {} this many times before the entry
        self.running: set[str] = set()
        self.pending: set[str] = set()
        self.on_prompt: Callable[[dict[str, Any]], httpx.Response | None] | None = None
        self.scripts: dict[str, list[dict[str, Any]]] = {}
        self.nursery: trio.Nursery | None = None
        self.port = 0
        self.connected = trio.Event()

    # --- WebSocket ---

    async def _ws(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        client_id = request.path.split("clientId=", 1)[-1]
        self.sockets.append(ws)
        self.connected.set()
        greeting = {"status": {"exec_info": {"queue_remaining": 0}}, "sid": client_id}
        try:
            await ws.send_message(json.dumps({"type": "status", "data": greeting}))
            await ws.send_message(b"\x00\x00\x00\x01\x00\x00\x00\x02" + PNG)  # a preview
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            if ws in self.sockets:
                self.sockets.remove(ws)

    async def send(self, frame: dict[str, Any]) -> None:
        for ws in list(self.sockets):
            try:
                await ws.send_message(json.dumps(frame))
            except trio_websocket.ConnectionClosed:
                pass

    async def play(self, frames: list[dict[str, Any]], *, gap: float = 0.001) -> None:
        for frame in frames:
            await trio.sleep(gap)
            await self.send(frame)

    async def drop(self) -> None:
        self.connected = trio.Event()
        for ws in list(self.sockets):
            await ws.aclose()

    # --- REST ---

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body: Any = json.loads(request.content) if request.content else None
        self.requests.append((request.method, path, body))
        if path == "/prompt" and request.method == "POST":
            answer = self.on_prompt(body) if self.on_prompt else None
            if answer is not None:
                return answer
            pid = body["prompt_id"]
            frames = self.scripts.get(pid)
            if frames is not None and self.nursery is not None:
                self.nursery.start_soon(self.play, frames)
            return httpx.Response(200, json={"prompt_id": pid, "number": 1, "node_errors": {}})
        if path.startswith("/history/"):
            pid = path.rsplit("/", 1)[1]
            if pid in self.history and self.history_misses > 0:
                self.history_misses -= 1
                return httpx.Response(200, json={})
            entry = self.history.get(pid)
            return httpx.Response(200, json={pid: entry} if entry else {})
        if path == "/queue" and request.method == "GET":
            return httpx.Response(
                200,
                json={
                    "queue_running": [[1, p, {}, {}, []] for p in self.running],
                    "queue_pending": [[2, p, {}, {}, []] for p in self.pending],
                },
            )
        if path in ("/queue", "/interrupt", "/free"):
            return httpx.Response(200)
        if path == "/view":
            if request.url.params["filename"].startswith("missing"):
                return httpx.Response(404)
            return httpx.Response(200, content=PNG, headers={"Content-Type": "image/png"})
        if path == "/object_info":
            return httpx.Response(200, json={"EmptyImage": {}, "SaveImage": {}, "KSampler": {}})
        if path == "/models/checkpoints":
            return httpx.Response(200, json=["tiny-sd15-random.safetensors"])
        return httpx.Response(404)

    def posted(self, path: str) -> list[Any]:
        return [body for method, p, body in self.requests if p == path and method == "POST"]


@asynccontextmanager
async def open_fake(
    *, stall_timeout: float = 5, job_timeout: float = 20, start_server: bool = True, **kw: Any
) -> AsyncIterator[tuple[FakeComfy, ComfySession, trio.Nursery]]:
    fake = FakeComfy()
    async with trio.open_nursery() as nursery:
        fake.nursery = nursery
        if start_server:
            server = await nursery.start(
                trio_websocket.serve_websocket, fake._ws, "127.0.0.1", 0, None
            )
            fake.port = server.port
        else:
            fake.port = free_port()
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake.handle)) as http:
            session = ComfySession(
                f"http://127.0.0.1:{fake.port}",
                http=http,
                stall_timeout=stall_timeout,
                job_timeout=job_timeout,
                connect_timeout=2,
                backoff_initial=0.02,
                backoff_max=0.1,
                **kw,
            )
            await nursery.start(session.run)
            yield fake, session, nursery
        nursery.cancel_scope.cancel()


def new_id() -> str:
    return str(uuid.uuid4())


EMPTY_WORKFLOW: dict[str, Any] = trace("emptyimage")["prompt_request"]["prompt"]


async def test_success_batch2_from_executed_without_history() -> None:
    """The ``executed`` message names the images: no GET /history for them."""
    with trio.fail_after(5):
        async with open_fake() as (fake, session, _):
            pid = new_id()
            fake.scripts[pid] = script("emptyimage-batch2", pid)
            await session.submit(EMPTY_WORKFLOW, prompt_id=pid)
            refs = await session.follow(pid)
            assert refs == [
                ImageRef("proto_emptyimage_00002_.png", "", "output"),
                ImageRef("proto_emptyimage_00003_.png", "", "output"),
            ]
            assert not [r for r in fake.requests if r[1].startswith("/history")]
            # The same for a prompt ComfyUI had cached whole (``executed`` repeated).
            pid = new_id()
            fake.scripts[pid] = script("emptyimage-batch2-resubmitted-cached", pid)
            await session.submit(EMPTY_WORKFLOW, prompt_id=pid)
            assert len(await session.follow(pid)) == 2
            assert not [r for r in fake.requests if r[1].startswith("/history")]


async def test_two_output_nodes_take_the_images_from_history() -> None:
    """With images from more than one node, /history says which and in what order."""
    with trio.fail_after(5):
        async with open_fake() as (fake, session, _):
            pid = new_id()
            frames = script("emptyimage", pid)
            executed = next(f for f in frames if f["type"] == "executed")
            preview = json.loads(json.dumps(executed))
            preview["data"]["node"] = preview["data"]["display_node"] = "3"
            preview["data"]["output"]["images"][0]["type"] = "temp"
            frames.insert(frames.index(executed), preview)
            fake.scripts[pid] = frames
            fake.history[pid] = success_entry(pid, 2)
            await session.submit(EMPTY_WORKFLOW, prompt_id=pid)
            refs = await session.follow(pid)
            assert refs == [ImageRef("fake_00000_.png"), ImageRef("fake_00001_.png")]
            assert [r[1] for r in fake.requests if r[1].startswith("/history")] == [
                f"/history/{pid}"
            ]


async def test_success_batch2_with_history_race() -> None:
    """Without an ``executed`` message the images come from /history, retried while ComfyUI
    has not stored the entry yet."""
    with trio.fail_after(5):
        async with open_fake() as (fake, session, _):
            await session.wait_available()
            assert session.available and session.last_error is None
            pid = new_id()
            frames = script("emptyimage-batch2", pid)
            fake.scripts[pid] = [f for f in frames if f["type"] != "executed"]
            fake.history[pid] = success_entry(pid, 2)
            fake.history_misses = 2  # execution_success comes before the entry is stored
            images = await session.run_prompt(EMPTY_WORKFLOW, prompt_id=pid)
            assert images == [PNG, PNG]
            posted = fake.posted("/prompt")
            assert posted == [
                {"prompt": EMPTY_WORKFLOW, "client_id": session.client_id, "prompt_id": pid}
            ]
            views = [r for r in fake.requests if r[1] == "/view"]
            assert len(views) == 2
            assert session.statistics().tracked_prompts == 0
            assert session.statistics().queue_remaining == 0


async def test_progress_callback_gets_each_step() -> None:
    with trio.fail_after(5):
        async with open_fake() as (fake, session, _):
            pid = new_id()
            fake.scripts[pid] = script("ksampler-tiny-cold", pid)
            fake.history[pid] = history_entry("ksampler-tiny-cold", pid)
            seen: list[tuple[int, int]] = []
            await session.submit(EMPTY_WORKFLOW, prompt_id=pid)
            refs = await session.follow(pid, lambda v, m: seen.append((v, m)))
            assert seen == [(1, 2), (2, 2)]
            assert refs == [ImageRef("proto_tiny_00006_.png", "", "output")]


async def test_progress_callback_that_raises_is_logged_and_the_job_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(5):
        async with open_fake() as (fake, session, _):
            pid = new_id()
            fake.scripts[pid] = script("ksampler-tiny-cold", pid)
            calls: list[int] = []

            def broken(value: int, maximum: int) -> None:
                calls.append(value)
                raise RuntimeError("bug")

            await session.submit(EMPTY_WORKFLOW, prompt_id=pid)
            refs = await session.follow(pid, broken)
            assert refs == [ImageRef("proto_tiny_00006_.png", "", "output")]
            assert calls == [1]  # reports stop after the failure
            assert "the progress callback failed" in caplog.text
            assert session.statistics().connections == 1  # the reader went on


async def test_progress_before_follow_is_delivered_first() -> None:
    with trio.fail_after(5):
        async with open_fake() as (fake, session, _):
            pid = new_id()
            frames = script("ksampler-tiny-cold", pid)
            end = next(i for i, f in enumerate(frames) if f["type"] == "executed")
            fake.scripts[pid] = frames[:end]
            await session.submit(EMPTY_WORKFLOW, prompt_id=pid)
            await trio.sleep(0.3)  # both steps arrive before anyone follows
            seen: list[tuple[int, int]] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fake.play, frames[end:])
                await session.follow(pid, lambda v, m: seen.append((v, m)))
            assert seen == [(1, 2), (2, 2)]


async def test_progress_state_alone_holds_the_stall_clock() -> None:
    """Signs of life keep a prompt from stalling without waking its follower each time."""
    with trio.fail_after(5):
        async with open_fake(stall_timeout=0.3) as (fake, session, nursery):
            pid = new_id()
            frames = script("emptyimage", pid)
            state = {"type": "progress_state", "data": {"prompt_id": pid, "nodes": {}}}

            async def play() -> None:
                await fake.play(frames[:3])
                for _ in range(8):  # 0.8 s of progress_state only, well past 0.3 s
                    await trio.sleep(0.1)
                    await fake.send(state)
                await fake.play(frames[3:])

            await session.submit(EMPTY_WORKFLOW, prompt_id=pid)
            start = trio.current_time()
            nursery.start_soon(play)
            assert len(await session.follow(pid)) == 1
            assert trio.current_time() - start >= 0.8


async def test_execution_error_names_the_node() -> None:
    with trio.fail_after(5):
        async with open_fake() as (fake, session, _):
            pid = new_id()
            fake.scripts[pid] = script("execution-error", pid)
            workflow = trace("execution-error")["prompt_request"]["prompt"]
            workflow["2"]["_meta"] = {"title": "save"}
            with pytest.raises(ComfyError) as caught:
                await session.run_prompt(workflow, prompt_id=pid)
            assert str(caught.value).startswith(
                'ComfyUI failed in node "save" (SaveImage): ERROR: Saving image outside'
            )


async def test_interrupted_by_someone_else() -> None:
    with trio.fail_after(5):
        async with open_fake() as (fake, session, _):
            pid = new_id()
            frames = [
                {"type": "execution_start", "data": {"prompt_id": pid, "timestamp": 1}},
                {"type": "executing", "data": {"node": "1", "display_node": "1", "prompt_id": pid}},
                {
                    "type": "execution_interrupted",
                    "data": {
                        "prompt_id": pid,
                        "node_id": "1",
                        "node_type": "EmptyImage",
                        "executed": [],
                        "timestamp": 2,
                    },
                },
                {"type": "executing", "data": {"node": None, "prompt_id": pid}},
            ]
            fake.scripts[pid] = frames
            with pytest.raises(ComfyError, match=r"^the job was interrupted on ComfyUI$"):
                await session.run_prompt(EMPTY_WORKFLOW, prompt_id=pid)


async def test_refused_prompt_is_one_sentence_and_not_tracked() -> None:
    recorded = json.loads((PROTOCOL / "errors-validation.json").read_text())["ckpt_not_in_list"]
    with trio.fail_after(5):
        async with open_fake() as (fake, session, _):
            fake.on_prompt = lambda body: httpx.Response(400, json=recorded["body"])
            with pytest.raises(
                ComfyError,
                match=r'^checkpoint "does-not-exist.safetensors" is not installed on ComfyUI$',
            ):
                await session.submit(recorded["request_json"]["prompt"], prompt_id=new_id())
            fake.on_prompt = lambda body: httpx.Response(500, text="oops")
            with pytest.raises(ComfyError, match=r"^ComfyUI answered 500 to the prompt$"):
                await session.submit(EMPTY_WORKFLOW, prompt_id=new_id())
            assert session.statistics().tracked_prompts == 0


async def test_stall_interrupts_and_deletes_then_keeps_serving() -> None:
    with trio.fail_after(5):
        async with open_fake(stall_timeout=0.3) as (fake, session, _):
            pid = new_id()
            start = trio.current_time()
            with pytest.raises(JobTimeout, match=r"reported nothing about the job for 0.3 s"):
                await session.run_prompt(EMPTY_WORKFLOW, prompt_id=pid)
            assert 0.3 <= trio.current_time() - start < 1.5
            assert fake.posted("/queue") == [{"delete": [pid]}]
            assert fake.posted("/interrupt") == [{"prompt_id": pid}]
            # The session still works.
            pid2 = new_id()
            fake.scripts[pid2] = script("emptyimage", pid2)
            fake.history[pid2] = success_entry(pid2, 1)
            assert await session.run_prompt(EMPTY_WORKFLOW, prompt_id=pid2) == [PNG]


async def test_job_timeout() -> None:
    with trio.fail_after(5):
        async with open_fake(stall_timeout=5, job_timeout=0.5) as (fake, session, nursery):
            pid = new_id()

            async def keep_alive() -> None:  # progress forever: no stall, but too long
                while True:
                    await trio.sleep(0.05)
                    await fake.send(
                        {
                            "type": "progress",
                            "data": {"value": 1, "max": 9, "prompt_id": pid, "node": "3"},
                        }
                    )

            nursery.start_soon(keep_alive)
            with pytest.raises(JobTimeout, match=r"ran longer than 0.5 s on ComfyUI"):
                await session.run_prompt(EMPTY_WORKFLOW, prompt_id=pid)
            assert fake.posted("/interrupt") == [{"prompt_id": pid}]


async def test_drop_mid_job_then_found_in_history() -> None:
    with trio.fail_after(5):
        async with open_fake() as (fake, session, _):
            pid = new_id()
            frames = script("emptyimage", pid)
            fake.scripts[pid] = frames[:4]  # up to the first executing, then the socket drops
            await session.submit(EMPTY_WORKFLOW, prompt_id=pid)
            result: list[list[ImageRef]] = []

            async def follow() -> None:
                result.append(await session.follow(pid))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                await trio.sleep(0.05)
                fake.history[pid] = success_entry(pid, 1)  # it ends while we are away
                await fake.drop()
            assert result == [[ImageRef("fake_00000_.png")]]
            assert session.statistics().connections == 2


async def test_drop_mid_job_still_running_then_finishes() -> None:
    with trio.fail_after(5):
        async with open_fake() as (fake, session, _):
            pid = new_id()
            frames = script("emptyimage", pid)
            fake.scripts[pid] = frames[:4]
            fake.running.add(pid)
            await session.submit(EMPTY_WORKFLOW, prompt_id=pid)
            result: list[list[ImageRef]] = []

            async def follow() -> None:
                result.append(await session.follow(pid))

            async with trio.open_nursery() as inner:
                inner.start_soon(follow)
                await trio.sleep(0.05)
                await fake.drop()
                await fake.connected.wait()
                await trio.sleep(0.05)
                assert not result
                fake.history[pid] = success_entry(pid, 1)
                await fake.play(frames[4:])
            assert result == [[ImageRef("fake_00000_.png")]]
            assert any(r[1] == "/queue" and r[0] == "GET" for r in fake.requests)


async def test_drop_mid_job_and_the_job_is_lost() -> None:
    with trio.fail_after(5):
        async with open_fake() as (fake, session, nursery):
            pid = new_id()
            fake.scripts[pid] = script("emptyimage", pid)[:4]
            await session.submit(EMPTY_WORKFLOW, prompt_id=pid)
            nursery.start_soon(fake.drop)
            with pytest.raises(ComfyUnavailable, match=r"^ComfyUI lost the job"):
                await session.follow(pid)


async def test_down_at_start_then_up() -> None:
    with trio.fail_after(5):
        async with open_fake(start_server=False) as (fake, session, nursery):
            await trio.sleep(0.3)
            assert not session.available
            assert session.last_error is not None
            assert session.last_error.startswith(f"cannot connect to ComfyUI at {session.base_url}")
            server = await nursery.start(
                trio_websocket.serve_websocket, fake._ws, "127.0.0.1", fake.port, None
            )
            assert server.port == fake.port
            await session.wait_available()  # backoff is capped at 0.1 s here
            assert session.statistics().available
            assert session.statistics().last_error is None


async def test_submit_waits_for_comfyui() -> None:
    with trio.fail_after(5):
        async with open_fake(start_server=False) as (fake, session, _):
            with trio.move_on_after(0.2) as scope:
                await session.submit(EMPTY_WORKFLOW, prompt_id=new_id())
            assert scope.cancelled_caught
            assert fake.posted("/prompt") == []


async def test_cancel_pending_prompt() -> None:
    with trio.fail_after(5):
        async with open_fake() as (fake, session, nursery):
            pid = new_id()
            fake.pending.add(pid)
            await session.submit(EMPTY_WORKFLOW, prompt_id=pid)

            async def cancel_soon() -> None:
                await trio.sleep(0.05)
                await session.cancel(pid)

            nursery.start_soon(cancel_soon)
            with pytest.raises(ComfyError, match=r"^the job was cancelled$"):
                await session.follow(pid)
            assert fake.posted("/queue") == [{"delete": [pid]}]
            assert fake.posted("/interrupt") == [{"prompt_id": pid}]


async def test_cancelling_run_prompt_stops_the_prompt() -> None:
    with trio.fail_after(5):
        async with open_fake() as (fake, session, _):
            pid = new_id()
            with trio.move_on_after(0.1):
                await session.run_prompt(EMPTY_WORKFLOW, prompt_id=pid)
            assert fake.posted("/queue") == [{"delete": [pid]}]
            assert fake.posted("/interrupt") == [{"prompt_id": pid}]
            assert session.statistics().tracked_prompts == 0


async def test_follow_an_unknown_prompt_asks_history_first() -> None:
    with trio.fail_after(5):
        async with open_fake() as (fake, session, _):
            pid = new_id()
            fake.history[pid] = history_entry("execution-error", pid)
            with pytest.raises(ComfyError, match=r"^ComfyUI failed in node 2 .SaveImage.: ERROR"):
                await session.follow(pid)
            assert await session.lookup(pid) == "done"
            other = new_id()
            assert await session.lookup(other) == "unknown"
            fake.pending.add(other)
            assert await session.lookup(other) == "queued"


async def test_fetch_from_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(b"local")
    (tmp_path.parent / "secret.png").write_bytes(b"secret")
    with trio.fail_after(5):
        async with open_fake(folder_path=tmp_path) as (fake, session, _):
            assert await session.fetch_images([ImageRef("a.png", "sub")]) == [b"local"]
            assert fake.requests == []
            # not in the folder: through /view; temp images always through /view
            got = await session.fetch_images([ImageRef("b.png"), ImageRef("a.png", "sub", "temp")])
            assert got == [PNG, PNG]
            with pytest.raises(ComfyError, match=r"outside its output folder"):
                await session.fetch_images([ImageRef("../secret.png")])
            with pytest.raises(ComfyError, match=r"outside its output folder"):
                await session.fetch_images([ImageRef(str(tmp_path.parent / "secret.png"))])
            with pytest.raises(ImageError, match=r'ComfyUI has no image "missing.png"'):
                await session.fetch_images([ImageRef("missing.png", "", "temp")])


async def test_check_setup_warnings() -> None:
    with trio.fail_after(5):
        async with open_fake() as (_, session, _):
            warnings = await session.check_setup(
                {"sdxl": {"KSampler", "SaveImage"}, "odd": {"NoSuchNode", "EmptyImage"}},
                {"tiny": "tiny-sd15-random.safetensors", "big": "big.safetensors"},
            )
            assert warnings == [
                'workflow template "odd" uses node type "NoSuchNode", which ComfyUI does not '
                "have (a custom node may be missing)",
                'model "big": checkpoint "big.safetensors" is not installed on ComfyUI',
            ]


async def test_free_posts_the_flags() -> None:
    with trio.fail_after(5):
        async with open_fake() as (fake, session, _):
            await session.free()
            await session.free(unload_models=True, free_memory=True)
            assert fake.posted("/free") == [
                {"unload_models": True, "free_memory": False},
                {"unload_models": True, "free_memory": True},
            ]


async def test_open_owns_its_client() -> None:
    with trio.fail_after(5):
        async with ComfySession.open(f"http://127.0.0.1:{free_port()}") as session:
            with pytest.raises(ComfyUnavailable, match=r"cannot reach ComfyUI"):
                await session.free()
    assert session.ws_url.startswith("ws://127.0.0.1:")
    assert session.ws_url.endswith(f"/ws?clientId={session.client_id}")


# --- against the simulator, over real sockets ---------------------------------------------------

from fategen.simulator import Simulator, SimulatorKnobs  # noqa: E402

KSAMPLER: dict[str, Any] = json.loads((PROTOCOL / "workflow-ksampler-tiny.json").read_text())


def ksampler(*, steps: int = 2, seed: int = 42, batch: int = 1, size: int = 64) -> dict[str, Any]:
    workflow: dict[str, Any] = json.loads(json.dumps(KSAMPLER))
    workflow["3"]["inputs"].update(steps=steps, seed=seed)
    workflow["5"]["inputs"].update(batch_size=batch, width=size, height=size)
    workflow["3"]["_meta"] = {"title": "sampler"}
    return workflow


@asynccontextmanager
async def open_sim(
    knobs: SimulatorKnobs | None = None, *, start_sim: bool = True, **kw: Any
) -> AsyncIterator[tuple[Simulator, ComfySession, trio.Nursery, int]]:
    sim = Simulator(knobs or SimulatorKnobs(step_seconds=0.01, model_load_seconds=0.05))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve) if start_sim else free_port()
        options: dict[str, Any] = {
            "connect_timeout": 2,
            "backoff_initial": 0.05,
            "backoff_max": 0.2,
            "stall_timeout": 5,
            "job_timeout": 20,
        }
        options.update(kw)
        async with ComfySession.open(f"http://127.0.0.1:{port}", **options) as session:
            await nursery.start(session.run)
            yield sim, session, nursery, port
        nursery.cancel_scope.cancel()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


async def test_sim_success_images_and_progress() -> None:
    with trio.fail_after(10):
        async with open_sim() as (sim, session, _, _):
            seen: list[tuple[int, int]] = []
            pid = new_id()
            images = await session.run_prompt(
                ksampler(steps=3, batch=2, size=96),
                prompt_id=pid,
                on_progress=lambda v, m: seen.append((v, m)),
            )
            assert len(images) == 2
            assert [png_size(i) for i in images] == [(96, 96), (96, 96)]
            assert seen == [(1, 3), (2, 3), (3, 3)]
            assert [(e.prompt_id, e.status) for e in sim.executions] == [(pid, "success")]
            # An EmptyImage -> SaveImage prompt needs no model.
            assert len(await session.run_prompt(EMPTY_WORKFLOW, prompt_id=new_id())) == 1


async def test_sim_execution_error() -> None:
    with trio.fail_after(10):
        async with open_sim() as (sim, session, _, _):
            sim.knobs.execution_error = 1
            with pytest.raises(ComfyError) as caught:
                await session.run_prompt(ksampler(), prompt_id=new_id())
            assert str(caught.value) == (
                'ComfyUI failed in node "sampler" (KSampler): '
                "Simulated failure (execution_error fault)"
            )
            # the next job is fine
            assert len(await session.run_prompt(ksampler(seed=2), prompt_id=new_id())) == 1


async def test_sim_refusals_are_sentences() -> None:
    with trio.fail_after(10):
        async with open_sim() as (_, session, _, _):
            workflow = ksampler()
            workflow["4"]["inputs"]["ckpt_name"] = "foo.safetensors"
            with pytest.raises(
                ComfyError, match=r'^checkpoint "foo\.safetensors" is not installed on ComfyUI$'
            ):
                await session.submit(workflow, prompt_id=new_id())
            workflow = ksampler()
            workflow["3"]["inputs"]["steps"] = 0
            with pytest.raises(ComfyError) as caught:
                await session.submit(workflow, prompt_id=new_id())
            assert str(caught.value) == (
                'node "sampler" (KSampler): input "steps" Value 0 smaller than min of 1'
            )
            workflow = ksampler()
            workflow["8"]["class_type"] = "NoSuchDecode"
            with pytest.raises(
                ComfyError,
                match=r'^ComfyUI has no node type "NoSuchDecode" \(a custom node may be missing\)$',
            ):
                await session.submit(workflow, prompt_id=new_id())
            assert session.statistics().tracked_prompts == 0


async def test_sim_http_500() -> None:
    with trio.fail_after(10):
        async with open_sim() as (sim, session, _, _):
            sim.knobs.http_500 = True
            with pytest.raises(ComfyError, match=r"^ComfyUI answered 500 to the prompt$"):
                await session.submit(ksampler(), prompt_id=new_id())
            sim.knobs.http_500 = False
            assert len(await session.run_prompt(ksampler(), prompt_id=new_id())) == 1


async def test_sim_websocket_drop_mid_job_recovers() -> None:
    with trio.fail_after(10):
        async with open_sim() as (sim, session, _, _):
            await session.wait_available()
            sim.knobs.drop_ws_mid_job = 1
            seen: list[tuple[int, int]] = []
            images = await session.run_prompt(
                ksampler(steps=20), prompt_id=new_id(), on_progress=lambda v, m: seen.append((v, m))
            )
            assert len(images) == 1
            assert session.statistics().connections == 2
            assert seen[0] == (1, 20)


async def test_sim_down_at_start_then_up() -> None:
    with trio.fail_after(10):
        async with open_sim(start_sim=False) as (sim, session, nursery, port):
            await trio.sleep(0.5)  # attempts at 0, 0.05, 0.15, 0.35: all refused
            assert not session.available
            assert session.last_error is not None
            assert "cannot connect to ComfyUI at http://127.0.0.1" in session.last_error
            pid = new_id()
            async with trio.open_nursery() as inner:
                result: list[list[bytes]] = []

                async def run() -> None:  # waits until ComfyUI is there
                    result.append(await session.run_prompt(ksampler(), prompt_id=pid))

                inner.start_soon(run)
                await trio.sleep(0.1)
                assert not result
                await nursery.start(functools.partial(sim.serve, port=port))
            assert len(result[0]) == 1
            assert session.statistics().available
            assert session.statistics().last_error is None


async def test_sim_stall_timeout_with_hang() -> None:
    with trio.fail_after(10):
        async with open_sim(stall_timeout=0.5) as (sim, session, _, _):
            sim.knobs.hang = 1
            pid = new_id()
            start = trio.current_time()
            with pytest.raises(JobTimeout, match=r"reported nothing about the job for 0\.5 s"):
                await session.run_prompt(ksampler(steps=5), prompt_id=pid)
            assert trio.current_time() - start < 2
            await sim.wait_idle()
            assert [(e.prompt_id, e.status) for e in sim.executions] == [(pid, "interrupted")]
            # the session keeps serving
            assert len(await session.run_prompt(ksampler(seed=3), prompt_id=new_id())) == 1


async def test_sim_cancel_running_and_queued() -> None:
    with trio.fail_after(10):
        async with open_sim() as (sim, session, _, _):
            first, second = new_id(), new_id()
            await session.submit(ksampler(steps=200, seed=1), prompt_id=first)
            await session.submit(ksampler(steps=200, seed=2), prompt_id=second)
            assert await session.lookup(second) == "queued"
            started = trio.Event()
            errors: list[str] = []

            async def follow(pid: str) -> None:
                def progress(value: int, maximum: int) -> None:
                    started.set()

                try:
                    await session.follow(pid, progress)
                except ComfyError as exc:
                    errors.append(f"{pid}: {exc}")

            async with trio.open_nursery() as inner:
                inner.start_soon(follow, first)
                inner.start_soon(follow, second)
                await started.wait()
                await session.cancel(second)  # queued: deleted from the queue
                assert await session.lookup(second) == "unknown"
                await session.cancel(first)  # running: interrupted
            assert sorted(errors) == sorted(
                [f"{first}: the job was cancelled", f"{second}: the job was cancelled"]
            )
            await sim.wait_idle()
            assert [(e.prompt_id, e.status) for e in sim.executions] == [(first, "interrupted")]
            assert second not in sim.history


async def test_sim_interrupt_from_elsewhere() -> None:
    with trio.fail_after(10):
        async with open_sim() as (sim, session, _, _):
            pid = new_id()

            def progress(value: int, maximum: int) -> None:
                if value == 2:
                    sim.engine.interrupt(pid)  # as if someone pressed Cancel in ComfyUI's UI

            with pytest.raises(ComfyError, match=r"^the job was interrupted on ComfyUI$"):
                await session.run_prompt(ksampler(steps=50), prompt_id=pid, on_progress=progress)


async def serve_stoppable(
    sim: Simulator,
    port: int,
    stopped: trio.Event,
    *,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``sim`` on ``port`` until the scope handed back is cancelled; then set ``stopped``."""
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(sim.serve, port=port))
                task_status.started(scope)
    finally:
        stopped.set()


async def test_sim_restart_mid_job_loses_it() -> None:
    with trio.fail_after(10):
        async with open_sim(start_sim=False) as (sim, session, nursery, port):
            stopped = trio.Event()
            first: trio.CancelScope = await nursery.start(serve_stoppable, sim, port, stopped)
            pid = new_id()

            async def restart() -> None:
                await stopped.wait()
                await nursery.start(serve_stoppable, sim, port, trio.Event())

            def progress(value: int, maximum: int) -> None:
                if value == 2:
                    first.cancel()  # ComfyUI stops while the prompt runs, then starts again
                    nursery.start_soon(restart)

            with pytest.raises(ComfyUnavailable, match=r"^ComfyUI lost the job"):
                await session.run_prompt(ksampler(steps=50), prompt_id=pid, on_progress=progress)
            assert [(e.prompt_id, e.status) for e in sim.executions] == [(pid, "interrupted")]
            # the same prompt id can be submitted again
            assert len(await session.run_prompt(ksampler(steps=3), prompt_id=pid)) == 1


async def test_sim_free_and_check_setup() -> None:
    with trio.fail_after(10):
        async with open_sim() as (sim, session, _, _):
            await session.free()
            await session.free(unload_models=True, free_memory=True)
            assert sim.free_requests == [
                {"unload_models": True, "free_memory": False},
                {"unload_models": True, "free_memory": True},
            ]
            warnings = await session.check_setup(
                {"tiny": {"KSampler", "SaveImage", "CheckpointLoaderSimple"}, "x": {"Nope"}},
                {"tiny": "tiny-sd15-random.safetensors", "gone": "gone.safetensors"},
            )
            assert warnings == [
                'workflow template "x" uses node type "Nope", which ComfyUI does not have '
                "(a custom node may be missing)",
                'model "gone": checkpoint "gone.safetensors" is not installed on ComfyUI',
            ]
