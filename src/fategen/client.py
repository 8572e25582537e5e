"""A client of fategen's HTTP API, for bots and scripts.

`AsyncClient` runs under trio and asyncio alike (httpx works on both through anyio); `Client`
is the same API, blocking, for plain scripts. Both build the same calls and parse the answers
into the attrs classes below with one cattrs converter. A refusal raises `FategenClientError`,
whose text is the service's own one-line sentence, ready to relay to a person::

    async with AsyncClient("http://127.0.0.1:8000", key=KEY) as fategen:
        job = await fategen.submit("a lighthouse at night -c 4", "alice")
        async for event in fategen.events(job.job_id):  # or: done = await fategen.wait(...)
            print(event.type, event.job and event.job.progress)
        webp = await fategen.image(job.job_id)

The client reads no environment variable: the caller passes the URL and the key (the command
line takes them from ``FATEGEN_URL`` / ``FATEGEN_KEY``).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import AsyncGenerator, Callable, Mapping
from datetime import datetime
from typing import Any, Generic, TypeVar

import anyio
import attrs
import cattrs
import httpx
from cattrs.gen import make_dict_structure_fn, override

from fategen import __version__

__all__ = [
    "FINAL_STATES",
    "AsyncClient",
    "Client",
    "Event",
    "FategenClientError",
    "FategenConnectionError",
    "JobInfo",
    "ModelInfo",
    "Progress",
    "SSEDecoder",
    "ServerSentEvent",
    "Submitted",
    "WaitTimeout",
]

T = TypeVar("T")

#: The service's default address (``fategen serve``).
DEFAULT_URL = "http://127.0.0.1:8000"
#: A job in one of these states never changes again; its event stream ends with one of them.
FINAL_STATES = frozenset({"completed", "failed", "cancelled"})
#: Seconds one ``/wait`` long-poll asks for (the service caps it at FATEGEN_WAIT_TIMEOUT_MAX).
WAIT_POLL_SECONDS = 30.0
#: Seconds before the first reconnection of an event stream (the server's ``retry:`` wins);
#: doubled after each failure in a row, up to `RECONNECT_MAX_SECONDS`.
RECONNECT_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 10.0


class FategenClientError(Exception):
    """The service refused a request, or gave no usable answer.

    ``str()`` is one sentence: the service's own ``error`` when it sent one. ``status`` is the
    HTTP status (None when no answer came); ``retry_after`` the seconds of a ``Retry-After``
    header (a 429 has one).
    """

    def __init__(self, status: int | None, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class FategenConnectionError(FategenClientError):
    """No answer came: the service is down, unreachable, too slow, or broke the connection."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


class WaitTimeout(FategenClientError):
    """`wait` gave up before the job finished; ``job`` is its last state."""

    def __init__(self, job: JobInfo, seconds: float) -> None:
        super().__init__(None, f"job {job.job_id} is still {job.status} after {seconds:g} s")
        self.job = job


@attrs.frozen
class Submitted:
    """The answer to ``POST /request``: the job was queued (or, for a retried
    Idempotency-Key, the first job)."""

    job_id: str
    status: str
    #: 0 while it runs, 1 when it runs next...; None once finished.
    queue_position: int | None
    job_url: str
    wait_url: str
    #: The answer as the service sent it, with any field this client does not know.
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False, kw_only=True)


@attrs.frozen
class Progress:
    #: Sampler steps done, of ``of`` (0 before the first).
    step: int = 0
    of: int = 0


@attrs.frozen
class InputInfo:
    """The image a job starts from."""

    #: Its URL, ``upload``, or ``job`` (an earlier job's image: ``job_id``, ``image``).
    source: str
    #: How much it changes (ComfyUI's denoise, 0 to 1).
    strength: float
    #: The image as the service keeps it (PNG).
    url: str
    job_id: str | None = None
    image: int | None = None


