"""Open websockets and what is sent to them.

ComfyUI addresses a message to one ``sid`` (the socket's ``clientId``) or, with no sid, to every
socket. Like ComfyUI, the executor never waits for a socket and no message is dropped: ComfyUI's
``PromptServer.send_sync`` puts every message on an unbounded ``asyncio.Queue`` and one
``publish_loop`` awaits ``ws.send_json`` for each, so a client that reads slowly (or a deep
queue of fast prompts) makes messages wait in memory, never closes its socket. Here each socket
has its own outbox (`Outbox`), drained by its handler; a slow socket does not hold the others
back (in ComfyUI it would delay them too). The one bound: an outbox past `OUTBOX_MAX_BYTES`
(where ComfyUI would keep growing until it runs out of memory) closes its socket with 1011.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio

OUTBOX_MAX_BYTES = 256 * 2**20
"""Bytes one socket's outbox may hold before the socket is closed: far above any deep queue."""


@attrs.frozen
class Close:
    """Ask a socket's handler to close the websocket with ``code``."""

    code: int


Outgoing = str | bytes | Close


def _size(message: Outgoing) -> int:
    return 0 if isinstance(message, Close) else len(message)


@attrs.define(eq=False)
class Outbox:
    """One socket's messages not sent yet, in order; as many as ``max_bytes`` allows.

    ``async for message in outbox`` takes them one at a time, waiting while it is empty.
    """

    max_bytes: int = OUTBOX_MAX_BYTES
    _messages: deque[Outgoing] = attrs.Factory(deque)
    _bytes: int = 0
    _arrived: trio.Event = attrs.Factory(trio.Event)
    _closed: bool = False

    def put(self, message: Outgoing) -> bool:
        """Queue ``message``; False (and nothing queued) if it would pass ``max_bytes``.

        A closed outbox takes nothing and answers True: its socket is going away.
        """
        if self._closed:
            return True
        size = _size(message)
        if self._bytes + size > self.max_bytes:
            return False
        self._messages.append(message)
        self._bytes += size
        self._arrived.set()
        return True

    def close(self) -> None:
        """Take no more messages; drop the ones not sent."""
        self._closed = True
        self._messages.clear()
        self._bytes = 0
        self._arrived.set()

    def statistics(self) -> tuple[int, int]:
        """(messages, bytes) waiting."""
        return len(self._messages), self._bytes

    def __aiter__(self) -> Outbox:
        return self

    async def __anext__(self) -> Outgoing:
        while not self._messages:
            if self._closed:
                raise StopAsyncIteration
            self._arrived = trio.Event()
            await self._arrived.wait()
        message = self._messages.popleft()
        self._bytes -= _size(message)
        return message


@attrs.define(eq=False)
class Connection:
    """One open websocket as the hub sees it."""

    sid: str
    outbox: Outbox
    supports_preview_metadata: bool = False
    cancel_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)

    def push(self, message: Outgoing) -> None:
        """Queue a message; close the socket if its outbox is over `OUTBOX_MAX_BYTES`."""
        if not self.outbox.put(message):
            self.cancel_scope.cancel()


def text_message(event: str, data: dict[str, Any]) -> str:
    """A ComfyUI text frame."""
    return json.dumps({"type": event, "data": data})


@attrs.define
class Hub:
    """The registry of open websockets."""

    outbox_max_bytes: int = OUTBOX_MAX_BYTES
    _connections: list[Connection] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)

    @contextmanager
    def connect(self, sid: str) -> Iterator[tuple[Connection, Outbox]]:
        """Register a socket for as long as the ``with`` block lasts."""
        outbox = Outbox(self.outbox_max_bytes)
        connection = Connection(sid, outbox)
        self._connections.append(connection)
        try:
            yield connection, outbox
        finally:
            outbox.close()
            self._connections.remove(connection)
            self._changed.set()
            self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._connections)

    def _targets(self, sid: str | None) -> list[Connection]:
        if sid is None:
            return list(self._connections)
        # Like ComfyUI's dict of sockets by sid: the newest socket with that sid gets it.
        newest = [c for c in self._connections if c.sid == sid][-1:]
        return newest

    def send(self, event: str, data: dict[str, Any], sid: str | None = None) -> None:
        """Send to the socket ``sid``, or to every socket when ``sid`` is None."""
        message = text_message(event, data)
        for connection in self._targets(sid):
            connection.push(message)

    def send_binary(self, payload: bytes, sid: str | None = None) -> None:
        """Send a binary frame to ``sid`` or to everyone."""
        for connection in self._targets(sid):
            connection.push(payload)

    def send_preview(
        self, preview: bytes, metadata: dict[str, Any], sid: str | None, *, with_metadata: bool
    ) -> None:
        """A sampler JPEG preview, only to the sockets that did (or did not) ask for metadata.

        ComfyUI sends event 4 (JSON metadata, then the image) *before* the step's ``progress``
        to sockets that sent ``supports_preview_metadata``, and event 1 *after* it to others.
        """
        meta = json.dumps(metadata).encode()
        for connection in self._targets(sid):
            if connection.supports_preview_metadata != with_metadata:
                continue
            if with_metadata:
                frame = (4).to_bytes(4, "big") + len(meta).to_bytes(4, "big") + meta + preview
            else:
                frame = (1).to_bytes(4, "big") + (1).to_bytes(4, "big") + preview
            connection.push(frame)

    def close_all(self, code: int) -> None:
        """Ask every open socket to close (after the messages already queued)."""
        for connection in list(self._connections):
            connection.push(Close(code))

    async def wait_all_closed(self) -> None:
        """Return once no socket is open."""
        while self._connections:
            await self._changed.wait()
