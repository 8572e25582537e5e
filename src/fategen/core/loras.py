"""LoRAs in a chat line: ``<lora:NAME:WEIGHT>`` tags and ``--lora NAME[:WEIGHT]``, and whether a
model and a ComfyUI may take them.

Pure: no I/O. The grammar (the prompt parser calls these):

* A tag is ``<lora:NAME>`` or ``<lora:NAME:WEIGHT>`` (``lora`` in any case), anywhere in the
  message, also inside the ``--no`` text; it is cut out (leaving a space) before the message is
  split into words. Inside a tag, runs of whitespace become one space and the ends are stripped.
  Any other ``<lora`` left over is an error (an unfinished tag).
* ``--lora NAME[:WEIGHT]`` may be given any number of times; the value is one word.
* NAME is everything before the last ``:``; when there is a ``:``, what follows must be a
  number (``0.8``, ``-1``, ``.5``). No ``:`` means weight 1. A NAME without a model file
  extension (``.safetensors``, ``.ckpt``, ``.pt``, ``.pth``, ``.bin``) gets ``.safetensors``,
  so ``<lora:detail-tweaker>`` names ComfyUI's ``detail-tweaker.safetensors``; a subfolder is
  written as ComfyUI lists it (``sdxl/detail.safetensors``).
* Order: the tags in message order, then the ``--lora`` values in order. The same LoRA twice is
  an error; so are more than ``DEFAULTS.maxLoras`` and a weight outside
  ``DEFAULTS.minLoraWeight`` .. ``DEFAULTS.maxLoraWeight``.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from fategen.core.modelconfig import ModelConfig
from fategen.errors import PromptError

if TYPE_CHECKING:
    from fategen.core.prompt import GenerationRequest

#: ``(file name, weight)`` pairs, in the order they are chained after the checkpoint.
Loras = tuple[tuple[str, float], ...]

EXTENSIONS: tuple[str, ...] = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DEFAULT_EXTENSION = ".safetensors"
TAG_HELP = "<lora:NAME:WEIGHT>"

_TAG_RE = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
_LEFTOVER_RE = re.compile(r"<lora", re.IGNORECASE)
_WEIGHT_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")
_GLOB_CHARS = frozenset("*?[")


def _show(text: str, limit: int = 40) -> str:
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"'{text}'"


def file_name(name: str) -> str:
    """The ComfyUI file name a user's LoRA name stands for (adds ``.safetensors`` if needed)."""
    return name if name.lower().endswith(EXTENSIONS) else name + DEFAULT_EXTENSION


def display_name(name: str) -> str:
    """How messages show a LoRA: without ``.safetensors``, as a user would type it."""
    return name[: -len(DEFAULT_EXTENSION)] if name.endswith(DEFAULT_EXTENSION) else name


def cut_tags(message: str) -> tuple[str, list[str]]:
    """The message without its ``<lora:...>`` tags, and the text inside each tag.

    Raises:
        PromptError: an unfinished tag is left (``<lora:x`` or ``<lora>``).
    """
    found: list[str] = []

    def take(match: re.Match[str]) -> str:
        found.append(" ".join(match[1].split()))
        return " "

    rest = _TAG_RE.sub(take, message)
    if _LEFTOVER_RE.search(rest):
        raise PromptError(
            f"a LoRA tag is unfinished; write {TAG_HELP}, e.g. <lora:detail-tweaker:0.8>"
        )
    return rest, found


def _one(raw: str, how: str, config: ModelConfig) -> tuple[str, float]:
    """One ``NAME[:WEIGHT]`` as ``(file name, weight)``; `how` is the syntax for messages."""
    name, colon, weight_text = raw.rpartition(":")
    if not colon:
        name, weight_text = raw, ""
    name = name.strip()
    if not name:
        raise PromptError(f"a LoRA tag needs a name: {how}")
    weight = 1.0
    if colon:
        weight_text = weight_text.strip()
        if not _WEIGHT_RE.fullmatch(weight_text):
            raise PromptError(
                f"LoRA weight {_show(weight_text)} for {_show(display_name(name))} is not a "
                f"number: {how}"
            )
        weight = float(weight_text)
    limits = config.defaults
    if not limits.min_lora_weight <= weight <= limits.max_lora_weight:
        raise PromptError(
            f"LoRA weight {weight_text or f'{weight:g}'} is out of range "
            f"({limits.min_lora_weight:g} to {limits.max_lora_weight:g})"
        )
    return file_name(name), weight


