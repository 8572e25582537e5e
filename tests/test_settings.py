"""Settings.from_env: defaults, every variable, one-sentence errors, .env, frozen."""

from __future__ import annotations

import io
import ipaddress
import os
from pathlib import Path
from typing import Any

import attrs
import pytest

from fategen.core.backends import DEFAULT_BACKEND, BackendSpec
from fategen.errors import ConfigError
from fategen.settings import KNOWN_VARIABLES, PREFIXES, Settings, describe_backends

KEY_A = "a" * 16
KEY_B = "b-0123456789abcdef"
FIELDS = attrs.fields(Settings)  # type: ignore[arg-type]  # environ.config is attrs underneath


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.comfyui_address == "127.0.0.1"
    assert s.comfyui_port == 8188
    assert s.comfyui_folder_path is None
    assert s.log_level == "INFO"
    assert s.http_host == "127.0.0.1"
    assert s.http_port == 8000
    assert s.output_dir == Path("output")
    assert s.data_dir == Path("data")
    assert s.model_config == Path("config/modelConfiguration.json")
    assert s.workflows_dir == Path("workflows")
    assert s.webp_quality == 90
    assert s.idle_unload_seconds == 600.0
    assert s.idle_free_memory_seconds == 3600.0
    assert s.wait_timeout_default == 30.0
    assert s.wait_timeout_max == 300.0
    assert s.connect_timeout == 10.0
    assert s.stall_timeout == 120.0
    assert s.job_timeout == 900.0
    assert s.shutdown_grace == 30.0
    assert s.max_queue_per_user == 10
    assert s.max_queue == 500
    assert s.listen_backlog == 4096  # hypercorn's 100 made bursts of clients retry SYNs
    assert s.api_keys == frozenset()
    assert s.admin_keys == frozenset()
    assert s.public_url == ""
    assert s.comfyui_url == "http://127.0.0.1:8188"
    assert s.comfyui_backends == ()
    assert s.probe_interval == 1.0
    assert s.probe_timeout == 1.0
    assert s.max_losses == 3


def test_defaults_have_the_declared_types() -> None:
    s = Settings.from_env({})
    for field in FIELDS:
        value = getattr(s, field.name)
        if isinstance(value, float):
            assert type(value) is float, field.name
    assert type(s.comfyui_port) is int


