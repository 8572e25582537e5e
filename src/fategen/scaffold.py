"""``fategen init [DIR]``: an editable configuration for an operator to start from."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import attrs

from fategen.settings import Settings, shipped


def variables() -> list[tuple[str, str]]:
    """Every setting's variable and its default, in the order of `Settings`."""
    found = []
    for field in attrs.fields(Settings):  # type: ignore[arg-type]  # environ-config class
        entry = field.metadata.get("environ_config")
        if entry is not None:
            found.append((entry.name, str(entry.default)))
    return found


#: Settings whose name and default do not say enough: explained above their line.
NOTES: dict[str, tuple[str, ...]] = {
    "COMFYUI_BACKENDS": (
        "Several ComfyUI servers, comma-separated name=URL entries; each may add ;token=SECRET",
        "(a bearer token), ;header=Name:Value (repeatable), ;slots=N (prompts at once, 1-16)",
        "and ;folder=PATH (its output folder, if readable here). When set, it wins over",
        "COMFYUI_ADDRESS/COMFYUI_PORT. For example:",
        "COMFYUI_BACKENDS=gpu0=http://gpu0.lan:8188,gpu1=https://gpu1.lan:8443;token=SECRET",
    ),
    "FATEGEN_PROBE_INTERVAL": ("Seconds between two health probes of each ComfyUI server.",),
    "FATEGEN_PROBE_TIMEOUT": ("Seconds a health probe may take before the server is down.",),
    "FATEGEN_MAX_LOSSES": (
        "A job lost by this many ComfyUI servers in a row (each went down while running it)",
        "fails instead of being tried on another one (1-100).",
    ),
}


def example_env() -> str:
    lines = [
        "# fategen settings. Uncomment and change what you need; the environment wins over",
        "# this file. Every setting is explained in the README's Configuration table.",
        "",
    ]
    for name, default in variables():
        notes = NOTES.get(name, ())
        if notes:
            if lines[-1] != "#":
                lines.append("#")
            lines += [f"# {note}" for note in notes]
        lines.append(f"# {name}={default}")
        if notes:
            lines.append("#")
    return "\n".join(lines) + "\n"


def init(target: Path) -> int:
    """Write ``config/``, ``workflows/`` and ``.env`` into ``target``, keeping existing files."""
    target.mkdir(parents=True, exist_ok=True)
    written, kept = [], []
    sources = [(shipped("config"), target / "config"), (shipped("workflows"), target / "workflows")]
    for source_dir, dest_dir in sources:
        dest_dir.mkdir(exist_ok=True)
        for source in sorted(source_dir.glob("*.json")):
            dest = dest_dir / source.name
            if dest.exists():
                kept.append(dest)
            else:
                shutil.copyfile(source, dest)
                written.append(dest)
    env = target / ".env"
    if env.exists():
        kept.append(env)
    else:
        env.write_text(example_env(), encoding="utf-8")
        written.append(env)
    for path in written:
        print(f"wrote {path}")
    for path in kept:
        print(f"kept {path} (it exists)", file=sys.stderr)
    print(f"start it with: cd {target} && fategen serve --simulate")
    return 0
