"""The simulator against the recordings of a real ComfyUI 0.33 (/work/shared/comfyui-protocol).

Requests are replayed and the answers compared by *shape*: status, content type, key sets
(recursively), value types; ids and timestamps are not compared.
"""

from __future__ import annotations

import copy
import io
import re
import uuid
from typing import Any

import httpx
import pytest
import trio
from PIL import Image
from simulator_fixtures import (
    PROTOCOL_DIR,
    TINY_CKPT,
    Frame,
    Running,
    emptyimage_prompt,
    recorder,
    recording,
    running_simulator,
)

from fategen.simulator import SimulatorKnobs

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _kind(value: Any) -> str:
    return type(value).__name__


def shape_diff(actual: Any, expected: Any, path: str = "$") -> list[str]:
    """Where ``actual`` differs in shape from ``expected`` (empty: same shape).

    Objects keyed by prompt ids are compared entry by entry against the recording's first entry;
    lists of a different length element by element against the recording's first element.
    """
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: {_kind(actual)} instead of object"]
        if expected and all(_UUID.match(k) for k in expected):
            if not all(_UUID.match(k) for k in actual):
                return [f"{path}: keys {sorted(actual)} are not prompt ids"]
            sample = next(iter(expected.values()))
            return [d for k, v in actual.items() for d in shape_diff(v, sample, f"{path}.<id>")]
        if set(actual) != set(expected):
            return [f"{path}: keys {sorted(actual)} instead of {sorted(expected)}"]
        return [d for k in expected for d in shape_diff(actual[k], expected[k], f"{path}.{k}")]
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{path}: {_kind(actual)} instead of list"]
        if not expected or not actual:
            return []
        if len(actual) == len(expected):
            pairs = list(zip(actual, expected, strict=True))
        else:
            pairs = [(a, expected[0]) for a in actual]
        return [d for i, (a, e) in enumerate(pairs) for d in shape_diff(a, e, f"{path}[{i}]")]
    if _kind(actual) != _kind(expected):
        return [f"{path}: {_kind(actual)} {actual!r} instead of {_kind(expected)} {expected!r}"]
    return []


def assert_same_shape(actual: Any, expected: Any) -> None:
    assert shape_diff(actual, expected) == []


def content_type(headers: list[list[str]]) -> str | None:
    return next((v for k, v in headers if k.lower() == "content-type"), None)


def assert_like_record(response: httpx.Response, record: dict[str, Any]) -> None:
    """Status, content type and body shape of ``response`` are those of the recorded one."""
    recorded = record["response"]
    assert response.status_code == recorded["status"], record["request"]
    assert response.headers.get("content-type") == content_type(recorded["headers"])
    if "json" in recorded:
        assert_same_shape(response.json(), recorded["json"])
    elif "text" in recorded:
        assert response.text == recorded["text"]


async def replay(running: Running, request: dict[str, Any]) -> httpx.Response:
    if "raw_body" in request:
        return await running.http.request(
            request["method"], request["path"], content=request["raw_body"]
        )
    if "json" in request:
        return await running.http.request(request["method"], request["path"], json=request["json"])
    return await running.http.request(request["method"], request["path"])


# -- HTTP -------------------------------------------------------------------------------------

VALIDATION = recording("errors-validation.json")


@pytest.mark.parametrize("case", sorted(VALIDATION))
async def test_validation_errors_match_recording(case: str) -> None:
    record = VALIDATION[case]
    with trio.fail_after(10):
        async with running_simulator() as running:
            if record["request_raw_body"] is not None:
                response = await running.http.post("/prompt", content=record["request_raw_body"])
            else:
                response = await running.http.post("/prompt", json=record["request_json"])
    assert response.status_code == record["status"]
    assert response.headers["content-type"] == record["content_type"]
    expected = record["body"]
    if isinstance(expected, str):
        assert response.text == expected
        return
    body = response.json()
    assert_same_shape(body, expected)
    assert body["error"]["type"] == expected["error"]["type"]
    assert body["error"]["message"] == expected["error"]["message"]
    if case != "ckpt_not_in_list":  # the recorded server had no checkpoints at all
        assert body["error"]["details"] == expected["error"]["details"]
    for node_id, node in expected["node_errors"].items():
        ours = body["node_errors"][node_id]
        assert ours["dependent_outputs"] == node["dependent_outputs"]
        assert ours["class_type"] == node["class_type"]
        for mine, theirs in zip(ours["errors"], node["errors"], strict=True):
            assert (mine["type"], mine["message"]) == (theirs["type"], theirs["message"])
            if case != "ckpt_not_in_list":
                assert mine["details"] == theirs["details"]


