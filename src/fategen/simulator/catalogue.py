"""The node classes the simulator knows, as GET /object_info describes them.

Specs come from ``object_info.json`` (entries recorded from ComfyUI 0.33, see
/work/shared/comfyui-protocol); the choice lists that depend on files (``ckpt_name``,
``lora_name``, ``UpscaleModelLoader.model_name``, ``LoadImage.image``) are filled from the
simulator's state when asked: in slot 0 of a classic (V1) spec, ``[[choices...], {...}]``, or
in the ``options`` of a ``["COMBO", {"options": [...]}]`` spec (V3 nodes).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

_NODES: dict[str, dict[str, Any]] = json.loads(
    resources.files(__package__).joinpath("object_info.json").read_text(encoding="utf-8")
)["nodes"]

_FILE_CHOICES = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("LoadImage", "image"): "inputs",
    ("UpscaleModelLoader", "model_name"): "upscale_models",
}


def node_classes() -> list[str]:
    """Names of every known node class."""
    return list(_NODES)


def is_known(class_type: object) -> bool:
    """Whether ``class_type`` names a known node class."""
    return isinstance(class_type, str) and class_type in _NODES


def is_output_node(class_type: str) -> bool:
    """Whether ComfyUI treats nodes of this class as outputs (``OUTPUT_NODE``)."""
    return bool(_NODES[class_type]["output_node"])


def output_types(class_type: str) -> list[str]:
    """The types of the class's outputs, by slot."""
    return list(_NODES[class_type]["output"])


def hidden_inputs(class_type: str) -> list[str]:
    """Names of the hidden inputs ComfyUI fills in (``prompt``, ``extra_pnginfo``...)."""
    return list(_NODES[class_type]["input"].get("hidden", {}))


def combo_choices(spec: Sequence[Any]) -> list[Any] | None:
    """The choices of a combo input spec (either shape), or None if it is not a combo."""
    kind = spec[0]
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        options: dict[str, Any] = spec[1] if len(spec) > 1 else {}
        return list(options.get("options", []))
    return None


def node_info(
    class_type: str,
    *,
    checkpoints: Sequence[str],
    input_images: Sequence[str],
    loras: Sequence[str] = (),
    upscale_models: Sequence[str] = (),
) -> dict[str, Any]:
    """The object_info entry of one class, with its file choice lists filled in."""
    files = {
        "checkpoints": checkpoints,
        "inputs": input_images,
        "loras": loras,
        "upscale_models": upscale_models,
    }
    info = copy.deepcopy(_NODES[class_type])
    for section in info["input"].values():
        for name, spec in section.items():
            source = _FILE_CHOICES.get((class_type, name))
            if source is None:
                continue
            if spec[0] == "COMBO":
                spec[1]["options"] = list(files[source])
            else:
                spec[0] = list(files[source])
    return info


def object_info(
    *,
    checkpoints: Sequence[str],
    input_images: Sequence[str],
    loras: Sequence[str] = (),
    upscale_models: Sequence[str] = (),
) -> dict[str, Any]:
    """The whole GET /object_info answer."""
    return {
        name: node_info(
            name,
            checkpoints=checkpoints,
            input_images=input_images,
            loras=loras,
            upscale_models=upscale_models,
        )
        for name in _NODES
    }
