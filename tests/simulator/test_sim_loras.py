"""The simulator's LoraLoader: object_info, validation like ComfyUI's, execution; and
`fategen.comfy.inventory` reading the LoRA list from it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import trio
from simulator_fixtures import TINY_CKPT, running_simulator

from fategen.comfy.inventory import inspect, lora_names
from fategen.comfy.wire import ComfyRest
from fategen.core.modelconfig import load_model_config
from fategen.core.prompt import parse_request
from fategen.core.workflow import build_workflow, load_templates
from fategen.simulator import SimulatorKnobs
from fategen.simulator.knobs import DEFAULT_LORAS

ROOT = Path(__file__).resolve().parents[2]
CONFIG = load_model_config(ROOT / "config" / "modelConfiguration.json")
TEMPLATES = load_templates(ROOT / "workflows")


def knobs(**changes: Any) -> SimulatorKnobs:
    return SimulatorKnobs(step_seconds=0.001, model_load_seconds=0.0, **changes)


def built(message: str) -> dict[str, Any]:
    """The API-format prompt fategen's builder makes for one chat line."""
    request = parse_request(message, CONFIG)
    spec = CONFIG.models[request.model]
    return build_workflow(TEMPLATES[spec.workflow], spec, request, filename_prefix="lora")


def loaders(prompt: dict[str, Any]) -> list[str]:
    return [n for n, node in prompt.items() if node["class_type"] == "LoraLoader"]


async def test_object_info_lists_lora_loaders_with_the_knob() -> None:
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs(loras=["a.safetensors"])) as running:
            info = (await running.http.get("/object_info")).json()
            lora = info["LoraLoader"]
            assert lora["output"] == ["MODEL", "CLIP"]
            assert lora["input_order"]["required"] == [
                "model",
                "clip",
                "lora_name",
                "strength_model",
                "strength_clip",
            ]
            required = lora["input"]["required"]
            assert required["lora_name"][0] == ["a.safetensors"]
            assert (required["strength_model"][1]["min"], required["strength_model"][1]["max"]) == (
                -100.0,
                100.0,
            )
            model_only = info["LoraLoaderModelOnly"]
            assert model_only["output"] == ["MODEL"]
            assert model_only["input"]["required"]["lora_name"][0] == ["a.safetensors"]
            one = (await running.http.get("/object_info/LoraLoader")).json()
            assert one == {"LoraLoader": lora}
            assert (await running.http.get("/models/loras")).json() == ["a.safetensors"]
            running.sim.knobs.loras = ["b.safetensors", "c.safetensors"]
            assert lora_names((await running.http.get("/object_info")).json()) == {
                "b.safetensors",
                "c.safetensors",
            }


async def test_a_built_workflow_with_two_loras_runs() -> None:
    prompt = built("a fox <lora:detail-tweaker:0.8> --lora anime-style:-0.5 -m illustriousXL")
    assert len(loaders(prompt)) == 2
    with trio.fail_after(20):
        async with running_simulator(knobs=knobs()) as running:
            prompt_id = await running.run_prompt({"prompt": prompt})
            history = (await running.http.get(f"/history/{prompt_id}")).json()[prompt_id]
            assert history["status"]["status_str"] == "success"
            assert history["outputs"]  # the SaveImage node wrote images
            record = running.sim.engine.executions[-1]
            assert record.status == "success"
            assert record.loras == ("detail-tweaker.safetensors", "anime-style.safetensors")


async def test_a_lumina_workflow_with_a_lora_runs() -> None:
    prompt = built("a fox <lora:sdxl/film-grain:1.5> -m lumina2")
    with trio.fail_after(20):
        async with running_simulator(knobs=knobs()) as running:
            prompt_id = await running.run_prompt({"prompt": prompt})
            history = (await running.http.get(f"/history/{prompt_id}")).json()[prompt_id]
            assert history["status"]["status_str"] == "success"


