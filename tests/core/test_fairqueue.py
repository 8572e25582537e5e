"""FairQueue: the same picks and positions as FairPolicy's full replay, kept incrementally."""

from __future__ import annotations

import copy
import itertools

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fategen.core.fairqueue import FairQueue
from fategen.core.policy import FairPolicy


@attrs.define(eq=False)
class J:
    id: str
    nick: str
    seq: int
    model: str = "x"


class Twin:
    """A FairQueue and the plain list of what waits, driven by the same operations."""

    def __init__(self, policy: FairPolicy) -> None:
        self.policy = policy
        self.queue = FairQueue(policy)
        self.waiting: list[J] = []
        self.picked: list[J] = []
        self.seq = itertools.count(1)
        self.now = 0.0

    def add(self, nick: str, model: str) -> J:
        seq = next(self.seq)
        job = J(f"{nick}{seq}", nick, seq, model)
        self.queue.add(job)
        self.waiting.append(job)
        return job

    def pick(self) -> J:
        expected = copy.deepcopy(self.policy).pick(self.waiting, self.now)
        job = self.queue.pick(self.now)
        assert isinstance(job, J)
        assert job.id == expected.id, "FairQueue.pick differs from FairPolicy.pick"
        self.waiting.remove(job)
        self.picked.append(job)
        return job

    def cancel(self, job: J) -> None:
        self.queue.discard(job)
        self.waiting.remove(job)

    def requeue(self, job: J) -> None:
        """A dispatched job back in the queue (its worker could not run it)."""
        self.picked.remove(job)
        self.queue.forget(job.id)
        self.queue.add(job)
        self.waiting.append(job)

    def check(self) -> None:
        oracle = [j.id for j in self.policy.order(self.waiting, self.now)]
        assert [j.id for j in self.queue.order(self.now)] == oracle
        # Asked one job at a time, in an order that makes the lazy replay jump about.
        asked = sorted(self.waiting, key=lambda j: (j.seq * 7919) % 101)
        for job in asked:
            assert self.queue.position(job, self.now) == oracle.index(job.id) + 1, job.id
        assert len(self.queue) == len(self.waiting)


add = st.tuples(st.just("add"), st.sampled_from("abcde"), st.sampled_from("XYZ"))
operation = st.one_of(
    add,
    add,
    st.tuples(st.just("pick")),
    st.tuples(st.just("pick")),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("requeue"), st.integers(0, 50)),
    st.tuples(st.just("unload")),
    st.tuples(st.just("tick"), st.sampled_from([0.0, 1.0, 2.5, 6.0])),
)


@settings(max_examples=400, deadline=None)
@given(
    operations=st.lists(operation, min_size=5, max_size=80),
    max_passes=st.integers(0, 4),
    max_delay=st.sampled_from([0.0, 5.0, 120.0]),
    one_model=st.booleans(),
)
def test_incremental_positions_equal_the_full_replay(
    operations: list[tuple[object, ...]], max_passes: int, max_delay: float, one_model: bool
) -> None:
    twin = Twin(FairPolicy(max_passes=max_passes, max_delay=max_delay))
    for op in operations:
        match op:
            case ("add", nick, model):
                twin.add(str(nick), "X" if one_model else str(model))
            case ("pick",) if twin.waiting:
                twin.pick()
            case ("cancel", int(n)) if twin.waiting:
                twin.cancel(twin.waiting[n % len(twin.waiting)])
            case ("requeue", int(n)) if twin.picked:
                twin.requeue(twin.picked[n % len(twin.picked)])
            case ("unload",):
                twin.queue.unloaded()
            case ("tick", float(dt)):
                twin.now += dt
            case _:
                continue
        twin.check()


def test_a_replay_survives_the_dispatch_it_predicted() -> None:
    """Dispatching the head keeps the replay (no new replay per dispatch), and stays exact."""
    twin = Twin(FairPolicy(max_passes=3, max_delay=120.0))
    for nick, model in zip("abcabcabc", "XYXYXYXYX", strict=True):
        twin.add(nick, model)
    twin.check()
    replay = twin.queue._replay
    assert replay is not None
    for _ in range(4):
        twin.pick()
        twin.check()
    assert twin.queue._replay is replay


def test_a_replay_ends_when_a_passed_over_job_may_wait_no_longer() -> None:
    """The order changes by itself when max_delay runs out; the replay knows when."""
    twin = Twin(FairPolicy(max_passes=10, max_delay=5.0))
    twin.add("a", "X")
    twin.pick()  # X is loaded
    twin.add("b", "Y")
    for _ in range(3):
        twin.add("a", "X")
    twin.pick()  # a's X runs ahead of b's Y, which is passed over at time 0
    twin.check()
    assert twin.policy.expiry() == 5.0
    before = [j.id for j in twin.queue.order(twin.now)]
    twin.now = 5.0
    twin.check()
    assert [j.id for j in twin.queue.order(twin.now)] != before  # b's Y runs first now


