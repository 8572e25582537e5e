"""Named API keys: a nick belongs to its key, so two bots' "alice" are two users (turns, caps,
cancel and Idempotency-Key), one bot cannot cancel another's jobs, and a job shows its key."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from conftest import open_stack
from fategen.errors import ConfigError
from fategen.settings import Settings, split_key
from fategen.simulator import SimulatorKnobs

IRC = "irc-token-0123456789abcdef"
DISCORD = "discord-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
TINY = "-m tiny -w 256 -h 256"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_keys_may_carry_names_and_bare_ones_keep_working() -> None:
    s = Settings.from_env({"FATEGEN_API_KEYS": f"ircbot:{IRC}, {DISCORD}"})
    names = dict(split_key(k)[::-1] for k in s.api_keys)
    assert names[IRC] == "ircbot"
    assert names[DISCORD].startswith("key-") and DISCORD not in names[DISCORD]


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (f"bad name:{IRC}", "has a name that is not"),
        (f"bot:{IRC},bot:{DISCORD}", "the key name 'bot' is used twice"),
        ("bot:short", "has 5 characters"),
    ],
)
def test_bad_key_names_are_refused(value: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as err:
        Settings.from_env({"FATEGEN_API_KEYS": value})
    assert IRC not in str(err.value) and DISCORD not in str(err.value)


async def test_a_nick_belongs_to_its_key(tmp_path: Path) -> None:
    env = {
        "FATEGEN_API_KEYS": f"ircbot:{IRC},discord:{DISCORD}",
        "FATEGEN_ADMIN_KEYS": f"ops:{ADMIN}",
        "FATEGEN_MAX_QUEUE_PER_USER": "2",
    }
    knobs = SimulatorKnobs(step_seconds=0.002, model_load_seconds=0.0, hang=1)
    async with open_stack(tmp_path, knobs, **env) as stack:
        c = stack.client

        async def submit(token: str, message: str, **headers: str) -> dict[str, object]:
            r = await c.post(
                "/request",
                json={"message": f"{message} {TINY}", "nick": "alice"},
                headers=bearer(token) | headers,
            )
            return {**r.json(), "http": r.status_code}

        with trio.fail_after(30):
            blocker = await submit(ADMIN, "hangs on ComfyUI")
            await stack.sim.wait_running(str(blocker["job_id"]))
            irc = [await submit(IRC, f"irc {i}") for i in range(2)]
            assert all(r["http"] == 200 for r in irc), irc
            capped = await submit(IRC, "irc 2")
            assert capped["http"] == 429  # ircbot's alice has her two
            discord = await submit(DISCORD, "discord 0")
            assert discord["http"] == 200  # discord's alice is another user
            # Turns: discord's alice comes before ircbot's alice's second job.
            positions = {
                r["job_id"]: (await c.get(f"/job/{r['job_id']}", headers=bearer(IRC))).json()[
                    "queue_position"
                ]
                for r in [*irc, discord]
            }
            assert positions[discord["job_id"]] < positions[irc[1]["job_id"]]
            # Idempotency-Keys are per key too.
            key = {"Idempotency-Key": "same-key"}
            a = await submit(DISCORD, "idem", **key)
            b = await submit(ADMIN, "idem", **key)
            assert a["job_id"] != b["job_id"]
            # The job says which key sent it; only that key (or an admin) may cancel it.
            job = (await c.get(f"/job/{irc[0]['job_id']}", headers=bearer(IRC))).json()
            assert job["key"] == "ircbot" and job["nick"] == "alice"
            url = f"/job/{irc[0]['job_id']}"
            other = await c.delete(url, params={"nick": "alice"}, headers=bearer(DISCORD))
            assert other.status_code == 403
            assert "another API key" in other.json()["error"]
            own = await c.delete(url, params={"nick": "alice"}, headers=bearer(IRC))
            assert own.status_code == 200 and own.json()["status"] == "cancelled"
            admin = await c.delete(f"/job/{irc[1]['job_id']}", headers=bearer(ADMIN))
            assert admin.status_code == 200
            await c.delete(f"/job/{blocker['job_id']}", headers=bearer(ADMIN))
