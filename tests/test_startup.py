"""Start-up as a newcomer meets it, as real processes: every failure is one sentence on stderr
and a non-zero exit; the service runs from any directory on its shipped configuration; the
seed's configuration layout works; ``fategen init`` gives an operator files to edit."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from conftest import ROOT, free_port, wait_healthy

BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("FATEGEN_", "COMFYUI_"))}


def run(
    args: list[str], cwd: Path, timeout: float = 30, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fategen", *args],
        cwd=cwd,
        env={**BASE_ENV, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_sentence(result: subprocess.CompletedProcess[str]) -> str:
    """The failure's sentence: the one line of stderr that is not a log line (the service
    may have logged its progress before it failed), and no traceback."""
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.strip().splitlines() if not line[:4].isdigit()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fategen: "), lines[0]
    assert "Traceback" not in result.stderr and "Exceptions from Trio" not in result.stderr
    assert " ERROR " not in result.stderr, result.stderr
    return lines[0]


def files_env(tmp_path: Path) -> dict[str, str]:
    return {
        "FATEGEN_DATA_DIR": str(tmp_path / "data"),
        "FATEGEN_OUTPUT_DIR": str(tmp_path / "output"),
        "FATEGEN_PORT": str(free_port()),
    }


def test_missing_workflows_folder(tmp_path: Path) -> None:
    line = one_sentence(
        run(
            ["serve"], tmp_path, FATEGEN_WORKFLOWS_DIR=str(tmp_path / "nope"), **files_env(tmp_path)
        )
    )
    assert line == f"fategen: the workflows folder {tmp_path / 'nope'} does not exist"


@pytest.mark.parametrize("content", [None, "{ not json", '{"DEFAULTS": {}}'])
def test_bad_or_missing_model_configuration(tmp_path: Path, content: str | None) -> None:
    config = tmp_path / "models.json"
    if content is not None:
        config.write_text(content)
    line = one_sentence(
        run(["serve"], tmp_path, FATEGEN_MODEL_CONFIG=str(config), **files_env(tmp_path))
    )
    assert "model configuration" in line


def test_port_already_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = files_env(tmp_path) | {"FATEGEN_PORT": str(port)}
        line = one_sentence(run(["serve", "--simulate"], tmp_path, **env))
    assert line.startswith(f"fategen: cannot listen on 127.0.0.1:{port}: "), line
    assert "another program uses that port" in line


def test_unresolvable_comfyui_host(tmp_path: Path) -> None:
    line = one_sentence(
        run(["serve"], tmp_path, COMFYUI_ADDRESS="no-such-host.invalid", **files_env(tmp_path))
    )
    assert line.startswith(
        "fategen: the ComfyUI host 'no-such-host.invalid' (COMFYUI_ADDRESS) does not resolve"
    ), line


@pytest.mark.parametrize("variable", ["FATEGEN_DATA_DIR", "FATEGEN_OUTPUT_DIR"])
def test_unusable_data_or_output_folder(tmp_path: Path, variable: str) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    env = files_env(tmp_path) | {variable: str(a_file / "inside")}
    line = one_sentence(run(["serve"], tmp_path, **env))
    assert variable in line or "output folder" in line, line
    assert "Not a directory" in line


def test_a_typo_in_a_variable_stops_start_up(tmp_path: Path) -> None:
    env = files_env(tmp_path) | {"FATEGEN_API_KEY": "secret"}
    line = one_sentence(run(["serve"], tmp_path, **env))
    assert "did you mean FATEGEN_API_KEYS?" in line
    assert "secret" not in line


def test_a_named_env_file_that_does_not_exist(tmp_path: Path) -> None:
    line = one_sentence(run(["serve", "--env-file", "prod.env"], tmp_path, **files_env(tmp_path)))
    assert line == "fategen: the settings file prod.env does not exist"


def test_version_and_settings(tmp_path: Path) -> None:
    version = run(["--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("fategen 0.")
    keys = "key-one-secret-0123456789,key-two-secret-0123456789"
    shown = run(["settings"], tmp_path, FATEGEN_API_KEYS=keys)
    assert shown.returncode == 0, shown.stderr
    assert "FATEGEN_API_KEYS=<2 key(s)>    # environment" in shown.stdout
    assert "FATEGEN_PORT=8000    # default" in shown.stdout
    assert "secret" not in shown.stdout


@contextlib.asynccontextmanager
async def serving(
    cwd: Path, env: dict[str, str], *extra: str, stderr: int = subprocess.DEVNULL
) -> AsyncIterator[tuple[trio.Process, httpx.AsyncClient]]:
    """``fategen serve --simulate`` as a process, healthy, and a client for it; stopped
    (SIGTERM, then SIGKILL) on the way out."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "fategen", "serve", "--simulate", *extra],
        cwd=str(cwd),
        env={**BASE_ENV, **env},
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    try:
        url = f"http://127.0.0.1:{env['FATEGEN_PORT']}"
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            with trio.fail_after(30):
                await wait_healthy(client)
            yield proc, client
    finally:
        proc.terminate()
        with trio.move_on_after(15):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()


