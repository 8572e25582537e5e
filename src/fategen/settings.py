"""Service settings, read once at the entry point from the environment and an optional ``.env``.

The environment wins over ``.env``. Every bad value stops start-up with one sentence naming the
variable and the value (`ConfigError`). Tests build settings with ``Settings.from_env({...})``.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import environ

from fategen.core.backends import DEFAULT_BACKEND, BackendSpec
from fategen.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def _bad(name: str, value: str, why: str) -> ConfigError:
    return ConfigError(f"{name}={value!r} is invalid: {why}")


def _integer(name: str, *, low: int, high: int | None = None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, int):
            number = value
        else:
            try:
                number = int(str(value).strip())
            except ValueError:
                raise _bad(name, value, "expected a whole number") from None
        if number < low or (high is not None and number > high):
            span = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise _bad(name, str(value), f"expected a whole number {span}")
        return number

    return convert


def _seconds(name: str, *, allow_zero: bool = False) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        try:
            number = float(str(value).strip())
        except ValueError:
            raise _bad(name, str(value), "expected a number of seconds") from None
        if not math.isfinite(number):
            raise _bad(name, str(value), "expected a finite number of seconds")
        if number < 0 or (number == 0 and not allow_zero):
            need = "zero or more" if allow_zero else "more than zero"
            raise _bad(name, str(value), f"expected a number of seconds, {need}")
        return number

    return convert


def _hours(name: str) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        try:
            number = float(str(value).strip())
        except ValueError:
            raise _bad(name, str(value), "expected a number of hours") from None
        if not math.isfinite(number) or number < 0:
            raise _bad(name, str(value), "expected a number of hours, zero or more")
        return number

    return convert


def _path(name: str, *, optional: bool = False) -> Callable[[Any], Path | None]:
    def convert(value: Any) -> Path | None:
        if isinstance(value, Path):
            return value
        text = "" if value is None else str(value).strip()
        if not text:
            if optional:
                return None
            raise _bad(name, str(value), "expected a path")
        if "\0" in text:
            raise _bad(name, text, "a path cannot contain a NUL byte")
        return Path(text).expanduser()

    return convert


def _log_level(value: Any) -> str:
    level = str(value).strip().upper()
    if level not in _LOG_LEVELS:
        raise _bad("LOG_LEVEL", str(value), "expected one of " + ", ".join(_LOG_LEVELS))
    return level


def _log_format(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ("text", "json"):
        raise _bad("LOG_FORMAT", str(value), "expected text or json")
    return text


def _host(name: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = str(value).strip()
        if not text or any(c.isspace() or c in "/?#@" for c in text):
            raise _bad(name, str(value), "expected a host name or IP address")
        return text

    return convert


_KEY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")


def split_key(entry: str) -> tuple[str, str]:
    """``name:TOKEN`` -> (name, token); a bare token gets a name derived from its hash (a
    name for the logs and the job, never the token)."""
    name, sep, token = entry.partition(":")
    if not sep:
        return "key-" + hashlib.sha256(entry.encode()).hexdigest()[:8], entry
    return name, token


def _keys(name: str) -> Callable[[Any], frozenset[str]]:
    """Comma-separated keys, each ``TOKEN`` or ``name:TOKEN`` (tokens hold no colon)."""

    def convert(value: Any) -> frozenset[str]:
        if isinstance(value, frozenset):
            return value
        keys = [k.strip() for k in str(value).split(",") if k.strip()]
        names: set[str] = set()
        for number, key in enumerate(keys, start=1):
            key_name, token = split_key(key)
            if ":" in key and not _KEY_NAME.fullmatch(key_name):
                raise ConfigError(
                    f"{name} is invalid: key {number} of {len(keys)} has a name that is not "
                    "1 to 32 letters, digits, '.', '_' or '-'"
                )
            if len(token) < 16:
                # The value is a secret: say which key is wrong, never echo it.
                raise ConfigError(
                    f"{name} is invalid: key {number} of {len(keys)} has {len(token)} "
                    "characters, and every key needs at least 16"
                )
            if key_name in names:
                raise ConfigError(f"{name} is invalid: the key name {key_name!r} is used twice")
            names.add(key_name)
        return frozenset(keys)

    return convert


# -- COMFYUI_BACKENDS ---------------------------------------------------------------------

_BACKEND_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")
_PORT = re.compile(r"[0-9]{1,5}")
#: An HTTP header name (RFC 9110 ``token``).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: An unknown option's key is repeated in the error only when it looks like one (short
#: letters), not like a secret typed in the wrong place.
_OPTION_KEY = re.compile(r"[A-Za-z]{1,12}")
_SLOTS = re.compile(r"[0-9]{1,2}")
_OPTIONS = "token=, header=, slots= or folder="
_MAX_SLOTS = 16


class _Invalid(Exception):
    """What is wrong with one entry of ``COMFYUI_BACKENDS``: the end of the sentence."""


def _unprintable(text: str) -> bool:
    return any(c.isspace() or not c.isprintable() for c in text)


def _header_safe(text: str) -> bool:
    """Printable ASCII (spaces allowed): what an HTTP header value can carry."""
    return bool(text) and text.isascii() and text.isprintable()


def _backend_url(text: str) -> str:
    """``http(s)://host[:port][/prefix]`` without its trailing slash, or `_Invalid`."""
    if not text:
        raise _Invalid("has an empty URL")
    if _unprintable(text):
        raise _Invalid("has a URL with a space or control character in it")
    # A query or user info may hold a secret: these two are named, never echoed.
    if "?" in text or "#" in text:
        raise _Invalid("has a URL with a query or fragment ('?' or '#'), which it cannot have")
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise _Invalid(f'has the URL "{text}" which does not start with http:// or https://')
    if scheme.lower() not in ("http", "https"):
        raise _Invalid(f'has the URL "{text}" whose scheme is not http or https')
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        raise _Invalid("has a URL with a user name or password in it (use token= or header=)")
    if netloc.startswith("["):
        host, bracket, port = netloc[1:].partition("]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            bracket = ""
        if not bracket:
            raise _Invalid(f'has the URL "{text}" whose host is not an IPv6 address in brackets')
    else:
        if netloc.count(":") > 1:
            raise _Invalid(f'has the URL "{text}" whose IPv6 host is not in brackets ([::1])')
        host, colon, port = netloc.partition(":")
        if not host:
            raise _Invalid(f'has the URL "{text}" with no host')
        if not _HOST_NAME.fullmatch(host):
            raise _Invalid(f'has the URL "{text}" whose host is not a host name or IP address')
        port = colon + port
    if port and not (
        port.startswith(":") and _PORT.fullmatch(port[1:]) and 1 <= int(port[1:]) <= 65535
    ):
        raise _Invalid(f'has the URL "{text}" whose port is not a number from 1 to 65535')
    return f"{scheme.lower()}://{netloc}{(slash + path).rstrip('/')}"


def _backend(name: str, url: str, options: list[str]) -> BackendSpec:
    """One entry's `BackendSpec`, or `_Invalid` (which never repeats a token or header value)."""
    url = _backend_url(url.strip())
    given: dict[str, str] = {}
    headers: list[tuple[str, str]] = []
    for option in options:
        key, eq, value = option.partition("=")
        key = key.strip().lower()
        if not eq:
            raise _Invalid(f'has an option without "=" (expected {_OPTIONS})')
        if key == "header":
            header, colon, content = value.partition(":")
            header, content = header.strip(), content.strip()
            if not colon or not _HEADER_NAME.fullmatch(header):
                raise _Invalid("has a header= that is not Name:Value with a valid header name")
            if not _header_safe(content):
                raise _Invalid(
                    f'has the header "{header}" whose value is empty or not printable ASCII'
                )
            if header.lower() in (h.lower() for h, _ in headers):
                raise _Invalid(f'has the header "{header}" twice')
            headers.append((header, content))
        elif key in ("token", "slots", "folder"):
            if key in given:
                raise _Invalid(f"has {key}= twice")
            given[key] = value.strip()
        elif _OPTION_KEY.fullmatch(key):
            raise _Invalid(f'has the unknown option "{key}=" (expected {_OPTIONS})')
        else:
            raise _Invalid(f"has an option that is not {_OPTIONS}")
    token = given.get("token")
    if token is not None and (not _header_safe(token) or " " in token):
        raise _Invalid("has a token= that is empty or not printable ASCII without spaces")
    if token is not None and any(h.lower() == "authorization" for h, _ in headers):
        raise _Invalid("has both token= and an Authorization header=, which is one too many")
    slots = given.get("slots", "1")
    if not (_SLOTS.fullmatch(slots) and 1 <= int(slots) <= _MAX_SLOTS):
        raise _Invalid(f'has slots="{slots}", which is not a whole number from 1 to {_MAX_SLOTS}')
    folder = given.get("folder")
    if folder is not None and (not folder or "\0" in folder):
        raise _Invalid("has a folder= that is empty or has a NUL byte in it")
    return BackendSpec(
        name=name,
        url=url,
        token=token,
        headers=tuple(headers),
        slots=int(slots),
        folder_path=None if folder is None else Path(folder).expanduser(),
    )


def _backends(variable: str) -> Callable[[Any], tuple[BackendSpec, ...]]:
    """Comma-separated ``name=URL[;option...]`` entries (see `Settings.comfyui_backends`)."""

    def convert(value: Any) -> tuple[BackendSpec, ...]:
        if isinstance(value, tuple):
            return value  # already built (Settings.replace)
        entries = [e.strip() for e in str(value).split(",") if e.strip()]
        specs: list[BackendSpec] = []
        for number, entry in enumerate(entries, start=1):
            head, *options = entry.split(";")
            name, eq, url = head.partition("=")
            name = name.strip()
            label = f'entry {number} ("{name}")' if eq and name else f"entry {number}"
            try:
                if not eq or not name:
                    raise _Invalid("is not name=URL")
                if not _BACKEND_NAME.fullmatch(name):
                    raise _Invalid(
                        "has a name that is not 1 to 32 letters, digits, '.', '_' or '-'"
                    )
                same = [n for n, spec in enumerate(specs, start=1) if spec.name == name]
                if same:
                    raise _Invalid(f"has the same name as entry {same[0]}")
                specs.append(_backend(name, url, [o for o in options if o.strip()]))
            except _Invalid as why:
                raise ConfigError(f"{variable} is invalid: {label} {why}") from None
        return tuple(specs)

    return convert


def describe_backends(backends: tuple[BackendSpec, ...]) -> str:
    """``COMFYUI_BACKENDS`` as it would be written, with tokens and header values masked."""
    entries = []
    for spec in backends:
        parts = [f"{spec.name}={spec.url}"]
        if spec.token:
            parts.append("token=***")
        parts += [f"header={header}:***" for header, _ in spec.headers]
        if spec.slots != 1:
            parts.append(f"slots={spec.slots}")
        if spec.folder_path is not None:
            parts.append(f"folder={spec.folder_path}")
        entries.append(";".join(parts))
    return ",".join(entries)


def _flag(name: str) -> Callable[[Any], bool]:
    def convert(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("", "0", "false", "no", "off"):
            return False
        raise _bad(name, str(value), "expected 1 or 0")

    return convert


def _networks(name: str) -> Callable[[Any], tuple[IPNetwork, ...]]:
    """Comma-separated networks (``10.0.0.0/8``, ``192.168.1.20``, ``fd00::/8``)."""

    def convert(value: Any) -> tuple[IPNetwork, ...]:
        if isinstance(value, tuple):
            return value
        networks: list[IPNetwork] = []
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise _bad(name, str(value), f"{part!r} is not an address or network") from None
        return tuple(networks)

    return convert


def _webhook_secret(name: str) -> Callable[[Any], str]:
    """A Standard Webhooks secret: ``whsec_`` and base64 of 24 to 64 bytes (never echoed)."""

    def convert(value: Any) -> str:
        text = str(value).strip()
        if not text:
            return ""
        import base64
        import binascii

        body = text.removeprefix("whsec_")
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if not 24 <= len(raw) <= 64:
            raise ConfigError(
                f"{name} is invalid: expected whsec_ and the base64 of 24 to 64 random bytes "
                '(python -c \'import base64,os; print("whsec_" + '
                "base64.b64encode(os.urandom(32)).decode())')"
            )
        return text

    return convert


def _key_webhooks(name: str) -> Callable[[Any], tuple[tuple[str, str, str], ...]]:
    """``keyname=URL[;secret=whsec_...]`` entries: each API key's default webhook URL and its
    own signing secret (the URL may be empty: a secret only)."""

    def convert(value: Any) -> tuple[tuple[str, str, str], ...]:
        if isinstance(value, tuple):
            return value
        entries = [e.strip() for e in str(value).split(",") if e.strip()]
        result: list[tuple[str, str, str]] = []
        for number, entry in enumerate(entries, start=1):
            head, *options = entry.split(";")
            key, sep, url = head.partition("=")
            key, url = key.strip(), url.strip()
            if not sep or not _KEY_NAME.fullmatch(key):
                raise ConfigError(
                    f"{name} is invalid: entry {number} is not keyname=URL (a key name is 1 to "
                    "32 letters, digits, '.', '_' or '-')"
                )
            if url and not url.startswith(("http://", "https://")):
                raise ConfigError(
                    f"{name} is invalid: entry {number} ({key!r}) has a URL that does not "
                    "start with http:// or https://"
                )
            secret = ""
            for option in options:
                option_name, _, option_value = option.strip().partition("=")
                if option_name != "secret":
                    raise ConfigError(
                        f"{name} is invalid: entry {number} ({key!r}) has an option that is "
                        "not secret="
                    )
                secret = _webhook_secret(f"{name} entry {number} ({key!r})")(option_value)
            result.append((key, url, secret))
        return tuple(result)

    return convert


#: Every variable a setting reads (filled in by `_v` as the class below is defined).
KNOWN_VARIABLES: set[str] = set()
#: Read by the client commands (``fategen submit``, ``status``...), never by the service:
#: allowed in the environment, still refused in the service's ``.env`` file.
CLIENT_VARIABLES = frozenset({"FATEGEN_URL", "FATEGEN_KEY"})
#: Variables with these prefixes are fategen's: one that is not known is a typo.
PREFIXES = ("FATEGEN_", "COMFYUI_")


def _v(name: str, default: Any, converter: Callable[[Any], Any]) -> Any:
    KNOWN_VARIABLES.add(name)
    return environ.var(default, name=name, converter=converter)


def _check_names(names: Mapping[str, str], dotenv: Path | None, from_file: set[str]) -> None:
    """A ``FATEGEN_*`` or ``COMFYUI_*`` variable no setting reads is a mistake (a typo in
    ``FATEGEN_API_KEYS`` must not silently turn authentication off)."""
    for name in sorted(names):
        if not name.startswith(PREFIXES) or name in KNOWN_VARIABLES:
            continue
        if name in CLIENT_VARIABLES and name not in from_file:
            continue
        hint = ""
        # Compared without the shared prefix, which would make every name look alike.
        rest = {known.split("_", 1)[1]: known for known in sorted(KNOWN_VARIABLES)}
        close = difflib.get_close_matches(name.split("_", 1)[1], list(rest), n=1, cutoff=0.7)
        if close:
            hint = f"; did you mean {rest[close[0]]}?"
        where = f" (in {dotenv})" if name in from_file else ""
        raise ConfigError(
            f"{name}{where} is not a fategen setting{hint} (fategen settings lists them all)"
        )


@environ.config(prefix="", frozen=True)
class Settings:
    """Every setting the service reads. Names are the environment variables."""

    comfyui_address: str = _v("COMFYUI_ADDRESS", "127.0.0.1", _host("COMFYUI_ADDRESS"))
    comfyui_port: int = _v("COMFYUI_PORT", 8188, _integer("COMFYUI_PORT", low=1, high=65535))
    #: ComfyUI's output folder, when fategen runs on the same file system (read images directly).
    comfyui_folder_path: Path | None = _v(
        "COMFYUI_FOLDER_PATH", "", _path("COMFYUI_FOLDER_PATH", optional=True)
    )
    #: Several ComfyUI servers: comma-separated ``name=URL`` entries, each optionally followed
    #: by ``;token=SECRET`` (sent as a bearer token), ``;header=Name:Value`` (repeatable),
    #: ``;slots=N`` (prompts run on it at once, 1 to 16; default 1) and ``;folder=PATH`` (its
    #: output folder, when readable here). When set it wins over ``COMFYUI_ADDRESS``/
    #: ``COMFYUI_PORT``/``COMFYUI_FOLDER_PATH`` (setting both is not an error); empty = the one
    #: server those name. Use `backends`, which gives the fleet either way.
    comfyui_backends: tuple[BackendSpec, ...] = _v(
        "COMFYUI_BACKENDS", "", _backends("COMFYUI_BACKENDS")
    )
    log_level: str = _v("LOG_LEVEL", "INFO", _log_level)
    #: ``text`` (one line per event) or ``json`` (one JSON object per line).
    log_format: str = _v("LOG_FORMAT", "text", _log_format)
    http_host: str = _v("FATEGEN_HOST", "127.0.0.1", _host("FATEGEN_HOST"))
    http_port: int = _v("FATEGEN_PORT", 8000, _integer("FATEGEN_PORT", low=0, high=65535))
    #: Where finished WebP images are written.
    output_dir: Path = _v("FATEGEN_OUTPUT_DIR", "output", _path("FATEGEN_OUTPUT_DIR"))
    #: Where the job database lives.
    data_dir: Path = _v("FATEGEN_DATA_DIR", "data", _path("FATEGEN_DATA_DIR"))
    model_config: Path = _v(
        "FATEGEN_MODEL_CONFIG", "config/modelConfiguration.json", _path("FATEGEN_MODEL_CONFIG")
    )
    workflows_dir: Path = _v("FATEGEN_WORKFLOWS_DIR", "workflows", _path("FATEGEN_WORKFLOWS_DIR"))
    webp_quality: int = _v(
        "FATEGEN_WEBP_QUALITY", 90, _integer("FATEGEN_WEBP_QUALITY", low=1, high=100)
    )
    #: Seconds idle before models are unloaded from VRAM (``/free unload_models``).
    idle_unload_seconds: float = _v(
        "FATEGEN_IDLE_UNLOAD_SECONDS", 600, _seconds("FATEGEN_IDLE_UNLOAD_SECONDS")
    )
    #: Seconds idle before ComfyUI also drops its RAM caches (``free_memory``); 0 turns it off.
    idle_free_memory_seconds: float = _v(
        "FATEGEN_IDLE_FREE_MEMORY_SECONDS",
        3600,
        _seconds("FATEGEN_IDLE_FREE_MEMORY_SECONDS", allow_zero=True),
    )
    wait_timeout_default: float = _v("FATEGEN_WAIT_TIMEOUT", 30, _seconds("FATEGEN_WAIT_TIMEOUT"))
    wait_timeout_max: float = _v(
        "FATEGEN_WAIT_TIMEOUT_MAX", 300, _seconds("FATEGEN_WAIT_TIMEOUT_MAX")
    )
    #: A client that sends nothing for this long is dropped (slow-header clients); raised to
    #: the longest /wait plus a margin, since hypercorn applies it while a request is answered.
    read_timeout: float = _v("FATEGEN_READ_TIMEOUT", 30, _seconds("FATEGEN_READ_TIMEOUT"))
    connect_timeout: float = _v("FATEGEN_CONNECT_TIMEOUT", 10, _seconds("FATEGEN_CONNECT_TIMEOUT"))
    #: A job with no progress event for this long is interrupted and failed.
    stall_timeout: float = _v("FATEGEN_STALL_TIMEOUT", 120, _seconds("FATEGEN_STALL_TIMEOUT"))
    #: No job may run longer than this.
    job_timeout: float = _v("FATEGEN_JOB_TIMEOUT", 900, _seconds("FATEGEN_JOB_TIMEOUT"))
    #: On SIGINT/SIGTERM, how long the running job may take to finish.
    shutdown_grace: float = _v(
        "FATEGEN_SHUTDOWN_GRACE", 30, _seconds("FATEGEN_SHUTDOWN_GRACE", allow_zero=True)
    )
    #: Client connections open at once (fewer if the process's file descriptors cannot hold
    #: them); more wait in the listen backlog.
    max_connections: int = _v(
        "FATEGEN_MAX_CONNECTIONS", 10_000, _integer("FATEGEN_MAX_CONNECTIONS", low=1)
    )
    #: Connections the kernel completes and holds until they are accepted (``listen``'s
    #: backlog; Linux caps it at ``net.core.somaxconn``): thousands of bots connecting at once
    #: wait there instead of retrying their SYNs for seconds.
    listen_backlog: int = _v(
        "FATEGEN_LISTEN_BACKLOG", 4096, _integer("FATEGEN_LISTEN_BACKLOG", low=1)
    )
    #: Seconds any one call to ComfyUI may take in all (a trickling answer is cut off).
    comfyui_call_timeout: float = _v(
        "FATEGEN_COMFYUI_CALL_TIMEOUT", 60, _seconds("FATEGEN_COMFYUI_CALL_TIMEOUT")
    )
    #: The largest answer taken from ComfyUI (an image, /history, /object_info), in MiB.
    comfyui_max_response_mib: int = _v(
        "FATEGEN_COMFYUI_MAX_RESPONSE_MIB",
        128,
        _integer("FATEGEN_COMFYUI_MAX_RESPONSE_MIB", low=1),
    )
    #: Seconds between two health probes of each ComfyUI server.
    probe_interval: float = _v("FATEGEN_PROBE_INTERVAL", 1.0, _seconds("FATEGEN_PROBE_INTERVAL"))
    #: Seconds a health probe may take before the server counts as down.
    probe_timeout: float = _v("FATEGEN_PROBE_TIMEOUT", 1.0, _seconds("FATEGEN_PROBE_TIMEOUT"))
    #: A job lost by this many ComfyUI servers in a row (each went down while running it) fails
    #: instead of being tried on another one.
    max_losses: int = _v("FATEGEN_MAX_LOSSES", 3, _integer("FATEGEN_MAX_LOSSES", low=1, high=100))
    max_queue_per_user: int = _v(
        "FATEGEN_MAX_QUEUE_PER_USER", 10, _integer("FATEGEN_MAX_QUEUE_PER_USER", low=1)
    )
    max_queue: int = _v("FATEGEN_MAX_QUEUE", 500, _integer("FATEGEN_MAX_QUEUE", low=1))
    #: Hours an Idempotency-Key holds.
    idempotency_hours: float = _v(
        "FATEGEN_IDEMPOTENCY_HOURS", 24, _hours("FATEGEN_IDEMPOTENCY_HOURS")
    )
    #: Model affinity: how many times a job may be passed over for one on the loaded model.
    affinity_max_passes: int = _v(
        "FATEGEN_AFFINITY_MAX_PASSES", 3, _integer("FATEGEN_AFFINITY_MAX_PASSES", low=0)
    )
    #: Model affinity: seconds a job may wait once first passed over.
    affinity_max_delay: float = _v(
        "FATEGEN_AFFINITY_MAX_DELAY",
        120,
        _seconds("FATEGEN_AFFINITY_MAX_DELAY", allow_zero=True),
    )
    #: Finished jobs and their images are deleted after this many hours; 0 keeps them forever.
    retention_hours: float = _v("FATEGEN_RETENTION_HOURS", 168, _hours("FATEGEN_RETENTION_HOURS"))
    #: Seconds between two prunings of old jobs.
    prune_interval: float = _v("FATEGEN_PRUNE_INTERVAL", 600, _seconds("FATEGEN_PRUNE_INTERVAL"))
    #: Bearer tokens, comma-separated; empty = no authentication.
    api_keys: frozenset[str] = _v("FATEGEN_API_KEYS", "", _keys("FATEGEN_API_KEYS"))
    admin_keys: frozenset[str] = _v("FATEGEN_ADMIN_KEYS", "", _keys("FATEGEN_ADMIN_KEYS"))
    #: Reverse proxies in front of the service whose X-Forwarded-For/-Proto/-Host are
    #: trusted (0: none; then the headers are ignored, so a client cannot forge them).
    trusted_proxy_hops: int = _v(
        "FATEGEN_TRUSTED_PROXY_HOPS", 0, _integer("FATEGEN_TRUSTED_PROXY_HOPS", low=0, high=10)
    )
    #: The secret webhooks are signed with (Standard Webhooks: ``whsec_`` + base64); empty:
    #: webhooks are refused unless the API key has its own (``FATEGEN_KEY_WEBHOOKS``).
    webhook_secret: str = _v(
        "FATEGEN_WEBHOOK_SECRET", "", _webhook_secret("FATEGEN_WEBHOOK_SECRET")
    )
    #: Per API key: its default webhook URL and its own secret, ``name=URL;secret=whsec_...``.
    key_webhooks: tuple[tuple[str, str, str], ...] = _v(
        "FATEGEN_KEY_WEBHOOKS", "", _key_webhooks("FATEGEN_KEY_WEBHOOKS")
    )
    #: Allow webhook URLs on loopback, private and link-local addresses (tests, a LAN bot).
    webhook_allow_private: bool = _v(
        "FATEGEN_WEBHOOK_ALLOW_PRIVATE", "0", _flag("FATEGEN_WEBHOOK_ALLOW_PRIVATE")
    )
    #: Input images (``--image URL``, ``image_url``, an upload): the largest file, the most
    #: pixels, the seconds a fetch may take (redirects and body included), and the networks
    #: (private ones, e.g. an internal CDN) fetches may reach besides public addresses.
    image_max_mib: int = _v(
        "FATEGEN_IMAGE_MAX_MIB", 20, _integer("FATEGEN_IMAGE_MAX_MIB", low=1, high=200)
    )
    image_max_megapixels: int = _v(
        "FATEGEN_IMAGE_MAX_MEGAPIXELS",
        40,
        _integer("FATEGEN_IMAGE_MAX_MEGAPIXELS", low=1, high=400),
    )
    image_fetch_timeout: float = _v(
        "FATEGEN_IMAGE_FETCH_TIMEOUT", 20, _seconds("FATEGEN_IMAGE_FETCH_TIMEOUT")
    )
    image_allow_networks: tuple[IPNetwork, ...] = _v(
        "FATEGEN_IMAGE_ALLOW_NETWORKS", "", _networks("FATEGEN_IMAGE_ALLOW_NETWORKS")
    )
    #: Event streams (Server-Sent Events) open at once; past it, 429.
    max_streams: int = _v("FATEGEN_MAX_STREAMS", 1000, _integer("FATEGEN_MAX_STREAMS", low=1))
    #: Seconds between heartbeat comments on an idle event stream (proxies close silent ones).
    events_heartbeat: float = _v(
        "FATEGEN_EVENTS_HEARTBEAT", 15, _seconds("FATEGEN_EVENTS_HEARTBEAT")
    )
    #: The URL bots should use to reach this service (for image links); empty = from the request.
    public_url: str = _v("FATEGEN_PUBLIC_URL", "", lambda v: str(v).strip().rstrip("/"))

    @property
    def comfyui_url(self) -> str:
        host = self.comfyui_address
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.comfyui_port}"

    @property
    def backends(self) -> tuple[BackendSpec, ...]:
        """The ComfyUI servers to drive: ``COMFYUI_BACKENDS``, or else a fleet of one made of
        ``COMFYUI_ADDRESS``/``COMFYUI_PORT``/``COMFYUI_FOLDER_PATH``."""
        if self.comfyui_backends:
            return self.comfyui_backends
        return (
            BackendSpec(
                name=DEFAULT_BACKEND, url=self.comfyui_url, folder_path=self.comfyui_folder_path
            ),
        )

    @classmethod
    def from_env(
        cls,
        environment: Mapping[str, str] | None = None,
        *,
        dotenv: Path | None = None,
        dotenv_required: bool = False,
    ) -> Settings:
        """Read the settings: ``environment`` (default ``os.environ``) over the ``.env`` file.

        ``dotenv`` may be missing unless ``dotenv_required`` (a file named on the command
        line). Without ``FATEGEN_MODEL_CONFIG`` / ``FATEGEN_WORKFLOWS_DIR`` and with no
        ``config/`` / ``workflows/`` in the working directory, the copies installed with
        fategen are used.

        Raises:
            ConfigError: one sentence naming the variable and its value.
        """
        merged: dict[str, str] = {}
        if dotenv is not None and (dotenv.is_file() or dotenv_required):
            from dotenv import dotenv_values

            if not dotenv.is_file():
                raise ConfigError(f"the settings file {dotenv} does not exist")
            merged.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
        from_file = set(merged)
        merged.update(os.environ if environment is None else environment)
        _check_names(
            merged, dotenv, from_file - set(os.environ if environment is None else environment)
        )
        merged = _with_shipped_defaults(merged)
        try:
            return environ.to_config(cls, environ=merged)
        except ConfigError:
            raise
        except environ.MissingEnvValueError as exc:
            raise ConfigError(f"{exc} must be set") from None

    def replace(self, **changes: Any) -> Settings:
        import attrs

        return attrs.evolve(self, **changes)  # type: ignore[misc]


def shipped(name: str) -> Path:
    """The copy of ``config`` or ``workflows`` installed with fategen: inside the package in a
    wheel (``fategen/_data``), the repository's own in a source checkout."""
    package = Path(__file__).resolve().parent
    inside = package / "_data" / name
    return inside if inside.exists() else package.parent.parent / name


def _with_shipped_defaults(merged: dict[str, str]) -> dict[str, str]:
    defaults = {
        "FATEGEN_MODEL_CONFIG": ("config/modelConfiguration.json", "config"),
        "FATEGEN_WORKFLOWS_DIR": ("workflows", "workflows"),
    }
    result = dict(merged)
    for variable, (relative, name) in defaults.items():
        if variable in result or Path(relative).exists():
            continue
        installed = shipped(name)
        target = installed / "modelConfiguration.json" if name == "config" else installed
        if target.exists():
            result[variable] = str(target)
    return result
