"""The job events: every change a user would care about, recorded by the store as it applies
the change (the one source of truth), for the Server-Sent Event streams.

`EventFeed` keeps the last `RING` events in memory, each with an id from one counter, so a
stream that reconnects with ``Last-Event-ID`` gets what it missed (an id older than the ring,
or from before a restart, gets a fresh snapshot instead). Lifecycle events (``queued`` when a
job is submitted or queued again, ``started``, ``completed``, ``failed``, ``cancelled``) are
all recorded; ``progress`` at most every `PROGRESS_EVERY` seconds per job (and its last step).
Queue positions are not events here: they change for every queued job at each dispatch, so a
stream reads its job's position when `queue_moved` wakes it.

Costs: recording is O(1); `since` is O(log r + k) for the k events after an id (r: the ring).
"""

from __future__ import annotations

import bisect
import collections
import itertools
import secrets
import time
from collections.abc import Iterator

import attrs
import trio

__all__ = ["FINAL_EVENTS", "PROGRESS_EVERY", "RING", "EventFeed", "JobEvent"]

#: Events kept for resuming streams.
RING = 4096
#: Seconds between two progress events of one job (its last step is always recorded).
PROGRESS_EVERY = 0.25
#: Seconds between two preview events of one job.
PREVIEW_EVERY = 0.5
#: The events after which a job's stream ends.
FINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})


@attrs.frozen(slots=True)
class JobEvent:
    """One change of one job. ``id`` orders every event of the service (this run)."""

    id: int
    type: str
    job_id: str
    key_name: str | None
    nick: str


class EventFeed:
    """The recent job events, in order, and the tasks waiting for the next ones."""

    def __init__(self, size: int = RING) -> None:
        #: Tells this run's ids from a previous run's (``Last-Event-ID: <boot>-<n>``).
        self.boot = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._events: collections.deque[JobEvent] = collections.deque(maxlen=size)
        self._last_id = 0
        self._new = trio.lowlevel.ParkingLot()
        self._queue = trio.lowlevel.ParkingLot()
        #: Job id -> when its last progress event was recorded (jobs running now only).
        self._progress_at: dict[str, float] = {}
        self._preview_at: dict[str, float] = {}

    @property
    def last_id(self) -> int:
        return self._last_id

    def event_id(self, event_id: int) -> str:
        """The id as streams send it."""
        return f"{self.boot}-{event_id}"

    def parse_id(self, text: str | None) -> int | None:
        """The number of an id this run sent, or None (absent, malformed, another run's)."""
        if not text:
            return None
        boot, _, number = text.strip().partition("-")
        if boot != self.boot or not number.isdigit():
            return None
        return int(number)

    def record(self, type_: str, job_id: str, key_name: str | None, nick: str) -> JobEvent:
        """Record an event (O(1)) and wake the streams."""
        event = JobEvent(next(self._ids), type_, job_id, key_name, nick)
        self._events.append(event)
        self._last_id = event.id
        if type_ != "progress":
            self._progress_at.pop(job_id, None)
        self._new.unpark_all()
        return event

    def progress(
        self, job_id: str, key_name: str | None, nick: str, value: int, maximum: int
    ) -> None:
        """Record a progress event unless the job had one less than `PROGRESS_EVERY` ago
        (the last step always counts)."""
        now = time.monotonic()
        last = self._progress_at.get(job_id)
        if last is not None and now - last < PROGRESS_EVERY and value < maximum:
            return
        self._progress_at[job_id] = now
        self.record("progress", job_id, key_name, nick)

    def preview(self, job_id: str, key_name: str | None, nick: str) -> None:
        """A new preview of the job, recorded at most every `PREVIEW_EVERY` seconds."""
        now = time.monotonic()
        last = self._preview_at.get(job_id)
        if last is not None and now - last < PREVIEW_EVERY:
            return
        self._preview_at[job_id] = now
        if len(self._preview_at) > 1024:  # jobs that ended: forget the oldest
            self._preview_at.pop(next(iter(self._preview_at)))
        self.record("preview", job_id, key_name, nick)

    def since(self, after: int) -> Iterator[JobEvent] | None:
        """The events after id ``after``, in order; None if some of them left the ring."""
        events = self._events
        if after >= self._last_id:
            return iter(())
        if not events or events[0].id > after + 1:
            return None
        start = bisect.bisect_right(_Ids(events), after)
        return itertools.islice(events, start, None)

    async def wait_after(self, after: int) -> None:
        """Until an event newer than ``after`` is recorded."""
        while self._last_id <= after:
            await self._new.park()

    def queue_moved(self) -> None:
        """The queue changed (a job queued, started, cancelled): positions may have moved."""
        self._queue.unpark_all()

    async def wait_queue_moved(self) -> None:
        await self._queue.park()


class _Ids:
    """The ids of a deque of events, as a sequence `bisect` can search (O(1) per look)."""

    __slots__ = ("_events",)

    def __init__(self, events: collections.deque[JobEvent]) -> None:
        self._events = events

    def __len__(self) -> int:
        return len(self._events)

    def __getitem__(self, index: int) -> int:
        return self._events[index].id
