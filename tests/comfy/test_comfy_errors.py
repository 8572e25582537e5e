"""ComfyUI's refusals and failures -> the one sentence a user reads (recorded bodies)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from fategen.comfy.wire import (
    INTERRUPTED,
    ComfyRest,
    ExecutionError,
    ProgressState,
    Status,
    execution_error_sentence,
    history_failure,
    images_from_outputs,
    node_name,
    parse_message,
    prompt_error_sentence,
)
from fategen.errors import ComfyError, ComfyUnavailable

PROTOCOL = Path("/work/shared/comfyui-protocol")


def recording(name: str) -> Any:
    return json.loads((PROTOCOL / name).read_text())


VALIDATION = recording("errors-validation.json")


def sentence_for(case: str) -> str:
    record = VALIDATION[case]
    workflow = (record["request_json"] or {}).get("prompt") or {}
    return prompt_error_sentence(record["status"], record["body"], workflow)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            "unknown_node_class",
            'ComfyUI has no node type "NoSuchNodeClass" (a custom node may be missing)',
        ),
        ("missing_required_input", 'node 1 (EmptyImage): required input "width" is missing'),
        (
            "wrong_type_width_abc",
            "node 1 (EmptyImage): input \"width\" cannot use 'abc' "
            "(Failed to convert an input value to a INT value)",
        ),
        (
            "value_below_min_width_0",
            'node 1 (EmptyImage): input "width" Value 0 smaller than min of 1',
        ),
        ("ckpt_not_in_list", 'checkpoint "does-not-exist.safetensors" is not installed on ComfyUI'),
        (
            "no_output_node",
            "the workflow has no output node (such as SaveImage), so ComfyUI refused it",
        ),
        (
            "link_to_missing_node",
            "node 2 (SaveImage): Exception when validating node ('99')",
        ),
        (
            "return_type_mismatch",
            'node 2 (SaveImage): input "images" is linked to a LATENT output '
            "(Return type mismatch between linked nodes)",
        ),
        (
            "node_without_class_type",
            "node 1 of the workflow has no class_type (the workflow is corrupted)",
        ),
        ("no_prompt_key", "ComfyUI refused the prompt: No prompt provided"),
        (
            "invalid_prompt_id",
            "ComfyUI refused the prompt: prompt_id must be a valid UUID (prompt_id must be a "
            "UUID string in canonical lowercase hyphenated form; omit it to let the server "
            "generate one)",
        ),
        (
            "malformed_json_body",
            "ComfyUI refused the prompt (500): 500 Internal Server Error Server got itself in "
            "trouble",
        ),
    ],
)
def test_every_recorded_refusal_is_one_sentence(case: str, expected: str) -> None:
    assert sentence_for(case) == expected


def test_title_from_meta_names_the_node() -> None:
    body = VALIDATION["value_below_min_width_0"]["body"]
    body = json.loads(json.dumps(body))
    body["node_errors"] = {"3": body["node_errors"]["1"]}
    body["node_errors"]["3"]["class_type"] = "KSampler"
    body["node_errors"]["3"]["errors"][0]["extra_info"]["input_name"] = "steps"
    workflow = {"3": {"class_type": "KSampler", "inputs": {}, "_meta": {"title": "sampler"}}}
    assert (
        prompt_error_sentence(400, body, workflow)
        == 'node "sampler" (KSampler): input "steps" Value 0 smaller than min of 1'
    )


def test_several_node_errors_are_counted() -> None:
    body = json.loads(json.dumps(VALIDATION["missing_required_input"]["body"]))
    second = dict(body["node_errors"]["1"]["errors"][0], extra_info={"input_name": "height"})
    body["node_errors"]["1"]["errors"].append(second)
    body["node_errors"]["1"]["errors"].append(second)
    assert prompt_error_sentence(400, body, {}) == (
        'node 1 (EmptyImage): required input "width" is missing (and 2 more problems)'
    )


def test_other_model_inputs_name_the_kind_of_file() -> None:
    body = json.loads(json.dumps(VALIDATION["ckpt_not_in_list"]["body"]))
    error = body["node_errors"]["4"]["errors"][0]
    error["extra_info"].update(input_name="lora_name", received_value="x.safetensors")
    assert (
        prompt_error_sentence(400, body, {}) == 'LoRA "x.safetensors" is not installed on ComfyUI'
    )


def test_execution_error_sentence_from_the_recorded_message() -> None:
    trace = recording("ws-messages-execution-error.json")
    frame = next(m for m in trace["messages"] if m["data"]["type"] == "execution_error")
    message = parse_message(json.dumps(frame["data"]))
    assert isinstance(message, ExecutionError)
    workflow = trace["prompt_request"]["prompt"]
    assert execution_error_sentence(message, workflow) == (
        "ComfyUI failed in node 2 (SaveImage): ERROR: Saving image outside the output folder is "
        "not allowed. full_output_folder: /srv output_dir: /srv/ComfyUI/output"
    )
    titled = {"2": {**workflow["2"], "_meta": {"title": "save"}}}
    assert execution_error_sentence(message, titled).startswith(
        'ComfyUI failed in node "save" (SaveImage): ERROR: Saving image'
    )
    # The history entry of the same prompt gives the same sentence.
    entry = trace["history_after"][trace["prompt_response"]["prompt_id"]]
    assert history_failure(entry, workflow) == execution_error_sentence(message, workflow)


def test_interrupted_history_entry() -> None:
    entry = next(iter(recording("history-interrupted.json")["response"]["json"].values()))
    assert history_failure(entry, {}) == INTERRUPTED


def test_node_name_without_anything() -> None:
    assert node_name({}, None, None) == "node ?"
    assert node_name({"5": {"class_type": "VAEDecode"}}, "5", None) == "node 5 (VAEDecode)"


def test_history_outputs_to_image_refs() -> None:
    history = recording("history.json")
    for case, count in [("emptyimage_batch1", 1), ("emptyimage_batch2", 2)]:
        entry = next(iter(history[case]["response"]["json"].values()))
        assert history_failure(entry, {}) is None
        refs = images_from_outputs(entry["outputs"])
        assert len(refs) == count
        assert all(ref.type == "output" and ref.subfolder == "" for ref in refs)
    # PreviewImage only: its temp image is the result.
    temp = [
        ref
        for record in history.values()
        for entry in record["response"]["json"].values()
        for ref in images_from_outputs(entry["outputs"])
        if ref.type == "temp"
    ]
    assert temp, "history.json has a PreviewImage run"
    mixed = {
        "1": {"images": [{"filename": "a.png", "subfolder": "", "type": "temp"}]},
        "2": {"images": [{"filename": "b.png", "subfolder": "x", "type": "output"}]},
    }
    assert [r.filename for r in images_from_outputs(mixed)] == ["b.png"]


def test_every_recorded_text_frame_parses_or_is_ignored() -> None:
    kinds: set[str] = set()
    for path in PROTOCOL.glob("ws-messages-*.json"):
        trace = json.loads(path.read_text())
        frames = trace.get("messages") or [
            frame
            for part in trace.values()
            if isinstance(part, dict)
            for frame in part.get("messages", ())
        ]
        for frame in frames:
            if frame["kind"] != "text" or frame.get("direction") == "client->server":
                continue
            message = parse_message(json.dumps(frame["data"]))
            if message is not None:
                kinds.add(type(message).__name__)
    assert kinds >= {
        "Status",
        "ExecutionStart",
        "ExecutionCached",
        "Executing",
        "Progress",
        "ProgressState",
        "Executed",
        "ExecutionSuccess",
        "ExecutionError",
        "ExecutionInterrupted",
    }
    assert parse_message('{"type": "status", "data": {"status": {"exec_info": {}}}}') == Status(
        None, None
    )
    assert parse_message("not json") is None
    assert parse_message('{"type": "executing", "data": {}}') is None
    assert parse_message('{"type": "feature_flags", "data": {}}') is None


def test_progress_state_head_reads_like_the_whole_frame() -> None:
    """The ``progress_state`` short cut gives what decoding the whole frame gives, for every
    recorded one; a frame in another form is decoded in full."""
    seen = 0
    for path in PROTOCOL.glob("ws-messages-*.json"):
        trace = json.loads(path.read_text())
        for frame in trace.get("messages") or ():
            if frame["kind"] != "text" or frame["data"].get("type") != "progress_state":
                continue
            text = json.dumps(frame["data"])  # as aiohttp's send_json writes it
            assert text.startswith('{"type": "progress_state", "data": {"prompt_id": "')
            message = parse_message(text)
            assert message == ProgressState.from_data(frame["data"]["data"])
            seen += 1
    assert seen > 20
    compact = '{"type":"progress_state","data":{"nodes":{},"prompt_id":"abc"}}'
    assert parse_message(compact) == ProgressState("abc")
    escaped = '{"type": "progress_state", "data": {"prompt_id": "a\\u0062", "nodes": {}}}'
    assert parse_message(escaped) == ProgressState("ab")
    assert parse_message('{"type": "progress_state", "data": {"prompt_id": "", "x": 1}}') == (
        ProgressState("")
    )


async def test_rest_errors_become_sentences() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/prompt":
            return httpx.Response(500, text="boom")
        raise httpx.ConnectError("Connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        rest = ComfyRest("http://127.0.0.1:9", http)
        with pytest.raises(ComfyError, match=r"^ComfyUI answered 500 to the prompt$"):
            await rest.post_prompt({}, client_id="c", prompt_id="p")
        with pytest.raises(
            ComfyUnavailable, match=r"cannot reach ComfyUI at http://127\.0\.0\.1:9"
        ):
            await rest.free(unload_models=True, free_memory=False)
