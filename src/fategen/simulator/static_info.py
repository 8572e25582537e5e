"""Fixed answers: GET /system_stats, /features, /models (shapes as recorded from ComfyUI 0.33)."""

from __future__ import annotations

import platform
from typing import Any

COMFYUI_VERSION = "0.33.0"

FEATURES: dict[str, Any] = {
    "supports_preview_metadata": True,
    "supports_model_type_tags": True,
    "max_upload_size": 104857600,
    "extension": {"manager": {"supports_v4": True}},
    "node_replacements": True,
    "assets": False,
}

MODEL_FOLDERS: list[str] = [
    "checkpoints", "configs", "loras", "vae", "text_encoders", "diffusion_models",
    "clip_vision", "style_models", "embeddings", "diffusers", "vae_approx", "controlnet",
    "gligen", "upscale_models", "latent_upscale_models", "custom_nodes", "datasets",
    "hypernetworks", "photomaker", "classifiers", "model_patches", "audio_encoders",
    "background_removal", "frame_interpolation", "geometry_estimation", "optical_flow",
    "detection",
]  # fmt: skip

_PACKAGES = [
    ("comfyui-frontend-package", "1.49.6"),
    ("comfyui-workflow-templates", "0.11.44"),
    ("comfyui-embedded-docs", "0.5.10"),
    ("comfy-kitchen", "0.2.31"),
    ("comfy-aimdo", "0.4.13"),
]
_MEMORY = 25276510208
_FREE = 24391217152


def system_stats(host: str, port: int | None) -> dict[str, Any]:
    """GET /system_stats for a CPU-only ComfyUI started like the recorded one."""
    return {
        "system": {
            "os": "linux",
            "ram_total": _MEMORY,
            "ram_free": _FREE,
            "comfyui_version": COMFYUI_VERSION,
            "required_frontend_version": "1.49.6",
            "installed_templates_version": "0.11.44",
            "required_templates_version": "0.11.44",
            "comfy_package_versions": [
                {"name": name, "installed": version, "required": version}
                for name, version in _PACKAGES
            ],
            "python_version": platform.python_version(),
            "pytorch_version": "2.13.0+cpu",
            "embedded_python": False,
            "deploy_environment": "fategen-simulator",
            "argv": ["main.py", "--cpu", "--listen", host, "--port", str(port or 0)],
        },
        "devices": [
            {
                "name": "cpu",
                "type": "cpu",
                "index": None,
                "vram_total": _MEMORY,
                "vram_free": _FREE,
                "torch_vram_total": _MEMORY,
                "torch_vram_free": _FREE,
            }
        ],
    }
