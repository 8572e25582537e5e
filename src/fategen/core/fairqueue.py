"""The waiting jobs in `FairPolicy`'s order, kept up to date as jobs come and go.

`FairPolicy.pick` and `FairPolicy.order` take the whole list of queued jobs and sort it on
each call. `FairQueue` keeps the structures they rebuild, updated on each change in
O(log n) (O(c log n) when a user's place in the turns moves, c being that user's queued
jobs, which the per-user cap bounds):

- each user's jobs in submission order;
- for each turn t, the users with more than t jobs, in turn order (``_levels[t]``): turn t of
  the fair order is one job of each of them, so the fair order is read off without sorting;
- how many jobs wait for each checkpoint.

From them:

- `pick` is `FairPolicy.pick` over the waiting jobs, without the sort: the fair head in
  O(log n); the affinity scan walks the fair order only as far as the loaded checkpoint's
  next job, and every job it walks past is passed over (at most ``max_passes`` times each),
  so the walk is amortized O(max_passes) per job.
- `position` is the job's place in `FairPolicy.order`. With nothing to reorder (one
  checkpoint waiting, or affinity off), the order is plain turns and the place is counted
  from the levels: O(c + log n). With several checkpoints waiting, affinity makes the order
  a replay of picks (each depends on the checkpoint the previous one left loaded), so the
  replay is run lazily, as far as the job asked for, and shared by every reader until the
  queue changes: a dispatch of the job it predicted first keeps it (the rest of the order is
  unchanged), as does time, until a passed-over job's ``max_delay`` runs out
  (`FairPolicy.expiry`).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterator

from sortedcontainers import SortedKeyList, SortedList

from fategen.core.policy import FairPolicy, Queued

__all__ = ["FairQueue"]

#: A user's place in the turns: (last served tick, first queued job's seq, user).
_Key = tuple[int, int, str]


#: A user's jobs in a replay: the queue's own list until the replay takes one of them.
_Jobs = collections.deque[Queued] | SortedKeyList[Queued, int]


def _by_seq(job: Queued) -> int:
    return job.seq


class _Replay:
    """`FairPolicy.order`, step by step, on copies of the queue's and the policy's state."""

    def __init__(self, queue: FairQueue, now: float) -> None:
        policy = queue.policy
        self._policy = policy
        self._now = now
        #: Users in turn order; each one's jobs are copied when the replay first takes one.
        self._users: collections.OrderedDict[str, _Jobs] = collections.OrderedDict(
            (key[2], queue._queues[key[2]]) for key in queue._level(0)
        )
        self._passed = dict(policy._passed)
        self._loaded = policy.loaded_checkpoint
        self._remaining = collections.Counter(queue._checkpoints)
        #: The order so far, and each job's place in it (1-based).
        self.order: list[Queued] = []
        self.places: dict[str, int] = {}
        #: The ids of the jobs each step of `order` passed over (what a real pick of that
        #: job must pass over too for the rest of the order to hold).
        self.passed_at: list[frozenset[str]] = []

    def _turns(self) -> Iterator[Queued]:
        for turn in itertools.count():
            found = False
            for queue in self._users.values():
                if turn < len(queue):
                    found = True
                    yield queue[turn]
            if not found:
                return

    def step(self) -> bool:
        """Add the next job to `order`; False once every job is in it."""
        if not self._users:
            return False
        policy, loaded = self._policy, self._loaded
        prefer = loaded if loaded is not None and self._remaining[loaded] else None
        user, queue = next(iter(self._users.items()))
        job = queue[0]
        passed: frozenset[str] = frozenset()
        if prefer is None or policy.checkpoint_of(job) == prefer:
            pass  # the fair head runs: no scan (`FairPolicy._choose`'s first case)
        else:
            job, skipped = policy._choose(self._turns(), prefer, self._passed, self._now)
            policy._pass_over(skipped, self._passed, self._now)
            passed = frozenset(j.id for j in skipped)
            user = policy.user_of(job)
            queue = self._users[user]
        self._passed.pop(job.id, None)
        if not isinstance(queue, collections.deque):
            queue = self._users[user] = collections.deque(queue)
        queue.remove(job)
        if queue:
            self._users.move_to_end(user)
        else:
            del self._users[user]
        self._loaded = policy.checkpoint_of(job)
        self._remaining[self._loaded] -= 1
        self.order.append(job)
        self.places[job.id] = len(self.order)
        self.passed_at.append(passed)
        return True

    def place(self, job_id: str) -> int | None:
        """The job's place, replaying as far as it."""
        while job_id not in self.places:
            if not self.step():
                return None
        return self.places[job_id]

    def first(self, shift: int) -> Queued | None:
        """The job after the first ``shift`` (those already dispatched)."""
        while len(self.order) <= shift:
            if not self.step():
                return None
        return self.order[shift]


