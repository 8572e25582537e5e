"""`fategen.client` over real sockets: the async client under trio and the blocking one in a
thread, against the real service on the simulator (round trip, refusals, cancel, models, keys,
idempotency, a service that is not there), and the event stream's protocol (resume with
Last-Event-ID after a dropped connection) against a small SSE server of the test's own."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from hypercorn.config import Config
from hypercorn.trio import serve
from PIL import Image
from quart import Response, request
from quart_trio import QuartTrio

from conftest import Stack, free_port, open_stack
from fategen.client import (
    AsyncClient,
    Client,
    Event,
    FategenClientError,
    FategenConnectionError,
    JobInfo,
    SSEDecoder,
    WaitTimeout,
)
from fategen.simulator import SimulatorKnobs

TINY = "-m tiny -w 256 -h 256"
SLOW = SimulatorKnobs(step_seconds=0.1, model_load_seconds=0.01)
KEY = "k" * 24


def webp_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "WEBP"
        return image.size


async def test_submit_wait_image_round_trip(stack: Stack) -> None:
    with trio.fail_after(30):
        async with AsyncClient(stack.url) as client:
            submitted = await client.submit(f"a lighthouse at night {TINY} -c 2", "alice")
            assert submitted.status == "queued" and submitted.queue_position in (0, 1)
            assert submitted.job_url == f"{stack.url}/job/{submitted.job_id}"
            assert submitted.wait_url == f"{stack.url}/wait/{submitted.job_id}"
            job = await client.wait(submitted.job_id)
            assert job.done and job.status == "completed", job
            assert (job.prompt, job.nick, job.model, job.count) == (
                "a lighthouse at night",
                "alice",
                "tiny",
                2,
            )
            assert (job.width, job.height) == (256, 256)
            assert job.progress.step == job.progress.of == 4
            assert isinstance(job.created, datetime) and job.finished is not None
            assert job.created <= job.finished and job.queue_position is None
            assert job.image_url == f"{stack.url}/job/{job.job_id}/image"
            assert job.backend == "comfyui" and job.key is None
            assert await client.job(job.job_id) == job
            assert webp_size(await client.image(job.job_id)) == (512, 256)  # 2 side by side


async def test_the_blocking_client_round_trip_in_a_thread(stack: Stack) -> None:
    def script() -> tuple[JobInfo, bytes, list[str]]:
        with Client(stack.url + "/") as client:
            submitted = client.submit(f"a red barn {TINY}", "bob")
            job = client.wait(submitted.job_id, timeout=30)
            return job, client.image(job.job_id), [m.id for m in client.models()]

    with trio.fail_after(30):
        job, image, models = await trio.to_thread.run_sync(script)
    assert job.status == "completed" and job.nick == "bob"
    assert webp_size(image) == (256, 256)
    assert "tiny" in models


async def test_the_async_client_under_asyncio(stack: Stack) -> None:
    """The same client in an asyncio program (in a thread, beside the trio service)."""

    async def bot() -> tuple[str, list[str], bytes]:
        async with AsyncClient(stack.url) as client:
            job = await client.submit(f"an asyncio bot {TINY}", "carol")
            kinds: list[str] = []
            try:
                kinds = [event.type async for event in client.events(job.job_id)]
            except FategenClientError as exc:  # a service without event streams yet
                assert exc.status == 404
            done = await asyncio.wait_for(client.wait(job.job_id), 30)
            return done.status, kinds, await client.image(job.job_id)

    with trio.fail_after(30):
        status, kinds, image = await trio.to_thread.run_sync(asyncio.run, bot())
    assert status == "completed" and webp_size(image) == (256, 256)
    assert not kinds or (kinds[0], kinds[-1]) == ("snapshot", "completed")


async def test_an_uploaded_image_and_its_follow_ups(stack: Stack) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 128), (10, 200, 30)).save(buffer, "PNG")
    with trio.fail_after(30):
        async with AsyncClient(stack.url) as client:
            submitted = await client.submit("a meadow -m tiny", "dee", image=buffer.getvalue())
            job = await client.wait(submitted.job_id)
            assert job.status == "completed", job
            assert job.kind == "img2img" and job.input is not None
            assert job.input.source == "upload" and job.input.url.endswith("/input")
            assert abs(job.width / job.height - 2) < 0.2  # the upload's 2:1, about
            up = await client.wait((await client.upscale(job.job_id, 1, "dee")).job_id)
            assert up.kind == "upscale" and up.input is not None and up.input.image == 1
            tiny = next(m for m in await client.models() if m.id == "tiny")
            assert tiny.kinds == ("txt2img", "img2img", "upscale")
            assert (up.width, up.height) == (2 * job.width, 2 * job.height)

    def blocking() -> JobInfo:
        with Client(stack.url) as client:
            return client.wait(client.vary(job.job_id, 1, "dee", message="-s 5").job_id)

    with trio.fail_after(30):
        varied = await trio.to_thread.run_sync(blocking)
    assert (varied.kind, varied.seed, varied.prompt) == ("img2img", 5, "a meadow")
    with pytest.raises(FategenClientError, match="pick 1") as info:
        async with AsyncClient(stack.url) as client:
            await client.upscale(job.job_id, 2, "dee")
    assert info.value.status == 400


async def test_a_refused_message_raises_the_service_sentence(stack: Stack) -> None:
    async with AsyncClient(stack.url) as client:
        with pytest.raises(FategenClientError) as refused:
            await client.submit("a cat --steps 30", "alice")
    assert refused.value.status == 400
    assert str(refused.value).startswith("unknown modifier '--steps'; valid modifiers: ")
    with Client(stack.url) as blocking, pytest.raises(FategenClientError) as missing:
        await trio.to_thread.run_sync(blocking.job, "3f0c2a9e-5b7d-4c1e-9a8f-1d2e3c4b5a69")
    assert missing.value.status == 404
    assert str(missing.value) == "there is no job 3f0c2a9e-5b7d-4c1e-9a8f-1d2e3c4b5a69"


async def test_cancel_by_the_nick_that_asked(tmp_path: Path) -> None:
    async with open_stack(tmp_path, SLOW) as stack, AsyncClient(stack.url) as client:
        with trio.fail_after(30):
            running = await client.submit(f"first {TINY}", "alice")
            queued = await client.submit(f"second {TINY}", "alice")
            with pytest.raises(FategenClientError) as refused:
                await client.cancel(queued.job_id, nick="mallory")
            assert refused.value.status == 403
            assert str(refused.value) == (
                f"job {queued.job_id} belongs to another nick; only it may cancel it"
            )
            cancelled = await client.cancel(queued.job_id, nick="alice")
            assert cancelled.status == "cancelled" and cancelled.cancelled_by == "alice"
            assert (await client.wait(queued.job_id)).status == "cancelled"
            assert (await client.wait(running.job_id)).status == "completed"
            with pytest.raises(FategenClientError) as late:
                await client.cancel(running.job_id, nick="alice")
            assert late.value.status == 409
            assert str(late.value) == f"job {running.job_id} has already completed"


async def test_wait_with_a_timeout_gives_the_last_state(tmp_path: Path) -> None:
    async with open_stack(tmp_path, SLOW) as stack, AsyncClient(stack.url) as client:
        with trio.fail_after(30):
            job = await client.submit(f"slow {TINY}", "alice")
            with pytest.raises(WaitTimeout) as timed_out:
                await client.wait(job.job_id, timeout=0.1)
            assert timed_out.value.job.status in ("queued", "processing")
            assert str(timed_out.value).startswith(f"job {job.job_id} is still ")
            assert (await client.wait(job.job_id)).status == "completed"


async def test_models_are_typed(stack: Stack) -> None:
    async with AsyncClient(stack.url) as client:
        models = {m.id: m for m in await client.models()}
    assert set(models) >= {"illustriousXL", "tiny"}
    tiny = models["tiny"]
    assert (tiny.width, tiny.height, tiny.steps) == (512, 512, 4)
    assert tiny.workflow and tiny.checkpoint and tiny.description


async def test_an_api_key_is_sent_as_a_bearer_token(tmp_path: Path) -> None:
    async with open_stack(tmp_path, FATEGEN_API_KEYS=f"ircbot:{KEY}") as stack:
        async with AsyncClient(stack.url) as anonymous:
            with pytest.raises(FategenClientError) as refused:
                await anonymous.models()
        assert refused.value.status == 401
        assert str(refused.value) == "a valid API key is required (Authorization: Bearer <key>)"
        with trio.fail_after(30):
            async with AsyncClient(stack.url, key=KEY) as client:
                job = await client.wait((await client.submit(f"a key {TINY}", "amy")).job_id)
        assert job.status == "completed" and job.key == "ircbot"


async def test_an_idempotency_key_gives_the_same_job_back(stack: Stack) -> None:
    async with AsyncClient(stack.url) as client:
        first = await client.submit(f"once {TINY}", "alice", idempotency_key="retry-1")
        again = await client.submit(f"once {TINY}", "alice", idempotency_key="retry-1")
        with pytest.raises(FategenClientError) as other:
            await client.submit(f"another {TINY}", "alice", idempotency_key="retry-1")
    assert again.job_id == first.job_id
    assert other.value.status == 422


async def test_a_service_that_is_not_there_is_one_sentence() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with AsyncClient(url) as client:
        with pytest.raises(FategenConnectionError) as down:
            await client.models()
    assert str(down.value).startswith(f"the fategen service at {url} cannot be reached (")
    assert down.value.status is None
    with pytest.raises(ValueError, match="must start with http:// or https://"):
        Client("127.0.0.1:8000")


async def test_events_of_a_real_job_from_snapshot_to_completed(tmp_path: Path) -> None:
    """Against the service's own stream."""
    async with open_stack(tmp_path, SLOW) as stack, AsyncClient(stack.url) as client:
        job = await client.submit(f"streamed {TINY}", "alice")
        events: list[Event] = []
        with trio.fail_after(30):
            async for event in client.events(job.job_id):
                events.append(event)
    kinds = [e.type for e in events]
    assert kinds[0] == "snapshot" and kinds[-1] == "completed" and "started" in kinds, kinds
    assert all(e.job is not None and e.job.job_id == job.job_id for e in events)
    last = events[-1].job
    assert last is not None and last.status == "completed" and last.image_url
    assert len({e.id for e in events}) == len(events)


