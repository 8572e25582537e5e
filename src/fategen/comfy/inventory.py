"""What a ComfyUI has installed, compared with what the configuration needs: the start-up
warnings, and which models cannot run there (and why), read again on every reconnect."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from fategen.comfy.wire import ComfyRest


@attrs.frozen
class Inventory:
    #: One sentence per thing missing.
    warnings: list[str]
    #: Model id -> why it cannot run on this ComfyUI (one sentence).
    unavailable: dict[str, str]
    #: The LoRA file names this ComfyUI has (``LoraLoader``'s ``lora_name`` choices); empty
    #: when it has no ``LoraLoader``. For `fategen.core.loras.lora_refusal`.
    loras: frozenset[str] = frozenset()
    #: Workflow template -> the node types it uses that this ComfyUI lacks (templates it can
    #: run are absent).
    missing_nodes: dict[str, list[str]] = attrs.field(factory=dict)
    #: The upscale models it has (``UpscaleModelLoader``'s ``model_name`` choices).
    upscale_models: frozenset[str] = frozenset()


def _choices(info: Mapping[str, Any], node: str, name: str) -> frozenset[str]:
    """The choices of a node's list input in an ``/object_info`` answer (or none), in either
    shape ComfyUI uses: ``[[...], {...}]``, or ``["COMBO", {"options": [...]}]``."""
    try:
        spec = info[node]["input"]["required"][name]
        choices = spec[0]
        if choices == "COMBO":  # newer nodes: ["COMBO", {"options": [...]}]
            choices = spec[1]["options"]
    except (KeyError, IndexError, TypeError):
        return frozenset()
    if not isinstance(choices, list):
        return frozenset()
    return frozenset(choice for choice in choices if isinstance(choice, str))


def lora_names(info: Mapping[str, Any]) -> frozenset[str]:
    """The ``lora_name`` choices of ``LoraLoader`` in an ``/object_info`` answer (or none)."""
    return _choices(info, "LoraLoader", "lora_name")


async def inspect(
    rest: ComfyRest,
    node_classes: Mapping[str, set[str]],
    checkpoints: Mapping[str, str],
    templates_of: Mapping[str, str] | None = None,
    *,
    where: str = "ComfyUI",
) -> Inventory:
    """Compare ComfyUI's ``/object_info`` and checkpoint list with the configuration, and read
    which LoRAs it has.

    Args:
        node_classes: workflow template name -> the node class types it uses.
        checkpoints: model id -> checkpoint file name.
        templates_of: model id -> its template (for the models a missing node type stops).
        where: how the sentences name this ComfyUI (``ComfyUI gpu1`` in a fleet).

    Raises:
        ComfyUnavailable: ComfyUI cannot be reached.
    """
    warnings: list[str] = []
    unavailable: dict[str, str] = {}
    info = await rest.object_info()
    missing_nodes: dict[str, list[str]] = {}
    for template in sorted(node_classes):
        missing_nodes[template] = sorted(node_classes[template] - set(info))
        for class_type in missing_nodes[template]:
            warnings.append(
                f'workflow template "{template}" uses node type "{class_type}", which '
                f"{where} does not have (a custom node may be missing)"
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
            warnings.append(f'model "{model_id}": checkpoint "{name}" is not installed on {where}')
            unavailable[model_id] = f'its checkpoint "{name}" is not installed on {where}'
            continue
        workflow = (templates_of or {}).get(model_id)
        if workflow is not None and missing_nodes.get(workflow):
            unavailable[model_id] = (
                f'{where} lacks the node type "{missing_nodes[workflow][0]}" its workflow uses'
            )
    return Inventory(
        warnings,
        unavailable,
        lora_names(info),
        {name: nodes for name, nodes in missing_nodes.items() if nodes},
        _choices(info, "UpscaleModelLoader", "model_name"),
    )


async def check_setup(
    rest: ComfyRest, node_classes: Mapping[str, set[str]], checkpoints: Mapping[str, str]
) -> list[str]:
    """The start-up warnings (one sentence each) of `inspect`."""
    return (await inspect(rest, node_classes, checkpoints)).warnings