EVERY_VARIABLE: list[tuple[str, str, str, Any]] = [
    ("COMFYUI_ADDRESS", " comfy.lan ", "comfyui_address", "comfy.lan"),
    ("COMFYUI_PORT", "8189", "comfyui_port", 8189),
    ("COMFYUI_FOLDER_PATH", "/srv/comfy/output", "comfyui_folder_path", Path("/srv/comfy/output")),
    (
        "COMFYUI_BACKENDS",
        " gpu0=http://gpu0.lan:8188/ , gpu1=https://gpu1.lan:8443;token=abc123;slots=2 ,",
        "comfyui_backends",
        (
            BackendSpec(name="gpu0", url="http://gpu0.lan:8188"),
            BackendSpec(name="gpu1", url="https://gpu1.lan:8443", token="abc123", slots=2),
        ),
    ),
    ("FATEGEN_PROBE_INTERVAL", "0.25", "probe_interval", 0.25),
    ("FATEGEN_PROBE_TIMEOUT", "2", "probe_timeout", 2.0),
    ("FATEGEN_MAX_LOSSES", "5", "max_losses", 5),
    ("LOG_LEVEL", " debug ", "log_level", "DEBUG"),
    ("FATEGEN_HOST", "0.0.0.0", "http_host", "0.0.0.0"),
    ("FATEGEN_PORT", "0", "http_port", 0),
    ("FATEGEN_OUTPUT_DIR", "/var/fategen/out", "output_dir", Path("/var/fategen/out")),
    ("FATEGEN_DATA_DIR", "/var/fategen/db", "data_dir", Path("/var/fategen/db")),
    ("FATEGEN_MODEL_CONFIG", "models.json", "model_config", Path("models.json")),
    ("FATEGEN_WORKFLOWS_DIR", "wf", "workflows_dir", Path("wf")),
    ("FATEGEN_WEBP_QUALITY", "75", "webp_quality", 75),
    ("FATEGEN_IDLE_UNLOAD_SECONDS", "1.5", "idle_unload_seconds", 1.5),
    ("FATEGEN_IDLE_FREE_MEMORY_SECONDS", "0", "idle_free_memory_seconds", 0.0),
    ("FATEGEN_WAIT_TIMEOUT", "45", "wait_timeout_default", 45.0),
    ("FATEGEN_WAIT_TIMEOUT_MAX", "1e3", "wait_timeout_max", 1000.0),
    ("FATEGEN_CONNECT_TIMEOUT", "2.5", "connect_timeout", 2.5),
    ("FATEGEN_READ_TIMEOUT", "12", "read_timeout", 12.0),
    ("FATEGEN_STALL_TIMEOUT", "60", "stall_timeout", 60.0),
    ("FATEGEN_JOB_TIMEOUT", "1800", "job_timeout", 1800.0),
    ("FATEGEN_SHUTDOWN_GRACE", "0", "shutdown_grace", 0.0),
    ("FATEGEN_MAX_QUEUE_PER_USER", "3", "max_queue_per_user", 3),
    ("FATEGEN_MAX_QUEUE", "1000", "max_queue", 1000),
    ("FATEGEN_MAX_CONNECTIONS", "2000", "max_connections", 2000),
    ("FATEGEN_LISTEN_BACKLOG", "1024", "listen_backlog", 1024),
    ("LOG_FORMAT", " JSON ", "log_format", "json"),
    ("FATEGEN_TRUSTED_PROXY_HOPS", "2", "trusted_proxy_hops", 2),
    ("FATEGEN_IDEMPOTENCY_HOURS", "48", "idempotency_hours", 48.0),
    ("FATEGEN_COMFYUI_CALL_TIMEOUT", "12.5", "comfyui_call_timeout", 12.5),
    ("FATEGEN_COMFYUI_MAX_RESPONSE_MIB", "64", "comfyui_max_response_mib", 64),
    ("FATEGEN_AFFINITY_MAX_PASSES", "0", "affinity_max_passes", 0),
    ("FATEGEN_AFFINITY_MAX_DELAY", "30", "affinity_max_delay", 30.0),
    ("FATEGEN_RETENTION_HOURS", "0", "retention_hours", 0.0),
    ("FATEGEN_PRUNE_INTERVAL", "60", "prune_interval", 60.0),
    ("FATEGEN_API_KEYS", f" {KEY_A} ,{KEY_B},,", "api_keys", frozenset({KEY_A, KEY_B})),
    ("FATEGEN_ADMIN_KEYS", KEY_B, "admin_keys", frozenset({KEY_B})),
    ("FATEGEN_PUBLIC_URL", " https://img.example.org/ ", "public_url", "https://img.example.org"),
    ("FATEGEN_MAX_STREAMS", "50", "max_streams", 50),
    ("FATEGEN_WEBHOOK_SECRET", "whsec_" + "A" * 44, "webhook_secret", "whsec_" + "A" * 44),
    (
        "FATEGEN_KEY_WEBHOOKS",
        "ircbot=https://bot.example.org/hook;secret=whsec_" + "B" * 44 + ",other=",
        "key_webhooks",
        (("ircbot", "https://bot.example.org/hook", "whsec_" + "B" * 44), ("other", "", "")),
    ),
    ("FATEGEN_WEBHOOK_ALLOW_PRIVATE", "1", "webhook_allow_private", True),
    ("FATEGEN_EVENTS_HEARTBEAT", "2.5", "events_heartbeat", 2.5),
    ("FATEGEN_IMAGE_MAX_MIB", "8", "image_max_mib", 8),
    ("FATEGEN_IMAGE_MAX_MEGAPIXELS", "12", "image_max_megapixels", 12),
    ("FATEGEN_IMAGE_FETCH_TIMEOUT", "7.5", "image_fetch_timeout", 7.5),
    (
        "FATEGEN_IMAGE_ALLOW_NETWORKS",
        " 10.0.0.0/8, 192.168.1.20 ,fd00::/8",
        "image_allow_networks",
        (
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("192.168.1.20/32"),
            ipaddress.ip_network("fd00::/8"),
        ),
    ),
]


