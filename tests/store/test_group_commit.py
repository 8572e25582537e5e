"""Durable, grouped writes: synchronous=FULL, concurrent writes share one commit, each caller
returns only once its write is committed, a failing write fails alone, and the writes of one
job reach the disk in the order they were made."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.lowlevel

from fategen.core.prompt import GenerationRequest
from fategen.store.jobs import Job, JobStatus, JobStore
from fategen.store.sqlite import JobDB

REQUEST = GenerationRequest(
    prompt="p", negative="", model="tiny", width=256, height=256, count=1, seed=1
)


def job(nick: str = "fate", **changes: Any) -> Job:
    return Job(id=Job.new_id(), nick=nick, message="p", request=REQUEST, **changes)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "jobs.sqlite3"


@pytest.fixture
async def db(path: Path) -> AsyncIterator[JobDB]:
    db = JobDB(path)
    try:
        yield db
    finally:
        db.close()


def count_commits(db: JobDB) -> list[str]:
    """The COMMIT statements the connection runs from now on (sqlite3's trace hook)."""
    commits: list[str] = []
    db._conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    return commits


def on_disk(path: Path) -> dict[str, Job]:
    """What another connection sees: only committed rows."""
    with sqlite3.connect(path) as raw:
        rows = raw.execute("SELECT id, body FROM jobs").fetchall()
    from fategen.store.model import job_from_body

    return {job_id: job_from_body(body) for job_id, body in rows}


async def test_synchronous_is_full(db: JobDB) -> None:
    (mode,) = await db.run(lambda: db._conn.execute("PRAGMA synchronous").fetchone())
    assert mode == 2  # FULL: each commit fsyncs the WAL


async def test_concurrent_adds_share_commits(db: JobDB, path: Path) -> None:
    store = JobStore(db)
    commits = count_commits(db)
    jobs = [job(f"user{i}") for i in range(64)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for j in jobs:
                nursery.start_soon(store.add, j)
    # The first add commits at once; the others queued meanwhile go together.
    assert 1 <= len(commits) <= 2, commits
    stats = db.statistics()
    assert (stats.commits, stats.writes, stats.pending) == (len(commits), 64, 0)
    assert stats.largest_group >= 63
    assert set(on_disk(path)) == {j.id for j in jobs}
    assert sorted(j.seq for j in jobs) == list(range(1, 65))


async def test_each_caller_returns_only_after_its_commit(
    db: JobDB, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(db)
    committed: set[str] = set()
    real = db._commit

    def commit(batch: Any) -> None:
        real(batch)
        committed.update(w.args[0].id for w in batch if w.error is None)

    monkeypatch.setattr(db, "_commit", commit)
    early: list[str] = []

    async def add(j: Job) -> None:
        await store.add(j)
        if j.id not in committed:
            early.append(j.id)
        # And a connection of its own sees it: it is in the file, not in a transaction.
        if j.id not in await trio.to_thread.run_sync(on_disk, path):
            early.append(j.id)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(add, job(f"user{i}"))
    assert early == []
    assert db.statistics().commits < 40


async def test_a_failing_write_fails_alone(db: JobDB, path: Path) -> None:
    store = JobStore(db)
    first = job("alice", idempotency_key="k")
    await store.add(first)
    commits = count_commits(db)
    duplicate = job("alice", idempotency_key="k")  # the unique index refuses it
    others = [job(f"user{i}") for i in range(10)]
    outcomes: dict[str, str] = {}

    async def add(j: Job) -> None:
        try:
            await store.add(j)
        except sqlite3.IntegrityError:
            outcomes[j.id] = "refused"
        else:
            outcomes[j.id] = "added"

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            # Lead with a write so that the others queue behind it and form one group.
            nursery.start_soon(lambda: store.update(first, status=JobStatus.PROCESSING))
            await trio.lowlevel.checkpoint()
            for j in [*others[:5], duplicate, *others[5:]]:
                nursery.start_soon(add, j)
    assert outcomes.pop(duplicate.id) == "refused"
    assert set(outcomes.values()) == {"added"}
    assert len(commits) <= 2  # the refused write did not break its group up
    assert db.statistics().fallbacks == 0
    disk = on_disk(path)
    assert set(disk) == {first.id, *(j.id for j in others)}
    assert disk[first.id].status is JobStatus.PROCESSING
    assert await store.by_idempotency_key("alice", "k") is first
    assert store.count_queued() == 10


class FailingCommits:
    """The connection, but the next ``fail`` COMMITs raise as if the disk were full."""

    def __init__(self, conn: sqlite3.Connection, fail: int) -> None:
        self.conn, self.fail = conn, fail

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.fail:
            self.fail -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


async def concurrent_adds(store: JobStore, jobs: list[Job]) -> dict[str, BaseException | None]:
    """Add the jobs at once (the first alone, the rest as one group); each one's outcome."""
    outcomes: dict[str, BaseException | None] = {}

    async def add(j: Job) -> None:
        try:
            await store.add(j)
        except sqlite3.Error as exc:
            outcomes[j.id] = exc
        else:
            outcomes[j.id] = None

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for j in jobs:
                nursery.start_soon(add, j)
    return outcomes


async def test_a_failed_group_commit_is_applied_write_by_write(
    db: JobDB, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(db)
    monkeypatch.setattr(db, "_conn", FailingCommits(db._conn, fail=1))
    jobs = [job(f"user{i}") for i in range(8)]
    outcomes = await concurrent_adds(store, jobs)
    # The first group's commit failed; its writes were then committed one by one.
    assert outcomes == {j.id: None for j in jobs}
    assert db.statistics().fallbacks == 1
    assert set(on_disk(path)) == {j.id for j in jobs}
    assert store.count_queued() == 8


async def test_in_a_failed_group_each_write_gets_its_own_outcome(
    db: JobDB, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(db)
    # The group's commit fails, then the first write's own commit fails too: only it fails.
    monkeypatch.setattr(db, "_conn", FailingCommits(db._conn, fail=2))
    jobs = [job(f"user{i}") for i in range(8)]
    outcomes = await concurrent_adds(store, jobs)
    failed = [job_id for job_id, exc in outcomes.items() if exc is not None]
    assert len(failed) == 1
    assert "disk is full" in str(outcomes[failed[0]])
    assert set(on_disk(path)) == {j.id for j in jobs} - set(failed)
    assert store.held(failed[0]) is None  # nothing of it became visible
    assert store.count_queued() == 7


async def test_writes_of_one_job_reach_the_disk_in_call_order(db: JobDB, path: Path) -> None:
    base = job()
    await db.write(db.insert, base)
    called: list[int] = []
    applied: list[int] = []
    then: list[int] = []

    def save(version: Job) -> None:
        applied.append(version.attempts)
        db.save(version)

    async def write(n: int) -> None:
        called.append(n)  # no checkpoint between this and the write's place in the queue
        await db.write(save, attrs.evolve(base, attempts=n), then=lambda: then.append(n))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for n in range(1, 31):
                nursery.start_soon(write, n)
    assert applied == called and then == called
    assert sorted(called) == list(range(1, 31))
    assert on_disk(path)[base.id].attempts == called[-1]
    assert db.statistics().commits < 30


async def test_the_store_keeps_one_jobs_updates_in_order(db: JobDB, path: Path) -> None:
    store = JobStore(db)
    j, other = job("a"), job("b")
    await store.add(j)
    await store.add(other)
    called: list[int] = []

    async def update(n: int) -> None:
        called.append(n)
        await store.update(j, attempts=n, result=f"r{n}" if n % 2 else None)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for n in range(1, 21):
                nursery.start_soon(update, n)
                nursery.start_soon(lambda n=n: store.update(other, attempts=n))
    # The last update called is the state in memory and on disk; nothing of an earlier one
    # overwrote a later one.
    last = called[-1]
    assert (j.attempts, j.result) == (last, f"r{last}" if last % 2 else None)
    assert on_disk(path)[j.id] == j
    assert on_disk(path)[other.id] == other


async def test_a_cancelled_caller_still_gets_its_write_done(db: JobDB, path: Path) -> None:
    store = JobStore(db)
    blocker, late = job("a"), job("b")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.add, blocker)
            await trio.lowlevel.checkpoint()
            with trio.CancelScope() as scope:
                scope.cancel()  # already cancelled when the write is queued
                await store.add(late)
    # The write, once called, happened: on disk and visible, not half done.
    assert set(on_disk(path)) == {blocker.id, late.id}
    assert store.held(late.id) is late


async def test_grouped_writes_run_in_the_database_thread(
    db: JobDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(db)
    threads: list[str] = []
    real = trio.to_thread.run_sync

    async def spy(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        assert kwargs.get("limiter") is db._limiter
        threads.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", spy)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(store.add, job(f"user{i}"))
    assert set(threads) == {"_commit"} and len(threads) <= 2
