"""What the session learnt about one prompt from ComfyUI's WebSocket: a `Tracker` per prompt.

The session's reader applies each message to the tracker of its ``prompt_id``; whoever follows
the prompt waits on ``changed()``, a new `trio.Event` after every update.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import trio

from fategen.comfy.wire import (
    INTERRUPTED,
    ComfyMessage,
    Executed,
    Executing,
    ExecutionCached,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    ImageRef,
    Progress,
    execution_error_sentence,
)

#: Progress updates kept per prompt while nobody follows it.
PROGRESS_BUFFER = 64

OnProgress = Callable[[int, int], None]


class Stalled(Exception):
    """No event for the prompt within the stall limit (internal to the session)."""


class Tracker:
    """What the reader learnt about one prompt; ``changed()`` fires on every update."""

    def __init__(self, prompt_id: str, workflow: Mapping[str, Any], connection: int) -> None:
        self.prompt_id = prompt_id
        self.workflow = workflow
        #: The connection whose messages this tracker has seen; differs after a reconnect.
        self.connection = connection
        self.last_activity = trio.current_time()
        self.started = False
        self.finished = False
        self.failure: str | None = None
        self.cancelled = False
        self.progress: deque[tuple[int, int]] = deque(maxlen=PROGRESS_BUFFER)
        self.executed_images: list[ImageRef] = []
        self._changed = trio.Event()

    def changed(self) -> trio.Event:
        return self._changed

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def touch(self) -> None:
        self.last_activity = trio.current_time()
        self.notify()

    def apply(self, message: ComfyMessage) -> None:
        if isinstance(message, ExecutionStart | ExecutionCached):
            self.started = True
        elif isinstance(message, Executing):
            self.started = True
            if message.node is None:
                self.finished = True
        elif isinstance(message, Progress):
            self.progress.append((message.value, message.max))
        elif isinstance(message, Executed):
            self.executed_images.extend(message.images)
        elif isinstance(message, ExecutionError):
            self.failure = self.failure or execution_error_sentence(message, self.workflow)
        elif isinstance(message, ExecutionInterrupted):
            self.failure = self.failure or INTERRUPTED
        elif isinstance(message, ExecutionSuccess):
            pass
        self.touch()