@pytest.mark.parametrize(("variable", "raw", "attribute", "expected"), EVERY_VARIABLE)
def test_every_variable_is_parsed(variable: str, raw: str, attribute: str, expected: Any) -> None:
    s = Settings.from_env({variable: raw})
    value = getattr(s, attribute)
    assert value == expected
    assert type(value) is type(expected)


def test_every_field_is_covered() -> None:
    assert {a for _, _, a, _ in EVERY_VARIABLE} == {f.name for f in FIELDS}


def test_all_variables_at_once() -> None:
    s = Settings.from_env({v: raw for v, raw, _, _ in EVERY_VARIABLE})
    for _, _, attribute, expected in EVERY_VARIABLE:
        assert getattr(s, attribute) == expected


def test_other_programs_variables_are_ignored() -> None:
    assert Settings.from_env({"PATH": "/bin", "COMFY_X": "1"}) == Settings.from_env({})


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("FATEGEN_API_KEY", "; did you mean FATEGEN_API_KEYS?"),
        ("FATEGEN_ADMIN_KEY", "; did you mean FATEGEN_ADMIN_KEYS?"),
        ("COMFYUI_ADRESS", "; did you mean COMFYUI_ADDRESS?"),
        ("FATEGEN_XYZZY_QUUX", ""),
    ],
)
def test_an_unknown_fategen_variable_stops_start_up(name: str, hint: str) -> None:
    """A typo must never silently turn authentication off."""
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: "secret-token-value"})
    assert str(err.value) == (
        f"{name} is not a fategen setting{hint} (fategen settings lists them all)"
    )


def test_an_unknown_variable_in_the_env_file_names_the_file(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("FATEGEN_API_KEY=abc\n")
    with pytest.raises(ConfigError, match=r"FATEGEN_API_KEY \(in .*\.env\) is not"):
        Settings.from_env({}, dotenv=env)


def test_a_named_env_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "prod.env"
    with pytest.raises(ConfigError, match=r"the settings file .*prod\.env does not exist"):
        Settings.from_env({}, dotenv=missing, dotenv_required=True)
    assert Settings.from_env({}, dotenv=missing) == Settings.from_env({})


def test_home_is_expanded_in_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/fate")
    assert Settings.from_env({"FATEGEN_DATA_DIR": "~/db"}).data_dir == Path("/home/fate/db")


BAD_VALUES = [
    ("FATEGEN_WEBHOOK_ALLOW_PRIVATE", "maybe"),
    ("FATEGEN_IMAGE_ALLOW_NETWORKS", "10.0.0.0/33"),
    ("FATEGEN_IMAGE_ALLOW_NETWORKS", "cdn.lan"),
    ("FATEGEN_IMAGE_MAX_MIB", "0"),
    ("FATEGEN_IMAGE_MAX_MEGAPIXELS", "1000"),
    ("COMFYUI_PORT", "abc"),
    ("COMFYUI_PORT", "70000"),
    ("COMFYUI_PORT", "0"),
    ("COMFYUI_PORT", ""),
    ("COMFYUI_PORT", "80.5"),
    ("FATEGEN_PORT", "-1"),
    ("FATEGEN_PORT", "65536"),
    ("FATEGEN_WEBP_QUALITY", "0"),
    ("FATEGEN_WEBP_QUALITY", "101"),
    ("FATEGEN_MAX_QUEUE", "0"),
    ("FATEGEN_MAX_CONNECTIONS", "0"),
    ("FATEGEN_LISTEN_BACKLOG", "0"),
    ("FATEGEN_LISTEN_BACKLOG", "lots"),
    ("LOG_FORMAT", "xml"),
    ("FATEGEN_TRUSTED_PROXY_HOPS", "-1"),
    ("FATEGEN_COMFYUI_CALL_TIMEOUT", "0"),
    ("FATEGEN_COMFYUI_MAX_RESPONSE_MIB", "none"),
    ("FATEGEN_MAX_QUEUE_PER_USER", "many"),
    ("FATEGEN_JOB_TIMEOUT", "-1"),
    ("FATEGEN_JOB_TIMEOUT", "0"),
    ("FATEGEN_STALL_TIMEOUT", "nan"),
    ("FATEGEN_WAIT_TIMEOUT", "inf"),
    ("FATEGEN_WAIT_TIMEOUT_MAX", "-inf"),
    ("FATEGEN_CONNECT_TIMEOUT", "ten"),
    ("FATEGEN_IDLE_UNLOAD_SECONDS", "0"),
    ("FATEGEN_IDLE_FREE_MEMORY_SECONDS", "-0.5"),
    ("FATEGEN_SHUTDOWN_GRACE", "1e400"),
    ("LOG_LEVEL", "junk"),
    ("LOG_LEVEL", ""),
    ("COMFYUI_ADDRESS", ""),
    ("COMFYUI_ADDRESS", "http://comfy"),
    ("COMFYUI_ADDRESS", "comfy host"),
    ("FATEGEN_HOST", "user@host"),
    ("FATEGEN_OUTPUT_DIR", ""),
    ("FATEGEN_DATA_DIR", "  "),
    ("FATEGEN_WORKFLOWS_DIR", "wf\0x"),
    ("COMFYUI_FOLDER_PATH", "out\0put"),
    ("FATEGEN_PROBE_INTERVAL", "0"),
    ("FATEGEN_PROBE_TIMEOUT", "-1"),
    ("FATEGEN_PROBE_TIMEOUT", "soon"),
    ("FATEGEN_MAX_LOSSES", "0"),
    ("FATEGEN_MAX_LOSSES", "101"),
]


def _one_sentence(message: str) -> None:
    assert message
    assert "\n" not in message
    body = message.rstrip(".")
    assert ". " not in body, message


@pytest.mark.parametrize(("variable", "raw"), BAD_VALUES)
def test_bad_value_is_one_sentence_naming_variable_and_value(variable: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: raw})
    message = str(caught.value)
    _one_sentence(message)
    assert message.startswith(variable)
    assert repr(raw) in message or repr(raw.strip()) in message
    assert caught.value.__cause__ is None


