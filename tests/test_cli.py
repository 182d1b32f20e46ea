"""The command line: every subcommand answers --help, and errors exit non-zero with a message."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fmrirecon
from fmrirecon.cli import COMMANDS, build_parser, main


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fmrirecon " + command)


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_parser_lists_every_command():
    parser = build_parser()
    help_text = parser.format_help()
    for command in COMMANDS:
        assert command in help_text


def test_console_entry_point_runs():
    """The ``fmrirecon`` command users type: the script pip generates from pyproject's ``[project.scripts]``,
    looked up beside this interpreter first (an unactivated venv), then on PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    script = shutil.which("fmrirecon", path=search)
    assert script is not None, f"no `fmrirecon` console script on {search} — is the package installed?"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"fmrirecon {fmrirecon.__version__}"
    result = subprocess.run([script, COMMANDS[0], "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: fmrirecon {COMMANDS[0]}"), (
        result.stderr
    )


def test_train_world_overrides_are_typed_and_checked():
    from fmrirecon.commands.backbones import _parse_overrides
    from fmrirecon.errors import ConfigError

    cfg = _parse_overrides(["clip_hard_negatives=false", "clip_steps=12", "clip_lr=3e-4", "vae_bf16=yes"])
    assert cfg.clip_hard_negatives is False and cfg.vae_bf16 is True
    assert cfg.clip_steps == 12 and cfg.clip_lr == 3e-4
    for bad in ["clip_hard_negatives=maybe", "clip_steps=1.5", "no_such_field=1", "clip_steps"]:
        with pytest.raises(ConfigError):
            _parse_overrides([bad])
