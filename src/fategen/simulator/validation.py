"""POST /prompt validation, with ComfyUI's error types, messages and ``node_errors`` shape."""

from __future__ import annotations

import copy
import sys
import traceback
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from fategen.simulator import catalogue

_COMBO_LIST_LIMIT = 20

#: The inputs a node's ``VALIDATE_INPUTS`` takes. ComfyUI skips their range and choice checks
#: and asks the node instead (``LoadImage``: does the file exist?).
CUSTOM_VALIDATED: dict[str, tuple[str, ...]] = {"LoadImage": ("image",)}


@attrs.frozen
class Accepted:
    """A prompt that may run: the outputs to execute and errors of the outputs that may not.

    ``prompt`` is the prompt as submitted; ``converted`` a copy with literal inputs converted to
    their declared types (what the nodes run with).
    """

    prompt_id: str
    prompt: dict[str, Any]
    converted: dict[str, Any]
    outputs: list[str]
    node_errors: dict[str, Any]


@attrs.frozen
class Rejected:
    """A prompt that may not run: HTTP status and JSON body of the answer."""

    status: int
    body: dict[str, Any]


def _error(kind: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _reject(error: dict[str, Any], node_errors: dict[str, Any] | None = None) -> Rejected:
    return Rejected(400, {"error": error, "node_errors": node_errors or {}})


def is_canonical_uuid(value: object) -> bool:
    """Whether ``value`` is a UUID in canonical lowercase hyphenated form."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def check_submission(
    body: object,
    *,
    checkpoints: Sequence[str],
    input_images: Sequence[str],
    loras: Sequence[str] = (),
    upscale_models: Sequence[str] = (),
    image_exists: Callable[[str], bool] | None = None,
) -> Accepted | Rejected:
    """Check a POST /prompt body the way ComfyUI does.

    ``image_exists`` answers ``LoadImage``'s ``VALIDATE_INPUTS`` (whether the file it names
    exists); without it, a name must be one of ``input_images``.
    """
    if not isinstance(body, dict) or "prompt" not in body:
        return _reject(_error("no_prompt", "No prompt provided", "No prompt provided"))
    prompt_id = body.get("prompt_id")
    if prompt_id is not None and not is_canonical_uuid(prompt_id):
        return _reject(
            _error(
                "invalid_prompt_id",
                "prompt_id must be a valid UUID",
                "prompt_id must be a UUID string in canonical lowercase hyphenated form; "
                "omit it to let the server generate one",
            )
        )
    prompt = body["prompt"]
    if not isinstance(prompt, dict) or not all(isinstance(n, dict) for n in prompt.values()):
        return _reject(_error("invalid_prompt", "Prompt is not a dictionary of nodes"))
    converted = copy.deepcopy(prompt)
    validator = _Validator(
        converted,
        checkpoints=checkpoints,
        input_images=input_images,
        loras=loras,
        upscale_models=upscale_models,
        image_exists=image_exists or (lambda name: name in input_images),
    )
    result = validator.validate()
    if isinstance(result, Rejected):
        return result
    outputs, node_errors = result
    return Accepted(str(prompt_id or uuid.uuid4()), prompt, converted, outputs, node_errors)


class _Validator:
    def __init__(
        self,
        prompt: dict[str, Any],
        *,
        checkpoints: Sequence[str],
        input_images: Sequence[str],
        loras: Sequence[str],
        upscale_models: Sequence[str],
        image_exists: Callable[[str], bool],
    ) -> None:
        self.prompt = prompt
        self.checkpoints = checkpoints
        self.input_images = input_images
        self.loras = loras
        self.upscale_models = upscale_models
        self.image_exists = image_exists
        self.validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
        self.visiting: set[str] = set()

    def validate(self) -> tuple[list[str], dict[str, Any]] | Rejected:
        outputs: list[str] = []
        for node_id, node in self.prompt.items():
            class_type = node.get("class_type")
            if class_type is None:
                return _reject(
                    _error(
                        "missing_node_type",
                        f"Node 'ID #{node_id}' has no class_type. The workflow may be corrupted "
                        "or a custom node is missing.",
                        f"Node ID '#{node_id}'",
                        node_id=node_id,
                        class_type=None,
                        node_title=None,
                    )
                )
            if not catalogue.is_known(class_type):
                title = node.get("_meta", {}).get("title", class_type)
                return _reject(
                    _error(
                        "missing_node_type",
                        f"Node '{title}' not found. The custom node may not be installed.",
                        f"Node ID '#{node_id}'",
                        node_id=node_id,
                        class_type=class_type,
                        node_title=title,
                    )
                )
            if catalogue.is_output_node(class_type):
                outputs.append(node_id)
        if not outputs:
            return _reject(_error("prompt_no_outputs", "Prompt has no outputs"))

        good: list[str] = []
        output_errors: list[tuple[str, list[dict[str, Any]]]] = []
        node_errors: dict[str, Any] = {}
        for output in outputs:
            try:
                valid, reasons = self._validate_node(output)
            except Exception as exc:
                _, _, tb = sys.exc_info()
                valid = False
                reasons = [
                    _error(
                        "exception_during_validation",
                        "Exception when validating node",
                        str(exc),
                        exception_type=type(exc).__name__,
                        traceback=traceback.format_tb(tb),
                    )
                ]
                self.validated[output] = (False, reasons)
            if valid:
                good.append(output)
                continue
            if reasons:
                output_errors.append((output, reasons))
            for node_id, (ok, node_reasons) in self.validated.items():
                if ok or not node_reasons:
                    continue
                entry = node_errors.setdefault(
                    node_id,
                    {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": self.prompt[node_id]["class_type"],
                    },
                )
                entry["dependent_outputs"].append(output)
        if not good:
            details = "\n".join(
                f"{reason['message']}: {reason['details']}"
                for _, reasons in output_errors
                for reason in reasons
            )
            return _reject(
                _error(
                    "prompt_outputs_failed_validation", "Prompt outputs failed validation", details
                ),
                node_errors,
            )
        return good, node_errors

    def _validate_node(self, node_id: str) -> tuple[bool, list[dict[str, Any]]]:
        if node_id in self.validated:
            return self.validated[node_id]
        if node_id in self.visiting:
            raise RuntimeError(f"Dependency cycle detected at node {node_id}")
        self.visiting.add(node_id)
        try:
            result = self._check_inputs(node_id)
        finally:
            self.visiting.discard(node_id)
        self.validated[node_id] = result
        return result

    def _check_inputs(self, node_id: str) -> tuple[bool, list[dict[str, Any]]]:
        node = self.prompt[node_id]
        class_type = node["class_type"]
        inputs = node.setdefault("inputs", {})
        info = catalogue.node_info(
            class_type,
            checkpoints=self.checkpoints,
            input_images=self.input_images,
            loras=self.loras,
            upscale_models=self.upscale_models,
        )["input"]
        custom = CUSTOM_VALIDATED.get(class_type, ())
        errors: list[dict[str, Any]] = []
        valid = True
        for section in ("required", "optional"):
            for name, spec in info.get(section, {}).items():
                if name not in inputs:
                    if section == "required":
                        errors.append(
                            _error(
                                "required_input_missing",
                                "Required input is missing",
                                name,
                                input_name=name,
                            )
                        )
                    continue
                value = inputs[name]
                if isinstance(value, list):
                    link_ok, error = self._check_link(name, spec, value)
                    valid = valid and link_ok
                else:
                    error = _check_literal(inputs, name, spec, custom=name in custom)
                if error is not None:
                    errors.append(error)
        for name in custom:
            if name in inputs and not isinstance(inputs[name], list):
                message = self._custom_check(class_type, inputs[name])
                if message is not None:
                    errors.append(
                        _error(
                            "custom_validation_failed",
                            "Custom validation failed for node",
                            f"{name} - {message}",
                            input_name=name,
                        )
                    )
        return (valid and not errors), errors

    def _custom_check(self, class_type: str, value: Any) -> str | None:
        """What the node's ``VALIDATE_INPUTS`` returns when it is not True (None when it is)."""
        if class_type == "LoadImage" and not self.image_exists(value):
            return f"Invalid image file: {value}"
        return None

    def _check_link(
        self, name: str, spec: list[Any], value: list[Any]
    ) -> tuple[bool, dict[str, Any] | None]:
        if len(value) != 2:
            return False, _error(
                "bad_linked_input",
                "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                name,
                input_name=name,
                input_config=spec,
                received_value=value,
            )
        source_id, slot = value
        source_class = self.prompt[source_id]["class_type"]
        received = catalogue.output_types(source_class)[slot]
        expected = spec[0]
        if not _types_match(received, expected):
            return False, _error(
                "return_type_mismatch",
                "Return type mismatch between linked nodes",
                f"{name}, received_type({received}) mismatch input_type({expected})",
                input_name=name,
                input_config=spec,
                received_type=received,
                linked_node=value,
            )
        source_ok, _ = self._validate_node(source_id)
        return source_ok, None


