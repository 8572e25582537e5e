"""``python bench/bare.py quart|asgi``: the front-end baselines, on fategen's own HTTP server.

Two endpoints that do no work of fategen's, served by `fategen.api.server.serve_http` (the same
hypercorn configuration, accept loop and timeouts as ``fategen serve``), in their own process:

- ``quart``: a bare quart-trio app whose ``POST /request`` reads the JSON body and answers a
  JSON object the size of fategen's answer (what the framework alone costs);
- ``asgi``: the same answer from a plain ASGI callable (what hypercorn alone costs).

``GET /health`` answers ``{}`` in both. Prints ``fategen is ready on URL`` once it serves (the
line `common.service` waits for); stops on SIGTERM or when stdin closes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from functools import partial
from typing import Any

import trio
from quart import request
from quart_trio import QuartTrio

from fategen.api.server import serve_http

#: As ``fategen serve`` under the benchmark (FATEGEN_WAIT_TIMEOUT_MAX=600, plus 5).
READ_TIMEOUT = 605.0


def answer(body: Any) -> dict[str, Any]:
    """An answer shaped like fategen's to ``POST /request``."""
    nick = body.get("nick", "") if isinstance(body, dict) else ""
    return {
        "job_id": str(uuid.uuid4()),
        "status": "queued",
        "queue_position": 1,
        "nick": nick,
        "model": "tiny",
        "width": 256,
        "height": 256,
        "count": 1,
        "links": {"self": "/job/x", "wait": "/wait/x", "image": "/job/x/image"},
    }


def quart_app() -> QuartTrio:
    app = QuartTrio("bare")

    @app.post("/request")
    async def submit() -> dict[str, Any]:
        return answer(await request.get_json(force=True))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {}

    return app


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["path"] == "/request" and scope["method"] == "POST":
        payload = json.dumps(answer(json.loads(body or b"{}"))).encode()
    else:
        payload = b"{}"
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def main(kind: str) -> None:
    app: Any = quart_app() if kind == "quart" else asgi_app
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, stop)
        nursery.start_soon(_stop_on_eof, stop)
        async with trio.open_nursery() as serving:
            urls = await serving.start(
                partial(serve_http, app, "127.0.0.1", 0, stop.wait, read_timeout=READ_TIMEOUT)
            )
            print(f"fategen is ready on {urls[0]}", flush=True)
        nursery.cancel_scope.cancel()


async def _stop_on_signal(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            stop.set()
            return


async def _stop_on_eof(stop: trio.Event) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    while await stdin.receive_some(100):
        pass
    stop.set()


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
