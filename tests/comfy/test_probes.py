"""Health probes and reconnects of a session, on trio's mock clock over memory streams: a
ComfyUI that stops answering is down within probe interval + timeout; a lost connection is
tried again at once and then at most ``backoff_max`` apart; one back within the grace is never
down."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from fategen.comfy.session import ComfySession


class FakeComfy:
    """Accepts WebSocket handshakes in memory. ``answering``: a real WebSocket server that
    answers pings; otherwise, after the handshake it never reads again (a hung ComfyUI).
    ``refusing``: the connection fails (ComfyUI down)."""

    def __init__(self) -> None:
        self.answering = True
        self.refusing = False
        self.attempts: list[float] = []
        self.close_now = trio.Event()

    @contextlib.asynccontextmanager
    async def connect(
        self, url: str, **_: Any
    ) -> AsyncIterator[trio_websocket.WebSocketConnection]:
        self.attempts.append(trio.current_time())
        if self.refusing:
            raise OSError("connection refused")
        client, server = trio.testing.memory_stream_pair()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve, server)
                ws = await trio_websocket.wrap_client_stream(
                    nursery,
                    client,  # type: ignore[arg-type]
                    "comfy",
                    "/ws",
                )
                try:
                    yield ws
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # As trio-websocket's own open_websocket_url does: the one error, not a group.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def _serve(self, stream: trio.abc.Stream) -> None:
        if self.answering:
            async with trio.open_nursery() as nursery:
                request = await trio_websocket.wrap_server_stream(nursery, stream)
                ws = await request.accept()
                await self.close_now.wait()
                await ws.aclose()
            return
        ws = WSConnection(ConnectionType.SERVER)
        while True:
            ws.receive_data(await stream.receive_some())
            for event in ws.events():
                if isinstance(event, Request):
                    await stream.send_all(ws.send(AcceptConnection()))
                    await trio.sleep_forever()  # never reads again: pings go unanswered


@contextlib.asynccontextmanager
async def session_on(fake: FakeComfy, **kw: Any) -> AsyncIterator[ComfySession]:
    async with (
        ComfySession.open(
            "http://comfy:8188",
            websocket_connect=fake.connect,
            probe_interval=1.0,
            probe_timeout=1.0,
            **kw,
        ) as session,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(session.run)
        yield session
        nursery.cancel_scope.cancel()


async def until_state(session: ComfySession, state: str, limit: float = 60) -> float:
    """When the session is in ``state`` (fails after ``limit`` seconds of mock time)."""
    with trio.fail_after(limit):
        while session.state != state:
            await session.wait_state_change()
    return trio.current_time()


async def test_a_hung_comfyui_is_down_within_interval_plus_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeComfy()
    fake.answering = False
    async with session_on(fake) as session:
        connected = await until_state(session, "up")
        down = await until_state(session, "down")
        assert down - connected == pytest.approx(2.0, abs=0.01)  # 1 s quiet + 1 s no pong
        assert "no answer to a ping within 1 s" in (session.last_error or "")


async def test_a_comfyui_that_answers_pings_stays_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeComfy()
    async with session_on(fake) as session:
        await until_state(session, "up")
        await trio.sleep(30)  # 30 quiet seconds: pinged every second, answered
        assert session.state == "up"
        assert len(fake.attempts) == 1


async def test_reconnects_at_once_then_at_most_a_second_apart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeComfy()
    async with session_on(fake) as session:
        await until_state(session, "up")
        fake.refusing = True
        lost = trio.current_time()
        fake.close_now.set()
        down = await until_state(session, "down")
        assert down - lost == pytest.approx(1.0, abs=0.01)  # the grace (probe timeout)
        await trio.sleep(10)
        gaps = [b - a for a, b in zip(fake.attempts[1:], fake.attempts[2:], strict=False)]
        assert fake.attempts[1] - lost < 0.01  # tried again at once
        assert gaps and max(gaps) <= 1.0 + 1e-6  # never more than a second apart
        fake.refusing = False
        fake.close_now = trio.Event()
        back = trio.current_time()
        up = await until_state(session, "up")
        assert up - back <= 1.0 + 1e-6


async def test_a_connection_back_within_the_grace_is_never_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeComfy()
    async with session_on(fake) as session:
        await until_state(session, "up")
        states: list[str] = []

        async def record() -> None:
            while True:
                await session.wait_state_change()
                states.append(session.state)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(record)
            old = fake.close_now
            fake.close_now = trio.Event()
            old.set()  # the server closes; the next attempt connects at once
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
        assert states[:2] == ["reconnecting", "up"]
        assert "down" not in states