def test_nan_is_called_not_finite() -> None:
    with pytest.raises(ConfigError, match=r"FATEGEN_STALL_TIMEOUT='nan' .*finite"):
        Settings.from_env({"FATEGEN_STALL_TIMEOUT": "nan"})


def test_port_out_of_range_says_the_range() -> None:
    with pytest.raises(ConfigError, match=r"^COMFYUI_PORT='70000' .*from 1 to 65535$"):
        Settings.from_env({"COMFYUI_PORT": "70000"})


@pytest.mark.parametrize("variable", ["FATEGEN_API_KEYS", "FATEGEN_ADMIN_KEYS"])
def test_short_key_names_its_own_variable_but_never_echoes_the_secret(variable: str) -> None:
    secret = "hunter2-short"
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: f"{KEY_A},{secret}"})
    message = str(caught.value)
    _one_sentence(message)
    assert message.startswith(f"{variable} is invalid")
    assert "key 2 of 2" in message
    assert f"{len(secret)} characters" in message
    assert secret not in message
    assert KEY_A not in message


def test_empty_keys_mean_no_authentication() -> None:
    s = Settings.from_env({"FATEGEN_API_KEYS": " , ", "FATEGEN_ADMIN_KEYS": ""})
    assert s.api_keys == frozenset()
    assert s.admin_keys == frozenset()


# -- .env ------------------------------------------------------------------------------


def test_dotenv_is_read(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# comment\nCOMFYUI_PORT=9001\nexport LOG_LEVEL=warning\n"
        f'FATEGEN_API_KEYS="{KEY_A},{KEY_B}"\n'
    )
    s = Settings.from_env({}, dotenv=dotenv)
    assert s.comfyui_port == 9001
    assert s.log_level == "WARNING"
    assert s.api_keys == frozenset({KEY_A, KEY_B})


