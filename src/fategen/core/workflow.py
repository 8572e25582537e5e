"""Workflow templates: ComfyUI API-format graphs, and turning a request into one.

A template is a workflow exported from ComfyUI with "Save (API)": ``{node_id: {"inputs": {...},
"class_type": ..., "_meta": {"title": ...}}}``, where a link is ``[node_id, output_index]``.

Parameters reach the graph by *binding*, never by string templating: each parameter names a node
by its title (``_meta.title``, what ComfyUI shows on the node) and one of its inputs
(`BINDINGS`). A template declares what it can take by which titled nodes it contains, so an
operator can build any workflow in ComfyUI, rename a few nodes (``checkpoint``, ``positive``,
``negative``, ``latent``, ``sampler``, ``save``), export it, and use it with no code change.
User text is only ever stored as a JSON string value: it cannot change the graph's structure.

Loading checks, once, that the bindings are sound (`parse_template`); building (`build_workflow`)
is then a deep copy plus plain assignments, and for a request with LoRAs one ``LoraLoader`` node
per LoRA spliced in after the checkpoint (`add_loras`): no template per LoRA count.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from fategen.core.loras import Loras
from fategen.core.modelconfig import ModelConfig, ModelSpec
from fategen.core.prompt import GenerationRequest, negative_text, positive_text
from fategen.errors import WorkflowError

#: parameter -> (node title, input name). A few parameters have a second binding, used by the
#: templates that start from an image (`IMAGE_BINDINGS`).
BINDINGS: Mapping[str, tuple[str, str]] = {
    "checkpoint": ("checkpoint", "ckpt_name"),
    "positive": ("positive", "text"),
    "negative": ("negative", "text"),
    "width": ("latent", "width"),
    "height": ("latent", "height"),
    "batch_size": ("latent", "batch_size"),
    "seed": ("sampler", "seed"),
    "steps": ("sampler", "steps"),
    "cfg": ("sampler", "cfg"),
    "sampler_name": ("sampler", "sampler_name"),
    "scheduler": ("sampler", "scheduler"),
    "filename_prefix": ("save", "filename_prefix"),
    # Templates that start from an image:
    "image": ("image", "image"),
    "denoise": ("sampler", "denoise"),
    "upscale_model": ("upscaler", "model_name"),
}

#: The bindings of a template without a ``latent`` node: the image's size is set by a
#: ``resize`` node (LatentUpscale, ImageScale), the image count by a ``batch`` node
#: (RepeatLatentBatch).
IMAGE_BINDINGS: Mapping[str, tuple[str, str]] = {
    "width": ("resize", "width"),
    "height": ("resize", "height"),
    "batch_size": ("batch", "amount"),
}

#: Parameters every text-to-image template must bind (the ``save`` node is the output).
REQUIRED: frozenset[str] = frozenset(
    {"checkpoint", "positive", "width", "height", "batch_size", "seed", "filename_prefix"}
)
#: Parameters every template that starts from an image (it has an ``image`` node) must bind.
REQUIRED_IMAGE: frozenset[str] = frozenset({"image", "filename_prefix"})

#: What a job of each kind needs its template to bind (`build_workflow` checks).
NEEDS: Mapping[str, frozenset[str]] = {
    "txt2img": REQUIRED,
    "img2img": frozenset(
        {"checkpoint", "positive", "image", "denoise", "batch_size", "seed", "filename_prefix"}
    ),
    "upscale": frozenset({"image", "width", "height", "filename_prefix"}),
}

#: What each parameter is, for error messages ("... so it cannot take a negative prompt").
_WHAT: Mapping[str, str] = {
    "checkpoint": "a checkpoint",
    "positive": "a prompt",
    "negative": "a negative prompt",
    "width": "a width",
    "height": "a height",
    "batch_size": "an image count",
    "seed": "a seed",
    "steps": "a step count",
    "cfg": "a CFG scale",
    "sampler_name": "a sampler name",
    "scheduler": "a scheduler",
    "filename_prefix": "a file name prefix",
    "image": "an input image",
    "denoise": "a strength (denoise)",
    "upscale_model": "an upscale model",
}

_TITLES: frozenset[str] = frozenset(
    title for title, _ in (*BINDINGS.values(), *IMAGE_BINDINGS.values())
)

#: ComfyUI's KSampler accepts seeds 0 .. 2**64 - 1.
MAX_SEED = 2**64 - 1

#: The checkpoint loader's outputs that LoRAs patch (CheckpointLoaderSimple: MODEL, CLIP, VAE).
MODEL_OUTPUT = 0
CLIP_OUTPUT = 1


@attrs.frozen
class WorkflowTemplate:
    """A checked workflow template.

    ``graph`` is the template's own copy of the API-format graph: treat it as read-only
    (`build_workflow` deep-copies it). ``bound`` holds the parameters (keys of `BINDINGS`) this
    template can take; ``nodes`` maps each bound title to its node id; ``bindings`` maps each
    bound parameter to its (title, input).
    """

    name: str
    graph: dict[str, Any] = attrs.field(repr=False)
    bound: frozenset[str]
    nodes: Mapping[str, str] = attrs.field(repr=False)
    bindings: Mapping[str, tuple[str, str]] = attrs.field(repr=False, factory=dict)

    @property
    def from_image(self) -> bool:
        """Whether it starts from an input image (it has a node titled ``image``)."""
        return "image" in self.bound


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def parse_template(name: str, data: Any) -> WorkflowTemplate:
    """Check a decoded API-format workflow and find its bindings (pure).

    Checks: the shape (nodes with ``inputs`` and ``class_type``); every link points at an existing
    node; the titles `BINDINGS` uses appear at most once (other titles, such as ComfyUI's default
    ones, may repeat); every input `BINDINGS` names for a title that is present exists in that node
    and holds a value, not a link; the `REQUIRED` parameters are bound.

    Raises:
        WorkflowError: naming the template, and the node title and input where it applies.
    """
    where = f"workflow template {name!r}"
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        raise WorkflowError(
            f'{where} is in ComfyUI\'s UI format; export it with "Save (API)" instead'
        )
    if not isinstance(data, dict) or not data:
        raise WorkflowError(f"{where} must be a JSON object of nodes (ComfyUI API format)")
    graph = copy.deepcopy(data)
    nodes: dict[str, str] = {}
    for node_id, node in graph.items():
        if (
            not isinstance(node, dict)
            or not isinstance(node.get("inputs"), dict)
            or not isinstance(node.get("class_type"), str)
        ):
            raise WorkflowError(
                f'{where}: node {node_id!r} needs an "inputs" object and a "class_type" string'
            )
        for input_name, value in node["inputs"].items():
            if _is_link(value) and value[0] not in graph:
                raise WorkflowError(
                    f"{where}: input {input_name!r} of node {node_id!r} links to node "
                    f"{value[0]!r}, which does not exist"
                )
        meta = node.get("_meta")
        title = meta.get("title") if isinstance(meta, dict) else None
        if isinstance(title, str) and title in _TITLES:
            if title in nodes:
                raise WorkflowError(
                    f"{where}: more than one node is titled {title!r} "
                    f"(nodes {nodes[title]!r} and {node_id!r})"
                )
            nodes[title] = node_id
    bindings: dict[str, tuple[str, str]] = {}
    for param, (title, input_name) in BINDINGS.items():
        if title not in nodes and param in IMAGE_BINDINGS:
            title, input_name = IMAGE_BINDINGS[param]
        if title not in nodes:
            continue
        inputs = graph[nodes[title]]["inputs"]
        if input_name not in inputs:
            raise WorkflowError(f"{where}: the node titled {title!r} has no input {input_name!r}")
        if _is_link(inputs[input_name]):
            raise WorkflowError(
                f"{where}: input {input_name!r} of the node titled {title!r} is linked to "
                "another node; it must hold a value"
            )
        bindings[param] = (title, input_name)
    bound = frozenset(bindings)
    required = REQUIRED_IMAGE if "image" in bound else REQUIRED
    missing = sorted({BINDINGS[param][0] for param in required - bound})
    if missing:
        raise WorkflowError(
            f"{where} has no node titled "
            + ", ".join(repr(t) for t in missing)
            + " (rename the nodes in ComfyUI and export again)"
        )
    return WorkflowTemplate(name=name, graph=graph, bound=bound, nodes=nodes, bindings=bindings)


def load_template(path: Path) -> WorkflowTemplate:
    """Read and check one template; its name is the file's stem (blocking)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkflowError(f"cannot read the workflow template {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowError(
            f"workflow template {path} is not valid JSON: {exc.msg} at line {exc.lineno}"
        ) from exc
    return parse_template(path.stem, data)


