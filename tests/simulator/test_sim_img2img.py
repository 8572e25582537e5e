"""The simulator's input images: POST /upload/image, LoadImage validation like ComfyUI's, and
img2img, latent-upscale and model-upscale workflows producing images of the right size."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

import pytest
import trio
from PIL import Image, ImageChops, ImageStat
from simulator_fixtures import (
    TINY_CKPT,
    Running,
    recorder,
    recording,
    running_simulator,
    txt2img_prompt,
)

from fategen.simulator import DEFAULT_UPSCALE_MODELS, SimulatorKnobs, graph
from fategen.simulator.imagespec import image_spec, upscale_factor

UPLOAD_RECORDS = recording("upload-image.json")
NODES = recording("object_info-selected-nodes.json")["nodes"]
NEW_NODES = (
    "VAEEncode",
    "RepeatLatentBatch",
    "LatentUpscale",
    "ImageScale",
    "UpscaleModelLoader",
    "ImageUpscaleWithModel",
)


def knobs(**changes: Any) -> SimulatorKnobs:
    return SimulatorKnobs(step_seconds=0.001, model_load_seconds=0.0, **changes)


def picture(width: int = 64, height: int = 48, image_format: str = "PNG") -> bytes:
    """Black on the left half, white on the right: far from any vertical gradient."""
    image = Image.new("RGB", (width, height), (0, 0, 0))
    image.paste((255, 255, 255), (width // 2, 0, width, height))
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return buffer.getvalue()


def smooth_picture(width: int = 64, height: int = 48) -> bytes:
    """A horizontal gradient: resizing it changes little."""
    image = Image.linear_gradient("L").rotate(90).resize((width, height)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two RGB images, per channel (0 to 255)."""
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


async def upload(
    running: Running, name: str, data: bytes, headers: dict[str, str] | None = None, **fields: str
) -> Any:
    fields.setdefault("type", "input")
    return await running.http.post(
        "/upload/image", files={"image": (name, data, "image/png")}, data=fields, headers=headers
    )


