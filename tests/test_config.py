"""minillm.config: a dataclass becomes a command line with --help, --quick and clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from minillm.config import QuickConfig, config_for_notebook, config_parser, parse_config, run_chapter


@dataclass
class ExampleConfig(QuickConfig):
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    lr: float = field(default=0.1, metadata={"help": "learning rate"})
    optimizer: Literal["sgd", "adam"] = field(default="adam", metadata={"help": "which optimizer"})
    out: str = field(default="runs/example", metadata={"help": "output folder"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas"})
    plot: bool = field(default=True, metadata={"help": "save plots"})
    QUICK = {"steps": 10}

    def validate(self):
        if self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")


def test_defaults_need_no_arguments():
    assert parse_config(ExampleConfig, []) == ExampleConfig()


def test_every_field_has_a_flag_with_its_help_line():
    text = config_parser(ExampleConfig).format_help()
    for flag, help_line in [("--steps", "optimizer steps"), ("--lr", "learning rate"), ("--optimizer", "which optimizer"),
                            ("--betas", "Adam betas"), ("--plot", "save plots"), ("--quick", "tiny configuration")]:
        assert flag in text and help_line in text


def test_flags_set_values_with_their_types():
    config = parse_config(ExampleConfig, ["--steps", "5", "--lr", "0.5", "--optimizer", "sgd", "--betas", "0.8", "0.9", "--no-plot"])
    assert (config.steps, config.lr, config.optimizer, config.betas, config.plot) == (5, 0.5, "sgd", (0.8, 0.9), False)


def test_quick_applies_its_overrides_but_explicit_flags_win(monkeypatch):
    monkeypatch.delenv("MINILLM_QUICK", raising=False)
    assert parse_config(ExampleConfig, ["--quick"]).steps == 10
    assert parse_config(ExampleConfig, ["--quick", "--steps", "3"]).steps == 3
    monkeypatch.setenv("MINILLM_QUICK", "1")
    assert parse_config(ExampleConfig, []).steps == 10
    assert config_for_notebook(ExampleConfig, lr=0.3) == ExampleConfig(quick=True, steps=10, lr=0.3)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "many"], "invalid"),
    (["--optimizer", "lbfgs"], "invalid choice"),
])
def test_bad_values_exit_with_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(ExampleConfig, argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@dataclass
class DeviceConfig(QuickConfig):
    device: str = field(default="auto", metadata={"help": "device"})


def test_a_device_this_machine_lacks_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(DeviceConfig, ["--device", "tpu"])
    assert exit_info.value.code == 2 and "unknown device 'tpu'" in capsys.readouterr().err


def test_run_chapter_turns_a_users_mistake_into_one_line_and_exit_2(capsys):
    from minillm import MinillmError

    def main(config):
        raise MinillmError("data/missing.txt does not exist or is not a file")

    with pytest.raises(SystemExit) as exit_info:
        run_chapter(main, ExampleConfig, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: data/missing.txt does not exist or is not a file\n"
    seen = []
    run_chapter(seen.append, ExampleConfig, ["--steps", "5"])
    assert seen == [ExampleConfig(steps=5)]