def load_templates(directory: Path) -> dict[str, WorkflowTemplate]:
    """Load every ``*.json`` in ``directory`` (not hidden files), keyed by file stem (blocking)."""
    try:
        paths = sorted(
            p for p in directory.iterdir() if p.suffix == ".json" and not p.name.startswith(".")
        )
    except OSError as exc:
        raise WorkflowError(
            f"cannot read the workflow directory {directory}: {exc.strerror}"
        ) from exc
    return {path.stem: load_template(path) for path in paths}


def build_workflow(
    template: WorkflowTemplate,
    spec: ModelSpec,
    request: GenerationRequest,
    *,
    filename_prefix: str,
    image_name: str | None = None,
    upscale_model: str | None = None,
) -> dict[str, Any]:
    """The API-format graph for one request (pure): a deep copy of the template with values set.

    Sets the checkpoint, the positive text (``spec.system_prompt`` followed by `positive_text`),
    the negative text, width, height, batch size (``request.count``), seed, steps and the output
    file name prefix; ``cfg``, sampler and scheduler only when the model sets them (otherwise
    the template's values stay). A template without a ``negative`` node can still run a request
    whose negative text is empty.

    A request that starts from an image (``request.kind`` ``img2img`` or ``upscale``) also sets
    the ``image`` node to `image_name` (the name ComfyUI stored the upload as) and the sampler's
    denoise to ``request.image.strength``. An img2img template takes the image's size as it is
    (the image was resized to the request's size on arrival); an upscale template has a
    ``resize`` node for the result's size, and either a checkpoint and sampler (a second pass)
    or an ``upscaler`` node (`upscale_model`); what it lacks of the second pass is not set.

    Raises:
        WorkflowError: the request needs a parameter the template does not bind, or the seed is
            outside ComfyUI's range.
    """
    if not 0 <= request.seed <= MAX_SEED:
        raise WorkflowError(f"the seed must be between 0 and {MAX_SEED}, got {request.seed}")
    kind = request.kind
    if (kind != "txt2img") != template.from_image:
        wanted = "starts from an image" if template.from_image else "draws from text"
        raise WorkflowError(
            f"the workflow {template.name!r} {wanted}, so it cannot run a {kind} job"
        )
    values: dict[str, Any] = {
        "checkpoint": spec.checkpoint_name,
        "positive": spec.system_prompt + positive_text(request, spec),
        "width": request.width,
        "height": request.height,
        "batch_size": request.count,
        "seed": request.seed,
        "steps": spec.steps,
        "filename_prefix": filename_prefix,
    }
    negative = negative_text(request, spec)
    if negative or "negative" in template.bound:
        # An empty negative still overwrites the template's example text.
        values["negative"] = negative
    if spec.cfg is not None:
        values["cfg"] = spec.cfg
    if spec.sampler is not None:
        values["sampler_name"] = spec.sampler
    if spec.scheduler is not None:
        values["scheduler"] = spec.scheduler
    needed = set(NEEDS[kind])
    if request.image is not None:
        values["image"] = image_name or "input.png"
        values["denoise"] = request.image.strength
        if upscale_model is not None:
            values["upscale_model"] = upscale_model
        if kind == "upscale" and "checkpoint" in template.bound:  # a second sampler pass
            needed |= {"positive", "seed", "denoise"}
        if negative and "checkpoint" in template.bound:
            needed.add("negative")
        # What the image-based template does not bind is not set: an img2img template takes
        # the image's own size, a model upscale has no sampler.
        values = {p: v for p, v in values.items() if p in template.bound or p in needed}
    graph = copy.deepcopy(template.graph)
    for param, value in values.items():
        if param not in template.bound:
            binding = IMAGE_BINDINGS.get(param) if template.from_image else None
            binding = binding or BINDINGS[param]
            raise WorkflowError(
                f"the workflow {template.name!r} has no node titled {binding[0]!r}, "
                f"so it cannot take {_WHAT[param]}"
            )
        title, input_name = template.bindings[param]
        graph[template.nodes[title]]["inputs"][input_name] = value
    if request.loras and "checkpoint" in template.bound:
        graph = add_loras(graph, template.nodes["checkpoint"], request.loras, where=template.name)
    return graph


