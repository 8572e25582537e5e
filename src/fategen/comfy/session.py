"""fategen's link to ComfyUI: one WebSocket, one client id, REST calls, per-prompt trackers.

``ComfySession.run`` is the actor that keeps the WebSocket to ``/ws?clientId=ID`` connected
and routes each text message by ``prompt_id`` to the tracker of that prompt. Binary frames
(previews) are ignored. While connected it pings every ``probe_interval`` seconds; a ping not
answered within ``probe_timeout`` drops the connection. A lost connection is tried again at
once and then every ``backoff_max`` seconds (1 s by default, so a ComfyUI that comes back is
used within about a second); one not back within ``down_after`` seconds makes the session
``down``: a prompt being followed is then given up as lost (`ComfyUnavailable`), so a fleet
can run it elsewhere.

A job is ``submit`` (``POST /prompt`` with a client-chosen ``prompt_id``), ``follow`` (the
WebSocket events until ``executing`` with ``node: null``; the outputs are those of the
``executed`` message when the socket saw the whole prompt, otherwise ``GET /history/{id}``)
and ``fetch_images`` (``GET /view``, or ComfyUI's output folder when
``folder_path`` is set). ``run_prompt`` does all three.

Errors (each ``str()`` is one sentence):

* :class:`ComfyError`: the prompt was refused (node errors), failed (``execution_error``),
  was interrupted or cancelled, or ComfyUI answered 5xx.
* :class:`ComfyUnavailable`: ComfyUI cannot be reached, or it lost the job (it restarted while
  the job was queued or running): the caller may retry the job.
* :class:`JobTimeout`: no event for the prompt for ``stall_timeout`` seconds, or the job ran
  past ``job_timeout``; the prompt is deleted from the queue and interrupted first.
* :class:`ImageError`: an image could not be fetched.

Ownership: ``ComfySession.open(...)`` creates and closes its own ``httpx.AsyncClient``. A client
passed as ``http=`` belongs to the caller, who closes it.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Literal, NoReturn

import attrs
import httpx
import trio
import trio_websocket

from fategen.comfy import inventory
from fategen.comfy.images import ImageFetcher, images_from_entry
from fategen.comfy.reconcile import Whereabouts, locate
from fategen.comfy.tracker import OnProgress, Stalled, Tracker
from fategen.comfy.wire import (
    CALL_TIMEOUT,
    MAX_RESPONSE_BYTES,
    ComfyMessage,
    ComfyRest,
    ImageRef,
    Status,
    parse_message,
    parse_preview,
    select_images,
)
from fategen.core.backends import DEFAULT_BACKEND
from fategen.errors import ComfyError, ComfyUnavailable, JobTimeout

__all__ = ["ComfySession", "ImageRef", "SessionStatistics"]

log = logging.getLogger("fategen.comfy")

#: The first frame on every connection: previews are to name their prompt.
_FEATURE_FLAGS = json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
#: ``extra_data`` of a prompt whose sampler previews are wanted (cheap: latent to RGB).
_PREVIEWS = {"preview_method": "latent2rgb"}
#: WebSocket frames can carry preview images far above trio-websocket's 1 MiB default.
MAX_MESSAGE_SIZE = 64 * 2**20
#: Delays between GET /history look-ups while the entry is not written yet.
_HISTORY_RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
#: How long clean-up calls (interrupt, queue delete) may take.
_CLEANUP_SECONDS = 5.0


def _seconds(value: float) -> str:
    return f"{value:g} s"


#: ``connecting``: not connected yet since the start; ``up``: connected; ``reconnecting``:
#: the connection was lost less than ``down_after`` seconds ago; ``down``: lost for longer,
#: or the first connection failed.
SessionState = Literal["connecting", "up", "reconnecting", "down"]


class _ProbeFailed(Exception):
    pass


@attrs.frozen
class SessionStatistics:
    """A snapshot of the session for /health."""

    available: bool
    last_error: str | None
    queue_remaining: int | None
    tracked_prompts: int
    connections: int


class ComfySession:
    """One ComfyUI server: a WebSocket kept open by :meth:`run`, and the REST calls.

    Args:
        base_url: ``http://host:port`` of ComfyUI (the WebSocket is ``ws://host:port/ws``).
        http: an httpx client to use (the caller owns and closes it); by default one is made
            and closed by :meth:`aclose` (or use :meth:`open`).
        folder_path: ComfyUI's output folder, if this machine can read it: images of type
            ``output`` are then read from it instead of through ``GET /view``.
        connect_timeout: seconds for the WebSocket handshake.
        stall_timeout: seconds without an event for a prompt before it is given up. While the
            prompt waits in ComfyUI's queue, any message from ComfyUI counts as an event.
        job_timeout: seconds a prompt may take from :meth:`follow` to its end.
        backoff_initial, backoff_max: reconnection delays (doubling, capped).
        name: the backend's name, in log lines and errors.
        headers: sent with the WebSocket handshake (REST headers are the httpx client's).
        probe_interval, probe_timeout: seconds between pings, and for each answer.
        down_after: seconds a lost connection may take to come back before the session is
            ``down`` (default: ``probe_timeout``).
        websocket_connect: opens the WebSocket (trio-websocket's ``open_websocket_url``;
            tests give one over memory streams).
        call_timeout: seconds any one REST call may take in all, its body included.
        max_response_bytes: the largest REST answer taken (an image, ``/history``, ...).
    """

    def __init__(
        self,
        base_url: str,
        *,
        http: httpx.AsyncClient | None = None,
        folder_path: Path | None = None,
        connect_timeout: float = 10,
        stall_timeout: float = 120,
        job_timeout: float = 900,
        backoff_initial: float = 0.1,
        backoff_max: float = 1.0,
        call_timeout: float = CALL_TIMEOUT,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        name: str = DEFAULT_BACKEND,
        headers: Mapping[str, str] | None = None,
        probe_interval: float = 1.0,
        probe_timeout: float = 1.0,
        down_after: float | None = None,
        websocket_connect: Callable[
            ..., AbstractAsyncContextManager[trio_websocket.WebSocketConnection]
        ] = trio_websocket.open_websocket_url,
    ) -> None:
        self._websocket_connect = websocket_connect
        self.name = name
        self.headers = dict(headers or {})
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.down_after = probe_timeout if down_after is None else down_after
        self._state: SessionState = "connecting"
        self.base_url = base_url.rstrip("/")
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=30)
        self.rest = ComfyRest(
            self.base_url,
            self._http,
            call_timeout=call_timeout,
            max_response_bytes=max_response_bytes,
        )
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self.job_timeout = job_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.client_id = uuid.uuid4().hex
        self.last_error: str | None = None
        self.queue_remaining: int | None = None
        self._available = False
        self._available_changed = trio.Event()
        self._connection = 0
        self._trackers: dict[str, Tracker] = {}
        self.images = ImageFetcher(self.rest, folder_path)

    @classmethod
    @asynccontextmanager
    async def open(cls, base_url: str, **kwargs: Any) -> AsyncIterator[ComfySession]:
        """A session owning its httpx client, closed on exit. ``run`` is still the caller's."""
        session = cls(base_url, **kwargs)
        try:
            yield session
        finally:
            await session.aclose()

    async def aclose(self) -> None:
        """Close the httpx client if the session made it."""
        if self._owns_http:
            await self._http.aclose()

    # --- connection -----------------------------------------------------------------------------

    @property
    def ws_url(self) -> str:
        scheme, rest = self.base_url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={self.client_id}"

    @property
    def available(self) -> bool:
        """True while the WebSocket is connected."""
        return self._available

    @property
    def label(self) -> str:
        """How errors name this ComfyUI: by its name when it is one of a fleet."""
        return "ComfyUI" if self.name == DEFAULT_BACKEND else f"ComfyUI {self.name}"

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def connections(self) -> int:
        """How many times the WebSocket connected (a change means a reconnect)."""
        return self._connection

    def _set_state(self, state: SessionState) -> None:
        if state == self._state:
            return
        self._state = state
        self._available_changed.set()
        self._available_changed = trio.Event()
        for tracker in self._trackers.values():
            tracker.notify()

    async def wait_state_change(self) -> None:
        """Return once the state (or availability) changes."""
        await self._available_changed.wait()

    async def wait_available(self) -> None:
        """Return once the WebSocket is connected (at once if it is)."""
        while not self._available:
            await self._available_changed.wait()

    def statistics(self) -> SessionStatistics:
        return SessionStatistics(
            available=self._available,
            last_error=self.last_error,
            queue_remaining=self.queue_remaining,
            tracked_prompts=len(self._trackers),
            connections=self._connection,
        )

    def _set_available(self, available: bool) -> None:
        if available == self._available:
            return
        self._available = available
        self._available_changed.set()
        self._available_changed = trio.Event()
        if not available:
            for tracker in self._trackers.values():
                tracker.notify()
        if available:
            self._set_state("up")
        elif self._state == "up":
            self._set_state("reconnecting")

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Keep the WebSocket connected and route its messages, forever.

        Starts at once (``task_status.started()`` before the first connection), so the service
        runs while ComfyUI is down; ``available``, `state` and ``last_error`` tell how it goes.
        A lost connection is tried again at once, then after ``backoff_initial`` seconds,
        doubling up to ``backoff_max``; `state` turns ``down`` when it is not back within
        ``down_after`` seconds (or when the first connection fails).
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_down)
            task_status.started()
            await self._connect_forever()

    async def _watch_down(self) -> NoReturn:
        """``reconnecting`` turns ``down`` after ``down_after`` seconds without a connection."""
        while True:
            while self._state != "reconnecting":
                await self._available_changed.wait()
            with trio.move_on_after(self.down_after):
                while self._state == "reconnecting":
                    await self._available_changed.wait()
            if self._state == "reconnecting":
                log.warning(
                    "ComfyUI %s is down: not back within %s", self.name, _seconds(self.down_after)
                )
                self._set_state("down")

    async def _connect_forever(self) -> NoReturn:
        delay = 0.0  # a lost connection is tried again at once
        while True:
            unanswered = False
            try:
                async with self._websocket_connect(
                    self.ws_url,
                    max_message_size=MAX_MESSAGE_SIZE,
                    connect_timeout=self.connect_timeout,
                    disconnect_timeout=1,
                    extra_headers=[(k.encode(), v.encode()) for k, v in self.headers.items()]
                    or None,
                ) as ws:
                    # Previews then come as event 4, naming their prompt (ComfyUI >= 0.3.4x).
                    await ws.send_message(_FEATURE_FLAGS)
                    self._connection += 1
                    self.last_error = None
                    self._set_available(True)
                    delay = 0.0
                    log.info("connected to ComfyUI %s at %s", self.name, self.base_url)
                    await self._read(ws)
            except _ProbeFailed:
                # Silent for probe_interval, then no pong within probe_timeout: down now.
                unanswered = True
                self._note_failure(f"no answer to a ping within {_seconds(self.probe_timeout)}")
            except (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, OSError) as exc:
                self._note_failure(_describe(exc))
            except Exception as exc:  # the link must outlive surprises; they are logged
                log.exception("the WebSocket to ComfyUI at %s failed", self.base_url)
                self.last_error = f"the connection to ComfyUI at {self.base_url} failed: {exc!r}"
            finally:
                self._set_available(False)
                if self._state == "connecting" or unanswered:
                    self._set_state("down")
            await trio.sleep(delay)
            delay = self.backoff_initial if delay == 0 else min(delay * 2, self.backoff_max)

    def _note_failure(self, reason: str) -> None:
        if self._available:
            log.warning("lost the connection to ComfyUI at %s: %s", self.base_url, reason)
            self.last_error = f"lost the connection to ComfyUI at {self.base_url}: {reason}"
        else:
            if self.last_error is None:
                log.warning("ComfyUI at %s is unavailable: %s", self.base_url, reason)
            self.last_error = f"cannot connect to ComfyUI at {self.base_url}: {reason}"

    async def _read(self, ws: trio_websocket.WebSocketConnection) -> NoReturn:
        """Route messages; after ``probe_interval`` seconds of silence, ping (trio-websocket
        reads the pong in its own task), and no pong within ``probe_timeout`` is a lost link."""
        probe_at = trio.current_time() + self.probe_interval
        while True:
            with trio.move_on_at(probe_at) as quiet:
                frame = await ws.get_message()
            if quiet.cancelled_caught:
                with trio.move_on_after(self.probe_timeout) as late:
                    await ws.ping()
                if late.cancelled_caught:
                    raise _ProbeFailed
                probe_at = trio.current_time() + self.probe_interval
                continue
            probe_at = trio.current_time() + self.probe_interval
            if isinstance(frame, bytes):
                self._route_preview(frame)
                continue
            message = parse_message(frame)
            if message is None:
                continue
            self._route(message)

    def _route_preview(self, frame: bytes) -> None:
        """A binary frame: a preview goes to its prompt's tracker (named in event 4's
        metadata; for event 1, the one prompt running)."""
        preview = parse_preview(frame)
        if preview is None:
            return
        if preview.prompt_id is not None:
            tracker = self._trackers.get(preview.prompt_id)
        else:
            running = [t for t in self._trackers.values() if t.started and not t.finished]
            tracker = running[0] if len(running) == 1 else None
        if tracker is not None:
            tracker.preview(preview.image, preview.mime)

    def _route(self, message: ComfyMessage) -> None:
        if isinstance(message, Status):
            self.queue_remaining = message.queue_remaining
        else:
            tracker = self._trackers.get(message.prompt_id)
            if tracker is not None:
                tracker.apply(message)
        # While a prompt waits its turn, any sign of life from ComfyUI holds its stall clock.
        for tracker in self._trackers.values():
            if not tracker.started:
                tracker.touch()

    # --- jobs -----------------------------------------------------------------------------------

    def _track(self, prompt_id: str, workflow: Mapping[str, Any]) -> Tracker:
        if prompt_id in self._trackers:
            raise ComfyError(f"the prompt {prompt_id} is already being followed")
        tracker = Tracker(prompt_id, workflow, self._connection)
        self._trackers[prompt_id] = tracker
        return tracker

    def _forget(self, tracker: Tracker) -> None:
        if self._trackers.get(tracker.prompt_id) is tracker:
            del self._trackers[tracker.prompt_id]

    async def submit(
        self,
        workflow: Mapping[str, Any],
        *,
        prompt_id: str,
        fail_when_down: bool = False,
        previews: bool = False,
    ) -> None:
        """Queue ``workflow`` on ComfyUI as ``prompt_id`` (a lowercase hyphenated UUID).

        Waits until the WebSocket is connected (wrap it in ``trio.fail_after`` to bound that);
        with ``fail_when_down``, raises `ComfyUnavailable` instead while the session is
        ``down`` (a fleet places the job elsewhere).
        The prompt is tracked from before the POST, so no message is missed; call
        :meth:`follow` next.

        Raises:
            ComfyError: ComfyUI refused the workflow (one sentence naming the node and input),
                or answered 5xx.
            ComfyUnavailable: ComfyUI cannot be reached.
        """
        while not self._available:
            if fail_when_down and self._state == "down":
                raise ComfyUnavailable(f"{self.label} is down")
            await self._available_changed.wait()
        tracker = self._track(prompt_id, workflow)
        try:
            await self.rest.post_prompt(
                workflow,
                client_id=self.client_id,
                prompt_id=prompt_id,
                extra_data=_PREVIEWS if previews else None,
            )
        except BaseException:
            self._forget(tracker)
            raise
        # Activity counts from the moment ComfyUI has the prompt.
        tracker.touch()

    async def follow(
        self,
        prompt_id: str,
        on_progress: OnProgress | None = None,
        on_preview: Callable[[bytes, str], None] | None = None,
    ) -> list[ImageRef]:
        """Follow a submitted prompt to its end; return its images.

        ``on_progress(value, max)`` is called for each ``progress`` message (sampler steps),
        from the session's reader as each arrives (steps that came before this call first);
        it must be quick and not raise (an exception is logged and stops the reports).
        A prompt that was not submitted through this session (say, before a restart) is
        looked up in ``/history`` and ``/queue`` first.

        Images: every image of every output node, type ``output`` (SaveImage); only if there
        are none, type ``temp`` (PreviewImage). They are those of the ``executed`` message
        when one output node listed images and the socket saw the whole prompt succeed
        (no ``GET /history`` then); otherwise those of the history entry.

        Raises:
            ComfyError: ``execution_error`` (naming the node), ``execution_interrupted``,
                cancelled through :meth:`cancel`, or finished without images.
            ComfyUnavailable: ComfyUI went away and did not come back within
                ``stall_timeout``, or it came back without the job (lost: retry it).
            JobTimeout: stalled or over ``job_timeout``; the prompt was stopped on ComfyUI.
        """
        tracker = self._trackers.get(prompt_id)
        if tracker is None:
            tracker = self._track(prompt_id, {})
            tracker.connection = -1  # unknown past: reconcile with /history and /queue first
        sentence: str | None = None
        tracker.on_preview = on_preview
        try:
            tracker.follow_progress(on_progress)
            with trio.move_on_after(self.job_timeout):
                try:
                    return await self._follow(tracker, on_progress)
                except Stalled:
                    sentence = (
                        f"ComfyUI reported nothing about the job for "
                        f"{_seconds(self.stall_timeout)}, so it was stopped"
                    )
            if sentence is None:
                sentence = (
                    f"the job ran longer than {_seconds(self.job_timeout)} on ComfyUI, "
                    f"so it was stopped"
                )
        finally:
            self._forget(tracker)
        log.warning("prompt %s: %s", prompt_id, sentence)
        with trio.move_on_after(_CLEANUP_SECONDS):
            await self._stop_quietly(prompt_id)
        raise JobTimeout(sentence)

    async def _follow(self, tracker: Tracker, on_progress: OnProgress | None) -> list[ImageRef]:
        # Progress reaches ``on_progress`` from the reader (`Tracker.follow_progress`); this
        # task wakes only when the prompt ends, fails or is cancelled, when the connection
        # changes, and at the stall deadline.
        while True:
            changed = tracker.changed()
            if tracker.cancelled:
                raise ComfyError("the job was cancelled")
            if tracker.failure is not None:
                raise ComfyError(tracker.failure)
            if tracker.finished:
                return await self._outputs(tracker)
            if not self._available or tracker.connection != self._connection:
                images = await self._reconcile(tracker)
                if images is not None:
                    return images
                continue
            with trio.move_on_at(tracker.last_activity + self.stall_timeout):
                await changed.wait()
            if changed.is_set():
                continue
            if trio.current_time() >= tracker.last_activity + self.stall_timeout:
                raise Stalled  # else there was activity since: wait on from it

    async def _reconcile(self, tracker: Tracker) -> list[ImageRef] | None:
        """After a reconnect: is the prompt done (images), still queued (None), or lost?"""
        with trio.move_on_after(self.stall_timeout) as scope:
            while not self._available and self._state != "down":
                await self._available_changed.wait()
        if self._state == "down" or scope.cancelled_caught:
            raise ComfyUnavailable(f"{self.label} went away during the job")
        connection = self._connection
        pid = tracker.prompt_id
        tracker.complete = False  # messages may have been missed: /history tells the outputs
        where = await locate(self.rest, pid)
        if where.state in ("running", "queued"):
            log.info("prompt %s is still %s after a reconnect", pid, where.state)
            tracker.connection = connection
            tracker.started = tracker.started or where.state == "running"
            tracker.touch()
            return None
        if where.entry is None:
            raise ComfyUnavailable(
                "ComfyUI lost the job (it is neither queued nor in its history: "
                "ComfyUI probably restarted)"
            )
        tracker.connection = connection
        return images_from_entry(where.entry, tracker.workflow)

    async def _outputs(self, tracker: Tracker) -> list[ImageRef]:
        """The images after ``executing`` null: from the ``executed`` message if the socket
        told all (`Tracker.outputs_known`), else from the history entry (retried: it may not
        be stored yet)."""
        known = tracker.outputs_known()
        if known is not None:
            return select_images(known)
        entry = await self.rest.history(tracker.prompt_id)
        for delay in _HISTORY_RETRIES:
            if entry is not None:
                break
            await trio.sleep(delay)
            entry = await self.rest.history(tracker.prompt_id)
        if entry is None:
            images = select_images(tracker.executed_images)
            if images:
                log.warning(
                    "prompt %s: no history entry, using the executed messages", tracker.prompt_id
                )
                return images
            raise ComfyError("ComfyUI finished the job but has no record of its results")
        return images_from_entry(entry, tracker.workflow)

    async def lookup(self, prompt_id: str) -> Whereabouts:
        """Where ComfyUI has the prompt: ``done`` (in ``/history``, whatever its end),
        ``running``, ``queued`` (pending), or ``unknown`` (never seen, deleted, or lost).

        Raises:
            ComfyUnavailable: ComfyUI cannot be reached.
        """
        return (await locate(self.rest, prompt_id)).state

    async def cancel(self, prompt_id: str) -> None:
        """Stop a prompt: delete it from the queue if pending, interrupt it if running.

        The interrupt names the prompt, so another job that happens to run is left alone.
        A :meth:`follow` of the prompt raises ``ComfyError("the job was cancelled")``.

        Raises:
            ComfyUnavailable: ComfyUI cannot be reached.
        """
        tracker = self._trackers.get(prompt_id)
        if tracker is not None:
            tracker.cancelled = True
            tracker.notify()
        if tracker is not None and tracker.started:
            # Running: every round trip before the interrupt is a step it may finish in.
            await self.rest.interrupt(prompt_id)
            await self.rest.delete_from_queue([prompt_id])
        else:
            # Pending: out of the queue first; interrupted too, had it just started.
            await self.rest.delete_from_queue([prompt_id])
            await self.rest.interrupt(prompt_id)

    def started(self, prompt_id: str) -> bool:
        """Whether ComfyUI said it began the prompt (as far as the WebSocket told)."""
        tracker = self._trackers.get(prompt_id)
        return tracker is not None and tracker.started

    async def withdraw(self, prompt_id: str) -> bool:
        """Take a prompt that has not started out of ComfyUI's queue. True when it is out
        and never ran; False when it started or ended meanwhile (it is left alone).

        Raises:
            ComfyUnavailable: ComfyUI cannot be reached.
        """
        if self.started(prompt_id):
            return False
        await self.rest.delete_from_queue([prompt_id])
        where = await locate(self.rest, prompt_id)
        return where.state == "unknown" and not self.started(prompt_id)

    def forget(self, prompt_id: str) -> None:
        """Stop tracking a prompt nobody will follow (cancelled before it was followed)."""
        tracker = self._trackers.get(prompt_id)
        if tracker is not None:
            self._forget(tracker)

    async def _stop_quietly(self, prompt_id: str) -> None:
        try:
            await self.rest.delete_from_queue([prompt_id])
            await self.rest.interrupt(prompt_id)
        except (ComfyError, ComfyUnavailable) as exc:
            log.warning("could not stop prompt %s on ComfyUI: %s", prompt_id, exc)

    async def run_prompt(
        self,
        workflow: Mapping[str, Any],
        *,
        prompt_id: str,
        on_progress: OnProgress | None = None,
    ) -> list[bytes]:
        """Submit, follow and fetch: the image files' bytes, in output order.

        If the caller cancels this call, the prompt is stopped on ComfyUI (shielded, bounded).
        Raises what :meth:`submit`, :meth:`follow` and :meth:`fetch_images` raise.
        """
        await self.submit(workflow, prompt_id=prompt_id)
        try:
            refs = await self.follow(prompt_id, on_progress)
        except trio.Cancelled:
            with trio.move_on_after(_CLEANUP_SECONDS, shield=True):
                await self._stop_quietly(prompt_id)
            raise
        return await self.fetch_images(refs)

    # --- images ---------------------------------------------------------------------------------

    async def upload_image(self, name: str, data: bytes) -> str:
        """Put the image a job starts from into ComfyUI's input folder; the name to give
        ``LoadImage`` (see `ComfyRest.upload_image`)."""
        return await self.rest.upload_image(name, data)

    async def fetch_images(self, refs: Sequence[ImageRef]) -> list[bytes]:
        """The bytes of each image, in order (see `ImageFetcher.fetch`)."""
        return await self.images.fetch(refs)

    @property
    def folder_path(self) -> Path | None:
        """ComfyUI's output folder as this machine sees it, if images are read from disk."""
        return self.images.folder_path

    # --- maintenance ----------------------------------------------------------------------------

    async def free(self, *, unload_models: bool = True, free_memory: bool = False) -> None:
        """``POST /free``: unload models from VRAM, and with ``free_memory`` drop RAM caches.

        Raises:
            ComfyUnavailable: ComfyUI cannot be reached.
            ComfyError: ComfyUI answered with an error.
        """
        await self.rest.free(unload_models=unload_models, free_memory=free_memory)

    async def inspect(
        self,
        node_classes: Mapping[str, set[str]],
        checkpoints: Mapping[str, str],
        templates_of: Mapping[str, str],
    ) -> inventory.Inventory:
        """What ComfyUI lacks of the configuration (see `fategen.comfy.inventory.inspect`)."""
        return await inventory.inspect(
            self.rest, node_classes, checkpoints, templates_of, where=self.label
        )

    async def wait_availability_change(self) -> None:
        """Return once the WebSocket connects or disconnects."""
        await self._available_changed.wait()

    async def check_setup(
        self, node_classes: Mapping[str, set[str]], checkpoints: Mapping[str, str]
    ) -> list[str]:
        """Warnings for what the configuration needs and ComfyUI lacks (see
        `fategen.comfy.inventory.check_setup`)."""
        return await inventory.check_setup(self.rest, node_classes, checkpoints)


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, trio_websocket.ConnectionTimeout):
        return "the WebSocket handshake timed out"
    if isinstance(exc, trio_websocket.ConnectionRejected):
        return f"the WebSocket was rejected ({exc.status_code})"
    if isinstance(exc, trio_websocket.ConnectionClosed):
        return f"the WebSocket closed ({exc.reason})"
    if isinstance(exc, trio_websocket.HandshakeError) and cause is not None:
        return str(cause) or type(cause).__name__
    return str(exc) or type(exc).__name__
