"""The idle-unload watchdog on a fake clock: exact times of each free."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import httpx
import pytest
import trio
import trio.testing

from fategen.comfy.session import ComfySession
from fategen.comfy.watchdog import IdleWatchdog
from fategen.errors import ComfyUnavailable

Free = tuple[float, bool, bool]  # (time, unload_models, free_memory)


def recorder(fail_times: int = 0) -> tuple[list[Free], Callable[..., Awaitable[None]]]:
    calls: list[Free] = []
    failures = [fail_times]

    async def free(*, unload_models: bool = True, free_memory: bool = False) -> None:
        await trio.lowlevel.checkpoint()
        if failures[0] > 0:
            failures[0] -= 1
            raise ComfyUnavailable("cannot reach ComfyUI at http://127.0.0.1:1: refused")
        calls.append((trio.current_time(), unload_models, free_memory))

    return calls, free


async def test_starts_idle_and_frees_once_per_stage(autojump_clock: trio.testing.MockClock) -> None:
    calls, free = recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(IdleWatchdog(free).run)
        await trio.sleep(50_000)
        nursery.cancel_scope.cancel()
    assert calls == [(600, True, False), (3600, True, True)]


async def test_busy_resets_the_timers(autojump_clock: trio.testing.MockClock) -> None:
    calls, free = recorder()
    dog = IdleWatchdog(free, unload_after=600, free_memory_after=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(dog.run)
        await trio.sleep(500)
        dog.notify_busy()
        await trio.sleep(5_000)  # a long job: nothing is freed while busy
        assert calls == []
        dog.notify_busy()  # repeated: no change
        dog.notify_idle()  # idle from t=5500
        await trio.sleep(700)  # t=6200
        assert calls == [(6100, True, False)]
        dog.notify_idle()  # already idle: the timers keep running
        await trio.sleep(100)  # t=6300
        dog.notify_busy()  # between the stages
        await trio.sleep(10)
        dog.notify_idle()  # idle from t=6310
        await trio.sleep(50_000)
        nursery.cancel_scope.cancel()
    assert calls == [(6100, True, False), (6910, True, False), (9910, True, True)]


async def test_free_memory_after_zero_is_off(autojump_clock: trio.testing.MockClock) -> None:
    calls, free = recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(IdleWatchdog(free, unload_after=60, free_memory_after=0).run)
        await trio.sleep(80_000)
        nursery.cancel_scope.cancel()
    assert calls == [(60, True, False)]


async def test_free_memory_not_later_than_unload_is_one_free(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls, free = recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(IdleWatchdog(free, unload_after=600, free_memory_after=300).run)
        await trio.sleep(50_000)
        nursery.cancel_scope.cancel()
    assert calls == [(300, True, True)]


async def test_a_failed_free_is_logged_and_retried(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fategen.watchdog")
    calls, free = recorder(fail_times=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(IdleWatchdog(free, retry_after=60).run)
        await trio.sleep(50_000)
        nursery.cancel_scope.cancel()
    assert calls == [(720, True, False), (3600, True, True)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "unloading models on ComfyUI failed: cannot reach ComfyUI" in warnings[0].getMessage()


async def test_retries_give_way_to_the_next_stage(autojump_clock: trio.testing.MockClock) -> None:
    calls, free = recorder(fail_times=1000)
    dog = IdleWatchdog(free, unload_after=600, free_memory_after=700, retry_after=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(dog.run)
        await trio.sleep(5_000)
        nursery.cancel_scope.cancel()
    assert calls == []  # and the watchdog is still alive: it was cancelled, not crashed


async def test_with_a_session_over_mock_transport(autojump_clock: trio.testing.MockClock) -> None:
    bodies: list[tuple[float, bytes]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/free"
        bodies.append((trio.current_time(), request.content))
        return httpx.Response(200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        session = ComfySession("http://127.0.0.1:8188", http=http)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                IdleWatchdog(session.free, unload_after=10, free_memory_after=20).run
            )
            await trio.sleep(100)
            nursery.cancel_scope.cancel()
    assert bodies == [
        (10, b'{"unload_models":true,"free_memory":false}'),
        (20, b'{"unload_models":true,"free_memory":true}'),
    ]
