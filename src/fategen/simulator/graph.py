"""Reading a validated prompt graph: execution order, cache signatures, the files it names.

What its images look like is ``imagespec``'s (``ImageSpec`` and ``image_spec``, also here).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from fategen.simulator import catalogue
from fategen.simulator.imagespec import ImageSpec, Prompt, image_spec

__all__ = [
    "LORA_LOADERS",
    "ImageSpec",
    "Prompt",
    "execution_order",
    "first_checkpoint",
    "image_spec",
    "input_image_names",
    "lora_names",
    "signatures",
]


def _links(node: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(input_name, source_node_id)`` of a node's linked inputs, in input order."""
    return [
        (name, value[0])
        for name, value in node.get("inputs", {}).items()
        if isinstance(value, list) and len(value) == 2
    ]


def execution_order(
    prompt: Prompt, outputs: list[str], is_cached: Callable[[str], bool]
) -> list[str]:
    """The order ComfyUI's ExecutionList runs nodes in.

    Output nodes are always listed (a cached one re-sends its output); other nodes only when
    they are needed and not cached. Among ready nodes, ComfyUI picks an output node first, then a
    node feeding an output, then one feeding such a node, else the first staged one.
    """
    pending: dict[str, None] = {}
    blocking: dict[str, dict[str, None]] = {}
    block_count: dict[str, int] = {}
    for output in outputs:
        stack = [output]
        links: list[tuple[str, str]] = []
        while stack:
            node_id = stack.pop()
            if node_id in pending:
                continue
            pending[node_id] = None
            block_count[node_id] = 0
            blocking.setdefault(node_id, {})
            for _, source in _links(prompt[node_id]):
                if not is_cached(source):
                    stack.append(source)
                    links.append((source, node_id))
        for source, target in links:
            if target not in blocking.setdefault(source, {}):
                blocking[source][target] = None
                block_count[target] += 1

    def is_output(node_id: str) -> bool:
        return catalogue.is_output_node(prompt[node_id]["class_type"])

    order: list[str] = []
    while pending:
        ready = [n for n in pending if block_count[n] == 0]
        if not ready:
            raise RuntimeError("dependency cycle in prompt")
        pick = next((n for n in ready if is_output(n)), None)
        if pick is None:
            pick = next((n for n in ready if any(is_output(b) for b in blocking[n])), None)
        if pick is None:
            pick = next(
                (
                    n
                    for n in ready
                    if any(is_output(b2) for b in blocking[n] for b2 in blocking.get(b, {}))
                ),
                ready[0],
            )
        order.append(pick)
        del pending[pick]
        for target in blocking.get(pick, {}):
            block_count[target] -= 1
    return order


def signatures(prompt: Prompt, changed: Mapping[str, str] | None = None) -> dict[str, str]:
    """A string per node that changes whenever the node or anything upstream changes.

    ``changed`` holds what ComfyUI's ``IS_CHANGED`` says of some nodes (for ``LoadImage``, a
    digest of the file): part of their signature, so a new file under the same name runs again.
    """
    changed = changed or {}
    memo: dict[str, str] = {}

    def signature(node_id: str) -> str:
        if node_id not in memo:
            node = prompt[node_id]
            inputs = {
                name: (
                    ["link", signature(value[0]), value[1]]
                    if isinstance(value, list) and len(value) == 2
                    else value
                )
                for name, value in node.get("inputs", {}).items()
            }
            memo[node_id] = json.dumps(
                [node["class_type"], inputs, changed.get(node_id)], sort_keys=True, default=str
            )
        return memo[node_id]

    return {node_id: signature(node_id) for node_id in prompt}


def first_checkpoint(prompt: Prompt) -> str | None:
    """The ``ckpt_name`` of the prompt's first CheckpointLoaderSimple, if any."""
    for node in prompt.values():
        if node.get("class_type") == "CheckpointLoaderSimple":
            return str(node["inputs"]["ckpt_name"])
    return None


#: Node classes that apply a LoRA (in the simulator: pass the model and clip through).
LORA_LOADERS = ("LoraLoader", "LoraLoaderModelOnly")


def lora_names(prompt: Prompt) -> tuple[str, ...]:
    """The ``lora_name`` of every LoRA loader in the prompt, in prompt order."""
    return tuple(
        str(node["inputs"]["lora_name"])
        for node in prompt.values()
        if node.get("class_type") in LORA_LOADERS
    )


def input_image_names(prompt: Prompt) -> tuple[str, ...]:
    """The ``image`` of every ``LoadImage`` in the prompt, in prompt order."""
    return tuple(
        str(node["inputs"]["image"])
        for node in prompt.values()
        if node.get("class_type") == "LoadImage"
    )
