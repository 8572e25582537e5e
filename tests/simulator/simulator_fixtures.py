"""Helpers for tests that talk to the ComfyUI simulator over real sockets."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import trio_websocket

from fategen.simulator import Simulator, SimulatorKnobs

PROTOCOL_DIR = Path("/work/shared/comfyui-protocol")
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
TINY_CKPT = "tiny-sd15-random.safetensors"


@functools.cache
def _read(name: str) -> str:
    return (PROTOCOL_DIR / name).read_text(encoding="utf-8")


def recording(name: str) -> Any:
    """A recorded protocol file, parsed (a fresh copy each time)."""
    return json.loads(_read(name))


@attrs.define
class Running:
    """A simulator serving on 127.0.0.1 and an HTTP client for it."""

    sim: Simulator
    port: int
    http: httpx.AsyncClient

    def ws_url(self, client_id: str | None = None) -> str:
        query = f"?clientId={client_id}" if client_id else ""
        return f"ws://127.0.0.1:{self.port}/ws{query}"

    async def post_prompt(self, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.http.post("/prompt", json=body)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def run_prompt(self, body: dict[str, Any]) -> str:
        """Submit and wait until the simulator is idle again; the prompt id."""
        prompt_id: str = (await self.post_prompt(body))["prompt_id"]
        await self.sim.wait_idle()
        return prompt_id


@asynccontextmanager
async def running_simulator(
    sim: Simulator | None = None, knobs: SimulatorKnobs | None = None
) -> AsyncIterator[Running]:
    """Serve a simulator on a free port for the ``async with`` block."""
    sim = sim if sim is not None else Simulator(knobs or SimulatorKnobs(step_seconds=0.001))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sim.serve)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            yield Running(sim, port, http)
        nursery.cancel_scope.cancel()


Frame = dict[str, Any] | bytes


class Recorder:
    """Everything one websocket receives, with a way to wait for a frame."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.frames: list[Frame] = []
        self.closed: trio_websocket.ConnectionClosed | None = None
        self._changed = trio.Event()

    async def run(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                self.frames.append(json.loads(message) if isinstance(message, str) else message)
                self._wake()
        except trio_websocket.ConnectionClosed as closed:
            self.closed = closed
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def texts(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if isinstance(f, dict)]

    async def wait_for(self, predicate: Callable[[Frame], bool], start: int = 0) -> int:
        """Index of the first frame from ``start`` on that matches."""
        index = start
        while True:
            while index < len(self.frames):
                if predicate(self.frames[index]):
                    return index
                index += 1
            if self.closed is not None:
                raise AssertionError(f"socket closed before the frame came: {self.closed}")
            await self._changed.wait()

    async def wait_closed(self) -> trio_websocket.ConnectionClosed:
        while self.closed is None:
            await self._changed.wait()
        return self.closed

    async def wait_type(self, kind: str, start: int = 0, **data: Any) -> int:
        """Index of the first text frame of type ``kind`` whose data has the given items."""

        def match(frame: Frame) -> bool:
            if not isinstance(frame, dict) or frame.get("type") != kind:
                return False
            return all(frame["data"].get(k) == v for k, v in data.items())

        return await self.wait_for(match, start)


@asynccontextmanager
async def recorder(
    url: str,
    first_frames: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[Recorder]:
    """Open a websocket (with ``headers``), send ``first_frames``, record; waits for the
    server's first status."""
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    async with trio_websocket.open_websocket_url(
        url, extra_headers=extra, max_message_size=MAX_MESSAGE_SIZE
    ) as ws:
        for frame in first_frames or []:
            await ws.send_message(json.dumps(frame))
        rec = Recorder(ws)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rec.run)
            await rec.wait_type("status")
            yield rec
            nursery.cancel_scope.cancel()


def emptyimage_prompt(
    width: int = 64, height: int = 64, batch: int = 1, color: int = 0, prefix: str = "sim"
) -> dict[str, Any]:
    """EmptyImage -> SaveImage."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": batch, "color": color},
        },
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def txt2img_prompt(
    ckpt: str = TINY_CKPT,
    text: str = "a photo of a cat",
    steps: int = 2,
    width: int = 64,
    height: int = 64,
    batch: int = 1,
    seed: int = 1,
    prefix: str = "sim",
    latent: str = "EmptyLatentImage",
) -> dict[str, Any]:
    """CheckpointLoaderSimple -> CLIPTextEncode x2, latent -> KSampler -> VAEDecode -> SaveImage."""
    prompt = copy.deepcopy(recording("workflow-ksampler-tiny.json"))
    prompt = prompt.get("prompt", prompt)
    prompt["3"]["inputs"].update(seed=seed, steps=steps)
    prompt["4"]["inputs"]["ckpt_name"] = ckpt
    prompt["5"] = {
        "class_type": latent,
        "inputs": {"width": width, "height": height, "batch_size": batch},
    }
    prompt["6"]["inputs"]["text"] = text
    prompt["9"]["inputs"]["filename_prefix"] = prefix
    return dict(prompt)
