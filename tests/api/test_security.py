"""Access control, limits and hostile input, end to end over real sockets."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import Stack, open_stack

TINY = "-m tiny -w 256 -h 256"
USER_KEY = "user-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
BAD_KEY = "not-a-real-key-but-long-enough-9876"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post_raw(stack: Stack, body: bytes) -> tuple[int, Any]:
    r = await stack.client.post(
        "/request", content=body, headers={"content-type": "application/json"}
    )
    return r.status_code, r.json()


# -- API keys -------------------------------------------------------------------------------


async def test_keys_guard_every_endpoint_but_health_and_docs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    env = {"FATEGEN_API_KEYS": USER_KEY, "FATEGEN_ADMIN_KEYS": ADMIN_KEY}
    with trio.fail_after(30):
        async with open_stack(tmp_path, **env) as stack:
            c = stack.client
            some = str(uuid.uuid4())
            guarded = [
                ("POST", "/request"),
                ("GET", f"/job/{some}"),
                ("GET", f"/wait/{some}"),
                ("GET", f"/job/{some}/image"),
                ("DELETE", f"/job/{some}"),
                ("GET", "/models"),
            ]
            for headers in ({}, bearer(BAD_KEY), {"Authorization": f"Basic {USER_KEY}"}):
                for method, path in guarded:
                    r = await c.request(method, path, headers=headers)
                    assert r.status_code == 401, (method, path, headers, r.text)
                    assert r.headers["WWW-Authenticate"] == "Bearer"
                    assert "API key" in r.json()["error"]
            for path in ("/health", "/ready", "/docs", "/redoc", "/openapi.json"):
                assert (await c.get(path)).status_code == 200, path
            doc = (await c.get("/openapi.json")).json()
            assert "401" in doc["paths"]["/request"]["post"]["responses"]
            assert "401" not in doc["paths"]["/health"]["get"]["responses"]
            assert (await c.get("/models", headers=bearer(USER_KEY))).status_code == 200

            # A user key submits; another nick cannot cancel; an admin key may, without a nick.
            sub = await stack.submit(f"guarded {TINY} -c 4", "alice", headers=bearer(USER_KEY))
            job = f"/job/{sub['job_id']}"
            r = await c.delete(job, params={"nick": "mallory"}, headers=bearer(USER_KEY))
            assert r.status_code == 403
            r = await c.delete(job, headers=bearer(USER_KEY))
            assert r.status_code == 403
            r = await c.delete(job, headers=bearer(ADMIN_KEY))
            assert r.status_code in (200, 409), r.text
            if r.status_code == 200:
                assert r.json()["status"] == "cancelled"
                assert r.json()["cancelled_by"] == "admin"
    for key in (USER_KEY, ADMIN_KEY, BAD_KEY):
        assert key not in caplog.text


async def test_job_ids_are_random_uuids(stack: Stack) -> None:
    ids = [(await stack.submit(f"id {i} {TINY}", "nia"))["job_id"] for i in range(3)]
    for job_id in ids:
        assert uuid.UUID(job_id).version == 4
    assert len(set(ids)) == 3


# -- limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "nick", "needle"),
    [
        ("x" * 4001, "alice", "too long"),
        ("a cat", "n" * 65, "too long"),
        ("a cat", "bad\nnick", "control characters"),
        ("a cat", "bad\u202enick", "control characters"),
        ("a cat", "nul\x00", "control characters"),
        ("a cat", "\ud800", "control characters"),
        ("a \ud800 cat", "alice", "lone surrogate"),
        ("a \udfff", "alice", "lone surrogate"),
        ("a cat\x00", "alice", "control character"),
        ("a cat -m tiny -w 2048 -h 2048", "alice", "over the limit"),
        ("a cat -m tiny -w 4096", "alice", "between"),
        ("a cat -m tiny -c 5", "alice", "--count"),
        ("a cat -m tiny -c 0", "alice", "--count"),
        ("a cat -s 18446744073709551616", "alice", "--seed"),
        ("a cat -s -1", "alice", "--seed"),
        ("a cat -m ../../etc/passwd", "alice", "unknown model"),
        ("a cat -m /etc/passwd", "alice", "unknown model"),
        ("a cat -m tiny.safetensors", "alice", "unknown model"),
    ],
)
async def test_limits_are_refused_with_one_sentence(
    stack: Stack, message: str, nick: str, needle: str
) -> None:
    # json.dumps escapes lone surrogates (\ud800), as a hostile client would send them.
    status, body = await post_raw(stack, json.dumps({"message": message, "nick": nick}).encode())
    assert status == 400, body
    assert needle in body["error"]
    assert "\n" not in body["error"]


async def test_body_limits(stack: Stack) -> None:
    status, body = await post_raw(stack, b"\xff\xfe not utf-8")
    assert status == 400 and "UTF-8" in body["error"]
    status, body = await post_raw(stack, b'{"message": "a", "nick": "x"')
    assert status == 400 and "error" in body
    big = json.dumps({"message": "x" * 70_000, "nick": "x"}).encode()
    status, body = await post_raw(stack, big)
    assert status == 413 and "too large" in body["error"]


@pytest.mark.parametrize(
    "body",
    [
        "[" * 1000 + "]" * 1000,
        '{"message": ' + "[" * 1000 + "]" * 1000 + ', "nick": "a"}',
        '{"a":' * 1000 + "1" + "}" * 1000,
        '{"message": "x", "nick": ' + "[" * 20000 + "]" * 20000 + "}",
    ],
    ids=["array", "nested-field", "objects", "deep-40k"],
)
async def test_deeply_nested_json_is_a_bad_request(stack: Stack, body: str) -> None:
    """A 2 KB body nested 1,000 deep made json.loads raise RecursionError: a 500."""
    status, answer = await post_raw(stack, body.encode())
    assert status == 400
    assert answer == {"error": "the request body is nested too deeply to be read as JSON"}
    assert (await stack.client.get("/health")).status_code == 200


async def test_largest_seed_and_pixel_budget_are_accepted(stack: Stack) -> None:
    sub = await stack.submit("edge -m tiny -s 18446744073709551615 -w 1536 -h 1536", "omar")
    view = (await stack.client.get(f"/job/{sub['job_id']}")).json()
    assert view["seed"] == 2**64 - 1
    assert (view["width"], view["height"]) == (1536, 1536)


# -- hostile prompts are stored and sent verbatim, never break logs or the workflow --------


def _positive_text(stack: Stack, job_id: str) -> str:
    entry = stack.sim.history[job_id]
    graph = entry["prompt"][2]
    texts = [
        node["inputs"]["text"]
        for node in graph.values()
        if node.get("_meta", {}).get("title") == "positive"
    ]
    assert len(texts) == 1
    text: str = texts[0]
    return text


HOSTILE = [
    "she said \"hello\" and 'bye'",
    '{"prompt": {"1": {"class_type": "SaveImage"}}}, "}]',
    "right\u200f-to\u202eleft \u05e9\u05dc\u05d5\u05dd marks",
    "w" * 1500,
    "back\\slash %s %(x)s {0} ${HOME} `id` $(id) <script>",
    "emoji \U0001f98a and zero\u200bwidth",
]


async def test_hostile_prompts_are_stored_and_sent_verbatim(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(60):
        subs = [await stack.submit(f"{text} {TINY}", "pat") for text in HOSTILE]
        newline = await stack.submit(f"first line\nFAKE job 1 accepted from root\r\n {TINY}", "pat")
        for sub, text in zip(subs, HOSTILE, strict=True):
            done = await stack.wait(sub["job_id"])
            assert done["status"] == "completed", done
            assert done["prompt"] == text
            assert text in _positive_text(stack, sub["job_id"])
        done = await stack.wait(newline["job_id"])
        assert done["status"] == "completed"
        # Line breaks in a prompt are whitespace: normalised to one space.
        assert done["prompt"] == "first line FAKE job 1 accepted from root"
    for record in caplog.records:
        assert "\n" not in record.getMessage(), record.getMessage()
        assert "\r" not in record.getMessage()


async def test_client_input_cannot_choose_a_path(stack: Stack, tmp_path: Path) -> None:
    with trio.fail_after(30):
        sub = await stack.submit(f"paths {TINY}", "../../../tmp/evil")
        done = await stack.wait(sub["job_id"])
    output = await trio.Path(stack.running.settings.output_dir).resolve()
    result = await trio.Path(done["result"]).resolve()
    assert result.parent == output
    assert result.name == f"{sub['job_id']}.webp"
    assert done["nick"] == "../../../tmp/evil"
    for path in (
        "/job/..%2F..%2Fetc%2Fpasswd/image",
        "/job/%2E%2E/image",
        f"/job/{sub['job_id']}%2F..%2F..%2Fdata/image",
        "/job/" + "%00" * 10 + "/image",
    ):
        r = await stack.client.get(path)
        assert r.status_code == 404, path
    assert not any((tmp_path.parent / "tmp").glob("evil*"))
