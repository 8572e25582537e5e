"""The HTTP API's request and response types; the OpenAPI document is generated from these."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import attrs
from msgspec import Meta
from msgspec.json import schema_components
from quart_schema import OpenAPIProvider

#: A job's status, one of these (the OpenAPI document lists them as an enum).
JobState = Literal["queued", "processing", "completed", "failed", "cancelled"]


def _d(description: str, *examples: object) -> Meta:
    """A field's description (and examples) for the OpenAPI document."""
    return Meta(description=description, examples=list(examples) if examples else None)


_JOB_ID = "3f0c2a9e-5b7d-4c1e-9a8f-1d2e3c4b5a69"
_BASE = "http://127.0.0.1:8000"


@attrs.frozen
class SubmitRequest:
    """A chat line to turn into images: ``a cat on a roof -m illustriousXL -c 2``."""

    message: Annotated[
        str,
        _d(
            "The user's line: the prompt, then modifiers (-m model, -w/-h size, -c count, "
            "-s seed, --ar W:H, --no negative prompt).",
            "a cyberpunk city at dusk -m illustriousXL -w 1280 -h 720 -c 4 --no blurry, text",
        ),
    ]
    nick: Annotated[str, _d("Who asked: the user's nick on the chat network.", "alice")]
    webhook_url: Annotated[
        str | None,
        _d(
            "Where to POST the job's final state, signed per Standard Webhooks (default: the "
            "API key's webhook, if the operator set one). Loopback, private and link-local "
            "hosts are refused.",
            "https://bot.example.org/fategen-hook",
        ),
    ] = None
    webhook_started: Annotated[
        bool, _d("Also POST when the job starts (event job.started).", False)
    ] = False
    previews: Annotated[
        bool,
        _d(
            "Ask ComfyUI for sampler previews: the job's event stream then carries preview "
            "events, and GET /job/{id}/preview the latest one.",
            False,
        ),
    ] = False
    image_url: Annotated[
        str | None,
        _d(
            "An image to start from (http or https; like --image in the message): fetched "
            "when the job is accepted. Or POST multipart/form-data with the same fields and "
            "the image as the file field image.",
            "https://cdn.example.org/cat.png",
        ),
    ] = None


@attrs.frozen
class WebhookInfo:
    id: Annotated[str, _d("The delivery's id (its webhook-id header).", "msg_2f0c...")]
    event: Annotated[str, _d("job.started, job.completed, job.failed or job.cancelled.")]
    state: Annotated[str, _d("pending, delivered or failed (after the last retry).")]
    attempts: Annotated[int, _d("Attempts made so far.")]
    next_attempt: Annotated[str | None, _d("When the next attempt is due (ISO 8601, UTC).")]
    last_status: Annotated[int | None, _d("The HTTP status of the last attempt.")]
    last_error: Annotated[str | None, _d("Why the last attempt failed, in one sentence.")]


@attrs.frozen
class SubmitResponse:
    job_id: Annotated[str, _d("The job's id (a UUID).", _JOB_ID)]
    status: Annotated[JobState, _d("The job's status; a new job is queued.", "queued")]
    queue_position: Annotated[
        int | None, _d("0 while processing, 1 when it runs next, ...; null once finished.", 1)
    ]
    job_url: Annotated[str, _d("Where to read the job's state.", f"{_BASE}/job/{_JOB_ID}")]
    wait_url: Annotated[str, _d("Where to wait for its end.", f"{_BASE}/wait/{_JOB_ID}")]


@attrs.frozen
class ErrorResponse:
    """``error`` is one sentence a bot can relay to a person."""

    error: Annotated[
        str,
        _d(
            "One sentence a bot can relay to a person.",
            'unknown model "illustrius"; did you mean illustriousXL?',
        ),
    ]


#: What a job makes (the OpenAPI document lists them as an enum).
JobKind = Literal["txt2img", "img2img", "upscale"]


