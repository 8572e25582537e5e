"""The model configuration: the shipped file, and error messages that name the JSON path."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fategen.core.modelconfig import Defaults, ModelSpec, load_model_config, parse_model_config
from fategen.errors import ConfigError

CONFIG_FILE = Path(__file__).resolve().parents[2] / "config" / "modelConfiguration.json"
TEMPLATES = frozenset({"sdxl", "lumina"})

BASE: dict[str, Any] = {
    "DEFAULTS": {"width": 1024, "height": 1024, "count": 1, "model": "illustriousXL"},
    "models": {
        "illustriousXL": {
            "checkpointName": "illustriousXL_v01.safetensors",
            "workflow": "sdxl",
            "steps": 28,
            "imageWidth": 1024,
            "imageHeight": 1024,
            "defaultPositivePrompt": "masterpiece",
        },
        "paSanctuary": {
            "checkpointName": "paSanctuary_v10.safetensors",
            "workflow": "sdxl",
            "steps": 30,
            "imageWidth": 1024,
            "imageHeight": 1024,
            "defaultPositivePrompt": "masterpiece",
        },
    },
}


def problems(data: Any, templates: frozenset[str] | None = TEMPLATES) -> str:
    with pytest.raises(ConfigError) as info:
        parse_model_config(data, templates=templates)
    return str(info.value)


def changed(**paths: Any) -> dict[str, Any]:
    """BASE with ``models__paSanctuary__steps="thirty"``-style edits (None deletes the key)."""
    data = copy.deepcopy(BASE)
    for path, value in paths.items():
        *parents, last = path.split("__")
        node = data
        for key in parents:
            node = node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return data


def test_shipped_file() -> None:
    config = load_model_config(CONFIG_FILE, templates=TEMPLATES)
    assert config.defaults == Defaults(
        width=1024,
        height=1024,
        count=1,
        model="illustriousXL",
        min_size=256,
        max_size=2048,
        max_pixels=2359296,
        max_count=4,
    )
    assert set(config.models) >= {"illustriousXL", "paSanctuary", "lumina2", "tiny"}
    illustrious = config.model("illustriousXL")
    assert (illustrious.checkpoint_name, illustrious.workflow, illustrious.steps) == (
        "illustriousXL_v01.safetensors",
        "sdxl",
        28,
    )
    assert (illustrious.cfg, illustrious.sampler, illustrious.scheduler) == (
        5.5,
        "euler_ancestral",
        "normal",
    )
    assert illustrious.default_positive_prompt and illustrious.default_negative_prompt
    sanctuary = config.model("paSanctuary")
    assert (sanctuary.checkpoint_name, sanctuary.steps) == ("paSanctuary_v10.safetensors", 30)
    lumina = config.model("lumina2")
    assert (lumina.checkpoint_name, lumina.workflow, lumina.steps, lumina.cfg) == (
        "lumina_2.safetensors",
        "lumina",
        25,
        4.0,
    )
    assert (lumina.sampler, lumina.scheduler) == ("res_multistep", "simple")
    assert lumina.system_prompt.startswith("You are an assistant designed to generate superior")
    assert lumina.system_prompt.endswith("<Prompt Start> ")
    tiny = config.model("tiny")
    assert (tiny.checkpoint_name, tiny.steps, tiny.image_width, tiny.image_height) == (
        "tiny-sd15-random.safetensors",
        4,
        512,
        512,
    )
    assert "test" in tiny.description
    for spec in config.models.values():
        assert (spec.image_width, spec.image_height) == (
            (512, 512) if spec is tiny else (1024, 1024)
        )


def test_base_parses_with_defaults_filled() -> None:
    config = parse_model_config(BASE, templates=TEMPLATES)
    assert config.defaults.max_count == 4 and config.defaults.max_pixels == 1536 * 1536
    assert config.model("paSanctuary") == ModelSpec(
        checkpoint_name="paSanctuary_v10.safetensors",
        workflow="sdxl",
        steps=30,
        image_width=1024,
        image_height=1024,
        default_positive_prompt="masterpiece",
    )


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        (
            {"models__paSanctuary__steps": "thirty"},
            'models.paSanctuary.steps: expected an integer, got "thirty"',
        ),
        (
            {"models__paSanctuary__imageWidth": True},
            "models.paSanctuary.imageWidth: expected an integer, got true",
        ),
        ({"DEFAULTS__count": False}, "DEFAULTS.count: expected an integer, got false"),
        (
            {"models__paSanctuary__cfg": "high"},
            'models.paSanctuary.cfg: expected a number, got "high"',
        ),
        (
            {"models__paSanctuary__sampler": 3},
            "models.paSanctuary.sampler: expected a string, got 3",
        ),
        ({"models__paSanctuary__stepz": 30}, "models.paSanctuary: unknown key(s) 'stepz'"),
        ({"DEFAULTS__widht": 5}, "DEFAULTS: unknown key(s) 'widht'"),
        ({"extras": {}}, "extras: unknown key (expected DEFAULTS and models)"),
        (
            {"models__paSanctuary__checkpointName": None},
            "models.paSanctuary.checkpointName: required key is missing",
        ),
        ({"DEFAULTS__model": None}, "DEFAULTS.model: required key is missing"),
        ({"DEFAULTS": None}, "DEFAULTS: required key is missing"),
        ({"models": {}}, "models: expected an object with at least one model"),
        (
            {"models__paSanctuary__workflow": "flux"},
            "models.paSanctuary.workflow: template 'flux' does not exist (known: lumina, sdxl)",
        ),
        (
            {"DEFAULTS__model": "sdxlBase"},
            "DEFAULTS.model: 'sdxlBase' is not one of the configured models",
        ),
        ({"DEFAULTS__count": 9}, "DEFAULTS.count: must be 1 to 4, got 9"),
        ({"models__paSanctuary__steps": 0}, "models.paSanctuary.steps: must be at least 1, got 0"),
        (
            {"models__paSanctuary__imageHeight": 1001},
            "models.paSanctuary.imageHeight: must be a positive multiple of 8, got 1001",
        ),
        (
            {"models__paSanctuary__checkpointName": ""},
            "models.paSanctuary.checkpointName: must not be empty",
        ),
    ],
)
def test_problems_name_the_path(edits: dict[str, Any], expected: str) -> None:
    text = problems(changed(**edits))
    assert text.startswith("model configuration is invalid: ")
    assert expected in text


def test_every_problem_is_reported_at_once() -> None:
    text = problems(
        changed(models__paSanctuary__steps="thirty", models__illustriousXL__foo=1, bar=2)
    )
    assert 'models.paSanctuary.steps: expected an integer, got "thirty"' in text
    assert "models.illustriousXL: unknown key(s) 'foo'" in text
    assert "bar: unknown key" in text


def test_templates_none_skips_the_template_check() -> None:
    config = parse_model_config(changed(models__paSanctuary__workflow="flux"), templates=None)
    assert config.model("paSanctuary").workflow == "flux"


def test_top_level_must_be_an_object() -> None:
    assert "expected a JSON object at the top level" in problems([1, 2])


def test_not_json(tmp_path: Path) -> None:
    path = tmp_path / "modelConfiguration.json"
    path.write_text('{"DEFAULTS": {,}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"is not valid JSON: .* at line 1"):
        load_model_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the model configuration"):
        load_model_config(tmp_path / "nope.json")


def test_file_round_trips_through_json(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(BASE), encoding="utf-8")
    assert load_model_config(path, templates=TEMPLATES) == parse_model_config(BASE)


def seed_layout(base: dict[str, Any]) -> dict[str, Any]:
    """The layout of the service fategen replaces: models beside DEFAULTS, no "models" key."""
    return {"DEFAULTS": copy.deepcopy(base["DEFAULTS"]), **copy.deepcopy(base["models"])}


def test_the_seed_layout_reads_the_same() -> None:
    assert parse_model_config(seed_layout(BASE), templates=TEMPLATES) == parse_model_config(
        BASE, templates=TEMPLATES
    )


def test_the_seed_layout_names_paths_without_models() -> None:
    data = seed_layout(BASE)
    data["paSanctuary"]["steps"] = "thirty"
    assert 'paSanctuary.steps: expected an integer, got "thirty"' in problems(data)
    assert "models." not in problems(data)
    assert "at least one model" in problems({"DEFAULTS": BASE["DEFAULTS"]})


def test_the_two_layouts_do_not_mix() -> None:
    data = copy.deepcopy(BASE)
    data["extra"] = copy.deepcopy(BASE["models"]["paSanctuary"])
    assert "extra: unknown key (expected DEFAULTS and models)" in problems(data)