def test_environment_wins_over_dotenv(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("COMFYUI_PORT=9001\nFATEGEN_PORT=9002\n")
    s = Settings.from_env({"COMFYUI_PORT": "9100"}, dotenv=dotenv)
    assert s.comfyui_port == 9100
    assert s.http_port == 9002


def test_environment_can_fix_a_bad_dotenv_value(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("COMFYUI_PORT=abc\n")
    with pytest.raises(ConfigError, match="COMFYUI_PORT='abc'"):
        Settings.from_env({}, dotenv=dotenv)
    assert Settings.from_env({"COMFYUI_PORT": "1234"}, dotenv=dotenv).comfyui_port == 1234


def test_missing_dotenv_is_fine(tmp_path: Path) -> None:
    assert Settings.from_env({}, dotenv=tmp_path / "absent.env") == Settings.from_env({})


def test_dotenv_variable_without_value_is_ignored(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("COMFYUI_PORT\nFATEGEN_PORT=9002\n")
    s = Settings.from_env({}, dotenv=dotenv)
    assert s.comfyui_port == 8188
    assert s.http_port == 9002


def test_default_environment_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FATEGEN_MAX_QUEUE", "7")
    assert Settings.from_env().max_queue == 7


# -- the object ------------------------------------------------------------------------


def test_frozen() -> None:
    s = Settings.from_env({})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        s.http_port = 1
    assert s.http_port == 8000


def test_replace_returns_a_new_object() -> None:
    s = Settings.from_env({})
    t = s.replace(http_port=1234)
    assert (s.http_port, t.http_port) == (8000, 1234)


def test_equal_and_hashable() -> None:
    assert Settings.from_env({}) == Settings.from_env({})
    assert hash(Settings.from_env({})) == hash(Settings.from_env({}))


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:7000"),
        ("comfy.lan", "http://comfy.lan:7000"),
        ("::1", "http://[::1]:7000"),
        ("fd00::12:34", "http://[fd00::12:34]:7000"),
        ("[::1]", "http://[::1]:7000"),
    ],
)
def test_comfyui_url(address: str, url: str) -> None:
    s = Settings.from_env({"COMFYUI_ADDRESS": address, "COMFYUI_PORT": "7000"})
    assert s.comfyui_url == url


# -- COMFYUI_BACKENDS ------------------------------------------------------------------

SECRET = "s3cret-T0ken-value"
HIDDEN = "hidden-Header-value"


def test_backends_with_every_option(tmp_path: Path) -> None:
    raw = (
        f"gpu0=http://gpu0.lan:8188,"
        f"gpu1=HTTPS://gpu1.lan:8443/comfy/;token={SECRET};header=X-Team:{HIDDEN}"
        f";header=CF-Access-Client-Id:id.access;slots=4;folder={tmp_path}/out;"
    )
    s = Settings.from_env({"COMFYUI_BACKENDS": raw})
    assert s.comfyui_backends == (
        BackendSpec(name="gpu0", url="http://gpu0.lan:8188"),
        BackendSpec(
            name="gpu1",
            url="https://gpu1.lan:8443/comfy",
            token=SECRET,
            headers=(("X-Team", HIDDEN), ("CF-Access-Client-Id", "id.access")),
            slots=4,
            folder_path=tmp_path / "out",
        ),
    )
    assert s.backends == s.comfyui_backends
    assert s.backends[1].request_headers() == {
        "X-Team": HIDDEN,
        "CF-Access-Client-Id": "id.access",
        "Authorization": f"Bearer {SECRET}",
    }
    assert SECRET not in repr(s) and HIDDEN not in repr(s)


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        ("http://127.0.0.1:8188", "http://127.0.0.1:8188"),
        ("http://comfy.lan", "http://comfy.lan"),
        ("https://comfy.example.org/", "https://comfy.example.org"),
        ("https://proxy.lan/gpu/0//", "https://proxy.lan/gpu/0"),
        ("http://[::1]:8188", "http://[::1]:8188"),
        ("http://[fd00::12:34]/comfy/", "http://[fd00::12:34]/comfy"),
        ("http://comfy_1:65535", "http://comfy_1:65535"),
    ],
)
def test_backend_urls(url: str, kept: str) -> None:
    (spec,) = Settings.from_env({"COMFYUI_BACKENDS": f"a.b-c_9={url}"}).comfyui_backends
    assert (spec.name, spec.url, spec.slots, spec.token) == ("a.b-c_9", kept, 1, None)