def test_the_sse_decoder_follows_the_standard() -> None:
    decoder = SSEDecoder()
    lines = [
        ": keep-alive",
        "retry: 250",
        "id: 7",
        "event: progress",
        'data: {"a":',
        "data:1}",  # no space after the colon
        "",
        "",  # a blank line with nothing pending dispatches nothing
        "event: preview",  # no id: the last one holds
        "data: x",
        "ignored: field",
        "",
        "id: 9",
        "event: snapshot",  # never ended by a blank line: never dispatched
    ]
    got = [e for e in map(decoder.feed, lines) if e is not None]
    assert [(e.type, e.data, e.id) for e in got] == [
        ("progress", '{"a":\n1}', "7"),
        ("preview", "x", "7"),
    ]
    assert decoder.retry == 0.25
    assert decoder.last_event_id == "7"  # the unfinished event's id does not count


def job_json(job_id: str, status: str, step: int = 0, position: int | None = 1) -> dict[str, Any]:
    """A /job answer (the data of every event but a preview)."""
    return {
        "job_id": job_id,
        "status": status,
        "queue_position": position,
        "progress": {"step": step, "of": 4 if step else 0},
        "result": None,
        "image_url": f"http://x/job/{job_id}/image" if status == "completed" else None,
        "error": None,
        "nick": "alice",
        "prompt": "a cat",
        "negative": "",
        "model": "tiny",
        "width": 256,
        "height": 256,
        "count": 1,
        "seed": 5,
        "created": "2026-12-01T10:00:00.000+00:00",
        "started": None if status == "queued" else "2026-12-01T10:00:01.000+00:00",
        "finished": "2026-12-01T10:00:02.000+00:00" if status == "completed" else None,
        "cancelled_by": None,
        "key": None,
        "backend": None if status == "queued" else "gpu0",
        "a_field_of_a_newer_service": [1, 2],
    }


