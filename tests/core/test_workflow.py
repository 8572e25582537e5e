from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fategen.core.modelconfig import ModelSpec
from fategen.core.prompt import GenerationRequest, negative_text, positive_text
from fategen.core.workflow import (
    BINDINGS,
    MAX_SEED,
    WorkflowTemplate,
    build_workflow,
    load_template,
    load_templates,
    parse_template,
)
from fategen.errors import WorkflowError

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
LUMINA_SYSTEM = (
    "You are an assistant designed to generate superior images with the superior degree of "
    "image-text alignment based on textual prompts or user prompts. <Prompt Start> "
)


def spec(**changes: Any) -> ModelSpec:
    fields: dict[str, Any] = {
        "checkpoint_name": "illustrious.safetensors",
        "workflow": "sdxl",
        "steps": 28,
        "image_width": 1024,
        "image_height": 1024,
        "default_positive_prompt": "masterpiece",
        "default_negative_prompt": "lowres",
    }
    fields.update(changes)
    return ModelSpec(**fields)


def request(**changes: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "prompt": "a cat",
        "negative": "",
        "model": "illustriousXL",
        "width": 832,
        "height": 1216,
        "count": 1,
        "seed": 1234,
    }
    fields.update(changes)
    return GenerationRequest(**fields)


def sdxl_data() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((WORKFLOWS / "sdxl.json").read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def templates() -> dict[str, WorkflowTemplate]:
    return load_templates(WORKFLOWS)


def by_title(graph: dict[str, Any], title: str) -> dict[str, Any]:
    (node,) = [n for n in graph.values() if n.get("_meta", {}).get("title") == title]
    inputs: dict[str, Any] = node["inputs"]
    return inputs


def structure(graph: dict[str, Any]) -> dict[str, Any]:
    """Node ids, class types and every link, ignoring literal values."""
    return {
        node_id: (
            node["class_type"],
            {k: v for k, v in node["inputs"].items() if isinstance(v, list)},
        )
        for node_id, node in graph.items()
    }


# --- the shipped templates ---------------------------------------------------------------------


def test_shipped_templates_load_and_bind_everything(
    templates: dict[str, WorkflowTemplate],
) -> None:
    assert {"sdxl", "lumina"} <= set(templates)
    for name in ("sdxl", "lumina"):
        assert templates[name].name == name
        assert templates[name].bound == frozenset(BINDINGS) - {"image", "upscale_model"}
        assert not templates[name].from_image


def test_sdxl_builds(templates: dict[str, WorkflowTemplate]) -> None:
    template = templates["sdxl"]
    before = copy.deepcopy(template.graph)
    graph = build_workflow(
        template, spec(), request(negative="bad hands", count=3), filename_prefix="fategen/job1"
    )
    assert json.loads(json.dumps(graph)) == graph
    assert by_title(graph, "checkpoint")["ckpt_name"] == "illustrious.safetensors"
    assert by_title(graph, "positive")["text"] == positive_text(
        request(negative="bad hands"), spec()
    )
    assert by_title(graph, "negative")["text"] == negative_text(
        request(negative="bad hands"), spec()
    )
    latent = by_title(graph, "latent")
    assert (latent["width"], latent["height"], latent["batch_size"]) == (832, 1216, 3)
    sampler = by_title(graph, "sampler")
    assert (sampler["seed"], sampler["steps"], sampler["denoise"]) == (1234, 28, 1.0)
    # The model sets no cfg / sampler / scheduler: the template's stay.
    assert (sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (
        6.0,
        "euler_ancestral",
        "normal",
    )
    assert by_title(graph, "save")["filename_prefix"] == "fategen/job1"
    assert template.graph == before, "building must not touch the template"
    assert structure(graph) == structure(template.graph)


def test_lumina_builds_with_system_prompt(templates: dict[str, WorkflowTemplate]) -> None:
    template = templates["lumina"]
    model = spec(
        checkpoint_name="lumina_2.safetensors",
        workflow="lumina",
        steps=25,
        default_negative_prompt="blurry ugly bad",
        system_prompt=LUMINA_SYSTEM,
    )
    graph = build_workflow(template, model, request(seed=MAX_SEED), filename_prefix="p")
    text = by_title(graph, "positive")["text"]
    assert text == LUMINA_SYSTEM + positive_text(request(), model)
    assert text.startswith(LUMINA_SYSTEM) and text.endswith("a cat")
    sampler = by_title(graph, "sampler")
    assert (sampler["sampler_name"], sampler["scheduler"], sampler["cfg"]) == (
        "res_multistep",
        "simple",
        4.0,
    )
    assert sampler["seed"] == MAX_SEED
    (aura,) = [n for n in graph.values() if n["class_type"] == "ModelSamplingAuraFlow"]
    assert aura["inputs"]["shift"] == 6.0
    checkpoint_id = template.nodes["checkpoint"]
    assert aura["inputs"]["model"] == [checkpoint_id, 0]
    aura_id = next(k for k, n in graph.items() if n is aura)
    assert sampler["model"] == [aura_id, 0]
    assert graph[template.nodes["latent"]]["class_type"] == "EmptySD3LatentImage"


def test_spec_overrides_sampler_settings(templates: dict[str, WorkflowTemplate]) -> None:
    model = spec(cfg=5, sampler="dpmpp_2m", scheduler="karras")
    graph = build_workflow(templates["sdxl"], model, request(), filename_prefix="p")
    sampler = by_title(graph, "sampler")
    assert (sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (
        5.0,
        "dpmpp_2m",
        "karras",
    )


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_count_becomes_batch_size(templates: dict[str, WorkflowTemplate], count: int) -> None:
    graph = build_workflow(templates["sdxl"], spec(), request(count=count), filename_prefix="p")
    assert by_title(graph, "latent")["batch_size"] == count


def test_seed_out_of_range(templates: dict[str, WorkflowTemplate]) -> None:
    with pytest.raises(WorkflowError, match="seed"):
        build_workflow(templates["sdxl"], spec(), request(seed=MAX_SEED + 1), filename_prefix="p")


# --- user text is data -------------------------------------------------------------------------

NASTY = [
    '"}, "99": {"class_type": "SaveImage", "inputs": {}}, "x": {"',
    'a \\"quoted\\" cat\nwith\r\nnewlines\t{braces} ["4", 0] {{template}} ${x} %s',
    '{"3": {"inputs": {"seed": 1}}}',
    "\x00\u2028\u2029\ud7ff\U0001f431",
]


@pytest.mark.parametrize("text", NASTY)
def test_nasty_prompt_is_verbatim(templates: dict[str, WorkflowTemplate], text: str) -> None:
    template = templates["sdxl"]
    graph = build_workflow(
        template, spec(), request(prompt=text, negative=text), filename_prefix="p"
    )
    assert structure(graph) == structure(template.graph)
    assert by_title(graph, "positive")["text"].endswith(text)
    assert by_title(graph, "negative")["text"].endswith(text)
    assert json.loads(json.dumps(graph)) == graph


def _clean_edges(text: str) -> bool:
    """No whitespace or comma at either end (prompt.py trims those when joining tags)."""
    return not (text[0].isspace() or text[-1].isspace() or "," in (text[0], text[-1]))


@given(text=st.text())
def test_any_prompt_keeps_the_structure(text: str) -> None:
    template = load_template(WORKFLOWS / "sdxl.json")
    model = spec(system_prompt="SYSTEM ")
    req = request(prompt=text, negative=text)
    graph = build_workflow(template, model, req, filename_prefix="p")
    assert structure(graph) == structure(template.graph)
    assert by_title(graph, "positive")["text"] == "SYSTEM " + positive_text(req, model)
    assert by_title(graph, "negative")["text"] == negative_text(req, model)
    assert json.loads(json.dumps(graph)) == graph


@given(text=st.text(min_size=1).filter(_clean_edges))
def test_any_prompt_is_passed_verbatim(text: str) -> None:
    template = load_template(WORKFLOWS / "sdxl.json")
    graph = build_workflow(
        template, spec(), request(prompt=text, negative=text), filename_prefix="p"
    )
    assert structure(graph) == structure(template.graph)
    assert by_title(graph, "positive")["text"].endswith(text)
    assert by_title(graph, "negative")["text"].endswith(text)


# --- requests the template cannot take ---------------------------------------------------------


def without_negative() -> dict[str, Any]:
    data = sdxl_data()
    del data["7"]
    data["3"]["inputs"]["negative"] = ["6", 0]
    return data


def test_template_without_negative_node() -> None:
    template = parse_template("x", without_negative())
    assert "negative" not in template.bound
    model = spec(default_negative_prompt="")
    graph = build_workflow(template, model, request(negative=""), filename_prefix="p")
    assert "7" not in graph
    with pytest.raises(WorkflowError) as err:
        build_workflow(template, model, request(negative="ugly"), filename_prefix="p")
    assert str(err.value) == (
        "the workflow 'x' has no node titled 'negative', so it cannot take a negative prompt"
    )
    with pytest.raises(WorkflowError, match="cannot take a negative prompt"):
        build_workflow(
            template, spec(default_negative_prompt="lowres"), request(), filename_prefix="p"
        )


def test_operator_titles_any_node() -> None:
    """Bindings follow titles, not node ids or class types."""
    data = sdxl_data()
    data["100"] = data.pop("4")
    for node in data.values():
        for name, value in node["inputs"].items():
            if value == ["4", 0] or value == ["4", 1] or value == ["4", 2]:
                node["inputs"][name] = ["100", value[1]]
    template = parse_template("renamed", data)
    graph = build_workflow(template, spec(), request(), filename_prefix="p")
    assert graph["100"]["inputs"]["ckpt_name"] == "illustrious.safetensors"


# --- load-time errors --------------------------------------------------------------------------


def test_duplicate_title() -> None:
    data = sdxl_data()
    data["7"]["_meta"]["title"] = "positive"
    with pytest.raises(WorkflowError, match=r"'dup'.*more than one node is titled 'positive'"):
        parse_template("dup", data)


def test_duplicate_unbound_titles_are_fine() -> None:
    data = sdxl_data()
    data["10"] = copy.deepcopy(data["8"])
    parse_template("ok", data)  # two nodes titled "VAE Decode"


def test_binding_to_missing_input() -> None:
    data = sdxl_data()
    del data["3"]["inputs"]["scheduler"]
    with pytest.raises(WorkflowError) as err:
        parse_template("broken", data)
    assert "'broken'" in str(err.value)
    assert "the node titled 'sampler' has no input 'scheduler'" in str(err.value)


def test_binding_to_linked_input() -> None:
    data = sdxl_data()
    data["6"]["inputs"]["text"] = ["7", 0]
    with pytest.raises(WorkflowError, match="'text' of the node titled 'positive' is linked"):
        parse_template("linked", data)


@pytest.mark.parametrize(
    ("node_id", "title"),
    [("4", "checkpoint"), ("6", "positive"), ("5", "latent"), ("3", "sampler"), ("9", "save")],
)
def test_missing_required_binding(node_id: str, title: str) -> None:
    data = sdxl_data()
    data[node_id]["_meta"]["title"] = "something else"
    with pytest.raises(WorkflowError, match=f"'req' has no node titled '{title}'"):
        parse_template("req", data)


def test_dangling_link() -> None:
    data = sdxl_data()
    data["8"]["inputs"]["vae"] = ["42", 2]
    with pytest.raises(WorkflowError, match=r"'dangle'.*'vae' of node '8' links to node '42'"):
        parse_template("dangle", data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "JSON object of nodes"),
        ({}, "JSON object of nodes"),
        ({"1": {"inputs": {}}}, "class_type"),
        ({"nodes": [], "links": []}, "Save \\(API\\)"),
        ({"1": {"inputs": {}, "class_type": "X", "_meta": {"title": ["odd"]}}}, "no node titled"),
    ],
)
def test_bad_shapes(data: Any, match: str) -> None:
    with pytest.raises(WorkflowError, match=match):
        parse_template("shape", data)


def test_parse_copies_its_input() -> None:
    data = sdxl_data()
    template = parse_template("copy", data)
    data["6"]["inputs"]["text"] = "changed"
    assert template.graph["6"]["inputs"]["text"] != "changed"


def test_load_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{nope", encoding="utf-8")
    with pytest.raises(WorkflowError, match=r"bad\.json is not valid JSON"):
        load_templates(tmp_path)
    with pytest.raises(WorkflowError, match="cannot read the workflow template"):
        load_template(tmp_path / "missing.json")
    with pytest.raises(WorkflowError, match="cannot read the workflow directory"):
        load_templates(tmp_path / "nowhere")


def test_load_templates_names_by_stem(tmp_path: Path) -> None:
    (tmp_path / "mine.json").write_text(json.dumps(sdxl_data()), encoding="utf-8")
    (tmp_path / ".hidden.json").write_text("{nope", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("hi", encoding="utf-8")
    assert list(load_templates(tmp_path)) == ["mine"]
