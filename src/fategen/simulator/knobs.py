"""The simulator's knobs (timing, installed checkpoints, faults) and its execution log."""

from __future__ import annotations

from typing import Literal

import attrs

DEFAULT_CHECKPOINTS: tuple[str, ...] = (
    "illustriousXL_v01.safetensors",
    "paSanctuary_v10.safetensors",
    "lumina_2.safetensors",
    "tiny-sd15-random.safetensors",
)
"""Checkpoints the simulated ComfyUI "has" unless told otherwise."""

DEFAULT_LORAS: tuple[str, ...] = (
    "detail-tweaker.safetensors",
    "anime-style.safetensors",
    "sdxl/film-grain.safetensors",
)
"""LoRA files the simulated ComfyUI "has" (``LoraLoader``'s ``lora_name`` choices)."""

DEFAULT_UPSCALE_MODELS: tuple[str, ...] = ("4x-UltraSharp.pth", "2x-ESRGAN.pth")
"""Upscale model files the simulated ComfyUI "has" (``UpscaleModelLoader``'s ``model_name``
choices); a model scales by the ``<N>x`` its name starts with (4 without one)."""

ExecutionStatus = Literal["success", "error", "interrupted"]


@attrs.define
class SimulatorKnobs:
    """Mutable settings, read by the simulator each time it needs them (tests change them live).

    Timing: ``step_seconds`` per sampler step; ``model_load_seconds`` whenever a
    ``CheckpointLoaderSimple`` needs a checkpoint other than the loaded one.

    Files: ``checkpoints``, ``loras`` and ``upscale_models`` are the file names GET /object_info
    lists (and GET /models/checkpoints, /models/loras, /models/upscale_models); prompts naming
    others fail validation. Input images are uploaded (POST /upload/image), not a knob.

    Faults that affect "the next job" are *counts*: each job that starts takes one from every
    non-zero count (``knobs.hang = True`` means one job, ``knobs.hang = 3`` the next three):

    - ``drop_ws_mid_job``: every open websocket is closed (code 1011) in the middle of the job;
      the job keeps running and completes.
    - ``hang``: the job stops in the middle (no more progress) until it is interrupted.
    - ``execution_error``: the job fails in the middle with ``execution_error``.

    Persistent faults stay on until reset: ``http_500`` (POST /prompt answers 500 like aiohttp),
    ``corrupt_image`` (GET /view answers bytes that are not a valid PNG),
    ``view_trickle_seconds`` (GET /view sends its body one byte per that many seconds) and
    ``view_extra_bytes`` (GET /view streams that many bytes after the image, never holding
    them in memory: a huge answer).

    ``caching``: like ComfyUI, nodes whose inputs did not change since the previous prompt are
    not run again (an identical resubmission is fully cached and repeats the earlier outputs).
    Set it to False to re-execute every node of every prompt.

    ``required_token``: when set, every HTTP route and the websocket handshake need the header
    ``Authorization: Bearer <token>``, or they answer 401 (like a reverse proxy in front of
    ComfyUI). None (the default) lets everything in.
    """

    step_seconds: float = 0.01
    model_load_seconds: float = 0.05
    checkpoints: list[str] = attrs.Factory(lambda: list(DEFAULT_CHECKPOINTS))
    loras: list[str] = attrs.Factory(lambda: list(DEFAULT_LORAS))
    upscale_models: list[str] = attrs.Factory(lambda: list(DEFAULT_UPSCALE_MODELS))
    caching: bool = True
    http_500: bool = False
    corrupt_image: bool = False
    view_trickle_seconds: float = 0.0
    view_extra_bytes: int = 0
    drop_ws_mid_job: int = 0
    hang: int = 0
    execution_error: int = 0
    required_token: str | None = None

    def take_job_faults(self) -> JobFaults:
        """Consume one unit of each counted fault for the job that starts now."""
        faults = JobFaults(
            drop_ws=self.drop_ws_mid_job > 0,
            hang=self.hang > 0,
            error=self.execution_error > 0,
        )
        self.drop_ws_mid_job = max(0, self.drop_ws_mid_job - 1)
        self.hang = max(0, self.hang - 1)
        self.execution_error = max(0, self.execution_error - 1)
        return faults


@attrs.frozen
class JobFaults:
    """The faults one job was given when it started."""

    drop_ws: bool = False
    hang: bool = False
    error: bool = False


@attrs.frozen
class ExecutionRecord:
    """When one prompt ran: ``started``/``finished`` on the trio clock (also monotonic, wall).

    ``checkpoint`` is the first ``ckpt_name`` of the prompt (None if it loads none); ``loras``
    the ``lora_name`` of each LoRA loader in it; ``input_images`` the ``image`` of each
    ``LoadImage`` in it (prompt order). ``status`` is ``interrupted`` also for a prompt
    that was running when the server stopped.
    """

    prompt_id: str
    checkpoint: str | None
    status: ExecutionStatus
    started: float
    finished: float
    started_monotonic: float
    finished_monotonic: float
    started_wall: float
    finished_wall: float
    loras: tuple[str, ...] = ()
    input_images: tuple[str, ...] = ()

    @property
    def duration(self) -> float:
        """Seconds the prompt spent executing (trio clock)."""
        return self.finished - self.started