class FairQueue:
    """The jobs waiting for their turn, for one `FairPolicy` (which holds turns and passes).

    The caller adds and removes jobs as they start and stop waiting; picks go through here
    (not `FairPolicy.pick`) so the queue follows the turns they move.
    """

    def __init__(self, policy: FairPolicy) -> None:
        self.policy = policy
        self._jobs: dict[str, Queued] = {}
        self._queues: dict[str, SortedKeyList[Queued, int]] = {}
        self._keys: dict[str, _Key] = {}
        self._levels: list[SortedList[_Key]] = []
        self._checkpoints: collections.Counter[str] = collections.Counter()
        self._replay: _Replay | None = None
        #: Picks made since `_replay` began that it predicted: its first ones, now gone.
        self._shift = 0
        self._replay_until = 0.0

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    # -- changes ---------------------------------------------------------------------------
    def add(self, job: Queued) -> None:
        """``job`` waits for its turn (again). O(log n), O(c log n) if it is its user's first."""
        if job.id in self._jobs:
            return
        user = self.policy.user_of(job)
        queue = self._queues.get(user)
        if queue is None:
            queue = self._queues[user] = SortedKeyList(key=_by_seq)
        before = len(queue)
        queue.add(job)
        self._jobs[job.id] = job
        self._checkpoints[self.policy.checkpoint_of(job)] += 1
        self._reindex(user, before)
        self._replay = None

    def discard(self, job: Queued) -> None:
        """``job`` no longer waits (cancelled, or taken by someone else); no-op if unknown."""
        if self._jobs.pop(job.id, None) is None:
            return
        self._remove(job)
        self._replay = None

    def _remove(self, job: Queued) -> None:
        user = self.policy.user_of(job)
        queue = self._queues[user]
        before = len(queue)
        queue.remove(job)
        checkpoint = self.policy.checkpoint_of(job)
        self._checkpoints[checkpoint] -= 1
        if not self._checkpoints[checkpoint]:
            del self._checkpoints[checkpoint]
        self._reindex(user, before)

    def first_of(self, user: str) -> Queued | None:
        """The user's first waiting job (in submission order), if any. O(1)."""
        queue = self._queues.get(user)
        return queue[0] if queue else None

    def rebuild(self) -> None:
        """Take up the policy's turns again after they changed outside `pick` (a restore)."""
        for user, queue in self._queues.items():
            self._reindex(user, len(queue))
        self._replay = None

    def unloaded(self) -> None:
        """ComfyUI dropped its models: `FairPolicy.unloaded`, and the order follows."""
        self.policy.unloaded()
        self._replay = None

    def forget(self, job_id: str) -> None:
        """`FairPolicy.forget`: the job's pass count goes (the order may change)."""
        if self.policy.forget(job_id):
            self._replay = None

    def _level(self, turn: int) -> SortedList[_Key]:
        if turn >= len(self._levels):
            return SortedList()
        return self._levels[turn]

    def _reindex(self, user: str, before: int) -> None:
        """Move ``user`` in the levels after its queue went from ``before`` jobs to now."""
        queue = self._queues[user]
        after = len(queue)
        old = self._keys.pop(user, None)
        new = (self.policy.last_served(user), queue[0].seq, user) if after else None
        if old == new and old is not None:
            for turn in range(after, before):  # fewer jobs: out of the upper levels
                self._levels[turn].remove(old)
            for turn in range(before, after):  # more jobs: into the new levels
                self._ensure_level(turn).add(old)
        else:
            if old is not None:
                for turn in range(before):
                    self._levels[turn].remove(old)
            if new is not None:
                for turn in range(after):
                    self._ensure_level(turn).add(new)
        while self._levels and not self._levels[-1]:
            self._levels.pop()
        if new is None:
            del self._queues[user]
        else:
            self._keys[user] = new

    def _ensure_level(self, turn: int) -> SortedList[_Key]:
        while len(self._levels) <= turn:
            self._levels.append(SortedList())
        return self._levels[turn]

    # -- the order -------------------------------------------------------------------------
    def _turns(self) -> Iterator[Queued]:
        """The fair order (no affinity), lazily, from the levels."""
        for turn, level in enumerate(self._levels):
            for key in level:
                yield self._queues[key[2]][turn]

    def _inert(self) -> bool:
        """True when the order is plain turns: affinity has nothing to reorder."""
        return self.policy.inert or len(self._checkpoints) <= 1

    def pick(self, now: float) -> Queued:
        """`FairPolicy.pick` over the waiting jobs: choose, remember, and take it out.

        Raises:
            ValueError: nothing is waiting.
        """
        job = self.pick_for(now, loaded=self.policy.loaded_checkpoint)
        if job is None:
            raise ValueError("no queued job to pick")
        return job

    def pick_for(
        self,
        now: float,
        *,
        loaded: str | None,
        can_run: Callable[[Queued], bool] | None = None,
        elsewhere: frozenset[str] = frozenset(),
    ) -> Queued | None:
        """The pick for one backend of a fleet: among the jobs it ``can_run``, the fair
        choice with affinity to its ``loaded`` checkpoint; failing that, a job for a
        checkpoint no other working backend has loaded (``elsewhere``) may jump ahead, within
        the same bounds, so a second backend loads a checkpoint only when nothing else
        waits. None when it can run nothing that waits.

        A job skipped for one whose checkpoint another working backend has loaded is not
        counted as passed over (that backend will take it); the others are, as for one.

        Cost: as `pick`, plus, with ``can_run``, the jobs it cannot run that come first in
        the fair order (walked past, not passed over).
        """
        if not self._jobs:
            return None
        policy = self.policy

        def turns() -> Iterator[Queued]:
            fair = self._turns()
            return fair if can_run is None else (j for j in fair if can_run(j))

        if can_run is not None and next(turns(), None) is None:
            return None
        if loaded is not None and not self._checkpoints[loaded]:
            loaded = None  # nothing to prefer: skip the scan, the fair head runs
        job, skipped = policy._choose(turns(), loaded, policy._passed, now)
        if (
            not skipped
            and elsewhere
            and policy.checkpoint_of(job) in elsewhere
            and policy.checkpoint_of(job) != loaded
            and any(c not in elsewhere for c in self._checkpoints)
        ):
            job, skipped = policy._choose(
                turns(), None, policy._passed, now, wanted=lambda c: c not in elsewhere
            )
        if elsewhere:
            # A job whose checkpoint another working backend has loaded is not passed over
            # by this one: that backend takes it up (its passes are kept for real waits).
            skipped = [j for j in skipped if policy.checkpoint_of(j) not in elsewhere]
        # What the replay made first, read before the job leaves the lists the replay may
        # still share (stepping it after would read a user's list just emptied).
        predicted = self._replayed(now)
        expected = predicted.first(self._shift) if predicted is not None else None
        policy.served(job, skipped, now)
        del self._jobs[job.id]
        self._remove(job)
        if (
            predicted is not None
            and expected is job
            and predicted.passed_at[self._shift] == frozenset(j.id for j in skipped)
        ):
            # The replay made this very pick first, passing over the same jobs (a backend
            # that cannot run some, or leaves them to another, passes over fewer): the rest
            # of its order still holds.
            self._shift += 1
            self._replay_until = policy.expiry()
        else:
            self._replay = None
        return job

    def _replayed(self, now: float) -> _Replay | None:
        """The current replay, if it still holds at ``now``."""
        if self._replay is not None and now >= self._replay_until:
            self._replay = None
        return self._replay

    def position(self, job: Queued, now: float) -> int | None:
        """The job's place in `FairPolicy.order` of the waiting jobs at ``now`` (1-based);
        None if it is not waiting. See the module docstring for the cost."""
        if job.id not in self._jobs:
            return None
        if self._inert():
            user = self.policy.user_of(job)
            turn = self._queues[user].index(job)
            key = self._keys[user]
            before = sum(len(self._levels[t]) for t in range(turn))
            return before + self._levels[turn].index(key) + 1
        replay = self._replayed(now)
        if replay is None:
            replay = self._replay = _Replay(self, now)
            self._shift = 0
            self._replay_until = self.policy.expiry()
        place = replay.place(job.id)
        assert place is not None, "a waiting job is in the replay"
        return place - self._shift

    def order(self, now: float) -> list[Queued]:
        """Every waiting job in `FairPolicy.order`'s order (O(n), for listings)."""
        if self._inert():
            return list(self._turns())
        replay = _Replay(self, now)
        while replay.step():
            pass
        return replay.order