ENTRY = 'COMFYUI_BACKENDS is invalid: entry 2 ("gpu1")'
BAD_BACKENDS = [
    ("gpu1=ftp://x", f'{ENTRY} has the URL "ftp://x" whose scheme is not http or https'),
    (
        "gpu1=gpu1.lan:8188",
        f'{ENTRY} has the URL "gpu1.lan:8188" which does not start with http:// or https://',
    ),
    ("gpu1=", f"{ENTRY} has an empty URL"),
    ("gpu1=http://", f'{ENTRY} has the URL "http://" with no host'),
    ("gpu1=http://:8188", f'{ENTRY} has the URL "http://:8188" with no host'),
    ("gpu1=http://a b", f"{ENTRY} has a URL with a space or control character in it"),
    (
        "gpu1=http://h:0",
        f'{ENTRY} has the URL "http://h:0" whose port is not a number from 1 to 65535',
    ),
    (
        "gpu1=http://h:65536",
        f'{ENTRY} has the URL "http://h:65536" whose port is not a number from 1 to 65535',
    ),
    (
        "gpu1=http://h:",
        f'{ENTRY} has the URL "http://h:" whose port is not a number from 1 to 65535',
    ),
    (
        "gpu1=http://h:http",
        f'{ENTRY} has the URL "http://h:http" whose port is not a number from 1 to 65535',
    ),
    (
        "gpu1=http://::1:8188",
        f'{ENTRY} has the URL "http://::1:8188" whose IPv6 host is not in brackets ([::1])',
    ),
    (
        "gpu1=http://[nope]:8188",
        f'{ENTRY} has the URL "http://[nope]:8188" whose host is not an IPv6 address in brackets',
    ),
    (
        "gpu1=http://[::1",
        f'{ENTRY} has the URL "http://[::1" whose host is not an IPv6 address in brackets',
    ),
    (
        "gpu1=http://h%2f:1",
        f'{ENTRY} has the URL "http://h%2f:1" whose host is not a host name or IP address',
    ),
    (
        f"gpu1=http://me:{SECRET}@h:8188",
        f"{ENTRY} has a URL with a user name or password in it (use token= or header=)",
    ),
    (
        f"gpu1=http://h/?key={SECRET}",
        f"{ENTRY} has a URL with a query or fragment ('?' or '#'), which it cannot have",
    ),
    (
        f"gpu1=http://h/#{SECRET}",
        f"{ENTRY} has a URL with a query or fragment ('?' or '#'), which it cannot have",
    ),
    ("http://gpu1.lan", "COMFYUI_BACKENDS is invalid: entry 2 is not name=URL"),
    ("=http://gpu1.lan", "COMFYUI_BACKENDS is invalid: entry 2 is not name=URL"),
    (
        "gpu 1=http://h",
        'COMFYUI_BACKENDS is invalid: entry 2 ("gpu 1") has a name that is not '
        "1 to 32 letters, digits, '.', '_' or '-'",
    ),
    (
        "g" * 33 + "=http://h",
        f'COMFYUI_BACKENDS is invalid: entry 2 ("{"g" * 33}") has a name '
        "that is not 1 to 32 letters, digits, '.', '_' or '-'",
    ),
    (
        "gpu0=http://other",
        'COMFYUI_BACKENDS is invalid: entry 2 ("gpu0") has the same name as entry 1',
    ),
    (
        f"gpu1=http://h;{SECRET}",
        f'{ENTRY} has an option without "=" (expected token=, header=, slots= or folder=)',
    ),
    (
        f"gpu1=http://h;tok={SECRET}",
        f'{ENTRY} has the unknown option "tok=" (expected token=, header=, slots= or folder=)',
    ),
    (
        f"gpu1=http://h;Bearer {SECRET}=x",
        f"{ENTRY} has an option that is not token=, header=, slots= or folder=",
    ),
    (
        "gpu1=http://h;token=",
        f"{ENTRY} has a token= that is empty or not printable ASCII without spaces",
    ),
    (
        f"gpu1=http://h;token=a {SECRET}",
        f"{ENTRY} has a token= that is empty or not printable ASCII without spaces",
    ),
    (
        f"gpu1=http://h;token={SECRET}\x07",
        f"{ENTRY} has a token= that is empty or not printable ASCII without spaces",
    ),
    (f"gpu1=http://h;token={SECRET};token={SECRET}", f"{ENTRY} has token= twice"),
    (
        f"gpu1=http://h;header={SECRET}",
        f"{ENTRY} has a header= that is not Name:Value with a valid header name",
    ),
    (
        f"gpu1=http://h;header=X Key:{SECRET}",
        f"{ENTRY} has a header= that is not Name:Value with a valid header name",
    ),
    (
        "gpu1=http://h;header=X-Key:",
        f'{ENTRY} has the header "X-Key" whose value is empty or not printable ASCII',
    ),
    (
        f"gpu1=http://h;header=X-Key:{SECRET}\u00e9",
        f'{ENTRY} has the header "X-Key" whose value is empty or not printable ASCII',
    ),
    (
        f"gpu1=http://h;header=X-Key:{SECRET};header=x-key:{HIDDEN}",
        f'{ENTRY} has the header "x-key" twice',
    ),
    (
        f"gpu1=http://h;token={SECRET};header=Authorization:Basic {HIDDEN}",
        f"{ENTRY} has both token= and an Authorization header=, which is one too many",
    ),
    ("gpu1=http://h;slots=0", f'{ENTRY} has slots="0", which is not a whole number from 1 to 16'),
    ("gpu1=http://h;slots=17", f'{ENTRY} has slots="17", which is not a whole number from 1 to 16'),
    (
        "gpu1=http://h;slots=two",
        f'{ENTRY} has slots="two", which is not a whole number from 1 to 16',
    ),
    (
        "gpu1=http://h;slots=\u00b2",
        f'{ENTRY} has slots="\u00b2", which is not a whole number from 1 to 16',
    ),
    ("gpu1=http://h;slots=1;slots=2", f"{ENTRY} has slots= twice"),
    ("gpu1=http://h;folder=", f"{ENTRY} has a folder= that is empty or has a NUL byte in it"),
    ("gpu1=http://h;folder=/a\0b", f"{ENTRY} has a folder= that is empty or has a NUL byte in it"),
]


