"""Turn a chat line such as ``a fox in snow --ar 16:9 --no blurry, text`` into a request.

Pure: no I/O. The grammar, exactly:

* The message may not contain control characters other than tab, newline, carriage return,
  vertical tab and form feed (those count as whitespace); anything else in U+0000-U+001F or
  U+007F-U+009F is refused.
* The message is split on any whitespace; text is re-joined with single spaces, so the prompt
  and the negative are normalised (runs of whitespace and newlines become one space).
* A token is a *modifier* when it is one of the `FLAGS`, spelled ``--name``, ``-x`` (short
  form), ``--name=value`` or ``-x=value``. Names are matched case-insensitively. Phones turn
  ``--`` into a dash, so an em or en dash (U+2014, U+2013) followed by a known long name
  is that modifier too; with any other name it stays ordinary text.
* A token is *flag-like* when it is ``--`` followed by an ASCII letter and then letters,
  digits or hyphens (``--steps``, ``--sci-fi``), or ``-`` followed by exactly one ASCII letter
  (``-x``), optionally with ``=value``. A flag-like token that is not a modifier is an error
  listing the valid modifiers. Everything else is text: ``sci-fi``, ``-ish``, ``--``, ``-``,
  ``-5``, ``--5``, ``—``.
* Everything before the first modifier is the prompt; it must not be empty.
* ``--no`` takes every word up to the next modifier (``--no blurry, text``). Every other
  modifier takes exactly one word; more words before the next modifier are an error (the
  prompt goes first, and silently moving words around would surprise).
* Each modifier may be given once (``-w`` and ``--width`` are the same modifier).
* Sizes: without ``--ar``, a side the user does not give is the model's own
  ``imageWidth``/``imageHeight``. ``--ar W:H`` alone keeps the model's pixel count and rounds
  each side to a multiple of 64; ``--ar`` with one of ``--width``/``--height`` derives the
  other side from the ratio, rounded to a multiple of 8; ``--ar`` with both is an error.
* A model id matches exactly, or else case-insensitively; the request carries the configured
  spelling. When no seed is given one is drawn from ``rng`` and recorded on the request.
* LoRAs: ``<lora:NAME:WEIGHT>`` tags anywhere (cut out of the text before it is split) and
  ``--lora NAME[:WEIGHT]``, the one modifier that may be repeated; see `fategen.core.loras`
  for their grammar. A LoRA the model's allow-list refuses is an error here already.
* An input image: ``--image URL`` (http or https), or one sent beside the message (`attached`);
  ``--strength S`` (more than 0, at most 1: ComfyUI's denoise; default
  ``DEFAULTS.img2imgStrength``) says how much it changes. Without a size modifier the result
  keeps the image's aspect ratio at the model's pixel count (sides multiples of 64).
* Follow-ups: ``--upscale JOB_ID:N`` and ``--vary JOB_ID:N`` (N from 1; just ``JOB_ID`` for a
  job of one image) start from image N of an earlier job, whose request the caller passes as
  `base`: the prompt may then be empty, and the prompt, negative, model, LoRAs, size and count
  come from it unless given. ``--vary`` is img2img from that image at
  ``DEFAULTS.varyStrength`` with a new seed; ``--upscale`` makes one image
  ``DEFAULTS.upscaleFactor`` times larger (or ``-w``/``-h``, the other side keeping the
  image's ratio) with the earlier seed, kept within ``DEFAULTS.maxUpscalePixels``.
"""

from __future__ import annotations

import difflib
import math
import random
import re
from fractions import Fraction

import attrs

from fategen.core.loras import Loras, cut_tags, lora_refusal, parse_loras
from fategen.core.modelconfig import UPSCALE_MODEL_WORKFLOW, ModelConfig, ModelSpec
from fategen.errors import PromptError

MAX_SEED = 2**64 - 1
#: Seeds fategen draws stay below 2^53, so a JavaScript bot (Discord.js) reads them exactly
#: from JSON; a user may still give any seed up to `MAX_SEED`.
MAX_RANDOM_SEED = 2**53 - 1


#: The kinds of job a request is: drawn from text, started from an image, an upscale.
KINDS = ("txt2img", "img2img", "upscale")


