"""What every route module shares: the service's state on the app, errors, job responses."""

from __future__ import annotations

import json
import urllib.parse
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import attrs
from quart import Response, current_app, g, has_request_context, request

from fategen.api.frontdesk import Frontdesk, Refused
from fategen.api.schemas import InputInfo, JobResponse, Progress, WebhookInfo
from fategen.settings import Settings
from fategen.store.jobs import JobView

#: The key of `ApiState` in ``app.extensions``.
EXTENSION = "fategen"


@attrs.frozen
class ApiState:
    """All the routes know of the service (``create_app`` puts it on the app)."""

    desk: Frontdesk
    settings: Settings
    comfyui_url: str
    output_dir: Path
    #: Every API and admin key as (token, name, is admin), parsed once at start (empty:
    #: keys are off); admin keys first.
    keys: tuple[tuple[str, str, bool], ...]


def state() -> ApiState:
    """The `ApiState` of the app answering the current request."""
    return cast(ApiState, current_app.extensions[EXTENSION])


def error(message: str, status: int, **headers: str) -> Response:
    """``{"error": message}``; ``headers`` with ``_`` for ``-`` (``Retry_After``). The
    sentence is kept for the request's access-log line."""
    if has_request_context():
        g.refusal = message
    response = Response(
        json.dumps({"error": message}, ensure_ascii=False),
        status=status,
        content_type="application/json",
    )
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def base_url() -> str:
    """The base URL bots use: ``FATEGEN_PUBLIC_URL``, or the one this request came to."""
    return state().settings.public_url or request.host_url.rstrip("/")


async def find_job(job_id: str) -> JobView:
    """The job named in a path, or `Refused` (404) with a sentence."""
    try:
        canonical = str(uuid.UUID(job_id))
    except ValueError:
        raise Refused(f"there is no job {job_id[:64]!r}", 404) from None
    view = await state().desk.view(canonical)
    if view is None:
        raise Refused(f"there is no job {canonical}", 404)
    return view


def job_response(view: JobView) -> JobResponse:
    r = view.request
    image_url = None
    result = None
    images: list[str] = []
    if view.result is not None:
        result = str(state().output_dir / view.result)
        image_url = f"{base_url()}/job/{view.id}/image"
        images = [f"{image_url}/{n}" for n in range(1, r.count + 1)]
    return JobResponse(
        job_id=view.id,
        status=view.status.value,
        queue_position=view.queue_position,
        progress=Progress(step=view.progress_value, of=view.progress_max),
        result=result,
        image_url=image_url,
        error=view.error,
        nick=view.nick,
        prompt=r.prompt,
        negative=r.negative,
        model=r.model,
        width=r.width,
        height=r.height,
        count=r.count,
        seed=r.seed,
        created=iso(view.created) or "",
        started=iso(view.started),
        finished=iso(view.finished),
        cancelled_by=view.cancelled_by,
        key=view.key_name,
        backend=view.backend,
        webhooks=[
            WebhookInfo(
                id=d.id,
                event=d.event,
                state=d.state,
                attempts=d.attempts,
                next_attempt=iso(d.next_at) if d.state == "pending" else None,
                last_status=d.last_status,
                last_error=d.last_error,
            )
            for d in view.webhooks
        ],
        retry_of=view.retry_of,
        images=images,
        kind=r.kind,  # type: ignore[arg-type]
        input=_input_info(view),
    )


def _input_info(view: JobView) -> InputInfo | None:
    image = view.request.image
    if image is None:
        return None
    earlier = image.earlier
    source = image.source
    if earlier is not None:
        source = "job"
    elif source != "upload":  # a signed attachment URL: not its query, nor its fragment
        source = urllib.parse.urlsplit(source)._replace(query="", fragment="").geturl()
    return InputInfo(
        source=source,
        strength=image.strength,
        url=f"{base_url()}/job/{view.id}/input",
        job_id=None if earlier is None else earlier[0],
        image=None if earlier is None else earlier[1],
    )
