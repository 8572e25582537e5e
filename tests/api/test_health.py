"""/health is liveness, /ready is readiness; neither shows internals to a caller without a key."""

from __future__ import annotations

import functools
from pathlib import Path

import httpx
import trio

from conftest import free_port, make_settings, open_stack
from fategen.service import Running, run_service

KEY = "user-key-0123456789abcdef"


async def test_ready_while_comfyui_answers_and_not_while_stopping(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        r = await stack.client.get("/ready")
        assert (r.status_code, r.json()) == (200, {"ready": True, "reason": None, "paused": False})
        health = (await stack.client.get("/health")).json()
        assert health["comfyui"]["url"].startswith("http://127.0.0.1:")  # keys off, loopback
        stack.running.desk.stop()
        r = await stack.client.get("/ready")
        assert (r.status_code, r.json()["reason"]) == (503, "the service is shutting down")
        assert (await stack.client.get("/health")).status_code == 200  # still alive


async def test_not_ready_without_comfyui(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, COMFYUI_PORT=str(free_port()), FATEGEN_API_KEYS=KEY)
    shutdown = trio.Event()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(
                functools.partial(run_service, settings, shutdown)
            )
            async with httpx.AsyncClient(base_url=running.url) as client:
                r = await client.get("/ready")
                assert (r.status_code, r.json()["reason"]) == (503, "ComfyUI cannot be reached")
                health = (await client.get("/health")).json()
                assert health["comfyui"] == {"reachable": False, "url": None, "error": None}
                auth = {"Authorization": f"Bearer {KEY}"}
                detailed = (await client.get("/health", headers=auth)).json()["comfyui"]
                assert detailed["url"] == settings.comfyui_url
                reason = (await client.get("/ready", headers=auth)).json()["reason"]
                assert settings.comfyui_url in reason  # the connection error, for an operator
            shutdown.set()
