"""The client commands (``fategen submit``, ``status``, ``cancel``, ``models``) against the real
service on the simulator: ``fategen.cli.main`` in a thread, and ``python -m fategen`` as a
process for what a shell sees (exit codes, one sentence on stderr). And the client's variables
(``FATEGEN_URL``, ``FATEGEN_KEY``) do not stop the service's settings check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
import trio
from PIL import Image

from conftest import ROOT, Stack, free_port, open_stack
from fategen import cli
from fategen.client import AsyncClient, Event, FategenClientError
from fategen.simulator import SimulatorKnobs

TINY = "-m tiny -w 256 -h 256"
KEY = "c" * 24
#: The environment of a `python -m fategen` process: none of fategen's variables.
BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("FATEGEN_", "COMFYUI_"))}


async def fategen(*args: str) -> int:
    """``fategen ARGS`` in this process (in a thread, so the service keeps running here)."""
    code: int = await trio.to_thread.run_sync(cli.main, list(args))
    return code


async def process(*args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    """``python -m fategen ARGS`` as a process."""
    return await trio.run_process(
        [sys.executable, "-m", "fategen", *args],
        env={**BASE_ENV, **env},
        cwd=ROOT,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_submit_wait_saves_a_webp(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.webp"
    with trio.fail_after(30):
        code = await fategen(
            "submit", f"a lighthouse at night {TINY} -c 4", "--url", stack.url, "-o", str(out)
        )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    first, last = captured.out.strip().splitlines()
    assert first.startswith("job ") and " queued, " in first
    job_id = first.split()[1]
    assert last == (
        f"job {job_id} completed: 4 images of 256x256, tiny, seed "
        f"{(await stack.client.get(f'/job/{job_id}')).json()['seed']}; saved to {out}"
    )
    with Image.open(out) as image:
        assert image.format == "WEBP" and image.size == (512, 512)  # a 2x2 grid


async def test_submit_prints_the_queue_position(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await fategen("submit", f"a cat {TINY}", "--nick", "neo", "--url", stack.url) == 0
    line = capsys.readouterr().out.strip()
    job_id = line.split()[1]
    assert line in (f"job {job_id} queued, next in line", f"job {job_id} queued, running")
    assert (await stack.wait(job_id))["nick"] == "neo"


async def test_submit_an_image_file_then_upscale_it(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "sketch.png"
    await trio.to_thread.run_sync(
        lambda: Image.new("RGB", (256, 256), (90, 90, 200)).save(source, "PNG")
    )
    with trio.fail_after(30):
        code = await fategen(
            "submit", "a castle -m tiny", "--image-file", str(source), "--url", stack.url
        )
        assert code == 0, capsys.readouterr().err
        job_id = capsys.readouterr().out.split()[1]
        assert (await stack.wait(job_id))["kind"] == "img2img"
        code = await fategen("submit", f"--upscale {job_id}", "--url", stack.url, "--wait")
        assert code == 0, capsys.readouterr().err
        assert "1 image of 1024x1024" in capsys.readouterr().out
        missing = str(tmp_path / "nope.png")
        assert await fategen("submit", "a castle", "--image-file", missing, "--url", stack.url) == 1
        assert "cannot read" in capsys.readouterr().err


async def test_a_refusal_is_one_sentence_on_stderr_and_exit_1(stack: Stack) -> None:
    with trio.fail_after(30):
        result = await process("submit", "a cat --steps 30", "--url", stack.url)
    assert result.returncode == 1
    assert result.stdout == b""
    stderr = result.stderr.decode()
    assert stderr.startswith("fategen: unknown modifier '--steps'; valid modifiers: ")
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


async def test_a_failed_job_is_its_reason_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    knobs = SimulatorKnobs(step_seconds=0.01, model_load_seconds=0.01)
    async with open_stack(tmp_path, knobs) as stack:
        knobs.execution_error = True
        with trio.fail_after(30):
            code = await fategen("submit", f"doomed {TINY}", "--wait", "--url", stack.url)
        captured = capsys.readouterr()
        job_id = captured.out.split()[1]
        error = (await stack.wait(job_id))["error"]
    assert code == 1
    assert error and captured.err == f"fategen: job {job_id} failed: {error}\n"


async def test_json_is_the_service_answer(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(30):
        assert await fategen("submit", f"a fox {TINY}", "--wait", "--json", "--url", stack.url) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == (await stack.client.get(f"/job/{printed['job_id']}")).json()
    assert await fategen("models", "--json", "--url", stack.url) == 0
    assert (
        json.loads(capsys.readouterr().out) == (await stack.client.get("/models")).json()["models"]
    )


async def test_status_cancel_and_models_are_short_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with open_stack(tmp_path, SimulatorKnobs(step_seconds=0.1)) as stack:
        running = (await stack.submit(f"first {TINY}", "alice"))["job_id"]
        queued = (await stack.submit(f"second {TINY}", "alice"))["job_id"]
        url = ["--url", stack.url]
        with trio.fail_after(30):
            assert await fategen("cancel", queued, "--nick", "bob", *url) == 1
            assert capsys.readouterr().err == (
                f"fategen: job {queued} belongs to another nick; only it may cancel it\n"
            )
            assert await fategen("cancel", queued, "--nick", "alice", *url) == 0
            assert capsys.readouterr().out == f"job {queued} cancelled by alice\n"
            await stack.wait(running)
            assert await fategen("status", running, *url) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == f"job {running}: completed"
        assert lines[1] == "  'first' for alice: tiny, 1 image of 256x256"
        assert lines[2].startswith("  seed ") and " UTC" in lines[2]
        assert lines[3] == f"  image: {stack.url}/job/{running}/image"
        assert await fategen("models", *url) == 0
        models = capsys.readouterr().out.splitlines()
        assert any(m.startswith("tiny ") and " 512x512 " in m and "4 steps" in m for m in models)


async def test_the_key_comes_from_the_flag_or_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_stack(tmp_path, FATEGEN_API_KEYS=f"cli:{KEY}") as stack:
        monkeypatch.setenv("FATEGEN_URL", stack.url)
        monkeypatch.delenv("FATEGEN_KEY", raising=False)
        assert await fategen("models") == 1
        assert capsys.readouterr().err == (
            "fategen: a valid API key is required (Authorization: Bearer <key>)\n"
        )
        assert await fategen("models", "--key", KEY) == 0
        assert "tiny" in capsys.readouterr().out
        monkeypatch.setenv("FATEGEN_KEY", KEY)
        with trio.fail_after(30):
            assert await fategen("submit", f"keyed {TINY}", "--wait", "--json") == 0
        assert json.loads(capsys.readouterr().out)["key"] == "cli"


async def test_waiting_polls_a_service_without_event_streams(
    stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_events(*_: Any, **__: Any) -> AsyncGenerator[Event, None]:
        none: tuple[Event, ...] = ()
        for event in none:  # an async generator, as the real one, that fails at once
            yield event
        raise FategenClientError(404, "there is no such endpoint (see /docs)")

    monkeypatch.setattr(AsyncClient, "events", no_events)
    with trio.fail_after(30):
        assert await fategen("submit", f"polled {TINY}", "--wait", "--url", stack.url) == 0
    assert " completed: 1 image of 256x256, tiny, " in capsys.readouterr().out


async def test_a_service_that_is_not_there_is_exit_3() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = await process("status", "3f0c2a9e-5b7d-4c1e-9a8f-1d2e3c4b5a69", FATEGEN_URL=url)
    assert result.returncode == 3
    assert result.stderr.decode().startswith(f"fategen: the fategen service at {url} cannot be")
    bad = await process("models", "--url", "localhost:8000")
    assert bad.returncode == 2
    assert bad.stderr == (
        b"fategen: the service's URL must start with http:// or https://, not 'localhost:8000'\n"
    )


def test_the_client_variables_do_not_stop_the_service_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [n for n in os.environ if n.startswith(("FATEGEN_", "COMFYUI_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FATEGEN_URL", "http://gpu.lan:8000")
    monkeypatch.setenv("FATEGEN_KEY", KEY)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["settings"]) == 0
    out = capsys.readouterr().out
    assert "FATEGEN_URL" not in out and KEY not in out
    # A real typo is still refused.
    monkeypatch.setenv("FATEGEN_API_KEY", KEY)
    assert cli.main(["settings"]) == 2
    assert "FATEGEN_API_KEY is not a fategen setting" in capsys.readouterr().err


async def test_serve_starts_with_the_client_variables_set_and_warns_of_the_key(
    tmp_path: Path,
) -> None:
    """``fategen serve`` with FATEGEN_URL / FATEGEN_KEY in its environment starts (it stops at
    once here, on a model configuration that is not there) and says FATEGEN_KEY is no key of
    the service's."""
    env = {
        "FATEGEN_URL": "http://127.0.0.1:1",
        "FATEGEN_KEY": KEY,
        "FATEGEN_PORT": str(free_port()),
        "FATEGEN_DATA_DIR": str(tmp_path / "data"),
        "FATEGEN_OUTPUT_DIR": str(tmp_path / "output"),
        "FATEGEN_MODEL_CONFIG": str(tmp_path / "missing.json"),
    }
    with trio.fail_after(60):
        result = await process("serve", **env)
    stderr = result.stderr.decode()
    assert "is not a fategen setting" not in stderr
    assert "WARNING fategen: FATEGEN_KEY is set, but only the client commands read it" in stderr
    assert str(tmp_path / "missing.json") in stderr and result.returncode == 2
