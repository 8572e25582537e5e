"""Routes of models: ``GET /models``, the configured models and the defaults."""

from __future__ import annotations

from quart import Blueprint
from quart_schema import validate_response

from fategen.api.common import state
from fategen.api.schemas import DefaultsInfo, ModelInfo, ModelsResponse

blueprint = Blueprint("models", __name__)


@blueprint.get("/models")
@validate_response(ModelsResponse, 200)
async def models() -> tuple[ModelsResponse, int]:
    """Every configured model and the defaults."""
    desk = state().desk
    cfg = desk.config
    d = cfg.defaults
    return (
        ModelsResponse(
            models=[
                ModelInfo(
                    id=model_id,
                    workflow=spec.workflow,
                    checkpoint=spec.checkpoint_name,
                    width=spec.image_width,
                    height=spec.image_height,
                    steps=spec.steps,
                    description=spec.description,
                    available=(
                        None
                        if not desk.availability.known
                        else desk.availability.reason(model_id) is None
                    ),
                    unavailable_reason=desk.availability.reason(model_id),
                    kinds=desk.kinds(model_id),
                )
                for model_id, spec in cfg.models.items()
            ],
            defaults=DefaultsInfo(
                model=d.model,
                width=d.width,
                height=d.height,
                count=d.count,
                max_count=d.max_count,
                min_size=d.min_size,
                max_size=d.max_size,
                max_pixels=d.max_pixels,
                img2img_strength=d.img2img_strength,
                vary_strength=d.vary_strength,
                upscale_factor=d.upscale_factor,
                max_upscale_pixels=d.max_upscale_pixels,
            ),
        ),
        200,
    )
