"""Routes of health: ``GET /health``, whether the service is up and ComfyUI reachable."""

from __future__ import annotations

from quart import Blueprint
from quart_schema import validate_response

from fategen.api.common import state
from fategen.api.schemas import ComfyHealth, HealthResponse

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
@validate_response(HealthResponse, 200)
async def health() -> tuple[HealthResponse, int]:
    """The service is up; whether ComfyUI is reachable; how much work is waiting."""
    s = state()
    desk, store = s.desk, s.desk.store
    return (
        HealthResponse(
            status="stopping" if desk.stopping else "ok",
            comfyui=ComfyHealth(
                url=s.comfyui_url,
                reachable=desk.health.available,
                error=desk.health.last_error,
            ),
            queued=store.count_queued(),
            processing=len(store.processing()),
        ),
        200,
    )
