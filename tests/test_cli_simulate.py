"""``fategen serve --simulate [N]``: the argument, and the knobs of a fleet of simulators."""

from __future__ import annotations

import pytest

from fategen.cli import MAX_SIMULATORS, _parser, simulator_knobs
from fategen.simulator import DEFAULT_CHECKPOINTS, SimulatorKnobs


@pytest.mark.parametrize(
    ("argv", "count"),
    [
        (["serve"], 0),
        (["serve", "--simulate"], 1),
        (["serve", "--simulate", "--port", "9000"], 1),
        (["serve", "--port", "9000", "--simulate"], 1),
        (["serve", "--simulate", "1"], 1),
        (["serve", "--simulate", "3"], 3),
        (["serve", "--simulate=8"], 8),
    ],
)
def test_simulate_takes_an_optional_count(argv: list[str], count: int) -> None:
    assert _parser().parse_args(argv).simulate == count


@pytest.mark.parametrize("bad", ["0", "9", "-1", "two"])
def test_simulate_count_out_of_range_is_a_usage_error(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        _parser().parse_args(["serve", "--simulate", bad])
    assert stopped.value.code == 2
    assert f"from 1 to {MAX_SIMULATORS}" in capsys.readouterr().err


def test_one_simulator_is_as_before() -> None:
    (knobs,) = simulator_knobs(1, step_seconds=0.01, load_seconds=0.05)
    assert knobs == SimulatorKnobs(step_seconds=0.01, model_load_seconds=0.05)
    (knobs,) = simulator_knobs(1, step_seconds=0.5, load_seconds=0.1, checkpoints=["a.ckpt"])
    assert knobs == SimulatorKnobs(step_seconds=0.5, model_load_seconds=0.1, checkpoints=["a.ckpt"])


def test_a_fleet_differs_in_speed_and_checkpoints() -> None:
    fleet = simulator_knobs(6, step_seconds=0.2, load_seconds=1.0)
    assert [k.step_seconds for k in fleet] == [0.2, 0.2, 0.4, 0.1, 0.2, 0.2]
    assert [k.model_load_seconds for k in fleet] == [1.0, 1.0, 2.0, 0.5, 1.0, 1.0]
    assert fleet[0].checkpoints == list(DEFAULT_CHECKPOINTS)
    for i, knobs in enumerate(fleet[1:], start=1):
        lacking = DEFAULT_CHECKPOINTS[(i - 1) % len(DEFAULT_CHECKPOINTS)]
        assert knobs.checkpoints == [c for c in DEFAULT_CHECKPOINTS if c != lacking]
    assert len({tuple(k.checkpoints) for k in fleet[1:5]}) == 4, "placement matters"


@pytest.mark.parametrize("count", range(2, MAX_SIMULATORS + 1))
def test_every_checkpoint_is_on_some_simulator(count: int) -> None:
    fleet = simulator_knobs(count, step_seconds=0.01, load_seconds=0.05)
    for checkpoint in DEFAULT_CHECKPOINTS:
        assert any(checkpoint in k.checkpoints for k in fleet), checkpoint
    assert len({id(k.checkpoints) for k in fleet}) == count, "each has its own list"


def test_given_checkpoints_are_on_every_simulator() -> None:
    fleet = simulator_knobs(3, step_seconds=0.01, load_seconds=0.05, checkpoints=["x", "y"])
    assert [k.checkpoints for k in fleet] == [["x", "y"]] * 3
    fleet[0].checkpoints.append("z")
    assert fleet[1].checkpoints == ["x", "y"]
