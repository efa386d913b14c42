"""CLI consistency (issue 16): presets are choices from one registry per kind, the same list in every
command of that kind; `-b` is `--bundle` wherever it exists; every `--json` says what it prints; a GPU
preset on a machine without a GPU is warned about."""
from __future__ import annotations

import pytest
import typer.main

from flows.cli import app
from flows.cli_checks import gpu_warning, preset_names

COMMANDS = typer.main.get_command(app).commands
KINDS = {"model": ["inspect", "train-decoder", "pretrain", "export"], "pipeline": ["run", "demo", "promote"],
         "bootstrap": ["bootstrap-teacher"]}


def _option(command: str, name: str):
    return next((p for p in COMMANDS[command].params if name in p.opts), None)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_presets_are_the_same_choices_in_every_command_of_a_kind(kind: str) -> None:
    expected = "[" + "|".join(preset_names(kind)) + "]"
    for command in KINDS[kind]:
        option = _option(command, "--preset")
        assert option is not None and "-p" in option.opts and option.metavar == expected, command


def test_b_means_bundle_everywhere() -> None:
    for name, command in COMMANDS.items():
        for param in command.params:
            if "-b" in param.opts:
                assert "--bundle" in param.opts, (name, param.opts)


def test_every_json_option_is_documented() -> None:
    undocumented = [name for name in COMMANDS if (o := _option(name, "--json")) is not None and not o.help]
    assert undocumented == []


def test_gpu_presets_warn_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("snapgen_model.device.has_gpu", lambda: False)
    assert "toy-gpu" in gpu_warning("toy-gpu") and gpu_warning("toy") is None
    monkeypatch.setattr("snapgen_model.device.has_gpu", lambda: True)
    assert gpu_warning("toy-gpu") is None
