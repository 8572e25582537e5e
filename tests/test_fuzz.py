"""Hypothesis fuzzing of the prompt parser and of ``POST /request`` bodies.

The normal suite runs ``FUZZ_EXAMPLES`` examples per test (default 200); ``nox -s fuzz`` runs
many more.
"""

from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path
from typing import Any

import httpx
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, make_settings
from fategen.core.modelconfig import load_model_config
from fategen.core.prompt import MAX_SEED, parse_request, positive_text
from fategen.core.workflow import build_workflow, load_templates
from fategen.errors import PromptError, WorkflowError
from fategen.service import Running, run_service

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

TEMPLATES = load_templates(ROOT / "workflows")
CONFIG = load_model_config(
    ROOT / "config" / "modelConfiguration.json", templates=frozenset(TEMPLATES)
)

WORDS = [
    *("-m", "--model", "-w", "--width", "-h", "--height", "-n", "--no", "-c", "--count"),
    *(
        "-s",
        "--seed",
        "--ar",
        "\u2014model",
        "\u2013no",
        "--steps",
        "-x",
        "--",
        "-",
        "-5",
        "sci-fi",
    ),
    *("tiny", "TINY", "illustriousXL", "lumina2", "paSanctuary", "16:9", "1:0", "2.39:1"),
    *("256", "512", "1024", "2048", "99999999999999999999", "0", "-1", "4", "1e9", "nan"),
    *("--width=512", "-c=2", "--ar=3:2", "--seed=18446744073709551615", "=", '"', "\\"),
]
word = st.one_of(
    st.sampled_from(WORDS),
    st.text(min_size=1, max_size=12),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
)
message = st.one_of(
    st.lists(word, max_size=14).map(" ".join),
    st.text(max_size=200),
)


@FUZZ
@given(text=message)
def test_prompt_parser_answers_a_request_or_one_sentence(text: str) -> None:
    try:
        request = parse_request(text, CONFIG, rng=random.Random(1))
    except PromptError as exc:
        sentence = str(exc)
        assert sentence and "\n" not in sentence
        return
    d = CONFIG.defaults
    assert request.model in CONFIG.models
    assert request.prompt.strip()
    assert d.min_size <= request.width <= d.max_size and request.width % 8 == 0
    assert d.min_size <= request.height <= d.max_size and request.height % 8 == 0
    assert request.width * request.height <= d.max_pixels
    assert 1 <= request.count <= d.max_count
    assert 0 <= request.seed <= MAX_SEED
    spec = CONFIG.models[request.model]
    try:
        workflow = build_workflow(TEMPLATES[spec.workflow], spec, request, filename_prefix="f")
    except WorkflowError as exc:
        assert "\n" not in str(exc)
        return
    # The user's text reaches the workflow as it was parsed, and the workflow is valid JSON.
    encoded = json.dumps(workflow, ensure_ascii=False)
    assert json.loads(encoded) == workflow
    texts = [n["inputs"].get("text", "") for n in workflow.values() if "inputs" in n]
    assert any(positive_text(request, spec) in t for t in texts)


json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=40),
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
text_or_any = st.one_of(message, json_value, st.text(max_size=70))
body = st.one_of(
    json_value,
    st.fixed_dictionaries({"message": text_or_any, "nick": text_or_any}),
    st.fixed_dictionaries(
        {"message": message, "nick": st.text(max_size=70)},
        optional={"extra": json_value},
    ),
)


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_post_request_never_answers_5xx(tmp_path: Path) -> None:
    # ComfyUI is down (nothing listens on its port): accepted jobs simply stay queued.
    service_settings = make_settings(
        tmp_path,
        COMFYUI_PORT=str(_unused_port()),
        FATEGEN_MAX_QUEUE="100000",
        FATEGEN_MAX_QUEUE_PER_USER="100000",
    )
    shutdown = trio.Event()
    seen: dict[int, int] = {}
    with trio.fail_after(120 + EXAMPLES * 0.5):
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(run_service, service_settings, shutdown)
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:

                async def post(content: bytes) -> httpx.Response:
                    return await client.post(
                        "/request", content=content, headers={"content-type": "application/json"}
                    )

                @FUZZ
                @given(value=body)
                def check(value: Any) -> None:
                    # ensure_ascii: lone surrogates travel as \ud800 escapes, as a client may.
                    content = json.dumps(value).encode()
                    r = trio.from_thread.run(post, content)
                    seen[r.status_code] = seen.get(r.status_code, 0) + 1
                    assert r.status_code < 500, (value, r.text)
                    answer = r.json()
                    if r.status_code == 200:
                        assert answer["status"] == "queued"
                    else:
                        assert r.status_code in (400, 413, 429), r.status_code
                        assert isinstance(answer["error"], str) and answer["error"]
                        assert "\n" not in answer["error"]

                await trio.to_thread.run_sync(check)
            shutdown.set()
    print("POST /request statuses:", dict(sorted(seen.items())))
    assert seen.get(400, 0) > 0