@pytest.mark.parametrize(("second", "expected"), BAD_BACKENDS)
def test_a_bad_backend_is_one_sentence_naming_the_entry_never_a_secret(
    second: str, expected: str
) -> None:
    first = f"gpu0=http://gpu0.lan:8188;token={SECRET}0;header=X-Other:{HIDDEN}0"
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"COMFYUI_BACKENDS": f"{first}, {second}"})
    message = str(caught.value)
    assert message == expected
    _one_sentence(message)
    assert SECRET not in message and HIDDEN not in message
    assert caught.value.__cause__ is None


def test_no_backends_is_a_fleet_of_one_from_address_and_port() -> None:
    s = Settings.from_env(
        {"COMFYUI_ADDRESS": "::1", "COMFYUI_PORT": "7000", "COMFYUI_FOLDER_PATH": "/srv/out"}
    )
    assert s.comfyui_backends == ()
    assert s.backends == (
        BackendSpec(name=DEFAULT_BACKEND, url="http://[::1]:7000", folder_path=Path("/srv/out")),
    )
    assert Settings.from_env({"COMFYUI_BACKENDS": " , "}).backends == Settings.from_env({}).backends


def test_backends_win_over_address_and_port() -> None:
    s = Settings.from_env(
        {"COMFYUI_BACKENDS": "a=http://a.lan:1", "COMFYUI_ADDRESS": "b.lan", "COMFYUI_PORT": "2"}
    )
    assert s.backends == (BackendSpec(name="a", url="http://a.lan:1"),)


def test_replace_passes_built_backends_through() -> None:
    fleet = (
        BackendSpec(name="sim0", url="http://127.0.0.1:4000"),
        BackendSpec(name="sim1", url="http://127.0.0.1:4001", token=SECRET),
    )
    s = Settings.from_env({}).replace(comfyui_backends=fleet)
    assert s.comfyui_backends == fleet
    assert s.backends == fleet
    assert s.replace(comfyui_backends=()).backends[0].name == DEFAULT_BACKEND