async def test_prompt_responses_number_front_and_own_id() -> None:
    records = recording("prompt-response.json")
    with trio.fail_after(10):
        async with running_simulator() as running:
            answers = {}
            for name, record in records.items():
                response = await replay(running, record["request"])
                assert_like_record(response, record)
                answers[name] = response.json()
    assert answers["plain"]["number"] == 0
    assert answers["front_true"]["number"] == -1
    assert isinstance(answers["number_5"]["number"], float)
    assert answers["number_5"]["number"] == 5.0
    own = records["client_supplied_prompt_id_and_extra_data"]
    assert (
        answers["client_supplied_prompt_id_and_extra_data"]["prompt_id"]
        == own["request"]["json"]["prompt_id"]
    )
    assert answers["client_supplied_prompt_id_and_extra_data"]["number"] == 2


async def test_idle_queue_api_prefix_and_404() -> None:
    with trio.fail_after(10):
        async with running_simulator() as running:
            for record in recording("queue-idle.json").values():
                assert_like_record(await replay(running, record["request"]), record)
            for record in recording("api-prefix-and-404.json"):
                if "/jobs" in record["request"]["path"]:
                    continue  # the jobs API is not simulated
                response = await replay(running, record["request"])
                assert_like_record(response, record)
                if record["response"]["body_length"] == 0:
                    assert response.content == b""


async def test_models_and_system_info() -> None:
    models = recording("models.json")
    with trio.fail_after(10):
        # The recorded ComfyUI had no model files at all: no checkpoints and no LoRAs.
        async with running_simulator(knobs=SimulatorKnobs(checkpoints=[], loras=[])) as running:
            for record in models["before_any_checkpoint"]:
                response = await replay(running, record["request"])
                assert_like_record(response, record)
                if "json" in record["response"]:
                    assert response.json() == record["response"]["json"]
            running.sim.knobs.checkpoints = [TINY_CKPT]
            for record in models["after_one_checkpoint_added"]:
                response = await replay(running, record["request"])
                assert response.json() == record["response"]["json"]
            for name in ("system_stats.json", "features.json"):
                record = recording(name)
                assert_like_record(await replay(running, record["request"]), record)
            features = await running.http.get("/features")
            assert features.json() == recording("features.json")["response"]["json"]


async def test_object_info_equals_recording() -> None:
    checkpoint_records = recording("object_info-CheckpointLoaderSimple.json")
    with trio.fail_after(10):
        async with running_simulator(knobs=SimulatorKnobs(checkpoints=[])) as running:
            record = checkpoint_records["no_checkpoints_installed"]
            response = await replay(running, record["request"])
            assert_like_record(response, record)
            assert response.json() == record["response"]["json"]
            running.sim.knobs.checkpoints = [TINY_CKPT]
            record = checkpoint_records["one_checkpoint_installed"]
            assert (await replay(running, record["request"])).json() == record["response"]["json"]
            for name in ("object_info-KSampler.json", "object_info-unknown-node.json"):
                record = recording(name)
                response = await replay(running, record["request"])
                assert_like_record(response, record)
                assert response.json() == record["response"]["json"]
            everything = (await running.http.get("/object_info")).json()
            for node, info in recording("object_info-selected-nodes.json")["nodes"].items():
                assert everything[node] == info, node
            for node in ("ModelSamplingAuraFlow", "EmptySD3LatentImage", "KSampler"):
                assert node in everything


