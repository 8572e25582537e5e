"""LoRAs: the grammar, the limits, the allow-list, `lora_refusal` and the graph surgery."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import cattrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fategen.core.loras import cut_tags, file_name, is_allowed, lora_refusal
from fategen.core.modelconfig import ModelConfig, load_model_config, parse_model_config
from fategen.core.prompt import GenerationRequest, parse_request, render_request
from fategen.core.workflow import add_loras, build_workflow, load_templates
from fategen.errors import ConfigError, PromptError, WorkflowError

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"

#: Output types of the node classes the shipped templates use, and the LoRA loaders.
OUTPUTS: dict[str, list[str]] = {
    "CheckpointLoaderSimple": ["MODEL", "CLIP", "VAE"],
    "KSampler": ["LATENT"],
    "CLIPTextEncode": ["CONDITIONING"],
    "EmptyLatentImage": ["LATENT"],
    "EmptySD3LatentImage": ["LATENT"],
    "VAEDecode": ["IMAGE"],
    "SaveImage": [],
    "ModelSamplingAuraFlow": ["MODEL"],
    "LoraLoader": ["MODEL", "CLIP"],
    "LoraLoaderModelOnly": ["MODEL"],
}


def _model(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "checkpointName": "x.safetensors",
        "workflow": "sdxl",
        "steps": 20,
        "imageWidth": 1024,
        "imageHeight": 1024,
        "defaultPositivePrompt": "",
    }
    spec.update(overrides)
    return spec


def config(defaults: dict[str, Any] | None = None, **extra: Any) -> ModelConfig:
    data: dict[str, Any] = {
        "DEFAULTS": {
            "width": 1024,
            "height": 1024,
            "count": 1,
            "model": "open",
            **(defaults or {}),
        },
        "models": {
            "open": _model(),
            "picky": _model(loras=["detail-tweaker", "anime-style.safetensors", "sdxl/*"]),
            "none": _model(loras=[]),
            "family": _model(loraFamilies=["styles"]),
        },
        "loraFamilies": {"styles": ["anime-*", "watercolor.safetensors"]},
    }
    data.update(extra)
    return parse_model_config(data)


CONFIG = config()


def parse(message: str, cfg: ModelConfig = CONFIG) -> GenerationRequest:
    return parse_request(message, cfg, rng=random.Random(0))


# --- the grammar ----------------------------------------------------------------------------


def test_tags_are_cut_out_and_default_to_weight_one() -> None:
    request = parse("a fox <lora:detail-tweaker:0.8> in snow<LoRA:anime-style>, night")
    assert request.prompt == "a fox in snow , night"
    assert request.loras == (
        ("detail-tweaker.safetensors", 0.8),
        ("anime-style.safetensors", 1.0),
    )


def test_lora_modifier_is_repeatable_and_comes_after_tags() -> None:
    request = parse(
        "a fox --lora a:-0.5 <lora:b:.25> -c 2 --lora=c.ckpt --no blur <lora:d>",
        config({"maxLoras": 4}),
    )
    assert request.loras == (
        ("b.safetensors", 0.25),
        ("d.safetensors", 1.0),
        ("a.safetensors", -0.5),
        ("c.ckpt", 1.0),
    )
    assert (request.prompt, request.negative, request.count) == ("a fox", "blur", 2)


def test_names_keep_subfolders_and_spaces_inside_tags() -> None:
    request = parse("a fox <lora: sdxl/my   style :1>")
    assert request.loras == (("sdxl/my style.safetensors", 1.0),)


def test_no_loras_by_default() -> None:
    assert parse("a fox").loras == ()


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("a fox <lora:>", "a LoRA tag needs a name: <lora:NAME:WEIGHT>"),
        ("a fox <lora::0.5>", "a LoRA tag needs a name: <lora:NAME:WEIGHT>"),
        ("a fox --lora :0.5", "a LoRA tag needs a name: --lora NAME:WEIGHT"),
        ("a fox <lora:x:5>", "LoRA weight 5 is out of range (-2 to 2)"),
        ("a fox --lora x:-2.5", "LoRA weight -2.5 is out of range (-2 to 2)"),
        ("a fox <lora:x:1e9>", "LoRA weight 1e9 is out of range (-2 to 2)"),
        ("a fox <lora:x:strong>", "LoRA weight 'strong' for 'x' is not a number"),
        ("a fox <lora:x:nan>", "LoRA weight 'nan' for 'x' is not a number"),
        ("a fox <lora:x:0.5", "a LoRA tag is unfinished; write <lora:NAME:WEIGHT>"),
        ("a fox <lora>", "a LoRA tag is unfinished"),
        ("a <lora:a> <lora:b> <lora:c> --lora d", "too many LoRAs: at most 3"),
        ("a <lora:a> --lora a.safetensors:0.5", "the LoRA 'a' was given twice; give it once"),
        ("a fox --lora", "--lora needs a value, e.g. --lora detail-tweaker:0.8"),
        ("a fox --lora a b", "unexpected text 'b' after --lora a"),
        ("<lora:a> --lora b", "the prompt is empty"),
    ],
)
def test_errors(message: str, error: str) -> None:
    with pytest.raises(PromptError) as caught:
        parse(message)
    assert str(caught.value).startswith(error), str(caught.value)
    assert "\n" not in str(caught.value)


def test_limits_come_from_the_defaults() -> None:
    cfg = config({"maxLoras": 1, "minLoraWeight": 0, "maxLoraWeight": 1.5})
    assert parse("a <lora:a:1.5>", cfg).loras == (("a.safetensors", 1.5),)
    with pytest.raises(PromptError, match=r"^too many LoRAs: at most 1$"):
        parse("a <lora:a> <lora:b>", cfg)
    with pytest.raises(PromptError, match=r"out of range \(0 to 1\.5\)"):
        parse("a <lora:a:-0.1>", cfg)
    off = config({"maxLoras": 0})
    with pytest.raises(PromptError, match="LoRAs are turned off here"):
        parse("a <lora:a>", off)
    assert parse("a fox", off).loras == ()


def test_render_round_trip() -> None:
    request = parse("a fox <lora:sdxl/my style:0.125> --lora b:-1 --lora c.pt:1e-05 -m open")
    assert render_request(request).startswith("a fox <lora:sdxl/my style.safetensors:0.125> ")
    assert parse(render_request(request)) == request


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b-c", "sdxl/d e", "f.ckpt"]),
            st.floats(-2, 2, allow_nan=False),
        ),
        max_size=3,
        unique_by=lambda pair: pair[0],
    )
)
def test_render_parse_round_trip_with_loras(pairs: list[tuple[str, float]]) -> None:
    loras = tuple((file_name(name), weight) for name, weight in pairs)
    request = GenerationRequest("a fox", "", "open", 1024, 1024, 1, 7, loras)
    assert parse(render_request(request)) == request


def test_cut_tags_leaves_a_space() -> None:
    assert cut_tags("fox<lora:a>tail") == ("fox tail", ["a"])


def test_the_request_converts_to_json_and_back_also_without_loras() -> None:
    converter = cattrs.Converter()
    request = parse("a fox <lora:a:0.5> --lora b")
    assert (
        converter.structure(
            json.loads(json.dumps(converter.unstructure(request))), GenerationRequest
        )
        == request
    )
    old = {k: v for k, v in converter.unstructure(parse("a fox")).items() if k != "loras"}
    assert converter.structure(old, GenerationRequest).loras == ()


# --- the configuration ----------------------------------------------------------------------


def test_configuration_keys() -> None:
    assert CONFIG.defaults.max_loras == 3
    assert (CONFIG.defaults.min_lora_weight, CONFIG.defaults.max_lora_weight) == (-2.0, 2.0)
    assert CONFIG.allowed_loras("open") is None
    assert CONFIG.allowed_loras("none") == ()
    assert CONFIG.allowed_loras("family") == ("anime-*", "watercolor.safetensors")
    assert CONFIG.models["picky"].loras == ("detail-tweaker", "anime-style.safetensors", "sdxl/*")


def _problems(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        config(**kwargs)
    return str(caught.value)


def test_configuration_errors_name_the_json_path() -> None:
    assert "DEFAULTS.maxLoras: must be 0 or more, got -1" in _problems(defaults={"maxLoras": -1})
    assert "DEFAULTS.minLoraWeight/maxLoraWeight: need -100 <= minLoraWeight" in _problems(
        defaults={"minLoraWeight": 1, "maxLoraWeight": 0}
    )
    assert "DEFAULTS.maxLoraWeight" in _problems(defaults={"maxLoraWeight": "high"})
    bad_list = _problems(models={"m": _model(loras="detail")})
    assert "models.m.loras: expected a list of strings" in bad_list
    assert "models.m.loras" in _problems(models={"m": _model(loras=[3])})
    assert "models.m.loras: names must not be empty" in _problems(models={"m": _model(loras=[""])})
    unknown = _problems(models={"m": _model(loraFamilies=["nope"])})
    assert "models.m.loraFamilies: family 'nope' is not defined" in unknown
    assert "models.m: unknown key(s) 'lora'" in _problems(models={"m": _model(lora=["x"])})
    assert "loraFamilies" in _problems(loraFamilies={"styles": "anime-*"})


def test_seed_layout_takes_lora_families_too() -> None:
    cfg = parse_model_config(
        {
            "DEFAULTS": {"width": 1024, "height": 1024, "count": 1, "model": "m"},
            "m": _model(loraFamilies=["f"]),
            "loraFamilies": {"f": ["a"]},
        }
    )
    assert list(cfg.models) == ["m"]
    assert cfg.allowed_loras("m") == ("a",)


def test_shipped_configuration_still_runs_without_loras_and_has_an_example() -> None:
    cfg = load_model_config(ROOT / "config" / "modelConfiguration.json")
    for model_id in cfg.models:
        request = parse_request(f"a fox -m {model_id}", cfg)
        assert request.loras == ()
        assert lora_refusal(request, frozenset(), cfg) is None
    assert any(cfg.allowed_loras(m) is not None for m in cfg.models)


# --- the allow-list and lora_refusal ---------------------------------------------------------


def test_allow_list_entries() -> None:
    allowed = ("detail-tweaker", "anime-style.safetensors", "sdxl/*")
    assert is_allowed("detail-tweaker.safetensors", allowed)
    assert is_allowed("sdxl/anything.ckpt", allowed)
    assert not is_allowed("detail-tweaker.ckpt", allowed)
    assert not is_allowed("Detail-Tweaker.safetensors", allowed)


def test_parse_refuses_what_the_allow_list_refuses() -> None:
    assert parse("a <lora:sdxl/grain> <lora:detail-tweaker> -m picky").model == "picky"
    with pytest.raises(PromptError) as caught:
        parse("a <lora:detail-tweeker> -m picky")
    assert str(caught.value) == (
        "the LoRA 'detail-tweeker' is not allowed with model picky; did you mean detail-tweaker?"
    )
    with pytest.raises(PromptError, match=r"^model none takes no LoRAs; remove 'x'$"):
        parse("a <lora:x> -m none")
    with pytest.raises(PromptError, match="did you mean watercolor"):
        parse("a <lora:watercolour> -m family")


AVAILABLE = frozenset(
    {
        "detail-tweaker.safetensors",
        "anime-style.safetensors",
        "anime-style-v2.safetensors",
        "sdxl/film-grain.safetensors",
        "watercolor.safetensors",
    }
)


def _request(model: str, *names: str) -> GenerationRequest:
    return GenerationRequest(
        "a fox", "", model, 1024, 1024, 1, 7, tuple((file_name(n), 1.0) for n in names)
    )


def test_lora_refusal() -> None:
    assert lora_refusal(_request("open"), AVAILABLE, CONFIG) is None
    assert (
        lora_refusal(_request("open", "detail-tweaker", "anime-style"), AVAILABLE, CONFIG) is None
    )
    assert lora_refusal(_request("open", "whatever"), None, CONFIG) is None  # unknown: no check
    assert (
        lora_refusal(_request("open", "anime-styel"), AVAILABLE, CONFIG)
        == "ComfyUI has no LoRA 'anime-styel'; did you mean anime-style or anime-style-v2?"
    )
    assert (
        lora_refusal(_request("open", "zzz"), AVAILABLE, CONFIG)
        == "ComfyUI has no LoRA 'zzz'; LoRAs for open: anime-style, anime-style-v2, "
        "detail-tweaker, sdxl/film-grain, watercolor"
    )
    assert lora_refusal(_request("open", "zzz"), frozenset(), CONFIG) == "ComfyUI has no LoRA 'zzz'"
    # Allowed by the model, but this ComfyUI lacks it: suggest only what the model allows.
    assert (
        lora_refusal(_request("family", "anime-style-v3"), AVAILABLE, CONFIG)
        == "ComfyUI has no LoRA 'anime-style-v3'; did you mean anime-style-v2 or anime-style?"
    )
    # Not allowed: the closest allowed names ComfyUI has (patterns are expanded).
    assert (
        lora_refusal(_request("picky", "film-grain"), AVAILABLE, CONFIG)
        == "the LoRA 'film-grain' is not allowed with model picky; did you mean sdxl/film-grain?"
    )
    assert lora_refusal(_request("picky", "sdxl/film-grain"), AVAILABLE, CONFIG) is None
    assert (
        lora_refusal(_request("none", "anime-style"), AVAILABLE, CONFIG)
        == "model none takes no LoRAs; remove 'anime-style'"
    )


# --- the graph --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def templates() -> dict[str, Any]:
    return load_templates(WORKFLOWS)


def _check_links(graph: dict[str, Any]) -> None:
    for node_id, node in graph.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                source, slot = value
                assert source in graph, (node_id, name)
                assert 0 <= slot < len(OUTPUTS[graph[source]["class_type"]]), (node_id, name)


def _undo_loras(graph: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """The graph with its LoRA loaders removed and their consumers linked to `checkpoint`."""
    loaders = {n for n, node in graph.items() if node["class_type"].startswith("LoraLoader")}
    undone: dict[str, Any] = {}
    for node_id, node in graph.items():
        if node_id in loaders:
            continue
        inputs = {
            name: [checkpoint, value[1]]
            if isinstance(value, list) and value[0] in loaders
            else value
            for name, value in node["inputs"].items()
        }
        undone[node_id] = {**node, "inputs": inputs}
    return undone


@pytest.mark.parametrize("template_name", ["sdxl", "lumina"])
@pytest.mark.parametrize("count", [0, 1, 2, 3, 5])
def test_lora_chain_on_the_shipped_templates(
    templates: dict[str, Any], template_name: str, count: int
) -> None:
    template = templates[template_name]
    spec = CONFIG.models["open"]
    loras = tuple((f"l{i}.safetensors", 0.1 * i) for i in range(count))
    plain = build_workflow(template, spec, _request("open"), filename_prefix="p")
    request = GenerationRequest("a fox", "", "open", 1024, 1024, 1, 7, loras)
    graph = build_workflow(template, spec, request, filename_prefix="p")
    _check_links(graph)
    checkpoint = template.nodes["checkpoint"]
    assert _undo_loras(graph, checkpoint) == plain  # nothing else changed
    loaders = [n for n, node in graph.items() if node["class_type"] == "LoraLoader"]
    assert len(loaders) == count == len(graph) - len(plain)
    assert not set(loaders) & set(template.graph)
    previous = checkpoint
    for node_id, (name, weight) in zip(loaders, loras, strict=True):
        assert graph[node_id]["inputs"] == {
            "model": [previous, 0],
            "clip": [previous, 1],
            "lora_name": name,
            "strength_model": weight,
            "strength_clip": weight,
        }
        previous = node_id
    # Every former consumer of the checkpoint's MODEL or CLIP now takes the last loader's.
    for node_id, node in plain.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] == checkpoint and value[1] in (0, 1):
                assert graph[node_id]["inputs"][name] == [previous, value[1]]
            else:
                assert graph[node_id]["inputs"][name] == value
    # The VAE still comes straight from the checkpoint.
    assert any(
        value == [checkpoint, 2] for node in graph.values() for value in node["inputs"].values()
    )


def test_lumina_model_goes_through_the_loras_before_model_sampling(
    templates: dict[str, Any],
) -> None:
    request = GenerationRequest("a", "", "open", 1024, 1024, 1, 7, (("a.safetensors", 1.0),))
    graph = build_workflow(templates["lumina"], CONFIG.models["open"], request, filename_prefix="p")
    new = next(n for n, node in graph.items() if node["class_type"] == "LoraLoader")
    sampling = next(n for n in graph if graph[n]["class_type"] == "ModelSamplingAuraFlow")
    assert graph[sampling]["inputs"]["model"] == [new, 0]
    assert graph[new]["_meta"] == {"title": "LoRA 1"}


def test_model_only_when_nothing_uses_the_checkpoint_clip() -> None:
    graph = {
        "1": {"inputs": {"unet_name": "u"}, "class_type": "UNETLoader"},
        "x": {"inputs": {"model": ["1", 0]}, "class_type": "ModelSamplingAuraFlow"},
        "7": {"inputs": {"model": ["1", 0]}, "class_type": "KSampler"},
    }
    out = add_loras(graph, "1", (("a.safetensors", 0.5), ("b.safetensors", -1.0)))
    assert out["8"] == {
        "inputs": {"model": ["1", 0], "lora_name": "a.safetensors", "strength_model": 0.5},
        "class_type": "LoraLoaderModelOnly",
        "_meta": {"title": "LoRA 1"},
    }
    assert out["9"]["inputs"]["model"] == ["8", 0]
    assert out["x"]["inputs"]["model"] == out["7"]["inputs"]["model"] == ["9", 0]
    assert graph["7"]["inputs"]["model"] == ["1", 0]  # the input is not changed
    assert add_loras(graph, "1", ()) == graph


def test_new_ids_skip_taken_ones() -> None:
    graph = {
        "2": {"inputs": {"ckpt_name": "c"}, "class_type": "CheckpointLoaderSimple"},
        "3": {"inputs": {"model": ["2", 0], "clip": ["2", 1]}, "class_type": "KSampler"},
        "loader": {"inputs": {}, "class_type": "X"},
    }
    out = add_loras(graph, "2", (("a.safetensors", 1.0), ("b.safetensors", 1.0)))
    assert set(out) - set(graph) == {"4", "5"}


def test_no_model_consumer_is_an_error() -> None:
    graph = {"1": {"inputs": {"ckpt_name": "c"}, "class_type": "CheckpointLoaderSimple"}}
    with pytest.raises(WorkflowError, match="cannot take LoRAs"):
        add_loras(graph, "1", (("a.safetensors", 1.0),), where="odd")
