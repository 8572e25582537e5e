"""Routes of health: ``GET /health`` (liveness: 200 while the process serves) and
``GET /ready`` (readiness: 200 only while jobs can run, 503 with the reason otherwise), for
load balancers and Kubernetes probes. Neither shows ComfyUI's address or errors to a caller
without a key."""

from __future__ import annotations

from quart import Blueprint
from quart_schema import validate_response

from fategen.api.auth import may_see_details
from fategen.api.common import state
from fategen.api.schemas import BackendHealth, ComfyHealth, HealthResponse, ReadyResponse

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
@validate_response(HealthResponse, 200)
async def health() -> tuple[HealthResponse, int]:
    """The service is up; whether ComfyUI is reachable; how much work is waiting."""
    s = state()
    desk, store = s.desk, s.desk.store
    details = may_see_details()
    return (
        HealthResponse(
            status="stopping" if desk.stopping else "ok",
            comfyui=ComfyHealth(
                reachable=desk.health.available,
                url=s.comfyui_url if details else None,
                error=desk.health.last_error if details else None,
            ),
            queued=store.count_queued(),
            processing=store.count_processing(),
            backends=[
                BackendHealth(name=v.name, state=v.state)
                for v in (desk.fleet.views() if desk.fleet is not None else [])
            ],
        ),
        200,
    )


@blueprint.get("/ready")
@validate_response(ReadyResponse, 200)
@validate_response(ReadyResponse, 503)
async def ready() -> tuple[ReadyResponse, int]:
    """Whether jobs can run now.

    200 when a ComfyUI backend is up (connected and not drained) and the service is not
    shutting down, 503 with the reason otherwise."""
    desk = state().desk
    if desk.stopping:
        return ReadyResponse(ready=False, reason="the service is shutting down"), 503
    views = desk.fleet.views() if desk.fleet is not None else []
    if not desk.health.available or (views and not any(v.state == "up" for v in views)):
        reason = "ComfyUI cannot be reached"
        if len(views) > 1:
            reason = "no ComfyUI backend can take jobs: " + ", ".join(
                f"{v.name} is {v.state}" for v in views
            )
        elif may_see_details() and desk.health.last_error:
            reason = desk.health.last_error
        return ReadyResponse(ready=False, reason=reason), 503
    return ReadyResponse(ready=True, paused=desk.scheduler.held_back), 200