JOB = "3f0c2a9e-5b7d-4c1e-9a8f-1d2e3c4b5a69"
#: The stream of the protocol tests: (event type, data).
STREAM: list[tuple[str, Any]] = [
    ("snapshot", job_json(JOB, "queued", position=2)),
    ("queued", job_json(JOB, "queued", position=1)),
    ("started", job_json(JOB, "processing", position=0)),
    ("progress", job_json(JOB, "processing", 1, position=0)),
    ("preview", {"job_id": JOB, "image": "data:image/webp;base64,UklGRg=="}),
    ("progress", job_json(JOB, "processing", 2, position=0)),
    ("progress", job_json(JOB, "processing", 4, position=0)),
    ("completed", job_json(JOB, "completed", 4, position=None)),
]


def encode(n: int) -> bytes:
    kind, data = STREAM[n]
    return f"id: {JOB}-{n}\nevent: {kind}\ndata: {json.dumps(data)}\n\n".encode()


class Dropped(Exception):
    """Raised in a response body: hypercorn cuts the connection in the middle of the stream."""


class StreamServer:
    """``GET /job/{id}/events`` as the service sends it, resuming after ``Last-Event-ID``;
    ``plan[k]`` says how connection k ends: at which event, and how (cut in the middle of it,
    or a clean end of the response); past the plan, the stream runs to its final event."""

    def __init__(self, plan: list[tuple[int, str]]) -> None:
        self.plan = plan
        self.last_ids: list[str | None] = []
        self.app = QuartTrio("sse-protocol-test")
        self.app.add_url_rule("/job/<job_id>/events", view_func=self.events)

    async def events(self, job_id: str) -> Response:
        last = request.headers.get("Last-Event-ID")
        self.last_ids.append(last)
        start = 0 if last is None else int(last.rsplit("-", 1)[1]) + 1
        stop, how = (
            self.plan[len(self.last_ids) - 1]
            if len(self.last_ids) <= len(self.plan)
            else (
                len(STREAM),
                "",
            )
        )

        async def body() -> AsyncIterator[bytes]:
            yield b"retry: 10\n: keep-alive\n\n"
            for n in range(start, len(STREAM)):
                if n == stop:
                    if how == "cut":
                        yield encode(n)[:-12]  # half an event, its id line included
                        await trio.sleep(0.05)
                        raise Dropped
                    return  # the response ends without the final event
                yield encode(n)
                await trio.lowlevel.checkpoint()

        response = Response(body(), mimetype="text/event-stream")
        response.timeout = None
        return response

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.errorlog = None  # the cut is on purpose: no traceback in the log
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(functools.partial(serve, self.app, config))
            yield binds[0]
            nursery.cancel_scope.cancel()


