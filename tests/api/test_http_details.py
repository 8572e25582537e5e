"""What a bot author and an operator expect of the HTTP side: a JSON body without its
content type, conditional image requests, and an access line per request (text or JSON)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from conftest import ROOT, Stack, free_port, service_env, wait_healthy

TINY = "-m tiny -w 256 -h 256"


async def test_json_without_its_content_type_is_read(stack: Stack) -> None:
    """curl -d sends application/x-www-form-urlencoded."""
    body = json.dumps({"message": f"a kettle {TINY}", "nick": "curl"}).encode()
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
        headers = {} if content_type is None else {"content-type": content_type}
        r = await stack.client.post("/request", content=body, headers=headers)
        assert r.status_code == 200, (content_type, r.text)
    r = await stack.client.post(
        "/request",
        content=b"message=a+kettle&nick=curl",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 400
    assert r.json()["error"] == (
        'the request body is not valid JSON; send {"message": "...", "nick": "..."}'
    )


async def test_the_image_answers_conditional_requests(stack: Stack) -> None:
    done = await stack.wait((await stack.submit(f"a bell {TINY}"))["job_id"])
    url = f"/job/{done['job_id']}/image"
    first = await stack.client.get(url)
    assert first.status_code == 200
    assert first.headers["cache-control"] == "public, max-age=86400, immutable"
    etag, modified = first.headers["etag"], first.headers["last-modified"]
    again = await stack.client.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag
    since = await stack.client.get(url, headers={"If-Modified-Since": modified})
    assert since.status_code == 304
    part = await stack.client.get(url, headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == first.content[:10]


async def test_an_access_line_per_request_and_refusals_say_why(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fategen.access")
    await stack.client.get("/models")
    await stack.client.post("/request", json={"message": "x --steps 3", "nick": "a"})
    lines = [r for r in caplog.records if r.name == "fategen.access"]
    assert [(r.http["method"], r.http["path"], r.http["status"]) for r in lines] == [  # type: ignore[attr-defined]
        ("GET", "/models", 200),
        ("POST", "/request", 400),
    ]
    assert "key=-" in lines[0].getMessage()
    assert "--steps" in lines[1].getMessage() and lines[1].reason  # type: ignore[attr-defined]


async def test_log_format_json_writes_one_object_per_line(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, **service_env(tmp_path, FATEGEN_PORT=str(port), LOG_FORMAT="json")}
    log_path = tmp_path / "log.jsonl"
    with log_path.open("wb") as log_file:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "fategen", "serve", "--simulate"],
            env=env,
            cwd=str(ROOT),
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            with trio.fail_after(30):
                await wait_healthy(c)
                r = await c.post("/request", json={"message": f"a owl {TINY}", "nick": "j"})
                job_id = r.json()["job_id"]
                await c.get(f"/wait/{job_id}", params={"timeout": 20})
    finally:
        proc.terminate()
        with trio.move_on_after(15):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    events = {r.get("event") for r in records if r.get("job_id") == job_id}
    assert {"accepted", "started", "completed"} <= events
    access = [r for r in records if r["logger"] == "fategen.access"]
    assert {"method": "POST", "path": "/request", "status": 200} in [
        {k: a["http"][k] for k in ("method", "path", "status")} for a in access
    ]


async def test_behind_a_trusted_proxy_urls_use_the_forwarded_scheme_and_host(
    tmp_path: Path,
) -> None:
    from conftest import open_stack

    forwarded = {
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "img.example.org",
        "X-Forwarded-For": "203.0.113.7",
    }
    body = {"message": f"a tram {TINY}", "nick": "p"}
    async with open_stack(tmp_path / "trusted", FATEGEN_TRUSTED_PROXY_HOPS="1") as stack:
        r = await stack.client.post("/request", json=body, headers=forwarded)
        assert r.json()["job_url"].startswith("https://img.example.org/job/")
        done = (await stack.client.get(f"/wait/{r.json()['job_id']}", headers=forwarded)).json()
        assert done["image_url"].startswith("https://img.example.org/job/")
        # The client is the one the proxy names, not this machine: no internals for it.
        health = (await stack.client.get("/health", headers=forwarded)).json()
        assert health["comfyui"]["url"] is None
    async with open_stack(tmp_path / "untrusted") as stack:
        r = await stack.client.post("/request", json=body, headers=forwarded)
        assert r.json()["job_url"].startswith(stack.url)  # a client cannot forge them