async def _serve_one_job(cwd: Path, env: dict[str, str], message: str) -> dict[str, object]:
    async with serving(cwd, env) as (_, c):
        with trio.fail_after(30):
            r = await c.post("/request", json={"message": message, "nick": "newcomer"})
            assert r.status_code == 200, r.text
            done = await c.get(f"/wait/{r.json()['job_id']}", params={"timeout": 20})
            models = (await c.get("/models")).json()
    body: dict[str, object] = done.json()
    body["models"] = [m["id"] for m in models["models"]]
    return body


async def test_serve_works_from_an_empty_directory(tmp_path: Path) -> None:
    """No config/ or workflows/ here: the copies installed with fategen are used."""
    done = await _serve_one_job(tmp_path, files_env(tmp_path), "a quiet lake -m tiny")
    assert done["status"] == "completed", done


async def test_the_seed_layout_of_the_model_configuration(tmp_path: Path) -> None:
    shipped = json.loads((ROOT / "config" / "modelConfiguration.json").read_text())
    seed = {"DEFAULTS": shipped["DEFAULTS"], **shipped["models"]}
    config = tmp_path / "modelConfiguration.json"
    config.write_text(json.dumps(seed, indent=2))
    env = files_env(tmp_path) | {"FATEGEN_MODEL_CONFIG": str(config)}
    done = await _serve_one_job(tmp_path, env, "an old map -m tiny -c 2")
    assert done["status"] == "completed", done
    assert set(done["models"]) == set(shipped["models"])  # type: ignore[arg-type]


async def test_init_writes_files_to_edit_and_serve_uses_them(tmp_path: Path) -> None:
    target = tmp_path / "site"
    result = run(["init", str(target)], tmp_path)
    assert result.returncode == 0, result.stderr
    config = target / "config" / "modelConfiguration.json"
    assert config.is_file() and (target / "workflows" / "sdxl.json").is_file()
    env_text = (target / ".env").read_text()
    assert "# FATEGEN_API_KEYS=" in env_text and "# COMFYUI_PORT=8188" in env_text
    data = json.loads(config.read_text())
    data["models"]["mine"] = dict(data["models"]["tiny"], description="my own")
    config.write_text(json.dumps(data))
    again = run(["init", str(target)], tmp_path)
    assert again.returncode == 0 and "kept" in again.stderr
    assert "mine" in json.loads(config.read_text())["models"], "init keeps edited files"
    done = await _serve_one_job(target, files_env(tmp_path), "a red kite -m mine")
    assert done["status"] == "completed", done
    assert "mine" in done["models"]  # type: ignore[operator]