async def test_events_protocol_resumes_with_last_event_id_after_a_drop() -> None:
    """The protocol test: a connection cut in the middle of an event, then one that ends
    early; the client resumes each time from the last whole event it got."""
    server = StreamServer([(3, "cut"), (6, "end")])
    async with server.running() as url, AsyncClient(url) as client:
        with trio.fail_after(10):
            events = [e async for e in client.events(JOB)]
    assert server.last_ids == [None, f"{JOB}-2", f"{JOB}-5"]
    assert [e.id for e in events] == [f"{JOB}-{n}" for n in range(len(STREAM))]  # once each
    assert [e.type for e in events] == [kind for kind, _ in STREAM]
    assert events[-1].final and not any(e.final for e in events[:-1])
    preview = events[4]
    assert preview.job is None and preview.data["image"].startswith("data:image/webp")
    steps = [e.job.progress.step for e in events if e.type == "progress" and e.job]
    assert steps == [1, 2, 4]
    done = events[-1].job
    assert done is not None and done.status == "completed" and done.backend == "gpu0"
    assert done.raw["a_field_of_a_newer_service"] == [1, 2]  # kept, though not a field


async def test_events_protocol_gives_up_after_failures_in_a_row() -> None:
    server = StreamServer([(0, "cut")] * 10)
    async with server.running() as url, AsyncClient(url) as client:
        with trio.fail_after(10), pytest.raises(FategenConnectionError) as broken:
            async for _ in client.events(JOB, reconnects=2):
                pass
    assert server.last_ids == [None, None, None]  # the first try and 2 reconnections
    assert str(broken.value).startswith(f"the fategen service at {url} broke the connection")


async def test_events_protocol_refusal_is_raised_at_once() -> None:
    server = StreamServer([])
    async with server.running() as url, AsyncClient(url) as client:
        with pytest.raises(FategenClientError) as missing:
            async for _ in client.events("no/such"):
                pass
    assert missing.value.status == 404 and server.last_ids == []
