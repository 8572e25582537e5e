"""Serving the app: hypercorn's trio worker, and the connection class the app installs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection

#: How long the last write of a response (and hypercorn's close after it) may take.
_FINAL_SEND_SECONDS = 10.0


class ClosingHTTPConnection(TrioASGIHTTPConnection):
    """quart-trio's HTTP connection, with the last send of each response shielded.

    Works around hypercorn issue #106 (pgjones/hypercorn): with ``Connection: close`` or
    HTTP/1.0, hypercorn closes the socket from inside the app's final ``send``, after passing
    ``http.disconnect`` to the app; quart-trio then cancels its request nursery, and that
    cancellation interrupts hypercorn's ``send_eof`` before ``aclose``, so the socket stays
    open until the read timeout. Shielding the final send lets the close finish. It lives in
    the app (`fategen.api.app.create_app` installs it), so it holds under ``fategen serve``
    and under plain ``hypercorn --worker-class trio`` alike.
    """

    async def __call__(self, receive: Any, send: Any) -> None:
        async def send_last_shielded(message: Any) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.move_on_after(_FINAL_SEND_SECONDS, shield=True):
                    await send(message)
            else:
                await send(message)

        await super().__call__(receive, send_last_shielded)


async def serve_http(
    app: QuartTrio,
    host: str,
    port: int,
    shutdown_trigger: Callable[[], Awaitable[None]],
    *,
    graceful_timeout: float = 5.0,
    read_timeout: float = 30.0,
    keep_alive_timeout: float = 75.0,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with hypercorn's trio worker until ``shutdown_trigger`` returns.

    Reports the bound URLs (so port 0 works) through ``task_status``.

    Args:
        read_timeout: a connection that sends nothing for this long (say, a client sending
            its headers very slowly) is closed. hypercorn applies it to each read, not to the
            whole request head, so it bounds idle silence, not total header time.
        keep_alive_timeout: an idle keep-alive connection is closed after this long.
    """
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.graceful_timeout = graceful_timeout
    config.keep_alive_timeout = keep_alive_timeout
    config.read_timeout = read_timeout  # type: ignore[assignment]  # typed int, any float works
    config.h11_max_incomplete_size = 16 * 1024
    await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)