@attrs.frozen
class JobInfo:
    """A job as ``GET /job/{id}`` shows it (the fields in its order). Fields a newer service
    adds are ignored."""

    job_id: str
    #: queued, processing, completed, failed or cancelled.
    status: str
    #: 0 while it runs, 1 when it runs next...; None once finished.
    queue_position: int | None
    progress: Progress
    #: The WebP's path on the service's host, and its URL (completed jobs only).
    result: str | None
    image_url: str | None
    #: Why it failed, one sentence (failed jobs only).
    error: str | None
    nick: str
    prompt: str
    negative: str
    model: str
    width: int
    height: int
    #: Images on the one grid (1 to 4).
    count: int
    seed: int
    created: datetime
    started: datetime | None
    finished: datetime | None
    #: The nick that cancelled it, or admin.
    cancelled_by: str | None
    #: The name of the API key that submitted it (None with keys off).
    key: str | None = None
    #: The ComfyUI backend it was last sent to.
    backend: str | None = None
    #: txt2img, img2img (from an image, or a ``--vary``) or upscale.
    kind: str = "txt2img"
    #: The image it starts from (None when it draws from text alone).
    input: InputInfo | None = None
    #: The answer as the service sent it, with any field this client does not know.
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False, kw_only=True)

    @property
    def done(self) -> bool:
        """Whether the job has finished (completed, failed or cancelled)."""
        return self.status in FINAL_STATES


@attrs.frozen
class ModelInfo:
    """A configured model (``GET /models``)."""

    id: str
    workflow: str
    checkpoint: str
    width: int
    height: int
    steps: int
    description: str
    #: Whether ComfyUI can run it now (None: ComfyUI not reached yet), and why not.
    available: bool | None = None
    unavailable_reason: str | None = None
    #: The kinds of job it takes: txt2img, img2img, upscale.
    kinds: tuple[str, ...] = ("txt2img",)
    #: The answer as the service sent it, with any field this client does not know.
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False, kw_only=True)


@attrs.frozen
class ServerSentEvent:
    """One event of a ``text/event-stream``, as the standard defines it."""

    type: str
    data: str
    #: The last event id the stream gave, at this event (resume with it).
    id: str | None


@attrs.frozen
class Event:
    """One event of a job's stream (``GET /job/{id}/events``).

    ``type``: snapshot, queued, started, progress, preview, completed, failed or cancelled.
    ``job``: the job at that moment (None for preview events, whose ``data`` is their own).
    """

    type: str
    id: str | None
    data: Any
    job: JobInfo | None

    @property
    def final(self) -> bool:
        """Whether the stream ends with this event."""
        return self.type in FINAL_STATES


@attrs.define
class SSEDecoder:
    """Server-Sent Events out of a stream's lines (the WHATWG rules): `feed` each line
    (without its line break) and get an event at each blank line that ends one."""

    #: The last event id seen (kept from one event to the next, as the standard says).
    last_event_id: str | None = None
    #: Seconds to wait before reconnecting, when the server said (``retry:``).
    retry: float | None = None
    _type: str = ""
    _data: list[str] = attrs.field(factory=list)
    _id: str | None = None

    def feed(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):  # a comment: a heartbeat
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value) / 1000
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        # An event's id counts only once the event is complete: a connection cut in the middle
        # of one resumes before it.
        if self._id is not None:
            self.last_event_id = self._id
        data, kind = self._data, self._type or "message"
        self._data, self._type = [], ""
        if not data:
            return None
        return ServerSentEvent(type=kind, data="\n".join(data), id=self.last_event_id)


_converter = cattrs.Converter()
_converter.register_structure_hook(datetime, lambda value, _: datetime.fromisoformat(value))
for _cls in (Submitted, JobInfo, ModelInfo):  # ``raw`` is the whole answer, not a field of it
    _converter.register_structure_hook(
        _cls, make_dict_structure_fn(_cls, _converter, raw=override(omit=True))
    )


def _structure(cls: Any, data: Any, what: str) -> Any:
    """``data`` (a JSON object) as ``cls``, keeping it whole as ``raw``."""
    try:
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        return attrs.evolve(_converter.structure(data, cls), raw=data)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:
        detail = "; ".join(cattrs.transform_error(exc))
        raise FategenClientError(
            None, f"the answer to {what} is not what a fategen service sends ({detail})"
        ) from exc


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _refusal(response: httpx.Response) -> FategenClientError:
    """The error an answer other than 2xx stands for (its body must have been read)."""
    body = _body(response)
    if isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]:
        message: str = body["error"]
    else:
        message = f"the service answered {response.status_code} {response.reason_phrase}".strip()
    retry_after = None
    header = response.headers.get("Retry-After", "")
    if header.isascii() and header.isdigit():
        retry_after = float(header)
    return FategenClientError(response.status_code, message, retry_after)


