"""The job's data types: `Job` (mutable, owned by the store), its `JobStatus`, the frozen
`JobView` readers get, and the mapping of a job to and from its database row.
"""

from __future__ import annotations

import enum
import json
import sys
import time
import uuid
from typing import Any

import attrs
import cattrs

from fategen.core.prompt import GenerationRequest
from fategen.core.webhooks import DeliveryState


def user_of(key_name: str | None, nick: str) -> str:
    """The user a nick is, under the API key that sent it (key names hold no ``/``)."""
    return nick if key_name is None else f"{key_name}/{nick}"


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATUSES


#: The statuses a job never leaves.
FINISHED_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


def _interned(text: str) -> str:
    """One shared copy of a string many jobs hold (a nick, a model id, a key name): the HTTP
    layer decodes a fresh copy for every request."""
    return sys.intern(text)


def _interned_or_none(text: str | None) -> str | None:
    return None if text is None else sys.intern(text)


def _request_interned(request: GenerationRequest) -> GenerationRequest:
    """The request with its model id shared with every other job of that model."""
    model = sys.intern(request.model)
    return request if model is request.model else attrs.evolve(request, model=model)


@attrs.define
class Job:
    """A job, owned by the store (readers get a `JobView`). A queued job is held in memory
    for its whole life, so it is kept small: slots, and the strings many jobs share (nick,
    model id, key name) interned."""

    id: str
    nick: str = attrs.field(converter=_interned)
    message: str
    request: GenerationRequest = attrs.field(converter=_request_interned)
    seq: int = 0
    status: JobStatus = JobStatus.QUEUED
    created: float = attrs.field(factory=time.time)
    started: float | None = None
    finished: float | None = None
    progress_value: int = 0
    progress_max: int = 0
    result: str | None = None
    error: str | None = None
    #: How many times the job was started (a crash mid-job makes it run again once).
    attempts: int = 0
    #: When its prompt was last posted to ComfyUI (written before the post): after a restart,
    #: such a job may already be in ComfyUI's queue, so it goes first.
    submitted: float | None = None
    cancelled_by: str | None = None
    idempotency_key: str | None = None
    #: When ComfyUI finished the job's prompt (written before its images are fetched): a job
    #: found processing after a restart with this set was not interrupted, it only lacks its
    #: image; and a cancel after it is too late.
    generated: float | None = None
    #: How many times fategen stopped while ComfyUI was executing the job (two fail it).
    interruptions: int = 0
    #: When the job first started (kept when it runs again): "finished in" counts from it.
    first_started: float | None = None
    #: The name of the API key that submitted it (None with keys off). A nick belongs to
    #: its key: "alice" of one bot and "alice" of another are two users.
    key_name: str | None = attrs.field(default=None, converter=_interned_or_none)
    #: The backend its prompt was last posted to (where it may still be after a loss or a
    #: restart); None before its first post.
    backend: str | None = attrs.field(default=None, converter=_interned_or_none)
    #: How many times in a row a backend lost the job while it ran (it died, or went away).
    losses: int = 0
    #: Where its end (and with ``webhook_started`` its start) is POSTed, signed.
    webhook_url: str | None = None
    webhook_started: bool = False
    #: Whether ComfyUI is asked for sampler previews (streamed as ``preview`` events).
    previews: bool = False
    #: The job this one retries (an operator's retry of a failed or cancelled job).
    retry_of: str | None = None

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def user(self) -> str:
        """Who the job is for: the nick, within its key (the unit of fair turns, caps,
        cancel rights and Idempotency-Keys)."""
        return user_of(self.key_name, self.nick)

    def log_fields(self, event: str) -> dict[str, object]:
        """``extra=`` for a log line about the job: with LOG_FORMAT=json, its fields."""
        return {
            "job_id": self.id,
            "nick": self.nick,
            "key": self.key_name,
            "model": self.model,
            "event": event,
        }

    def ended(self) -> bool:
        """Whether the job has finished. A method, not a property, so that a type checker
        does not carry an earlier answer across the ``await`` that may have changed it."""
        return self.status.finished

    @staticmethod
    def new_id() -> str:
        return str(uuid.uuid4())


@attrs.frozen
class JobView:
    """An immutable snapshot of a job, for readers."""

    id: str
    nick: str
    status: JobStatus
    queue_position: int | None
    request: GenerationRequest
    created: float
    started: float | None
    finished: float | None
    progress_value: int
    progress_max: int
    result: str | None
    error: str | None
    cancelled_by: str | None
    key_name: str | None = None
    backend: str | None = None
    #: Its webhook deliveries, oldest first.
    webhooks: tuple[DeliveryState, ...] = ()
    retry_of: str | None = None


#: The one converter for jobs: a job is stored as this JSON (the ``body`` column).
_converter = cattrs.Converter()


def job_to_row(job: Job) -> tuple[Any, ...]:
    """The row of the ``jobs`` table: its indexed columns, then the whole job as JSON."""
    return (
        job.id,
        job.seq,
        job.nick,
        job.status.value,
        job.created,
        job.finished,
        job.idempotency_key,
        json.dumps(_converter.unstructure(job), ensure_ascii=False),
    )


def job_from_body(body: str) -> Job:
    """The job stored as ``body`` (the last column of `job_to_row`)."""
    return _converter.structure(json.loads(body), Job)


def job_payload(job: Job, event: str, base_url: str) -> dict[str, Any]:
    """The body of a webhook delivery telling of ``event`` (Standard Webhooks' shape: a
    ``type``, a ``timestamp`` and the job as ``data``)."""
    request = job.request
    image_url = f"{base_url}/job/{job.id}/image" if job.result is not None and base_url else None
    return {
        "type": event,
        "timestamp": _iso(time.time()),
        "data": {
            "job_id": job.id,
            "status": job.status.value,
            "nick": job.nick,
            "key": job.key_name,
            "prompt": request.prompt,
            "negative": request.negative,
            "model": request.model,
            "width": request.width,
            "height": request.height,
            "count": request.count,
            "seed": request.seed,
            "error": job.error,
            "cancelled_by": job.cancelled_by,
            "image_url": image_url,
            "job_url": f"{base_url}/job/{job.id}" if base_url else None,
            "created": _iso(job.created),
            "started": _iso(job.first_started or job.started),
            "finished": _iso(job.finished),
            "backend": job.backend,
            "kind": request.kind,
            "input_url": (
                f"{base_url}/job/{job.id}/input" if request.image is not None and base_url else None
            ),
        },
    }


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="milliseconds")
