"""Reading a validated prompt graph: execution order, cache signatures, what an image looks like."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from fategen.simulator import catalogue

Prompt = Mapping[str, Mapping[str, Any]]


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


def signatures(prompt: Prompt) -> dict[str, str]:
    """A string per node that changes whenever the node or anything upstream changes."""
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
            memo[node_id] = json.dumps([node["class_type"], inputs], sort_keys=True, default=str)
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


@attrs.frozen
class ImageSpec:
    """What the images reaching an output node look like."""

    width: int
    height: int
    batch_size: int
    text: str = ""
    seed: int = 0
    color: int | None = None
    input_image: str | None = None


_FOLLOW = {"KSampler": "latent_image", "VAEDecode": "samples", "ImageBlur": "image"}
_LATENTS = ("EmptyLatentImage", "EmptySD3LatentImage")


def image_spec(
    prompt: Prompt, link: object, input_sizes: Mapping[str, tuple[int, int]]
) -> ImageSpec:
    """Walk upstream from ``link`` (``[node_id, slot]``) to the node that sets the image size,
    picking up the seed and positive prompt text of the last sampler on the way."""
    text: str | None = None
    seed: int | None = None
    seen: set[str] = set()
    while isinstance(link, list) and link[0] not in seen:
        node_id = link[0]
        seen.add(node_id)
        node = prompt[node_id]
        class_type, inputs = node["class_type"], node["inputs"]
        if class_type in _LATENTS:
            return ImageSpec(
                width=int(inputs["width"]) // 8 * 8,
                height=int(inputs["height"]) // 8 * 8,
                batch_size=int(inputs["batch_size"]),
                text=text or "",
                seed=seed or 0,
            )
        if class_type == "EmptyImage":
            return ImageSpec(
                width=int(inputs["width"]),
                height=int(inputs["height"]),
                batch_size=int(inputs["batch_size"]),
                text=text or "",
                seed=seed or 0,
                color=int(inputs["color"]),
            )
        if class_type == "LoadImage":
            name = str(inputs["image"])
            width, height = input_sizes.get(name, (512, 512))
            return ImageSpec(width, height, 1, text or "", seed or 0, input_image=name)
        if class_type == "KSampler" and seed is None:
            seed = int(inputs["seed"])
            text = _positive_text(prompt, inputs.get("positive"))
        follow = _FOLLOW.get(class_type)
        link = (
            inputs.get(follow) if follow else next((inputs[name] for name, _ in _links(node)), None)
        )
    return ImageSpec(512, 512, 1, text or "", seed or 0)


def _positive_text(prompt: Prompt, link: object) -> str:
    if not isinstance(link, list):
        return ""
    node = prompt[link[0]]
    text = node["inputs"].get("text")
    return text if node["class_type"] == "CLIPTextEncode" and isinstance(text, str) else ""
