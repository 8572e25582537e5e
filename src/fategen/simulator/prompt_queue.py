"""The prompt queue and history, shaped like ComfyUI's ``PromptQueue``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
import trio

MAX_HISTORY = 10_000


@attrs.define
class QueueItem:
    """A queued prompt: ``[number, prompt_id, prompt, extra_data, outputs_to_execute]`` on the wire.

    ``converted`` is the prompt with inputs converted to their types (what the nodes run with).
    """

    number: int | float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    converted: dict[str, Any]
    sequence: int = 0

    @property
    def client_id(self) -> str | None:
        """The submitting client's websocket id, if it gave one."""
        client_id = self.extra_data.get("client_id")
        return client_id if isinstance(client_id, str) else None

    def as_json(self) -> list[Any]:
        """The wire form used by GET /queue and history entries."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@attrs.define
class PromptQueue:
    """Pending prompts (lowest number first), the running one, and the finished ones' history.

    ``on_change`` is called with the new ``queue_remaining`` whenever ComfyUI would broadcast a
    ``status`` message: on put, get, delete, clear and task_done.
    """

    on_change: Callable[[int], None] = lambda remaining: None
    pending: list[QueueItem] = attrs.Factory(list)
    running: QueueItem | None = None
    history: dict[str, dict[str, Any]] = attrs.Factory(dict)
    _sequence: int = 0
    _changed: trio.Event = attrs.Factory(trio.Event)

    def remaining(self) -> int:
        """``queue_remaining``: pending plus running."""
        return len(self.pending) + (self.running is not None)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        self.on_change(self.remaining())

    def put(self, item: QueueItem) -> None:
        """Queue a prompt."""
        self._sequence += 1
        item.sequence = self._sequence
        self.pending.append(item)
        self.pending.sort(key=lambda i: (i.number, i.sequence))
        self._notify()

    async def get(self) -> QueueItem:
        """Wait for the next prompt and mark it running."""
        while not self.pending:
            await self._changed.wait()
        item = self.pending.pop(0)
        self.running = item
        self._notify()
        return item

    def task_done(self, item: QueueItem, entry: dict[str, Any] | None) -> None:
        """The running prompt finished; store its history entry (None: keep no entry)."""
        if entry is not None:
            self.history[item.prompt_id] = entry
            while len(self.history) > MAX_HISTORY:
                del self.history[next(iter(self.history))]
        if self.running is item:
            self.running = None
        self._notify()

    def delete(self, prompt_ids: Iterable[str]) -> None:
        """Remove pending prompts (the running one is not affected)."""
        doomed = set(prompt_ids)
        self.pending = [i for i in self.pending if i.prompt_id not in doomed]
        self._notify()

    def clear(self) -> None:
        """Remove every pending prompt."""
        self.pending = []
        self._notify()

    def status(self) -> dict[str, Any]:
        """GET /queue."""
        return {
            "queue_running": [self.running.as_json()] if self.running else [],
            "queue_pending": [i.as_json() for i in self.pending],
        }

    def history_slice(self, max_items: int | None, offset: int) -> dict[str, Any]:
        """GET /history: ``max_items`` entries from ``offset`` (oldest first; -1: the newest)."""
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        selected: dict[str, Any] = {}
        for index, (prompt_id, entry) in enumerate(self.history.items()):
            if index >= offset:
                selected[prompt_id] = entry
                if max_items is not None and len(selected) >= max_items:
                    break
        return selected

    async def wait_running(self, prompt_id: str | None = None) -> QueueItem:
        """Return the running prompt once one (``prompt_id``, if given) is running."""
        while self.running is None or prompt_id not in (None, self.running.prompt_id):
            await self._changed.wait()
        return self.running

    async def wait_idle(self) -> None:
        """Return once nothing is pending or running."""
        while self.pending or self.running is not None:
            await self._changed.wait()