async def test_history_entries_match_recording() -> None:
    records = recording("history.json")
    with trio.fail_after(20):
        async with running_simulator() as running:
            for name, record in records.items():
                expected = next(iter(record["response"]["json"].values()))
                _, _, prompt, extra_data, _ = expected["prompt"]
                body = {"prompt": prompt, "client_id": extra_data["client_id"]}
                prompt_id = await running.run_prompt(body)
                response = await running.http.get(f"/history/{prompt_id}")
                assert_like_record(response, record)
                entry = response.json()[prompt_id]
                if name != "previewimage_temp":  # its file name has a random part
                    assert entry["outputs"] == expected["outputs"], name
                assert entry["meta"] == expected["meta"]
                assert [m[0] for m in entry["status"]["messages"]] == [
                    m[0] for m in expected["status"]["messages"]
                ]


async def test_history_list_matches_recording() -> None:
    records = recording("history-list.json")
    with trio.fail_after(10):
        async with running_simulator() as running:
            empty = records["empty_history_before_any_prompt"]
            assert_like_record(await replay(running, empty["request"]), empty)
            recorded = next(iter(records["max_items_2"]["response"]["json"].values()))
            ids = []
            running.sim.knobs.hang = 4  # the recorded prompts were interrupted
            for color in range(4):
                prompt = copy.deepcopy(recorded["prompt"][2])
                prompt["1"]["inputs"]["color"] = color
                body = {"prompt": prompt, "client_id": recorded["prompt"][3]["client_id"]}
                ids.append((await running.post_prompt(body))["prompt_id"])
                await running.sim.wait_running(ids[-1])
                await running.http.post("/interrupt", json={"prompt_id": ids[-1]})
                await running.sim.wait_idle()
            response = await replay(running, records["max_items_2"]["request"])
            assert_like_record(response, records["max_items_2"])
            assert list(response.json()) == ids[-2:]
            offset = records["max_items_1_offset_1"]
            response = await replay(running, offset["request"])
            assert response.status_code == offset["response"]["status"]
            assert list(response.json()) == ids[1:2]
            # the recorded entry is of another prompt: compare the entry's keys only
            recorded_entry = next(iter(offset["response"]["json"].values()))
            assert set(response.json()[ids[1]]) == set(recorded_entry)


def _view_records() -> list[tuple[str, int, dict[str, str]]]:
    """(path, status, headers) of each exchange in view-headers.txt."""
    blocks = []
    for block in recording_text("view-headers.txt").strip().split("\n\n"):
        lines = block.splitlines()
        status = int(lines[1].split()[1])
        headers = dict(line.split(": ", 1) for line in lines[2:] if not line.startswith("("))
        blocks.append((lines[0].split(" ", 1)[1], status, headers))
    return blocks


def recording_text(name: str) -> str:
    return (PROTOCOL_DIR / name).read_text(encoding="utf-8")


VIEW_RECORDS = _view_records()
RED_PNG = (PROTOCOL_DIR / "emptyimage-64x64-red.png").read_bytes()


async def test_view_headers_and_image_match_recording() -> None:
    found = next(r for r in VIEW_RECORDS if r[1] == 200 and "type=output" in r[0])
    missing = next(r for r in VIEW_RECORDS if r[1] == 404)
    with trio.fail_after(10):
        async with running_simulator() as running:
            prompt = emptyimage_prompt(color=16711680, prefix="proto_emptyimage")
            await running.run_prompt({"prompt": prompt})
            response = await running.http.get(found[0])
            assert response.status_code == 200
            ours = {k.lower() for k in response.headers}
            wanted = {k.lower() for k in found[2]} - {"server", "date"}
            assert wanted <= ours
            assert response.headers["content-type"] == found[2]["Content-Type"]
            assert response.headers["content-disposition"] == found[2]["Content-Disposition"]
            missed = await running.http.get(missing[0])
    assert missed.status_code == 404
    assert missed.content == b""
    assert "content-type" not in missed.headers
    ours_image = Image.open(io.BytesIO(response.content))
    recorded_image = Image.open(io.BytesIO(RED_PNG))
    assert (ours_image.format, ours_image.size, ours_image.mode) == (
        recorded_image.format,
        recorded_image.size,
        recorded_image.mode,
    )


