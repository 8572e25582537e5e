"""Input images and follow-ups in the prompt language, and the image workflows they build."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import attrs
import pytest

from fategen.core.modelconfig import ModelConfig, load_model_config, parse_model_config
from fategen.core.prompt import (
    FollowUp,
    GenerationRequest,
    ImageInput,
    follow_up_of,
    parse_request,
    render_request,
)
from fategen.core.workflow import (
    WorkflowTemplate,
    build_workflow,
    load_templates,
    parse_template,
)
from fategen.errors import ConfigError, PromptError, WorkflowError

ROOT = Path(__file__).resolve().parents[2]
CONFIG: ModelConfig = load_model_config(ROOT / "config" / "modelConfiguration.json")
JOB = "3f0c2a9e-5b7d-4c1e-9a8f-1d2e3c4b5a69"


@pytest.fixture(scope="module")
def templates() -> dict[str, WorkflowTemplate]:
    return load_templates(ROOT / "workflows")


def parse(message: str, **kwargs: Any) -> GenerationRequest:
    return parse_request(message, CONFIG, rng=random.Random(7), **kwargs)


def error(message: str, **kwargs: Any) -> str:
    with pytest.raises(PromptError) as info:
        parse(message, **kwargs)
    text = str(info.value)
    assert "\n" not in text
    return text


def earlier(**changes: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "prompt": "a fox in snow",
        "negative": "blurry",
        "model": "illustriousXL",
        "width": 832,
        "height": 1216,
        "count": 4,
        "seed": 99,
        "loras": (("detail-tweaker.safetensors", 0.8),),
    }
    fields.update(changes)
    return GenerationRequest(**fields)


def by_title(graph: dict[str, Any], title: str) -> dict[str, Any]:
    (node,) = [n for n in graph.values() if n.get("_meta", {}).get("title") == title]
    return node


def assert_links_valid(graph: dict[str, Any]) -> None:
    for node in graph.values():
        for value in node["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                assert value[0] in graph


# --- the parser ---------------------------------------------------------------------------------


def test_image_url_with_strength() -> None:
    request = parse("a cat --image https://cdn.example.org/a.png?ex=1&hm=2 --strength 0.35")
    assert request.image == ImageInput("https://cdn.example.org/a.png?ex=1&hm=2", 0.35)
    assert request.kind == "img2img"
    assert (request.width, request.height) == (1024, 1024)  # before the image is known


def test_image_default_strength_and_short_flag() -> None:
    request = parse("a cat -i http://x.example/a.webp")
    assert request.image is not None
    assert request.image.strength == CONFIG.defaults.img2img_strength


def test_image_keeps_its_ratio_at_the_models_pixel_count() -> None:
    request = parse("a cat --image https://x.example/a.png", image_size=(1920, 1080))
    assert request.width % 64 == 0 and request.height % 64 == 0
    assert abs(request.width / request.height - 16 / 9) < 0.05
    assert abs(request.width * request.height - 1024 * 1024) / (1024 * 1024) < 0.1


def test_very_long_image_is_clamped_within_limits() -> None:
    request = parse("a cat --image https://x.example/a.png", image_size=(8000, 500))
    d = CONFIG.defaults
    assert d.min_size <= request.height and request.width <= d.max_size
    assert request.width * request.height <= d.max_pixels


def test_image_with_a_size_uses_the_size() -> None:
    request = parse("a cat --image https://x.example/a.png -w 512 -h 768", image_size=(4000, 100))
    assert (request.width, request.height) == (512, 768)


def test_attached_image() -> None:
    request = parse("a cat --strength 0.5", attached="upload")
    assert request.image == ImageInput("upload", 0.5)


@pytest.mark.parametrize(
    ("message", "kwargs", "fragment"),
    [
        ("a cat --strength 0.5", {}, "--strength needs an input image"),
        ("a cat --image x.png", {}, "--image needs an http:// or https:// URL"),
        ("a cat --image ftp://x/a.png", {}, "--image needs an http:// or https:// URL"),
        ("a cat --image https://x/a.png --strength 0", {}, "--strength must be a number more"),
        ("a cat --image https://x/a.png --strength 1.5", {}, "--strength must be a number"),
        ("a cat --image https://x/a.png --strength abc", {}, "--strength must be a number"),
        ("a cat --image https://x/a.png", {"attached": "upload"}, "give one input image"),
        ("--upscale 12:2", {}, "--upscale needs an earlier job's id"),
        (f"--vary {JOB}:0", {}, "images are numbered from 1"),
        (f"--vary {JOB}:1 --upscale {JOB}:1", {}, "either --upscale or --vary"),
    ],
)
def test_errors(message: str, kwargs: dict[str, Any], fragment: str) -> None:
    assert fragment in error(message, **kwargs)


def test_follow_up_of() -> None:
    assert follow_up_of(f"--upscale {JOB.upper()}:2") == FollowUp("upscale", JOB, 2)
    assert follow_up_of(f"more snow --vary {JOB}") == FollowUp("vary", JOB, None)
    assert follow_up_of("a cat -c 2") is None
    with pytest.raises(PromptError):
        follow_up_of("--vary nope")


def test_a_follow_up_needs_its_base() -> None:
    with pytest.raises(ValueError):
        parse(f"--vary {JOB}:1")


def test_vary_alone_takes_everything_from_the_earlier_job() -> None:
    base = earlier()
    request = parse(f"--vary {JOB}:3", base=base)
    assert request.image == ImageInput(f"job:{JOB}:3", CONFIG.defaults.vary_strength)
    assert request.image.earlier == (JOB, 3)
    assert request.kind == "img2img"
    assert (request.prompt, request.negative, request.model, request.loras) == (
        base.prompt,
        base.negative,
        base.model,
        base.loras,
    )
    assert (request.width, request.height, request.count) == (832, 1216, 4)
    assert request.seed != base.seed  # a new seed: a variation


def test_vary_overrides() -> None:
    request = parse(
        f"a wolf --vary {JOB}:1 -m paSanctuary -c 2 --strength 0.2 -s 5 --no fog", base=earlier()
    )
    assert (request.prompt, request.model, request.count, request.seed) == (
        "a wolf",
        "paSanctuary",
        2,
        5,
    )
    assert request.negative == "fog"
    assert request.image is not None and request.image.strength == 0.2


def test_upscale_alone() -> None:
    base = earlier(count=1, width=1024, height=768)
    request = parse(f"--upscale {JOB}", base=base, image_size=(1024, 768))
    assert request.kind == "upscale" and request.upscale
    assert (request.width, request.height, request.count, request.seed) == (2048, 1536, 1, 99)
    assert request.image == ImageInput(f"job:{JOB}:1", CONFIG.defaults.upscale_denoise)
    assert request.loras == base.loras  # the second pass runs with the same LoRAs


def test_upscale_is_kept_within_the_pixel_cap() -> None:
    base = earlier(width=2048, height=1152)
    request = parse(f"--upscale {JOB}:2", base=base)
    assert request.width * request.height <= CONFIG.defaults.max_upscale_pixels
    assert abs(request.width / request.height - 2048 / 1152) < 0.02
    assert request.width % 8 == 0 and request.height % 8 == 0


def test_upscale_to_a_width_keeps_the_ratio() -> None:
    request = parse(f"--upscale {JOB}:1 -w 1664", base=earlier())
    assert (request.width, request.height) == (1664, 2432)


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        (f"--upscale {JOB}:2 -c 2", "an upscale makes one image"),
        (f"--upscale {JOB}:2 --ar 16:9", "--ar cannot be used with --upscale"),
        (f"--upscale {JOB}:2 -w 8000 -h 8000", "over the limit"),
        (f"--upscale {JOB}:2 -w 1001", "multiple of 8"),
        (f"--upscale {JOB}", "made 4 images; say which"),
        (f"--vary {JOB}:5", "made 4 images; pick 1 to 4"),
        (f"--vary {JOB}:1 --image https://x/a.png", "drop the other input image"),
    ],
)
def test_follow_up_errors(message: str, fragment: str) -> None:
    assert fragment in error(message, base=earlier())


def test_model_upscale_takes_no_strength_and_no_loras() -> None:
    config = attrs.evolve(CONFIG, defaults=attrs.evolve(CONFIG.defaults, upscale_method="model"))
    request = parse_request(f"--upscale {JOB}:1", config, base=earlier())
    assert request.loras == () and request.kind == "upscale"
    with pytest.raises(PromptError, match="--strength has no effect"):
        parse_request(f"--upscale {JOB}:1 --strength 0.3", config, base=earlier())


def test_render_names_the_source() -> None:
    request = parse("a cat --image https://x.example/a.png --strength 0.25 -s 3")
    assert parse(render_request(request)) == request
    vary = parse(f"--vary {JOB}:2 -s 4", base=earlier())
    assert parse(render_request(vary), base=earlier()) == vary
    upscale = parse(f"--upscale {JOB}:2", base=earlier())
    assert parse(render_request(upscale), base=earlier()) == upscale


# --- the configuration --------------------------------------------------------------------------


def test_workflow_for_each_kind() -> None:
    assert CONFIG.workflow_for("illustriousXL", "txt2img") == "sdxl"
    assert CONFIG.workflow_for("illustriousXL", "img2img") == "sdxl-img2img"
    assert CONFIG.workflow_for("lumina2", "upscale") == "lumina-upscale"
    model = attrs.evolve(CONFIG.defaults, upscale_method="model")
    assert attrs.evolve(CONFIG, defaults=model).workflow_for("lumina2", "upscale") == (
        "upscale-model"
    )


@pytest.mark.parametrize(
    ("defaults", "fragment"),
    [
        ({"img2imgStrength": 0}, "DEFAULTS.img2imgStrength: must be more than 0"),
        ({"varyStrength": 1.5}, "DEFAULTS.varyStrength"),
        ({"upscaleMethod": "magic"}, "DEFAULTS.upscaleMethod: must be one of latent, model"),
        ({"upscaleFactor": 1}, "DEFAULTS.upscaleFactor"),
        ({"maxUpscalePixels": 100}, "DEFAULTS.maxUpscalePixels"),
    ],
)
def test_config_errors(defaults: dict[str, Any], fragment: str) -> None:
    data = {
        "DEFAULTS": {"width": 1024, "height": 1024, "count": 1, "model": "m", **defaults},
        "models": {
            "m": {
                "checkpointName": "m.safetensors",
                "workflow": "sdxl",
                "steps": 4,
                "imageWidth": 1024,
                "imageHeight": 1024,
                "defaultPositivePrompt": "",
            }
        },
    }
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        parse_model_config(data)


def test_named_variant_must_exist() -> None:
    data = {
        "DEFAULTS": {"width": 1024, "height": 1024, "count": 1, "model": "m"},
        "models": {
            "m": {
                "checkpointName": "m.safetensors",
                "workflow": "sdxl",
                "img2imgWorkflow": "mine",
                "steps": 4,
                "imageWidth": 1024,
                "imageHeight": 1024,
                "defaultPositivePrompt": "",
            }
        },
    }
    with pytest.raises(ConfigError, match=r"models\.m\.img2imgWorkflow: template 'mine'"):
        parse_model_config(data, templates=frozenset({"sdxl"}))


# --- the workflows ------------------------------------------------------------------------------


def test_shipped_image_templates(templates: dict[str, WorkflowTemplate]) -> None:
    for name in ("sdxl", "lumina"):
        img2img = templates[f"{name}-img2img"]
        assert img2img.from_image
        assert {"image", "denoise", "batch_size", "checkpoint", "seed"} <= img2img.bound
        assert img2img.bindings["batch_size"] == ("batch", "amount")
        assert "width" not in img2img.bound
        upscale = templates[f"{name}-upscale"]
        assert upscale.bindings["width"] == ("resize", "width")
    model = templates["upscale-model"]
    assert model.from_image and "checkpoint" not in model.bound
    assert model.bindings["upscale_model"] == ("upscaler", "model_name")


@pytest.mark.parametrize("name", ["sdxl", "lumina"])
@pytest.mark.parametrize("lora_count", [0, 1, 3])
def test_img2img_builds(templates: dict[str, WorkflowTemplate], name: str, lora_count: int) -> None:
    model = "illustriousXL" if name == "sdxl" else "lumina2"
    spec = CONFIG.models[model]
    loras = tuple((f"l{i}.safetensors", 0.5) for i in range(lora_count))
    request = GenerationRequest(
        "a cat", "fog", model, 832, 1216, 3, 5, loras, image=ImageInput("upload", 0.4)
    )
    template = templates[CONFIG.workflow_for(model, request.kind)]
    graph = build_workflow(
        template, spec, request, filename_prefix="fategen", image_name="fategen-ab.png"
    )
    assert_links_valid(graph)
    assert by_title(graph, "image")["inputs"]["image"] == "fategen-ab.png"
    assert by_title(graph, "batch")["inputs"]["amount"] == 3
    sampler = by_title(graph, "sampler")["inputs"]
    assert (sampler["denoise"], sampler["seed"]) == (0.4, 5)
    assert by_title(graph, "negative")["inputs"]["text"].endswith("fog")
    loaders = [n for n in graph.values() if n["class_type"] == "LoraLoader"]
    assert len(loaders) == lora_count
    encode = next(n for n in graph.values() if n["class_type"] == "VAEEncode")
    assert encode["inputs"]["vae"] == [template.nodes["checkpoint"], 2]  # VAE: not via LoRAs


@pytest.mark.parametrize("name", ["sdxl", "lumina"])
def test_latent_upscale_builds(templates: dict[str, WorkflowTemplate], name: str) -> None:
    model = "illustriousXL" if name == "sdxl" else "lumina2"
    request = parse(f"--upscale {JOB}:2", base=earlier(model=model))
    graph = build_workflow(
        templates[CONFIG.workflow_for(model, "upscale")],
        CONFIG.models[model],
        request,
        filename_prefix="fategen",
        image_name="in.png",
    )
    assert_links_valid(graph)
    resize = by_title(graph, "resize")
    assert resize["class_type"] == "LatentUpscale"
    assert (resize["inputs"]["width"], resize["inputs"]["height"]) == (1664, 2432)
    assert by_title(graph, "sampler")["inputs"]["denoise"] == CONFIG.defaults.upscale_denoise
    assert by_title(graph, "sampler")["inputs"]["seed"] == 99


def test_model_upscale_builds(templates: dict[str, WorkflowTemplate]) -> None:
    config = attrs.evolve(CONFIG, defaults=attrs.evolve(CONFIG.defaults, upscale_method="model"))
    request = parse_request(f"--upscale {JOB}:1", config, base=earlier())
    graph = build_workflow(
        templates["upscale-model"],
        config.models[request.model],
        request,
        filename_prefix="fategen",
        image_name="in.png",
        upscale_model="2x-ESRGAN.pth",
    )
    assert_links_valid(graph)
    assert by_title(graph, "upscaler")["inputs"]["model_name"] == "2x-ESRGAN.pth"
    assert by_title(graph, "resize")["inputs"]["width"] == 1664
    assert not any(n["class_type"] == "CheckpointLoaderSimple" for n in graph.values())


def test_kind_and_template_must_agree(templates: dict[str, WorkflowTemplate]) -> None:
    spec = CONFIG.models["illustriousXL"]
    text = GenerationRequest("a cat", "", "illustriousXL", 1024, 1024, 1, 1)
    with pytest.raises(WorkflowError, match="starts from an image, so it cannot run a txt2img"):
        build_workflow(templates["sdxl-img2img"], spec, text, filename_prefix="f")
    image = attrs.evolve(text, image=ImageInput("upload", 0.5))
    with pytest.raises(WorkflowError, match="draws from text, so it cannot run a img2img"):
        build_workflow(templates["sdxl"], spec, image, filename_prefix="f")


def test_image_template_without_a_batch_node_refuses_a_count(
    templates: dict[str, WorkflowTemplate],
) -> None:
    graph = {k: v for k, v in templates["sdxl-img2img"].graph.items()}
    batch = templates["sdxl-img2img"].nodes["batch"]
    sampler = templates["sdxl-img2img"].nodes["sampler"]
    graph[sampler] = {**graph[sampler], "inputs": {**graph[sampler]["inputs"]}}
    graph[sampler]["inputs"]["latent_image"] = graph[batch]["inputs"]["samples"]
    del graph[batch]
    template = parse_template("mine", graph)
    request = GenerationRequest(
        "a cat", "", "illustriousXL", 1024, 1024, 2, 1, image=ImageInput("upload", 0.5)
    )
    with pytest.raises(WorkflowError, match="no node titled 'batch', so it cannot take an image"):
        build_workflow(template, CONFIG.models["illustriousXL"], request, filename_prefix="f")


def test_image_template_needs_a_save_node() -> None:
    graph = {
        "1": {"inputs": {"image": "x.png"}, "class_type": "LoadImage", "_meta": {"title": "image"}}
    }
    with pytest.raises(WorkflowError, match="has no node titled 'save'"):
        parse_template("bare", graph)


# --- what a review found -------------------------------------------------------------------------


def test_one_side_with_an_image_keeps_its_ratio() -> None:
    request = parse("a cat --image https://x.example/a.png -w 1024", image_size=(600, 1200))
    assert (request.width, request.height) == (1024, 2048)
    with pytest.raises(PromptError, match="--height 2048 with this image"):
        parse("a cat --image https://x.example/a.png -h 2048", image_size=(1200, 600))


def test_a_follow_up_of_a_model_no_longer_offered() -> None:
    fragment = 'the earlier job\'s model "gone" is no longer offered; pick one with -m'
    assert fragment in error(f"--vary {JOB}:1", base=earlier(model="gone"))
    assert parse(f"--vary {JOB}:1 -m tiny", base=earlier(model="gone")).model == "tiny"


def test_vary_of_an_upscale_fits_the_pixel_limit() -> None:
    request = parse(f"--vary {JOB}:1", base=earlier(count=1, width=3072, height=2048))
    assert request.width * request.height <= CONFIG.defaults.max_pixels
    assert abs(request.width / request.height - 1.5) < 0.1
    assert "over the limit" in error(f"--vary {JOB}:1 -w 2048 -h 2048", base=earlier())


def test_an_upscale_must_be_larger() -> None:
    assert "must be larger than the image (832x1216)" in error(
        f"--upscale {JOB}:1 -w 512", base=earlier()
    )
    largest = earlier(count=1, width=3072, height=3072)
    assert "as large as this service upscales to" in error(f"--upscale {JOB}", base=largest)


def test_fit_always_ends_within_the_limits() -> None:
    for size in [(1, 1), (1, 10_000), (10_000, 1), (7, 3), (4096, 4096)]:
        request = parse("a cat --image https://x.example/a.png", image_size=size)
        assert request.width * request.height <= CONFIG.defaults.max_pixels


def test_min_size_squared_must_fit_max_pixels() -> None:
    data = {
        "DEFAULTS": {
            "width": 1024,
            "height": 1024,
            "count": 1,
            "model": "m",
            "minSize": 2048,
            "maxSize": 2048,
        },
        "models": {
            "m": {
                "checkpointName": "m.safetensors",
                "workflow": "sdxl",
                "steps": 4,
                "imageWidth": 2048,
                "imageHeight": 2048,
                "defaultPositivePrompt": "",
            }
        },
    }
    with pytest.raises(ConfigError, match="minSize x minSize <= maxPixels"):
        parse_model_config(data)


def test_vary_of_a_tall_upscale_keeps_within_the_sides() -> None:
    request = parse(f"--vary {JOB}:1", base=earlier(count=1, width=512, height=4096))
    d = CONFIG.defaults
    assert d.min_size <= request.width <= d.max_size
    assert d.min_size <= request.height <= d.max_size


def test_fit_never_goes_below_min_size() -> None:
    defaults = attrs.evolve(CONFIG.defaults, min_size=512, max_size=2048, max_pixels=768 * 768)
    config = attrs.evolve(CONFIG, defaults=defaults)
    for size in [(4000, 1000), (1000, 4000), (8000, 100), (1, 1)]:
        request = parse_request(
            "a cat --image https://x.example/a.png", config, image_size=size, rng=random.Random(1)
        )
        assert request.width >= 512 and request.height >= 512, (size, request)
        assert request.width * request.height <= 768 * 768, (size, request)