@attrs.frozen
class ImageInput:
    """The image a job starts from."""

    #: Where it came from: an ``http(s)://`` URL, ``upload`` (sent with the request), or
    #: ``job:<id>:<n>`` (image n of an earlier job, for ``--vary`` and ``--upscale``).
    source: str
    #: How much the sampler changes it: ComfyUI's denoise, more than 0 and at most 1.
    strength: float
    #: The SHA-256 of an upload as it was sent (an Idempotency-Key replay must send the
    #: same); '' otherwise.
    digest: str = ""

    @property
    def earlier(self) -> tuple[str, int] | None:
        """``(job id, image number)`` of a follow-up's image, else None."""
        kind, _, rest = self.source.partition(":")
        if kind != "job":
            return None
        job_id, _, n = rest.rpartition(":")
        return job_id, int(n)


@attrs.frozen
class FollowUp:
    """A message's reference to an earlier job: ``--upscale JOB_ID:N`` or ``--vary JOB_ID:N``."""

    kind: str  # "upscale" or "vary"
    job_id: str
    #: The image number the user gave (from 1); None when they gave just the job id.
    index: int | None


@attrs.frozen
class GenerationRequest:
    """What one chat line asks for, fully resolved (nothing left to default)."""

    #: The user's own text, whitespace-normalised; the model's default tags are not included.
    prompt: str
    #: The user's negative text ('' if none).
    negative: str
    #: A model id from the configuration.
    model: str
    width: int
    height: int
    count: int
    seed: int
    #: ``(LoRA file name, weight)`` pairs, chained in this order after the checkpoint.
    loras: Loras = ()
    #: The image it starts from (None: it draws from text alone).
    image: ImageInput | None = None
    #: An upscale of ``image`` to ``width`` x ``height`` (``--upscale``).
    upscale: bool = False

    @property
    def kind(self) -> str:
        """``txt2img``, ``img2img`` or ``upscale`` (which workflow variant runs it)."""
        if self.upscale:
            return "upscale"
        return "txt2img" if self.image is None else "img2img"


@attrs.frozen
class Flag:
    """One modifier a user can put after the prompt."""

    name: str
    short: str | None
    metavar: str
    help: str
    #: A value to show in "needs a value" messages ('' means: use the default model id).
    example: str
    #: True for ``--no``: the value runs to the next modifier.
    multiword: bool = False
    #: True for ``--lora``: may be given more than once.
    repeatable: bool = False

    @property
    def long(self) -> str:
        return f"--{self.name}"

    @property
    def spelling(self) -> str:
        """``--width/-w``: how error messages and help list the modifier."""
        return f"{self.long}/-{self.short}" if self.short else self.long


FLAGS: tuple[Flag, ...] = (
    Flag("model", "m", "MODEL", "model id from the configuration", ""),
    Flag("width", "w", "PIXELS", "width in pixels (a multiple of 8)", "1024"),
    Flag("height", "h", "PIXELS", "height in pixels (a multiple of 8)", "1024"),
    Flag("no", "n", "TEXT", "negative prompt, up to the next modifier", "blurry, text", True),
    Flag("count", "c", "N", "number of images", "2"),
    Flag("seed", "s", "SEED", "fixed seed, for repeatable images", "42"),
    Flag("ar", None, "W:H", "aspect ratio, keeping the model's pixel count", "16:9"),
    Flag(
        "lora",
        None,
        "NAME[:WEIGHT]",
        "a LoRA and its weight (default 1), repeatable; or <lora:NAME:WEIGHT> in the prompt",
        "detail-tweaker:0.8",
        repeatable=True,
    ),
    Flag("image", "i", "URL", "start from this image (an http or https URL)", "https://…/cat.png"),
    Flag("strength", None, "0..1", "how much the input image changes (ComfyUI's denoise)", "0.6"),
    Flag("upscale", "u", "JOB:N", "upscale image N of an earlier job", "<job id>:2"),
    Flag("vary", "v", "JOB:N", "more like image N of an earlier job", "<job id>:2"),
)

_LONG = {flag.name: flag for flag in FLAGS}
_SHORT = {flag.short: flag for flag in FLAGS if flag.short}
_VALID = ", ".join(flag.spelling for flag in FLAGS)

