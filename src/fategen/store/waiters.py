"""`JobWaiters`: the tasks waiting for one job to change, woken a few at a time.

Thousands of long-polls may wait on one job. Woken all at once (one `trio.Event`), every one
of them runs in the same scheduler batch and builds its answer there, and the event loop does
nothing else meanwhile: no I/O, no worker, no ComfyUI session. Here the first `WAKE_BATCH`
waiters are woken, and each woken waiter wakes the next one as it resumes: at most
`WAKE_BATCH` of them run between two looks at I/O, and the others follow in the next rounds.

A wait either counts every change of the job (its progress included) or only changes of its
state (``progress=False``: a long-poll for the job's end need not wake at every step).
"""

from __future__ import annotations

import trio

__all__ = ["WAKE_BATCH", "JobWaiters"]

#: Waiters of one change that run in one scheduler batch (each wakes the next as it resumes).
WAKE_BATCH = 32


class JobWaiters:
    """The waiters of one job: those woken by any change, and those by state changes only."""

    __slots__ = ("_any", "_state")

    def __init__(self) -> None:
        self._any = trio.lowlevel.ParkingLot()
        self._state = trio.lowlevel.ParkingLot()

    async def wait(self, *, progress: bool = True) -> None:
        """Block until `wake` (with ``progress=False``, until a wake that is not for
        progress only)."""
        lot = self._any if progress else self._state
        await lot.park()
        # Woken: pass it on, so the next waiter runs in the next batch, not this one.
        lot.unpark()

    def wake(self, *, progress_only: bool = False) -> None:
        """Wake the waiters (``progress_only``: only those that count progress), a batch at
        once; the waiters from now on wait for the next change."""
        woken = [self._any]
        self._any = trio.lowlevel.ParkingLot()
        if not progress_only:
            woken.append(self._state)
            self._state = trio.lowlevel.ParkingLot()
        for lot in woken:
            lot.unpark(count=WAKE_BATCH)

    @property
    def waiting_for_state(self) -> bool:
        """Whether some waiter waits for a state change (a progress wake leaves it waiting)."""
        return bool(self._state)

    def statistics(self) -> trio.lowlevel.ParkingLotStatistics:
        """How many tasks wait for the next change (as `trio.Event.statistics`)."""
        return trio.lowlevel.ParkingLotStatistics(tasks_waiting=len(self._any) + len(self._state))
