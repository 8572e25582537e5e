"""Chat line -> GenerationRequest: every rule, every message, and two property tests."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fategen.core.modelconfig import ModelConfig, load_model_config, parse_model_config
from fategen.core.prompt import (
    FLAGS,
    MAX_SEED,
    GenerationRequest,
    negative_text,
    parse_request,
    positive_text,
    render_request,
)
from fategen.errors import PromptError

CONFIG_FILE = Path(__file__).resolve().parents[2] / "config" / "modelConfiguration.json"


def _model(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "checkpointName": "x.safetensors",
        "workflow": "sdxl",
        "steps": 20,
        "imageWidth": 1024,
        "imageHeight": 1024,
        "defaultPositivePrompt": "masterpiece, best quality",
        "defaultNegativePrompt": "lowres, worst quality",
    }
    spec.update(overrides)
    return spec


CONFIG: ModelConfig = parse_model_config(
    {
        "DEFAULTS": {
            "width": 1024,
            "height": 1024,
            "count": 1,
            "model": "illustriousXL",
            "maxPixels": 2359296,
        },
        "models": {
            "illustriousXL": _model(),
            "paSanctuary": _model(),
            "lumina2": _model(
                workflow="lumina",
                defaultPositivePrompt="",
                defaultNegativePrompt="",
                systemPrompt="You are an assistant. ",
            ),
            "tiny": _model(imageWidth=512, imageHeight=768),
        },
    }
)


def parse(message: str) -> GenerationRequest:
    return parse_request(message, CONFIG, rng=random.Random(0))


def error(message: str) -> str:
    with pytest.raises(PromptError) as info:
        parse(message)
    text = str(info.value)
    assert "\n" not in text
    return text


# --- what parses, and to what -------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "a red fox",
            {
                "prompt": "a red fox",
                "model": "illustriousXL",
                "width": 1024,
                "height": 1024,
                "count": 1,
                "negative": "",
            },
        ),
        ("  a   red\n\tfox  ", {"prompt": "a red fox"}),
        ("a fox --model lumina2", {"model": "lumina2"}),
        ("a fox -m paSanctuary", {"model": "paSanctuary"}),
        ("a fox --model=tiny", {"model": "tiny", "width": 512, "height": 768}),
        ("a fox -m LUMINA2", {"model": "lumina2"}),
        ("a fox --width 512", {"width": 512, "height": 1024}),
        ("a fox -w 512 -h 768", {"width": 512, "height": 768}),
        ("a fox --width=640 --height=512", {"width": 640, "height": 512}),
        ("a fox -w=640", {"width": 640}),
        ("a fox --Width 640", {"width": 640}),
        ("a fox --no blurry, text", {"negative": "blurry, text", "prompt": "a fox"}),
        ("a fox -n blurry -w 512", {"negative": "blurry", "width": 512}),
        ("a fox --no=blurry text --count 2", {"negative": "blurry text", "count": 2}),
        ("a fox --count 4", {"count": 4}),
        ("a fox -c 1", {"count": 1}),
        ("a fox --seed 0", {"seed": 0}),
        (f"a fox -s {MAX_SEED}", {"seed": MAX_SEED}),
        ("a fox --seed 007", {"seed": 7}),
        # hyphenated words, dashes and negative numbers are prompt text
        (
            "sci-fi half-elf -ish -- -5 --5 — - x-ray",
            {"prompt": "sci-fi half-elf -ish -- -5 --5 — - x-ray"},
        ),
        ("a fox --no sci-fi, -5 fingers", {"negative": "sci-fi, -5 fingers"}),
        # phones turn -- into a dash: a dash before a known long name is that modifier
        ("a fox —width 512 \u2013no blur", {"width": 512, "negative": "blur"}),
        ("a fox —steps 30", {"prompt": "a fox —steps 30"}),
        # --ar keeps the model's pixel count, each side a multiple of 64
        ("a fox --ar 16:9", {"width": 1344, "height": 768}),
        ("a fox --ar 9:16", {"width": 768, "height": 1344}),
        ("a fox --ar 1:1", {"width": 1024, "height": 1024}),
        ("a fox --ar 2.39:1", {"width": 1600, "height": 640}),
        ("a fox --ar 4:3 -m tiny", {"width": 704, "height": 512}),
        # --ar with one side derives the other (multiple of 8)
        ("a fox -w 768 --ar 16:9", {"width": 768, "height": 432}),
        ("a fox --ar 3:2 -h 512", {"width": 768, "height": 512}),
        ("a fox --ar=2:1", {"width": 1472, "height": 704}),
    ],
)
def test_parses(message: str, expected: dict[str, Any]) -> None:
    request = parse(message)
    for name, value in expected.items():
        assert getattr(request, name) == value, name


def test_ar_keeps_pixel_count_roughly() -> None:
    request = parse("a fox --ar 21:9")
    assert request.width % 64 == 0 and request.height % 64 == 0
    assert abs(request.width * request.height - 1024 * 1024) < 0.1 * 1024 * 1024


def test_seed_is_drawn_from_rng_when_absent() -> None:
    first = parse_request("a fox", CONFIG, rng=random.Random(42))
    again = parse_request("a fox", CONFIG, rng=random.Random(42))
    assert first.seed == again.seed == random.Random(42).randrange(2**53)
    other = parse_request("a fox", CONFIG)  # SystemRandom
    assert 0 <= other.seed <= MAX_SEED


def test_given_seed_does_not_touch_rng() -> None:
    rng = random.Random(1)
    state = rng.getstate()
    assert parse_request("a fox --seed 5", CONFIG, rng=rng).seed == 5
    assert rng.getstate() == state


# --- every error message ------------------------------------------------------------------

ALL_FLAGS = "--model/-m, --width/-w, --height/-h, --no/-n, --count/-c, --seed/-s, --ar, --lora"


@pytest.mark.parametrize(
    ("message", "fragments"),
    [
        ("a fox --steps 30", ["unknown modifier '--steps'", f"valid modifiers: {ALL_FLAGS}"]),
        ("a fox -x", ["unknown modifier '-x'", "--model/-m"]),
        ("a fox --modle tiny", ["'--modle'", "did you mean --model?"]),
        ("a fox --sci-fi", ["unknown modifier '--sci-fi'"]),
        ("a fox --no blur --steps=30", ["unknown modifier '--steps'"]),
        (
            "a fox -m ilustriousXL",
            [
                "unknown model 'ilustriousXL'",
                "did you mean illustriousXL?",
                "illustriousXL, lumina2, paSanctuary, tiny",
            ],
        ),
        ("a fox -m zzzz", ["unknown model 'zzzz'; available models: illustriousXL"]),
        ("a fox -w big", ["--width must be a whole number of pixels, got 'big'"]),
        ("a fox -h 512px", ["--height must be a whole number of pixels, got '512px'"]),
        ("a fox -w -512", ["--width must be a whole number", "'-512'"]),
        ("a fox -w 1001", ["--width must be a multiple of 8, got 1001 (try 1000 or 1008)"]),
        ("a fox -w 4", ["multiple of 8", "(try 8)"]),
        ("a fox -w 128", ["--width must be between 256 and 2048 pixels, got 128"]),
        ("a fox -h 4096", ["--height must be between 256 and 2048 pixels, got 4096"]),
        ("a fox -w 2048 -h 2048", ["2048x2048 is 4194304 pixels, over the limit of 2359296"]),
        ("a fox -c 0", ["--count must be 1 to 4, got '0'"]),
        ("a fox -c 5", ["--count must be 1 to 4, got '5'"]),
        ("a fox --count two", ["--count must be 1 to 4, got 'two'"]),
        ("a fox -s -1", [f"--seed must be a whole number from 0 to {MAX_SEED}, got '-1'"]),
        (f"a fox -s {MAX_SEED + 1}", ["--seed must be a whole number"]),
        ("a fox -s 1.5", ["--seed must be a whole number"]),
        ("a fox -s " + "9" * 5000, ["--seed must be a whole number", "…"]),
        ("", ["the prompt is empty"]),
        ("   \n ", ["the prompt is empty"]),
        ("--width 512", ["the prompt is empty; write what to draw before the first modifier"]),
        ("a fox --width", ["--width needs a value, e.g. --width 1024"]),
        ("a fox -w --height 512", ["-w needs a value, e.g. --width 1024"]),
        ("a fox --model", ["--model needs a value, e.g. --model <model id>"]),
        ("a fox --no", ["--no needs a value, e.g. --no blurry, text"]),
        ("a fox --no= -w 512", ["--no needs a value"]),
        ("a fox --ar", ["--ar needs a value"]),
        ("a fox --width=", ["--width needs a value"]),
        ("a fox -w 512 --width 640", ["--width was given twice"]),
        ("a fox --no a --no b", ["--no was given twice"]),
        ("a fox -s 1 -s 1", ["--seed was given twice"]),
        (
            "a fox --width 512 in the snow",
            [
                "unexpected text 'in the snow' after --width 512",
                "the prompt goes before the first modifier",
            ],
        ),
        ("a fox -m tiny please", ["unexpected text 'please' after -m tiny"]),
        ("a fox --ar 16x9", ["--ar must be a ratio such as 16:9 or 2.39:1, got '16x9'"]),
        ("a fox --ar 16:", ["--ar must be a ratio"]),
        ("a fox --ar 123456:1", ["--ar must be a ratio"]),
        ("a fox --ar 0:1", ["--ar sides must be greater than 0"]),
        (
            "a fox --ar 16:9 -w 512 -h 512",
            ["--ar cannot be combined with both --width and --height"],
        ),
        ("a fox --ar 8:1", ["--ar 8:1 gives a width of 2880 pixels, outside 256 to 2048"]),
        ("a fox --ar 1:8", ["--ar 1:8 gives a height of 2880 pixels"]),
        ("a fox -w 2048 --ar 16:1", ["--width 2048 with --ar 16:1 gives a height of 128 pixels"]),
        ("a fox -h 2048 --ar 1:1", ["2048x2048 is 4194304 pixels"]),
        ("a fox\x00", ["the message contains a control character (U+0000)"]),
        ("a \x1b[31mfox", ["control character (U+001B)"]),
        ("a fox\x7f", ["control character (U+007F)"]),
    ],
)
def test_errors(message: str, fragments: list[str]) -> None:
    text = error(message)
    for fragment in fragments:
        assert fragment in text


def test_long_values_are_cut_in_messages() -> None:
    text = error("a fox -m " + "q" * 500)
    assert len(text) < 200


def test_newlines_and_tabs_are_whitespace() -> None:
    request = parse("a fox\r\n--width\t512\x0b--no\x0cblur")
    assert (request.prompt, request.width, request.negative) == ("a fox", 512, "blur")


def test_flags_table() -> None:
    assert [f.long for f in FLAGS] == [
        "--model",
        "--width",
        "--height",
        "--no",
        "--count",
        "--seed",
        "--ar",
        "--lora",
        "--image",
        "--strength",
        "--upscale",
        "--vary",
    ]
    assert [f.short for f in FLAGS] == [
        "m",
        "w",
        "h",
        "n",
        "c",
        "s",
        None,
        None,
        "i",
        None,
        "u",
        "v",
    ]
    assert all(f.help for f in FLAGS)
    assert [f.name for f in FLAGS if f.multiword] == ["no"]
    assert [f.name for f in FLAGS if f.repeatable] == ["lora"]


# --- rendering and the default tags ---------------------------------------------------------


def test_render() -> None:
    request = GenerationRequest("a fox", "blurry, text", "tiny", 512, 768, 2, 7)
    assert render_request(request) == (
        "a fox --model tiny --width 512 --height 768 --count 2 --seed 7 --no blurry, text"
    )
    assert "--no" not in render_request(GenerationRequest("a", "", "tiny", 512, 512, 1, 0))


def test_positive_and_negative_text() -> None:
    spec = CONFIG.model("illustriousXL")
    request = parse("a fox --no blurry")
    assert positive_text(request, spec) == "masterpiece, best quality, a fox"
    assert negative_text(request, spec) == "lowres, worst quality, blurry"
    plain = parse("a fox")
    assert negative_text(plain, spec) == "lowres, worst quality"
    lumina = CONFIG.model("lumina2")
    assert positive_text(plain, lumina) == "a fox"  # no empty part, no system prompt
    assert negative_text(plain, lumina) == ""


# --- the shipped configuration ------------------------------------------------------------


def test_shipped_configuration_parses_requests() -> None:
    config = load_model_config(CONFIG_FILE, templates=frozenset({"sdxl", "lumina"}))
    request = parse_request("a fox --ar 16:9 -m lumina2 -c 4", config, rng=random.Random(0))
    assert (request.model, request.width, request.height, request.count) == (
        "lumina2",
        1344,
        768,
        4,
    )
    tiny = parse_request("a fox -m tiny", config, rng=random.Random(0))
    assert (tiny.width, tiny.height) == (512, 512)
    assert parse_request("a fox", config).model == "illustriousXL"


# --- properties ---------------------------------------------------------------------------

FLAG_WORDS = [
    *(f.long for f in FLAGS),
    *(f"-{f.short}" for f in FLAGS if f.short),
    "--steps",
    "-x",
    "--width=512",
    "-w=",
    "—width",
    "\u2013no",
    "—steps",
    "512",
    "1024",
    "16:9",
    "0",
    "-5",
    "2.39:1",
    "tiny",
    "lumina2",
    "--",
    "-",
    "—",
]
TEXT_WORDS = [
    "sci-fi",
    "half-elf",
    "-ish",
    "--5",
    "x-ray",
    "“quoted”",
    "'single'",
    '"double"',
    "日本語",
    "café,",
    "fox",
    "red,",
    "🦊",
    "—",
    "-",
    "--",
    "-5",
    "a—b",
]


@settings(max_examples=300)
@given(
    st.one_of(
        st.text(),
        st.lists(st.sampled_from(FLAG_WORDS + TEXT_WORDS) | st.text(max_size=6), max_size=12).map(
            " ".join
        ),
    )
)
def test_parse_only_raises_prompt_error(message: str) -> None:
    try:
        request = parse(message)
    except PromptError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert request.prompt
        assert parse(render_request(request)) == request


def _is_text_word(word: str) -> bool:
    return not word.startswith(("-", "\u2014", "\u2013"))


WORD = st.sampled_from(TEXT_WORDS) | st.text(
    st.characters(exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp")), min_size=1, max_size=8
).filter(lambda w: _is_text_word(w) and w.split() == [w])
TEXT = st.lists(WORD, min_size=1, max_size=8).map(" ".join)


@st.composite
def requests(draw: st.DrawFn) -> GenerationRequest:
    limits = CONFIG.defaults
    width = draw(st.integers(limits.min_size // 8, limits.max_size // 8)) * 8
    max_height = min(limits.max_size, limits.max_pixels // width) // 8 * 8
    height = draw(st.integers(limits.min_size // 8, max_height // 8)) * 8
    return GenerationRequest(
        prompt=draw(TEXT),
        negative=draw(st.just("") | TEXT),
        model=draw(st.sampled_from(sorted(CONFIG.models))),
        width=width,
        height=height,
        count=draw(st.integers(1, limits.max_count)),
        seed=draw(st.integers(0, MAX_SEED)),
    )


@settings(max_examples=300)
@given(requests())
def test_render_parse_round_trip(request: GenerationRequest) -> None:
    assert parse_request(render_request(request), CONFIG) == request


def test_random_seeds_fit_a_javascript_number() -> None:
    """Drawn seeds stay below 2^53 (Discord.js reads them exactly); given ones may be larger."""
    seeds = [parse_request("a fox", CONFIG).seed for _ in range(2000)]
    assert all(0 <= s < 2**53 for s in seeds)
    assert max(seeds) > 2**50  # the whole range is used, not a small corner of it
    assert parse_request(f"a fox --seed {MAX_SEED}", CONFIG).seed == MAX_SEED
