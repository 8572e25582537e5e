"""The webhook sender actor: POSTs each pending delivery of the outbox (written by the store in
the same commit as the job change it tells of), signed the Standard Webhooks way
(``webhook-id``, ``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256>``; the
``standardwebhooks`` package signs), and tries a failed one again on Svix's schedule
(`fategen.core.webhooks.RETRY_SCHEDULE`). Success is a 2xx answer within 15 s; redirects are
not followed. A restart or a crash loses no delivery: the outbox is on disk, and an attempt
under way when fategen stopped is made again (receivers tell repeats by ``webhook-id``).

Every URL is checked again before each attempt: its host must resolve to public addresses only
(unless the operator allows private ones), so a bot cannot make fategen call into the
operator's network, not even by changing its DNS after the submit.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from typing import NoReturn, Protocol
from urllib.parse import urlsplit

import attrs
import httpx
import trio
from standardwebhooks.webhooks import Webhook

from fategen.core.webhooks import (
    ATTEMPT_TIMEOUT,
    DeliveryState,
    address_refusal,
    next_attempt,
    url_refusal,
)
from fategen.store.sqlite import Outgoing

log = logging.getLogger("fategen.webhooks")

#: Deliveries attempted at once.
CONCURRENT = 8
#: An attempt under way is due again this long after it began (if fategen stopped in it).
IN_FLIGHT_GRACE = ATTEMPT_TIMEOUT + 15


async def webhook_refusal(url: str, *, allow_private: bool) -> str | None:
    """Why fategen will not call ``url`` (one sentence), or None: a bad URL, a host that does
    not resolve, or (unless ``allow_private``) one that resolves to a private address."""
    refusal = url_refusal(url)
    if refusal is not None:
        return refusal
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    except OSError:
        return f"the webhook host {host!r} does not resolve"
    if allow_private:
        return None
    return address_refusal(host, [str(info[4][0]) for info in infos])


class Outbox(Protocol):
    """What the sender needs of the store (`fategen.store.jobs.JobStore`)."""

    async def due_deliveries(self, before: float, limit: int) -> list[Outgoing]: ...
    async def next_delivery_due(self) -> float | None: ...
    async def record_attempt(self, state: DeliveryState) -> None: ...
    async def wait_deliveries(self) -> None: ...


@attrs.define(eq=False)
class WebhookSender:
    store: Outbox
    http: httpx.AsyncClient
    #: The signing secret (``whsec_...``) for the deliveries of an API key (None: keys off).
    secret_for: Callable[[str | None], str | None]
    allow_private: bool = False
    #: The wall clock the outbox's times are on (tests give trio's mock clock).
    now: Callable[[], float] = time.time
    concurrency: int = CONCURRENT
    _in_flight: set[str] = attrs.field(factory=set, init=False)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        limiter = trio.CapacityLimiter(self.concurrency)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                for delivery in await self.store.due_deliveries(self.now(), 64):
                    if delivery.state.id in self._in_flight:
                        continue
                    # Due again later should fategen stop during the attempt.
                    begun = attrs.evolve(delivery.state, next_at=self.now() + IN_FLIGHT_GRACE)
                    await self.store.record_attempt(begun)
                    self._in_flight.add(begun.id)
                    nursery.start_soon(self._deliver, attrs.evolve(delivery, state=begun), limiter)
                due = await self.store.next_delivery_due()
                wait = 3600.0 if due is None else max(0.0, due - self.now())
                with trio.move_on_after(wait):
                    await self.store.wait_deliveries()

    async def _deliver(self, delivery: Outgoing, limiter: trio.CapacityLimiter) -> None:
        try:
            async with limiter:
                state = await self._attempt(delivery)
            await self.store.record_attempt(state)
        finally:
            self._in_flight.discard(delivery.state.id)

    async def _attempt(self, delivery: Outgoing) -> DeliveryState:
        state = delivery.state
        attempts = state.attempts + 1
        status: int | None = None
        error: str | None = None
        secret = self.secret_for(delivery.key_name)
        refusal = await webhook_refusal(state.url, allow_private=self.allow_private)
        if secret is None:
            error = "no webhook secret is configured (FATEGEN_WEBHOOK_SECRET)"
        elif refusal is not None:
            error = refusal
        else:
            sent_at = datetime.datetime.fromtimestamp(self.now(), datetime.UTC)
            headers = {
                "webhook-id": state.id,
                "webhook-timestamp": str(int(sent_at.timestamp())),
                "webhook-signature": Webhook(secret).sign(state.id, sent_at, delivery.payload),
                "content-type": "application/json",
                "user-agent": "fategen-webhooks",
            }
            try:
                with trio.fail_after(ATTEMPT_TIMEOUT):
                    response = await self.http.post(
                        state.url, content=delivery.payload.encode(), headers=headers
                    )
                status = response.status_code
                if not 200 <= status < 300:
                    error = f"answered {status}"
            except trio.TooSlowError:
                error = f"no answer within {ATTEMPT_TIMEOUT:g} s"
            except httpx.HTTPError as exc:
                error = f"could not be reached: {exc or type(exc).__name__}"
        now = self.now()
        if error is None:
            log.info("webhook %s of job %s delivered (%s)", state.id, state.job_id, state.event)
            return attrs.evolve(
                state,
                state="delivered",
                attempts=attempts,
                next_at=None,
                last_status=status,
                last_error=None,
                delivered=now,
            )
        again = next_attempt(attempts, now)
        log.warning(
            "webhook %s of job %s (%s) to %s: %s; %s",
            state.id,
            state.job_id,
            state.event,
            urlsplit(state.url).hostname,
            error,
            "given up" if again is None else f"attempt {attempts + 1} in {again - now:.0f} s",
        )
        return attrs.evolve(
            state,
            state="pending" if again is not None else "failed",
            attempts=attempts,
            next_at=again,
            last_status=status,
            last_error=error,
        )
