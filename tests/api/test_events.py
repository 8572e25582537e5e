"""Server-Sent Events over real sockets: a job's stream from its snapshot to its end, resumed
after a dropped connection with Last-Event-ID (nothing missed, nothing twice), queue places,
heartbeats, the cap on open streams, and the stream of every job of one API key."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import trio

from conftest import open_stack
from fategen.simulator import SimulatorKnobs

TINY = "-m tiny -w 256 -h 256"
SLOW = SimulatorKnobs(step_seconds=0.05, model_load_seconds=0.01)


async def sse(
    client: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Each event of a stream as {"id", "event", "data"} (comments as {"comment"})."""
    async with client.stream("GET", path, headers=headers or {}, timeout=30) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        event: dict[str, Any] = {}
        async for line in response.aiter_lines():
            if line == "":
                if event:
                    yield event
                event = {}
            elif line.startswith(":"):
                yield {"comment": line[1:].strip()}
            else:
                name, _, value = line.partition(": ")
                event[name] = json.loads(value) if name == "data" else value


async def test_a_job_stream_from_snapshot_to_completed(tmp_path: Path) -> None:
    async with open_stack(tmp_path, SLOW) as stack:
        job_id = (await stack.submit(f"a cat {TINY}"))["job_id"]
        kinds: list[str] = []
        steps: list[int] = []
        with trio.fail_after(30):
            async for event in sse(stack.client, f"/job/{job_id}/events"):
                if "comment" in event:
                    continue
                kinds.append(event["event"])
                assert event["data"]["job_id"] == job_id
                if event["event"] == "progress":
                    steps.append(event["data"]["progress"]["step"])
        # The stream ended by itself after the final event.
        assert kinds[0] == "snapshot" and kinds[-1] == "completed"
        assert "started" in kinds
        assert steps == sorted(steps) and steps[-1] == 4  # the last step is always sent
        # At most one progress event per 0.25 s: 4 steps 50 ms apart give 2, the last one
        # included (the first step, then the last).
        assert kinds.count("progress") <= 2


