"""The queue's order: users take turns, and a loaded model is reused when that is cheap to do.

Pure: no I/O, no clock of its own. `FairPolicy.order` gives the order queued jobs will run in
(the order `queue_position` reports); `FairPolicy.pick` chooses the next job and records what
it passed over.

Turns: users are ordered by when they were last served (never-served first, then by their
oldest queued job), and each user's queued jobs are interleaved one per turn: with A holding 20
jobs and B one, B's job runs within one job of arriving.

Model affinity: when the fair choice would swap the checkpoint and a queued job for the loaded
checkpoint exists, that job runs first, as long as the fair choice has been passed over fewer
than ``max_passes`` times and has not waited more than ``max_delay`` seconds since it was
first passed over. Nothing starves.
"""

from __future__ import annotations

import collections
import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol


class Queued(Protocol):
    id: str
    nick: str
    seq: int

    @property
    def model(self) -> str: ...


class FairPolicy:
    def __init__(
        self,
        *,
        max_passes: int = 3,
        max_delay: float = 120.0,
        checkpoint_of: Callable[[str], str] = lambda model: model,
        user_of: Callable[[Queued], str] = lambda job: job.nick,
    ) -> None:
        self.max_passes = max_passes
        self.max_delay = max_delay
        self._checkpoint_of = checkpoint_of
        #: Who a job is for, the unit of turns (the service: the nick within its API key).
        self._user_of = user_of
        self._tick = itertools.count(1)
        self._last_served: dict[str, int] = {}
        #: job id -> (times passed over, time first passed over)
        self._passed: dict[str, tuple[int, float]] = {}
        #: (time first passed over, job id) of `_passed`'s entries, oldest first; entries no
        #: longer in `_passed` (or passed again later) are dropped as `expiry` meets them.
        self._passed_since: list[tuple[float, str]] = []
        self.loaded_checkpoint: str | None = None
        self.swaps = 0

    def user_of(self, job: Queued) -> str:
        """Who ``job`` is for: the unit that takes turns."""
        return self._user_of(job)

    def checkpoint_of(self, job: Queued) -> str:
        return self._checkpoint_of(job.model)

    def last_served(self, user: str) -> int:
        """When ``user`` was last served, as a tick (0: never); users take turns in this order."""
        return self._last_served.get(user, 0)

    @property
    def inert(self) -> bool:
        """True when affinity never reorders anything: no job may ever be passed over."""
        return self.max_passes <= 0 or self.max_delay <= 0

    def expiry(self) -> float:
        """The earliest time a passed-over job's ``max_delay`` runs out (inf: none will).

        The order changes by itself at that moment (the job may no longer be passed over);
        until then `order` gives the same answer at any time. Amortized O(log n).
        """
        heap = self._passed_since
        while heap:
            since, job_id = heap[0]
            entry = self._passed.get(job_id)
            if entry is not None and entry[1] == since:
                return since + self.max_delay
            heapq.heappop(heap)
        return float("inf")

    def _queues(self, jobs: Sequence[Queued]) -> tuple[list[str], dict[str, list[Queued]]]:
        """Users in turn order, and each user's queued jobs in submission order."""
        by_user: dict[str, list[Queued]] = {}
        for job in sorted(jobs, key=lambda j: j.seq):
            by_user.setdefault(self._user_of(job), []).append(job)
        users = sorted(by_user, key=lambda n: (self._last_served.get(n, 0), by_user[n][0].seq))
        return users, by_user

    @staticmethod
    def _turns(users: list[str], by_user: dict[str, list[Queued]]) -> Iterator[Queued]:
        """The fair order, lazily: one job per user per turn."""
        # Element by element: a pick usually needs only the head, not a whole turn's row.
        for turn in itertools.count():
            found = False
            for user in users:
                queue = by_user[user]
                if turn < len(queue):
                    found = True
                    yield queue[turn]
            if not found:
                return

    def fair_order(self, jobs: Sequence[Queued]) -> list[Queued]:
        """The order without model affinity."""
        return list(self._turns(*self._queues(jobs)))

    def _exhausted(self, job: Queued, passed: dict[str, tuple[int, float]], now: float) -> bool:
        """True when ``job`` may not be passed over again."""
        times, since = passed.get(job.id, (0, now))
        return times >= self.max_passes or now - since >= self.max_delay

    def _choose(
        self,
        fair: Iterator[Queued],
        loaded: str | None,
        passed: dict[str, tuple[int, float]],
        now: float,
        wanted: Callable[[str], bool] | None = None,
    ) -> tuple[Queued, list[Queued]]:
        """The job to run next (from the fair order ``fair``) and the jobs it passes over.

        The loaded checkpoint's first job may jump ahead only if none of the jobs it passes
        over (not just the head) has used up its passes or its delay. ``wanted`` replaces
        "the checkpoint is ``loaded``" as what may jump ahead (a fleet's backend prefers
        checkpoints no other backend has loaded), with the same bounds.
        """
        head = next(fair)
        if wanted is None:
            if loaded is None:
                return head, []
            wanted = loaded.__eq__
        if wanted(self._checkpoint_of(head.model)) or self._exhausted(head, passed, now):
            return head, []
        skipped = [head]
        for job in fair:
            if wanted(self._checkpoint_of(job.model)):
                return job, skipped
            if self._exhausted(job, passed, now):
                break
            skipped.append(job)
        return head, []

    @staticmethod
    def _pass_over(
        skipped: Sequence[Queued], passed: dict[str, tuple[int, float]], now: float
    ) -> None:
        for job in skipped:
            times, since = passed.get(job.id, (0, now))
            passed[job.id] = (times + 1, since)

    def order(self, jobs: Sequence[Queued], now: float) -> list[Queued]:
        """The order ``jobs`` will run in if nothing else arrives.

        Replays `pick` on copies of the state: the served user moves to the back of the turns,
        passes are counted, the loaded checkpoint follows each job.
        """
        users, by_user = self._queues(jobs)
        passed = dict(self._passed)
        loaded = self.loaded_checkpoint
        # Queued jobs per checkpoint: with none for the loaded one, the fair head runs (no scan).
        remaining = collections.Counter(self._checkpoint_of(job.model) for job in jobs)
        result: list[Queued] = []
        while users:
            prefer = loaded if loaded is not None and remaining[loaded] else None
            job, skipped = self._choose(self._turns(users, by_user), prefer, passed, now)
            self._pass_over(skipped, passed, now)
            passed.pop(job.id, None)
            user = self._user_of(job)
            by_user[user].remove(job)
            users.remove(user)
            if by_user[user]:
                users.append(user)
            loaded = self._checkpoint_of(job.model)
            remaining[loaded] -= 1
            result.append(job)
        return result

    def pick(self, jobs: Sequence[Queued], now: float) -> Queued:
        """Choose the next job to run and remember it (turns, passes, loaded checkpoint).

        Raises:
            ValueError: ``jobs`` is empty.
        """
        if not jobs:
            raise ValueError("no queued job to pick")
        loaded = self.loaded_checkpoint
        if not any(self._checkpoint_of(j.model) == loaded for j in jobs):
            loaded = None  # nothing to prefer: skip the scan, the fair head runs
        job, skipped = self._choose(self._turns(*self._queues(jobs)), loaded, self._passed, now)
        self.served(job, skipped, now)
        return job

    def served(self, job: Queued, skipped: Sequence[Queued], now: float) -> None:
        """Remember a pick: ``job`` runs, passing over ``skipped`` (from `_choose`)."""
        for passed in skipped:
            if passed.id not in self._passed:
                heapq.heappush(self._passed_since, (now, passed.id))
        self._pass_over(skipped, self._passed, now)
        self._passed.pop(job.id, None)
        self.expiry()  # drops the entries of jobs no longer passed over (bounded memory)
        self._last_served[self._user_of(job)] = next(self._tick)
        checkpoint = self._checkpoint_of(job.model)
        if self.loaded_checkpoint is not None and checkpoint != self.loaded_checkpoint:
            self.swaps += 1
        self.loaded_checkpoint = checkpoint

    def forget(self, job_id: str) -> bool:
        """Drop the job's pass count; whether it had one."""
        return self._passed.pop(job_id, None) is not None

    def unloaded(self) -> None:
        """ComfyUI dropped its models (idle unload): no checkpoint is cheaper than another."""
        self.loaded_checkpoint = None
