"""Webhooks over real sockets: a job's end POSTed to a local receiver, signed so the
`standardwebhooks` verifier accepts it; its start when asked; URLs on private addresses
refused at submit (one sentence) unless the operator allows them; the delivery's state on the
job; and the retry schedule on trio's mock clock."""

from __future__ import annotations

import base64
import itertools
import os
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
from standardwebhooks.webhooks import Webhook

from conftest import Receiver, open_stack
from fategen.core.webhooks import RETRY_SCHEDULE, DeliveryState
from fategen.queue.webhooks import WebhookSender
from fategen.store.sqlite import Outgoing

TINY = "-m tiny -w 256 -h 256"
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


def verified(headers: dict[str, str], body: bytes) -> Any:
    """The payload, once `standardwebhooks` accepts its signature."""
    lower = {k.lower(): v for k, v in headers.items()}
    return Webhook(SECRET).verify(body, lower)


async def test_a_jobs_end_is_posted_signed(tmp_path: Path) -> None:
    async with (
        Receiver().running() as receiver,
        open_stack(
            tmp_path, FATEGEN_WEBHOOK_SECRET=SECRET, FATEGEN_WEBHOOK_ALLOW_PRIVATE="1"
        ) as stack,
    ):
        r = await stack.client.post(
            "/request",
            json={
                "message": f"a heron {TINY}",
                "nick": "ana",
                "webhook_url": receiver.url,
                "webhook_started": True,
            },
        )
        assert r.status_code == 200, r.text
        job_id = r.json()["job_id"]
        _, started = await receiver.next()
        headers, completed = await receiver.next()
        assert started["type"] == "job.started"
        assert completed["type"] == "job.completed"
        assert completed["data"]["job_id"] == job_id
        assert completed["data"]["image_url"].endswith(f"/job/{job_id}/image")
        payload = verified(*receiver.received[1])
        assert payload["data"]["status"] == "completed"
        assert headers["webhook-id"].startswith("msg_")
        assert headers["webhook-signature"].startswith("v1,")
        # A signature made with another secret is refused by the same verifier.
        other = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        with pytest.raises(Exception, match="signature"):
            Webhook(other).verify(
                receiver.received[1][1], {k.lower(): v for k, v in headers.items()}
            )
        with trio.fail_after(10):
            while True:
                hooks = (await stack.client.get(f"/job/{job_id}")).json()["webhooks"]
                if all(h["state"] == "delivered" for h in hooks) and len(hooks) == 2:
                    break
                await trio.sleep(0.05)
        assert [h["event"] for h in hooks] == ["job.started", "job.completed"]
        assert [h["attempts"] for h in hooks] == [1, 1]


async def test_a_failed_job_is_posted_with_its_reason(tmp_path: Path) -> None:
    async with (
        Receiver().running() as receiver,
        open_stack(
            tmp_path, FATEGEN_WEBHOOK_SECRET=SECRET, FATEGEN_WEBHOOK_ALLOW_PRIVATE="1"
        ) as stack,
    ):
        stack.sim.knobs.execution_error = 1
        r = await stack.client.post(
            "/request",
            json={"message": f"doomed {TINY}", "nick": "ana", "webhook_url": receiver.url},
        )
        assert r.status_code == 200
        _, payload = await receiver.next()
        assert payload["type"] == "job.failed"
        assert payload["data"]["error"]


@pytest.mark.parametrize(
    ("url", "sentence"),
    [
        ("http://127.0.0.1:9/hook", "loopback, private or link-local"),
        ("http://10.1.2.3/hook", "loopback, private or link-local"),
        ("http://169.254.169.254/latest/meta-data", "loopback, private or link-local"),
        ("http://[::1]:8000/", "loopback, private or link-local"),
        ("http://localhost:8000/", "loopback, private or link-local"),
        ("ftp://example.org/", "must start with http:// or https://"),
        ("http://user:pw@example.org/", "user name or password"),
    ],
)
async def test_private_and_bad_webhook_urls_are_refused(
    tmp_path: Path, url: str, sentence: str
) -> None:
    async with open_stack(tmp_path, FATEGEN_WEBHOOK_SECRET=SECRET) as stack:
        r = await stack.client.post(
            "/request", json={"message": f"x {TINY}", "nick": "eve", "webhook_url": url}
        )
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert sentence in error and "\n" not in error
        assert stack.running.store.count_queued() == 0


async def test_webhooks_need_a_secret(tmp_path: Path) -> None:
    async with open_stack(tmp_path, FATEGEN_WEBHOOK_ALLOW_PRIVATE="1") as stack:
        r = await stack.client.post(
            "/request",
            json={"message": f"x {TINY}", "nick": "eve", "webhook_url": "http://127.0.0.1:9/"},
        )
        assert r.status_code == 400
        assert "FATEGEN_WEBHOOK_SECRET" in r.json()["error"]


class MemoryOutbox:
    """The store's outbox in memory, without SQLite's thread: on trio's mock clock a wait
    for a thread lets the clock jump ahead, which would blur the times under test. The
    store's own outbox is tested over real sockets above."""

    def __init__(self) -> None:
        self.rows: dict[str, Outgoing] = {}
        self.lot = trio.lowlevel.ParkingLot()

    def add(self, delivery: Outgoing) -> None:
        self.rows[delivery.state.id] = delivery
        self.lot.unpark_all()

    async def due_deliveries(self, before: float, limit: int) -> list[Outgoing]:
        due = [
            d
            for d in self.rows.values()
            if d.state.state == "pending"
            and d.state.next_at is not None
            and d.state.next_at <= before
        ]
        return sorted(due, key=lambda d: d.state.next_at or 0)[:limit]

    async def next_delivery_due(self) -> float | None:
        times = [
            d.state.next_at
            for d in self.rows.values()
            if d.state.state == "pending" and d.state.next_at is not None
        ]
        return min(times, default=None)

    async def record_attempt(self, state: DeliveryState) -> None:
        self.rows[state.id] = attrs.evolve(self.rows[state.id], state=state)
        self.lot.unpark_all()

    async def wait_deliveries(self) -> None:
        await self.lot.park()


async def test_failed_attempts_follow_the_schedule_then_give_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    outbox = MemoryOutbox()
    attempts: list[float] = []
    bodies: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        attempts.append(trio.current_time())
        bodies.append(request.content)
        return httpx.Response(503)

    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http,
        trio.open_nursery() as nursery,
    ):
        sender = WebhookSender(
            outbox, http, lambda key: SECRET, allow_private=True, now=trio.current_time
        )
        await nursery.start(sender.run)
        start = trio.current_time()
        state = DeliveryState(
            id="msg_1",
            job_id="j",
            event="job.failed",
            url="http://127.0.0.1:9/hook",
            state="pending",
            attempts=0,
            next_at=start,
        )
        outbox.add(Outgoing(state, None, '{"type": "job.failed"}'))
        await trio.sleep(sum(RETRY_SCHEDULE) * 2)  # all of them, and nothing after
        nursery.cancel_scope.cancel()
    assert [t - start for t in attempts] == list(itertools.accumulate(RETRY_SCHEDULE))
    final = outbox.rows["msg_1"].state
    assert (final.state, final.attempts, final.last_status) == ("failed", 8, 503)
    assert final.last_error == "answered 503"
    assert set(bodies) == {b'{"type": "job.failed"}'}
