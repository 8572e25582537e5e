"""The store's counters (queued in all and per user, processing, active) and its set of queued
jobs are kept on every change instead of scanning every job: checked against a scan after
random changes."""

from __future__ import annotations

import random

import trio

from fategen.core.prompt import GenerationRequest
from fategen.store.jobs import Job, JobStatus, JobStore
from fategen.store.sqlite import JobDB

REQUEST = GenerationRequest(
    prompt="p", negative="", model="tiny", width=256, height=256, count=1, seed=1
)


def scanned(store: JobStore, users: set[str]) -> dict[str, object]:
    jobs = store.held_jobs()
    queued = [j for j in jobs if j.status is JobStatus.QUEUED]
    return {
        "queued": len(queued),
        "processing": sum(1 for j in jobs if j.status is JobStatus.PROCESSING),
        "active": sum(1 for j in jobs if not j.status.finished),
        "by_user": {u: sum(1 for j in queued if j.user == u) for u in users},
    }


def counted(store: JobStore, users: set[str]) -> dict[str, object]:
    assert sorted(j.id for j in store.queued()) == sorted(
        j.id for j in store.held_jobs() if j.status is JobStatus.QUEUED
    )
    return {
        "queued": store.count_queued(),
        "processing": store.count_processing(),
        "active": store.active,
        "by_user": {u: store.count_queued(u) for u in users},
    }


async def test_counters_agree_with_a_scan_after_random_changes() -> None:
    rng = random.Random(5)
    db = JobDB(None)
    store = JobStore(db)
    activity: list[int] = []
    store.on_activity = activity.append
    users: set[str] = set()
    with trio.fail_after(60):
        for step in range(600):
            jobs = store.held_jobs()
            action = rng.random()
            if action < 0.35 or not jobs:
                key = rng.choice([None, "ircbot", "discord"])
                job = Job(
                    id=Job.new_id(),
                    nick=rng.choice(["alice", "bob", "carol"]),
                    message="p",
                    request=REQUEST,
                    key_name=key,
                )
                await store.add(job)
                users.add(job.user)
            elif action < 0.85:
                job = rng.choice(jobs)
                target = rng.choice(list(JobStatus))
                await store.update(job, status=target, finished=None)  # refused once finished
            else:
                doomed = [j for j in jobs if j.status.finished]
                if doomed:
                    await store.delete([j.id for j in rng.sample(doomed, min(len(doomed), 3))])
            assert counted(store, users) == scanned(store, users), step
        # Reloading from disk counts the same.
        again = JobStore(db)
        await again.load()
        assert counted(again, users) == scanned(again, users)
    db.close()
    assert activity, "going busy and idle was reported"