async def test_queue_control_sequence_matches_recording() -> None:
    """Busy queue, delete, targeted and bare interrupts, clear, free (queue-control.json)."""
    busy = recording("queue-busy.json")
    deleted = recording("queue-delete-and-clear.json")
    interrupts = recording("interrupt.json")
    interrupted_history = recording("history-interrupted.json")
    with trio.fail_after(15):
        async with running_simulator(knobs=SimulatorKnobs(hang=2)) as running:
            _, _, slow_prompt, extra_data, _ = busy["response"]["json"]["queue_running"][0]
            ids = []
            for color in range(4):
                prompt = copy.deepcopy(slow_prompt)
                prompt["1"]["inputs"]["color"] = color
                body = {"prompt": prompt, "client_id": extra_data["client_id"]}
                ids.append((await running.post_prompt(body))["prompt_id"])
            await running.sim.wait_running(ids[0])
            busy_response = await running.http.get(busy["request"]["path"])
            assert_like_record(busy_response, busy)
            assert len(busy_response.json()["queue_pending"]) == 3

            response = await running.http.post("/queue", json={"delete": [ids[2]]})
            assert_like_record(response, deleted["queue_delete_pending_P3"])
            after = await running.http.get("/queue")
            assert_like_record(after, deleted["queue_after_delete"])
            assert [i[1] for i in after.json()["queue_pending"]] == [ids[1], ids[3]]

            for key, target in (
                ("interrupt_targeted_not_running_noop", ids[3]),
                ("interrupt_targeted_running_P1", ids[0]),
            ):
                response = await running.http.post("/interrupt", json={"prompt_id": target})
                assert_like_record(response, interrupts[key])
            await running.sim.wait_running(ids[1])
            response = await running.http.post("/queue", json={"clear": True})
            assert_like_record(response, deleted["queue_clear_pending"])
            after = await running.http.get("/queue")
            assert_like_record(after, deleted["queue_after_clear_P2_still_running"])
            assert after.json()["queue_pending"] == []
            response = await running.http.post("/interrupt")
            assert_like_record(response, interrupts["interrupt_global_no_body"])
            await running.sim.wait_idle()
            history = await running.http.get(f"/history/{ids[0]}")
            assert_like_record(history, interrupted_history)
            never_ran = await running.http.get(f"/history/{ids[2]}")
            assert_like_record(never_ran, deleted["history_deleted_never_ran_P3"])
            assert never_ran.json() == {}
            free = recording("free.json")
            assert_like_record(await replay(running, free["request"]), free)
            assert_like_record(await running.http.post("/interrupt"), interrupts["interrupt_idle"])
    assert [(e.prompt_id, e.status) for e in running.sim.executions] == [
        (ids[0], "interrupted"),
        (ids[1], "interrupted"),
    ]


# -- websocket traces -------------------------------------------------------------------------

WS_TRACES = [
    "ws-messages-emptyimage.json",
    "ws-messages-emptyimage-batch2.json",
    "ws-messages-emptyimage-batch2-resubmitted-cached.json",
    "ws-messages-previewimage-temp.json",
    "ws-messages-saveimagewebsocket-binary.json",
    "ws-messages-feature-flags.json",
    "ws-messages-execution-error.json",
    "ws-messages-ksampler-tiny-cold.json",
    "ws-messages-ksampler-tiny-batch2.json",
    "ws-messages-ksampler-tiny-after-free.json",
    "ws-messages-ksampler-tiny-preview-binary.json",
    "ws-messages-ksampler-tiny-preview-with-metadata.json",
]


def signature(frame: Frame) -> tuple[Any, ...]:
    """What must match between the recording and the simulator for one frame."""
    if isinstance(frame, bytes):
        event = int.from_bytes(frame[:4], "big")
        return ("binary", event, int.from_bytes(frame[4:8], "big") if event == 1 else None)
    return ("text", frame["type"], tuple(sorted(frame["data"])))


def recorded_signature(message: dict[str, Any]) -> tuple[Any, ...]:
    if message["kind"] == "binary":
        return ("binary", message["event_type"], message.get("image_type_code"))
    return ("text", message["data"]["type"], tuple(sorted(message["data"]["data"])))