def _types_match(received: str, expected: object) -> bool:
    if not isinstance(expected, str):
        return False
    if "*" in (received, expected):
        return True
    return received in expected.split(",")


def _check_literal(
    inputs: dict[str, Any], name: str, spec: list[Any], *, custom: bool = False
) -> dict[str, Any] | None:
    """Convert ``inputs[name]`` like ComfyUI does and check its range or choices (not for an
    input the node's ``VALIDATE_INPUTS`` checks: ``custom``)."""
    kind = spec[0]
    options: dict[str, Any] = spec[1] if len(spec) > 1 else {}
    value = inputs[name]
    try:
        if kind == "INT":
            value = int(value)
        elif kind == "FLOAT":
            value = float(value)
        elif kind == "STRING":
            value = str(value)
        elif kind == "BOOLEAN":
            value = bool(value)
    except Exception as exc:
        return _error(
            "invalid_input_type",
            f"Failed to convert an input value to a {kind} value",
            f"{name}, {value}, {exc}",
            input_name=name,
            input_config=spec,
            received_value=value,
            exception_message=str(exc),
        )
    inputs[name] = value
    if custom:
        return None
    if "min" in options and value < options["min"]:
        return _error(
            "value_smaller_than_min",
            f"Value {value} smaller than min of {options['min']}",
            name,
            input_name=name,
            input_config=spec,
            received_value=value,
        )
    if "max" in options and value > options["max"]:
        return _error(
            "value_bigger_than_max",
            f"Value {value} bigger than max of {options['max']}",
            name,
            input_name=name,
            input_config=spec,
            received_value=value,
        )
    choices = catalogue.combo_choices(spec)
    if choices is not None and value not in choices:
        too_long = len(choices) > _COMBO_LIST_LIMIT
        listing = f"(list of length {len(choices)})" if too_long else str(choices)
        return _error(
            "value_not_in_list",
            "Value not in list",
            f"{name}: '{value}' not in {listing}",
            input_name=name,
            input_config=None if too_long else spec,
            received_value=value,
        )
    return None