async def test_a_finished_job_streams_its_snapshot_and_end(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        job_id = (await stack.submit(f"a dog {TINY}"))["job_id"]
        await stack.wait(job_id)
        with trio.fail_after(10):
            events = [e async for e in sse(stack.client, f"/job/{job_id}/events")]
        assert [e["event"] for e in events] == ["snapshot", "completed"]
        assert events[1]["data"]["image_url"].endswith(f"/job/{job_id}/image")


async def test_resume_after_a_dropped_connection_misses_nothing(tmp_path: Path) -> None:
    async with open_stack(tmp_path, SLOW) as stack:
        job_id = (await stack.submit(f"a fox {TINY}"))["job_id"]
        seen: list[dict[str, Any]] = []
        with trio.fail_after(30):
            async for event in sse(stack.client, f"/job/{job_id}/events"):
                if "id" in event:
                    seen.append(event)
                if event.get("event") == "started":
                    break  # the connection drops here
            await stack.wait(job_id)  # meanwhile the job runs to its end
            resumed = [
                e
                async for e in sse(
                    stack.client, f"/job/{job_id}/events", {"Last-Event-ID": seen[-1]["id"]}
                )
                if "id" in e
            ]
        kinds = [e["event"] for e in resumed]
        assert kinds[-1] == "completed", kinds
        assert "snapshot" not in kinds and "started" not in kinds  # nothing twice
        assert "progress" in kinds  # what it missed
        numbers = [int(e["id"].rsplit("-", 1)[1]) for e in seen + resumed]
        assert numbers == sorted(set(numbers))


async def test_an_unknown_last_event_id_gets_a_snapshot(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        job_id = (await stack.submit(f"a hen {TINY}"))["job_id"]
        await stack.wait(job_id)
        with trio.fail_after(10):
            events = [
                e
                async for e in sse(
                    stack.client, f"/job/{job_id}/events", {"Last-Event-ID": "feedbeef-12"}
                )
            ]
        assert [e["event"] for e in events] == ["snapshot", "completed"]


async def test_a_queued_job_hears_its_place_move(tmp_path: Path) -> None:
    async with open_stack(tmp_path, SLOW) as stack:
        first = [(await stack.submit(f"q{i} {TINY}", f"user{i}"))["job_id"] for i in range(3)]
        last = (await stack.submit(f"last {TINY}", "late"))["job_id"]
        places: list[int] = []
        with trio.fail_after(30):
            async for event in sse(stack.client, f"/job/{last}/events"):
                if event.get("event") in ("snapshot", "queued"):
                    places.append(event["data"]["queue_position"])
                if event.get("event") == "completed":
                    break
        assert places[0] >= 2 and places == sorted(places, reverse=True), places
        assert places[-1] == 1 and len(set(places)) >= 2
        for job_id in first:
            assert (await stack.wait(job_id))["status"] == "completed"


async def test_heartbeats_keep_an_idle_stream_open(tmp_path: Path) -> None:
    knobs = SimulatorKnobs(step_seconds=0.3, model_load_seconds=0.01)
    async with open_stack(tmp_path, knobs, FATEGEN_EVENTS_HEARTBEAT="0.2") as stack:
        job_id = (await stack.submit(f"slow {TINY}"))["job_id"]
        comments = 0
        with trio.fail_after(30):
            async for event in sse(stack.client, f"/job/{job_id}/events"):
                if event.get("comment") == "keep-alive":
                    comments += 1
                if event.get("event") == "completed":
                    break
        assert comments >= 1


async def test_streams_are_capped_with_a_sentence(tmp_path: Path) -> None:
    knobs = SimulatorKnobs(step_seconds=0.2, model_load_seconds=0.01)
    async with open_stack(tmp_path, knobs, FATEGEN_MAX_STREAMS="1") as stack:
        job_id = (await stack.submit(f"held {TINY}"))["job_id"]
        with trio.fail_after(30):
            async with stack.client.stream("GET", f"/job/{job_id}/events") as held:
                assert held.status_code == 200
                r = await stack.client.get(f"/job/{job_id}/events")
                assert r.status_code == 429
                assert "too many event streams are open (1)" in r.json()["error"]
                assert r.headers["Retry-After"] == "5"
            # The slot is given back when the stream closes.
            async for event in sse(stack.client, f"/job/{job_id}/events"):
                if event.get("event") == "completed":
                    break


async def test_the_stream_of_one_key_has_its_jobs_only(tmp_path: Path) -> None:
    keys = "alpha:" + "a" * 20 + ",beta:" + "b" * 20
    async with open_stack(tmp_path, FATEGEN_API_KEYS=keys) as stack:
        alpha = {"Authorization": "Bearer " + "a" * 20}
        beta = {"Authorization": "Bearer " + "b" * 20}
        got: list[dict[str, Any]] = []
        mine: list[str] = []

        async def listen(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async for event in sse(stack.client, "/events", alpha):
                if event.get("comment") == "connected":
                    task_status.started()
                    continue
                if "event" in event:
                    got.append(event)
                    done = {e["data"]["job_id"] for e in got if e["event"] == "completed"}
                    if mine and done >= set(mine):
                        return

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(listen)
                for i in range(2):
                    r = await stack.client.post(
                        "/request", json={"message": f"b{i} {TINY}", "nick": "bob"}, headers=beta
                    )
                    assert r.status_code == 200
                for i in range(2):
                    r = await stack.client.post(
                        "/request", json={"message": f"a{i} {TINY}", "nick": "amy"}, headers=alpha
                    )
                    mine.append(r.json()["job_id"])
        assert {e["data"]["job_id"] for e in got} == set(mine)
        for job_id in mine:
            kinds = [e["event"] for e in got if e["data"]["job_id"] == job_id]
            assert kinds[0] == "queued" and "started" in kinds and kinds[-1] == "completed"
        r = await stack.client.get("/events")
        assert r.status_code == 401


async def test_previews_come_only_when_asked_for(tmp_path: Path) -> None:
    import base64
    import io

    from PIL import Image

    knobs = SimulatorKnobs(step_seconds=0.15, model_load_seconds=0.01)
    async with open_stack(tmp_path, knobs) as stack:
        r = await stack.client.post(
            "/request",
            json={"message": f"a moth {TINY}", "nick": "pia", "previews": True},
        )
        job_id = r.json()["job_id"]
        plain = (await stack.submit(f"a bee {TINY}", "pia"))["job_id"]
        previews: list[dict[str, Any]] = []
        fetched: list[httpx.Response] = []
        with trio.fail_after(30):
            async for event in sse(stack.client, f"/job/{job_id}/events"):
                if event.get("event") == "preview":
                    previews.append(event["data"])
                    if not fetched:
                        fetched.append(await stack.client.get(f"/job/{job_id}/preview"))
                if event.get("event") == "completed":
                    break
            kinds = [e.get("event") async for e in sse(stack.client, f"/job/{plain}/events")]
        assert previews, "a preview event"
        head, _, encoded = previews[0]["image"].partition(",")
        assert head == "data:image/jpeg;base64"
        assert Image.open(io.BytesIO(base64.b64decode(encoded))).format == "JPEG"
        assert fetched[0].status_code == 200
        assert fetched[0].headers["content-type"] == "image/jpeg"
        assert "preview" not in kinds
        gone = await stack.client.get(f"/job/{job_id}/preview")
        assert gone.status_code == 404 and "no preview now" in gone.json()["error"]
