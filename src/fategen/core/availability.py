"""Which configured models can run on ComfyUI now: filled in by the service from what
ComfyUI has (on connect and every reconnect), read by the front desk and ``/models``."""

from __future__ import annotations

import attrs


@attrs.define
class ModelAvailability:
    """``reasons`` maps each model that cannot run to why; None while it is not known
    (ComfyUI not reached yet): then every model is taken, and jobs wait as they always did."""

    reasons: dict[str, str] | None = None

    @property
    def known(self) -> bool:
        return self.reasons is not None

    def reason(self, model: str) -> str | None:
        """Why ``model`` cannot run, or None (it can, or it is not known yet)."""
        return None if self.reasons is None else self.reasons.get(model)

    def available(self, models: list[str]) -> list[str]:
        return [m for m in models if self.reason(m) is None]
