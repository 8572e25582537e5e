"""What ComfyUI sends is bounded in time and size: every REST call has a total deadline (not
httpx's per-read one), bodies are streamed against a size cap, and a WebSocket frame that is
JSON but no message is skipped."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
import trio
import trio.testing

from fategen.comfy.wire import ComfyRest, ImageRef, parse_message
from fategen.errors import ComfyError, ComfyUnavailable

LIMIT = 4 * 2**20


def rest(handler: httpx.AsyncBaseTransport, *, timeout: float = 60) -> ComfyRest:
    client = httpx.AsyncClient(transport=handler, timeout=30)
    return ComfyRest("http://comfy.test", client, call_timeout=timeout, max_response_bytes=LIMIT)


async def test_a_trickling_view_is_cut_off_at_the_call_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One byte every 5 s: each read is quick enough for httpx, the whole never ends."""

    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(10_000):
            yield b"x"
            await trio.sleep(5)

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=trickle())

    client = rest(httpx.MockTransport(handler), timeout=60)
    start = trio.current_time()
    with pytest.raises(ComfyUnavailable) as err:
        await client.view(ImageRef("slow.png"))
    assert trio.current_time() - start == pytest.approx(60, abs=5)
    assert str(err.value) == (
        'ComfyUI at http://comfy.test did not answer the image "slow.png" within 60 s'
    )


@pytest.mark.parametrize("call", ["view", "history", "object_info"])
async def test_huge_bodies_are_refused_without_being_held(call: str) -> None:
    """A 2 GiB answer is read as a stream and given up just past the cap."""
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        chunk = b"[" * 2**20
        for _ in range(2048):  # 2 GiB if read to the end
            sent += len(chunk)
            yield chunk

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())

    client = rest(httpx.MockTransport(handler))
    with trio.fail_after(10), pytest.raises(ComfyError) as err:
        if call == "view":
            await client.view(ImageRef("huge.png"))
        elif call == "history":
            await client.history("p")
        else:
            await client.object_info()
    assert "is larger than 4 MiB, the most fategen takes" in str(err.value)
    assert sent <= LIMIT + 2 * 2**20


async def test_a_declared_length_past_the_cap_is_refused_before_reading() -> None:
    read = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal read
        read = True
        yield b"x"

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"content-length": str(2**31)})

    with pytest.raises(ComfyError, match="larger than 4 MiB"):
        await rest(httpx.MockTransport(handler)).view(ImageRef("big.png"))
    assert not read


async def test_a_deeply_nested_history_answer_is_unreadable_not_a_crash() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"[" * 100_000 + b"]" * 100_000)

    with pytest.raises(ComfyError, match="unreadable answer to the history look-up"):
        await rest(httpx.MockTransport(handler)).history("p")


@pytest.mark.parametrize(
    "frame",
    [
        "1e999",
        "Infinity",
        "-Infinity",
        "NaN",
        "[" * 100_000 + "]" * 100_000,
        '{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1e999}}}}',
        '{"type": "progress", "data": {"value": Infinity, "max": 4, "prompt_id": "p"}}',
        '{"type": "progress", "data": {"value": NaN, "max": 4, "prompt_id": "p"}}',
        '{"type": ' + "[" * 50_000 + "]" * 50_000 + "}",
        json.dumps({"type": "executed", "data": 1e308}),
    ],
    ids=[
        "1e999",
        "infinity",
        "-infinity",
        "nan",
        "nested-100k",
        "status-overflow",
        "progress-infinity",
        "progress-nan",
        "nested-type",
        "data-number",
    ],
)
def test_frames_that_are_json_but_no_message_are_skipped(
    frame: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert parse_message(frame) is None
    assert len([r for r in caplog.records if "malformed ComfyUI message" in r.getMessage()]) <= 1
