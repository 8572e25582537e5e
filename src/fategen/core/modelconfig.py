"""The model configuration (``config/modelConfiguration.json``): models, their templates, defaults.

The file looks like::

    {
      "DEFAULTS": {"width": 1024, "height": 1024, "count": 1, "model": "illustriousXL"},
      "models": {
        "illustriousXL": {"checkpointName": "...", "workflow": "sdxl", "steps": 28,
                          "imageWidth": 1024, "imageHeight": 1024,
                          "defaultPositivePrompt": "masterpiece", ...}
      }
    }

LoRAs: ``DEFAULTS`` may set ``maxLoras`` (3), ``minLoraWeight`` (-2) and ``maxLoraWeight`` (2); a
model may list ``loras`` (names or fnmatch patterns it allows; ``[]`` allows none) and
``loraFamilies`` (names of lists under a top-level ``"loraFamilies": {"sdxl": ["sdxl/*"]}``). A
model with neither takes any LoRA ComfyUI has.

Input images and follow-ups: ``DEFAULTS`` may set ``img2imgStrength`` (0.6, the denoise of
``--image``), ``varyStrength`` (0.45, of ``--vary``), ``upscaleMethod`` (``"latent"``: a latent
upscale and a second sampler pass at ``upscaleDenoise``; ``"model"``: an upscale model,
``upscaleModel``), ``upscaleFactor`` (2) and ``maxUpscalePixels``. A model's img2img and upscale
workflows are ``<workflow>-img2img`` and ``<workflow>-upscale`` (``upscale-model`` for the model
method) unless it names them (``img2imgWorkflow``, ``upscaleWorkflow``); a model whose variant
does not exist cannot take that kind of job (the front desk says so).

Loading is pure (``parse_model_config``) apart from reading the file; errors name the JSON path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_structure_fn, override

from fategen.errors import ConfigError


@attrs.frozen
class ModelSpec:
    """One model a user can pick with ``-m``."""

    checkpoint_name: str
    workflow: str
    steps: int
    image_width: int
    image_height: int
    default_positive_prompt: str
    default_negative_prompt: str = ""
    cfg: float | None = None
    sampler: str | None = None
    scheduler: str | None = None
    description: str = ""
    #: Text put before the user's prompt inside the positive encoder (Lumina 2's system prompt).
    system_prompt: str = ""
    #: The LoRAs this model may take: file names as ComfyUI lists them, or ``fnmatch``
    #: patterns (``sdxl/*``). None (the key is absent) allows any LoRA ComfyUI has, unless
    #: `lora_families` names some; an empty list allows none.
    loras: tuple[str, ...] | None = None
    #: Names of top-level ``loraFamilies`` whose patterns this model also allows.
    lora_families: tuple[str, ...] = ()
    #: The workflow of a job that starts from an image (None: ``<workflow>-img2img``).
    img2img_workflow: str | None = None
    #: The workflow of an upscale (None: ``<workflow>-upscale``, or ``upscale-model`` with
    #: ``DEFAULTS.upscaleMethod`` "model").
    upscale_workflow: str | None = None


@attrs.frozen
class Defaults:
    """What a request gets when the user says nothing, and the limits every request obeys."""

    width: int
    height: int
    count: int
    model: str
    min_size: int = 256
    max_size: int = 2048
    #: Largest width * height accepted (the default allows 1536 x 1536, or 2048 x 1152).
    max_pixels: int = 1536 * 1536
    max_count: int = 4
    #: Most LoRAs one request may use (0 turns LoRAs off).
    max_loras: int = 3
    #: The range of a LoRA weight (ComfyUI itself accepts -100 to 100).
    min_lora_weight: float = -2.0
    max_lora_weight: float = 2.0
    #: The denoise of a job started from an image when the user gives no ``--strength``.
    img2img_strength: float = 0.6
    #: The denoise of ``--vary``: img2img from the earlier image, at a low strength.
    vary_strength: float = 0.45
    #: ``latent`` (a latent upscale, then a second sampler pass at `upscale_denoise`) or
    #: ``model`` (an upscale model, `upscale_model`, then a resize to the exact size).
    upscale_method: str = "latent"
    upscale_model: str = "4x-UltraSharp.pth"
    upscale_denoise: float = 0.35
    #: How much larger an upscale makes each side.
    upscale_factor: float = 2.0
    #: Largest width * height of an upscale's result (the default allows 3072 x 3072).
    max_upscale_pixels: int = 3072 * 3072


@attrs.frozen
class ModelConfig:
    defaults: Defaults
    models: Mapping[str, ModelSpec]
    #: Family name -> LoRA names or patterns, shared by the models that list the family.
    lora_families: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)

    def model(self, model_id: str) -> ModelSpec:
        return self.models[model_id]

    def workflow_for(self, model_id: str, kind: str) -> str:
        """The template a job of ``kind`` (``txt2img``, ``img2img``, ``upscale``) of the model
        uses."""
        spec = self.models[model_id]
        if kind == "img2img":
            return spec.img2img_workflow or f"{spec.workflow}-img2img"
        if kind == "upscale":
            if spec.upscale_workflow:
                return spec.upscale_workflow
            if self.defaults.upscale_method == "model":
                return UPSCALE_MODEL_WORKFLOW
            return f"{spec.workflow}-upscale"
        return spec.workflow

    def allowed_loras(self, model_id: str) -> tuple[str, ...] | None:
        """The LoRA names or patterns `model_id` allows; None when it has no allow-list."""
        spec = self.models[model_id]
        if spec.loras is None and not spec.lora_families:
            return None
        patterns = list(spec.loras or ())
        for family in spec.lora_families:
            patterns.extend(self.lora_families.get(family, ()))
        return tuple(dict.fromkeys(patterns))


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)

    def strict_int(value: Any, _: type) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {json.dumps(value)}")
        return value

    def strict_float(value: Any, _: type) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {json.dumps(value)}")
        return float(value)

    def strict_str(value: Any, _: type) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {json.dumps(value)}")
        return value

    conv.register_structure_hook(int, strict_int)
    conv.register_structure_hook(float, strict_float)
    conv.register_structure_hook(str, strict_str)

    def strict_names(value: Any, _: type) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list of strings, got {json.dumps(value)}")
        return tuple(strict_str(item, str) for item in value)

    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], strict_names)
    for cls in (ModelSpec, Defaults):
        renames: dict[str, Any] = {
            f.name: override(rename=_camel(f.name)) for f in attrs.fields(cls)
        }
        conv.register_structure_hook(
            cls,
            make_dict_structure_fn(cls, conv, _cattrs_forbid_extra_keys=True, **renames),
        )
    return conv


_converter = _make_converter()

#: Top-level keys of the ``models`` layout.
_TOP_LEVEL = ("DEFAULTS", "models", "loraFamilies")

#: The template of an upscale with an upscale model (``DEFAULTS.upscaleMethod`` "model").
UPSCALE_MODEL_WORKFLOW = "upscale-model"
#: The ways to upscale ``DEFAULTS.upscaleMethod`` names.
UPSCALE_METHODS = ("latent", "model")
#: The largest ``upscaleFactor``.
MAX_UPSCALE_FACTOR = 4.0

#: ComfyUI's LoraLoader accepts strengths from -100 to 100.
COMFY_MAX_LORA_WEIGHT = 100.0


def _format_leaf(exc: BaseException, _type: Any) -> str:
    if isinstance(exc, KeyError):
        return "required key is missing"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return "unknown key(s) " + ", ".join(repr(k) for k in sorted(exc.extra_fields))
    return str(exc)


def _describe(exc: BaseException, path: str) -> list[str]:
    """Flatten a cattrs error tree into ``json.path: problem`` lines (keys as in the file)."""
    lines = []
    for line in cattrs.transform_error(exc, path=path, format_exception=_format_leaf):
        message, _, where = line.rpartition(" @ ")
        if where.count(".") > path.count("."):  # a field below `path`: spell it as the file does
            head, _, last = where.rpartition(".")
            where = f"{head}.{_camel(last)}"
        lines.append(f"{where}: {message}")
    return lines


def parse_model_config(data: Any, *, templates: frozenset[str] | None = None) -> ModelConfig:
    """Turn the parsed JSON document into a `ModelConfig`.

    Args:
        data: the decoded JSON.
        templates: names of the workflow templates that exist; a model naming another one is
            an error. ``None`` skips that check.

    Raises:
        ConfigError: naming every problem, one ``path: what`` per line.
    """
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError("model configuration: expected a JSON object at the top level")
    if "models" in data:
        # {"DEFAULTS": {...}, "models": {"illustriousXL": {...}, ...}}
        prefix = "models."
        for key in data:
            if key not in _TOP_LEVEL:
                problems.append(f"{key}: unknown key (expected DEFAULTS and models)")
        raw_models = data.get("models")
        if not isinstance(raw_models, dict) or not raw_models:
            problems.append("models: expected an object with at least one model")
            raw_models = {}
    else:
        # The seed's layout: {"DEFAULTS": {...}, "illustriousXL": {...}, ...}
        prefix = ""
        raw_models = {k: v for k, v in data.items() if k not in ("DEFAULTS", "loraFamilies")}
        if not raw_models:
            problems.append(
                "models: expected at least one model (under models, or beside DEFAULTS)"
            )
    defaults: Defaults | None = None
    if "DEFAULTS" not in data:
        problems.append("DEFAULTS: required key is missing")
    else:
        try:
            defaults = _converter.structure(data["DEFAULTS"], Defaults)
        except Exception as exc:
            problems.extend(_describe(exc, "DEFAULTS"))
    families: dict[str, tuple[str, ...]] = {}
    if "loraFamilies" in data:
        try:
            families = _converter.structure(data["loraFamilies"], dict[str, tuple[str, ...]])
        except Exception as exc:
            problems.extend(_describe(exc, "loraFamilies"))
    models: dict[str, ModelSpec] = {}
    for model_id, raw in raw_models.items():
        try:
            spec = _converter.structure(raw, ModelSpec)
        except Exception as exc:
            problems.extend(_describe(exc, f"{prefix}{model_id}"))
            continue
        problems.extend(_check_spec(f"{prefix}{model_id}", spec, templates))
        problems.extend(_check_loras(f"{prefix}{model_id}", spec, families))
        models[model_id] = spec
    if defaults is not None:
        problems.extend(_check_defaults(defaults, raw_models))
    if problems:
        raise ConfigError("model configuration is invalid: " + "; ".join(problems))
    assert defaults is not None
    return ModelConfig(defaults=defaults, models=models, lora_families=families)


def _check_spec(where: str, spec: ModelSpec, templates: frozenset[str] | None) -> list[str]:
    problems = []
    if templates is not None:
        known = ", ".join(sorted(templates)) or "none"
        for key, name in (
            ("workflow", spec.workflow),
            ("img2imgWorkflow", spec.img2img_workflow),
            ("upscaleWorkflow", spec.upscale_workflow),
        ):
            if name is not None and name not in templates:
                problems.append(f"{where}.{key}: template {name!r} does not exist (known: {known})")
    if spec.steps < 1:
        problems.append(f"{where}.steps: must be at least 1, got {spec.steps}")
    for name in ("image_width", "image_height"):
        value = getattr(spec, name)
        if value < 8 or value % 8:
            problems.append(
                f"{where}.{_camel(name)}: must be a positive multiple of 8, got {value}"
            )
    if not spec.checkpoint_name:
        problems.append(f"{where}.checkpointName: must not be empty")
    return problems


def _check_defaults(defaults: Defaults, raw_models: Mapping[str, Any]) -> list[str]:
    problems = []
    if defaults.model not in raw_models:
        problems.append(f"DEFAULTS.model: {defaults.model!r} is not one of the configured models")
    if not 1 <= defaults.count <= defaults.max_count:
        problems.append(f"DEFAULTS.count: must be 1 to {defaults.max_count}, got {defaults.count}")
    if not 8 <= defaults.min_size <= defaults.max_size:
        problems.append("DEFAULTS.minSize/maxSize: need 8 <= minSize <= maxSize")
    if defaults.max_loras < 0:
        problems.append(f"DEFAULTS.maxLoras: must be 0 or more, got {defaults.max_loras}")
    low, high = defaults.min_lora_weight, defaults.max_lora_weight
    if not -COMFY_MAX_LORA_WEIGHT <= low <= high <= COMFY_MAX_LORA_WEIGHT:
        problems.append(
            "DEFAULTS.minLoraWeight/maxLoraWeight: need "
            f"-{COMFY_MAX_LORA_WEIGHT:g} <= minLoraWeight <= maxLoraWeight <= "
            f"{COMFY_MAX_LORA_WEIGHT:g}, got {low:g} and {high:g}"
        )
    for key, value in (
        ("img2imgStrength", defaults.img2img_strength),
        ("varyStrength", defaults.vary_strength),
        ("upscaleDenoise", defaults.upscale_denoise),
    ):
        if not 0 < value <= 1:
            problems.append(f"DEFAULTS.{key}: must be more than 0 and at most 1, got {value:g}")
    if defaults.upscale_method not in UPSCALE_METHODS:
        problems.append(
            f"DEFAULTS.upscaleMethod: must be one of {', '.join(UPSCALE_METHODS)}, "
            f"got {defaults.upscale_method!r}"
        )
    if not 1 < defaults.upscale_factor <= MAX_UPSCALE_FACTOR:
        problems.append(
            f"DEFAULTS.upscaleFactor: must be more than 1 and at most {MAX_UPSCALE_FACTOR:g}, "
            f"got {defaults.upscale_factor:g}"
        )
    if defaults.min_size * defaults.min_size > defaults.max_pixels:
        problems.append("DEFAULTS.minSize/maxPixels: need minSize x minSize <= maxPixels")
    if defaults.max_upscale_pixels < defaults.max_pixels:
        problems.append("DEFAULTS.maxUpscalePixels: must be at least maxPixels")
    if not defaults.upscale_model:
        problems.append("DEFAULTS.upscaleModel: must not be empty")
    return problems


def _check_loras(where: str, spec: ModelSpec, families: Mapping[str, Any]) -> list[str]:
    problems = []
    for family in spec.lora_families:
        if family not in families:
            known = ", ".join(sorted(families)) or "none"
            problems.append(
                f"{where}.loraFamilies: family {family!r} is not defined under the "
                f"top-level loraFamilies (known: {known})"
            )
    if spec.loras is not None and any(not name for name in spec.loras):
        problems.append(f"{where}.loras: names must not be empty")
    return problems


def load_model_config(path: Path, *, templates: frozenset[str] | None = None) -> ModelConfig:
    """Read and parse the configuration file (blocking: call it at start-up or in a thread)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the model configuration {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"model configuration {path} is not valid JSON: {exc.msg} at line {exc.lineno}"
        ) from exc
    return parse_model_config(data, templates=templates)