def template_for(
    config: ModelConfig, templates: Mapping[str, WorkflowTemplate], request: GenerationRequest
) -> WorkflowTemplate:
    """The template that runs `request`: its model's workflow for the request's kind.

    Raises:
        WorkflowError: the model has no workflow of that kind (one sentence for the user).
    """
    name = config.workflow_for(request.model, request.kind)
    template = templates.get(name)
    if template is None:
        what = {"img2img": "start from an image", "upscale": "upscale"}.get(request.kind, "run")
        raise WorkflowError(
            f'model "{request.model}" cannot {what} on this service (it has no workflow '
            f"{name!r}); pick another model with -m"
        )
    return template


def _new_ids(graph: Mapping[str, Any], count: int) -> list[str]:
    """`count` node ids that are not in `graph`: numbers after its largest numeric id."""
    numbers = [int(node_id) for node_id in graph if node_id.isascii() and node_id.isdigit()]
    start = max(numbers, default=0) + 1
    ids: list[str] = []
    while len(ids) < count:
        if str(start) not in graph:
            ids.append(str(start))
        start += 1
    return ids


def add_loras(
    graph: dict[str, Any], checkpoint: str, loras: Loras, *, where: str = "the workflow"
) -> dict[str, Any]:
    """Chain one LoRA loader per LoRA after node `checkpoint` (pure: returns a new graph).

    Every input linked to the checkpoint's MODEL (output 0) or CLIP (output 1) is relinked to
    the last loader, and loader ``i`` takes its model and clip from loader ``i - 1`` (the first
    from the checkpoint). When nothing uses the checkpoint's CLIP, the loaders are
    ``LoraLoaderModelOnly``. New nodes get numeric ids above the graph's largest one.

    Raises:
        WorkflowError: nothing takes the checkpoint's MODEL, so there is no place for a LoRA.
    """
    graph = copy.deepcopy(graph)
    if not loras:
        return graph
    consumers: dict[int, list[tuple[str, str]]] = {MODEL_OUTPUT: [], CLIP_OUTPUT: []}
    for node_id, node in graph.items():
        for input_name, value in node["inputs"].items():
            if _is_link(value) and value[0] == checkpoint and value[1] in consumers:
                consumers[value[1]].append((node_id, input_name))
    if not consumers[MODEL_OUTPUT]:
        raise WorkflowError(
            f"the workflow {where!r}: nothing uses the MODEL of its checkpoint node, "
            "so it cannot take LoRAs"
        )
    with_clip = bool(consumers[CLIP_OUTPUT])
    previous = checkpoint
    for node_id, (index, (name, weight)) in zip(
        _new_ids(graph, len(loras)), enumerate(loras, 1), strict=True
    ):
        inputs: dict[str, Any] = {"model": [previous, MODEL_OUTPUT]}
        if with_clip:
            inputs["clip"] = [previous, CLIP_OUTPUT]
        inputs["lora_name"] = name
        inputs["strength_model"] = weight
        if with_clip:
            inputs["strength_clip"] = weight
        graph[node_id] = {
            "inputs": inputs,
            "class_type": "LoraLoader" if with_clip else "LoraLoaderModelOnly",
            "_meta": {"title": f"LoRA {index}"},
        }
        previous = node_id
    for output, links in consumers.items():
        for node_id, input_name in links:
            graph[node_id]["inputs"][input_name] = [previous, output]
    return graph
