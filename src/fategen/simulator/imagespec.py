"""What the images reaching an output node look like, worked out from the prompt graph.

The size comes from the node that starts the images (an empty latent or image, a
``LoadImage``) and what the nodes on the way do to it, as ComfyUI's nodes.py and
comfy_extras/nodes_upscale_model.py do; seed, positive text and denoise from the last sampler.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

Prompt = Mapping[str, Mapping[str, Any]]


@attrs.frozen
class ImageSpec:
    """What the images reaching an output node look like.

    ``input_image`` is the ``LoadImage`` value they start from (None: drawn from nothing);
    ``denoise`` that of the last sampler on the way (0 when there is none): how far the images
    are from the input image.
    """

    width: int
    height: int
    batch_size: int
    text: str = ""
    seed: int = 0
    color: int | None = None
    input_image: str | None = None
    denoise: float = 1.0


#: The input followed upstream by nodes that do not change the image's size.
_FOLLOW = {"VAEDecode": "samples", "ImageBlur": "image"}
_LATENTS = ("EmptyLatentImage", "EmptySD3LatentImage")
_UPSCALE_FACTOR = re.compile(r"(\d+)x", re.IGNORECASE)

#: The spec of what feeds one of a node's inputs, by input name.
_Upstream = Callable[[str], ImageSpec]
#: Width and height of an input image, by ``LoadImage`` value (None: unknown).
_Sizes = Callable[[str], tuple[int, int] | None]


def upscale_factor(model_name: str) -> int:
    """How many times larger an upscale model makes images: the ``<N>x`` its file name starts
    with (``4x-UltraSharp.pth``: 4), else 4."""
    match = _UPSCALE_FACTOR.match(posixpath.basename(model_name))
    factor = int(match.group(1)) if match else 0
    return factor if factor > 0 else 4


def image_spec(
    prompt: Prompt, link: object, sizes: _Sizes | Mapping[str, tuple[int, int]]
) -> ImageSpec:
    """Walk upstream from ``link`` (``[node_id, slot]``) to the node that sets the image size
    (an empty latent or image, a ``LoadImage``: ``sizes`` gives the input image's size, by
    its ``image`` value, as a function or a mapping), then apply what the nodes on the way do
    to size and batch (VAEEncode, RepeatLatentBatch, LatentUpscale, ImageScale,
    ImageUpscaleWithModel), picking up the seed, positive prompt text and denoise of the last
    sampler."""
    lookup = sizes.get if isinstance(sizes, Mapping) else sizes
    return _spec(prompt, link, lookup, set())


def _spec(prompt: Prompt, link: object, sizes: _Sizes, seen: set[str]) -> ImageSpec:
    if not isinstance(link, list) or len(link) != 2 or link[0] in seen or link[0] not in prompt:
        return ImageSpec(512, 512, 1, denoise=0.0)
    node_id = link[0]
    seen.add(node_id)
    node = prompt[node_id]
    class_type, inputs = node["class_type"], node["inputs"]

    def upstream(name: str) -> ImageSpec:
        return _spec(prompt, inputs.get(name), sizes, seen)

    source = _source(class_type, inputs, sizes)
    if source is not None:
        return source
    if class_type == "KSampler":
        return attrs.evolve(
            upstream("latent_image"),
            seed=int(inputs["seed"]),
            text=_positive_text(prompt, inputs.get("positive")),
            denoise=float(inputs.get("denoise", 1.0)),
        )
    resized = _resize(prompt, class_type, inputs, upstream)
    if resized is not None:
        return resized
    follow = _FOLLOW.get(class_type)
    if follow is not None:
        return upstream(follow)
    first = next((v for v in inputs.values() if isinstance(v, list) and len(v) == 2), None)
    return _spec(prompt, first, sizes, seen)


def _source(class_type: str, inputs: Mapping[str, Any], sizes: _Sizes) -> ImageSpec | None:
    """The spec made by a node that starts images, or None for any other node."""
    if class_type in _LATENTS:
        width, height = int(inputs["width"]) // 8 * 8, int(inputs["height"]) // 8 * 8
        return ImageSpec(width, height, int(inputs["batch_size"]), denoise=0.0)
    if class_type == "EmptyImage":
        return ImageSpec(
            int(inputs["width"]),
            int(inputs["height"]),
            int(inputs["batch_size"]),
            color=int(inputs["color"]),
            denoise=0.0,
        )
    if class_type == "LoadImage":
        name = str(inputs["image"])
        width, height = sizes(name) or (512, 512)
        return ImageSpec(width, height, 1, input_image=name, denoise=0.0)
    return None


def _resize(
    prompt: Prompt, class_type: str, inputs: Mapping[str, Any], upstream: _Upstream
) -> ImageSpec | None:
    """The spec after a node that changes size or batch (like ComfyUI's nodes.py and
    comfy_extras/nodes_upscale_model.py do), or None for any other node."""
    if class_type == "VAEEncode":  # the VAE crops to multiples of 8
        spec = upstream("pixels")
        return attrs.evolve(spec, width=spec.width // 8 * 8, height=spec.height // 8 * 8)
    if class_type == "RepeatLatentBatch":
        spec = upstream("samples")
        return attrs.evolve(spec, batch_size=spec.batch_size * int(inputs["amount"]))
    if class_type == "LatentUpscale":
        spec = upstream("samples")
        width, height = _latent_upscale(
            spec.width, spec.height, int(inputs["width"]), int(inputs["height"])
        )
        return attrs.evolve(spec, width=width, height=height)
    if class_type == "ImageScale":
        spec = upstream("image")
        width, height = _image_scale(
            spec.width, spec.height, int(inputs["width"]), int(inputs["height"])
        )
        return attrs.evolve(spec, width=width, height=height)
    if class_type == "ImageUpscaleWithModel":
        spec = upstream("image")
        factor = upscale_factor(_model_name(prompt, inputs.get("upscale_model")))
        return attrs.evolve(spec, width=spec.width * factor, height=spec.height * factor)
    return None


def _latent_upscale(width: int, height: int, new_width: int, new_height: int) -> tuple[int, int]:
    """LatentUpscale's output size: 0 on one side keeps the aspect ratio, sides at least 64,
    rounded down to multiples of 8 (the latent is an eighth of the pixels)."""
    if new_width == 0 and new_height == 0:
        return width, height
    latent_width, latent_height = max(1, width // 8), max(1, height // 8)
    if new_width == 0:
        new_height = max(64, new_height)
        new_width = max(64, round(latent_width * new_height / latent_height))
    elif new_height == 0:
        new_width = max(64, new_width)
        new_height = max(64, round(latent_height * new_width / latent_width))
    else:
        new_width, new_height = max(64, new_width), max(64, new_height)
    return new_width // 8 * 8, new_height // 8 * 8


def _image_scale(width: int, height: int, new_width: int, new_height: int) -> tuple[int, int]:
    """ImageScale's output size: 0 on one side keeps the aspect ratio (at least 1 pixel)."""
    if new_width == 0 and new_height == 0:
        return width, height
    if new_width == 0:
        new_width = max(1, round(width * new_height / height))
    elif new_height == 0:
        new_height = max(1, round(height * new_width / width))
    return new_width, new_height


def _model_name(prompt: Prompt, link: object) -> str:
    if not isinstance(link, list) or len(link) != 2 or link[0] not in prompt:
        return ""
    node = prompt[link[0]]
    name = node["inputs"].get("model_name")
    return name if node["class_type"] == "UpscaleModelLoader" and isinstance(name, str) else ""


def _positive_text(prompt: Prompt, link: object) -> str:
    if not isinstance(link, list):
        return ""
    node = prompt[link[0]]
    text = node["inputs"].get("text")
    return text if node["class_type"] == "CLIPTextEncode" and isinstance(text, str) else ""