def test_one_checkpoint_positions_need_no_replay() -> None:
    twin = Twin(FairPolicy())
    for i in range(30):
        twin.add("abc"[i % 3] if i < 20 else "d", "X")
    twin.check()
    assert twin.queue._replay is None


def test_pick_from_an_empty_queue_raises() -> None:
    with pytest.raises(ValueError, match="no queued job"):
        FairQueue(FairPolicy()).pick(0.0)


#: What each backend of a fleet of three has installed.
INSTALLED = (frozenset("XY"), frozenset("YZ"), frozenset("XZ"))
fleet_operation = st.one_of(
    add,
    add,
    st.tuples(st.just("fleet-pick"), st.integers(0, 2)),
    st.tuples(st.just("fleet-pick"), st.integers(0, 2)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("position"), st.integers(0, 50)),
    st.tuples(st.just("tick"), st.sampled_from([0.0, 1.0, 6.0])),
)


@settings(max_examples=400, deadline=None)
@given(
    operations=st.lists(fleet_operation, min_size=5, max_size=80),
    max_passes=st.integers(0, 4),
)
def test_fleet_picks_run_only_what_a_backend_can_and_positions_stay_exact(
    operations: list[tuple[object, ...]], max_passes: int
) -> None:
    """Picks for backends with different checkpoints, each with its own loaded one, amid
    position queries (which keep a replay alive across picks): a backend gets only a job it
    can run, or nothing only when it can run none that waits; positions still equal the
    policy's full replay."""
    twin = Twin(FairPolicy(max_passes=max_passes, max_delay=120.0))
    loaded: list[str | None] = [None, None, None]
    for op in operations:
        match op:
            case ("add", nick, model):
                twin.add(str(nick), str(model))
            case ("fleet-pick", int(b)) if twin.waiting:
                elsewhere = frozenset(c for i, c in enumerate(loaded) if i != b and c)
                job = twin.queue.pick_for(
                    twin.now,
                    loaded=loaded[b],
                    can_run=lambda j, b=b: j.model in INSTALLED[b],
                    elsewhere=elsewhere,
                )
                runnable = [j for j in twin.waiting if j.model in INSTALLED[b]]
                if job is None:
                    assert not runnable
                    continue
                assert isinstance(job, J) and job.model in INSTALLED[b]
                loaded[b] = job.model
                twin.waiting.remove(job)
                twin.picked.append(job)
            case ("cancel", int(n)) if twin.waiting:
                twin.cancel(twin.waiting[n % len(twin.waiting)])
            case ("position", int(n)) if twin.waiting:
                twin.queue.position(twin.waiting[n % len(twin.waiting)], twin.now)
                continue
            case ("tick", float(dt)):
                twin.now += dt
            case _:
                continue
        twin.check()


def test_a_fleet_pick_after_a_replay_does_not_read_an_emptied_list() -> None:
    """Found by the fleet benchmark: a replay kept across a pick was stepped after the pick
    had emptied a user's list it still shared (IndexError killed the scheduler)."""
    queue = FairQueue(FairPolicy())
    installed = [set("abc"), set("bcd"), set("ad"), set("acd")]
    loaded: list[str | None] = [None] * 4

    def pick(b: int, now: float) -> None:
        elsewhere = frozenset(c for i, c in enumerate(loaded) if i != b and c)
        job = queue.pick_for(
            now,
            loaded=loaded[b],
            can_run=lambda j: j.model in installed[b],
            elsewhere=elsewhere,
        )
        if job is not None:
            loaded[b] = job.model

    queue.add(J("j2", "u6", 2, "c"))
    pick(3, 1)
    queue.add(J("j7", "u4", 7, "d"))
    queue.add(J("j8", "u4", 8, "a"))
    pick(2, 2)
    pick(3, 3)
    j9, j10 = J("j9", "u6", 9, "b"), J("j10", "u2", 10, "c")
    queue.add(j9)
    queue.add(j10)
    assert queue.position(j10, 4) == 1
    pick(1, 5)
    pick(0, 6)
    assert len(queue) == 0


def test_a_kept_replay_must_have_passed_over_what_the_pick_did() -> None:
    """Found by the property test above: a backend that cannot run b's Z picks a2, which the
    replay also put first, but by passing over b4; the real pick passed over nobody, so b4
    still has its pass and a3 goes before it. Keeping the replay made b4 first."""
    twin = Twin(FairPolicy(max_passes=1, max_delay=120.0))
    for _ in range(3):
        twin.add("a", "X")
    loaded: str | None = None
    for added in (None, "b"):
        if added:
            twin.add(added, "Z")
        twin.check()  # positions: a replay is made, and kept if it holds
        job = twin.queue.pick_for(twin.now, loaded=loaded, can_run=lambda j: j.model in "XY")
        assert isinstance(job, J)
        loaded = job.model
        twin.waiting.remove(job)
        twin.picked.append(job)
    twin.check()
    assert [j.id for j in twin.queue.order(twin.now)] == ["a3", "b4"]
