"""The simulator's websocket outbox: like ComfyUI, a deep backlog waits, never closed."""

from __future__ import annotations

import json
import uuid

import trio
import trio.testing
import trio_websocket
from simulator_fixtures import MAX_MESSAGE_SIZE, recorder, running_simulator, txt2img_prompt

from fategen.simulator import SimulatorKnobs
from fategen.simulator.hub import Close, Outbox


async def test_outbox_keeps_order_and_refuses_past_its_byte_cap() -> None:
    outbox = Outbox(max_bytes=10)
    assert outbox.put("aaaa")
    assert outbox.put(b"bbbbbb")
    assert not outbox.put("c")
    assert outbox.put(Close(1000))  # a close takes no room
    assert outbox.statistics() == (3, 10)
    with trio.fail_after(1):
        received = [await outbox.__anext__() for _ in range(3)]
    assert received == ["aaaa", b"bbbbbb", Close(1000)]
    assert outbox.statistics() == (0, 0)


async def test_a_reader_waits_for_the_next_message_and_stops_once_closed() -> None:
    outbox = Outbox()
    received: list[object] = []

    async def read() -> None:
        async for message in outbox:
            received.append(message)

    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            outbox.put("one")
            await trio.testing.wait_all_tasks_blocked()
            assert received == ["one"]
            outbox.close()
            assert outbox.put("after close")  # taken and dropped: the socket is going away
    assert received == ["one"]


async def test_thousands_of_messages_queued_at_once_all_arrive_and_the_socket_stays_open() -> None:
    # The old outbox closed a socket (1011) past 1,024 queued messages; ComfyUI queues them all.
    count = 5000
    client_id = uuid.uuid4().hex
    with trio.fail_after(20):
        async with running_simulator() as running:
            url = running.ws_url(client_id)
            async with trio_websocket.open_websocket_url(
                url, max_message_size=MAX_MESSAGE_SIZE
            ) as ws:
                first = json.loads(await ws.get_message())
                assert first["type"] == "status"
                for i in range(count):  # no checkpoint: all queued before the handler sends one
                    running.sim.hub.send("progress", {"value": i, "max": count}, client_id)
                values = [json.loads(await ws.get_message())["data"]["value"] for _ in range(count)]
                assert values == list(range(count))
                assert not ws.closed
                running.sim.hub.send("progress", {"value": -1, "max": count}, client_id)
                assert json.loads(await ws.get_message())["data"]["value"] == -1


async def test_a_deep_queue_of_fast_prompts_reaches_a_reader_that_lags_behind() -> None:
    knobs = SimulatorKnobs(step_seconds=0, model_load_seconds=0, caching=False)
    client_id = uuid.uuid4().hex
    with trio.fail_after(60):
        async with running_simulator(knobs=knobs) as running:
            url = running.ws_url(client_id)
            async with trio_websocket.open_websocket_url(
                url, max_message_size=MAX_MESSAGE_SIZE
            ) as ws:
                ids = []
                for seed in range(150):  # nothing read until every prompt has run
                    body = {"prompt": txt2img_prompt(seed=seed), "client_id": client_id}
                    ids.append((await running.post_prompt(body))["prompt_id"])
                await running.sim.wait_idle()
                pending, frames = set(ids), 0
                while pending:
                    message = await ws.get_message()
                    frames += 1
                    if isinstance(message, str):
                        event = json.loads(message)
                        if event["type"] == "executing" and event["data"]["node"] is None:
                            pending.discard(event["data"]["prompt_id"])
                assert not ws.closed
    assert frames > 1024


async def test_an_outbox_past_its_byte_cap_closes_the_socket_with_1011() -> None:
    client_id = uuid.uuid4().hex
    with trio.fail_after(10):
        async with running_simulator() as running:
            running.sim.hub.outbox_max_bytes = 4096
            async with recorder(running.ws_url(client_id)) as rec:
                for i in range(200):  # far more than 4 KiB, queued before any is sent
                    running.sim.hub.send("progress", {"value": i, "max": 200}, client_id)
                closed = await rec.wait_closed()
    assert closed.reason is not None and closed.reason.code == 1011