@attrs.frozen
class InputInfo:
    source: Annotated[
        str,
        _d(
            "Where the image came from: its URL, upload (sent with the request), or job (an "
            "earlier job's image: --vary, --upscale).",
            "https://cdn.example.org/cat.png",
        ),
    ]
    strength: Annotated[float, _d("How much it changes: ComfyUI's denoise (0 to 1).", 0.6)]
    url: Annotated[str, _d("The image as fategen keeps it (PNG).", f"{_BASE}/job/{_JOB_ID}/input")]
    job_id: Annotated[str | None, _d("The earlier job, for a follow-up.")] = None
    image: Annotated[int | None, _d("Which of its images (from 1), for a follow-up.")] = None


@attrs.frozen
class UpscaleRequest:
    """A follow-up on a completed job's image: a new job, queued like any other."""

    nick: Annotated[str, _d("Who asks: the user's nick on the chat network.", "alice")]
    n: Annotated[int, _d("Which image of the job (1 for the first).", 2)] = 1
    message: Annotated[
        str,
        _d(
            "Overrides, as in a chat line: a prompt, -m, -w/-h, -s, --strength.",
            "",
        ),
    ] = ""


@attrs.frozen
class Progress:
    step: Annotated[int, _d("Sampler steps done.", 12)]
    of: Annotated[int, _d("Sampler steps in all (0 before the first).", 28)]


@attrs.frozen
class JobResponse:
    job_id: Annotated[str, _d("The job's id (a UUID).", _JOB_ID)]
    status: Annotated[JobState, _d("Where the job is.", "processing")]
    queue_position: Annotated[
        int | None, _d("0 while processing, 1 when it runs next, ...; null once finished.", 0)
    ]
    progress: Annotated[Progress, _d("Sampler steps while it runs.")]
    result: Annotated[str | None, _d("Path of the finished WebP on the service's host.")]
    image_url: Annotated[
        str | None,
        _d("URL of the finished WebP, for bots on another host.", f"{_BASE}/job/{_JOB_ID}/image"),
    ]
    error: Annotated[str | None, _d("Why it failed, in one sentence (failed jobs only).")]
    nick: Annotated[str, _d("Who asked.", "alice")]
    prompt: Annotated[str, _d("The prompt text, modifiers removed.", "a cyberpunk city at dusk")]
    negative: Annotated[str, _d("The negative prompt.", "blurry, text")]
    model: Annotated[str, _d("The model id (see /models).", "illustriousXL")]
    width: Annotated[int, _d("Width of each image in pixels.", 1280)]
    height: Annotated[int, _d("Height of each image in pixels.", 720)]
    count: Annotated[int, _d("Number of images (1 to 4), laid out on one grid.", 4)]
    seed: Annotated[
        int,
        Meta(
            ge=0,  # and at most 2^64-1: msgspec takes no bound past int64, the provider adds it
            description="The job's seed: 0 to 2^64-1 when a user gives one; fategen draws "
            "random seeds below 2^53, which JavaScript numbers hold exactly.",
            examples=[1234567890123],
        ),
    ]
    created: Annotated[str, _d("When it was accepted (ISO 8601, UTC).")]
    started: Annotated[str | None, _d("When ComfyUI started it (ISO 8601, UTC).")]
    finished: Annotated[str | None, _d("When it finished (ISO 8601, UTC).")]
    cancelled_by: Annotated[str | None, _d("Who cancelled it: the nick, or admin.")]
    key: Annotated[
        str | None, _d("The name of the API key that submitted it (null with keys off).")
    ] = None
    backend: Annotated[
        str | None,
        _d("The ComfyUI backend it was last sent to (see /backends); null before that.", "gpu0"),
    ] = None
    webhooks: Annotated[
        list[WebhookInfo], _d("Its webhook deliveries and their state, oldest first.")
    ] = attrs.field(factory=list)
    retry_of: Annotated[
        str | None, _d("The failed or cancelled job this one retries (an operator's retry).")
    ] = None
    images: Annotated[
        list[str],
        _d(
            "URL of each image, first to last (GET /job/{id}/image/{n}, n from 1); empty "
            "until the job has completed.",
            [f"{_BASE}/job/{_JOB_ID}/image/1"],
        ),
    ] = attrs.field(factory=list)
    kind: Annotated[
        JobKind,
        _d("txt2img (from text), img2img (from an image, or --vary) or upscale.", "txt2img"),
    ] = "txt2img"
    input: Annotated[
        InputInfo | None, _d("The image it starts from (null when it draws from text alone).")
    ] = None


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
    #: The kinds of job it takes: txt2img, and img2img (--image, --vary) and upscale when
    #: this service has their workflows and a backend that can run them.
    kinds: list[str] = attrs.field(factory=lambda: ["txt2img"])


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
    #: Input images and follow-ups (see the model configuration's DEFAULTS).
    img2img_strength: float = 0.6
    vary_strength: float = 0.45
    upscale_factor: float = 2.0
    max_upscale_pixels: int = 3072 * 3072


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
class BackendHealth:
    name: str
    #: connecting, up, reconnecting, down, draining or drained.
    state: str