def warm_up_prompt(prompt: dict[str, Any], cached: list[str]) -> dict[str, Any]:
    """A prompt that leaves exactly ``cached`` in the cache when run before ``prompt``.

    The non-cached nodes that only depend on cached ones get their first INT input bumped.
    """
    warm = copy.deepcopy(prompt)
    for node_id, node in warm.items():
        if node_id in cached:
            continue
        links = [v[0] for v in node["inputs"].values() if isinstance(v, list)]
        if all(source in cached for source in links):
            name = next(k for k, v in node["inputs"].items() if isinstance(v, int))
            node["inputs"][name] += 1
    return warm


@pytest.mark.parametrize("name", WS_TRACES)
async def test_websocket_trace_matches_recording(name: str) -> None:
    trace = recording(name)
    body = trace["prompt_request"]
    messages = [m for m in trace["messages"] if m.get("direction") != "client->server"]
    client_frames = [m["data"] for m in trace["messages"] if m.get("direction") == "client->server"]
    cached = next(m["data"]["data"]["nodes"] for m in messages if m["kind"] == "text"
                  and m["data"]["type"] == "execution_cached")  # fmt: skip
    with trio.fail_after(15):
        async with running_simulator() as running:
            if cached:
                await running.run_prompt({"prompt": warm_up_prompt(body["prompt"], cached)})
            if "preceded_by" in trace:
                await running.run_prompt({"prompt": body["prompt"]})
                await replay(running, trace["preceded_by"]["request"])
            async with recorder(running.ws_url(trace["client_id"]), client_frames) as rec:
                if client_frames:
                    await rec.wait_type("feature_flags")
                answer = await running.post_prompt(body)
                assert_same_shape(answer, trace["prompt_response"])
                await rec.wait_type("executing", node=None, prompt_id=answer["prompt_id"])
    ours = [signature(f) for f in rec.frames]
    assert ours == [recorded_signature(m) for m in messages]
    our_texts = [f for f in rec.frames if isinstance(f, dict)]
    recorded_texts = [m["data"] for m in messages if m["kind"] == "text"]
    for mine, theirs in zip(our_texts, recorded_texts, strict=True):
        if mine["type"] in ("executing", "progress"):
            assert {**mine["data"], "prompt_id": None} == {**theirs["data"], "prompt_id": None}
        elif mine["type"] == "execution_cached":
            assert mine["data"]["nodes"] == theirs["data"]["nodes"]
        else:
            assert_same_shape(mine["data"], theirs["data"])


async def test_no_client_id_trace_matches_recording() -> None:
    trace = recording("ws-messages-no-client-id.json")
    with trio.fail_after(10):
        async with running_simulator() as running:
            own_id = str(uuid.uuid4())
            async with (
                recorder(running.ws_url()) as anonymous,
                recorder(running.ws_url(own_id)) as other,
            ):
                await running.post_prompt(trace["post"]["request"]["json"])
                for rec in (anonymous, other):
                    await rec.wait_type(
                        "status", start=2, status={"exec_info": {"queue_remaining": 0}}
                    )
    assert re.fullmatch(r"[0-9a-f]{32}", anonymous.texts()[0]["data"]["sid"])
    assert other.texts()[0]["data"]["sid"] == own_id
    for rec, key in ((anonymous, "socket_without_clientId"), (other, "other_socket_with_clientId")):
        assert [signature(f) for f in rec.frames] == [
            recorded_signature(m) for m in trace[key]["messages"]
        ]


async def test_history_is_there_when_execution_success_arrives() -> None:
    """race-history-vs-execution-success.json: stored after success, before executing null."""
    with trio.fail_after(10):
        async with running_simulator() as running:
            client_id = str(uuid.uuid4())
            async with recorder(running.ws_url(client_id)) as rec:
                for color in range(5):
                    body = {"prompt": emptyimage_prompt(color=color), "client_id": client_id}
                    prompt_id = (await running.post_prompt(body))["prompt_id"]
                    await rec.wait_type("execution_success", prompt_id=prompt_id)
                    entry = (await running.http.get(f"/history/{prompt_id}")).json()
                    assert entry[prompt_id]["status"]["completed"] is True
                    await rec.wait_type("executing", node=None, prompt_id=prompt_id)