async def test_an_unknown_lora_is_refused_with_comfyuis_node_error() -> None:
    prompt = built("a fox <lora:detail-tweaker:0.8> --lora anime-style -m illustriousXL")
    first, second = loaders(prompt)
    prompt[second]["inputs"]["lora_name"] = "missing.safetensors"
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs()) as running:
            response = await running.http.post("/prompt", json={"prompt": prompt})
            assert response.status_code == 400
            body = response.json()
            assert body["error"]["type"] == "prompt_outputs_failed_validation"
            save = next(n for n, node in prompt.items() if node["class_type"] == "SaveImage")
            assert body["node_errors"] == {
                second: {
                    "errors": [
                        {
                            "type": "value_not_in_list",
                            "message": "Value not in list",
                            "details": "lora_name: 'missing.safetensors' not in "
                            + str(list(DEFAULT_LORAS)),
                            "extra_info": {
                                "input_name": "lora_name",
                                "input_config": [
                                    list(DEFAULT_LORAS),
                                    {"tooltip": "The name of the LoRA."},
                                ],
                                "received_value": "missing.safetensors",
                            },
                        }
                    ],
                    "dependent_outputs": [save],
                    "class_type": "LoraLoader",
                }
            }
            assert first not in body["node_errors"]
            assert running.sim.engine.executions == []


async def test_lora_inputs_are_checked_like_comfyui() -> None:
    prompt = built("a fox <lora:detail-tweaker> -m tiny")
    (loader,) = loaders(prompt)
    prompt[loader]["inputs"]["strength_model"] = "strong"
    prompt[loader]["inputs"]["strength_clip"] = 101
    del prompt[loader]["inputs"]["clip"]
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs()) as running:
            response = await running.http.post("/prompt", json={"prompt": prompt})
            assert response.status_code == 400
            errors = response.json()["node_errors"][loader]["errors"]
            assert [(e["type"], e["details"].split(",")[0]) for e in errors] == [
                ("required_input_missing", "clip"),
                ("invalid_input_type", "strength_model"),
                ("value_bigger_than_max", "strength_clip"),
            ]
            # A CLIP input fed with a MODEL: ComfyUI's return type mismatch.
            wrong = copy.deepcopy(built("a fox <lora:detail-tweaker> -m tiny"))
            checkpoint = wrong[loader]["inputs"]["model"][0]
            wrong[loader]["inputs"]["clip"] = [checkpoint, 0]
            response = await running.http.post("/prompt", json={"prompt": wrong})
            (error,) = response.json()["node_errors"][loader]["errors"]
            assert error["type"] == "return_type_mismatch"
            assert error["details"] == "clip, received_type(MODEL) mismatch input_type(CLIP)"


async def test_a_lora_removed_after_validation_fails_while_running() -> None:
    prompt = built("a fox <lora:detail-tweaker> -m tiny")
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs()) as running:
            running.sim.knobs.model_load_seconds = 0.3  # the checkpoint loads before the LoRA
            prompt_id = (await running.post_prompt({"prompt": prompt}))["prompt_id"]
            running.sim.knobs.loras = []
            await running.sim.wait_idle()
            history = (await running.http.get(f"/history/{prompt_id}")).json()[prompt_id]
            assert history["status"]["status_str"] == "error"
            event, data = history["status"]["messages"][-1]
            assert event == "execution_error"
            assert data["exception_message"] == (
                "Model in folder 'loras' with filename 'detail-tweaker.safetensors' not found."
            )


async def test_inventory_reads_the_lora_list() -> None:
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs()) as running:
            rest = ComfyRest(f"http://127.0.0.1:{running.port}", running.http)
            found = await inspect(rest, {}, {"tiny": TINY_CKPT})
            assert found.loras == frozenset(DEFAULT_LORAS)
            assert found.unavailable == {}
    assert lora_names({}) == frozenset()
    assert lora_names({"LoraLoader": {"input": {}}}) == frozenset()
    assert lora_names({"LoraLoader": {"input": {"required": {"lora_name": ["x"]}}}}) == set()