def test_describe_backends_masks_the_secrets() -> None:
    raw = (
        "gpu0=http://gpu0.lan:8188,gpu1=https://gpu1.lan:8443;token=abc123;slots=1,"
        f"gpu2=http://gpu2.lan;header=X-Key:{HIDDEN};slots=3;folder=/srv/out"
    )
    described = describe_backends(Settings.from_env({"COMFYUI_BACKENDS": raw}).comfyui_backends)
    assert described == (
        "gpu0=http://gpu0.lan:8188,gpu1=https://gpu1.lan:8443;token=***,"
        "gpu2=http://gpu2.lan;header=X-Key:***;slots=3;folder=/srv/out"
    )


def test_fategen_settings_never_prints_a_backend_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fategen.cli import print_settings

    for name in [n for n in os.environ if n.startswith(PREFIXES)]:
        monkeypatch.delenv(name)
    raw = f"gpu0=http://gpu0.lan:8188,gpu1=https://gpu1.lan:8443;token={SECRET};header=X:{HIDDEN}"
    monkeypatch.setenv("COMFYUI_BACKENDS", raw)
    assert print_settings(tmp_path / ".env", False) == 0
    out = capsys.readouterr().out
    assert (
        "COMFYUI_BACKENDS=gpu0=http://gpu0.lan:8188,gpu1=https://gpu1.lan:8443;token=***;"
        "header=X:***    # environment"
    ) in out
    assert "FATEGEN_PROBE_INTERVAL=1.0    # default" in out
    assert "FATEGEN_MAX_LOSSES=3    # default" in out
    assert SECRET not in out and HIDDEN not in out


def test_the_scaffold_has_every_variable_and_explains_the_fleet() -> None:
    from dotenv import dotenv_values

    from fategen.scaffold import NOTES, example_env

    text = example_env()
    for name in KNOWN_VARIABLES:
        assert f"\n# {name}=" in text, name
    assert set(NOTES) <= KNOWN_VARIABLES
    for name in ("COMFYUI_BACKENDS", "FATEGEN_PROBE_INTERVAL", "FATEGEN_PROBE_TIMEOUT"):
        assert name in NOTES
    # The example, uncommented, is a valid setting.
    (example,) = [n for n in NOTES["COMFYUI_BACKENDS"] if n.startswith("COMFYUI_BACKENDS=")]
    values = {k: v for k, v in dotenv_values(stream=io.StringIO(example)).items() if v}
    assert [s.name for s in Settings.from_env(values).backends] == ["gpu0", "gpu1"]


def test_fategen_settings_never_prints_a_webhook_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fategen.cli import print_settings

    for name in [n for n in os.environ if n.startswith(PREFIXES)]:
        monkeypatch.delenv(name)
    secret = "whsec_" + "Q" * 44
    monkeypatch.setenv("FATEGEN_WEBHOOK_SECRET", secret)
    monkeypatch.setenv("FATEGEN_KEY_WEBHOOKS", f"bot=https://bot.example.org/h;secret={secret}")
    assert print_settings(tmp_path / ".env", False) == 0
    out = capsys.readouterr().out
    assert "FATEGEN_WEBHOOK_SECRET=<set>" in out
    assert "FATEGEN_KEY_WEBHOOKS=bot=https://bot.example.org/h;secret=***" in out
    assert "Q" * 44 not in out


@pytest.mark.parametrize(
    ("variable", "raw", "part"),
    [
        ("FATEGEN_WEBHOOK_SECRET", "not-base64!", "whsec_ and the base64"),
        ("FATEGEN_WEBHOOK_SECRET", "whsec_c2hvcnQ=", "24 to 64 random bytes"),
        ("FATEGEN_KEY_WEBHOOKS", "ircbot", "entry 1 is not keyname=URL"),
        ("FATEGEN_KEY_WEBHOOKS", "ircbot=ftp://x", "does not start with http://"),
        ("FATEGEN_KEY_WEBHOOKS", "ircbot=https://x;token=y", "not secret="),
        ("FATEGEN_KEY_WEBHOOKS", "ircbot=https://x;secret=whsec_c2hvcnQ=", "24 to 64"),
    ],
)
def test_a_bad_webhook_setting_is_one_sentence_without_the_secret(
    variable: str, raw: str, part: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: raw})
    message = str(caught.value)
    _one_sentence(message)
    assert message.startswith(variable) and part in message
    assert "c2hvcnQ" not in message and "not-base64" not in message