def _unreachable(url: str, exc: httpx.TransportError) -> FategenConnectionError:
    """The error a failed connection stands for, in a sentence."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        why = "did not answer in time"
    elif isinstance(exc, httpx.ConnectError):
        why = f"cannot be reached ({detail})"
    else:
        why = f"broke the connection ({detail})"
    return FategenConnectionError(f"the fategen service at {url} {why}")


@attrs.frozen
class _Call(Generic[T]):
    """One request and how to read its answer: what both clients share."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, str | float] | None = None
    json: Any = None
    headers: Mapping[str, str] | None = None
    #: Seconds to add to the client's timeout (a long-poll's own).
    extra_seconds: float = 0.0
    #: A multipart/form-data body: its fields and files (instead of ``json``).
    data: Mapping[str, str] | None = None
    files: Mapping[str, tuple[str, bytes, str]] | None = None

    def read(self, response: httpx.Response) -> T:
        if not response.is_success:
            raise _refusal(response)
        return self.parse(response)


def _job_path(job_id: str, suffix: str = "") -> str:
    return f"/job/{urllib.parse.quote(job_id, safe='')}{suffix}"


def _parser(cls: Any, what: str) -> Callable[[httpx.Response], Any]:
    def parse(response: httpx.Response) -> Any:
        return _structure(cls, _body(response), what)

    return parse


def _models(response: httpx.Response) -> list[ModelInfo]:
    body = _body(response)
    models = body.get("models") if isinstance(body, dict) else None
    if not isinstance(models, list):
        raise FategenClientError(None, "the answer to GET /models has no list of models")
    return [_structure(ModelInfo, model, "GET /models") for model in models]


def _submit(
    message: str,
    nick: str,
    idempotency_key: str | None,
    image_url: str | None = None,
    image: bytes | None = None,
) -> _Call[Submitted]:
    headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
    parse = _parser(Submitted, "POST /request")
    if image is not None:  # multipart: the fields, and the image as the file "image"
        fields = {"message": message, "nick": nick}
        files = {"image": ("image", image, "application/octet-stream")}
        return _Call("POST", "/request", parse, headers=headers, data=fields, files=files)
    body = {"message": message, "nick": nick}
    if image_url is not None:
        body["image_url"] = image_url
    return _Call("POST", "/request", parse, json=body, headers=headers)


def _follow_up(
    job_id: str, kind: str, n: int, nick: str, message: str, idempotency_key: str | None
) -> _Call[Submitted]:
    headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
    return _Call(
        "POST",
        _job_path(job_id, f"/{kind}"),
        _parser(Submitted, f"POST /job/{{id}}/{kind}"),
        json={"nick": nick, "n": n, "message": message},
        headers=headers,
    )


def _job(job_id: str) -> _Call[JobInfo]:
    return _Call("GET", _job_path(job_id), _parser(JobInfo, "GET /job"))


def _wait_once(job_id: str, seconds: float) -> _Call[JobInfo]:
    path = f"/wait/{urllib.parse.quote(job_id, safe='')}"
    return _Call(
        "GET",
        path,
        _parser(JobInfo, "GET /wait"),
        params={"timeout": seconds},
        extra_seconds=seconds,
    )


def _image(job_id: str) -> _Call[bytes]:
    return _Call("GET", _job_path(job_id, "/image"), lambda response: response.content)


def _cancel(job_id: str, nick: str | None) -> _Call[JobInfo]:
    params = {} if nick is None else {"nick": nick}
    return _Call("DELETE", _job_path(job_id), _parser(JobInfo, "DELETE /job"), params=params)


def _poll_seconds(deadline: float | None, now: float) -> float:
    if deadline is None:
        return WAIT_POLL_SECONDS
    return max(0.0, min(WAIT_POLL_SECONDS, deadline - now))


