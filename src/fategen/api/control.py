"""Routes of the operator's queue control (admin key): ``GET /jobs`` (paged listings),
``GET /queue`` and ``POST /queue/pause`` / ``/resume``, ``POST /job/{id}/retry``,
``POST /job/{id}/priority``, ``POST /jobs/cancel?nick=`` and the live figures of
``GET /stats``. Every change is logged with the key's name."""

from __future__ import annotations

from quart import Blueprint, request
from quart_schema import validate_querystring, validate_request, validate_response

from fategen.api.auth import caller, key_label, may_see_details
from fategen.api.common import find_job, job_response, state
from fategen.api.frontdesk import Refused
from fategen.api.schemas import (
    CancelledResponse,
    ErrorResponse,
    JobResponse,
    JobsQuery,
    JobsResponse,
    PriorityRequest,
    QueueState,
    StatsResponse,
)
from fategen.store.jobs import JobStatus

blueprint = Blueprint("control", __name__)

#: The largest page of `GET /jobs`.
MAX_PAGE = 500


def require_admin(what: str) -> str:
    """The admin's name for the logs, or `Refused`: an admin key is needed (with keys off,
    a caller on this machine)."""
    if state().keys:
        who = caller()
        if who is None or not who.admin:
            raise Refused(f"{what} needs an admin key", 403)
    elif not may_see_details():
        raise Refused(f"{what} is allowed from this machine only while keys are off", 403)
    return key_label()


def _queue_state() -> QueueState:
    desk = state().desk
    return QueueState(
        paused=desk.scheduler.held_back,
        queued=desk.store.count_queued(),
        processing=desk.store.count_processing(),
    )


@blueprint.get("/jobs")
@validate_querystring(JobsQuery)
@validate_response(JobsResponse, 200)
@validate_response(ErrorResponse, 400)
async def list_jobs(query_args: JobsQuery) -> tuple[JobsResponse, int]:
    """Jobs by status, paged: queued ones in queue order, the others newest first."""
    require_admin("listing jobs")
    if not 1 <= query_args.limit <= MAX_PAGE:
        raise Refused(f"limit must be from 1 to {MAX_PAGE}")
    views, cursor = await state().desk.list_jobs(
        JobStatus(query_args.status),
        nick=query_args.nick,
        model=query_args.model,
        limit=query_args.limit,
        cursor=query_args.cursor,
    )
    return JobsResponse([job_response(v) for v in views], cursor), 200


@blueprint.get("/queue")
@validate_response(QueueState, 200)
async def queue_state() -> tuple[QueueState, int]:
    """Whether dispatching is paused, and how many jobs wait and run."""
    require_admin("reading the queue's state")
    return _queue_state(), 200


@blueprint.post("/queue/pause")
@validate_response(QueueState, 200)
async def pause() -> tuple[QueueState, int]:
    """Dispatch nothing new (running jobs finish; submissions are still taken). Kept
    across restarts."""
    who = require_admin("pausing the queue")
    await state().desk.set_paused(True, who)
    return _queue_state(), 200


@blueprint.post("/queue/resume")
@validate_response(QueueState, 200)
async def resume() -> tuple[QueueState, int]:
    """Dispatch again."""
    who = require_admin("resuming the queue")
    await state().desk.set_paused(False, who)
    return _queue_state(), 200


@blueprint.post("/job/<job_id>/retry")
@validate_response(JobResponse, 200)
@validate_response(ErrorResponse, 404)
@validate_response(ErrorResponse, 409)
async def retry(job_id: str) -> tuple[JobResponse, int]:
    """A new job with a failed or cancelled job's request and seed (``retry_of`` links it)."""
    who = require_admin("retrying a job")
    view = await find_job(job_id)
    return job_response(await state().desk.retry(view.id, who)), 200


@blueprint.post("/job/<job_id>/priority")
@validate_request(PriorityRequest)
@validate_response(JobResponse, 200)
@validate_response(ErrorResponse, 400)
@validate_response(ErrorResponse, 409)
async def priority(job_id: str, data: PriorityRequest) -> tuple[JobResponse, int]:
    """Move a queued job to the front of its user's jobs (``scope: user``) or of the whole
    queue (``scope: queue``)."""
    who = require_admin("moving a job")
    if data.scope not in ("user", "queue"):
        raise Refused("scope must be user or queue")
    view = await find_job(job_id)
    moved = await state().desk.prioritize(view.id, whole_queue=data.scope == "queue", who=who)
    return job_response(moved), 200


@blueprint.post("/jobs/cancel")
@validate_response(CancelledResponse, 200)
@validate_response(ErrorResponse, 400)
async def cancel_all() -> tuple[CancelledResponse, int]:
    """Cancel every queued or running job of ``?nick=`` (within ``?key=``, an API key's
    name, if given)."""
    who = require_admin("cancelling a nick's jobs")
    nick = request.args.get("nick")
    if not nick:
        raise Refused("say whose jobs to cancel (?nick=...)")
    cancelled = await state().desk.cancel_all(nick, request.args.get("key"), who)
    return CancelledResponse(cancelled), 200


@blueprint.get("/stats")
@validate_response(StatsResponse, 200)
async def stats() -> tuple[StatsResponse, int]:
    """Live figures: queue depth, and the last hour's completed and failed jobs and median
    wait."""
    require_admin("reading the figures")
    figures = state().desk.stats()
    return StatsResponse(**figures), 200  # type: ignore[arg-type]
