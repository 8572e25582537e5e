"""Bounded memory: finished jobs leave memory (but for the most recent ones) and are read from
SQLite when asked for, through the database thread; start-up loads only what is held;
retention prunes from SQLite in batches."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from fategen.core.prompt import GenerationRequest
from fategen.store.jobs import Job, JobStatus, JobStore, result_path
from fategen.store.model import job_from_body, job_to_row
from fategen.store.retention import prune
from fategen.store.sqlite import JobDB

REQUEST = GenerationRequest(
    prompt="p", negative="", model="tiny", width=256, height=256, count=1, seed=1
)
NOW = 1_800_000_000.0


def job(nick: str = "fate", **changes: Any) -> Job:
    return Job(id=Job.new_id(), nick=nick, message=f"m {nick}", request=REQUEST, **changes)


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


async def finish(store: JobStore, j: Job, when: float) -> None:
    await store.update(j, status=JobStatus.COMPLETED, finished=when, result=f"{j.id}.webp")


def spy_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = trio.to_thread.run_sync

    async def spy(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(fn, "__name__", repr(fn)))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", spy)
    return calls


async def test_finished_jobs_leave_memory_but_the_recent_ones(db: JobDB) -> None:
    store = JobStore(db, recent=3)
    jobs = [job(f"u{i}", idempotency_key=f"k{i}") for i in range(10)]
    for j in jobs:
        await store.add(j)
    queued = job("q")
    await store.add(queued)
    for i, j in enumerate(jobs):
        await finish(store, j, NOW + i)
    held = store.held_jobs()
    assert {j.id for j in held} == {queued.id, *(j.id for j in jobs[-3:])}
    assert store.held(jobs[0].id) is None
    assert store.active == 1 and store.count_queued() == 1
    # Idempotency-Keys of jobs not held are not held either.
    assert len(store._idempotency) == 3


async def test_a_finished_job_not_held_is_read_from_disk(
    db: JobDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(db, recent=2)
    jobs = [job(f"u{i}") for i in range(5)]
    for j in jobs:
        await store.add(j)
        await finish(store, j, NOW)
    calls = spy_threads(monkeypatch)
    old = jobs[0]
    found = await store.get(old.id)
    assert found is not None and found is not old
    assert found == old  # every field, read back
    assert calls == ["get"]  # through the database thread, never on the event loop
    view = await store.view(old.id)
    assert view is not None
    assert (view.id, view.status, view.queue_position, view.result) == (
        old.id,
        JobStatus.COMPLETED,
        None,
        old.result,
    )
    # Read, it became one of the recent ones (so reading it again is free) ...
    assert store.held(old.id) is found
    assert calls == ["get"]
    # ... and the bound holds: another one left.
    assert len(store.held_jobs()) == 2
    assert await store.get("no-such-job") is None
    assert await store.view("no-such-job") is None


async def test_idempotency_key_of_a_job_not_held_is_found_in_sqlite(
    db: JobDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(db, recent=0)
    a = job("alice", idempotency_key="k", key_name="ircbot")
    b = job("alice", idempotency_key="k")  # the same nick without a key name: another user
    for j in (a, b):
        await store.add(j)
        await finish(store, j, NOW)
    assert store.held_jobs() == [] and store._idempotency == {}
    calls = spy_threads(monkeypatch)
    found = await store.by_idempotency_key("alice", "k", key_name="ircbot")
    assert found is not None and found.id == a.id
    found = await store.by_idempotency_key("alice", "k")
    assert found is not None and found.id == b.id
    assert await store.by_idempotency_key("alice", "other") is None
    assert await store.by_idempotency_key("bob", "k", key_name="ircbot") is None
    assert calls == ["by_idempotency_key"] * 4


def test_the_idempotency_lookup_uses_the_unique_index(path: Path) -> None:
    db = JobDB(path)
    try:
        plan = db._conn.execute(
            "EXPLAIN QUERY PLAN SELECT body FROM jobs WHERE nick = ?"
            " AND coalesce(json_extract(body, '$.key_name'), '') = ? AND idempotency_key = ?",
            ("a", "", "k"),
        ).fetchall()
    finally:
        db.close()
    assert "USING INDEX jobs_idempotency" in " ".join(str(row) for row in plan)


async def test_an_expired_key_of_a_job_not_held_is_forgotten_on_disk(db: JobDB, path: Path) -> None:
    store = JobStore(db, recent=0)
    j = job("alice", idempotency_key="k")
    await store.add(j)
    await finish(store, j, NOW)
    found = await store.by_idempotency_key("alice", "k")
    assert found is not None
    await store.forget_idempotency_key(found)
    assert await store.by_idempotency_key("alice", "k") is None
    await store.add(job("alice", idempotency_key="k"))  # the key is free


async def test_an_update_through_an_old_copy_reaches_the_held_job(db: JobDB) -> None:
    store = JobStore(db, recent=1)
    j, other = job("a"), job("b")
    await store.add(j)
    await store.add(other)
    await finish(store, j, NOW)
    await finish(store, other, NOW)  # j leaves memory; the caller still has its object
    again = await store.get(j.id)
    assert again is not None and again is not j and store.held(j.id) is again
    await store.update(j, error="a late note")
    assert again.error == j.error == "a late note"
    fresh = await JobStore(db).get(j.id)
    assert fresh is not None and fresh.error == "a late note"


async def test_load_holds_only_unfinished_and_recent_jobs(
    db: JobDB, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(db)
    finished = [job(f"f{i}") for i in range(20)]
    for i, j in enumerate(finished):
        await store.add(j)
        # Finished out of submission order: the recent ones are the last finished.
        await finish(store, j, NOW - (i * 7 % 20))
    queued, running = job("q"), job("r")
    for j in (queued, running):
        await store.add(j)
    await store.update(running, status=JobStatus.PROCESSING)

    calls = spy_threads(monkeypatch)
    again = JobStore(db, recent=5)
    interrupted = await again.load()
    assert calls == ["load_held"]
    assert [j.id for j in interrupted] == [running.id]
    last_finished = sorted(finished, key=lambda j: j.finished or 0)[-5:]
    assert {j.id for j in again.held_jobs()} == {
        queued.id,
        running.id,
        *(j.id for j in last_finished),
    }
    assert again.active == 2
    # The others are still there, on disk; new jobs continue the sequence.
    first = await again.get(finished[0].id)
    assert first is not None and first.status is JobStatus.COMPLETED
    later = job("later")
    await again.add(later)
    assert later.seq == 23


async def test_last_served_is_each_nicks_latest_finished_job(db: JobDB) -> None:
    store = JobStore(db, recent=0)
    plan = [("alice", 10.0, None), ("alice", None, 30.0), ("alice", 20.0, None)]
    plan += [("bob", 5.0, 50.0), ("carol", None, None)]
    for nick, started, submitted in plan:
        j = job(nick)
        await store.add(j)
        await store.update(
            j,
            status=JobStatus.FAILED,
            started=started,
            submitted=submitted,
            finished=NOW,
        )
    waiting = job("dave", submitted=99.0)  # queued: the scheduler gets it from memory
    await store.add(waiting)
    served = {j.nick: (j.submitted, j.started) for j in await store.last_served()}
    # submitted wins over started, as in `Scheduler.restore`; never served: absent.
    assert served == {"alice": (30.0, None), "bob": (50.0, 5.0)}


async def test_wait_for_a_finished_job_not_held_answers_at_once(db: JobDB) -> None:
    store = JobStore(db, recent=0)
    j = job()
    await store.add(j)
    await finish(store, j, NOW)
    # What a /wait does first: a job that is not held is not going to change.
    assert store.held(j.id) is None


async def test_prune_in_batches_from_sqlite(
    db: JobDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "output"
    output.mkdir()
    store = JobStore(db, recent=10)
    # Straight into the database (fast), as a week of finished jobs would be.
    old = [
        job(f"u{i % 7}", status=JobStatus.COMPLETED, finished=NOW - 500 - i) for i in range(1203)
    ]
    new = [job("n", status=JobStatus.COMPLETED, finished=NOW - 10) for _ in range(3)]
    for i, j in enumerate([*old, *new], start=1):
        j.seq = i
    with db._conn:
        for j in [*old, *new]:
            db.insert(j)
    for j in [*old[:50], *new]:
        (output / result_path(output, j.id).name).write_bytes(b"RIFF")
    queued = job("q")
    await db.run(db.insert, queued)
    await store.load()
    assert len(store.held_jobs()) == 11

    calls = spy_threads(monkeypatch)
    with trio.fail_after(20):
        assert await prune(store, output, max_age=100, now=NOW, batch=500) == len(old)
    # Three batches of ids, files and one commit each; then nothing left to find.
    assert calls.count("expired") == 3
    assert calls.count("_delete_files") == 3
    assert calls.count("_commit") == 3
    rows = {j.id for j in await db.run(db.load_all)}
    assert rows == {queued.id, *(j.id for j in new)}
    assert sorted(p.name for p in output.iterdir()) == sorted(f"{j.id}.webp" for j in new)
    assert {j.id for j in store.held_jobs()} == {queued.id, *(j.id for j in new)}
    with trio.fail_after(5):
        assert await prune(store, output, max_age=100, now=NOW) == 0


async def test_recent_and_expired_queries_read_an_index_range(
    db: JobDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    plans: list[str] = []
    conn = db._conn

    class Explaining:
        def execute(self, sql: str, *args: Any) -> Any:
            if "finished" in sql and sql.startswith("SELECT"):
                plan = conn.execute("EXPLAIN QUERY PLAN " + sql, *args).fetchall()
                plans.append(" ".join(str(row[-1]) for row in plan))
            return conn.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(conn, name)

    monkeypatch.setattr(db, "_conn", Explaining())
    await db.run(db.expired, NOW, 500)
    await db.run(db.load_recent_finished, 1000)
    assert len(plans) == 2
    for plan in plans:
        # A range of the index on `finished`, in its order: no scan, no sort.
        assert "USING INDEX jobs_finished (finished" in plan, plan
        assert "TEMP B-TREE" not in plan, plan


def test_shared_strings_are_held_once() -> None:
    # The HTTP layer decodes a fresh nick and model id for each request.
    a = job("".join(["al", "ice"]), key_name="".join(["irc", "bot"]))
    b = job("".join(["ali", "ce"]), key_name="".join(["i", "rcbot"]))
    request = GenerationRequest(
        prompt="p", negative="", model="".join(["ti", "ny"]), width=8, height=8, count=1, seed=1
    )
    c = Job(id=Job.new_id(), nick="x", message="p", request=request)
    assert a.nick is b.nick and a.key_name is b.key_name
    assert c.request.model is sys.intern("tiny")
    # Read back from its row, a job shares them too (cattrs builds it through __init__).
    d = job_from_body(job_to_row(a)[-1])
    assert d == a and d.nick is a.nick and d.request.model is a.request.model
