"""Run schemathesis against a live ``fategen serve --simulate`` (used by ``nox -s schemathesis``).

    python bench/schemathesis_run.py [schemathesis run options...]

Starts the service with its built-in simulator on a free port (data and images in a temporary
folder), waits for ``/health``, runs ``schemathesis run <url>/openapi.json --checks all`` with
the given options, stops the service and exits with schemathesis's status.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wait_healthy(url: str, server: subprocess.Popen[bytes], limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"fategen exited early with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"fategen did not answer {url}/health within {limit:g} s")


def main(argv: list[str]) -> int:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="fategen-st-") as tmp:
        env = {
            **os.environ,
            "FATEGEN_DATA_DIR": str(Path(tmp) / "data"),
            "FATEGEN_OUTPUT_DIR": str(Path(tmp) / "output"),
            "FATEGEN_MODEL_CONFIG": str(ROOT / "config" / "modelConfiguration.json"),
            "FATEGEN_WORKFLOWS_DIR": str(ROOT / "workflows"),
            "FATEGEN_MAX_QUEUE_PER_USER": "100000",
            "FATEGEN_MAX_QUEUE": "100000",
            "LOG_LEVEL": "WARNING",
        }
        command = [sys.executable, "-m", "fategen", "serve", "--simulate", "--port", str(port)]
        command += ["--env-file", str(Path(tmp) / "none.env")]
        server = subprocess.Popen(command, env=env, cwd=tmp)
        try:
            wait_healthy(url, server)
            st = [
                "schemathesis",
                "run",
                f"{url}/openapi.json",
                "--checks",
                "all",
                # The event streams stay open until their job ends: not a request/response.
                "--exclude-path-regex",
                ".*/events$",
                *(argv or ["--max-examples", "100"]),
            ]
            return subprocess.run(st, check=False).returncode
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
