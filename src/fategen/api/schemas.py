"""The HTTP API's request and response types; the OpenAPI document is generated from these."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import attrs
from msgspec import Meta
from msgspec.json import schema_components
from quart_schema import OpenAPIProvider

#: A job's status, one of these (the OpenAPI document lists them as an enum).
JobState = Literal["queued", "processing", "completed", "failed", "cancelled"]


@attrs.frozen
class SubmitRequest:
    """A chat line to turn into images: ``a cat on a roof -m illustriousXL -c 2``."""

    message: str
    nick: str


@attrs.frozen
class SubmitResponse:
    job_id: str
    status: JobState
    #: 0 while processing, 1 when it runs next, ...
    queue_position: int | None
    #: Where to ask about the job.
    job_url: str
    wait_url: str


@attrs.frozen
class ErrorResponse:
    """``error`` is one sentence a bot can relay to a person."""

    error: str


@attrs.frozen
class Progress:
    step: int
    of: int


@attrs.frozen
class JobResponse:
    job_id: str
    #: queued, processing, completed, failed or cancelled
    status: JobState
    queue_position: int | None
    progress: Progress
    #: Path of the finished WebP on the service's host.
    result: str | None
    #: URL of the finished WebP, for bots on another host.
    image_url: str | None
    error: str | None
    nick: str
    prompt: str
    negative: str
    model: str
    width: int
    height: int
    count: int
    seed: Annotated[
        int,
        Meta(
            ge=0,  # and at most 2^64-1: msgspec takes no bound past int64, the provider adds it
            description="The job's seed: 0 to 2^64-1 when a user gives one; fategen draws "
            "random seeds below 2^53, which JavaScript numbers hold exactly.",
        ),
    ]
    #: ISO 8601 times, UTC.
    created: str
    started: str | None
    finished: str | None
    cancelled_by: str | None
    #: The name of the API key that submitted the job (None with keys off).
    key: str | None = None


@attrs.frozen
class WaitQuery:
    #: Seconds to wait at most (the service's default and maximum apply).
    timeout: float | None = None


@attrs.frozen
class CancelQuery:
    #: The nick that submitted the job (an admin key may cancel any job without it).
    nick: str | None = None


@attrs.frozen
class ModelInfo:
    id: str
    workflow: str
    checkpoint: str
    width: int
    height: int
    steps: int
    description: str
    #: Whether ComfyUI can run it now (None: ComfyUI not reached yet).
    available: bool | None = None
    #: Why not, when it cannot (one sentence).
    unavailable_reason: str | None = None


@attrs.frozen
class DefaultsInfo:
    model: str
    width: int
    height: int
    count: int
    max_count: int
    min_size: int
    max_size: int
    max_pixels: int


@attrs.frozen
class ModelsResponse:
    models: list[ModelInfo]
    defaults: DefaultsInfo


@attrs.frozen
class ComfyHealth:
    reachable: bool
    #: ComfyUI's address and the last connection error: only for a caller with a key (or,
    #: with keys off, one on this machine).
    url: str | None = None
    error: str | None = None


@attrs.frozen
class HealthResponse:
    #: "ok" while the service runs ("stopping" during shutdown).
    status: str
    comfyui: ComfyHealth
    queued: int
    processing: int


@attrs.frozen
class ReadyResponse:
    #: True when jobs can run now: ComfyUI is reachable and the service is not stopping.
    ready: bool
    #: Why not, in one sentence.
    reason: str | None = None


API_TYPES: tuple[type, ...] = (
    SubmitRequest,
    SubmitResponse,
    ErrorResponse,
    JobResponse,
    ModelsResponse,
    HealthResponse,
    ReadyResponse,
)


class CompleteOpenAPIProvider(OpenAPIProvider):
    """Works around quart-schema 0.25 leaving nested attrs models as dangling ``$ref``s.

    quart-schema asks msgspec for a model's schema but keeps only the first component, so a
    nested model (``JobResponse.progress``) is referenced and never defined. This adds every
    component msgspec generates for `API_TYPES` to ``components.schemas``, where missing.
    """

    def schema(self) -> dict[str, Any]:
        document: dict[str, Any] = super().schema()
        _, components = schema_components(API_TYPES, ref_template="#/components/schemas/{name}")
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for name, component in components.items():
            schemas.setdefault(name, component)
        return document
