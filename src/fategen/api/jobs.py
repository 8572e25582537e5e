"""Routes of jobs: submit (``POST /request``), look up, long-poll, fetch the images, cancel."""

from __future__ import annotations

from pathlib import Path

import attrs
import trio
from quart import Blueprint, Response, request, send_file
from quart_schema import (
    document_headers,
    document_response,
    validate_querystring,
    validate_request,
    validate_response,
)

from fategen.api.answers import answers, job_answer
from fategen.api.auth import caller
from fategen.api.common import base_url, find_job, job_response, state
from fategen.api.frontdesk import Refused
from fategen.api.schemas import (
    CancelQuery,
    ErrorResponse,
    JobResponse,
    SubmitRequest,
    SubmitResponse,
    WaitQuery,
)
from fategen.store.jobs import JobView
from fategen.store.retention import image_path

blueprint = Blueprint("jobs", __name__)

#: Seconds a client may keep a job's image without asking again.
IMAGE_MAX_AGE = 86400


@attrs.frozen
class IdempotencyHeaders:
    idempotency_key: str | None = None


@blueprint.post("/request")
@validate_request(SubmitRequest)
@document_headers(IdempotencyHeaders)
@validate_response(SubmitResponse, 200)
@validate_response(ErrorResponse, 400)
@validate_response(ErrorResponse, 422)
@validate_response(ErrorResponse, 429)
@validate_response(ErrorResponse, 503)
async def submit(data: SubmitRequest) -> tuple[SubmitResponse, int, dict[str, str]]:
    """Queue a chat line as an image job.

    Retries with the same Idempotency-Key get the same job back, marked
    Idempotent-Replayed: true."""
    who = caller()
    view, replayed = await state().desk.submit(
        data.nick,
        data.message,
        idempotency_key=request.headers.get("Idempotency-Key"),
        key_name=None if who is None else who.key,
        webhook_url=data.webhook_url,
        webhook_started=data.webhook_started,
        previews=data.previews,
    )
    return (
        SubmitResponse(
            job_id=view.id,
            status=view.status.value,
            queue_position=view.queue_position,
            job_url=f"{base_url()}/job/{view.id}",
            wait_url=f"{base_url()}/wait/{view.id}",
        ),
        200,
        {"Idempotent-Replayed": "true"} if replayed else {},
    )


@blueprint.get("/job/<job_id>")
@validate_response(JobResponse, 200)
@validate_response(ErrorResponse, 404)
async def get_job(job_id: str) -> tuple[JobResponse, int]:
    """A job's state, queue position, progress and, once completed, its image."""
    return job_response(await find_job(job_id)), 200


@blueprint.delete("/job/<job_id>")
@validate_querystring(CancelQuery)
@validate_response(JobResponse, 200)
@validate_response(ErrorResponse, 400)
@validate_response(ErrorResponse, 403)
@validate_response(ErrorResponse, 404)
@validate_response(ErrorResponse, 409)
async def cancel_job(job_id: str, query_args: CancelQuery) -> tuple[JobResponse, int]:
    """Cancel a job: the nick that submitted it, or an admin key, may."""
    view = await find_job(job_id)
    who = caller()
    cancelled = await state().desk.cancel(
        view.id,
        nick=query_args.nick,
        admin=who is not None and who.admin,
        key_name=None if who is None else who.key,
    )
    return job_response(cancelled), 200


@blueprint.get("/job/<job_id>/image")
@validate_response(ErrorResponse, 404)
async def get_image(job_id: str) -> Response:
    """The finished WebP (image/webp): the grid of all the job's images."""
    view = await find_job(job_id)
    if view.result is None:
        raise Refused(f"job {view.id} has no image (it is {view.status.value})", 404)
    return await _send_image(view, state().output_dir / Path(view.result).name)


@blueprint.get("/job/<job_id>/image/<n>")
@validate_response(ErrorResponse, 404)
async def get_each_image(job_id: str, n: str) -> Response:
    """Image ``n`` (1 for the first) of a finished job, alone (image/webp)."""
    view = await find_job(job_id)
    if view.result is None:
        raise Refused(f"job {view.id} has no images yet (it is {view.status.value})", 404)
    count = view.request.count
    if not (n.isascii() and n.isdigit() and 1 <= int(n) <= count):
        which = "1" if count == 1 else f"1 to {count}"
        plural = "image" if count == 1 else "images"
        raise Refused(f"job {view.id} has {count} {plural}; ask for {which}", 404)
    if count == 1:  # the grid of one image is that image
        path = state().output_dir / Path(view.result).name
    else:
        path = image_path(state().output_dir, view.id, int(n))
    return await _send_image(view, path)


async def _send_image(view: JobView, path: Path) -> Response:
    if not await trio.Path(path).is_file():
        raise Refused(f"the image of job {view.id} is gone (pruned or deleted)", 404)
    # A job's image never changes: conditional requests (If-None-Match, If-Modified-Since)
    # answer 304, ranges 206, with one ETag, Last-Modified and Cache-Control throughout.
    response = await send_file(
        path, mimetype="image/webp", conditional=True, cache_timeout=IMAGE_MAX_AGE
    )
    response.cache_control.immutable = True
    return response


@blueprint.get("/job/<job_id>/preview")
@validate_response(ErrorResponse, 404)
async def get_preview(job_id: str) -> Response:
    """The latest sampler preview of a running job submitted with ``previews`` (a small
    JPEG; 404 while there is none)."""
    view = await find_job(job_id)
    found = state().desk.store.preview(view.id)
    if found is None:
        raise Refused(f"job {view.id} has no preview now (it is {view.status.value})", 404)
    image, mime = found
    response = Response(image, status=200, content_type=mime)
    response.cache_control.no_store = True
    return response


@blueprint.get("/wait/<job_id>")
@validate_querystring(WaitQuery)
@document_response(JobResponse, 200)
@document_response(JobResponse, 202)
@validate_response(ErrorResponse, 400)
@validate_response(ErrorResponse, 404)
async def wait_job(job_id: str, query_args: WaitQuery) -> Response:
    """Wait for a job to finish (long-poll).

    Answers 200 once the job has finished, or 202 with its current state when the timeout
    runs out (poll again)."""
    view = await find_job(job_id)
    settings, desk = state().settings, state().desk
    timeout = query_args.timeout
    if timeout is None:
        timeout = settings.wait_timeout_default
    if not timeout >= 0:
        raise Refused("timeout must be zero or more seconds")
    timeout = min(timeout, settings.wait_timeout_max)
    with trio.move_on_after(timeout):
        await desk.wait_finished(view.id)
    # Thousands of waiters may get here at once (their job ended, or their timeouts did):
    # they answer a batch at a time, and share one body per state of the job.
    async with answers().turn:
        final = await desk.view(view.id)
        if final is None:  # removed by retention while it was waited on
            raise Refused(f"job {view.id} is no longer kept (it finished too long ago)", 404)
        return await job_answer(final, 200 if final.status.finished else 202)