async def test_the_wheel_carries_the_configuration_and_serves_with_it(tmp_path: Path) -> None:
    """Built as a user installs it: the wheel holds config/ and workflows/ as package data,
    and fategen run from that wheel (not this checkout) in an empty directory uses them."""
    import zipfile

    wheels = tmp_path / "wheels"
    await trio.run_process(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        capture_stdout=True,
        capture_stderr=True,
    )
    (wheel,) = wheels.glob("fategen-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "fategen/_data/config/modelConfiguration.json" in names
        assert {"fategen/_data/workflows/sdxl.json", "fategen/_data/workflows/lumina.json"} <= names
        archive.extractall(site)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = files_env(tmp_path) | {"PYTHONPATH": str(site)}
    done = await _serve_one_job(empty, env, "a paper boat -m tiny")
    assert done["status"] == "completed", done
    probe = await trio.run_process(
        [sys.executable, "-c", "import fategen.settings as s; print(s.shipped('config'))"],
        env={**BASE_ENV, "PYTHONPATH": str(site)},
        capture_stdout=True,
    )
    assert probe.stdout.decode().strip() == str(site / "fategen" / "_data" / "config")


async def test_a_slow_simulator_lets_a_person_watch_progress_and_cancel(tmp_path: Path) -> None:
    env = files_env(tmp_path)
    slow = ("--simulate-step-seconds", "0.3")
    async with serving(tmp_path, env, *slow, stderr=subprocess.PIPE) as (proc, c):
        with trio.fail_after(30):
            r = await c.post("/request", json={"message": "slow -m tiny", "nick": "me"})
            job_id = r.json()["job_id"]
            seen = []
            while not seen or seen[-1] < 2:
                job = (await c.get(f"/job/{job_id}")).json()
                if job["status"] == "processing" and job["progress"]["step"]:
                    seen.append(job["progress"]["step"])
                await trio.sleep(0.05)
            cancelled = await c.delete(f"/job/{job_id}", params={"nick": "me"})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert seen[0] >= 1 and seen[-1] < 4  # caught mid-way, step by step
    assert proc.stderr is not None
    log = (await proc.stderr.receive_some(1 << 20)).decode()
    assert log.count(f"Running on http://127.0.0.1:{env['FATEGEN_PORT']}") == 1, log


async def test_ctrl_c_stops_the_simulator_quietly(tmp_path: Path) -> None:
    """Ctrl+C right after start-up too: it once landed inside hypercorn's own task, which
    swallowed it and left the simulator running without its HTTP server (8 in 20 tries)."""
    import signal

    for _ in range(8):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "fategen.simulator", "--port", str(free_port())],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        output = b""
        with trio.fail_after(20):
            while b"Running on" not in output:
                output += await proc.stdout.receive_some(65536)
            proc.send_signal(signal.SIGINT)
            await proc.wait()
            async for chunk in proc.stdout:
                output += chunk
        assert proc.returncode == 0
        assert b"Traceback" not in output and b"KeyboardInterrupt" not in output


def test_the_start_up_log_says_how_it_is_set_up(caplog: pytest.LogCaptureFixture) -> None:
    from fategen.service import log_setup
    from fategen.settings import Settings

    caplog.set_level(logging.INFO, logger="fategen")
    key = "ircbot:irc-token-0123456789abcdef"
    log_setup(Settings.from_env({"FATEGEN_API_KEYS": key}))
    text = caplog.text
    assert "authentication is on: 1 user key(s), 0 admin key(s)" in text
    assert "irc-token" not in text
    assert "jobs in " in text and "images in " in text
    caplog.clear()
    log_setup(Settings.from_env({}))
    assert "authentication is off" in caplog.text and "WARNING" not in caplog.text
    caplog.clear()
    log_setup(Settings.from_env({"FATEGEN_HOST": "0.0.0.0"}))  # only read, nothing binds
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "with no API keys" in warnings[0].getMessage()
