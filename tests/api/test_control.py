"""The operator's queue control over real sockets: pause and resume (kept across a restart),
paged listings, retry, priority, cancelling a nick's jobs, the live figures, and the admin key
they need."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import Stack, open_stack
from fategen.simulator import SimulatorKnobs

TINY = "-m tiny -w 256 -h 256"
ADMIN = "ops:" + "o" * 24
USER = "bot:" + "u" * 24
AS_ADMIN = {"Authorization": "Bearer " + "o" * 24}
AS_USER = {"Authorization": "Bearer " + "u" * 24}


async def submit(stack: Stack, text: str, nick: str, headers: dict[str, str] | None = None) -> str:
    r = await stack.client.post(
        "/request", json={"message": f"{text} {TINY}", "nick": nick}, headers=headers or {}
    )
    assert r.status_code == 200, r.text
    job_id: str = r.json()["job_id"]
    return job_id


async def status_of(stack: Stack, job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = (await stack.client.get(f"/job/{job_id}")).json()
    return body


async def test_pause_holds_the_queue_and_resume_runs_it(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        r = await stack.client.post("/queue/pause")
        assert r.json() == {"paused": True, "queued": 0, "processing": 0}
        assert (await stack.client.get("/ready")).json()["paused"] is True
        job_id = await submit(stack, "held", "ann")  # submissions go on
        await trio.sleep(0.5)
        assert (await status_of(stack, job_id))["status"] == "queued"
        assert stack.sim.executions == []
        r = await stack.client.post("/queue/resume")
        assert r.json()["paused"] is False
        assert (await stack.wait(job_id))["status"] == "completed"


async def test_a_pause_survives_a_restart(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        await stack.client.post("/queue/pause")
        job_id = await submit(stack, "kept", "ann")
    async with open_stack(tmp_path) as stack:
        assert (await stack.client.get("/queue")).json()["paused"] is True
        await trio.sleep(0.5)
        assert (await status_of(stack, job_id))["status"] == "queued"
        await stack.client.post("/queue/resume")
        assert (await stack.wait(job_id))["status"] == "completed"


async def test_listings_in_queue_order_and_newest_first_paged(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        done = [await submit(stack, f"d{i}", "ann") for i in range(3)]
        for job_id in done:
            await stack.wait(job_id)
        await stack.client.post("/queue/pause")
        waiting = [await submit(stack, f"w{i}", nick) for i, nick in enumerate("abcab")]
        r = await stack.client.get("/jobs", params={"status": "queued", "limit": 2})
        page = r.json()
        assert [j["queue_position"] for j in page["jobs"]] == [1, 2]
        listed = [j["job_id"] for j in page["jobs"]]
        while page["next_cursor"] is not None:
            r = await stack.client.get(
                "/jobs", params={"status": "queued", "limit": 2, "cursor": page["next_cursor"]}
            )
            page = r.json()
            listed += [j["job_id"] for j in page["jobs"]]
        order = [
            j["job_id"]
            for j in sorted(
                [await status_of(stack, w) for w in waiting], key=lambda j: j["queue_position"]
            )
        ]
        assert listed == order and sorted(listed) == sorted(waiting)
        r = await stack.client.get("/jobs", params={"status": "queued", "nick": "a"})
        assert {j["nick"] for j in r.json()["jobs"]} == {"a"}
        r = await stack.client.get("/jobs", params={"status": "completed", "limit": 2})
        first = r.json()
        assert [j["job_id"] for j in first["jobs"]] == done[::-1][:2]
        r = await stack.client.get(
            "/jobs", params={"status": "completed", "limit": 2, "cursor": first["next_cursor"]}
        )
        assert [j["job_id"] for j in r.json()["jobs"]] == done[:1]
        assert r.json()["next_cursor"] is None
        bad = await stack.client.get("/jobs", params={"status": "completed", "cursor": "x"})
        assert bad.status_code == 400 and "cursor" in bad.json()["error"]
        big = await stack.client.get("/jobs", params={"limit": 100000})
        assert big.status_code == 400 and "limit must be from 1 to 500" in big.json()["error"]


async def test_retry_makes_a_new_job_with_the_same_request(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        stack.sim.knobs.execution_error = 1
        failed = await submit(stack, "unlucky -s 4242", "ann")
        assert (await stack.wait(failed))["status"] == "failed"
        r = await stack.client.post(f"/job/{failed}/retry")
        assert r.status_code == 200, r.text
        again = r.json()
        assert again["retry_of"] == failed and again["job_id"] != failed
        assert (again["seed"], again["prompt"], again["nick"]) == (4242, "unlucky", "ann")
        assert (await stack.wait(again["job_id"]))["status"] == "completed"
        r = await stack.client.post(f"/job/{again['job_id']}/retry")
        assert r.status_code == 409 and "only a failed or cancelled job" in r.json()["error"]


async def test_priority_to_the_front_of_a_users_jobs_or_the_queue(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        await stack.client.post("/queue/pause")
        ann = [await submit(stack, f"a{i}", "ann") for i in range(3)]
        bob = [await submit(stack, f"b{i}", "bob") for i in range(2)]
        before = (await status_of(stack, ann[2]))["queue_position"]
        r = await stack.client.post(f"/job/{ann[2]}/priority", json={"scope": "user"})
        assert r.status_code == 200, r.text
        # Ann's turn comes first: her last job now takes her first place.
        assert r.json()["queue_position"] == 1 < before
        r = await stack.client.post(f"/job/{bob[1]}/priority", json={"scope": "queue"})
        assert r.json()["queue_position"] == 1
        positions = {j: (await status_of(stack, j))["queue_position"] for j in ann + bob}
        assert sorted(positions.values()) == [1, 2, 3, 4, 5]
        assert positions[ann[2]] == 2
        bad = await stack.client.post(f"/job/{ann[0]}/priority", json={"scope": "world"})
        assert bad.status_code == 400
        await stack.client.post("/queue/resume")
        for job_id in ann + bob:
            await stack.wait(job_id)
        started = [e.prompt_id for e in stack.sim.executions]
        assert started[0] == bob[1] and started.index(ann[2]) < started.index(ann[0])


async def test_cancel_every_job_of_a_nick(tmp_path: Path) -> None:
    async with open_stack(tmp_path, SimulatorKnobs(step_seconds=0.05)) as stack:
        mine = [await submit(stack, f"m{i}", "spam") for i in range(3)]
        other = await submit(stack, "o", "calm")
        r = await stack.client.post("/jobs/cancel", params={"nick": "spam"})
        assert sorted(r.json()["cancelled"]) == sorted(mine)
        for job_id in mine:
            assert (await stack.wait(job_id))["status"] == "cancelled"
        assert (await stack.wait(other))["status"] == "completed"
        r = await stack.client.post("/jobs/cancel")
        assert r.status_code == 400 and "?nick=" in r.json()["error"]


async def test_the_figures_of_the_last_hour(tmp_path: Path) -> None:
    async with open_stack(tmp_path) as stack:
        for i in range(3):
            await stack.wait(await submit(stack, f"f{i}", "ann"))
        stack.sim.knobs.execution_error = 1
        await stack.wait(await submit(stack, "x", "ann"))
        figures = (await stack.client.get("/stats")).json()
        assert figures["completed_last_hour"] == 3 and figures["failed_last_hour"] == 1
        assert figures["median_wait_seconds"] is not None
        assert 0 <= figures["median_wait_seconds"] < 30
        assert (figures["queued"], figures["processing"]) == (0, 0)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/jobs"),
        ("GET", "/queue"),
        ("POST", "/queue/pause"),
        ("POST", "/queue/resume"),
        ("GET", "/stats"),
        ("POST", "/jobs/cancel?nick=x"),
    ],
)
async def test_control_needs_an_admin_key(tmp_path: Path, method: str, path: str) -> None:
    async with open_stack(tmp_path, FATEGEN_API_KEYS=USER, FATEGEN_ADMIN_KEYS=ADMIN) as stack:
        assert (await stack.client.request(method, path)).status_code == 401
        r = await stack.client.request(method, path, headers=AS_USER)
        assert r.status_code == 403 and "needs an admin key" in r.json()["error"]
        assert (await stack.client.request(method, path, headers=AS_ADMIN)).status_code == 200


async def test_admin_actions_are_logged_with_the_key_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "fategen")
    async with open_stack(tmp_path, FATEGEN_API_KEYS=USER, FATEGEN_ADMIN_KEYS=ADMIN) as stack:
        await stack.client.post("/queue/pause", headers=AS_ADMIN)
        await stack.client.post("/queue/resume", headers=AS_ADMIN)
    lines = [r.getMessage() for r in caplog.records]
    assert "queue paused by admin:ops" in lines and "queue resumed by admin:ops" in lines