_LONG_RE = re.compile(r"--([A-Za-z][A-Za-z0-9-]*)(?:=(.*))?")
_SHORT_RE = re.compile(r"-([A-Za-z])(?:=(.*))?")
_DASH_RE = re.compile(r"[\u2013\u2014]([A-Za-z][A-Za-z0-9-]*)(?:=(.*))?")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
_DIGITS_RE = re.compile(r"[0-9]+")
_RATIO_RE = re.compile(r"([0-9]{1,5}(?:\.[0-9]{1,4})?):([0-9]{1,5}(?:\.[0-9]{1,4})?)")
_STRENGTH_RE = re.compile(r"(?:0?\.[0-9]{1,6}|[01](?:\.[0-9]{0,6})?)")
_FOLLOW_RE = re.compile(
    r"([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})(?::([0-9]{1,3}))?"
)
#: The largest side of an upscale (ComfyUI's MAX_RESOLUTION is 16384).
MAX_UPSCALE_SIDE = 8192

_SYSTEM_RANDOM = random.SystemRandom()


@attrs.frozen
class _Modifier:
    flag: Flag
    #: How the user spelled the flag (``-w``, ``--Width``), for messages.
    spelled: str
    #: The text after ``=``, or None.
    inline: str | None


def _show(text: str, limit: int = 40) -> str:
    """Quote user text for a one-line message, cut to `limit` characters."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"'{text}'"


def _classify(token: str) -> _Modifier | None:
    """The modifier `token` is, None for prompt text; PromptError for an unknown flag."""
    if match := _LONG_RE.fullmatch(token):
        flag = _LONG.get(match[1].lower())
    elif match := _SHORT_RE.fullmatch(token):
        flag = _SHORT.get(match[1].lower())
    elif match := _DASH_RE.fullmatch(token):
        flag = _LONG.get(match[1].lower())
        if flag is None:
            return None  # "—steps" after a dash is just text
    else:
        return None
    spelled = token.partition("=")[0]
    if flag is None:
        close = difflib.get_close_matches(
            spelled.lstrip("-").lower(), [f.name for f in FLAGS], n=1, cutoff=0.6
        )
        hint = f" (did you mean --{close[0]}?)" if close and len(spelled) > 2 else ""
        raise PromptError(f"unknown modifier {_show(spelled)}{hint}; valid modifiers: {_VALID}")
    return _Modifier(flag, spelled, match[2])


def _split(
    message: str,
) -> tuple[str, dict[str, tuple[_Modifier, str]], list[str], list[str]]:
    """Split a message into its prompt, ``{flag name: (modifier, raw value)}``, the texts of
    its LoRA tags and the values of its ``--lora`` modifiers."""
    if bad := _CONTROL_RE.search(message):
        raise PromptError(
            f"the message contains a control character (U+{ord(bad[0]):04X}); remove it"
        )
    message, tags = cut_tags(message)
    repeated: list[str] = []
    tokens = message.split()
    kinds = [_classify(token) for token in tokens]
    i = 0
    while i < len(tokens) and kinds[i] is None:
        i += 1
    prompt = " ".join(tokens[:i])
    values: dict[str, tuple[_Modifier, str]] = {}
    while i < len(tokens):
        modifier = kinds[i]
        assert modifier is not None
        flag = modifier.flag
        i += 1
        start = i
        while i < len(tokens) and kinds[i] is None:
            i += 1
        words = tokens[start:i]
        if modifier.inline:
            words = [modifier.inline, *words]
        if flag.name in values and not flag.repeatable:
            raise PromptError(f"{flag.long} was given twice; give each modifier once")
        if not words:
            example = flag.example
            raise PromptError(
                f"{modifier.spelled} needs a value, e.g. {flag.long} {example or '<model id>'}"
            )
        if len(words) > 1 and not flag.multiword:
            raise PromptError(
                f"unexpected text {_show(' '.join(words[1:]))} after {modifier.spelled} "
                f"{_show(words[0])[1:-1]}; the prompt goes before the first modifier"
            )
        values[flag.name] = (modifier, " ".join(words))
        if flag.repeatable:
            repeated.append(words[0])
    return prompt, values, tags, repeated


def _whole(raw: str) -> int | None:
    """`raw` as a non-negative integer (ASCII digits only), None if it is not one."""
    if not _DIGITS_RE.fullmatch(raw):
        return None
    digits = raw.lstrip("0") or "0"
    return int(digits) if len(digits) <= 40 else 10**40  # huge: just "too big"


def _resolve_model(raw: str, config: ModelConfig) -> str:
    if raw in config.models:
        return raw
    by_lower: dict[str, list[str]] = {}
    for model_id in config.models:
        by_lower.setdefault(model_id.lower(), []).append(model_id)
    same = by_lower.get(raw.lower(), [])
    if len(same) == 1:
        return same[0]
    close = difflib.get_close_matches(raw.lower(), list(by_lower), n=3, cutoff=0.5)
    suggestions = [model_id for key in close for model_id in by_lower[key]]
    ids = sorted(config.models)
    listed = ", ".join(ids[:12]) + (", …" if len(ids) > 12 else "")
    if suggestions:
        raise PromptError(
            f"unknown model {_show(raw)}; did you mean {' or '.join(suggestions)}? "
            f"Available models: {listed}"
        )
    raise PromptError(f"unknown model {_show(raw)}; available models: {listed}")


def _side(name: str, raw: str, config: ModelConfig) -> int:
    """Validate a width/height the user typed."""
    limits = config.defaults
    value = _whole(raw)
    if value is None:
        raise PromptError(f"--{name} must be a whole number of pixels, got {_show(raw)}")
    if value % 8:
        low = value - value % 8
        nearest = " or ".join(str(n) for n in sorted({max(low, 8), low + 8}))
        raise PromptError(f"--{name} must be a multiple of 8, got {value} (try {nearest})")
    if not limits.min_size <= value <= limits.max_size:
        raise PromptError(
            f"--{name} must be between {limits.min_size} and {limits.max_size} pixels, got {value}"
        )
    return value


def _check_derived(name: str, value: int, source: str, config: ModelConfig) -> None:
    limits = config.defaults
    if not limits.min_size <= value <= limits.max_size:
        raise PromptError(
            f"{source} gives a {name} of {value} pixels, outside {limits.min_size} to "
            f"{limits.max_size}; pick a less extreme ratio or give the sizes"
        )


def _ratio(raw: str) -> Fraction:
    match = _RATIO_RE.fullmatch(raw)
    if not match:
        raise PromptError(f"--ar must be a ratio such as 16:9 or 2.39:1, got {_show(raw)}")
    across, down = Fraction(match[1]), Fraction(match[2])
    if not across or not down:
        raise PromptError(f"--ar sides must be greater than 0, got {_show(raw)}")
    return across / down


def _round_to(value: float | Fraction, step: int) -> int:
    return max(step, int(value / step + Fraction(1, 2)) * step)


def _size(
    values: dict[str, tuple[_Modifier, str]],
    default: tuple[int, int],
    config: ModelConfig,
    *,
    ratio_of: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """The request's size: from ``-w``/``-h``/``--ar``, a side not given from `default` (whose
    pixel count ``--ar`` keeps); with `ratio_of` (an input image's size) and no size modifier,
    that image's ratio at `default`'s pixel count."""
    width = _side("width", values["width"][1], config) if "width" in values else None
    height = _side("height", values["height"][1], config) if "height" in values else None
    if "ar" in values:
        raw = values["ar"][1]
        ratio = _ratio(raw)
        if width is not None and height is not None:
            raise PromptError(
                "--ar cannot be combined with both --width and --height; drop one of them"
            )
        if width is not None or height is not None:
            width, height = _other_side(width, height, ratio, f"--ar {raw}", config)
        else:
            pixels = default[0] * default[1]
            width = _round_to(math.sqrt(pixels * ratio), 64)
            height = _round_to(math.sqrt(pixels / ratio), 64)
            _check_derived("width", width, f"--ar {raw}", config)
            _check_derived("height", height, f"--ar {raw}", config)
    elif ratio_of is not None and width is None and height is None:
        width, height = _fit(ratio_of, default[0] * default[1], config)
    elif ratio_of is not None and (width is None) != (height is None):
        # One side given: the other keeps the image's ratio.
        ratio = Fraction(ratio_of[0], ratio_of[1])
        width, height = _other_side(width, height, ratio, "this image", config)
    width = default[0] if width is None else width
    height = default[1] if height is None else height
    limit = config.defaults.max_pixels
    if width * height > limit:
        side = math.isqrt(limit) // 8 * 8
        raise PromptError(
            f"{width}x{height} is {width * height} pixels, over the limit of {limit} "
            f"(about {side}x{side}); make the image smaller"
        )
    return width, height


def _other_side(
    width: int | None, height: int | None, ratio: Fraction, source: str, config: ModelConfig
) -> tuple[int, int]:
    """The side not given, from the one given and `ratio` (rounded to a multiple of 8)."""
    if width is not None:
        height = _round_to(width / ratio, 8)
        _check_derived("height", height, f"--width {width} with {source}", config)
        return width, height
    assert height is not None
    width = _round_to(height * ratio, 8)
    _check_derived("width", width, f"--height {height} with {source}", config)
    return width, height


def _fit(image: tuple[int, int], pixels: int, config: ModelConfig) -> tuple[int, int]:
    """An input image's aspect ratio at ``pixels`` (at most ``maxPixels``), sides multiples
    of 64 within ``minSize``..``maxSize`` (a very long or tall image is cropped a little
    more: the sides are clamped); if rounding passes ``maxPixels``, the longer side shrinks
    (to a multiple of 8), never below ``minSize`` (``minSize`` squared fits, as checked)."""
    limits = config.defaults
    pixels = min(pixels, limits.max_pixels)
    ratio = Fraction(image[0], image[1])
    low, high = -(-limits.min_size // 8) * 8, limits.max_size // 8 * 8
    width = min(high, max(low, _round_to(math.sqrt(pixels * ratio), 64)))
    height = min(high, max(low, _round_to(math.sqrt(pixels / ratio), 64)))
    if width * height > limits.max_pixels:
        if width >= height:
            width = max(low, limits.max_pixels // height // 8 * 8)
        else:
            height = max(low, limits.max_pixels // width // 8 * 8)
    return width, height


def _strength(values: dict[str, tuple[_Modifier, str]]) -> float | None:
    if "strength" not in values:
        return None
    raw = values["strength"][1]
    if not _STRENGTH_RE.fullmatch(raw) or not 0 < float(raw) <= 1:
        raise PromptError(
            f"--strength must be a number more than 0 and at most 1 (how much the image "
            f"changes), got {_show(raw)}"
        )
    return float(raw)


def _follow_up(values: dict[str, tuple[_Modifier, str]]) -> FollowUp | None:
    given = [name for name in ("upscale", "vary") if name in values]
    if not given:
        return None
    if len(given) > 1:
        raise PromptError("give either --upscale or --vary, not both")
    name = given[0]
    raw = values[name][1]
    match = _FOLLOW_RE.fullmatch(raw)
    if not match:
        raise PromptError(
            f"--{name} needs an earlier job's id and the image's number, e.g. "
            f"--{name} 3f0c2a9e-5b7d-4c1e-9a8f-1d2e3c4b5a69:2; got {_show(raw)}"
        )
    index = None if match[2] is None else int(match[2])
    if index == 0:
        raise PromptError(f"--{name}: images are numbered from 1, got {_show(raw)}")
    return FollowUp(name, match[1].lower(), index)


def follow_up_of(message: str) -> FollowUp | None:
    """The earlier job a message follows up on (``--upscale``/``--vary``), or None; the caller
    looks it up and passes its request to `parse_request` as ``base``.

    Raises:
        PromptError: the message does not parse, or names the earlier job wrongly.
    """
    return _follow_up(_split(message)[1])


def _upscale_size(
    values: dict[str, tuple[_Modifier, str]], source: tuple[int, int], config: ModelConfig
) -> tuple[int, int]:
    """An upscale's size: ``upscaleFactor`` times the image's, or ``-w``/``-h`` (a side not
    given keeps the image's ratio); the factor's size is shrunk to fit ``maxUpscalePixels``,
    a size the user gives must fit it."""
    defaults = config.defaults
    limit = defaults.max_upscale_pixels
    if "ar" in values:
        raise PromptError("--ar cannot be used with --upscale (it keeps the image's ratio)")
    sides: dict[str, int] = {}
    for name in ("width", "height"):
        if name in values:
            raw = values[name][1]
            value = _whole(raw)
            if value is None or value % 8 or not 8 <= value <= MAX_UPSCALE_SIDE:
                raise PromptError(
                    f"--{name} of an upscale must be a multiple of 8 up to "
                    f"{MAX_UPSCALE_SIDE}, got {_show(raw)}"
                )
            sides[name] = value
    ratio = Fraction(source[0], source[1])
    if not sides:
        factor = defaults.upscale_factor
        width, height = source[0] * factor, source[1] * factor
        if width * height > limit:  # as large as allowed, in the image's ratio
            height = math.sqrt(limit / ratio)
            width = height * ratio
        if max(width, height) > MAX_UPSCALE_SIDE:
            shrink = MAX_UPSCALE_SIDE / max(width, height)
            width, height = width * shrink, height * shrink
        width, height = max(8, int(width) // 8 * 8), max(8, int(height) // 8 * 8)
        if width <= source[0] and height <= source[1]:
            raise PromptError(
                f"the image is {source[0]}x{source[1]} already, as large as this service "
                "upscales to"
            )
        return width, height
    width = sides.get("width") or _round_to(sides["height"] * ratio, 8)
    height = sides.get("height") or _round_to(width / ratio, 8)
    if width * height > limit or max(width, height) > MAX_UPSCALE_SIDE:
        side = math.isqrt(limit) // 8 * 8
        raise PromptError(
            f"an upscale to {width}x{height} is {width * height} pixels, over the limit of "
            f"{limit} (about {side}x{side})"
        )
    if width <= source[0] and height <= source[1]:
        raise PromptError(
            f"an upscale must be larger than the image ({source[0]}x{source[1]}), "
            f"got {width}x{height}"
        )
    return width, height


def parse_request(
    message: str,
    config: ModelConfig,
    *,
    rng: random.Random | None = None,
    base: GenerationRequest | None = None,
    image_size: tuple[int, int] | None = None,
    attached: str | None = None,
) -> GenerationRequest:
    """Parse one chat line (see the module docstring for the grammar).

    Args:
        message: the user's text, without any bot command prefix.
        config: models and limits.
        rng: draws the seed when the user gives none (default: `random.SystemRandom`).
        base: the request of the earlier job a follow-up (`follow_up_of`) names.
        image_size: the input image's width and height, once it was fetched (an img2img
            without a size then keeps its ratio; an upscale starts from it). Without it, the
            size is what it would be for a text prompt: parse again once the image is here.
        attached: the source of an image sent beside the message (``upload``, or a URL from
            the request's ``image_url``).

    Raises:
        PromptError: ``str()`` is one line a bot can send back to the user.
        ValueError: a follow-up without its `base` (the caller's mistake).
    """
    prompt, values, tags, lora_options = _split(message)
    follow = _follow_up(values)
    if follow is not None and base is None:
        raise ValueError("a follow-up needs the earlier job's request as base")
    if follow is None:
        base = None
    if not prompt and base is None:
        raise PromptError(
            "the prompt is empty; write what to draw before the first modifier, "
            "e.g. 'a red fox in the snow --ar 16:9'"
        )
    defaults = config.defaults
    source = values["image"][1] if "image" in values else None
    if source is not None and attached is not None:
        raise PromptError("give one input image: --image or an attached image, not both")
    if follow is not None and (source is not None or attached is not None):
        raise PromptError(
            f"--{follow.kind} starts from the earlier job's image; drop the other input image"
        )
    source = source if source is not None else attached
    if (
        source is not None
        and source != "upload"
        and not source.lower().startswith(("http://", "https://"))
    ):
        raise PromptError(f"--image needs an http:// or https:// URL, got {_show(source)}")
    strength = _strength(values)
    if strength is not None and source is None and follow is None:
        raise PromptError(
            "--strength needs an input image (--image URL, --vary JOB:N or an attached image)"
        )
    if "model" in values:
        model = _resolve_model(values["model"][1], config)
    elif base is not None:
        model = base.model
        if model not in config.models:
            ids = ", ".join(sorted(config.models))
            raise PromptError(
                f'the earlier job\'s model "{model}" is no longer offered; pick one with -m ({ids})'
            )
    else:
        model = defaults.model
    spec = config.models[model]
    image: ImageInput | None = None
    upscale = follow is not None and follow.kind == "upscale"
    if follow is not None:
        assert base is not None
        index = follow.index
        if index is None:
            if base.count != 1:
                raise PromptError(
                    f"job {follow.job_id} made {base.count} images; say which, e.g. "
                    f"--{follow.kind} {follow.job_id}:2"
                )
            index = 1
        if index > base.count:
            which = "1" if base.count == 1 else f"1 to {base.count}"
            raise PromptError(
                f"job {follow.job_id} made {base.count} image{'s' if base.count > 1 else ''}; "
                f"pick {which}"
            )
        if upscale:
            model_method = defaults.upscale_method == "model" and not spec.upscale_workflow
            if strength is not None and model_method:
                raise PromptError(
                    "--strength has no effect on this service's upscales (an upscale model "
                    "runs them, not a second pass); drop it"
                )
            default_strength = defaults.upscale_denoise
        else:
            default_strength = defaults.vary_strength
        image = ImageInput(f"job:{follow.job_id}:{index}", strength or default_strength)
    elif source is not None:
        image = ImageInput(source, strength or defaults.img2img_strength)
    if upscale:
        assert base is not None
        width, height = _upscale_size(values, image_size or (base.width, base.height), config)
    elif base is not None:
        default = (base.width, base.height)
        sides_fit = all(defaults.min_size <= side <= defaults.max_size for side in default)
        if base.width * base.height > defaults.max_pixels or not sides_fit:
            # An upscale's result, say: its ratio, within what a job may be.
            default = _fit(default, min(base.width * base.height, defaults.max_pixels), config)
        width, height = _size(values, default, config)
    else:
        ratio_of = image_size if image is not None else None
        width, height = _size(
            values, (spec.image_width, spec.image_height), config, ratio_of=ratio_of
        )
    count = base.count if base is not None and not upscale else defaults.count
    if "count" in values:
        raw = values["count"][1]
        if upscale:
            raise PromptError("an upscale makes one image; drop --count")
        parsed = _whole(raw)
        if parsed is None or not 1 <= parsed <= defaults.max_count:
            raise PromptError(f"--count must be 1 to {defaults.max_count}, got {_show(raw)}")
        count = parsed
    elif upscale:
        count = 1
    if "seed" in values:
        raw = values["seed"][1]
        parsed = _whole(raw)
        if parsed is None or parsed > MAX_SEED:
            raise PromptError(
                f"--seed must be a whole number from 0 to {MAX_SEED}, got {_show(raw)}"
            )
        seed = parsed
    elif upscale and base is not None:
        seed = base.seed
    else:
        seed = (rng or _SYSTEM_RANDOM).randrange(MAX_RANDOM_SEED + 1)
    negative = base.negative if base is not None else ""
    if "no" in values:
        negative = values["no"][1]
    if tags or lora_options or base is None:
        loras = parse_loras(tags, lora_options, config)
    else:
        loras = base.loras
    if upscale and config.workflow_for(model, "upscale") == UPSCALE_MODEL_WORKFLOW:
        loras = ()  # an upscale model loads no checkpoint to patch
    request = GenerationRequest(
        prompt=prompt or (base.prompt if base is not None else ""),
        negative=negative,
        model=model,
        width=width,
        height=height,
        count=count,
        seed=seed,
        loras=loras,
        image=image,
        upscale=upscale,
    )
    if refusal := lora_refusal(request, None, config):
        raise PromptError(refusal)
    return request


def render_request(request: GenerationRequest) -> str:
    """The chat line for `request`, with every value explicit (long flags, LoRAs as tags after
    the prompt, ``--no`` last).

    ``parse_request(render_request(r), config) == r`` for every request `parse_request`
    returns, and for any valid request whose prompt and negative are whitespace-normalised
    and contain no modifier-like words. No quoting exists: a request whose text holds a
    modifier is rendered as-is and will not parse back to itself. A request that starts from
    an image renders its source (``--image URL``, ``--vary``/``--upscale JOB:N``) and
    strength; it parses back only with the same ``base``/``attached`` (an upload has no URL).
    """
    parts = [
        request.prompt,
        *(f"<lora:{name}:{weight!r}>" for name, weight in request.loras),
        f"--model {request.model}",
        f"--width {request.width}",
        f"--height {request.height}",
    ]
    if not request.upscale:
        parts.append(f"--count {request.count}")
    parts.append(f"--seed {request.seed}")
    if request.image is not None:
        earlier = request.image.earlier
        if earlier is not None:
            kind = "upscale" if request.upscale else "vary"
            parts.append(f"--{kind} {earlier[0]}:{earlier[1]}")
        elif request.image.source != "upload":
            parts.append(f"--image {request.image.source}")
        parts.append(f"--strength {request.image.strength!r}")
    if request.negative:
        parts.append(f"--no {request.negative}")
    return " ".join(parts)


def _join(*parts: str) -> str:
    cleaned = (part.strip().strip(",").strip() for part in parts)
    return ", ".join(part for part in cleaned if part)


def positive_text(request: GenerationRequest, spec: ModelSpec) -> str:
    """The model's default positive tags, then the user's prompt (without the system prompt)."""
    return _join(spec.default_positive_prompt, request.prompt)


def negative_text(request: GenerationRequest, spec: ModelSpec) -> str:
    """The model's default negative tags, then the user's ``--no`` text."""
    return _join(spec.default_negative_prompt, request.negative)
