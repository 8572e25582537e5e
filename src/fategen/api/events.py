"""Routes of live events (Server-Sent Events): ``GET /job/{id}/events`` for one job and
``GET /events`` for every job of the caller (its API key, or a ``nick``).

A job's stream starts with a ``snapshot`` (the job as ``GET /job`` shows it), then sends an
event for each change: ``queued`` (its place moved, or it was queued again), ``started``,
``progress`` (a few a second at most), ``preview`` (for a job submitted with ``previews``: the
latest sampler preview as a ``data:`` URL, twice a second at most), ``completed``, ``failed``
or ``cancelled``, after which it ends. Every other event's data is the job as ``GET /job``
shows it at that moment. Each event has
an id; a client that reconnects with ``Last-Event-ID`` gets the events it missed (or a fresh
snapshot when they are no longer held). A comment line every ``FATEGEN_EVENTS_HEARTBEAT``
seconds keeps proxies from closing an idle stream. Streams open at once are capped
(``FATEGEN_MAX_STREAMS``): past it, 429 with a sentence.

The events come from the store as it applies each change (`fategen.store.events`); a job's
stream wakes only for its own events and, while it is queued, when the queue moves.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import attrs
import trio
from quart import Blueprint, Response, request, stream_with_context

from fategen.api.auth import caller
from fategen.api.common import error, find_job, job_response, state
from fategen.api.frontdesk import Frontdesk
from fategen.store.events import FINAL_EVENTS, EventFeed
from fategen.store.jobs import JobStatus, JobView

blueprint = Blueprint("events", __name__)
log = logging.getLogger("fategen.api")

#: Seconds between two looks at a queued job's place (the queue may move far more often).
POSITION_EVERY = 0.5


def _data(view: JobView) -> str:
    return json.dumps(attrs.asdict(job_response(view)), ensure_ascii=False, separators=(",", ":"))


def _event(feed: EventFeed, event_id: int, kind: str, view: JobView) -> str:
    if kind == "preview":
        found = state().desk.store.preview(view.id)
        if found is None:
            return ""  # the job moved on since: its preview is gone
        image, mime = found
        data = json.dumps(
            {
                "job_id": view.id,
                "image": f"data:{mime};base64,{base64.b64encode(image).decode()}",
                "progress": {"step": view.progress_value, "of": view.progress_max},
            },
            separators=(",", ":"),
        )
        return f"id: {feed.event_id(event_id)}\nevent: preview\ndata: {data}\n\n"
    return f"id: {feed.event_id(event_id)}\nevent: {kind}\ndata: {_data(view)}\n\n"


async def _first(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return once any of ``waits`` returns."""
    async with trio.open_nursery() as nursery:

        async def run(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(run, wait)


def _open_stream(events: Callable[[], AsyncIterator[str]]) -> Response:
    """The streaming answer of ``events()``, holding one of the `FATEGEN_MAX_STREAMS` slots
    until it ends; past the cap, the 429 answer."""
    desk = state().desk
    limit = state().settings.max_streams
    if desk.open_streams >= limit:
        return error(
            f"too many event streams are open ({limit}); try again in a few seconds, "
            "or long-poll /wait",
            429,
            Retry_After="5",
        )

    @stream_with_context
    async def body() -> AsyncIterator[str]:
        # Counted from its first step: a body never started (the client left before the
        # headers went) never runs its `finally`, and would keep its slot forever.
        desk.open_streams += 1
        try:
            async for chunk in events():
                yield chunk
        finally:
            desk.open_streams -= 1

    response = Response(
        body(),
        status=200,
        content_type="text/event-stream; charset=utf-8",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    response.timeout = None  # quart's 60 s response timeout would cut the stream
    return response


@blueprint.get("/job/<job_id>/events")
async def job_events(job_id: str) -> Response:
    """The job's events as Server-Sent Events, from a snapshot to its end."""
    view = await find_job(job_id)
    desk = state().desk
    last_event = request.headers.get("Last-Event-ID")
    return _open_stream(lambda: _job_stream(desk, view.id, last_event))


async def _job_stream(desk: Frontdesk, job_id: str, last_event: str | None) -> AsyncIterator[str]:
    store = desk.store
    feed = store.events
    heartbeat = state().settings.events_heartbeat
    after = feed.parse_id(last_event)
    missed = feed.since(after) if after is not None else None
    view = await desk.view(job_id)
    if view is None:
        return
    if missed is None:
        cursor = feed.last_id
        yield _event(feed, cursor, "snapshot", view)
        if view.status.finished:
            yield _event(feed, cursor, view.status.value, view)
            return
    else:
        cursor = after if after is not None else feed.last_id
    position = view.queue_position
    next_check = trio.current_time()
    while True:
        events = feed.since(cursor)
        if events is None:
            # Other jobs' events filled the ring while this one slept (its own wake it at
            # once): nothing of its own was missed.
            events = iter(())
            cursor = feed.last_id
        for event in list(events):
            cursor = event.id
            if event.job_id != job_id:
                continue
            view = await desk.view(job_id)
            if view is None:
                return
            yield _event(feed, event.id, event.type, view)
            position = view.queue_position
            if event.type in FINAL_EVENTS:
                return
        job = store.held(job_id)
        queued = job is not None and job.status is JobStatus.QUEUED
        if job is not None and queued:
            now = store.queue_position(job)
            next_check = trio.current_time() + POSITION_EVERY
            if now != position:
                position = now
                yield _event(feed, cursor, "queued", store.view_of(job))
        with trio.move_on_after(heartbeat) as quiet:
            waits: list[Callable[[], Awaitable[object]]] = [lambda: store.wait_change(job_id)]
            if queued:

                async def queue_moved(at: float = next_check) -> None:
                    await trio.sleep_until(at)  # a position at most this often
                    await feed.wait_queue_moved()

                waits.append(queue_moved)
            await _first(*waits)
        if quiet.cancelled_caught:
            yield ": keep-alive\n\n"


@blueprint.get("/events")
async def all_events() -> Response:
    """Every job event of the caller: its API key's jobs (an admin key: every job), or with
    ``?nick=`` only that nick's. Starts with what it missed (``Last-Event-ID``) or from now."""
    who = caller()
    nick = request.args.get("nick")
    if state().keys and who is None:
        return error("an API key is needed", 401)
    key = None if who is None or who.admin else who.key
    desk = state().desk
    last_event = request.headers.get("Last-Event-ID")
    return _open_stream(lambda: _all_stream(desk, key, nick, last_event))


async def _all_stream(
    desk: Frontdesk, key: str | None, nick: str | None, last_event: str | None
) -> AsyncIterator[str]:
    feed = desk.store.events
    heartbeat = state().settings.events_heartbeat
    after = feed.parse_id(last_event)
    cursor = after if after is not None and feed.since(after) is not None else feed.last_id
    yield ": connected\n\n"
    while True:
        events = feed.since(cursor)
        if events is None:
            yield ": events were missed (too many at once); GET /job for their state\n\n"
            cursor = feed.last_id
            continue
        for event in list(events):
            cursor = event.id
            if key is not None and event.key_name != key:
                continue
            if nick is not None and event.nick != nick:
                continue
            view = await desk.view(event.job_id)
            if view is not None:
                yield _event(feed, event.id, event.type, view)
        with trio.move_on_after(heartbeat) as quiet:
            await feed.wait_after(cursor)
        if quiet.cancelled_caught:
            yield ": keep-alive\n\n"
