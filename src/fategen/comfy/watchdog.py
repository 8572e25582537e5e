"""Idle-unload watchdog: frees ComfyUI's memory once nothing has run for a while.

The shape follows hypercorn's trio idle timer: while idle, one timed sequence runs inside a
cancel scope; ``notify_busy`` cancels that scope, and the next ``notify_idle`` starts a new one
with fresh timers. Nothing polls.

Per idle period: after ``unload_after`` seconds, ``free(unload_models=True)`` once; after
``free_memory_after`` seconds (0 = never), ``free(unload_models=True, free_memory=True)`` once.
The service starts idle, so a fresh service with no jobs frees after the limit too.

A failed free (ComfyUI down or erroring) is logged and retried every ``retry_after`` seconds
while the period stays idle, until the next stage is due (which frees at least as much). The
watchdog itself never stops on such an error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

log = logging.getLogger("fategen.watchdog")

FreeFunction = Callable[..., Awaitable[None]]


class IdleWatchdog:
    """Calls ``free`` after idle periods; the scheduler reports busy / idle.

    Args:
        free: ``async free(*, unload_models: bool, free_memory: bool)``, e.g.
            ``ComfySession.free``.
        unload_after: idle seconds before models are unloaded.
        free_memory_after: idle seconds before ComfyUI also drops its RAM caches; 0 = off.
        retry_after: seconds between attempts when a free fails.
    """

    def __init__(
        self,
        free: FreeFunction,
        *,
        unload_after: float = 600,
        free_memory_after: float = 3600,
        retry_after: float = 60,
    ) -> None:
        self._free = free
        self.unload_after = unload_after
        self.free_memory_after = free_memory_after
        self.retry_after = retry_after
        self._busy = False
        self._idle_since: float | None = None
        self._idle_scope: trio.CancelScope | None = None
        self._changed = trio.Event()

    @property
    def busy(self) -> bool:
        return self._busy

    def notify_busy(self) -> None:
        """Work is queued or running: stop the idle timers."""
        if self._busy:
            return
        self._busy = True
        if self._idle_scope is not None:
            self._idle_scope.cancel()
        self._wake()

    def notify_idle(self) -> None:
        """No work left: the idle timers start now (a repeated call changes nothing)."""
        if not self._busy:
            return
        self._busy = False
        self._idle_since = trio.current_time()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _stages(self) -> list[tuple[float, bool]]:
        """(idle seconds, free_memory) of each free of an idle period, in time order."""
        if 0 < self.free_memory_after <= self.unload_after:
            return [(self.free_memory_after, True)]
        stages = [(self.unload_after, False)]
        if self.free_memory_after > 0:
            stages.append((self.free_memory_after, True))
        return stages

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Watch forever. Starts idle: the first timers count from this call."""
        if self._idle_since is None:
            self._idle_since = trio.current_time()
        task_status.started()
        while True:
            while self._busy:
                await self._changed.wait()
            since = self._idle_since
            assert since is not None
            with trio.CancelScope() as scope:
                self._idle_scope = scope  # no checkpoint since the busy check: no race
                await self._idle_period(since)
            self._idle_scope = None

    async def _idle_period(self, since: float) -> None:
        stages = self._stages()
        for index, (after, free_memory) in enumerate(stages):
            await trio.sleep_until(since + after)
            next_due = since + stages[index + 1][0] if index + 1 < len(stages) else math.inf
            await self._free_until_done(free_memory=free_memory, give_up_at=next_due)
        await trio.sleep_forever()

    async def _free_until_done(self, *, free_memory: bool, give_up_at: float) -> None:
        what = "unloading models and freeing memory" if free_memory else "unloading models"
        failures = 0
        while True:
            try:
                await self._free(unload_models=True, free_memory=free_memory)
            except Exception as exc:  # a watchdog must outlive any error of ComfyUI
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "idle: %s on ComfyUI failed: %s", what, exc)
            else:
                log.info("idle: %s on ComfyUI", what)
                return
            if trio.current_time() + self.retry_after >= give_up_at:
                return
            await trio.sleep(self.retry_after)