def _event(sse: ServerSentEvent) -> Event:
    try:
        data: Any = json.loads(sse.data)
    except ValueError:
        data = sse.data
    job = None
    if sse.type != "preview":
        job = _structure(JobInfo, data, f"a {sse.type} event")
    return Event(type=sse.type, id=sse.id, data=data, job=job)


def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"the service's URL must start with http:// or https://, not {url!r}")
    return url


def _headers(key: str | None) -> dict[str, str]:
    headers = {"User-Agent": f"fategen-client/{__version__}"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


class AsyncClient:
    """The API for async code, under trio or asyncio. Use it as an ``async with`` block
    (or call `aclose`).

    Args:
        url: the service's base URL (``http://host:8000``; a path prefix is kept).
        key: an API key, sent as ``Authorization: Bearer``.
        timeout: seconds any one request may take (a long-poll gets its own on top).
        transport: an httpx transport (tests: ``httpx.MockTransport``).

    Raises (every method): `FategenClientError` with the service's sentence when it refuses;
    `FategenConnectionError` when it cannot be reached.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = _base_url(url)
        self._timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=_headers(key), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _run(self, call: _Call[T]) -> T:
        try:
            response = await self._http.request(
                call.method,
                call.path,
                params=call.params,
                json=call.json,
                data=call.data,
                files=call.files,
                headers=call.headers,
                timeout=self._timeout + call.extra_seconds,
            )
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        return call.read(response)

    async def submit(
        self,
        message: str,
        nick: str,
        *,
        idempotency_key: str | None = None,
        image_url: str | None = None,
        image: bytes | None = None,
    ) -> Submitted:
        """Queue a chat line (``a lighthouse at night -c 4``) for ``nick``. With an
        ``idempotency_key``, a retry gets the first job back instead of a second one. With
        ``image_url`` or ``image`` (the file's bytes, sent as an upload), the job starts
        from that image."""
        return await self._run(_submit(message, nick, idempotency_key, image_url, image))

    async def upscale(
        self,
        job_id: str,
        n: int,
        nick: str,
        *,
        message: str = "",
        idempotency_key: str | None = None,
    ) -> Submitted:
        """Queue an upscale of image ``n`` (from 1) of a completed job; ``message`` may
        override the prompt, model, size, seed or strength."""
        return await self._run(_follow_up(job_id, "upscale", n, nick, message, idempotency_key))

    async def vary(
        self,
        job_id: str,
        n: int,
        nick: str,
        *,
        message: str = "",
        idempotency_key: str | None = None,
    ) -> Submitted:
        """Queue a job like image ``n`` of a completed job (img2img from it, a new seed)."""
        return await self._run(_follow_up(job_id, "vary", n, nick, message, idempotency_key))

    async def job(self, job_id: str) -> JobInfo:
        """The job's state now."""
        return await self._run(_job(job_id))

    # The sync and async clients share this signature, and the seconds also bound the
    # service's own long-poll (GET /wait?timeout=): a parameter, not only a cancel scope.
    async def wait(self, job_id: str, *, timeout: float | None = None) -> JobInfo:  # noqa: ASYNC109
        """The job once it has finished (completed, failed or cancelled), long-polling
        ``/wait``. ``timeout``: seconds in all (None: no limit; a ``fail_after`` /
        ``asyncio.timeout`` around the call works too).

        Raises:
            WaitTimeout: the job had not finished in ``timeout`` seconds (``.job``: its state).
        """
        deadline = None if timeout is None else anyio.current_time() + timeout
        while True:
            job = await self._run(_wait_once(job_id, _poll_seconds(deadline, anyio.current_time())))
            if job.done:
                return job
            if deadline is not None and anyio.current_time() >= deadline:
                raise WaitTimeout(job, timeout or 0.0)

    async def image(self, job_id: str) -> bytes:
        """The finished job's WebP."""
        return await self._run(_image(job_id))

    async def cancel(self, job_id: str, *, nick: str | None = None) -> JobInfo:
        """Cancel a job: ``nick`` is the one that submitted it (an admin key needs none)."""
        return await self._run(_cancel(job_id, nick))

    async def models(self) -> list[ModelInfo]:
        """The configured models, and whether each can run now."""
        return await self._run(_Call("GET", "/models", _models))

    async def events(
        self, job_id: str, *, reconnects: int = 5, idle_timeout: float = 60.0
    ) -> AsyncGenerator[Event, None]:
        """The job's events as they happen, from a ``snapshot`` to its final event, after
        which the iteration ends.

        A dropped connection is opened again with ``Last-Event-ID``, so no event is missed or
        repeated; after ``reconnects`` failures in a row (no event in between), the error is
        raised. A stream silent for ``idle_timeout`` seconds (the service sends heartbeats
        more often) counts as dropped. To leave early, wrap the iteration in
        ``contextlib.aclosing(client.events(...))`` so the connection closes at once.

        Raises:
            FategenClientError: the service refused the stream (404: no such job, or a service
                without events; 429: too many streams open, ``retry_after`` says when to retry).
        """
        last_id: str | None = None
        failures = 0
        delay = RECONNECT_SECONDS
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            decoder = SSEDecoder(last_event_id=last_id)
            timeout = httpx.Timeout(self._timeout, read=idle_timeout)
            problem: FategenConnectionError
            try:
                async with self._http.stream(
                    "GET", _job_path(job_id, "/events"), headers=headers, timeout=timeout
                ) as response:
                    if not response.is_success:
                        await response.aread()
                        raise _refusal(response)
                    async for line in response.aiter_lines():
                        sse = decoder.feed(line)
                        if sse is None:
                            continue
                        failures = 0
                        last_id = sse.id
                        event = _event(sse)
                        yield event
                        if event.final:
                            return
                problem = FategenConnectionError(
                    f"the event stream of job {job_id} ended before the job did"
                )
            except httpx.TransportError as exc:
                problem = _unreachable(self.url, exc)
            failures += 1
            if failures > reconnects:
                raise problem
            if decoder.retry is not None:
                delay = decoder.retry
            await anyio.sleep(min(delay * 2 ** (failures - 1), RECONNECT_MAX_SECONDS))


class Client:
    """The same API as `AsyncClient`, blocking (no `events`: poll `job`, or `wait`). Use it
    as a ``with`` block (or call `close`)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = _base_url(url)
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=self.url, headers=_headers(key), timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, call: _Call[T]) -> T:
        try:
            response = self._http.request(
                call.method,
                call.path,
                params=call.params,
                json=call.json,
                data=call.data,
                files=call.files,
                headers=call.headers,
                timeout=self._timeout + call.extra_seconds,
            )
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        return call.read(response)

    def submit(
        self,
        message: str,
        nick: str,
        *,
        idempotency_key: str | None = None,
        image_url: str | None = None,
        image: bytes | None = None,
    ) -> Submitted:
        """As `AsyncClient.submit`."""
        return self._run(_submit(message, nick, idempotency_key, image_url, image))

    def upscale(
        self,
        job_id: str,
        n: int,
        nick: str,
        *,
        message: str = "",
        idempotency_key: str | None = None,
    ) -> Submitted:
        """As `AsyncClient.upscale`."""
        return self._run(_follow_up(job_id, "upscale", n, nick, message, idempotency_key))

    def vary(
        self,
        job_id: str,
        n: int,
        nick: str,
        *,
        message: str = "",
        idempotency_key: str | None = None,
    ) -> Submitted:
        """As `AsyncClient.vary`."""
        return self._run(_follow_up(job_id, "vary", n, nick, message, idempotency_key))

    def job(self, job_id: str) -> JobInfo:
        """As `AsyncClient.job`."""
        return self._run(_job(job_id))

    def wait(self, job_id: str, *, timeout: float | None = None) -> JobInfo:
        """As `AsyncClient.wait`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self._run(_wait_once(job_id, _poll_seconds(deadline, time.monotonic())))
            if job.done:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(job, timeout or 0.0)

    def image(self, job_id: str) -> bytes:
        """As `AsyncClient.image`."""
        return self._run(_image(job_id))

    def cancel(self, job_id: str, *, nick: str | None = None) -> JobInfo:
        """As `AsyncClient.cancel`."""
        return self._run(_cancel(job_id, nick))

    def models(self) -> list[ModelInfo]:
        """As `AsyncClient.models`."""
        return self._run(_Call("GET", "/models", _models))
