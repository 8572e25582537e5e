"""Shared fixtures: the simulator and the service on ephemeral ports, on 127.0.0.1."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from PIL import Image

from fategen.service import Running, run_service
from fategen.settings import Settings
from fategen.simulator import Simulator, SimulatorKnobs

ROOT = Path(__file__).resolve().parent.parent

#: The browser tests' Chromium (Debian's), and the flags that keep it off the internet.
CHROMIUM = os.environ.get("FATEGEN_TEST_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    """A port nothing listens on right now (for servers started later, or in a subprocess)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def service_env(tmp_path: Path, **env: str) -> dict[str, str]:
    """The service's environment for a test: files in ``tmp_path``, the repo's configuration."""
    base = {
        "FATEGEN_HOST": "127.0.0.1",
        "FATEGEN_PORT": "0",
        "FATEGEN_OUTPUT_DIR": str(tmp_path / "output"),
        "FATEGEN_DATA_DIR": str(tmp_path / "data"),
        "FATEGEN_MODEL_CONFIG": str(ROOT / "config" / "modelConfiguration.json"),
        "FATEGEN_WORKFLOWS_DIR": str(ROOT / "workflows"),
        "FATEGEN_STALL_TIMEOUT": "5",
        "FATEGEN_SHUTDOWN_GRACE": "5",
        "FATEGEN_CONNECT_TIMEOUT": "2",
    }
    base.update(env)
    return base


def solid(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> Image.Image:
    """An image of one colour."""
    return Image.new("RGB", size, color)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


async def wait_healthy(client: httpx.AsyncClient) -> None:
    """Until a service started in another process answers /health (wrap it in a timeout)."""
    while True:
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await trio.sleep(0.1)


def make_settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env(service_env(tmp_path, **env))


class Stack:
    """A simulator and a service started against it, plus an HTTP client for the service."""

    def __init__(
        self,
        sim: Simulator,
        sim_port: int,
        running: Running,
        shutdown: trio.Event,
        client: httpx.AsyncClient,
    ) -> None:
        self.sim = sim
        self.sim_port = sim_port
        self.running = running
        self.shutdown = shutdown
        self.client = client

    @property
    def url(self) -> str:
        return self.running.url

    async def submit(self, message: str, nick: str = "alice", **kw: Any) -> dict[str, Any]:
        r = await self.client.post("/request", json={"message": message, "nick": nick}, **kw)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def wait(self, job_id: str, limit: float = 30) -> dict[str, Any]:
        r = await self.client.get(f"/wait/{job_id}", params={"timeout": limit})
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


@contextlib.asynccontextmanager
async def open_stack(
    tmp_path: Path, knobs: SimulatorKnobs | None = None, **env: str
) -> AsyncIterator[Stack]:
    sim = Simulator(knobs or SimulatorKnobs(step_seconds=0.002, model_load_seconds=0.01))
    async with trio.open_nursery() as outer:
        sim_port = await outer.start(functools.partial(sim.serve, host="127.0.0.1", port=0))
        settings = make_settings(tmp_path, COMFYUI_PORT=str(sim_port), **env)
        shutdown = trio.Event()
        async with trio.open_nursery() as inner:
            running: Running = await inner.start(run_service, settings, shutdown)
            # ComfyUI is up: tests start once fategen has checked what it has (a job sent
            # before that waits for the check, and the order tests would race it).
            with trio.move_on_after(10):
                await running.service.wait_checked()
            async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
                yield Stack(sim, sim_port, running, shutdown, client)
            shutdown.set()  # run_service stops gracefully and returns
        outer.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def open_service(
    tmp_path: Path, **env: str
) -> AsyncIterator[tuple[Running, httpx.AsyncClient]]:
    """The service alone (its ComfyUI backends named in ``env``: ``COMFYUI_PORT=...`` or
    ``COMFYUI_BACKENDS=...``), and a client for it."""
    settings = make_settings(tmp_path, **env)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(run_service, settings, shutdown)
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
            yield running, client
        shutdown.set()


async def submit(client: httpx.AsyncClient, message: str, nick: str = "alice") -> str:
    """POST /request; the new job's id (the answer must be 200)."""
    r = await client.post("/request", json={"message": message, "nick": nick})
    assert r.status_code == 200, r.text
    job_id: str = r.json()["job_id"]
    return job_id


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(tmp_path) as s:
        yield s


class ReadySession:
    """What `fategen.queue.fleet.Backend` reads of a session, for scheduler tests without
    ComfyUI: always connected, and checked."""

    available = True
    connections = 0
    state = "up"
    queue_remaining = None
    last_error = None
    label = "ComfyUI test"


def ready_backend(name: str = "test", runnable: frozenset[str] | None = None) -> Any:
    """A `Backend` that takes any job (or those of ``runnable`` models) at once."""
    from fategen.comfy.watchdog import IdleWatchdog
    from fategen.core.backends import BackendSpec
    from fategen.queue.fleet import Backend

    async def free(**_: Any) -> None:
        pass

    backend = Backend(BackendSpec(name, "http://127.0.0.1:1"), ReadySession(), IdleWatchdog(free))  # type: ignore[arg-type]
    backend.runnable = runnable
    return backend


class Receiver:
    """A webhook receiver on 127.0.0.1: records each POST; answers ``statuses`` in turn
    (then 200)."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self.arrived = trio.Event()
        self.url = ""

    @contextlib.asynccontextmanager
    async def running(self, port: int = 0) -> AsyncIterator[Receiver]:
        from hypercorn.config import Config
        from hypercorn.trio import serve
        from quart import request
        from quart_trio import QuartTrio

        app = QuartTrio(__name__)

        @app.post("/hook")
        async def hook() -> tuple[str, int]:
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.received.append((headers, await request.get_data()))
            self.arrived.set()
            self.arrived = trio.Event()
            return "", self.statuses.pop(0) if self.statuses else 200

        config = Config()
        config.bind = [f"127.0.0.1:{port}"]
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(functools.partial(serve, app, config))  # type: ignore[arg-type]
            self.url = binds[0] + "/hook"
            yield self
            nursery.cancel_scope.cancel()

    async def next(self) -> tuple[dict[str, str], Any]:
        count = len(self.received)
        with trio.fail_after(30):
            while len(self.received) <= count:
                await self.arrived.wait()
        headers, body = self.received[count]
        return headers, json.loads(body)


class ImageServer:
    """Serves ``files`` on 127.0.0.1 and records each request's path and Host header."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.seen: list[tuple[str, str]] = []
        self.base = ""
        #: ``held/<name>`` answers once this is set.
        self.release = trio.Event()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ImageServer]:
        from hypercorn.config import Config
        from hypercorn.trio import serve
        from quart import Response, request
        from quart_trio import QuartTrio

        app = QuartTrio(__name__)

        @app.get("/<path:name>")
        async def file(name: str) -> Response:
            self.seen.append((name, request.headers.get("Host", "")))
            if name.startswith("held/"):
                await self.release.wait()
                name = name.removeprefix("held/")
            if name == "away":
                return Response("", 302, {"Location": "http://10.1.2.3/cat.png"})
            data = self.files.get(name)
            if data is None:
                return Response("no", 404)
            return Response(data, 200, content_type="image/png")

        config = Config()
        config.bind = ["127.0.0.1:0"]
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(functools.partial(serve, app, config))  # type: ignore[arg-type]
            self.base = binds[0]
            yield self
            nursery.cancel_scope.cancel()
