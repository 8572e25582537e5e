"""What a ComfyUI has installed, compared with what the configuration needs (start-up check)."""

from __future__ import annotations

from collections.abc import Mapping

from fategen.comfy.wire import ComfyRest


async def check_setup(
    rest: ComfyRest, node_classes: Mapping[str, set[str]], checkpoints: Mapping[str, str]
) -> list[str]:
    """Warnings (one sentence each) for what the configuration needs and ComfyUI lacks.

    Args:
        node_classes: workflow template name -> the node class types it uses.
        checkpoints: model id -> checkpoint file name.

    Raises:
        ComfyUnavailable: ComfyUI cannot be reached.
    """
    warnings: list[str] = []
    info = await rest.object_info()
    for template in sorted(node_classes):
        for class_type in sorted(node_classes[template] - set(info)):
            warnings.append(
                f'workflow template "{template}" uses node type "{class_type}", which '
                f"ComfyUI does not have (a custom node may be missing)"
            )
    installed = await rest.checkpoints()
    if installed is None:  # older ComfyUI: read the loader's choices
        loader = info.get("CheckpointLoaderSimple") or {}
        try:
            installed = list(loader["input"]["required"]["ckpt_name"][0])
        except (KeyError, IndexError, TypeError):
            installed = []
    for model_id in sorted(checkpoints):
        name = checkpoints[model_id]
        if name not in installed:
            warnings.append(f'model "{model_id}": checkpoint "{name}" is not installed on ComfyUI')
    return warnings