def img2img_prompt(image: str, amount: int = 1, denoise: float = 0.6, seed: int = 1) -> dict:
    """LoadImage -> VAEEncode -> RepeatLatentBatch -> KSampler -> VAEDecode -> SaveImage."""
    prompt = txt2img_prompt(seed=seed, prefix="img2img")
    prompt["10"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    prompt["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    prompt["5"] = {
        "class_type": "RepeatLatentBatch",
        "inputs": {"samples": ["11", 0], "amount": amount},
    }
    prompt["3"]["inputs"]["denoise"] = denoise
    return prompt


def latent_upscale_prompt(image: str, width: int, height: int) -> dict:
    """LoadImage -> VAEEncode -> LatentUpscale -> KSampler (0.35) -> VAEDecode -> SaveImage."""
    prompt = img2img_prompt(image, denoise=0.35)
    prompt["5"] = {
        "class_type": "LatentUpscale",
        "inputs": {
            "samples": ["11", 0],
            "upscale_method": "nearest-exact",
            "width": width,
            "height": height,
            "crop": "disabled",
        },
    }
    return prompt


def model_upscale_prompt(image: str, model: str, width: int, height: int) -> dict:
    """LoadImage -> UpscaleModelLoader + ImageUpscaleWithModel -> ImageScale -> SaveImage."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model}},
        "3": {
            "class_type": "ImageUpscaleWithModel",
            "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]},
        },
        "4": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["3", 0],
                "upscale_method": "lanczos",
                "width": width,
                "height": height,
                "crop": "disabled",
            },
        },
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "up"}},
    }


async def saved_images(running: Running, prompt_id: str) -> list[Image.Image]:
    entry = (await running.http.get(f"/history/{prompt_id}")).json()[prompt_id]
    assert entry["status"]["status_str"] == "success", entry["status"]
    (output,) = entry["outputs"].values()
    return [
        decoded((await running.http.get("/view", params=image)).content)
        for image in output["images"]
    ]


# -- POST /upload/image -------------------------------------------------------------------------


async def test_upload_answers_like_the_recording_and_view_serves_it() -> None:
    posted, viewed = UPLOAD_RECORDS
    data = picture()
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs()) as running:
            response = await upload(running, "proto_upload.png", data, overwrite="true")
            again = await running.http.post(
                "/api/upload/image",
                files={"image": ("proto_upload.png", data, "image/png")},
                data={"type": "input", "overwrite": "true"},
            )
            view = await running.http.get(viewed["request"]["path"])
            info = (await running.http.get("/object_info/LoadImage")).json()
    recorded = posted["response"]
    assert response.status_code == recorded["status"]
    assert response.json() == recorded["json"]
    assert again.json() == recorded["json"]
    wanted = {k.lower(): v for k, v in recorded["headers"] if k.lower() not in ("date", "server")}
    assert {k: response.headers[k] for k in wanted} == wanted  # Content-Length too: 62
    assert view.status_code == 200
    assert view.content == data
    view_headers = dict(viewed["response"]["headers"])
    assert view.headers["content-type"] == view_headers["Content-Type"]
    assert view.headers["content-disposition"] == view_headers["Content-Disposition"]
    assert {k.lower() for k in view_headers} - {"date", "server"} <= set(view.headers)
    choices = info["LoadImage"]["input"]["required"]["image"][0]
    assert choices == ["example.png", "proto_upload.png"]


async def test_uploads_without_overwrite_are_renamed_unless_identical() -> None:
    first, second, third = picture(), picture(32, 32), picture(16, 16)
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs()) as running:
            names = [
                (await upload(running, "in.png", data)).json()["name"]
                for data in (first, second, third, second, first)
            ]
            overwritten = await upload(running, "in.png", third, overwrite="1")
            kept = await upload(running, "in.png", first, overwrite="true")
            listed = running.sim.store.input_images()
            served = await running.http.get("/view", params={"filename": "in.png", "type": "input"})
    assert names == ["in.png", "in (1).png", "in (2).png", "in (1).png", "in.png"]
    assert overwritten.json() == {"name": "in.png", "subfolder": "", "type": "input"}
    assert kept.json()["name"] == "in.png"
    assert served.content == first
    assert listed == ["example.png", "in (1).png", "in (2).png", "in.png"]


async def test_upload_subfolder_other_types_and_formats() -> None:
    jpeg, webp = picture(40, 24, "JPEG"), picture(24, 40, "WEBP")
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs()) as running:
            sub = await upload(running, "a.jpg", jpeg, subfolder="refs")
            temp = await upload(running, "b.webp", webp, type="temp")
            plain = await running.http.post(
                "/upload/image", files={"image": ("c.webp", webp, "image/webp")}
            )
            view = await running.http.get(
                "/view", params={"filename": "a.jpg", "subfolder": "refs", "type": "input"}
            )
            store = running.sim.store
            sizes = store.size_of("refs/a.jpg"), store.size_of("b.webp [temp]")
            listed = store.input_images()
    assert sub.json() == {"name": "a.jpg", "subfolder": "refs", "type": "input"}
    assert temp.json() == {"name": "b.webp", "subfolder": "", "type": "temp"}
    assert plain.json() == {"name": "c.webp", "subfolder": "", "type": "input"}
    assert view.content == jpeg
    assert view.headers["content-type"] == "image/jpeg"
    assert sizes == ((40, 24), (24, 40))
    assert listed == ["c.webp", "example.png"]  # LoadImage lists the folder's own files


async def test_bad_uploads_are_refused_like_comfyui() -> None:
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs()) as running:
            missing = await running.http.post("/upload/image", data={"type": "input"})
            not_multipart = await running.http.post("/upload/image", json={"image": "x"})
            no_name = await upload(running, "", picture())
            escaping = await upload(running, "x.png", picture(), subfolder="../..")
            text_field = await running.http.post("/upload/image", data={"image": "not a file"})
            bad_type = await upload(running, "x.png", picture(), type="models")
    for response in (missing, not_multipart, escaping):
        assert response.status_code == 400
        assert response.content == b""
        assert "content-type" not in response.headers
    # aiohttp reads a part without a file name as a plain field, which ComfyUI cannot save
    assert no_name.status_code == text_field.status_code == bad_type.status_code == 500
    assert bad_type.headers["content-type"] == "text/plain; charset=utf-8"


async def test_upload_needs_the_token() -> None:
    token = "img-token"
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs(required_token=token)) as running:
            refused = await upload(running, "t.png", picture())
            accepted = await upload(
                running, "t.png", picture(), headers={"Authorization": f"Bearer {token}"}
            )
            stored = running.sim.store.input_images()
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert accepted.status_code == 200
    assert stored == ["example.png", "t.png"]


# -- object_info and validation -----------------------------------------------------------------


async def test_object_info_entries_of_the_new_nodes() -> None:
    v1_keys = list(NODES["EmptyImage"])  # a classic node without tooltips or essentials
    v3_keys = list(NODES["ImageBlur"])  # a V3 (comfy_api io.ComfyNode) node
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs()) as running:
            info = (await running.http.get("/object_info")).json()
            running.sim.knobs.upscale_models = ["8x-Big.pth"]
            one = (await running.http.get("/object_info/UpscaleModelLoader")).json()
            models = (await running.http.get("/models/upscale_models")).json()
            api_models = (await running.http.get("/api/models/upscale_models")).json()
    for name in ("VAEEncode", "RepeatLatentBatch", "LatentUpscale"):
        assert list(info[name]) == v1_keys, name
    assert list(info["ImageScale"]) == [*v1_keys, "essentials_category"]
    for name in ("UpscaleModelLoader", "ImageUpscaleWithModel"):
        assert list(info[name]) == v3_keys, name
    for name in NEW_NODES:
        entry = info[name]
        assert entry["name"] == name
        assert entry["input_order"] == {k: list(v) for k, v in entry["input"].items()}
        assert len(entry["output"]) == len(entry["output_is_list"]) == len(entry["output_name"])
    assert info["VAEEncode"]["input"]["required"] == {"pixels": ["IMAGE"], "vae": ["VAE"]}
    assert info["RepeatLatentBatch"]["input"]["required"]["amount"] == [
        "INT",
        {"default": 1, "min": 1, "max": 64},
    ]
    latent = info["LatentUpscale"]["input"]["required"]
    assert latent["width"] == ["INT", {"default": 512, "min": 0, "max": 16384, "step": 8}]
    assert latent["upscale_method"][0][0] == "nearest-exact"
    assert latent["crop"] == [["disabled", "center"]]
    scale = info["ImageScale"]["input"]["required"]
    assert "lanczos" in scale["upscale_method"][0]
    assert scale["height"] == ["INT", {"default": 512, "min": 0, "max": 16384, "step": 1}]
    loader = info["UpscaleModelLoader"]
    assert loader["input"]["required"]["model_name"] == [
        "COMBO",
        {"multiselect": False, "options": list(DEFAULT_UPSCALE_MODELS)},
    ]
    assert (loader["output"], loader["output_name"]) == (["UPSCALE_MODEL"], ["UPSCALE_MODEL"])
    assert loader["python_module"] == "comfy_extras.nodes_upscale_model"
    upscaler = info["ImageUpscaleWithModel"]
    assert upscaler["input"]["required"] == {
        "upscale_model": ["UPSCALE_MODEL", {}],
        "image": ["IMAGE", {}],
    }
    assert one["UpscaleModelLoader"]["input"]["required"]["model_name"][1]["options"] == [
        "8x-Big.pth"
    ]
    assert models == api_models == ["8x-Big.pth"]


async def test_default_upscale_models_are_listed() -> None:
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs()) as running:
            models = (await running.http.get("/models/upscale_models")).json()
    assert models == list(DEFAULT_UPSCALE_MODELS) == ["4x-UltraSharp.pth", "2x-ESRGAN.pth"]
    assert SimulatorKnobs().upscale_models == list(DEFAULT_UPSCALE_MODELS)


async def test_load_image_of_an_unknown_file_is_refused_with_comfyuis_error() -> None:
    prompt = img2img_prompt("nope.png")
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs()) as running:
            response = await running.http.post("/prompt", json={"prompt": prompt})
            assert running.sim.executions == []
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == {
        "type": "prompt_outputs_failed_validation",
        "message": "Prompt outputs failed validation",
        "details": "",
        "extra_info": {},
    }
    assert body["node_errors"] == {
        "10": {
            "errors": [
                {
                    "type": "custom_validation_failed",
                    "message": "Custom validation failed for node",
                    "details": "image - Invalid image file: nope.png",
                    "extra_info": {"input_name": "image"},
                }
            ],
            "dependent_outputs": ["9"],
            "class_type": "LoadImage",
        }
    }


async def test_load_image_checks_the_file_not_the_choice_list() -> None:
    """VALIDATE_INPUTS takes over from the combo check: files in a subfolder or named
    ``[output]`` pass although GET /object_info does not list them."""
    with trio.fail_after(20):
        async with running_simulator(knobs=knobs()) as running:
            await upload(running, "deep.png", picture(), subfolder="refs")
            first = await running.run_prompt(
                {"prompt": model_upscale_prompt("refs/deep.png", "2x-ESRGAN.pth", 0, 0)}
            )
            (saved,) = (await running.http.get(f"/history/{first}")).json()[first]["outputs"]["5"][
                "images"
            ]
            annotated = f"{saved['filename']} [output]"
            second = await running.run_prompt(
                {"prompt": model_upscale_prompt(annotated, "2x-ESRGAN.pth", 0, 0)}
            )
            sizes = [(await saved_images(running, p))[0].size for p in (first, second)]
    assert sizes == [(128, 96), (256, 192)]


async def test_an_unknown_upscale_model_is_not_in_the_list() -> None:
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs()) as running:
            await upload(running, "in.png", picture())
            prompt = model_upscale_prompt("in.png", "missing.pth", 128, 96)
            response = await running.http.post("/prompt", json={"prompt": prompt})
    assert response.status_code == 400
    (error,) = response.json()["node_errors"]["2"]["errors"]
    assert error == {
        "type": "value_not_in_list",
        "message": "Value not in list",
        "details": f"model_name: 'missing.pth' not in {list(DEFAULT_UPSCALE_MODELS)}",
        "extra_info": {
            "input_name": "model_name",
            "input_config": [
                "COMBO",
                {"multiselect": False, "options": list(DEFAULT_UPSCALE_MODELS)},
            ],
            "received_value": "missing.pth",
        },
    }


# -- running the workflows ----------------------------------------------------------------------


async def test_img2img_makes_a_batch_of_the_input_size_close_to_the_input_at_low_denoise() -> None:
    source = decoded(picture())
    with trio.fail_after(20):
        async with running_simulator(knobs=knobs()) as running:
            name = (await upload(running, "fategen-ab12.png", picture(), overwrite="true")).json()[
                "name"
            ]
            gentle = await running.run_prompt({"prompt": img2img_prompt(name, 3, denoise=0.1)})
            full = await running.run_prompt({"prompt": img2img_prompt(name, 3, denoise=1.0)})
            gentle_images = await saved_images(running, gentle)
            full_images = await saved_images(running, full)
            executions = (await running.http.get("/sim/executions")).json()["executions"]
            records = running.sim.executions
    assert [image.size for image in gentle_images + full_images] == [(64, 48)] * 6
    assert all(difference(image, source) < 20 for image in gentle_images)
    assert all(difference(image, source) > 100 for image in full_images)
    a, b, c = full_images
    assert min(difference(a, b), difference(b, c), difference(a, c)) > 0  # a gradient each
    assert [r.input_images for r in records] == [("fategen-ab12.png",)] * 2
    assert [r.checkpoint for r in records] == [TINY_CKPT] * 2
    assert [e["input_images"] for e in executions] == [["fategen-ab12.png"]] * 2


async def test_latent_upscale_second_pass_makes_the_requested_size() -> None:
    with trio.fail_after(20):
        async with running_simulator(knobs=knobs()) as running:
            await upload(running, "small.png", picture(), overwrite="true")
            both = await running.run_prompt({"prompt": latent_upscale_prompt("small.png", 128, 96)})
            ratio = await running.run_prompt({"prompt": latent_upscale_prompt("small.png", 0, 100)})
            (image,) = await saved_images(running, both)
            (kept_ratio,) = await saved_images(running, ratio)
    assert image.size == (128, 96)
    assert kept_ratio.size == (128, 96)  # width 133 by the ratio, both rounded down to 8s
    assert difference(image, decoded(picture()).resize((128, 96), Image.Resampling.LANCZOS)) < 60


async def test_model_upscale_then_image_scale_looks_like_the_input() -> None:
    data = smooth_picture()
    source = decoded(data)
    with trio.fail_after(20):
        async with running_simulator(knobs=knobs()) as running:
            await upload(running, "up.png", data, overwrite="true")
            async with recorder(running.ws_url("up-client")) as rec:
                prompt_id = (
                    await running.post_prompt(
                        {
                            "prompt": model_upscale_prompt("up.png", "4x-UltraSharp.pth", 128, 96),
                            "client_id": "up-client",
                        }
                    )
                )["prompt_id"]
                await rec.wait_type("executing", node=None, prompt_id=prompt_id)
            (image,) = await saved_images(running, prompt_id)
            record = running.sim.executions[-1]
    assert image.size == (128, 96)
    assert difference(image, source.resize((128, 96), Image.Resampling.LANCZOS)) < 3
    assert difference(image.resize((64, 48), Image.Resampling.LANCZOS), source) < 3
    progress = [f["data"] for f in rec.texts() if f["type"] == "progress"]
    assert [(p["node"], p["value"], p["max"]) for p in progress] == [("3", 1, 1)]
    assert (record.checkpoint, record.input_images, record.status) == (None, ("up.png",), "success")


async def test_an_undecodable_upload_fails_at_execution() -> None:
    with trio.fail_after(10):
        async with running_simulator(knobs=knobs()) as running:
            stored = await upload(running, "broken.png", b"this is not an image", overwrite="true")
            listed = (await running.http.get("/object_info/LoadImage")).json()
            prompt = model_upscale_prompt("broken.png", "4x-UltraSharp.pth", 0, 0)
            prompt_id = await running.run_prompt({"prompt": prompt})
            entry = (await running.http.get(f"/history/{prompt_id}")).json()[prompt_id]
            assert running.sim.executions[-1].status == "error"
    assert stored.json() == {"name": "broken.png", "subfolder": "", "type": "input"}
    assert "broken.png" in listed["LoadImage"]["input"]["required"]["image"][0]
    assert (entry["status"]["status_str"], entry["status"]["completed"]) == ("error", False)
    event, data = entry["status"]["messages"][-1]
    assert event == "execution_error"
    assert (data["node_id"], data["node_type"]) == ("1", "LoadImage")
    assert data["exception_type"] == "av.error.InvalidDataError"
    assert data["exception_message"] == (
        "[Errno 1094995529] Invalid data found when processing input: "
        "'/srv/ComfyUI/input/broken.png'"
    )
    assert data["current_inputs"] == {"image": ["broken.png"]}
    assert entry["outputs"] == {}


async def test_a_new_file_under_the_same_name_runs_load_image_again() -> None:
    """LoadImage's IS_CHANGED hashes the file: overwriting it defeats the cache."""
    with trio.fail_after(20):
        async with running_simulator(knobs=knobs()) as running:
            await upload(running, "same.png", picture(), overwrite="true")
            prompt = model_upscale_prompt("same.png", "2x-ESRGAN.pth", 0, 0)
            first = await running.run_prompt({"prompt": prompt})
            cached = await running.run_prompt({"prompt": prompt})
            await upload(running, "same.png", picture(32, 24), overwrite="true")
            changed = await running.run_prompt({"prompt": prompt})
            history = (await running.http.get("/history")).json()
            sizes = [(await saved_images(running, p))[0].size for p in (first, cached, changed)]

    def cached_nodes(prompt_id: str) -> list[str]:
        messages = history[prompt_id]["status"]["messages"]
        return next(data["nodes"] for event, data in messages if event == "execution_cached")

    assert cached_nodes(cached) == ["1", "2", "3", "4", "5"]
    assert cached_nodes(changed) == ["2"]
    assert sizes == [(128, 96), (128, 96), (64, 48)]


# -- sizes --------------------------------------------------------------------------------------


def test_image_spec_follows_the_size_changing_nodes() -> None:
    def sizes(name: str) -> tuple[int, int] | None:
        return {"odd.png": (100, 75)}.get(name)

    prompt = latent_upscale_prompt("odd.png", 0, 150)
    spec = image_spec(prompt, ["8", 0], sizes)
    # VAEEncode crops 100x75 to 96x72; height 150 keeps the ratio: width 200; 8s: 200x144
    assert (spec.width, spec.height, spec.batch_size) == (200, 144, 1)
    assert (spec.input_image, spec.denoise, spec.seed) == ("odd.png", 0.35, 1)
    encoded = image_spec(prompt, ["11", 0], sizes)
    assert (encoded.width, encoded.height, encoded.denoise) == (96, 72, 0.0)  # VAE: 8s
    repeated = image_spec(img2img_prompt("odd.png", amount=4), ["9", 0], sizes)
    assert (repeated.batch_size, repeated.width) == (4, 96)
    scaled = image_spec(model_upscale_prompt("odd.png", "2x-ESRGAN.pth", 0, 100), ["4", 0], sizes)
    assert (scaled.width, scaled.height, scaled.denoise) == (133, 100, 0.0)
    upscaled = image_spec(model_upscale_prompt("odd.png", "x.pth", 0, 0), ["4", 0], sizes)
    assert (upscaled.width, upscaled.height) == (400, 300)
    unknown = image_spec(model_upscale_prompt("gone.png", "1x-Fix.pth", 0, 0), ["4", 0], sizes)
    assert (unknown.width, unknown.height) == (512, 512)
    # graph.image_spec as before: the sizes as a mapping
    mapped = graph.image_spec(img2img_prompt("odd.png"), ["9", 0], {"odd.png": (100, 75)})
    assert (mapped.width, mapped.height, mapped.denoise) == (96, 72, 0.6)
    drawn = graph.image_spec(txt2img_prompt(width=100, height=60), ["9", 0], {})
    assert (drawn.width, drawn.height, drawn.input_image, drawn.denoise) == (96, 56, None, 1.0)


@pytest.mark.parametrize(
    ("name", "factor"),
    [
        ("4x-UltraSharp.pth", 4),
        ("2x-ESRGAN.pth", 2),
        ("sub/8X_big.safetensors", 8),
        ("RealESRGAN_x4plus.pth", 4),
        ("0x-none.pth", 4),
        ("", 4),
    ],
)
def test_upscale_factor_from_the_file_name(name: str, factor: int) -> None:
    assert upscale_factor(name) == factor


def test_the_command_line_takes_upscale_models() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fategen.simulator", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert "--upscale-model" in done.stdout
    assert "4x-UltraSharp.pth" in done.stdout
