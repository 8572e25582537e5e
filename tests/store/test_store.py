"""JobStore over JobDB: persistence, reload, waiters, positions, activity, schema."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from fategen.core.prompt import MAX_SEED, GenerationRequest
from fategen.errors import ConfigError
from fategen.store import sqlite as dbmod
from fategen.store.jobs import Job, JobStatus, JobStore
from fategen.store.sqlite import SCHEMA_VERSION, JobDB


def request(prompt: str = "a fox in snow", **changes: Any) -> GenerationRequest:
    fields: dict[str, Any] = dict(
        prompt=prompt,
        negative="blurry, text",
        model="sdxl",
        width=1024,
        height=768,
        count=4,
        seed=12345,
    )
    fields.update(changes)
    return GenerationRequest(**fields)


def job(nick: str = "fate", *, prompt: str = "a fox in snow", **changes: Any) -> Job:
    req = changes.pop("request", None) or request(prompt)
    return Job(id=Job.new_id(), nick=nick, message=f"!gen {prompt}", request=req, **changes)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "jobs.sqlite3"


@pytest.fixture
async def store(path: Path) -> AsyncIterator[JobStore]:
    db = JobDB(path)
    try:
        yield JobStore(db)
    finally:
        db.close()


async def reopen(path: Path) -> tuple[JobDB, JobStore, list[Job]]:
    db = JobDB(path)
    store = JobStore(db)
    interrupted = await store.load()
    return db, store, interrupted


# -- persistence -----------------------------------------------------------------------


async def test_add_and_update_persist_and_reload(store: JobStore, path: Path) -> None:
    jobs = [job("a", prompt="one"), job("b", prompt="two"), job("a", prompt="three ünïcödé 🦊")]
    for j in jobs:
        await store.add(j)
    assert [j.seq for j in jobs] == [1, 2, 3]
    await store.update(jobs[0], status=JobStatus.PROCESSING, started=100.5, attempts=1)
    await store.update(jobs[0], status=JobStatus.COMPLETED, finished=130.25, result="output/x.webp")
    await store.update(
        jobs[1], status=JobStatus.CANCELLED, finished=101.0, cancelled_by="op", error="no"
    )
    await store.update(jobs[2], submitted=42.5, idempotency_key="k-3")

    db, again, _ = await reopen(path)
    try:
        loaded = [await again.get(j.id) for j in jobs]
        assert [j.id for j in loaded] == [j.id for j in jobs]
        assert [j.seq for j in loaded] == [1, 2, 3]
        assert loaded == jobs  # every field, including the GenerationRequest
        assert loaded[0].request == jobs[0].request
        assert isinstance(loaded[0].request, GenerationRequest)
        assert loaded[0].status is JobStatus.COMPLETED
        # New jobs continue the sequence.
        fresh = job("c")
        await again.add(fresh)
        assert fresh.seq == 4
    finally:
        db.close()


async def test_reload_orders_by_seq_not_by_insertion(store: JobStore, path: Path) -> None:
    first, second = job("a"), job("b")
    await store.add(first)
    await store.add(second)
    await store.update(first, seq=10)  # the sequence, not the row order, decides
    db, again, _ = await reopen(path)
    try:
        assert [j.id for j in again.active_jobs()] == [second.id, first.id]
        assert [j.id for j in again.queued()] == [second.id, first.id]
        later = job("c")
        await again.add(later)
        assert later.seq == 11
    finally:
        db.close()


@pytest.mark.parametrize("seed", [0, 2**31, 2**53 + 1, 2**63 - 1, 2**63, MAX_SEED])
async def test_large_seed_survives_sqlite(store: JobStore, path: Path, seed: int) -> None:
    j = job(request=request(seed=seed))
    await store.add(j)
    await store.update(j, status=JobStatus.FAILED, error="x")
    db, again, _ = await reopen(path)
    try:
        loaded = await again.get(j.id)
        assert loaded is not None
        assert loaded.request.seed == seed
        assert type(loaded.request.seed) is int
    finally:
        db.close()
    # The body is JSON text with the exact integer (no float rounding, no column overflow).
    with sqlite3.connect(path) as raw:
        (body,) = raw.execute("SELECT body FROM jobs WHERE id = ?", (j.id,)).fetchone()
    assert f'"seed": {seed}' in body


async def test_awkward_text_survives_sqlite(store: JobStore, path: Path) -> None:
    text = "quote \" back\\slash 'single' \u2014 \u00e9 \U0001f98a \t tab, null-free"
    j = job(request=request(prompt=text, negative="--no; DROP TABLE jobs;"))
    await store.add(j)
    db, again, _ = await reopen(path)
    try:
        loaded = await again.get(j.id)
        assert loaded is not None
        assert loaded.request.prompt == text
        assert loaded.request.negative == "--no; DROP TABLE jobs;"
    finally:
        db.close()


async def test_load_returns_the_jobs_that_were_processing(store: JobStore, path: Path) -> None:
    jobs = [job(str(i)) for i in range(5)]
    for j in jobs:
        await store.add(j)
    await store.update(jobs[0], status=JobStatus.COMPLETED)
    await store.update(jobs[1], status=JobStatus.PROCESSING, attempts=1)
    await store.update(jobs[3], status=JobStatus.PROCESSING, attempts=2)
    await store.update(jobs[4], status=JobStatus.FAILED)
    db, again, interrupted = await reopen(path)
    try:
        assert [j.id for j in interrupted] == [jobs[1].id, jobs[3].id]
        assert [j.attempts for j in interrupted] == [1, 2]
        assert all(again.held(j.id) is j for j in interrupted)
        assert [j.id for j in again.queued()] == [jobs[2].id]
        assert again.active == 3
    finally:
        db.close()


async def test_failed_write_changes_nothing(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = job()
    await store.add(j)

    def broken(_job: Job) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store._db, "save", broken)
    with pytest.raises(sqlite3.OperationalError):
        await store.update(j, status=JobStatus.PROCESSING)
    assert j.status is JobStatus.QUEUED


async def test_concurrent_updates_of_one_job_all_reach_the_disk(
    store: JobStore, path: Path
) -> None:
    j = job()
    await store.add(j)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: store.update(j, status=JobStatus.PROCESSING, started=5.0))
        nursery.start_soon(lambda: store.update(j, submitted=3.0))
        nursery.start_soon(lambda: store.update(j, attempts=1))
    db, again, _ = await reopen(path)
    try:
        loaded = await again.get(j.id)
        assert loaded == j
        assert loaded is not None
        assert (loaded.status, loaded.submitted, loaded.attempts) == (
            JobStatus.PROCESSING,
            3.0,
            1,
        )
    finally:
        db.close()


async def test_db_calls_run_in_a_worker_thread(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = trio.to_thread.run_sync

    async def spy(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", spy)
    j = job()
    await store.add(j)
    await store.update(j, status=JobStatus.COMPLETED)
    await store.delete([j.id])
    await store.load()
    # Writes go through the group commit; a start-up load is one call.
    assert calls == ["_commit", "_commit", "_commit", "load_held"]


# -- idempotency -----------------------------------------------------------------------


async def test_idempotency_lookup_survives_a_reload(store: JobStore, path: Path) -> None:
    a = job("alice", idempotency_key="msg-1")
    b = job("bob", idempotency_key="msg-1")
    await store.add(a)
    await store.add(b)
    assert await store.by_idempotency_key("alice", "msg-1") is a
    db, again, _ = await reopen(path)
    try:
        found = await again.by_idempotency_key("alice", "msg-1")
        assert found is not None and found.id == a.id
        found = await again.by_idempotency_key("bob", "msg-1")
        assert found is not None and found.id == b.id
        assert await again.by_idempotency_key("alice", "msg-2") is None
        assert await again.by_idempotency_key("carol", "msg-1") is None
    finally:
        db.close()


async def test_duplicate_idempotency_key_is_refused_by_the_database(store: JobStore) -> None:
    first = job("alice", idempotency_key="msg-1")
    await store.add(first)
    with pytest.raises(sqlite3.IntegrityError):
        await store.add(job("alice", idempotency_key="msg-1"))
    assert await store.by_idempotency_key("alice", "msg-1") is first
    assert len(store.held_jobs()) == 1


# -- waiting ---------------------------------------------------------------------------


async def test_one_update_wakes_a_thousand_waiters(store: JobStore) -> None:
    j, other = job("a"), job("b")
    await store.add(j)
    await store.add(other)
    woken = 0

    async def waiter(job_id: str) -> None:
        nonlocal woken
        await store.wait_change(job_id)
        woken += 1

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for _ in range(1000):
                nursery.start_soon(waiter, j.id)
            nursery.start_soon(waiter, other.id)
            await trio.testing.wait_all_tasks_blocked()
            assert woken == 0
            await store.update(j, status=JobStatus.PROCESSING)
            await trio.testing.wait_all_tasks_blocked()
            assert woken == 1000
            assert set(store._changed) == {other.id}  # the woken job's event is gone
            store.set_progress(other, 1, 10)
    assert woken == 1001
    assert store._changed == {}
    assert (other.progress_value, other.progress_max) == (1, 10)


async def test_cancelled_waiters_leave_nothing_registered(store: JobStore) -> None:
    j = job()
    await store.add(j)
    await store.update(j, status=JobStatus.COMPLETED)
    with trio.move_on_after(0.01):
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(store.wait_change, j.id)
    assert store._changed == {}


async def test_a_cancelled_waiter_does_not_unregister_the_others(store: JobStore) -> None:
    j = job()
    await store.add(j)
    woken = trio.Event()

    async def stays() -> None:
        await store.wait_change(j.id)
        woken.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stays)
            with trio.move_on_after(0.01):
                await store.wait_change(j.id)
            await store.update(j, status=JobStatus.PROCESSING)
            await woken.wait()


async def test_wake_all(store: JobStore) -> None:
    jobs = [job(str(i)) for i in range(3)]
    for j in jobs:
        await store.add(j)
    done = 0

    async def waiter(job_id: str) -> None:
        nonlocal done
        await store.wait_change(job_id)
        done += 1

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for j in jobs:
                for _ in range(3):
                    nursery.start_soon(waiter, j.id)
            nursery.start_soon(waiter, "unknown-job")
            await trio.testing.wait_all_tasks_blocked()
            store.wake_all()
    assert done == 10
    assert store._changed == {}


async def test_wait_any_change(store: JobStore) -> None:
    j = job()
    await store.add(j)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.wait_any_change)
            await trio.testing.wait_all_tasks_blocked()
            await store.update(j, status=JobStatus.PROCESSING)


async def test_delete_wakes_waiters(store: JobStore) -> None:
    j = job()
    await store.add(j)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.wait_change, j.id)
            await trio.testing.wait_all_tasks_blocked()
            await store.delete([j.id])


# -- queue position --------------------------------------------------------------------


async def test_queue_position(store: JobStore) -> None:
    a, b, c, d = job("a"), job("b"), job("c"), job("d")
    for j in (a, b, c, d):
        await store.add(j)
    assert [store.queue_position(j) for j in (a, b, c, d)] == [1, 2, 3, 4]
    await store.update(a, status=JobStatus.PROCESSING)
    assert [store.queue_position(j) for j in (a, b, c, d)] == [0, 1, 2, 3]
    await store.update(c, status=JobStatus.CANCELLED)
    assert [store.queue_position(j) for j in (a, b, c, d)] == [0, 1, None, 2]
    await store.update(a, status=JobStatus.COMPLETED)
    await store.update(b, status=JobStatus.FAILED)
    assert [store.queue_position(j) for j in (a, b, c, d)] == [None, None, None, 1]
    view = await store.view(d.id)
    assert view is not None
    assert view.queue_position == 1
    assert view.request == d.request
    assert await store.view("nope") is None


class NewestFirst:
    """A queue index that runs the newest job first, and records what it is told."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.told: list[tuple[str, str]] = []

    def add(self, job: Job) -> None:
        self.jobs[job.id] = job
        self.told.append(("add", job.id))

    def discard(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        self.told.append(("discard", job.id))

    def ordered(self) -> list[Job]:
        return sorted(self.jobs.values(), key=lambda j: -j.seq)

    def position(self, job: Job) -> int | None:
        order = [j.id for j in self.ordered()]
        return order.index(job.id) + 1 if job.id in order else None


async def test_queue_position_follows_the_installed_index(store: JobStore) -> None:
    a, b, c = job("a"), job("b"), job("c")
    for j in (a, b):
        await store.add(j)
    index = NewestFirst()
    store.use_index(index)  # told of the jobs queued already
    await store.add(c)
    assert [store.queue_position(j) for j in (a, b, c)] == [3, 2, 1]
    assert store.queued() == [c, b, a]
    # Told of each job leaving the queue, and of one coming back.
    await store.update(a, status=JobStatus.PROCESSING)
    await store.update(a, status=JobStatus.QUEUED)
    await store.update(b, status=JobStatus.CANCELLED)
    await store.update(b, error="no longer queued: not told again")
    assert index.told == [
        ("add", a.id),
        ("add", b.id),
        ("add", c.id),
        ("discard", a.id),
        ("add", a.id),
        ("discard", b.id),
    ]
    assert [store.queue_position(j) for j in (a, b, c)] == [2, None, 1]


async def test_count_queued(store: JobStore) -> None:
    for nick in "aab":
        await store.add(job(nick))
    assert store.count_queued() == 3
    assert store.count_queued("a") == 2
    assert store.count_queued("z") == 0


# -- activity --------------------------------------------------------------------------


async def test_on_activity_is_called_on_idle_busy_transitions_only(store: JobStore) -> None:
    calls: list[int] = []
    store.on_activity = calls.append
    a, b = job("a"), job("b")
    await store.add(a)
    await store.add(b)
    await store.update(a, status=JobStatus.PROCESSING)
    store.set_progress(a, 3, 10)
    await store.update(a, status=JobStatus.COMPLETED)
    await store.update(b, status=JobStatus.PROCESSING)
    await store.update(b, status=JobStatus.COMPLETED)
    await store.update(b, error="late note")  # finished stays finished: nothing to say
    c = job("c")
    await store.add(c)
    await store.delete([c.id])
    assert [active > 0 for active in calls] == [True, False, True, False]
    assert calls[0] == 1 and calls[-1] == 0
    assert store.active == 0


async def test_on_activity_after_load(store: JobStore, path: Path) -> None:
    await store.add(job())
    db = JobDB(path)
    try:
        again = JobStore(db)
        calls: list[int] = []
        again.on_activity = calls.append
        await again.load()
        assert calls == [1]
    finally:
        db.close()


# -- delete ----------------------------------------------------------------------------


async def test_delete(store: JobStore, path: Path) -> None:
    keep, gone = job("a", idempotency_key="k1"), job("a", idempotency_key="k2")
    await store.add(keep)
    await store.add(gone)
    await store.update(gone, status=JobStatus.COMPLETED)
    await store.delete([gone.id])
    assert await store.get(gone.id) is None
    assert await store.view(gone.id) is None
    assert await store.by_idempotency_key("a", "k2") is None
    assert await store.by_idempotency_key("a", "k1") is keep
    db, again, _ = await reopen(path)
    try:
        assert [j.id for j in again.held_jobs()] == [keep.id]
        # The key is free again.
        await again.add(job("a", idempotency_key="k2"))
    finally:
        db.close()


async def test_delete_nothing_and_unknown(store: JobStore) -> None:
    await store.delete([])
    await store.delete([job().id])
    assert store.held_jobs() == []


# -- schema ----------------------------------------------------------------------------


def test_schema_version_is_set(path: Path) -> None:
    JobDB(path).close()
    with sqlite3.connect(path) as raw:
        (version,) = raw.execute("PRAGMA user_version").fetchone()
        (mode,) = raw.execute("PRAGMA journal_mode").fetchone()
    assert version == SCHEMA_VERSION
    assert mode == "wal"


def test_reopening_keeps_the_schema(path: Path) -> None:
    JobDB(path).close()
    JobDB(path).close()
    with sqlite3.connect(path) as raw:
        (version,) = raw.execute("PRAGMA user_version").fetchone()
    assert version == SCHEMA_VERSION


def test_newer_database_refuses_to_open(path: Path) -> None:
    JobDB(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError) as caught:
        JobDB(path)
    message = str(caught.value)
    assert "newer" in message
    assert str(path) in message
    assert "\n" not in message
    # The file is left alone (and not held open).
    with sqlite3.connect(path) as raw:
        (version,) = raw.execute("PRAGMA user_version").fetchone()
    assert version == SCHEMA_VERSION + 1


def test_failed_migration_rolls_back(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(dbmod.MIGRATIONS, 1, "CREATE TABLE t (x); CREATE TABLE t (x)")
    with pytest.raises(sqlite3.OperationalError):
        JobDB(path)
    with sqlite3.connect(path) as raw:
        (version,) = raw.execute("PRAGMA user_version").fetchone()
        tables = raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    assert version == 0
    assert tables == []


async def test_in_memory_database() -> None:
    db = JobDB(None)
    try:
        store = JobStore(db)
        j = job()
        await store.add(j)
        assert await db.run(db.load_all) == [j]
    finally:
        db.close()
