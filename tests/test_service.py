"""End to end over real sockets: the service and the simulator on ephemeral ports."""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from openapi_spec_validator import validate
from PIL import Image

from conftest import Stack, open_stack
from fategen.simulator import SimulatorKnobs


async def test_users_models_and_counts_complete_with_grids(stack: Stack) -> None:
    cases = [
        ("alice", "a red fox in snow -m tiny -w 256 -h 256 -c 1", (256, 256)),
        ("bob", "a sci-fi city at dusk -m tiny -w 320 -h 256 -c 2", (640, 256)),
        ("carol", "a lighthouse --model lumina2 -w 256 -h 256 --count 3", (768, 256)),
        (
            "dave",
            'castle, "quoted" {json: 1} -m illustriousXL -w 256 -h 384 -c 4 --no blurry, text',
            (512, 768),
        ),
    ]
    with trio.fail_after(60):
        jobs = [(await stack.submit(msg, nick), size) for nick, msg, size in cases]
        for submitted, (width, height) in jobs:
            done = await stack.wait(submitted["job_id"])
            assert done["status"] == "completed", done
            assert done["error"] is None
            path = Path(done["result"])
            assert path.name == f"{submitted['job_id']}.webp"
            with Image.open(path) as image:
                assert image.format == "WEBP"
                assert image.size == (width, height)
            r = await stack.client.get(f"/job/{submitted['job_id']}/image")
            assert r.status_code == 200
            assert r.headers["content-type"] == "image/webp"
            assert r.content == await trio.Path(path).read_bytes()
            assert done["image_url"].endswith(f"/job/{submitted['job_id']}/image")
    # Each request reached ComfyUI with its own model and size.
    assert len(stack.sim.executions) == 4


async def test_job_fields(stack: Stack) -> None:
    with trio.fail_after(30):
        sub = await stack.submit("a cat -m tiny -w 256 -h 256 -s 42 --no dogs", "erin")
        uuid.UUID(sub["job_id"])
        assert sub["job_url"].endswith(f"/job/{sub['job_id']}")
        done = await stack.wait(sub["job_id"])
    assert done["seed"] == 42
    assert (done["model"], done["width"], done["height"], done["count"]) == ("tiny", 256, 256, 1)
    assert done["prompt"] == "a cat" and done["negative"] == "dogs"
    assert done["nick"] == "erin"
    assert done["progress"]["of"] > 0 and done["progress"]["step"] == done["progress"]["of"]
    assert done["created"] <= done["started"] <= done["finished"]
    assert done["queue_position"] is None