@attrs.frozen
class HealthResponse:
    #: "ok" while the service runs ("stopping" during shutdown).
    status: str
    #: Reachable when any backend is; the error of one that is not.
    comfyui: ComfyHealth
    queued: int
    processing: int
    backends: list[BackendHealth] = attrs.field(factory=list)


@attrs.frozen
class BackendInfo:
    name: Annotated[str, _d("The backend's name (COMFYUI_BACKENDS).", "gpu0")]
    state: Annotated[
        str,
        _d(
            "connecting, up, reconnecting (lost less than the probe timeout ago), down, "
            "draining (finishing what it holds) or drained.",
            "up",
        ),
    ]
    enabled: Annotated[bool, _d("False once drained: it takes no new job.")]
    loaded_checkpoint: Annotated[
        str | None, _d("The checkpoint it last ran (null after an idle unload).")
    ]
    running: Annotated[list[str], _d("Jobs executing on it now.")]
    ahead: Annotated[list[str], _d("Jobs posted to it ahead of the running ones.")]
    comfy_queue: Annotated[int | None, _d("Prompts in its ComfyUI queue, as it last said.")]
    jobs_done: Annotated[int, _d("Jobs it generated since fategen started.")]
    jobs_lost: Annotated[int, _d("Jobs it lost while they ran (it died or went away).")]
    model_loads: Annotated[int, _d("Jobs it was given that needed another checkpoint.")]
    models: Annotated[list[str] | None, _d("The models it can run (null until it was checked).")]
    unavailable: Annotated[dict[str, str], _d("Each other model, and why it cannot run there.")]
    url: Annotated[str | None, _d("Its address (only with a key, or from this machine).")] = None
    last_error: Annotated[
        str | None, _d("Its last connection error (only with a key, or from this machine).")
    ] = None


@attrs.frozen
class BackendsResponse:
    backends: list[BackendInfo]


@attrs.frozen
class ReadyResponse:
    #: True when jobs can run now: ComfyUI is reachable and the service is not stopping.
    ready: bool
    #: Why not, in one sentence.
    reason: str | None = None
    #: True while an operator has paused dispatching (submissions are still taken).
    paused: bool = False


@attrs.frozen
class JobsQuery:
    status: JobState = "queued"
    nick: str | None = None
    model: str | None = None
    limit: int = 50
    cursor: str | None = None


@attrs.frozen
class JobsResponse:
    jobs: Annotated[list[JobResponse], _d("Queued ones in queue order; others newest first.")]
    next_cursor: Annotated[str | None, _d("Pass as cursor for the next page (null: last).")]


@attrs.frozen
class QueueState:
    paused: Annotated[bool, _d("Dispatching is paused (running jobs finish).")]
    queued: int
    processing: int


@attrs.frozen
class PriorityRequest:
    scope: Annotated[
        str, _d("user: to the front of its user's jobs; queue: to the front of the queue.")
    ] = "user"


@attrs.frozen
class CancelledResponse:
    cancelled: Annotated[list[str], _d("The jobs cancelled.")]


@attrs.frozen
class StatsResponse:
    queued: int
    processing: int
    completed_last_hour: int
    failed_last_hour: int
    median_wait_seconds: Annotated[
        float | None, _d("Median seconds from submit to start, of the last hour's jobs.")
    ]


API_TYPES: tuple[type, ...] = (
    SubmitRequest,
    SubmitResponse,
    ErrorResponse,
    JobResponse,
    ModelsResponse,
    HealthResponse,
    ReadyResponse,
    BackendsResponse,
    JobsResponse,
    QueueState,
    StatsResponse,
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