def parse_loras(tags: Sequence[str], options: Sequence[str], config: ModelConfig) -> Loras:
    """The request's LoRAs from the tags' texts and the ``--lora`` values (see the grammar).

    Raises:
        PromptError: one line a bot can send back.
    """
    limit = config.defaults.max_loras
    count = len(tags) + len(options)
    if count and not limit:
        raise PromptError("LoRAs are turned off here; remove the LoRA tags")
    if count > limit:
        raise PromptError(f"too many LoRAs: at most {limit}")
    pairs = [_one(raw, TAG_HELP, config) for raw in tags]
    pairs += [_one(raw, "--lora NAME:WEIGHT", config) for raw in options]
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise PromptError(f"the LoRA {_show(display_name(name))} was given twice; give it once")
        seen.add(name)
    return tuple(pairs)


def is_pattern(entry: str) -> bool:
    return not _GLOB_CHARS.isdisjoint(entry)


def is_allowed(name: str, allowed: Iterable[str]) -> bool:
    """Whether the LoRA file `name` matches an allow-list entry (a name or an fnmatch pattern).

    An entry without a file extension and without wildcards means that name with
    ``.safetensors``, as in a prompt.
    """
    for entry in allowed:
        if is_pattern(entry):
            if fnmatch.fnmatchcase(name, entry):
                return True
        elif file_name(entry) == name:
            return True
    return False


def _suggest(name: str, candidates: Iterable[str], *, listing: str) -> str:
    """``; did you mean a or b?`` (closest by difflib), else a short list, else ''."""
    shown = sorted({display_name(c) for c in candidates})
    if not shown:
        return ""
    by_lower: dict[str, list[str]] = {}
    for candidate in shown:
        by_lower.setdefault(candidate.lower(), []).append(candidate)
    close = difflib.get_close_matches(display_name(name).lower(), list(by_lower), n=3, cutoff=0.5)
    if close:
        return "; did you mean " + " or ".join(c for key in close for c in by_lower[key]) + "?"
    more = ", …" if len(shown) > 8 else ""
    return f"; {listing}: " + ", ".join(shown[:8]) + more


def lora_refusal(
    request: GenerationRequest, available: frozenset[str] | None, config: ModelConfig
) -> str | None:
    """Why `request`'s LoRAs cannot run, as one line for the user; None when they can.

    Args:
        request: a parsed request (its model is one of `config`'s).
        available: the LoRA file names the ComfyUI (or fleet) has, as ``Inventory.loras``
            lists them; None when not known (only the model's allow-list is checked).
        config: the model configuration, for the model's allow-list.
    """
    allowed = config.allowed_loras(request.model)
    for name, _ in request.loras:
        shown = _show(display_name(name))
        if allowed is not None and not is_allowed(name, allowed):
            if not allowed:
                return f"model {request.model} takes no LoRAs; remove {shown}"
            if available is not None:
                candidates = [n for n in available if is_allowed(n, allowed)]
            else:
                candidates = [e for e in allowed if not is_pattern(e)]
            return f"the LoRA {shown} is not allowed with model {request.model}" + _suggest(
                name, candidates, listing=f"LoRAs for {request.model}"
            )
        if available is not None and name not in available:
            candidates = [n for n in available if allowed is None or is_allowed(n, allowed)]
            return f"ComfyUI has no LoRA {shown}" + _suggest(
                name, candidates, listing=f"LoRAs for {request.model}"
            )
    return None
