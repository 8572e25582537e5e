"""FairPolicy: turns, model affinity, bounds, and order() predicting pick()."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fategen.core.policy import FairPolicy, Queued


@attrs.define
class J:
    id: str
    nick: str
    seq: int
    model: str = "x"


class Queue:
    """Jobs with increasing seq, as the store numbers them."""

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self.jobs: list[J] = []

    def add(self, nick: str, model: str = "x", n: int = 1) -> list[J]:
        new = []
        for _ in range(n):
            seq = next(self._seq)
            new.append(J(f"{nick}{seq}", nick, seq, model))
        self.jobs.extend(new)
        return new

    def run(self, policy: FairPolicy, now: float = 0.0) -> J:
        job = policy.pick(self.jobs, now)
        assert isinstance(job, J)
        self.jobs.remove(job)
        return job

    def drain(self, policy: FairPolicy, now: float = 0.0) -> list[J]:
        return [self.run(policy, now) for _ in range(len(self.jobs))]


def ids(jobs: Sequence[Queued]) -> list[str]:
    return [j.id for j in jobs]


def nicks(jobs: Sequence[Queued]) -> str:
    return "".join(j.nick for j in jobs)


# -- fairness ----------------------------------------------------------------------------


def test_newcomer_runs_within_one_job_of_a_user_with_twenty_queued() -> None:
    policy, queue = FairPolicy(), Queue()
    queue.add("a", n=20)
    assert queue.run(policy).nick == "a"
    (b,) = queue.add("b")
    assert policy.order(queue.jobs, 0.0)[0] is b
    assert queue.run(policy) is b


def test_newcomer_arriving_before_anything_ran_is_second() -> None:
    policy, queue = FairPolicy(), Queue()
    queue.add("a", n=20)
    queue.add("b")
    assert ids(queue.drain(policy)[:2]) == ["a1", "b21"]


def test_round_robin_across_three_users() -> None:
    policy, queue = FairPolicy(), Queue()
    queue.add("a", n=4)
    queue.add("b", n=2)
    queue.add("c", n=3)
    assert nicks(policy.order(queue.jobs, 0.0)) == "abcabcaca"
    assert nicks(queue.drain(policy)) == "abcabcaca"


def test_round_robin_keeps_each_users_own_order() -> None:
    policy, queue = FairPolicy(), Queue()
    for nick in "abcab":
        queue.add(nick)
    ran = queue.drain(policy)
    for nick in "abc":
        seqs = [j.seq for j in ran if j.nick == nick]
        assert seqs == sorted(seqs)


def test_turns_remember_who_was_served_last() -> None:
    policy, queue = FairPolicy(), Queue()
    queue.add("a", n=2)
    queue.add("b", n=2)
    assert nicks([queue.run(policy), queue.run(policy), queue.run(policy)]) == "aba"
    queue.add("c")
    # b waited longest (a was just served), c has never been served: c, then b, then a.
    queue.add("a")
    assert nicks(policy.order(queue.jobs, 0.0)) == "cba"
    assert nicks(queue.drain(policy)) == "cba"


def test_empty_queue_orders_to_nothing() -> None:
    assert FairPolicy().order([], 0.0) == []


# -- model affinity ----------------------------------------------------------------------


def test_affinity_runs_the_loaded_checkpoint_first() -> None:
    policy, queue = FairPolicy(), Queue()
    (first,) = queue.add("a", "X")
    assert queue.run(policy) is first
    assert policy.loaded_checkpoint == "X"
    (b,) = queue.add("b", "Y")
    (c,) = queue.add("c", "X")
    assert policy.fair_order(queue.jobs)[0] is b
    assert policy.order(queue.jobs, 0.0) == [c, b]
    assert queue.run(policy) is c
    assert queue.run(policy) is b
    assert policy.swaps == 1


def test_affinity_uses_checkpoint_of() -> None:
    checkpoints = {"x-fast": "X", "x-slow": "X", "y": "Y"}
    policy, queue = FairPolicy(checkpoint_of=checkpoints.__getitem__), Queue()
    queue.add("a", "x-fast")
    queue.run(policy)
    queue.add("b", "y")
    (c,) = queue.add("c", "x-slow")
    assert queue.run(policy) is c
    assert policy.loaded_checkpoint == "X"
    assert policy.swaps == 0


def test_no_affinity_without_a_loaded_checkpoint() -> None:
    policy, queue = FairPolicy(), Queue()
    (b,) = queue.add("b", "Y")
    queue.add("c", "X")
    assert policy.loaded_checkpoint is None
    assert queue.run(policy) is b


def test_unloaded_resets_affinity() -> None:
    policy, queue = FairPolicy(), Queue()
    queue.add("a", "X")
    queue.run(policy)
    (b,) = queue.add("b", "Y")
    (c,) = queue.add("c", "X")
    policy.unloaded()
    assert policy.loaded_checkpoint is None
    assert policy.order(queue.jobs, 0.0) == [b, c]
    assert queue.run(policy) is b
    assert policy.swaps == 0  # loading after an unload is not a swap


def test_forget_drops_pass_counts() -> None:
    policy, queue = FairPolicy(max_passes=1), Queue()
    queue.add("a", "X")
    queue.run(policy)
    (b,) = queue.add("b", "Y")
    queue.add("c", "X")
    queue.run(policy)  # c, passing b once: b is now exhausted
    queue.add("d", "X")
    assert policy.order(queue.jobs, 0.0)[0] is b
    policy.forget(b.id)
    assert policy.order(queue.jobs, 0.0)[0] is not b


# -- bounds ------------------------------------------------------------------------------


def _stream_of_loaded_jobs(policy: FairPolicy, times: Sequence[float]) -> tuple[J, list[J]]:
    """b (model Y) waits while a new user with the loaded model X arrives before each pick."""
    queue = Queue()
    queue.add("a", "X")
    queue.run(policy, times[0])
    (b,) = queue.add("b", "Y")
    ran = []
    for index, now in enumerate(times):
        queue.add(f"u{index}_", "X")
        ran.append(queue.run(policy, now))
        if b in ran:
            break
    return b, ran


@pytest.mark.parametrize("max_passes", [0, 1, 3, 5])
def test_a_job_is_passed_over_at_most_max_passes_times(max_passes: int) -> None:
    policy = FairPolicy(max_passes=max_passes, max_delay=1e9)
    b, ran = _stream_of_loaded_jobs(policy, [0.0] * 20)
    assert ran.index(b) == max_passes


def test_a_job_is_not_passed_over_after_max_delay() -> None:
    policy = FairPolicy(max_passes=100, max_delay=120.0)
    times = [0.0, 10.0, 50.0, 119.9, 120.0, 121.0, 500.0]
    b, ran = _stream_of_loaded_jobs(policy, times)
    # First passed at t=0; passed again at 10, 50 and 119.9; runs at 120.
    assert ran.index(b) == 4
    assert times[ran.index(b)] == 120.0


def test_max_delay_is_counted_from_the_first_pass_not_from_queueing() -> None:
    policy, queue = FairPolicy(max_passes=100, max_delay=60.0), Queue()
    queue.add("a", "X")
    queue.run(policy, 0.0)
    (b,) = queue.add("b", "Y")
    queue.add("c", "X")
    assert queue.run(policy, 1000.0) is not b  # queued long ago, but first passed now
    queue.add("d", "X")
    assert queue.run(policy, 1059.0) is not b
    queue.add("e", "X")
    assert queue.run(policy, 1060.0) is b


def test_order_respects_the_bounds_it_predicts() -> None:
    policy, queue = FairPolicy(max_passes=2), Queue()
    queue.add("a", "X")
    queue.run(policy)
    queue.add("b", "Y")
    queue.add("c", "X", n=5)
    # b is passed twice (by c's first two jobs), then runs; after it Y is loaded.
    assert ids(policy.order(queue.jobs, 0.0)) == ["c3", "c4", "b2", "c5", "c6", "c7"]
    assert ids(queue.drain(policy)) == ["c3", "c4", "b2", "c5", "c6", "c7"]


def test_a_job_behind_the_head_is_bounded_too() -> None:
    """A job passed over while not at the head keeps its count; a newcomer at the head with
    fewer passes must not let the loaded model jump it again."""
    policy, queue = FairPolicy(max_passes=2, max_delay=1e9), Queue()
    queue.add("b", "X")
    queue.add("c", "X")
    queue.drain(policy)  # b then c served; X loaded
    (b,) = queue.add("b", "Y")
    passes = 0
    for index in range(6):
        queue.add("c", "X")
        if index:
            queue.add(f"n{index}_", "Y")  # never served: goes ahead of b in the fair order
        fair = policy.fair_order(queue.jobs)
        job = queue.run(policy)
        if job is b:
            break
        if b in fair and fair.index(b) < fair.index(job):
            passes += 1
        assert passes <= 2
    assert passes == 2


# -- order() predicts pick() -------------------------------------------------------------


def _replay(policy: FairPolicy, jobs: list[J], now: float) -> list[Queued]:
    remaining: list[Queued] = list(jobs)
    ran = []
    while remaining:
        job = policy.pick(remaining, now)
        remaining.remove(job)
        ran.append(job)
    return ran


workload = st.lists(
    st.tuples(st.sampled_from("abcde"), st.sampled_from("XYZ")), min_size=0, max_size=25
)


@settings(max_examples=300, deadline=None)
@given(
    history=workload,
    queued=workload,
    loaded=st.sampled_from([None, "X", "Y", "Z"]),
    max_passes=st.integers(0, 4),
    now=st.sampled_from([0.0, 50.0, 200.0]),
)
def test_order_predicts_the_pick_sequence(
    history: list[tuple[str, str]],
    queued: list[tuple[str, str]],
    loaded: str | None,
    max_passes: int,
    now: float,
) -> None:
    policy = FairPolicy(max_passes=max_passes, max_delay=120.0)
    queue = Queue()
    # Some history (served users, pass counts from time 0), interleaved with arrivals.
    for nick, model in history:
        queue.add(nick, model)
        if len(queue.jobs) > 2:
            queue.run(policy, 0.0)
    if loaded is None:
        policy.unloaded()
    for nick, model in queued:
        queue.add(nick, model)
    predicted = policy.order(queue.jobs, now)
    assert sorted(ids(predicted)) == sorted(ids(queue.jobs))
    assert ids(_replay(policy, queue.jobs, now)) == ids(predicted)


@settings(max_examples=100, deadline=None)
@given(queued=workload, max_passes=st.integers(0, 4))
def test_order_does_not_change_the_policy(queued: list[tuple[str, str]], max_passes: int) -> None:
    policy, queue = FairPolicy(max_passes=max_passes), Queue()
    queue.add("a", "X")
    queue.run(policy)
    for nick, model in queued:
        queue.add(nick, model)
    first = ids(policy.order(queue.jobs, 0.0))
    assert ids(policy.order(queue.jobs, 0.0)) == first
    assert policy.loaded_checkpoint == "X"
    assert policy.swaps == 0


# -- swaps against FIFO ------------------------------------------------------------------


def _swaps(models: Sequence[str]) -> int:
    return sum(1 for before, after in itertools.pairwise(models) if before != after)


def test_mixed_workload_swaps_less_than_fifo_with_bounded_extra_wait() -> None:
    max_passes = 3
    policy, queue = FairPolicy(max_passes=max_passes, max_delay=1e9), Queue()
    users = "abcdef"
    models = "XYZ"
    # Each user submits three jobs, one per model, rotated so neighbours differ.
    for turn in range(3):
        for index, nick in enumerate(users):
            queue.add(nick, models[(index + turn) % 3])
    fifo = sorted(queue.jobs, key=lambda j: j.seq)
    fifo_swaps = _swaps([j.model for j in fifo])
    # FIFO alternates X Y Z X Y Z ... : every one of the 17 neighbours is a swap.
    assert fifo_swaps == 17

    fair = policy.fair_order(queue.jobs)
    ran = queue.drain(policy)
    assert sorted(ids(ran)) == sorted(ids(fifo))
    assert policy.swaps == _swaps([j.model for j in ran])
    assert policy.swaps < fifo_swaps
    # Extra wait per turn: a user's k-th job to run against that user's k-th slot in the pure
    # fair order. Affinity delays a turn by at most max_passes places.
    fair_slots = _slots(fair)
    ran_slots = _slots(ran)
    extra_wait = max(ran_slots[key] - fair_slots[key] for key in fair_slots)
    assert 0 < extra_wait <= max_passes
    # Per job it can be more: an affinity pick of a user's later job (c9 before c3) uses that
    # user's turn, and the earlier job waits for the user's next turn.
    fair_position = {j.id: i for i, j in enumerate(fair)}
    extra_job_wait = max(position - fair_position[j.id] for position, j in enumerate(ran))
    assert extra_job_wait <= 2 * max_passes


def _slots(jobs: Sequence[Queued]) -> dict[tuple[str, int], int]:
    """(nick, k) -> position of that user's k-th job in ``jobs``."""
    seen: dict[str, int] = {}
    slots = {}
    for position, job in enumerate(jobs):
        k = seen[job.nick] = seen.get(job.nick, 0) + 1
        slots[job.nick, k] = position
    return slots


steps = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from("abcdefgh"), st.sampled_from("XYZ")),
        st.tuples(st.just("pick"), st.sampled_from([0.0, 10.0, 30.0]), st.just("")),
        st.tuples(st.just("unload"), st.just(""), st.just("")),
    ),
    min_size=10,
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(steps=steps, max_passes=st.integers(0, 4), max_delay=st.sampled_from([50.0, 1e9]))
def test_no_job_is_passed_over_beyond_the_bounds(
    steps: list[tuple[str, object, str]], max_passes: int, max_delay: float
) -> None:
    policy, queue = FairPolicy(max_passes=max_passes, max_delay=max_delay), Queue()
    now = 0.0
    passes: dict[str, list[float]] = {}
    for kind, arg, model in steps:
        if kind == "add":
            queue.add(str(arg), model)
        elif kind == "unload":
            policy.unloaded()
        elif queue.jobs:
            assert isinstance(arg, float)
            now += arg
            fair = policy.fair_order(queue.jobs)
            job = queue.run(policy, now)
            for skipped in fair[: fair.index(job)]:
                passes.setdefault(skipped.id, []).append(now)
    for times in passes.values():
        assert len(times) <= max_passes
        assert times[-1] - times[0] < max_delay