async def test_queue_positions_count_down_and_status_walks(tmp_path: Path) -> None:
    knobs = SimulatorKnobs(step_seconds=0.03, model_load_seconds=0.01)
    async with open_stack(tmp_path, knobs) as stack:
        with trio.fail_after(60):
            subs = [await stack.submit(f"job {i} -m tiny -w 256 -h 256", "frank") for i in range(4)]
            positions = [s["queue_position"] for s in subs]
            assert positions == sorted(positions)
            assert positions[-1] >= 3
            last = subs[-1]["job_id"]
            seen_status: list[str] = []
            seen_positions: list[int] = []
            while True:
                body = (await stack.client.get(f"/job/{last}")).json()
                if not seen_status or seen_status[-1] != body["status"]:
                    seen_status.append(body["status"])
                if body["queue_position"] is not None:
                    seen_positions.append(body["queue_position"])
                if body["status"] in ("completed", "failed"):
                    break
                await trio.sleep(0.01)
    assert seen_status == ["queued", "processing", "completed"]
    assert seen_positions == sorted(seen_positions, reverse=True)
    assert seen_positions[0] >= 2 and seen_positions[-1] == 0


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"message": "a cat --steps 30", "nick": "x"}, "--steps"),
        ({"message": "a cat -m nosuchmodel", "nick": "x"}, "nosuchmodel"),
        ({"message": "a cat -c 9", "nick": "x"}, "count"),
        ({"message": "   ", "nick": "x"}, "prompt"),
        ({"message": "a cat"}, "nick"),
        ({"nick": "x"}, "message"),
        ({"message": 5, "nick": "x"}, "message"),
        ({"message": "a cat", "nick": "   "}, "nick"),
        ({"message": "a cat", "nick": "n" * 65}, "nick"),
    ],
)
async def test_bad_requests_answer_400_with_one_sentence(
    stack: Stack, body: dict[str, Any], needle: str
) -> None:
    r = await stack.client.post("/request", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error
    assert "\n" not in error


async def test_malformed_json_and_unknown_routes(stack: Stack) -> None:
    r = await stack.client.post(
        "/request", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = await stack.client.get("/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = await stack.client.post(
        "/request", content=b"x" * 70_000, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "too large" in r.json()["error"]


async def test_unknown_job_is_404(stack: Stack) -> None:
    for path in (
        f"/job/{uuid.uuid4()}",
        "/job/not-a-uuid",
        f"/wait/{uuid.uuid4()}",
        f"/job/{uuid.uuid4()}/image",
        "/job/..%2F..%2Fetc%2Fpasswd/image",
    ):
        r = await stack.client.get(path)
        assert r.status_code == 404, path
        assert "no job" in r.json()["error"] or "no such" in r.json()["error"]


async def test_comfy_node_error_fails_the_job_readably(stack: Stack) -> None:
    stack.sim.knobs.checkpoints = [
        c for c in stack.sim.knobs.checkpoints if not c.startswith("paSanctuary")
    ]
    with trio.fail_after(30):
        sub = await stack.submit("a cat -m paSanctuary -w 256 -h 256", "gina")
        done = await stack.wait(sub["job_id"])
    assert done["status"] == "failed"
    assert "paSanctuary_v10.safetensors" in done["error"]
    assert "not installed" in done["error"]
    # The service keeps serving.
    with trio.fail_after(30):
        ok = await stack.wait((await stack.submit("a dog -m tiny -w 256 -h 256", "gina"))["job_id"])
    assert ok["status"] == "completed"


async def test_wait_times_out_with_202_and_current_state(tmp_path: Path) -> None:
    async with open_stack(tmp_path, SimulatorKnobs(step_seconds=0.2)) as stack:
        sub = await stack.submit("slow -m tiny -w 256 -h 256", "hal")
        with trio.fail_after(10):
            r = await stack.client.get(f"/wait/{sub['job_id']}", params={"timeout": 0.2})
        assert r.status_code == 202
        assert r.json()["status"] in ("queued", "processing")
        r = await stack.client.get(f"/wait/{sub['job_id']}", params={"timeout": -1})
        assert r.status_code == 400


async def test_idempotency_key_returns_the_same_job(stack: Stack) -> None:
    headers = {"Idempotency-Key": "retry-123"}
    a = await stack.submit("a cat -m tiny -w 256 -h 256", "ivan", headers=headers)
    b = await stack.submit("a cat -m tiny -w 256 -h 256", "ivan", headers=headers)
    c = await stack.submit("a cat -m tiny -w 256 -h 256", "ivan")
    assert a["job_id"] == b["job_id"] != c["job_id"]


async def test_idempotency_key_replays_are_marked_and_misuse_is_refused(stack: Stack) -> None:
    headers = {"Idempotency-Key": "retry-456"}
    body = {"message": "a dog -m tiny -w 256 -h 256", "nick": "ivan"}
    first = await stack.client.post("/request", json=body, headers=headers)
    assert "idempotent-replayed" not in first.headers
    replay = await stack.client.post("/request", json=body, headers=headers)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["job_id"] == first.json()["job_id"]
    other = await stack.client.post(
        "/request", json=body | {"message": "a wolf -m tiny"}, headers=headers
    )
    assert other.status_code == 422
    assert other.json()["error"] == (
        "the Idempotency-Key 'retry-456' was used for another message; "
        "send a new key with a new request"
    )
    # Once expired (24 hours by default; here at once), the key starts a new job.
    stack.running.desk.idempotency_ttl = 0.0
    fresh = await stack.client.post("/request", json=body, headers=headers)
    assert fresh.status_code == 200 and "idempotent-replayed" not in fresh.headers
    assert fresh.json()["job_id"] != first.json()["job_id"]
    stack.running.desk.idempotency_ttl = 3600.0
    again = await stack.client.post("/request", json=body, headers=headers)
    assert again.json()["job_id"] == fresh.json()["job_id"]


async def test_cancel_queued_and_running(tmp_path: Path) -> None:
    async with open_stack(tmp_path, SimulatorKnobs(step_seconds=0.1)) as stack:
        with trio.fail_after(30):
            first = await stack.submit("one -m tiny -w 256 -h 256", "judy")
            second = await stack.submit("two -m tiny -w 256 -h 256", "judy")
            third = await stack.submit("three -m tiny -w 256 -h 256", "judy")
            r = await stack.client.delete(f"/job/{third['job_id']}", params={"nick": "mallory"})
            assert r.status_code == 403
            r = await stack.client.delete(f"/job/{third['job_id']}", params={"nick": "judy"})
            assert r.status_code == 200 and r.json()["status"] == "cancelled"
            assert r.json()["cancelled_by"] == "judy"
            # Wait until the first runs, then cancel it.
            store = stack.running.store
            job = await store.get(first["job_id"])
            assert job is not None
            while job.progress_value < 1:
                await store.wait_change(job.id)
            r = await stack.client.delete(f"/job/{first['job_id']}", params={"nick": "judy"})
            assert r.json()["status"] == "cancelled", r.json()
            done = await stack.wait(second["job_id"])
            assert done["status"] == "completed"
            r = await stack.client.delete(f"/job/{second['job_id']}", params={"nick": "judy"})
            assert r.status_code == 409
        statuses = {e.prompt_id: e.status for e in stack.sim.executions}
        assert third["job_id"] not in statuses
        assert statuses[first["job_id"]] == "interrupted"


async def test_models_and_health(stack: Stack) -> None:
    models = (await stack.client.get("/models")).json()
    ids = {m["id"] for m in models["models"]}
    assert {"illustriousXL", "paSanctuary", "lumina2", "tiny"} <= ids
    assert models["defaults"]["model"] in ids
    health = (await stack.client.get("/health")).json()
    assert health["status"] == "ok"
    assert health["comfyui"]["reachable"] is True


async def test_openapi_document_validates_and_lists_every_route(stack: Stack) -> None:
    doc = (await stack.client.get("/openapi.json")).json()
    validate(doc)
    paths = set(doc["paths"])
    assert {
        "/request",
        "/job/{job_id}",
        "/job/{job_id}/image",
        "/wait/{job_id}",
        "/models",
        "/health",
    } <= paths
    assert "delete" in doc["paths"]["/job/{job_id}"]
    seed = doc["components"]["schemas"]["JobResponse"]["properties"]["seed"]
    assert (seed["minimum"], seed["maximum"]) == (0, 2**64 - 1)
    assert "2^53" in seed["description"]
    status = doc["components"]["schemas"]["JobResponse"]["properties"]["status"]
    assert set(status["enum"]) == {"queued", "processing", "completed", "failed", "cancelled"}
    assert {"400", "422", "429", "503"} <= set(doc["paths"]["/request"]["post"]["responses"])
    assert {"403", "404", "409"} <= set(doc["paths"]["/job/{job_id}"]["delete"]["responses"])

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        target: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        assert isinstance(target, dict), ref
    models = doc["components"]["schemas"]["ModelsResponse"]["properties"]["models"]
    assert models["type"] == "array"
    for page in ("/docs", "/redoc"):
        r = await stack.client.get(page)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]


async def test_shutdown_answers_waiters_promptly(tmp_path: Path) -> None:
    async with open_stack(tmp_path, SimulatorKnobs(step_seconds=0.5)) as stack:
        sub = await stack.submit("slow -m tiny -w 256 -h 256", "kim")
        answered: list[httpx.Response] = []

        async def waiter() -> None:
            async with httpx.AsyncClient(base_url=stack.url) as c:
                answered.append(await c.get(f"/wait/{sub['job_id']}", params={"timeout": 60}))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.sleep(0.3)
                stack.shutdown.set()
        assert answered[0].status_code == 202


async def test_images_are_decodable_bytes(stack: Stack) -> None:
    sub = await stack.submit("check -m tiny -w 256 -h 256 -c 2", "leo")
    with trio.fail_after(30):
        await stack.wait(sub["job_id"])
    r = await stack.client.get(f"/job/{sub['job_id']}/image")
    with Image.open(io.BytesIO(r.content)) as image:
        assert image.size == (512, 256)


async def test_startup_check_warns_about_missing_checkpoints(tmp_path: Path) -> None:
    knobs = SimulatorKnobs(step_seconds=0.002)
    knobs.checkpoints = [c for c in knobs.checkpoints if not c.startswith("lumina")]
    async with open_stack(tmp_path, knobs) as stack:
        service = stack.running.service
        with trio.fail_after(10):
            await service.wait_checked()
        assert len(service.setup_warnings) == 1
        assert "lumina2" in service.setup_warnings[0]
        assert "lumina_2.safetensors" in service.setup_warnings[0]


async def test_wait_longer_than_the_read_timeout_still_answers(tmp_path: Path) -> None:
    # hypercorn's read timeout also runs while a /wait is parked; the service raises it to
    # outlast FATEGEN_WAIT_TIMEOUT_MAX, so a long poll is answered, not disconnected.
    env = {"FATEGEN_READ_TIMEOUT": "1", "FATEGEN_WAIT_TIMEOUT_MAX": "3"}
    async with open_stack(tmp_path, SimulatorKnobs(step_seconds=1.0), **env) as stack:
        sub = await stack.submit("slow -m tiny -w 256 -h 256", "olga")
        with trio.fail_after(10):
            r = await stack.client.get(f"/wait/{sub['job_id']}", params={"timeout": 2.5})
        assert r.status_code == 202


async def test_models_comfyui_cannot_run_are_marked_and_refused(tmp_path: Path) -> None:
    """A model whose checkpoint ComfyUI lacks is unavailable in /models and refused at
    submit with one line naming the ones that can run, instead of failing in the queue;
    what ComfyUI has is read again when the session reconnects."""
    knobs = SimulatorKnobs(step_seconds=0.002)
    knobs.checkpoints = [c for c in knobs.checkpoints if not c.startswith("lumina")]
    async with open_stack(tmp_path, knobs) as stack:
        service = stack.running.service
        with trio.fail_after(20):
            await service.wait_checked()
            models = {m["id"]: m for m in (await stack.client.get("/models")).json()["models"]}
            assert models["lumina2"]["available"] is False
            assert "lumina_2.safetensors" in models["lumina2"]["unavailable_reason"]
            assert models["tiny"]["available"] is True
            r = await stack.client.post(
                "/request", json={"message": "a harbour -m lumina2", "nick": "lena"}
            )
            assert r.status_code == 400
            error = r.json()["error"]
            assert error.startswith('model "lumina2" cannot run now: its checkpoint')
            assert "available: " in error and "tiny" in error and "\n" not in error
            # ComfyUI gains the checkpoint; the next connection finds it.
            knobs.checkpoints.append("lumina_2.safetensors")
            stack.sim.knobs.drop_ws_mid_job = 1
            job = await stack.submit("reconnect -m tiny -w 256 -h 256", "lena")
            assert (await stack.wait(job["job_id"]))["status"] == "completed"
            while service.availability.reason("lumina2") is not None:  # noqa: ASYNC110
                await trio.sleep(0.02)
            r = await stack.client.post(
                "/request", json={"message": "a harbour -m lumina2 -w 256 -h 256", "nick": "lena"}
            )
            assert r.status_code == 200, r.text
