"""Connections over raw sockets: Connection: close, HTTP/1.0, slow and idle clients, and the
listen backlog."""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import pytest
import trio
from quart_trio import QuartTrio

from conftest import Stack, free_port, make_settings
from fategen.api.server import ClosingHTTPConnection, serve_http
from fategen.service import Running, run_service


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _read_to_eof(stream: trio.SocketStream, limit: float) -> tuple[bytes, bool]:
    """Everything the server sends; True when it closed the socket within ``limit`` seconds."""
    data = b""
    with trio.move_on_after(limit):
        while chunk := await stream.receive_some(65536):
            data += chunk
        return data, True
    return data, False


@pytest.mark.parametrize(
    "head",
    [
        b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        b"GET /health HTTP/1.0\r\n\r\n",
        b"GET /nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        b"POST /request HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n[]",
    ],
    ids=["close", "http10", "404-close", "400-close"],
)
async def test_server_closes_after_answering(stack: Stack, head: bytes) -> None:
    """hypercorn issue #106: the answer came, but the socket stayed open until read_timeout."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", _port(stack.url))
        async with stream:
            await stream.send_all(head)
            data, closed = await _read_to_eof(stream, 3)
    assert data.startswith(b"HTTP/1.1 "), data[:80]
    assert b"\r\n\r\n" in data
    assert closed, "the server answered but left the socket open"


async def test_keep_alive_still_serves_several_requests(stack: Stack) -> None:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", _port(stack.url))
        async with stream:
            for _ in range(3):
                await stream.send_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
                data = b""
                while b'"processing"' not in data:
                    data += await stream.receive_some(65536)
                assert data.startswith(b"HTTP/1.1 200")


def _tiny_app() -> QuartTrio:
    app = QuartTrio("tiny")
    app.asgi_http_class = ClosingHTTPConnection

    @app.get("/")
    async def index() -> str:
        return "ok"

    return app


async def test_slow_headers_and_idle_keep_alive_are_disconnected() -> None:
    """A slowloris client (one header byte, then silence) is dropped after read_timeout; an idle
    keep-alive connection after keep_alive_timeout."""
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            urls = await nursery.start(
                functools.partial(
                    serve_http,
                    _tiny_app(),
                    "127.0.0.1",
                    0,
                    stop.wait,
                    graceful_timeout=0.5,
                    read_timeout=1.0,
                    keep_alive_timeout=1.0,
                )
            )
            port = _port(urls[0])
            # Slow headers: a few bytes, then nothing.
            slow = await trio.open_tcp_stream("127.0.0.1", port)
            async with slow:
                start = trio.current_time()
                await slow.send_all(b"GET / HTTP/1.1\r\nHo")
                data, closed = await _read_to_eof(slow, 5)
                took = trio.current_time() - start
            assert closed and data == b""
            assert 0.8 <= took < 3, took
            # Idle after one answered request on a keep-alive connection.
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            async with idle:
                await idle.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                start = trio.current_time()
                data, closed = await _read_to_eof(idle, 5)
                took = trio.current_time() - start
            assert closed and data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok")
            assert 0.8 <= took < 3, took
            stop.set()


# -- the listen backlog ---------------------------------------------------------------------
# With FATEGEN_MAX_CONNECTIONS=1 and that one connection held open, the server accepts nothing
# more: every new connection is one the kernel completes (handshake done) and holds in the
# listen backlog, or, once the backlog is full, drops (the client retries its SYN a second
# later). Counting the connections that complete shows the backlog the socket really has.


async def _hold_the_only_slot(port: int, path: str) -> trio.SocketStream:
    """An answered keep-alive connection: it holds the server's one connection slot."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += await stream.receive_some(65536)
    return stream


async def _connect_until_refused(
    port: int, most: int, stack: contextlib.AsyncExitStack, *, wait: float = 0.5
) -> int:
    """Open connections one after another (none is accepted) until one does not complete
    within ``wait`` seconds, or ``most`` did; how many completed."""
    for done in range(most):
        with trio.move_on_after(wait):
            stack.push_async_callback((await trio.open_tcp_stream("127.0.0.1", port)).aclose)
            continue
        return done
    return most


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's backlog accounting")
async def test_the_listen_backlog_setting_is_what_the_socket_holds(tmp_path: Path) -> None:
    """FATEGEN_LISTEN_BACKLOG=8: Linux holds backlog + 1 completed connections, and no more."""
    settings = make_settings(
        tmp_path,
        COMFYUI_PORT=str(free_port()),
        FATEGEN_MAX_CONNECTIONS="1",
        FATEGEN_LISTEN_BACKLOG="8",
    )
    shutdown = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(run_service, settings, shutdown)
            port = _port(running.url)
            async with contextlib.AsyncExitStack() as streams:
                streams.push_async_callback((await _hold_the_only_slot(port, "/health")).aclose)
                assert await _connect_until_refused(port, 30, streams) == 9
            shutdown.set()


async def test_the_default_backlog_holds_over_a_thousand_waiting_connections() -> None:
    """hypercorn's default backlog (100) made the 102nd client of a burst wait out SYN
    retries; the default now holds them all until they are accepted."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            urls = await nursery.start(
                functools.partial(
                    serve_http, _tiny_app(), "127.0.0.1", 0, stop.wait, max_connections=1
                )
            )
            port = _port(urls[0])
            async with contextlib.AsyncExitStack() as streams:
                streams.push_async_callback((await _hold_the_only_slot(port, "/")).aclose)
                assert await _connect_until_refused(port, 1100, streams, wait=5) == 1100
            stop.set()
