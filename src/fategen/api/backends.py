"""Routes of the fleet: ``GET /backends`` (each ComfyUI backend: state, loaded checkpoint,
what it runs and holds), and the operator's ``POST /backends/{name}/drain`` (finish what it
holds, take nothing new) and ``/enable``."""

from __future__ import annotations

import logging

from quart import Blueprint
from quart_schema import validate_response

from fategen.api.auth import caller, key_label, may_see_details
from fategen.api.common import state
from fategen.api.frontdesk import FleetControl, Refused
from fategen.api.schemas import BackendInfo, BackendsResponse
from fategen.queue.fleet import BackendView

blueprint = Blueprint("backends", __name__)
log = logging.getLogger("fategen.api")


def _fleet() -> FleetControl:
    fleet = state().desk.fleet
    if fleet is None:
        raise Refused("this service drives no ComfyUI backends", 404)
    return fleet


def backend_info(view: BackendView, *, details: bool) -> BackendInfo:
    return BackendInfo(
        name=view.name,
        state=view.state,
        enabled=view.enabled,
        loaded_checkpoint=view.loaded_checkpoint,
        running=list(view.running),
        ahead=list(view.ahead),
        comfy_queue=view.comfy_queue,
        jobs_done=view.jobs_done,
        jobs_lost=view.jobs_lost,
        model_loads=view.model_loads,
        models=None if view.models is None else list(view.models),
        unavailable=dict(view.unavailable),
        url=view.url if details else None,
        last_error=view.last_error if details else None,
    )


@blueprint.get("/backends")
@validate_response(BackendsResponse, 200)
async def backends() -> tuple[BackendsResponse, int]:
    """Every ComfyUI backend, in the configured order."""
    details = may_see_details()
    views = _fleet().views()
    return BackendsResponse([backend_info(v, details=details) for v in views]), 200


def _require_admin() -> None:
    """Admin actions need an admin key; with keys off, a caller on this machine."""
    if state().keys:
        who = caller()
        if who is None or not who.admin:
            raise Refused("draining or enabling a backend needs an admin key", 403)
    elif not may_see_details():
        raise Refused(
            "draining or enabling a backend is allowed from this machine only while keys are off",
            403,
        )


def _change(name: str, drain: bool) -> tuple[BackendInfo, int]:
    _require_admin()
    fleet = _fleet()
    try:
        view = fleet.drain(name) if drain else fleet.enable(name)
    except KeyError:
        names = ", ".join(v.name for v in fleet.views())
        raise Refused(f"there is no backend {name[:64]!r} (there are: {names})", 404) from None
    log.info("backend %s %s by %s", name, "drained" if drain else "enabled", key_label())
    return backend_info(view, details=True), 200


@blueprint.post("/backends/<name>/drain")
@validate_response(BackendInfo, 200)
async def drain(name: str) -> tuple[BackendInfo, int]:
    """Take no new job on the backend; what it holds runs to its end (admin)."""
    return _change(name, drain=True)


@blueprint.post("/backends/<name>/enable")
@validate_response(BackendInfo, 200)
async def enable(name: str) -> tuple[BackendInfo, int]:
    """Let a drained backend take jobs again (admin)."""
    return _change(name, drain=False)
